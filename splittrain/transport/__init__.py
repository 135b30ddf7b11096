"""Transports move the cut protocol's messages between a client and the trunk server.

A message is a kind, a small JSON-able header and a dict of tensors; the reply has the same shape. The kinds
(``forward``, ``backward``, ``grad_sq_norm``, ``step``, ``save``, ``load``, ``join``, ``keys``, ``aggregate``,
``end_generation``), their fields, tensors and reply tensors are one table, :data:`~.protocol.KINDS`, in
:mod:`splittrain.transport.protocol`, with the checks it drives and the loop that serves a client's frames.
Transports differ only in how those bytes move: ``local`` hands them to an in-process
:class:`~splittrain.server.TrunkServer` untouched; ``tcp`` and ``dist`` serialize them with
:mod:`splittrain.transport.wire` and open and close sessions (``hello``, ``bye``) in their own way.

``submit`` sends a message without waiting for its reply, so a client can keep several micro-batches in flight
(pipelining): the server answers one connection's requests in order, and ``result()`` of a later request waits
for the earlier ones too. Over ``tcp`` the frame leaves from a sender thread while the caller computes, over
``dist`` by point-to-point ``isend`` (gloo; under nccl ``dist`` answers before ``submit`` returns, as ``local``
always does).

Before any message, a client and a server compare :func:`fingerprint` s, so a client never trains against a
trunk cut from another model or at other layers.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

Header = dict[str, Any]
Tensors = dict[str, torch.Tensor]
TRANSPORTS: dict[str, str] = {"local": f"{__name__}.local", "dist": f"{__name__}.dist", "tcp": f"{__name__}.tcp"}
"""The registry: transport name -> the module whose ``connect(options: LinkOptions)`` opens its client side. A new
transport is its module plus one entry here."""
TransportName = Literal[tuple(TRANSPORTS)]  # type: ignore[valid-type]
"""A transport's name, typed from the registry (a config's ``model.transport``)."""

# Config keys that say nothing about the weights' shapes or the computation.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures",
                         "use_cache", "output_attentions", "output_hidden_states", "return_dict", "_commit_hash",
                         "attn_implementation", "_attn_implementation", "_attn_implementation_autoset",
                         "_experts_implementation", "tokenizer_class"}


class Pending(Protocol):
    """A request on its way to the trunk server."""

    def result(self) -> tuple[Header, Tensors]:
        """The server's reply (waits for it; raises :class:`RemoteError` if the server refused the request)."""
        ...


class Answered:
    """A :class:`Pending` whose reply is already here (transports that answer before ``submit`` returns)."""

    def __init__(self, reply: tuple[Header, Tensors]) -> None:
        self.reply = reply

    def result(self) -> tuple[Header, Tensors]:
        return self.reply


class Transport(Protocol):
    """Client side of a connection to a trunk server."""

    wire_bytes: int
    """Bytes this transport has sent and received (frames, headers included; in process: tensor bytes)."""

    def request(self, kind: str, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """Send one message and return the server's reply."""
        ...

    def submit(self, kind: str, header: Header, tensors: Tensors) -> Pending:
        """Send one message; its reply comes from ``result()``. The tensors must not change until then."""
        ...

    def close(self) -> None:
        """End the session and release the connection."""
        ...


@dataclass(frozen=True)
class LinkOptions:
    """What a client's side of any transport may need; each transport takes what applies to it."""

    client: str = "client0"
    """The client's name on the server (over tcp, the name its token is issued to)."""
    server: Any = None
    """``local``: the :class:`~splittrain.server.TrunkServer` of this process."""
    address: str | None = None
    token: str | None = None
    fingerprint: dict[str, Any] | None = None
    """What the server must agree on (:func:`fingerprint`), presented at the handshake."""
    tls_ca: str | None = None
    timeout: float = 600.0
    """Seconds to wait for the server."""
    reconnect_timeout: float = 300.0
    schedule: dict[str, Any] | None = None
    """The trunk schedule this client trains with (None when it does not train), compared at the handshake."""


def connect(transport: str, options: LinkOptions) -> Transport:
    """The client side of the registered transport ``transport`` (:data:`TRANSPORTS`), opened with ``options``."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; available: {', '.join(TRANSPORTS)}")
    return importlib.import_module(TRANSPORTS[transport]).connect(options)


class RemoteError(RuntimeError):
    """The trunk server refused a request; the message is the server's."""


class SessionBusy(RuntimeError):
    """A live session of another process holds this client name; it may be gone ``retry_after`` seconds from now
    (None: it is connected)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServerUnavailable(Exception):
    """The server cannot answer now (its trunk replicas lost one of them and are to be restarted): the connection is
    closed without a reply, so that the client reconnects and sends its requests again, or replays them to the
    restarted server. Not a refusal: a client must not give up on it."""


def config_digest(config: Any) -> str:
    """sha256 of the decoder config's architecture (what fixes the weights' names, shapes and computation)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    data = {k: v for k, v in data.items() if k not in _VOLATILE_CONFIG_KEYS and not k.endswith("_token_id")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(config: Any, family: str, cuts: tuple[int, int], dtype: torch.dtype | str) -> dict[str, Any]:
    """What both sides of a cut must agree on before any tensor crosses."""
    from .wire import VERSION

    return {"protocol": VERSION, "family": family, "num_layers": int(config.num_hidden_layers),
            "cuts": [int(c) for c in cuts], "hidden_size": int(config.hidden_size),
            "dtype": str(dtype).removeprefix("torch."), "config": config_digest(config)}


def fingerprint_mismatch(client: dict[str, Any], server: dict[str, Any]) -> str | None:
    """A sentence naming every field where two fingerprints differ, or None when they agree."""
    names = {"config": "base model config (sha256 prefix)"}
    diffs = [f"{names.get(k, k)}: client {client.get(k)!r}, server {server.get(k)!r}"
             for k in sorted(set(client) | set(server)) if client.get(k) != server.get(k)]
    return "; ".join(diffs) if diffs else None
