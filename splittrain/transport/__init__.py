"""Transports move the cut protocol's messages between a client and the trunk server.

A message is a kind (``forward``, ``backward``, ``grad_sq_norm``, ``step``, ``save``, ``load``), a small
JSON-able header and a dict of tensors; the reply has the same shape. Transports differ only in how those
bytes move: ``local`` hands them to an in-process :class:`~splittrain.server.TrunkServer` untouched.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

Header = dict[str, Any]
Tensors = dict[str, torch.Tensor]


class Transport(Protocol):
    """Client side of a connection to a trunk server."""

    def request(self, kind: str, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """Send one message and return the server's reply."""
        ...

    def close(self) -> None:
        """Release the connection."""
        ...
