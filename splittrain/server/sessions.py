"""Clients' sessions on the trunk server: what each holds, and the bounds and timeouts it lives by."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..transport import SessionBusy
from ..transport.codec import ErrorFeedback
from .adapters import TrunkAdapter
from .settings import ServerLimits

log = logging.getLogger("splittrain.server")


@dataclass
class Graph:
    """One forward pass waiting for its backward pass."""

    x: torch.Tensor
    y: torch.Tensor
    need_input_grad: bool
    nbytes: int
    created: float


@dataclass
class Session:
    """What one client holds on the server."""

    client: str
    id: str
    graphs: OrderedDict = field(default_factory=OrderedDict)
    last_seq: int = 0
    replies: OrderedDict = field(default_factory=OrderedDict)
    """seq -> reply of the requests whose reply the client has not acknowledged yet (a pipelining client has
    several in flight; a repeated request gets its reply again)."""
    connections: int = 0
    idle_since: float = field(default_factory=time.monotonic)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    """This client's trunk gradients since its last step (kept apart from other clients')."""
    index: int | None = None
    """Its client index in a federation (``join``)."""
    samples: int = 0
    """Its number of training rows (weights of sample-weighted averages)."""
    step: int | None = None
    """The client's optimizer steps so far, in a federation (set by its first training forward pass)."""
    generations: OrderedDict = field(default_factory=OrderedDict)
    """Generation id -> :class:`~splittrain.server.generation.Generation`, least recently used first."""
    adapter: TrunkAdapter | None = None
    """The trunk adapter it trains and runs: its own, or its federation's."""
    feedback: ErrorFeedback = field(default_factory=ErrorFeedback)
    """The error feedback of the int8 gradients sent back to this client (:mod:`~splittrain.transport.codec`)."""

    @property
    def graph_bytes(self) -> int:
        return sum(g.nbytes for g in self.graphs.values())

    @property
    def pending(self) -> bool:
        """Gradients of this client wait in the trunk for a step."""
        return bool(self.grads)


class Sessions(dict[str, Session]):
    """Client name -> its one live session; frees what sessions hold when their bounds or timeouts say so.

    Not thread-safe by itself: the server calls it under its lock.
    """

    def __init__(self, limits: ServerLimits, count: Callable[[str], None]) -> None:
        super().__init__()
        self.limits, self.count = limits, count

    def claim(self, client: str, session_id: str) -> Session | None:
        """``client``'s session ``session_id`` when it is the live one, else None. A live session of another id is
        freed when it has no connection and has waited ``session_timeout`` (it is gone), else :class:`SessionBusy`."""
        session = self.get(client)
        if session is None or session.id == session_id:
            return session
        if session.connections:
            raise SessionBusy(f"client {client!r} is connected from another process: two processes under "
                              "one name would train one adapter twice. Stop the other one, or give this "
                              "one a name and token of its own")
        timeout = self.limits.session_timeout
        waited = time.monotonic() - session.idle_since
        if waited <= timeout:
            raise SessionBusy(
                f"client {client!r} has a session from another process that disconnected {waited:.0f} s "
                f"ago; it is kept {timeout:g} s for that process to reconnect "
                f"(serve --session_timeout), so a new one can start in {timeout - waited:.0f} s",
                retry_after=timeout - waited)
        self.count("sessions_expired")
        self.discard(session, f"expired after {timeout:g} s without a connection")
        return None

    def detach(self, client: str, session_id: str) -> None:
        """A connection of the session ended; the session waits ``session_timeout`` for a reconnect."""
        session = self.get(client)
        if session is not None and session.id == session_id:
            session.connections = max(0, session.connections - 1)
            session.idle_since = time.monotonic()

    def end(self, client: str, session_id: str | None = None) -> Session | None:
        """The client said goodbye: free everything it held. Returns the session that ended, if one did."""
        session = self.get(client)
        if session is None or (session_id is not None and session.id != session_id):
            return None
        self.discard(session, "ended by the client")
        return session

    def discard(self, session: Session, why: str) -> None:
        dropped = len(session.graphs)
        session.graphs.clear()
        session.generations.clear()
        session.grads.clear()  # gradients of a step the client never finished must not leak into the next one
        if self.get(session.client) is session:
            del self[session.client]
        log.info("session of client %r %s (%d graphs freed)", session.client, why, dropped)

    def expire(self, now: float) -> None:
        """Free sessions of clients silent for ``session_timeout``, generations idle for ``generation_timeout`` and
        graphs older than ``max_graph_age``."""
        limits = self.limits
        for session in list(self.values()):
            if session.connections == 0 and now - session.idle_since > limits.session_timeout:
                self.count("sessions_expired")
                self.discard(session, f"expired after {limits.session_timeout:g} s without a connection")
                continue
            for gid, generation in list(session.generations.items()):
                if now - generation.used > limits.generation_timeout:
                    del session.generations[gid]
                    self.count("generations_expired")
                    log.info("freed generation %s of client %r: idle for %g s", gid, session.client,
                             limits.generation_timeout)
            for key, graph in list(session.graphs.items()):
                if now - graph.created > limits.max_graph_age:
                    del session.graphs[key]
                    self.count("graphs_dropped")
                    log.warning("dropped graph %s of client %r: no backward pass for %g s", key,
                                session.client, limits.max_graph_age)

    def keep(self, session: Session, key: tuple, graph: Graph) -> None:
        """Keep a forward pass's graph for its backward pass; the oldest go beyond ``max_graphs`` or
        ``max_graph_bytes``."""
        session.graphs.pop(key, None)  # a repeated forward pass replaces its graph
        session.graphs[key] = graph
        limits = self.limits
        while len(session.graphs) > limits.max_graphs or (
                len(session.graphs) > 1 and session.graph_bytes > limits.max_graph_bytes):
            dropped, _ = session.graphs.popitem(last=False)
            self.count("graphs_dropped")
            log.warning("client %r: dropped the unfinished graph %s (more than %d graphs or %d bytes waiting for "
                        "their backward pass)", session.client, dropped, limits.max_graphs, limits.max_graph_bytes)
