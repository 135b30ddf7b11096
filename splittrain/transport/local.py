"""In-process transport: the client calls the server directly, with no serialization and no copies."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Header, Tensors

if TYPE_CHECKING:
    from ..server import TrunkServer


class LocalTransport:
    """Hands messages to a :class:`TrunkServer` living in the same process."""

    def __init__(self, server: "TrunkServer", client: str = "client0") -> None:
        self.server, self.client = server, client

    def request(self, kind: str, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        return self.server.handle(self.client, kind, header, tensors)

    def close(self) -> None:
        pass
