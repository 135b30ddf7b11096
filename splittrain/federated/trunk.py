"""The federation's trunk half: who takes part, the synchronisation points, the shared trunk adapter's steps,
the secure-aggregation relay and rejoins.

The trunk server holds one :class:`TrunkFederation` and hands it the requests ``join``, ``keys``, ``aggregate``,
``catch_up`` and ``share`` and a federation's ``step``; it asks it whether a session may train
(:meth:`~TrunkFederation.member`), which sessions share a step's gradients (:meth:`~TrunkFederation.fellows`) and
what a restore changes. A synchronisation point (:class:`Gathering`) of step ``s`` waits, under the server's lock,
until every client expected at ``s`` has arrived or ``round_timeout`` has passed since the first did; the missing
clients are dropped.

Rejoin (``trunk_update: sync``). A client that comes back in a new process (it crashed, rebooted, or lost the
network past the timeouts) joins with its index and the steps it has made, behind the federation's step ``F``
(0 for a fresh ``fit``). Only the name that first joined under an index may take it again, with the same shard
size and federation settings. Open synchronisation points stop waiting for it at once (its old process is gone),
and it is expected again from step ``A = F' + 1``, where ``F'`` is the federation's step when it asks to
``catch_up`` (after it brought its new public key with ``keys``). ``catch_up`` waits until the federation has
made ``A`` steps and the state it rejoins from exists, then answers with ``A``, its data position (the federation
steps it took part in, so it goes on with the first batch it has not trained on) and that state:

* FedSGD: the client-side weights and AdamW moments after step ``A - 1``, which every member holds alike. The first
  member to reach step ``A``'s average is answered ``{"share": A}`` instead, sends that state (``share``), then
  its masked update again. This reveals nothing secure aggregation does not: the state is a deterministic
  function of the initial client-side weights (the shared config's) and of every step's averaged gradient, which
  the server learns as each aggregate's sum.
* FedAvg: the masked sum of the last weight average before step ``A`` as the server answered it to every member
  (the client decodes it as they did), or nothing before the first average: the initial weights are its own. Its
  AdamW starts afresh (the others' moments are their own); its schedule goes to ``A``.

Synchronisation points of a step before ``A`` do not expect it; its first average redoes the round once, so that
every member takes its new public key (a retry carries the members' public keys). A FedSGD client whose update
went into a step's average but that never asked for the step (it died in between) takes part in the step's trunk
update too, with the trunk gradients it left, so both sides of the step hold the same clients.

Restarts. A checkpoint of the shared adapter keeps the federation's bookkeeping (:meth:`TrunkFederation.persisted`:
the roster, shard sizes, data positions, dropped and gone clients, the secure aggregation's public keys and the
federation's id they are bound to, the last weight average), written after a step's bookkeeping. A server
restarted from it (``serve --resume``) goes on with the same federation: each member that waited for it joins
again at the checkpoint's step and replays the requests since; a client that drops later still rejoins.

Replicas. When several server processes serve the trunk (:attr:`TrunkFederation.replicas`,
:mod:`splittrain.server.replicas`), each waits at a synchronisation point for its own clients only, then combines
what it gathered with the other replicas' (the key agreement's keys and weights, a secure average's participants,
masked sum and total weight, a ``sync`` step's weighted trunk gradients) before it finishes, so every replica
finishes alike. A client rejoins through the replica that serves it: its state comes from a member of that
replica, and each secure average first gathers every client's latest public key from the replica serving it.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..transport import Header, ServerUnavailable, Tensors
from .secagg import aggregate as add_masked
from .settings import FederatedSettings

log = logging.getLogger("splittrain.server")  # what happens here is the trunk server's to report


class SharedAdapter(Protocol):
    """The trunk adapter the federation's members train."""

    steps: int
    trainable: list[tuple[str, torch.nn.Parameter]]

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


class Replication(Protocol):
    """The trunk's replicas (:class:`splittrain.server.replicas.Replicas`): what a synchronisation point combines
    across them."""

    rank: int
    size: int
    addresses: list[str]
    failure: str | None

    def owner(self, index: int) -> int: ...

    def own(self, clients: int) -> set[int]: ...

    def keyring(self, name: str, clients: int, local: dict[int, tuple[str, float]]
                ) -> dict[int, tuple[str, float]]: ...

    def arrivals(self, name: str, clients: int, local: dict[int, tuple[int, list[int], bool]]
                 ) -> tuple[set[int], set[int], bool]: ...

    def masked_sum(self, total: torch.Tensor) -> torch.Tensor: ...

    def sum(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def mean_gradients(self, name: str, params: list[tuple[str, torch.Tensor]],
                       contributions: list[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]: ...


@dataclass
class Gathering:
    """A synchronisation point of a federation: the clients' contributions to one step or one average."""

    name: str
    step: int | None
    """The optimizer step (0-based) it belongs to (None: the key agreement before the first)."""
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
        """Client indices dropped after round_timeout, or gone when they came back (until they join again)."""
        self.dropped_at: dict[int, int] = {}
        """Client index -> the first step it was missing from when it was dropped."""
        self.left: set[int] = set()
        """Client indices that said goodbye."""
        self.roster: dict[int, str] = {}
        """Client index -> the name it joined under (no other name may take the index)."""
        self.samples: dict[int, int] = {}
        """Client index -> the training rows it joined with."""
        self.joined: set[int] = set()
        """Client indices that joined since the server started or restored the federation's adapter."""
        self.federated_step = 0
        """Steps every client of a ``sync`` federation has completed."""
        self.counted_from = 0
        """The federated step at the last restore: :attr:`positions` count from there."""
        self.positions: dict[int, int] = {}
        """Client index -> the federation's steps it took part in (a batch of its own data each): its data position."""
        self.rejoining: dict[int, int | None] = {}
        """Client index of a client that rejoined -> the step it is expected from (None until it asks to catch up)."""
        self.rejoins: deque[dict[str, Any]] = deque(maxlen=64)
        """The last rejoins (index, name, step dropped at, step expected from, data position, seconds to catch up)."""
        self.keyring: dict[int, str] | None = None
        """Secure aggregation: each client's public key (hex) once the first key agreement is done."""
        self.key_weights: dict[str, float] = {}
        """The weights published at the first key agreement (their sum scales every client's masked update)."""
        self.keyring_version = 0
        """How often a public key changed since the first agreement (a rejoin brings a new key pair); with replicas,
        as of the last secure average, which adds up :attr:`key_changes` across them."""
        self.key_changes = 0
        """How often one of this server's (replica's) clients brought a new public key since the first agreement."""
        self.shares: dict[int, tuple[int, torch.Tensor] | None] = {}
        """FedSGD: step A -> (optimizer steps, client-side state after step A - 1) for the clients rejoining at A
        (None until a member sent it)."""
        self.summed: dict[int, dict[int, tuple[dict[str, torch.Tensor], float]]] = {}
        """FedSGD: step -> the trunk gradients and weights of the clients whose update is in that step's average."""
        self.last_average: tuple[int, float, torch.Tensor] | None = None
        """FedAvg: (the step it ended, total weight, masked sum) of the last weight average."""
        self.moved = time.monotonic()
        """When a synchronisation point last finished (a rejoining client waits at most round_timeout after it)."""
        self._joined_at: dict[int, float] = {}
        self._caught_up: set[int] = set()
        self._restored: tuple[str, int] | None = None
        """(checkpoint file, step) of the last restore, so every client of a federation may resume from it."""
        self.replicas: Replication | None = None
        """The trunk's replicas when several server processes serve it (their clients are combined); None: this
        server serves every client."""

    # ------------------------------------------------------------------------------------------ members
    def join(self, session: Member, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """A client of the federation says which client it is, how many training rows it holds, how many steps it
        has made (behind the federation's, it rejoins: see the module's docstring) and its federation settings."""
        settings = self.settings
        clients = settings.clients if settings is not None else 1
        index, samples = header["index"], header["samples"]
        if not 0 <= index < clients:
            raise ValueError(f"client index {index} is outside this server's federation of {clients} client(s)")
        replicas = self.replicas
        if replicas is not None and replicas.owner(index) != replicas.rank:
            owner = replicas.owner(index)
            raise ValueError(f"client index {index} is served by trunk replica {owner} at "
                             f"{replicas.addresses[owner]}, not by this one (replica {replicas.rank}): client c "
                             f"connects to replica c % {replicas.size}")
        owner = self.roster.get(index)
        if owner is not None and owner != session.client:
            raise ValueError(f"client index {index} belongs to client {owner!r}: client {session.client!r} cannot "
                             "take part as it (a client comes back under the name and index it joined with)")
        for other in self.sessions.values():
            if other is not session and other.index == index:
                raise ValueError(f"client {other.client!r} already takes part as client {index}")
        if settings is not None and "settings" in header and header["settings"] != settings.common():
            ours, theirs = settings.common(), header["settings"]
            diffs = [f"{k} {theirs.get(k)!r} (server: {ours.get(k)!r})" for k in sorted(set(ours) | set(theirs))
                     if ours.get(k) != theirs.get(k)]
            raise ValueError(f"client {session.client!r} trains another federation: {'; '.join(diffs)}")
        known = self.samples.get(index)
        if known is not None and known != samples:
            raise ValueError(f"client {session.client!r} joined as client {index} with {known} training rows and comes "
                             f"back with {samples}: that would change the weights of every average; it comes back "
                             "with its own shard")
        rejoin = self._rejoins(session, index, header.get("step", 0))
        session.index, session.samples = index, samples
        self.roster[index], self.samples[index] = session.client, samples
        self.joined.add(index)
        self.left.discard(index)
        if rejoin:
            self._absent(index, "it came back in a new process")
            self.dropped.discard(index)
            self.rejoining[index] = None
            self._caught_up.discard(index)
            self._joined_at[index] = time.monotonic()
            log.info("client %r (index %d) rejoins the federation at step %d: it catches up and is expected again "
                     "from the next synchronisation point", session.client, index, self.federated_step)
        else:
            self.rejoining.pop(index, None)
            if index in self.dropped:
                self.dropped.discard(index)
                log.info("client %r (index %d) rejoins the federation", session.client, index)
        return {"clients": clients, "step": session.adapter.steps, "federated_step": self.federated_step,
                "rejoin": rejoin}, {}

    def _rejoins(self, session: Member, index: int, step: int) -> bool:
        """Whether a client joining as ``index`` with ``step`` steps made rejoins a ``sync`` federation in progress:
        it is behind the federation, or its index took part already since the federation started."""
        if self.settings is None:
            return False
        again = index in self.joined and (self.keyring is not None or self.federated_step > self.counted_from)
        if self.settings.trunk_update != "sync":
            if again:
                raise ValueError(f"client {session.client!r} (index {index}) comes back to a federation in progress: "
                                 "rejoining needs trunk_update: sync")
            return False
        if step > self.federated_step:
            raise ValueError(f"client {session.client!r} has made {step} steps but the federation {self.federated_step}: "
                             "restart the server with --resume in its run folder, or resume the client from the "
                             "server's step (--ckpt_path)")
        return step < self.federated_step or again

    def check_replicas(self) -> None:
        """Once the trunk's replicas cannot go on (one died or stopped answering), close every connection without
        a reply (:class:`ServerUnavailable`): the clients wait for the replicas to be restarted, then replay."""
        if self.replicas is not None and self.replicas.failure is not None:
            raise ServerUnavailable(self.replicas.failure)

    def member(self, session: Member) -> int:
        """The client index of ``session``, which must have joined and not been dropped since."""
        index = session.index
        if index is None:
            raise RuntimeError(f"client {session.client!r} has not joined the federation (join with its index)")
        if index in self.dropped:
            at = self.dropped_at.get(index, self.federated_step)
            raise RuntimeError(
                f"client {session.client!r} (index {index}) was dropped from the federation at step {at} and the "
                f"federation is at step {self.federated_step}, {self.federated_step - at} step(s) ahead: run fit "
                "again to rejoin (it catches up with the federation's step and client-side weights)")
        return index

    def leave(self, index: int) -> None:
        """A federation's client said goodbye: synchronisation points stop waiting for it."""
        self.left.add(index)
        for gathering in list(self.gatherings.values()):
            gathering.expected.discard(index)
            if not gathering.done and gathering.arrived and gathering.arrived.keys() >= gathering.expected:
                self._finish(gathering)
        self.changed.notify_all()

    def fellows(self, session: Member) -> list[Member]:
        """The members training ``session``'s adapter (``session`` among them): their gradients make one step."""
        self.member(session)
        return [s for s in self.sessions.values() if s.adapter is session.adapter and s.index is not None]

    def status(self) -> dict[str, Any]:
        return {"federated_step": self.federated_step, "dropped": sorted(self.dropped), "left": sorted(self.left),
                "positions": {str(i): p for i, p in sorted(self.positions.items())},
                "rejoining": {str(i): a for i, a in sorted(self.rejoining.items())
                              if a is None or a >= self.federated_step},
                "rejoins": list(self.rejoins),
                "waiting": {g.name: {"expected": sorted(g.expected), "arrived": sorted(g.arrived),
                                     "seconds": round(time.monotonic() - g.started, 1)}
                            for g in self.gatherings.values() if not g.done},
                **({"replica": {"rank": self.replicas.rank, "replicas": self.replicas.size,
                                "addresses": list(self.replicas.addresses)}} if self.replicas is not None else {})}

    # ------------------------------------------------------------------------------------------ steps
    def forward(self, session: Member, step: int) -> None:
        """A member's training forward pass of optimizer step ``step + 1``: the step it is on."""
        index = self.member(session)
        if session.step is None:
            if index in self.rejoining and (index not in self._caught_up or step != self.rejoining[index]
                                            or step != self.federated_step):
                raise RuntimeError(f"client {session.client!r} rejoined the federation: it trains from step "
                                   f"{self.rejoining[index]} once it caught up (catch_up), not step {step}")
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
            return self._step_reply(session), {}
        if target != done + 1:
            raise RuntimeError(f"client {session.client!r} asks for optimizer step {target} after {done}")
        participant = bool(header.get("participant", True))
        if settings.trunk_update == "sequential":  # each participant's step is a trunk step, in arrival order
            grads = dict(session.grads)
            session.grads.clear()
            session.step = target
            self.positions[index] = self.positions.get(index, 0) + 1
            if participant:
                self.apply(session.adapter, grads, header.get("scale"))
            return self._step_reply(session), {}
        if target <= self.federated_step:
            raise RuntimeError(f"client {session.client!r} was dropped from step {target} after "
                               f"round_timeout ({settings.round_timeout:g} s); the federation is at step "
                               f"{self.federated_step}")

        def finish(arrived: dict[int, Any]) -> None:
            taking = {i: (grads, w) for i, (_, grads, w, _) in arrived.items()}
            for i, contribution in self.summed.pop(target - 1, {}).items():
                if i not in taking:  # its update is in the step's client-side average: its trunk gradients count too
                    log.info("step %d takes the trunk gradients of client %d, whose update is in the step's average",
                             target, i)
                    taking[i] = contribution
                    if i in self.dropped_at:  # it took part in this step: away from the next one on
                        self.dropped_at[i] = max(self.dropped_at[i], target)
            # in client order, not arrival order: the sum is the same whoever came first
            weighted = [taking[i] for i in sorted(taking) if taking[i][1] > 0 and taking[i][0]]
            scale = next((sc for _, _, _, sc in arrived.values() if sc is not None), None)
            if self.replicas is not None:  # every replica's clients, as one server's (DDP's all-reduce)
                grads = self.replicas.mean_gradients(f"step {target}", session.adapter.trainable, weighted)
            else:
                grads = combine(weighted, mean=True)
            for s, _, _, _ in arrived.values():
                s.grads.clear()
                s.step = target
            for i in taking:
                self.positions[i] = self.positions.get(i, 0) + 1
            self.federated_step = target
            self.shares = {a: share for a, share in self.shares.items() if a >= target}
            self.apply(session.adapter, grads, scale)  # last: a checkpoint it writes holds the step's bookkeeping

        weight = settings.weight(participant, session.samples) if participant else 0.0
        gathering = self._gather(f"step {target}", target - 1, index,
                                 (session, dict(session.grads), weight, header.get("scale")), finish)
        if not gathering.done:
            return {"pending": True}, {}
        return self._step_reply(session), {}

    def _step_reply(self, session: Member) -> Header:
        """The shared adapter's answer to a step. With replicas the step the client may count as saved is the one
        before: another replica may have died before it saved this one, and the replicas restart from the step
        every one of them saved."""
        reply = session.adapter.step_reply()
        if self.replicas is not None and reply.get("saved") is not None:
            reply["saved"] = min(reply["saved"], reply["step"] - 1)
        return reply

    # ------------------------------------------------------------------------------------------ restores
    def persisted(self) -> dict[str, Any]:
        """What a checkpoint of the shared adapter keeps of the federation, so that a server restarted from it
        (``serve --resume``) goes on with the same members: who holds each index with how many rows, each one's
        data position, who was dropped or left, the secure aggregation's public keys and the last weight average.
        Nothing here is private: the server learnt all of it from the clients' requests."""
        return {
            "instance": self.instance, "roster": dict(self.roster), "samples": dict(self.samples), "positions": dict(self.positions),
            "dropped": sorted(self.dropped), "dropped_at": dict(self.dropped_at), "left": sorted(self.left),
            "keyring": None if self.keyring is None else dict(self.keyring), "key_weights": dict(self.key_weights),
            "keyring_version": self.keyring_version, "key_changes": self.key_changes,
            "last_average": None if self.last_average is None else list(self.last_average),
        }

    def restored(self, name: str, steps: int, federated_step: int, saved: Mapping[str, Any] | None = None) -> None:
        """The shared adapter was restored from checkpoint file ``name`` at ``steps``: the federation goes on from
        there with what the checkpoint kept of it (``saved``: :meth:`persisted`), so its members re-join and replay
        the steps after it, and a client that dropped can still rejoin. A checkpoint that kept nothing (written
        before the federation was saved with it) starts the federation over: data positions count from it, keys
        are agreed again."""
        self.federated_step = federated_step
        self._restored = (name, steps)
        self.joined.clear()
        self.rejoining.clear()
        self.shares.clear()
        self.summed.clear()
        saved = saved or {}
        self.instance = str(saved.get("instance", self.instance))  # the secure aggregation's keys are bound to it
        self.counted_from = 0 if "positions" in saved else federated_step
        self.roster = {int(i): str(n) for i, n in saved.get("roster", self.roster).items()}
        self.samples = {int(i): int(n) for i, n in saved.get("samples", self.samples).items()}
        self.positions = {int(i): int(p) for i, p in saved.get("positions", {}).items()}
        self.dropped = {int(i) for i in saved.get("dropped", ())}
        self.dropped_at = {int(i): int(s) for i, s in saved.get("dropped_at", {}).items()}
        self.left = {int(i) for i in saved.get("left", ())}
        keyring = saved.get("keyring")
        self.keyring = None if keyring is None else {int(i): str(k) for i, k in keyring.items()}
        self.key_weights = {str(i): float(w) for i, w in saved.get("key_weights", {}).items()}
        self.keyring_version = int(saved.get("keyring_version", 0))
        self.key_changes = int(saved.get("key_changes", self.keyring_version))
        average = saved.get("last_average")
        self.last_average = None if average is None else (int(average[0]), float(average[1]), average[2])

    def at_restore_point(self, session: Member, tag: str, path: Path, steps: int, force: bool) -> bool:
        """Whether ``session`` going back to checkpoint ``tag`` (``path``) finds the shared adapter there already
        (a fellow member resumed from it). A session that is no member (a generation, an evaluation, a client
        resuming from its checkpoint) may not move the adapter under members still training it, unless ``force``."""
        there = self._restored == (path.name, steps)
        if session.index is not None:
            return there
        busy = [s.client for s in self.sessions.values() if s is not session and s.connections]
        if busy and not force and not (path.is_file() and there):
            wanted = re.fullmatch(r"step-(\d+)", tag)
            behind = steps - int(wanted.group(1)) if wanted else 0
            rejoin = (f"checkpoint {tag!r} is {behind} step(s) behind the federation (step {steps}): a client that "
                      "dropped rejoins the run in progress with fit without --ckpt_path (it catches up with the "
                      "federation's step and client-side weights). " if behind > 0 else "")
            raise RuntimeError(
                f"the trunk server is training the federation with client(s) {', '.join(map(repr, busy))}: "
                f"going back to {tag!r} would change their training. {rejoin}Wait until they finish, or force it "
                "(generate --force_load)")
        return False

    # ------------------------------------------------------------------------------------------ secure aggregation
    def keys(self, session: Member, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """Secure aggregation: relay every client's X25519 public key and weight to all of them. Once agreed, a
        client that rejoins brings a new key pair: the server keeps it and answers at once with the members' keys
        (the members take the new one when the next average is redone)."""
        index = self.member(session)
        public, weight = header["public"], float(header["weight"])
        if self.keyring is not None:
            if self.keyring.get(index) != public:
                self.keyring[index] = public
                self.keyring_version += 1
                self.key_changes += 1
            return self._keys_reply(), {}

        def finish(arrived: dict[int, Any]) -> Header:
            if self.replicas is not None:  # every replica's clients agree on keys together
                arrived = self.replicas.keyring("keys", self.settings.clients, arrived)
            self.keyring = {i: v[0] for i, v in arrived.items()}
            self.key_weights = {str(i): v[1] for i, v in arrived.items()}
            return self._keys_reply()

        gathering = self._gather("keys", None, index, (public, weight), finish)
        if not gathering.done:
            raise RuntimeError("secure aggregation needs clients that can wait for each other (tcp)")
        return gathering.result, {}

    def _merge_keyrings(self, name: str) -> None:
        """With replicas: every client's latest public key, each from the replica that serves it, and the key
        changes added up across the replicas as the keyring's version."""
        own = self.replicas.own(self.settings.clients)
        merged = self.replicas.keyring(f"{name} keys", self.settings.clients,
                                       {i: (k, 0.0) for i, k in self.keyring.items() if i in own})
        self.keyring = {i: public for i, (public, _) in merged.items()}
        self.keyring_version = int(self.replicas.sum(torch.tensor([self.key_changes], dtype=torch.int64)))

    def _keys_reply(self) -> Header:
        """The members' public keys (those not dropped nor gone), the first agreement's weights, the federation."""
        members = set(range(self.settings.clients)) - self.dropped - self.left
        return {"publics": {str(i): self.keyring[i] for i in sorted(self.keyring) if i in members},
                "weights": dict(self.key_weights), "federation": self.instance, "roster": self.keyring_version}

    def aggregate(self, session: Member, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """Secure aggregation: add the clients' masked updates (mod 2**64). The server sees only the masked
        vectors and their sum; when a client of the announced participants is missing, or masked with keys older
        than the latest, the clients redo the round (the masks would not cancel). FedSGD: while a client waits to
        rejoin at this step, a member is asked to ``share`` the state first."""
        index = self.member(session)
        gradients = self.settings.average == "gradients"
        step = self.federated_step if gradients else self.federated_step - 1  # FedAvg averages after the step
        if gradients and step in self.shares and self.shares[step] is None:
            return {"share": step}, {}

        def finish(arrived: dict[int, Any]) -> Any:
            if self.replicas is not None:  # a client of another replica may have come back with a new key pair
                self._merge_keyrings(name)
            version = self.keyring_version
            sizes = {v[0].numel() for v in arrived.values()}
            who, agreed = set(arrived), all(sorted(v[2]) == sorted(arrived) and v[3] == version
                                           for v in arrived.values())
            if self.replicas is not None:  # the round's participants are every replica's clients
                who, sizes, agreed = self.replicas.arrivals(
                    name, self.settings.clients,
                    {i: (v[0].numel(), list(v[2]), v[3] != version) for i, v in arrived.items()})
            if len(sizes) != 1:
                raise ValueError(f"clients sent updates of different sizes {sorted(sizes)}")
            if not agreed:
                publics = self._keys_reply()["publics"] if self.keyring is not None else {}
                return {"retry": sorted(who), "roster": version, "publics": publics}, {}
            total, summed = sum(v[1] for v in arrived.values()), add_masked([arrived[i][0] for i in sorted(arrived)])
            if self.replicas is not None:
                total = float(self.replicas.sum(torch.tensor([total], dtype=torch.float64)))
                summed = self.replicas.masked_sum(summed)
            if gradients and self.settings.trunk_update == "sync":
                self.summed[step] = {i: (v[4], 1.0 if v[1] > 0 else 0.0) for i, v in arrived.items()}
            elif not gradients:
                self.last_average = (step, total, summed)
            return {"total_weight": total}, {"sum": summed}

        value = (tensors["masked"].clone(), float(header["weight"]), list(header["participants"]),
                 header.get("roster", 0), dict(session.grads))
        name = f"aggregate {header['nonce']}"
        gathering = self._gather(name, step, index, value, finish)
        if not gathering.done:
            raise RuntimeError("secure aggregation needs clients that can wait for each other (tcp)")
        self.count("aggregations")
        return gathering.result

    # ------------------------------------------------------------------------------------------ rejoins
    def catch_up(self, session: Member, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """A client that rejoined asks where to go on from: waits until the federation has made the steps before the
        one it is expected from and that step's state exists, then answers with the step, its data position and the
        state (see the module's docstring)."""
        index = self.member(session)
        if index not in self.rejoining:
            raise RuntimeError(f"client {session.client!r} did not rejoin: only a client that joins a federation in "
                               "progress catches up")
        if index in self._caught_up:
            raise RuntimeError(f"client {session.client!r} caught up already")
        if not self.block:
            raise RuntimeError("catching up needs a transport whose requests can wait (tcp)")
        if self.counted_from:
            raise RuntimeError(f"the trunk server restored the federation at step {self.counted_from} and does not "
                               f"know client {index}'s data position before it: resume every client from its "
                               "checkpoint (--ckpt_path) instead")
        settings, timeout = self.settings, self.settings.round_timeout
        gradients = settings.average == "gradients"
        step = self.rejoining[index]
        if step is None:
            step = self.rejoining[index] = self.federated_step + 1
            if gradients:
                self.shares[step] = None
        last = step // settings.round_steps * settings.round_steps - 1  # the step the last average before it ended
        while self.federated_step < step or not (
                self.shares.get(step) is not None if gradients else
                last < 0 or self.last_average is not None and self.last_average[0] == last):
            self.member(session)
            self.check_replicas()
            if not self._expected(step) - {index}:
                raise RuntimeError(f"client {session.client!r} cannot catch up: no other member of the federation "
                                   "is left")
            remaining = self.moved + timeout - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"client {session.client!r} cannot catch up: the federation has not moved for "
                                   f"round_timeout ({timeout:g} s) at step {self.federated_step}")
            self.changed.wait(remaining)
        reply: Header = {"step": step, "position": self.positions.get(index, 0)}
        state = None
        if gradients:
            reply["optimizer_steps"], state = self.shares[step]
        elif last >= 0:
            reply["total_weight"], state = self.last_average[1], self.last_average[2][None]
        room = tensors["room"]
        if state is not None and (state.shape != room.shape or state.dtype != room.dtype):
            raise ValueError(f"client {session.client!r} holds {room.shape[-1]} client-side values but the "
                             f"federation {state.shape[-1]}: another client model or client settings")
        self._caught_up.add(index)
        self.rejoins.append({"index": index, "client": session.client, "dropped_at": self.dropped_at.get(index),
                             "step": step, "position": reply["position"],
                             "seconds": round(time.monotonic() - self._joined_at.get(index, time.monotonic()), 3)})
        log.info("client %r (index %d) caught up: it trains again from step %d, its data from batch %d",
                 session.client, index, step, reply["position"])
        return reply, ({"state": state} if state is not None else {})

    def share(self, session: Member, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """FedSGD: a member sends the client-side state it holds after step ``header["step"] - 1`` (asked for by
        :meth:`aggregate`) for the clients rejoining at that step; a second copy is ignored."""
        index = self.member(session)
        step = header["step"]
        if step not in self.shares or step != self.federated_step:
            raise RuntimeError(f"no client waits for the federation's state at step {step} (the federation is at step "
                               f"{self.federated_step})")
        if self.shares[step] is None:
            self.shares[step] = (header["optimizer_steps"], tensors["state"].clone())
            log.info("client %d shared the federation's client-side state at step %d", index, step)
            self.changed.notify_all()
        return {}, {}

    # ------------------------------------------------------------------------------------------ gatherings
    def _expected(self, step: int | None) -> set[int]:
        """The clients a synchronisation point of ``step`` waits for: those not dropped nor gone, a client that
        rejoined from the step it is expected from."""
        members = set(range(self.settings.clients)) - self.dropped - self.left
        if self.replicas is not None:  # the others' clients arrive at their replicas
            members &= self.replicas.own(self.settings.clients)
        return {i for i in members if i not in self.rejoining
                or step is not None and self.rejoining[i] is not None and step >= self.rejoining[i]}

    def _gather(self, name: str, step: int | None, index: int, value: Any,
                finish: Callable[[dict[int, Any]], Any]) -> Gathering:
        """Add this client's ``value`` to the gathering ``name`` of ``step``; it finishes when every expected client
        has arrived, or ``round_timeout`` after the first did (the missing ones are dropped from the federation
        until they join again). Waits for that when the transport can (``block``)."""
        if index not in self._expected(step) and index in self.rejoining:
            raise RuntimeError(f"client {index} rejoined the federation and takes part from step "
                               f"{self.rejoining[index]}, not in {name}")
        gathering = self.gatherings.get(name)
        if gathering is None:
            gathering = self.gatherings[name] = Gathering(name, step, self._expected(step), finish)
        gathering.arrived[index] = value
        if gathering.arrived.keys() >= gathering.expected:
            self._finish(gathering)
        elif self.block:
            deadline = gathering.started + self.settings.round_timeout
            while not gathering.done:
                self.check_replicas()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._drop_missing(gathering)
                    self._finish(gathering)
                    break
                self.changed.wait(remaining)
        if gathering.error is not None:
            self.check_replicas()  # a replica lost in a collective: the clients wait for the restart
            raise RuntimeError(f"{gathering.name} failed: {gathering.error}")
        return gathering

    def _drop_missing(self, gathering: Gathering) -> None:
        """Drop the clients ``gathering`` still waits for after ``round_timeout``, with their unapplied gradients."""
        missing = sorted(gathering.expected - gathering.arrived.keys())
        self._dropped(gathering, missing, f"no answer within round_timeout {self.settings.round_timeout:g} s")
        for s in self.sessions.values():
            if s.index in missing:
                s.grads.clear()

    def _absent(self, index: int, why: str) -> None:
        """Client ``index`` is gone (``why``): the open synchronisation points stop waiting for it."""
        if index not in self.dropped:
            self.dropped_at[index] = self.federated_step
        for gathering in list(self.gatherings.values()):
            if not gathering.done and index in gathering.expected and index not in gathering.arrived:
                gathering.expected.discard(index)
                self._dropped(gathering, [index], why)
                if gathering.arrived and gathering.arrived.keys() >= gathering.expected:
                    self._finish(gathering)

    def _dropped(self, gathering: Gathering, missing: list[int], why: str) -> None:
        names = [self.roster[i] for i in missing if i in self.roster]
        log.warning("%s goes on without client(s) %s (%s): %s", gathering.name, ", ".join(map(str, missing)),
                    ", ".join(map(repr, names)) or "never joined", why)
        self.dropped.update(missing)
        for i in missing:
            self.dropped_at[i] = gathering.step if gathering.step is not None else self.federated_step
        self.count("clients_dropped")

    def _finish(self, gathering: Gathering) -> None:
        try:
            gathering.result = gathering.finish(gathering.arrived)
        except (ValueError, RuntimeError, KeyError) as exc:
            gathering.error = exc
        finally:
            gathering.done = True
            self.gatherings.pop(gathering.name, None)
            self.moved = time.monotonic()
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
