"""TrunkServer: answers its clients' requests and runs the trunk for them.

On ``forward`` the server detaches the received hidden states, runs the trunk and keeps ``(x, y)`` under
the key ``(client, step, micro)``; on ``backward`` it back-propagates the received dL/dy, returns dL/dx and
drops the graph. ``step`` applies the client's clipping scale, then the optimizer and scheduler, so the trunk
steps on exactly the client's boundaries (gradient accumulation included). Each ``step`` carries the optimizer
step number it makes, so a step is applied exactly once.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..federated import FederatedSettings
from ..federated.trunk import TrunkFederation, combine, trunk_steps
from ..optim import OptimSettings
from ..segments import Activations, Segment
from ..state import load_state
from ..transport import Header, SessionBusy, Tensors, fingerprint
from ..transport.codec import pack, unpack, wire_of
from ..transport.protocol import Bounds, check_request
from ..transport.wire import ProtocolError, TensorSpec
from .adapters import FEDERATION, TrunkAdapter, TrunkAdapters
from .checkpoints import LATEST, Checkpoints, checkpoint_at, last_checkpoint
from .generation import Generations
from .replicas import ReplicaError, Replicas, describe
from .sessions import Graph, Session, Sessions
from .settings import ServerLimits
from .traffic import Traffic

log = logging.getLogger("splittrain.server")

COUNTERS = ("forward", "backward", "steps_applied", "steps_repeated", "replies_repeated", "handshakes",
            "handshakes_refused", "frames_refused", "sessions_expired", "sessions_refused", "handshakes_evicted",
            "graphs_dropped", "clients_dropped", "aggregations", "generation_forward", "generations_expired",
            "generations_evicted")
"""The status counters (:meth:`TrunkServer.count`)."""


class TrunkServer:
    """Serves one trunk to its clients; thread-safe (trunk compute and state changes are serialized).

    Args:
        trunk: the trunk segment, its trainable parameters (LoRA) already marked: peft's ``default`` adapter, whose
            initial values every client's adapter starts from.
        optim: the trunk's AdamW and schedule (a client that sends its own at the handshake gets its own).
        total_steps: steps a linear/cosine schedule spans when ``optim.total_steps`` is unset.
        run_dir: folder for the ``trunk/`` checkpoints and ``server_status.json``.
        limits: per-client bounds and timeouts.
        save_every: save each adapter's ``latest`` checkpoint every this many of its steps (0: only when asked).
        federation: several clients (:class:`~splittrain.federated.FederatedSettings`) train one adapter: their
            trunk gradients are kept per client and combined at each step as the settings say.
    """

    def __init__(self, trunk: Segment, optim: OptimSettings | None = None, total_steps: int | None = None,
                 run_dir: str | Path | None = None, limits: ServerLimits | None = None, save_every: int = 0,
                 federation: FederatedSettings | None = None) -> None:
        self.trunk = trunk
        self.federation = federation if federation is not None and federation.enabled else None
        self._schedule_steps = total_steps
        """The trainer's max_steps the server was configured with (what a client's schedule is compared with)."""
        self.optim, self.total_steps = optim or OptimSettings(), trunk_steps(self.federation, total_steps)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.limits = limits or ServerLimits()
        self.max_seq = self.limits.max_seq or int(getattr(trunk.config, "max_position_embeddings", 0) or 2**20)
        self.save_every = save_every
        self.fingerprint = fingerprint(trunk.config, trunk.family.name, (trunk.start, trunk.stop), trunk.dtype)
        self.instance = uuid.uuid4().hex
        self.busy_seconds = 0.0
        """Seconds spent running the trunk's forward and backward passes (its compute: the rest is waiting)."""
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._count_lock = threading.Lock()
        self.lock = threading.RLock()
        self.sessions = Sessions(self.limits, self.count)
        self.adapters = TrunkAdapters(trunk, self.optim, self.total_steps, self.run_dir)
        """Owner (client name, or :data:`FEDERATION`) -> its trunk adapter, made when the owner first connects."""
        self.resuming = False
        """Adapters made from now on start from their folder's last checkpoint (``serve --resume``)."""
        self.resume_from: dict[str, Path] = {}
        """Owner -> the checkpoint its adapter resumes from instead (the one trunk replicas agreed on)."""
        self.federated = TrunkFederation(self.federation, self.sessions, self.lock, self.count, self._apply,
                                         self.instance)
        """The federation's trunk half (membership, synchronisation points, secure-aggregation relay)."""
        self.checkpoints = Checkpoints(self.fingerprint, self.federated, self.run_dir)
        self.generations = Generations(trunk, self.limits, self.max_seq, self.count, self.adapters.use)
        self.traffic = Traffic()
        """What each client has asked of the server (requests, bytes, training tokens, last seen)."""
        self._handlers: dict[str, Callable[[Session, Header, Tensors], tuple[Header, Tensors]]] = {
            "forward": self._forward, "backward": self._backward, "grad_sq_norm": self._grad_sq_norm,
            "step": self._step, "save": self._save, "load": self._load, "join": self.federated.join,
            "keys": self.federated.keys, "aggregate": self.federated.aggregate, "catch_up": self.federated.catch_up,
            "share": self.federated.share, "end_generation": self.generations.end,
        }

    # ------------------------------------------------------------------------------------------ adapters
    def owner_of(self, client: str) -> str:
        """Whose adapter ``client`` trains: its own, or the federation's."""
        return FEDERATION if self.federation is not None else client

    def adapter(self, owner: str | None = None, schedule: OptimSettings | None = None) -> TrunkAdapter:
        """``owner``'s trunk adapter, made (from the initial tensors, or its last checkpoint when resuming) on first
        use with ``schedule`` (default: the server's own). Without ``owner``: the only adapter there is."""
        if owner is None:
            if len(self.adapters) > 1:
                raise ValueError(f"this trunk server trains {len(self.adapters)} adapters "
                                 f"({', '.join(self.adapters)}): say whose")
            owner = next(iter(self.adapters), self.owner_of("client0"))
        with self.lock:
            adapter = self.adapters.get(owner)
            if adapter is None:
                adapter = self.adapters.make(owner, schedule)
                last = self.resume_from.get(owner) or last_checkpoint(adapter.folder) if self.resuming else None
                if last is not None:
                    self.restore(last, adapter)
                    log.info("resumed the trunk adapter of %r at step %d from %s", owner, adapter.steps, last)
            return adapter

    @property
    def schedule(self) -> dict[str, Any]:
        """The trunk schedule a federation's clients must train with (the server's optimizer and max_steps)."""
        return self.optim.resolved(self._schedule_steps)

    @property
    def steps(self) -> int:
        """The optimizer steps of the only adapter (0 before any)."""
        return self.adapter().steps if self.adapters else 0

    @property
    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The only adapter's parameters."""
        return self.adapter().trainable

    @property
    def dropped(self) -> set[int]:
        """The federation's client indices dropped after ``round_timeout`` (until they send again)."""
        return self.federated.dropped

    def count(self, counter: str) -> None:
        """Add one to a status counter (safe from any thread)."""
        with self._count_lock:
            self.counters[counter] += 1

    # ------------------------------------------------------------------------------------------ replicas
    def replicate(self, replicas: Replicas, address: str) -> None:
        """Serve this trunk as one of ``replicas`` (:mod:`.replicas`) listening on ``address``: the replicas'
        configs are compared, and the federation's synchronisation points combine every replica's clients."""
        # configs first: a replica with another federation is named by every replica, before anyone refuses its own
        self.instance = self.federated.instance = replicas.agree(describe(self), address, self.instance)
        fed = self.federation
        if fed is None or fed.trunk_update != "sync":
            raise ReplicaError("several trunk replicas serve one federation with trunk_update: sync (DDP semantics); "
                               "set model.federated.clients >= 2 and trunk_update: sync")
        if fed.clients < replicas.size:
            raise ReplicaError(f"{replicas.size} trunk replicas for a federation of {fed.clients} clients: each "
                               "replica serves at least one client")
        self.federated.replicas = replicas
        self.checkpoints.keep_previous = True
        if self.resuming:
            self._resume_replicas(replicas)

    def _resume_replicas(self, replicas: Replicas) -> None:
        """``serve --resume`` of trunk replicas: every replica resumes at the last step all of them saved (one that
        died mid-step may have saved the step before the others' last; each keeps that one as ``previous``)."""
        folder = self.run_dir / "trunk" if self.run_dir is not None else None
        last = last_checkpoint(folder)
        mine = int(load_state(last)["steps"]) if last is not None else -1
        low, high = replicas.bounds(mine)
        if low < 0 <= high:
            raise ReplicaError(f"trunk replica {replicas.rank} has {'no' if mine < 0 else 'a'} trunk checkpoint in "
                               f"{folder} and another replica {'has' if mine < 0 else 'has none'}: resume every "
                               "replica from its own run folder of the same run")
        if low < 0:
            return
        path = checkpoint_at(folder, low)
        if path is None:
            raise ReplicaError(f"the trunk replicas resume at step {low} (the last step every one of them saved) but "
                               f"replica {replicas.rank} has no checkpoint of step {low} in {folder} (its last: step "
                               f"{mine})")
        self.resume_from[FEDERATION] = path
        log.info("trunk replica %d resumes at step %d from %s (the replicas' last saved steps: %d to %d)",
                 replicas.rank, low, path, low, high)

    def fail(self, why: str) -> None:
        """The replicas cannot go on (:meth:`Replicas.watch`): every request from now on, and every client waiting
        at a synchronisation point, has its connection closed without a reply, and a new connection is refused as
        worth retrying with ``why`` (the clients wait for the replicas to be restarted)."""
        log.error("%s", why)
        with self.lock:
            self.federated.changed.notify_all()

    # ------------------------------------------------------------------------------------------ sessions
    def open_session(self, client: str, session_id: str, schedule: Any = None) -> dict[str, Any]:
        """Attach a connection of ``client`` to its session ``session_id``.

        One live session per name: a new session replaces an older one only when that one has no connection and
        has waited ``session_timeout`` (it is gone), else :class:`SessionBusy`. ``schedule`` is the trunk schedule
        the client trains with (:meth:`OptimSettings.resolved`): its own adapter is made with it; a federation's
        (or an adapter restored from a checkpoint) must already have it. Returns what the client needs to resume:
        whether the session was known (else the server restarted or the client did), its adapter's step and last
        durable step, and this server's instance id.
        """
        wanted = OptimSettings.from_schedule(schedule) if schedule is not None else None
        with self.lock:
            replicas = self.federated.replicas
            if replicas is not None and replicas.failure is not None:  # worth retrying: they are to be restarted
                raise SessionBusy(replicas.failure, retry_after=1.0)
            session = self.sessions.claim(client, session_id)
            adapter = self._adapter_for(client, wanted)
            known = session is not None
            if session is None:
                session = self.sessions[client] = Session(client, session_id, adapter=adapter)
            session.connections += 1
            return {"known": known, "step": adapter.steps, "saved": adapter.saved_step, "instance": self.instance}

    def _adapter_for(self, client: str, wanted: OptimSettings | None) -> TrunkAdapter:
        """The adapter ``client`` trains (its own is made with ``wanted``), checked to have the schedule ``wanted``
        says (the server's when None)."""
        if self.federation is None:
            adapter = self.adapter(client, wanted)
            ours = adapter.schedule
        else:
            adapter = self.adapter(FEDERATION)
            ours = self.schedule
        theirs = wanted.resolved(None) if wanted is not None else ours
        if theirs != ours:
            diffs = [f"{k} {theirs[k]!r} (server: {ours[k]!r})" for k in ours if ours[k] != theirs[k]]
            raise ValueError(f"client {client!r} trains the trunk with another schedule: {'; '.join(diffs)}. "
                             + ("Every client of a federation trains with the server's model.trunk.optim and "
                                "trainer.max_steps (serve --trainer.max_steps N sets the server's)"
                                if self.federation is not None else
                                "Its trunk adapter was made with the first ones; resume with the same "
                                "model.trunk.optim and trainer.max_steps"))
        return adapter

    def detach(self, client: str, session_id: str) -> None:
        """A connection of the session ended; the session waits ``session_timeout`` for a reconnect."""
        with self.lock:
            self.sessions.detach(client, session_id)

    def end_session(self, client: str, session_id: str | None = None) -> None:
        """The client said goodbye: free everything it held."""
        with self.lock:
            session = self.sessions.end(client, session_id)
            if session is not None and self.federation is not None and session.index is not None:
                self.federated.leave(session.index)

    def expire(self, now: float | None = None) -> None:
        """Free sessions of clients silent for ``session_timeout``, idle generations and graphs older than
        ``max_graph_age``."""
        with self.lock:
            self.sessions.expire(time.monotonic() if now is None else now)

    def _session(self, client: str) -> Session:
        session = self.sessions.get(client)
        if session is None:  # in-process clients have no handshake
            session = self.sessions[client] = Session(client, "local", adapter=self.adapter(self.owner_of(client)))
        return session

    # ------------------------------------------------------------------------------------------ messages
    def handle(self, client: str, kind: str, header: Header, tensors: Tensors,
               session_id: str | None = None, block: bool = True) -> tuple[Header, Tensors]:
        """Answer one message from ``client`` (in its session ``session_id`` when it has one); a repeated
        ``seq`` gets the earlier reply again. At a federation's synchronisation points the call waits for the
        other clients (``block``) or, for clients simulated in this thread, answers ``{"pending": true}``."""
        handler = self._handlers.get(kind)
        if handler is None:
            raise ProtocolError(f"unknown message kind {kind!r}; expected one of {sorted(self._handlers)}")
        with self.lock:
            self.federated.check_replicas()
            session = self._session(client)
            if session_id is not None and session.id != session_id:
                raise ProtocolError(f"this connection's session of client {client!r} was replaced by a newer one")
            seq = header.get("seq")
            if seq is not None:
                # The client acknowledges the replies it has (by default every one before this request).
                acked = header.get("ack", seq - 1)
                while session.replies and next(iter(session.replies)) <= acked:
                    session.replies.popitem(last=False)
                if seq in session.replies:
                    self.count("replies_repeated")
                    return session.replies[seq]
                if seq <= session.last_seq:
                    raise ProtocolError(f"request {seq} is older than the last one answered ({session.last_seq}) "
                                        "and its reply is gone")
            self.federated.block = block
            began = time.perf_counter()
            reply = handler(session, header, tensors)
            if kind in ("forward", "backward"):
                self.busy_seconds += time.perf_counter() - began
            if seq is not None:
                session.last_seq = seq
                session.replies[seq] = reply
                while len(session.replies) > self.limits.max_unacknowledged:
                    session.replies.popitem(last=False)
            return reply

    def record(self, client: str, kind: str, received: int, sent: int) -> None:
        """A request of ``kind`` from ``client`` was answered: ``received`` bytes in, ``sent`` out (transports that
        serialize call this; :attr:`traffic`)."""
        self.traffic.record(client, kind, received, sent)

    def check(self, client: str, header: Header, specs: list[TensorSpec]) -> None:
        """Check a frame's header from an authenticated ``client`` before its payload is read: what the protocol's
        table says of its kind (:func:`~splittrain.transport.protocol.check_request`) within this model and these
        limits, and a gradient's shape against the forward pass it answers."""
        check_request(header, specs, Bounds(int(self.trunk.config.hidden_size), self.limits.max_batch, self.max_seq))
        if header["kind"] == "backward":
            # Without the lock: another client's trunk compute must not hold up reading this payload. A graph that
            # goes meanwhile is refused by the handler.
            session = self.sessions.get(client)
            graph = session.graphs.get(tuple(header["key"])) if session is not None else None
            shape = next(list(s.shape) for s in specs if s.name == "grad")
            if graph is not None and shape != list(graph.y.shape):
                raise ProtocolError(f"gradient of shape {shape} for an output of shape {list(graph.y.shape)}")

    # ------------------------------------------------------------------------------------------ compute
    def _forward(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        wire = wire_of(tensors, "hidden_states")
        received = unpack(tensors, "hidden_states")
        _finite("hidden_states", received)
        if "generation" in header:
            reply, out = self.generations.forward(session, header, {**tensors, "hidden_states": received})
            return reply, pack("hidden_states", out["hidden_states"], wire)
        device, dtype = self.trunk.device, self.trunk.dtype
        x = received.to(device=device, dtype=dtype)
        mask = tensors.get("attention_mask")
        mask = mask.to(device=device, dtype=torch.long) if mask is not None else None
        positions = tensors["position_ids"].to(device=device, dtype=torch.long)
        training = bool(header.get("training", False))
        adapter = session.adapter
        if training and self.federation is not None:
            self.federated.forward(session, header["step"])
        elif training and header["step"] != adapter.steps:
            raise RuntimeError(f"the client trains optimizer step {header['step'] + 1} but its trunk adapter has "
                               f"made {adapter.steps} steps: resume the client from the server's step "
                               f"(--ckpt_path) or the server from the client's (serve --resume)")
        self.adapters.use(adapter.name)
        self.trunk.switch_mode(training)
        saved = 0

        def count_saved(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            if t.untyped_storage().data_ptr() not in self.adapters.param_storages:
                saved += t.numel() * t.element_size()
            return t

        if training:
            self.traffic.add_tokens(session.client, int(mask.sum()) if mask is not None else x.shape[0] * x.shape[1])
            x = x.detach().requires_grad_(bool(header.get("need_input_grad", True)))
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(count_saved, lambda t: t):
                y = self.trunk(Activations(x, mask, positions)).hidden_states
            graph = Graph(x, y, x.requires_grad, saved + x.nbytes, time.monotonic())
            self.sessions.keep(session, tuple(header["key"]), graph)
        else:
            with torch.no_grad():
                y = self.trunk(Activations(x, mask, positions)).hidden_states
        self.count("forward")
        return {}, pack("hidden_states", y, wire)

    def _backward(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        key = tuple(header["key"])
        graph = session.graphs.get(key)
        if graph is None:
            raise KeyError(f"no forward pass of client {session.client!r} is waiting for a backward pass under key "
                           f"{list(key)}")
        wire = wire_of(tensors, "grad")
        grad = unpack(tensors, "grad")
        _finite("grad", grad)
        if grad.shape != graph.y.shape:
            raise ValueError(f"gradient of shape {list(grad.shape)} for an output of shape {list(graph.y.shape)}")
        del session.graphs[key]
        # a checkpointed trunk runs its layers again now: with this client's adapter, in training mode
        self.adapters.use(session.adapter.name)
        self.trunk.switch_mode(True)
        params = session.adapter.trainable
        for name, p in params:  # accumulate into this client's own buffers
            p.grad = session.grads.get(name)
        try:
            torch.autograd.backward(graph.y, grad.to(device=graph.y.device, dtype=graph.y.dtype))
        finally:
            for name, p in params:
                if p.grad is not None:
                    session.grads[name] = p.grad
                p.grad = None
        self.count("backward")
        return {}, (session.feedback.pack("grad", graph.x.grad, wire) if graph.need_input_grad else {})

    def _grad_sq_norm(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """The squared norm of the gradients waiting for this client's next step: its own, or (federation) its
        and its fellow members' sum, which is what the step applies."""
        if self.federated.replicas is not None:
            raise RuntimeError("global-norm clipping is not combined across trunk replicas: train without "
                               "trainer.gradient_clip_val")
        sharing = [session] if self.federation is None else self.federated.fellows(session)
        combined = combine([(s.grads, 1.0) for s in sharing if s.grads], mean=False)
        norms = [torch.linalg.vector_norm(g) for g in combined.values()]
        sq = torch.stack(norms).pow(2).sum() if norms else torch.zeros(())
        return {}, {"sq_norm": sq.float().cpu()}

    @torch.no_grad()
    def _apply(self, adapter: TrunkAdapter, grads: dict[str, torch.Tensor], scale: float | None) -> None:
        """One optimizer (and scheduler) step of ``adapter`` on ``grads``, scaled by ``scale`` (clipping)."""
        if grads:
            for name, p in adapter.trainable:
                p.grad = grads.get(name)
                if p.grad is not None and scale is not None:
                    p.grad.mul_(scale)
            adapter.optimizer.step()
            adapter.optimizer.zero_grad(set_to_none=True)
        if adapter.scheduler is not None:
            adapter.scheduler.step()
        adapter.steps += 1
        self.count("steps_applied")
        if self.save_every and adapter.steps % self.save_every == 0:
            self.save(LATEST, adapter)

    def _step(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        if self.federation is not None:
            return self._federated_step(session, header)
        target, scale, adapter = header["step"], header.get("scale"), session.adapter
        if target == adapter.steps:  # already applied; the reply was lost
            self.count("steps_repeated")
            return adapter.step_reply(), {}
        if target != adapter.steps + 1:
            raise RuntimeError(f"the client asks for optimizer step {target} but its trunk adapter has made "
                               f"{adapter.steps} steps")
        self._apply(adapter, dict(session.grads), scale)
        session.grads.clear()
        return adapter.step_reply(), {}

    def _federated_step(self, session: Session, header: Header) -> tuple[Header, Tensors]:
        """A federation member's step: the federation says when its adapter steps, and on which gradients."""
        return self.federated.step(session, header)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self, tag: str, adapter: TrunkAdapter | None = None) -> Path:
        """Write an adapter's state (default: the only one's) to its folder's ``<tag>.safetensors`` atomically
        (write, then rename)."""
        with self.lock:
            adapter = adapter or self.adapter()
            return self.checkpoints.save(tag, adapter, self._feedback(adapter))

    def save_all(self, tag: str) -> list[Path]:
        """Save every adapter (``serve`` does when it stops)."""
        with self.lock:
            return [self.checkpoints.save(tag, a, self._feedback(a)) for a in self.adapters.values()
                    if a.folder is not None]

    def _feedback(self, adapter: TrunkAdapter) -> dict[str, Any]:
        """Client -> the error feedback of the int8 gradients sent to it, for every session training ``adapter``."""
        return {s.client: s.feedback.state_dict() for s in self.sessions.values() if s.adapter is adapter}

    def restore(self, path: Path, adapter: TrunkAdapter | None = None) -> int:
        """Load a checkpoint written by :meth:`save` into an adapter (default: the only one); the unapplied
        gradients and graphs of the sessions training it are dropped."""
        with self.lock:
            adapter = adapter or self.adapter()
            steps, feedback = self.checkpoints.restore(path, adapter)
            for session in self.sessions.values():
                if session.adapter is adapter:
                    session.graphs.clear()
                    session.grads.clear()
                    session.step = None
                    session.feedback.load_state_dict(feedback.get(session.client, {}))
            return steps

    def resume(self) -> dict[str, int]:
        """From now on each adapter starts from the checkpoint written last in its folder (``latest`` or a client's
        ``step-N``) when its owner first connects, with the schedule that owner trains with. Returns owner -> the
        step it will resume at."""
        self.resuming = True
        return self.checkpoints.resume_points(self.federation is not None)

    def _save(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        adapter = session.adapter
        if self.federation is not None:
            self.federated.member(session)
        path = self.save(header["tag"], adapter)
        return {"path": str(path), "file": str(path.relative_to(self.run_dir / "trunk")), "step": adapter.steps}, {}

    def _load(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        tag, adapter = header["tag"], session.adapter
        path = self.checkpoints.path(tag, adapter)
        if self.federation is not None and self.federated.at_restore_point(session, tag, path, adapter.steps,
                                                                           bool(header.get("force"))):
            # another client of the federation resumed from the same checkpoint: the trunk is there already
            session.graphs.clear()
            session.grads.clear()
            session.step = None
            return {"step": adapter.steps}, {}
        if path.is_file():
            self.restore(path, adapter)
            return {"step": adapter.steps}, {}
        wanted = re.fullmatch(r"step-(\d+)", tag)
        if wanted and int(wanted.group(1)) == adapter.steps:  # already there: only the partial step goes
            session.graphs.clear()
            session.grads.clear()
            return {"step": adapter.steps}, {}
        at = f"step {wanted.group(1)}" if wanted else f"checkpoint {tag!r}"
        raise FileNotFoundError(f"the client resumes at {at} but its trunk adapter is at step {adapter.steps} and "
                                f"the server has no checkpoint {tag!r} ({path})")

    # ------------------------------------------------------------------------------------------ status
    def status(self) -> dict[str, Any]:
        """Counters, adapters and per-client holdings (no tensors, nothing private) for operators and tests; ``step``
        and ``saved_step`` are the only adapter's (step 0 before there is one, None while there are several)."""
        from ..loading import rss_bytes

        with self.lock:
            several = len(self.adapters) > 1
            with self._count_lock:
                counters = dict(self.counters)
            return {
                "instance": self.instance, "step": None if several else self.steps,
                "saved_step": None if several or not self.adapters else self.adapter().saved_step,
                "adapters": {owner: {"step": a.steps, "saved_step": a.saved_step, "bytes": a.nbytes}
                             for owner, a in self.adapters.items()},
                "busy_seconds": self.busy_seconds, "threads": torch.get_num_threads(),
                "counters": counters, "rss_bytes": rss_bytes(), "clients": self.traffic.status(),
                "gradients_waiting": any(s.grads for s in self.sessions.values()),
                **self.federated.status(),
                "sessions": {name: {"graphs": len(s.graphs), "graph_bytes": s.graph_bytes,
                                    "generations": len(s.generations),
                                    "generation_bytes": sum(g.nbytes for g in s.generations.values()),
                                    "connections": s.connections, "pending_gradients": s.pending,
                                    "step": s.adapter.steps if s.adapter else None}
                             for name, s in self.sessions.items()},
            }


def _finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} holds non-finite values (inf/nan): refused so they cannot reach the trunk's weights")
