"""The federation's trunk half: who takes part, the synchronisation points, the shared trunk adapter's steps and
the secure-aggregation relay.

The trunk server holds one :class:`TrunkFederation` and hands it the requests ``join``, ``keys`` and ``aggregate``
and a federation's ``step``; it asks it whether a session may train (:meth:`~TrunkFederation.member`), which
sessions share a step's gradients (:meth:`~TrunkFederation.fellows`) and what a restore changes. A synchronisation
point (:class:`Gathering`) waits, under the server's lock, until every expected client has arrived or
``round_timeout`` has passed since the first did; the missing clients are dropped until they join again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..transport import Header, Tensors
from .secagg import aggregate as add_masked
from .settings import FederatedSettings

log = logging.getLogger("splittrain.server")  # what happens here is the trunk server's to report


class SharedAdapter(Protocol):
    """The trunk adapter the federation's members train."""

    steps: int

    def step_reply(self) -> Header: ...


class Member(Protocol):
    """What the federation reads and changes of a client's session on the trunk server."""

    client: str
    index: int | None
    """Its client index, once it joined."""
    samples: int
    step: int | None
    """Its optimizer steps so far (None until its first training forward pass)."""
    connections: int
    grads: dict[str, torch.Tensor]

    @property
    def adapter(self) -> SharedAdapter | None: ...


Apply = Callable[[Any, dict[str, torch.Tensor], float | None], None]
"""Applies one optimizer step of an adapter to gradients, scaled by the clipping scale."""


@dataclass
class Gathering:
    """A synchronisation point of a federation: the clients' contributions to one step or one average."""

    name: str
    expected: set[int]
    finish: Callable[[dict[int, Any]], Any]
    arrived: dict[int, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    result: Any = None
    error: Exception | None = None
    done: bool = False


class TrunkFederation:
    """The trunk server's side of a federation; every call comes with the server's ``lock`` held.

    Args:
        settings: the federation (None: the server trains independent clients; a lone client may still join as
            client 0).
        sessions: the server's live sessions by client name.
        lock: the server's lock; a synchronisation point waits on it.
        count: adds one to one of the server's status counters.
        apply: one optimizer step of the shared adapter on combined gradients.
        instance: the server's instance id (secure aggregation binds its keys to it).
    """

    def __init__(self, settings: FederatedSettings | None, sessions: Mapping[str, Member], lock: threading.RLock,
                 count: Callable[[str], None], apply: Apply, instance: str) -> None:
        self.settings, self.sessions, self.count, self.apply, self.instance = settings, sessions, count, apply, instance
        self.changed = threading.Condition(lock)
        self.block = True
        """Whether a synchronisation point may wait for the other clients (set per request by the transport)."""
        self.gatherings: dict[str, Gathering] = {}
        self.dropped: set[int] = set()
        """Client indices dropped after round_timeout (until they send again)."""
        self.left: set[int] = set()
        """Client indices that said goodbye."""
        self.roster: dict[int, str] = {}
        """Client index -> the name it joined under."""
        self.federated_step = 0
        """Steps every client of a ``sync`` federation has completed."""
        self._restored: tuple[str, int] | None = None
        """(checkpoint file, step) of the last restore, so every client of a federation may resume from it."""

    # ------------------------------------------------------------------------------------------ members
    def join(self, session: Member, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """A client of the federation says which client it is and how many training rows it holds."""
        clients = self.settings.clients if self.settings is not None else 1
        index = header["index"]
        if not 0 <= index < clients:
            raise ValueError(f"client index {index} is outside this server's federation of {clients} client(s)")
        for other in self.sessions.values():
            if other is not session and other.index == index:
                raise ValueError(f"client {other.client!r} already takes part as client {index}")
        session.index, session.samples = index, header["samples"]
        self.roster[index] = session.client
        self.left.discard(index)
        if index in self.dropped:
            self.dropped.discard(index)
            log.info("client %r (index %d) rejoins the federation", session.client, index)
        return {"clients": clients, "step": session.adapter.steps}, {}

    def member(self, session: Member) -> int:
        """The client index of ``session``, which must have joined."""
        if session.index is None:
            raise RuntimeError(f"client {session.client!r} has not joined the federation (join with its index)")
        return session.index

    def leave(self, index: int) -> None:
        """A federation's client said goodbye: synchronisation points stop waiting for it."""
        self.left.add(index)
        for gathering in list(self.gatherings.values()):
            gathering.expected.discard(index)
            if not gathering.done and gathering.arrived and gathering.arrived.keys() >= gathering.expected:
                self._finish(gathering)

    def fellows(self, session: Member) -> list[Member]:
        """The members training ``session``'s adapter (``session`` among them): their gradients make one step."""
        self.member(session)
        return [s for s in self.sessions.values() if s.adapter is session.adapter and s.index is not None]

    def status(self) -> dict[str, Any]:
        return {"federated_step": self.federated_step, "dropped": sorted(self.dropped), "left": sorted(self.left)}

    # ------------------------------------------------------------------------------------------ steps
    def forward(self, session: Member, step: int) -> None:
        """A member's training forward pass of optimizer step ``step + 1``: the step it is on."""
        self.member(session)
        if session.step is None:
            session.step = step
        if step != session.step:
            raise RuntimeError(f"client {session.client!r} trains optimizer step {step + 1} but has "
                               f"completed {session.step} steps on this server")

    def step(self, session: Member, header: Header) -> tuple[Header, Tensors]:
        """A member's optimizer step ``header["step"]``: at once (``sequential``), or once every expected member
        has asked for it, on their weighted mean gradient (``sync``; ``{"pending": true}`` until then when the
        request cannot wait)."""
        settings, index = self.settings, self.member(session)
        target = header["step"]
        if session.step is None:  # a client that sat out every step since it joined (or since a restore)
            session.step = target - 1
        done = session.step
        if target == done:  # already applied; the reply was lost
            self.count("steps_repeated")
            return session.adapter.step_reply(), {}
        if target != done + 1:
            raise RuntimeError(f"client {session.client!r} asks for optimizer step {target} after {done}")
        participant = bool(header.get("participant", True))
        if settings.trunk_update == "sequential":  # each participant's step is a trunk step, in arrival order
            if participant:
                self.apply(session.adapter, dict(session.grads), header.get("scale"))
            session.grads.clear()
            session.step = target
            return session.adapter.step_reply(), {}
        if target <= self.federated_step:
            raise RuntimeError(f"client {session.client!r} was dropped from step {target} after "
                               f"round_timeout ({settings.round_timeout:g} s); the federation is at step "
                               f"{self.federated_step}")

        def finish(arrived: dict[int, Any]) -> None:
            # in client order, not arrival order: the sum is the same whoever came first
            weighted = [(s.grads, w) for s, w, _ in (arrived[i] for i in sorted(arrived)) if w > 0 and s.grads]
            scale = next((sc for _, _, sc in arrived.values() if sc is not None), None)
            self.apply(session.adapter, combine(weighted, mean=True), scale)
            for s, _, _ in arrived.values():
                s.grads.clear()
                s.step = target
            self.federated_step = target

        weight = settings.weight(participant, session.samples) if participant else 0.0
        gathering = self._gather(f"step {target}", index, (session, weight, header.get("scale")), finish)
        if not gathering.done:
            return {"pending": True}, {}
        return session.adapter.step_reply(), {}

    # ------------------------------------------------------------------------------------------ restores
    def restored(self, name: str, steps: int, federated_step: int) -> None:
        """The shared adapter was restored from checkpoint file ``name`` at ``steps``."""
        self.federated_step = federated_step
        self._restored = (name, steps)

    def at_restore_point(self, session: Member, tag: str, path: Path, steps: int, force: bool) -> bool:
        """Whether ``session`` going back to checkpoint ``tag`` (``path``) finds the shared adapter there already
        (a fellow member resumed from it). A session that is no member (a generation, an evaluation) may not move
        the adapter under members still training it, unless ``force``."""
        there = self._restored == (path.name, steps)
        if session.index is not None:
            return there
        busy = [s.client for s in self.sessions.values() if s is not session and s.connections]
        if busy and not force and not (path.is_file() and there):
            raise RuntimeError(
                f"the trunk server is training the federation with client(s) {', '.join(map(repr, busy))}: "
                f"going back to {tag!r} would change their training. Wait until they finish, or force it "
                "(generate --force_load)")
        return False

    # ------------------------------------------------------------------------------------------ secure aggregation
    def keys(self, session: Member, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """Secure aggregation: relay every client's X25519 public key and weight to all of them."""
        index = self.member(session)
        gathering = self._gather("keys", index, (header["public"], float(header["weight"])),
                                 lambda arrived: {"publics": {str(i): v[0] for i, v in arrived.items()},
                                                  "weights": {str(i): v[1] for i, v in arrived.items()},
                                                  "federation": self.instance})
        if not gathering.done:
            raise RuntimeError("secure aggregation needs clients that can wait for each other (tcp)")
        return gathering.result, {}

    def aggregate(self, session: Member, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """Secure aggregation: add the clients' masked updates (mod 2**64). The server sees only the masked
        vectors and their sum; when a client of the announced participants is missing, the survivors redo the
        round (the masks would not cancel)."""
        index = self.member(session)

        def finish(arrived: dict[int, Any]) -> Any:
            sizes = {v[0].numel() for v in arrived.values()}
            if len(sizes) != 1:
                raise ValueError(f"clients sent updates of different sizes {sorted(sizes)}")
            if all(sorted(v[2]) == sorted(arrived) for v in arrived.values()):
                return {"total_weight": sum(v[1] for v in arrived.values())}, {
                    "sum": add_masked([arrived[i][0] for i in sorted(arrived)])}
            return {"retry": sorted(arrived)}, {}

        gathering = self._gather(f"aggregate {header['nonce']}", index,
                                 (tensors["masked"].clone(), float(header["weight"]), list(header["participants"])),
                                 finish)
        if not gathering.done:
            raise RuntimeError("secure aggregation needs clients that can wait for each other (tcp)")
        self.count("aggregations")
        return gathering.result

    # ------------------------------------------------------------------------------------------ gatherings
    def _gather(self, name: str, index: int, value: Any, finish: Callable[[dict[int, Any]], Any]) -> Gathering:
        """Add this client's ``value`` to the gathering ``name``; it finishes when every expected client has
        arrived, or ``round_timeout`` after the first did (the missing ones are dropped from the federation until
        they join again). Waits for that when the transport can (``block``)."""
        gathering = self.gatherings.get(name)
        if gathering is None:
            expected = set(range(self.settings.clients)) - self.dropped - self.left
            gathering = self.gatherings[name] = Gathering(name, expected, finish)
        gathering.arrived[index] = value
        if gathering.arrived.keys() >= gathering.expected:
            self._finish(gathering)
        elif self.block:
            deadline = gathering.started + self.settings.round_timeout
            while not gathering.done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._drop_missing(gathering)
                    self._finish(gathering)
                    break
                self.changed.wait(remaining)
        if gathering.error is not None:
            raise RuntimeError(f"{gathering.name} failed: {gathering.error}")
        return gathering

    def _drop_missing(self, gathering: Gathering) -> None:
        """Drop the clients ``gathering`` still waits for after ``round_timeout``, with their unapplied gradients."""
        missing = sorted(gathering.expected - gathering.arrived.keys())
        names = [self.roster[i] for i in missing if i in self.roster]
        log.warning("%s goes on without client(s) %s (%s): no answer within round_timeout %g s",
                    gathering.name, ", ".join(map(str, missing)), ", ".join(map(repr, names)) or "never joined",
                    self.settings.round_timeout)
        self.dropped.update(missing)
        self.count("clients_dropped")
        for s in self.sessions.values():
            if s.index in missing:
                s.grads.clear()

    def _finish(self, gathering: Gathering) -> None:
        try:
            gathering.result = gathering.finish(gathering.arrived)
        except (ValueError, RuntimeError, KeyError) as exc:
            gathering.error = exc
        finally:
            gathering.done = True
            self.gatherings.pop(gathering.name, None)
            self.changed.notify_all()


def trunk_steps(settings: FederatedSettings | None, total_steps: int | None) -> int | None:
    """The trunk optimizer steps a schedule over the clients' ``total_steps`` spans: with ``trunk_update:
    sequential`` every participant's step is a trunk step."""
    if settings is not None and settings.trunk_update == "sequential" and total_steps:
        return total_steps * len(settings.participants(0))
    return total_steps


def combine(contributions: list[tuple[dict[str, torch.Tensor], float]], mean: bool) -> dict[str, torch.Tensor]:
    """``sum_c w_c g_c`` (divided by ``sum_c w_c`` when ``mean``) per parameter; one contribution is used as is
    when that is exact (weight 1 or a mean)."""
    if len(contributions) == 1 and (mean or contributions[0][1] == 1.0):
        return dict(contributions[0][0])
    total = sum(w for _, w in contributions)
    combined: dict[str, torch.Tensor] = {}
    for grads, weight in contributions:
        for name, g in grads.items():
            term = g * weight
            combined[name] = combined[name] + term if name in combined else term
    if mean and total:
        combined = {name: g / total for name, g in combined.items()}
    return combined
