"""In-process transport: the client calls the server directly, with no serialization and no copies."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import Answered, Header, LinkOptions, Tensors

if TYPE_CHECKING:
    from ..server import TrunkServer


class LocalTransport:
    """Hands messages to a :class:`TrunkServer` living in the same process.

    ``wire_bytes`` counts the tensor bytes that would cross the cut (nothing is serialized).
    """

    def __init__(self, server: "TrunkServer", client: str = "client0") -> None:
        self.server, self.client = server, client
        self.wire_bytes = 0

    def request(self, kind: str, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        # Clients simulated in one thread cannot wait for each other: a synchronisation point answers "pending"
        # until the last of them arrives.
        reply_header, reply = self.server.handle(self.client, kind, header, tensors, block=False)
        self.wire_bytes += sum(t.nbytes for t in tensors.values()) + sum(t.nbytes for t in reply.values())
        return reply_header, reply

    def submit(self, kind: str, header: Header, tensors: Tensors) -> Answered:
        return Answered(self.request(kind, header, tensors))

    def close(self) -> None:
        self.server.end_session(self.client)


def connect(options: LinkOptions) -> LocalTransport:
    """The registered entry point: a client ``options.client`` of ``options.server``, a server in this process."""
    if options.server is None:
        raise ValueError("transport 'local' needs the TrunkServer of this process")
    return LocalTransport(options.server, options.client)
