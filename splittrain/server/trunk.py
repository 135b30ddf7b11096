"""TrunkServer: runs the trunk for its clients and steps its optimizer when they say so.

On ``forward`` the server detaches the received hidden states, runs the trunk and keeps ``(x, y)`` under
the key ``(client, step, micro)``; on ``backward`` it back-propagates the received dL/dy, returns dL/dx and
drops the graph. ``step`` applies the client's clipping scale, then the optimizer and scheduler, so the trunk
steps on exactly the client's boundaries (gradient accumulation included).

The same class sits behind every transport. It takes a trunk :class:`~splittrain.segments.Segment` and never
the client's code. Clients cannot touch each other: each independent client trains its own trunk LoRA adapter
(a :class:`TrunkAdapter`: peft adapter, AdamW, schedule, step counter, checkpoint folder ``trunk/<client>/``)
over the one frozen trunk, so N fine-tunes hold the base weights once; the clients of a federation share the
federation's adapter (``trunk/``), and only its members may train it. Everything else a client does lives in its
session, named by the client's authenticated name, one live session per name: its graphs (bounded by count,
bytes and age), the last replies (a request repeated after a reconnect is answered again, never re-applied), and
its unapplied gradients, which are dropped with the session when a client dies mid-step. Each ``step`` carries
the optimizer step number it makes, so a step is applied exactly once. Checkpoints hold only what the server owns
(an adapter's tensors, optimizer and scheduler state, step counter) as safetensors, written atomically.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .federated import FederatedSettings
from .lora import LoraSettings, prepare
from .optim import OptimSettings, build_optimizer
from .segments import Activations, Segment
from .state import load_state, save_state
from .transport import Header, SessionBusy, Tensors, fingerprint
from .transport.protocol import TAG, Bounds, check_request
from .transport.wire import ProtocolError, TensorSpec

log = logging.getLogger("splittrain.server")

LATEST = "latest"
FEDERATION = "federation"
"""The owner of a federation's shared trunk adapter."""


@dataclass
class TrunkSettings:
    """How the server trains the trunk: LoRA on its projections, with its own AdamW."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    quantization: str | None = None
    """The frozen trunk weights' format: ``int8``, ``nf4`` or ``fp4`` (bitsandbytes; :mod:`splittrain.quantize`),
    null for the weight dtype."""
    gradient_checkpointing: bool = False
    """Recompute each trunk layer's activations in the backward pass instead of keeping them while a client's
    forward pass waits for its gradient (the same gradients; about one more trunk forward pass per step)."""


@dataclass
class ServerLimits:
    """What one client may hold on the server, and how long a silent client's session lives."""

    max_graphs: int = 64
    """Forward passes waiting for their backward pass, per client."""
    max_graph_bytes: int = 8 * 2**30
    """Bytes the waiting graphs may keep for backward, per client."""
    max_graph_age: float = 3600.0
    """Seconds a forward pass may wait for its backward pass."""
    max_batch: int = 4096
    """Rows per forward pass."""
    max_seq: int | None = None
    """Tokens per row (default: the model's ``max_position_embeddings``)."""
    max_frame_bytes: int = 4 * 2**30
    """Largest payload an authenticated client may send."""
    session_timeout: float = 120.0
    """Seconds a disconnected client's session (graphs, unapplied gradients) waits for it to reconnect."""
    max_unacknowledged: int = 64
    """Replies kept for a client until it acknowledges them (the micro-batches a pipelining client has in flight)."""
    max_generations: int = 8
    """Generations whose KV cache the server keeps, per client (the least recently used goes first)."""
    max_generation_bytes: int = 2 * 2**30
    """Bytes the KV caches of a client's generations may hold."""
    generation_timeout: float = 600.0
    """Seconds an idle generation's KV cache is kept."""


def load_trunk(model: str, cuts: tuple[int, int], lora: LoraSettings, seed: int = 0, dtype: str | None = None,
               device_map: dict[str, str] | str | None = None, quantization: str | None = None,
               gradient_checkpointing: bool = False) -> Segment:
    """The trunk of ``model`` cut at ``cuts`` (only its tensors are read, quantized as they are read if asked), with
    LoRA on its projections."""
    from .loading import split_model

    parts = split_model(model, cuts=tuple(cuts), parts=("trunk",), dtype=dtype, device_map=device_map,
                        quantization=quantization)
    trunk = prepare(parts["trunk"], "lora", lora, seed)
    return trunk.set_gradient_checkpointing(gradient_checkpointing)


@dataclass
class TrunkAdapter:
    """One trunk LoRA adapter and what trains it: an independent client's, or its federation's."""

    owner: str
    """The client name it belongs to, or :data:`FEDERATION`."""
    name: str
    """Its peft adapter name in the trunk's LoRA layers."""
    trainable: list[tuple[str, torch.nn.Parameter]]
    """Its parameters, under the names of peft's ``default`` adapter (checkpoints look the same whoever owns them)."""
    settings: OptimSettings
    total_steps: int | None
    optimizer: Any
    scheduler: Any
    folder: Path | None
    """Where its checkpoints go (``trunk/<client>/``, the federation's ``trunk/``); None: nowhere."""
    steps: int = 0
    saved_step: int | None = None

    @property
    def schedule(self) -> dict[str, Any]:
        return self.settings.resolved(self.total_steps)

    @property
    def nbytes(self) -> int:
        """Its parameters' and optimizer state's bytes."""
        state = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return sum(p.nbytes for _, p in self.trainable) + sum(t.nbytes for t in state)


@dataclass
class Graph:
    """One forward pass waiting for its backward pass."""

    x: torch.Tensor
    y: torch.Tensor
    need_input_grad: bool
    nbytes: int
    created: float


@dataclass
class Generation:
    """One generation's trunk-side state: the KV cache of the trunk's layers and the mask of the cached positions."""

    cache: Any
    mask: torch.Tensor
    used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for layer in self.cache.layers for t in (getattr(layer, "keys", None),
                                                                     getattr(layer, "values", None))
                   if isinstance(t, torch.Tensor))


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
    """Generation id -> :class:`Generation`, least recently used first."""
    adapter: TrunkAdapter | None = None
    """The trunk adapter it trains and runs: its own, or its federation's."""

    @property
    def graph_bytes(self) -> int:
        return sum(g.nbytes for g in self.graphs.values())

    @property
    def pending(self) -> bool:
        """Gradients of this client wait in the trunk for a step."""
        return bool(self.grads)


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
        if self.federation is not None and self.federation.trunk_update == "sequential" and total_steps:
            # every participant's step is a trunk step: the schedule spans them all
            total_steps *= len(self.federation.participants(0))
        self.optim, self.total_steps = optim or OptimSettings(), total_steps
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.limits = limits or ServerLimits()
        self.max_seq = self.limits.max_seq or int(getattr(trunk.config, "max_position_embeddings", 0) or 2**20)
        self.save_every = save_every
        self.fingerprint = fingerprint(trunk.config, trunk.family.name, (trunk.start, trunk.stop), trunk.dtype)
        self.instance = uuid.uuid4().hex
        self.busy_seconds = 0.0
        """Seconds spent running the trunk's forward and backward passes (its compute: the rest is waiting)."""
        self.sessions: dict[str, Session] = {}
        self.adapters: dict[str, TrunkAdapter] = {}
        """Owner (client name, or :data:`FEDERATION`) -> its trunk adapter, made when the owner first connects."""
        self.resuming = False
        """Adapters made from now on start from their folder's last checkpoint (``serve --resume``)."""
        self._initial = [(n, p.detach().clone()) for n, p in trunk.named_parameters() if p.requires_grad]
        """The ``default`` adapter's initial tensors: every adapter starts from them."""
        self._lora_config = getattr(trunk, "peft_config", {}).get("default")
        self._lora_layers = [m for m in trunk.modules() if hasattr(m, "lora_A") and hasattr(m, "set_adapter")]
        self._active = "default"
        self.counters = {"forward": 0, "backward": 0, "steps_applied": 0, "steps_repeated": 0,
                         "replies_repeated": 0, "handshakes": 0, "handshakes_refused": 0, "frames_refused": 0,
                         "sessions_expired": 0, "sessions_refused": 0, "handshakes_evicted": 0, "graphs_dropped": 0,
                         "clients_dropped": 0,
                         "aggregations": 0, "generation_forward": 0, "generations_expired": 0,
                         "generations_evicted": 0}
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.gatherings: dict[str, Gathering] = {}
        self.dropped: set[int] = set()
        """Client indices dropped after round_timeout (until they send again)."""
        self.left: set[int] = set()
        """Client indices that said goodbye."""
        self.roster: dict[int, str] = {}
        """Client index -> the name it joined under."""
        self.federated_step = 0
        """Steps every client of a ``sync`` federation has completed."""
        self._block = True
        self._restored: tuple[str, int] | None = None
        """(checkpoint file, step) of the last restore, so every client of a federation may resume from it."""
        self._count_lock = threading.Lock()
        self._param_storages = {p.untyped_storage().data_ptr() for p in trunk.parameters()}
        self._handlers: dict[str, Callable[[Session, Header, Tensors], tuple[Header, Tensors]]] = {
            "forward": self._forward, "backward": self._backward, "grad_sq_norm": self._grad_sq_norm,
            "step": self._step, "save": self._save, "load": self._load, "join": self._join,
            "keys": self._keys, "aggregate": self._aggregate, "end_generation": self._end_generation,
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
            if adapter is not None:
                return adapter
            name = "default" if not self.adapters else f"adapter{len(self.adapters)}"
            if name != "default":
                self._add_lora(name)
            params = dict(self.trunk.named_parameters())
            trainable = [(n, params[n.replace(".default.", f".{name}.")]) for n, _ in self._initial]
            if name != "default":
                with torch.no_grad():
                    for (_, p), (_, initial) in zip(trainable, self._initial):
                        p.copy_(initial)
                self._param_storages |= {p.untyped_storage().data_ptr() for _, p in trainable}
            settings = schedule or self.optim
            total = self.total_steps if schedule is None else None
            optimizer, scheduler = build_optimizer([p for _, p in trainable], settings, total)
            folder = None
            if self.run_dir is not None:
                folder = self.run_dir / "trunk" if owner == FEDERATION else self.run_dir / "trunk" / owner
            adapter = self.adapters[owner] = TrunkAdapter(owner, name, trainable, settings, total, optimizer,
                                                          scheduler, folder)
            self._keep_trainable()
            if self.resuming:
                last = _last_checkpoint(folder)
                if last is not None:
                    self.restore(last, adapter)
                    log.info("resumed the trunk adapter of %r at step %d from %s", owner, adapter.steps, last)
            return adapter

    def _add_lora(self, name: str) -> None:
        """One more LoRA adapter ``name`` in the trunk's layers (peft), every adapter's tensors kept trainable."""
        from peft import inject_adapter_in_model

        if self._lora_config is None or not all(".default." in n for n, _ in self._initial):
            raise RuntimeError("this trunk's trainable tensors are not one peft LoRA adapter 'default': it cannot "
                               "give each client an adapter of its own")
        with warnings.catch_warnings():  # several adapters in one model are what we want
            warnings.filterwarnings("ignore", "Already found a `peft_config` attribute")
            inject_adapter_in_model(self._lora_config, self.trunk, adapter_name=name)
        # peft may leave the layers on the new adapter: make them run the one they ran before
        active, self._active = self._active, name
        self._use(active)

    def _keep_trainable(self) -> None:
        # peft marks only the active adapter trainable; a graph waiting for its backward pass must keep its
        # tensors' requires_grad (autograd skips a leaf that lost it), so every adapter stays trainable.
        for adapter in self.adapters.values():
            for _, p in adapter.trainable:
                p.requires_grad_(True)

    def _use(self, name: str) -> None:
        """Run the trunk with adapter ``name``."""
        if name == self._active:
            return
        for layer in self._lora_layers:
            layer.set_adapter(name)
        self._active = name
        self._keep_trainable()

    @property
    def steps(self) -> int:
        """The optimizer steps of the only adapter (0 before any)."""
        return self.adapter().steps if self.adapters else 0

    @property
    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The only adapter's parameters."""
        return self.adapter().trainable

    def count(self, counter: str) -> None:
        """Add one to a status counter (safe from any thread)."""
        with self._count_lock:
            self.counters[counter] += 1

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
            session = self.sessions.get(client)
            known = session is not None and session.id == session_id
            if session is not None and not known:
                if session.connections:
                    raise SessionBusy(f"client {client!r} is connected from another process: two processes under "
                                      "one name would train one adapter twice. Stop the other one, or give this "
                                      "one a name and token of its own")
                waited = time.monotonic() - session.idle_since
                if waited <= self.limits.session_timeout:
                    raise SessionBusy(
                        f"client {client!r} has a session from another process that disconnected {waited:.0f} s "
                        f"ago; it is kept {self.limits.session_timeout:g} s for that process to reconnect "
                        f"(serve --session_timeout), so a new one can start in "
                        f"{self.limits.session_timeout - waited:.0f} s",
                        retry_after=self.limits.session_timeout - waited)
                self.count("sessions_expired")
                self._discard(session, f"expired after {self.limits.session_timeout:g} s without a connection")
            if self.federation is None:
                adapter = self.adapter(client, wanted)
                ours = adapter.schedule
            else:
                adapter = self.adapter(FEDERATION)
                ours = self.optim.resolved(self._schedule_steps)
            theirs = wanted.resolved(None) if wanted is not None else ours
            if theirs != ours:
                diffs = [f"{k} {theirs[k]!r} (server: {ours[k]!r})" for k in ours if ours[k] != theirs[k]]
                raise ValueError(f"client {client!r} trains the trunk with another schedule: {'; '.join(diffs)}. "
                                 + ("Every client of a federation trains with the server's model.trunk.optim and "
                                    "trainer.max_steps (serve --trainer.max_steps N sets the server's)"
                                    if self.federation is not None else
                                    "Its trunk adapter was made with the first ones; resume with the same "
                                    "model.trunk.optim and trainer.max_steps"))
            if not known:
                session = self.sessions[client] = Session(client, session_id, adapter=adapter)
            session.connections += 1
            return {"known": known, "step": adapter.steps, "saved": adapter.saved_step, "instance": self.instance}

    def detach(self, client: str, session_id: str) -> None:
        """A connection of the session ended; the session waits ``session_timeout`` for a reconnect."""
        with self.lock:
            session = self.sessions.get(client)
            if session is not None and session.id == session_id:
                session.connections = max(0, session.connections - 1)
                session.idle_since = time.monotonic()

    def end_session(self, client: str, session_id: str | None = None) -> None:
        """The client said goodbye: free everything it held."""
        with self.lock:
            session = self.sessions.get(client)
            if session is not None and (session_id is None or session.id == session_id):
                self._discard(session, "ended by the client")
                if self.federation is not None and session.index is not None:
                    self._leave(session.index)

    def _leave(self, index: int) -> None:
        """A federation's client said goodbye: synchronisation points stop waiting for it."""
        self.left.add(index)
        for gathering in list(self.gatherings.values()):
            gathering.expected.discard(index)
            if not gathering.done and gathering.arrived and gathering.arrived.keys() >= gathering.expected:
                self._finish(gathering)

    def _discard(self, session: Session, why: str) -> None:
        dropped = len(session.graphs)
        session.graphs.clear()
        session.generations.clear()
        session.grads.clear()  # gradients of a step the client never finished must not leak into the next one
        if self.sessions.get(session.client) is session:
            del self.sessions[session.client]
        log.info("session of client %r %s (%d graphs freed)", session.client, why, dropped)

    def expire(self, now: float | None = None) -> None:
        """Free sessions of clients silent for ``session_timeout`` and graphs older than ``max_graph_age``."""
        now = time.monotonic() if now is None else now
        with self.lock:
            for session in list(self.sessions.values()):
                if session.connections == 0 and now - session.idle_since > self.limits.session_timeout:
                    self.count("sessions_expired")
                    self._discard(session, f"expired after {self.limits.session_timeout:g} s without a connection")
                    continue
                for gid, generation in list(session.generations.items()):
                    if now - generation.used > self.limits.generation_timeout:
                        del session.generations[gid]
                        self.count("generations_expired")
                        log.info("freed generation %s of client %r: idle for %g s", gid, session.client,
                                 self.limits.generation_timeout)
                for key, graph in list(session.graphs.items()):
                    if now - graph.created > self.limits.max_graph_age:
                        del session.graphs[key]
                        self.count("graphs_dropped")
                        log.warning("dropped graph %s of client %r: no backward pass for %g s", key,
                                    session.client, self.limits.max_graph_age)

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
            self._block = block
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
            shape = list(specs[0].shape)
            if graph is not None and shape != list(graph.y.shape):
                raise ProtocolError(f"gradient of shape {shape} for an output of shape {list(graph.y.shape)}")

    def _forward(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        if "generation" in header:
            return self._generate(session, header, tensors)
        device, dtype = self.trunk.device, self.trunk.dtype
        received = tensors["hidden_states"]
        _finite("hidden_states", received)
        x = received.to(device=device, dtype=dtype)
        mask = tensors.get("attention_mask")
        mask = mask.to(device=device, dtype=torch.long) if mask is not None else None
        positions = tensors["position_ids"].to(device=device, dtype=torch.long)
        training = bool(header.get("training", False))
        adapter = session.adapter
        if training and self.federation is not None:
            self._member(session)
            if session.step is None:
                session.step = header["step"]
            if header["step"] != session.step:
                raise RuntimeError(f"client {session.client!r} trains optimizer step {header['step'] + 1} but has "
                                   f"completed {session.step} steps on this server")
        elif training and header["step"] != adapter.steps:
            raise RuntimeError(f"the client trains optimizer step {header['step'] + 1} but its trunk adapter has "
                               f"made {adapter.steps} steps: resume the client from the server's step "
                               f"(--ckpt_path) or the server from the client's (serve --resume)")
        self._use(adapter.name)
        self.trunk.train(training)
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            if t.untyped_storage().data_ptr() not in self._param_storages:
                saved += t.numel() * t.element_size()
            return t

        if training:
            x = x.detach().requires_grad_(bool(header.get("need_input_grad", True)))
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = self.trunk(Activations(x, mask, positions)).hidden_states
            self._keep(session, tuple(header["key"]), Graph(x, y, x.requires_grad, saved + x.nbytes, time.monotonic()))
        else:
            with torch.no_grad():
                y = self.trunk(Activations(x, mask, positions)).hidden_states
        self.count("forward")
        return {}, {"hidden_states": y.detach().to(received.dtype)}

    def _generate(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """The next positions of a generation through the trunk with that generation's KV cache."""
        from transformers import DynamicCache

        gid, limits = header["generation"], self.limits
        received = tensors["hidden_states"]
        _finite("hidden_states", received)
        device = self.trunk.device
        x = received.to(device=device, dtype=self.trunk.dtype)
        batch, seq = x.shape[:2]
        new_mask = tensors.get("attention_mask")
        new_mask = (torch.ones(batch, seq, dtype=torch.long, device=device) if new_mask is None
                    else new_mask.to(device=device, dtype=torch.long))
        if header["start"]:
            session.generations.pop(gid, None)
            while len(session.generations) >= limits.max_generations:
                old, _ = session.generations.popitem(last=False)
                self.count("generations_evicted")
                log.warning("client %r: freed generation %s (more than %d generations)", session.client, old,
                            limits.max_generations)
            generation = Generation(DynamicCache(config=self.trunk.config), new_mask)
        else:
            generation = session.generations.pop(gid, None)
            if generation is None:
                raise RuntimeError(f"generation {gid} is unknown to the trunk server: it ended, was idle for more "
                                   f"than {limits.generation_timeout:g} s, was evicted, or the server restarted")
            if generation.mask.shape[0] != batch:
                raise ValueError(f"generation {gid} has {generation.mask.shape[0]} rows, this step {batch}")
            generation.mask = torch.cat([generation.mask, new_mask], dim=1)
            if generation.mask.shape[1] > self.max_seq:
                raise ValueError(f"generation {gid} is longer than {self.max_seq} positions")
        positions = tensors["position_ids"].to(device=device, dtype=torch.long)
        self._use(session.adapter.name)
        self.trunk.eval()
        with torch.no_grad():
            y = self.trunk(x, attention_mask=generation.mask, position_ids=positions,
                           cache=generation.cache).hidden_states
        generation.used = time.monotonic()
        if sum(g.nbytes for g in session.generations.values()) + generation.nbytes > limits.max_generation_bytes:
            raise ValueError(f"generation {gid} was freed: client {session.client!r}'s KV caches would hold more "
                             f"than {limits.max_generation_bytes} bytes")
        session.generations[gid] = generation
        self.count("generation_forward")
        return {}, {"hidden_states": y.detach().to(received.dtype)}

    def _end_generation(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """The client finished (or gave up) a generation: free its KV cache."""
        return {"freed": session.generations.pop(header["generation"], None) is not None}, {}

    def _keep(self, session: Session, key: tuple, graph: Graph) -> None:
        session.graphs.pop(key, None)  # a repeated forward pass replaces its graph
        session.graphs[key] = graph
        limits = self.limits
        while len(session.graphs) > limits.max_graphs or (
                len(session.graphs) > 1 and session.graph_bytes > limits.max_graph_bytes):
            dropped, _ = session.graphs.popitem(last=False)
            self.count("graphs_dropped")
            log.warning("client %r: dropped the unfinished graph %s (more than %d graphs or %d bytes waiting for "
                        "their backward pass)", session.client, dropped, limits.max_graphs, limits.max_graph_bytes)

    def _backward(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        key = tuple(header["key"])
        graph = session.graphs.get(key)
        if graph is None:
            raise KeyError(f"no forward pass of client {session.client!r} is waiting for a backward pass under key "
                           f"{list(key)}")
        grad = tensors["grad"]
        _finite("grad", grad)
        if grad.shape != graph.y.shape:
            raise ValueError(f"gradient of shape {list(grad.shape)} for an output of shape {list(graph.y.shape)}")
        del session.graphs[key]
        # a checkpointed trunk runs its layers again now: with this client's adapter, in training mode
        self._use(session.adapter.name)
        self.trunk.train(True)
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
        return {}, ({"grad": graph.x.grad.to(grad.dtype)} if graph.need_input_grad else {})

    def _grad_sq_norm(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """The squared norm of the gradients waiting for this client's next step: its own, or (federation) its
        and its fellow members' sum, which is what the step applies."""
        combined = _combine([(s.grads, 1.0) for s in self._sharing(session) if s.grads], mean=False)
        norms = [torch.linalg.vector_norm(g) for g in combined.values()]
        sq = torch.stack(norms).pow(2).sum() if norms else torch.zeros(())
        return {}, {"sq_norm": sq.float().cpu()}

    def _sharing(self, session: Session) -> list[Session]:
        """The sessions training ``session``'s adapter (itself, or its federation's members)."""
        if self.federation is None:
            return [session]
        self._member(session)
        return [s for s in self.sessions.values() if s.adapter is session.adapter and s.index is not None]

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
            return self._step_reply(adapter), {}
        if target != adapter.steps + 1:
            raise RuntimeError(f"the client asks for optimizer step {target} but its trunk adapter has made "
                               f"{adapter.steps} steps")
        self._apply(adapter, dict(session.grads), scale)
        session.grads.clear()
        return self._step_reply(adapter), {}

    @staticmethod
    def _step_reply(adapter: TrunkAdapter) -> Header:
        return {"step": adapter.steps, "saved": adapter.saved_step, "lr": adapter.optimizer.param_groups[0]["lr"]}

    # ------------------------------------------------------------------------------------------ federation
    def _join(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """A client of the federation says which client it is and how many training rows it holds."""
        federation = self.federation
        clients = federation.clients if federation is not None else 1
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

    def _member(self, session: Session) -> int:
        if session.index is None:
            raise RuntimeError(f"client {session.client!r} has not joined the federation (join with its index)")
        return session.index

    def _federated_step(self, session: Session, header: Header) -> tuple[Header, Tensors]:
        federation, index = self.federation, self._member(session)
        target = header["step"]
        if session.step is None:  # a client that sat out every step since it joined (or since a restore)
            session.step = target - 1
        done = session.step
        if target == done:  # already applied; the reply was lost
            self.count("steps_repeated")
            return self._step_reply(session.adapter), {}
        if target != done + 1:
            raise RuntimeError(f"client {session.client!r} asks for optimizer step {target} after {done}")
        participant = bool(header.get("participant", True))
        if federation.trunk_update == "sequential":  # each participant's step is a trunk step, in arrival order
            if participant:
                self._apply(session.adapter, dict(session.grads), header.get("scale"))
            session.grads.clear()
            session.step = target
            return self._step_reply(session.adapter), {}
        if target <= self.federated_step:
            raise RuntimeError(f"client {session.client!r} was dropped from step {target} after "
                               f"round_timeout ({federation.round_timeout:g} s); the federation is at step "
                               f"{self.federated_step}")

        def finish(arrived: dict[int, Any]) -> None:
            # in client order, not arrival order: the sum is the same whoever came first
            weighted = [(s.grads, w) for s, w, _ in (arrived[i] for i in sorted(arrived)) if w > 0 and s.grads]
            scale = next((sc for _, _, sc in arrived.values() if sc is not None), None)
            self._apply(session.adapter, _combine(weighted, mean=True), scale)
            for s, _, _ in arrived.values():
                s.grads.clear()
                s.step = target
            self.federated_step = target

        weight = federation.weight(participant, session.samples) if participant else 0.0
        gathering = self._gather(f"step {target}", index, (session, weight, header.get("scale")), finish)
        if not gathering.done:
            return {"pending": True}, {}
        return self._step_reply(session.adapter), {}

    def _keys(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """Secure aggregation: relay every client's X25519 public key and weight to all of them."""
        index = self._member(session)
        gathering = self._gather("keys", index, (header["public"], float(header["weight"])),
                                 lambda arrived: {"publics": {str(i): v[0] for i, v in arrived.items()},
                                                  "weights": {str(i): v[1] for i, v in arrived.items()},
                                                  "federation": self.instance})
        if not gathering.done:
            raise RuntimeError("secure aggregation needs clients that can wait for each other (tcp)")
        return gathering.result, {}

    def _aggregate(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """Secure aggregation: add the clients' masked updates (mod 2**64). The server sees only the masked
        vectors and their sum; when a client of the announced participants is missing, the survivors redo the
        round (the masks would not cancel)."""
        from .federated import aggregate

        index = self._member(session)

        def finish(arrived: dict[int, Any]) -> Any:
            sizes = {v[0].numel() for v in arrived.values()}
            if len(sizes) != 1:
                raise ValueError(f"clients sent updates of different sizes {sorted(sizes)}")
            if all(sorted(v[2]) == sorted(arrived) for v in arrived.values()):
                return {"total_weight": sum(v[1] for v in arrived.values())}, {
                    "sum": aggregate([arrived[i][0] for i in sorted(arrived)])}
            return {"retry": sorted(arrived)}, {}

        gathering = self._gather(f"aggregate {header['nonce']}", index,
                                 (tensors["masked"].clone(), float(header["weight"]), list(header["participants"])),
                                 finish)
        if not gathering.done:
            raise RuntimeError("secure aggregation needs clients that can wait for each other (tcp)")
        self.count("aggregations")
        return gathering.result

    def _gather(self, name: str, index: int, value: Any, finish: Callable[[dict[int, Any]], Any]) -> Gathering:
        """Add this client's ``value`` to the gathering ``name``; it finishes when every expected client has
        arrived, or ``round_timeout`` after the first did (the missing ones are dropped from the federation until
        they join again). Waits for that when the transport can (``block``)."""
        gathering = self.gatherings.get(name)
        if gathering is None:
            expected = set(range(self.federation.clients)) - self.dropped - self.left
            gathering = self.gatherings[name] = Gathering(name, expected, finish)
        gathering.arrived[index] = value
        if gathering.arrived.keys() >= gathering.expected:
            self._finish(gathering)
        elif self._block:
            deadline = gathering.started + self.federation.round_timeout
            while not gathering.done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(gathering.expected - gathering.arrived.keys())
                    names = [self.roster[i] for i in missing if i in self.roster]
                    log.warning("%s goes on without client(s) %s (%s): no answer within round_timeout %g s",
                                gathering.name, ", ".join(map(str, missing)), ", ".join(map(repr, names)) or "never joined",
                                self.federation.round_timeout)
                    self.dropped.update(missing)
                    self.count("clients_dropped")
                    for s in self.sessions.values():
                        if s.index in missing:
                            s.grads.clear()
                    self._finish(gathering)
                    break
                self.changed.wait(remaining)
        if gathering.error is not None:
            raise RuntimeError(f"{gathering.name} failed: {gathering.error}")
        return gathering

    def _finish(self, gathering: Gathering) -> None:
        try:
            gathering.result = gathering.finish(gathering.arrived)
        except (ValueError, RuntimeError, KeyError) as exc:
            gathering.error = exc
        finally:
            gathering.done = True
            self.gatherings.pop(gathering.name, None)
            self.changed.notify_all()

    # ------------------------------------------------------------------------------------------ checkpoints
    def checkpoint_path(self, tag: str, adapter: TrunkAdapter | None = None) -> Path:
        """``<adapter's folder>/<tag>.safetensors`` (default: the only adapter's)."""
        adapter = adapter or self.adapter()
        if adapter.folder is None:
            raise RuntimeError("this trunk server has no run folder to keep checkpoints in")
        if not TAG.fullmatch(tag):
            raise ValueError(f"bad checkpoint tag {tag!r}")
        return adapter.folder / f"{tag}.safetensors"

    def state(self, adapter: TrunkAdapter | None = None) -> dict[str, Any]:
        adapter = adapter or self.adapter()
        return {
            "trainable": {n: p.detach() for n, p in adapter.trainable},
            "optimizer": adapter.optimizer.state_dict(),
            "scheduler": None if adapter.scheduler is None else adapter.scheduler.state_dict(),
            "steps": adapter.steps,
            "federated_step": self.federated_step,
            "fingerprint": self.fingerprint,
        }

    def save(self, tag: str, adapter: TrunkAdapter | None = None) -> Path:
        """Write an adapter's state (default: the only one's) to its folder's ``<tag>.safetensors`` atomically
        (write, then rename)."""
        with self.lock:
            adapter = adapter or self.adapter()
            path = save_state(self.state(adapter), self.checkpoint_path(tag, adapter))
            if tag == LATEST or adapter.saved_step is None or adapter.steps >= adapter.saved_step:
                adapter.saved_step = adapter.steps
            return path

    def save_all(self, tag: str) -> list[Path]:
        """Save every adapter (``serve`` does when it stops)."""
        with self.lock:
            return [self.save(tag, adapter) for adapter in self.adapters.values() if adapter.folder is not None]

    @torch.no_grad()
    def restore(self, path: Path, adapter: TrunkAdapter | None = None) -> int:
        """Load a checkpoint written by :meth:`save` into an adapter (default: the only one); the unapplied
        gradients and graphs of the sessions training it are dropped."""
        with self.lock:
            adapter = adapter or self.adapter()
            state = load_state(path)
            params = dict(adapter.trainable)
            if set(params) != set(state["trainable"]):
                raise KeyError(f"trunk checkpoint {path} does not match the trunk's trainable tensors")
            saved_print = state.get("fingerprint")
            if saved_print is not None and saved_print["config"] != self.fingerprint["config"]:
                raise ValueError(f"trunk checkpoint {path} was written for another model")
            for name, tensor in state["trainable"].items():
                params[name].copy_(tensor)
            adapter.optimizer.load_state_dict(state["optimizer"])
            if adapter.scheduler is not None and state["scheduler"] is not None:
                adapter.scheduler.load_state_dict(state["scheduler"])
            adapter.optimizer.zero_grad(set_to_none=True)
            for session in self.sessions.values():
                if session.adapter is adapter:
                    session.graphs.clear()
                    session.grads.clear()
                    session.step = None
            adapter.steps = adapter.saved_step = int(state["steps"])
            if adapter.owner == FEDERATION:
                self.federated_step = int(state.get("federated_step", 0))
                self._restored = (path.name, adapter.steps)
            return adapter.steps

    def resume(self) -> dict[str, int]:
        """From now on each adapter starts from the checkpoint written last in its folder (``latest`` or a client's
        ``step-N``) when its owner first connects, with the schedule that owner trains with. Returns owner -> the
        step it will resume at."""
        self.resuming = True
        if self.run_dir is None:
            return {}
        folder = self.run_dir / "trunk"
        if self.federation is not None:
            found = {FEDERATION: _last_checkpoint(folder)}
        else:
            owners = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
            found = {p.name: _last_checkpoint(p) for p in owners}
        return {owner: int(load_state(path)["steps"]) for owner, path in found.items() if path is not None}

    def _save(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        adapter = session.adapter
        if self.federation is not None:
            self._member(session)
        path = self.save(header["tag"], adapter)
        return {"path": str(path), "file": str(path.relative_to(self.run_dir / "trunk")), "step": adapter.steps}, {}

    def _load(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        tag, adapter = header["tag"], session.adapter
        path = self.checkpoint_path(tag, adapter)
        if self.federation is not None:
            if session.index is None:  # not a member: a generation or an evaluation after training
                busy = [s.client for s in self.sessions.values() if s is not session and s.connections]
                there = path.is_file() and self._restored == (path.name, adapter.steps)
                if busy and not header.get("force") and not there:
                    raise RuntimeError(
                        f"the trunk server is training the federation with client(s) {', '.join(map(repr, busy))}: "
                        f"going back to {tag!r} would change their training. Wait until they finish, or force it "
                        "(generate --force_load)")
            elif self._restored == (path.name, adapter.steps):
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
    def _counters(self) -> dict[str, int]:
        with self._count_lock:
            return dict(self.counters)

    def status(self) -> dict[str, Any]:
        """Counters, adapters and per-client holdings (no tensors, nothing private) for operators and tests; ``step``
        and ``saved_step`` are the only adapter's (step 0 before there is one, None while there are several)."""
        from .loading import rss_bytes

        with self.lock:
            several = len(self.adapters) > 1
            return {
                "instance": self.instance, "step": None if several else self.steps,
                "saved_step": None if several or not self.adapters else self.adapter().saved_step,
                "adapters": {owner: {"step": a.steps, "saved_step": a.saved_step, "bytes": a.nbytes}
                             for owner, a in self.adapters.items()},
                "busy_seconds": self.busy_seconds, "threads": torch.get_num_threads(),
                "counters": self._counters(), "rss_bytes": rss_bytes(),
                "gradients_waiting": any(s.grads for s in self.sessions.values()),
                "federated_step": self.federated_step, "dropped": sorted(self.dropped),
                "left": sorted(self.left),
                "sessions": {name: {"graphs": len(s.graphs), "graph_bytes": s.graph_bytes,
                                    "generations": len(s.generations),
                                    "generation_bytes": sum(g.nbytes for g in s.generations.values()),
                                    "connections": s.connections, "pending_gradients": s.pending,
                                    "step": s.adapter.steps if s.adapter else None}
                             for name, s in self.sessions.items()},
            }


def _last_checkpoint(folder: Path | None) -> Path | None:
    """The checkpoint written last in ``folder``: the last written, not the highest step (after a client went back to
    an older checkpoint, files of the abandoned steps may remain)."""
    if folder is None or not folder.is_dir():
        return None
    found = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    return found[-1] if found else None


def _combine(contributions: list[tuple[dict[str, torch.Tensor], float]], mean: bool) -> dict[str, torch.Tensor]:
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


def _finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} holds non-finite values (inf/nan): refused so they cannot reach the trunk's weights")
