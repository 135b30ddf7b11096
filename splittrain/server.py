"""TrunkServer: runs the trunk for its clients and steps its optimizer when they say so.

On ``forward`` the server detaches the received hidden states, runs the trunk and keeps ``(x, y)`` under
the key ``(client, step, micro)``; on ``backward`` it back-propagates the received dL/dy, returns dL/dx and
drops the graph. ``step`` applies the client's clipping scale, then the optimizer and scheduler, so the trunk
steps on exactly the client's boundaries (gradient accumulation included).

The same class sits behind every transport. It takes a trunk :class:`~splittrain.segments.Segment` and never
the client's code. Everything a client does lives in its session, named by the client's authenticated name:
its graphs (bounded by count, bytes and age), the last reply (a request repeated after a reconnect is
answered again, never re-applied), and its unapplied gradients, which are dropped with the session when a
client dies mid-step. Each ``step`` carries the optimizer step number it makes, so a step is applied exactly
once. Checkpoints hold only what the server owns (trainable trunk tensors, optimizer and scheduler state,
step counter) as safetensors, written atomically.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from .federated import FederatedSettings
from .lora import LoraSettings, prepare
from .segments import Activations, Segment
from .state import load_state, save_state
from .transport import Header, Tensors, fingerprint
from .transport.wire import FLOAT_DTYPES, ProtocolError, TensorSpec

log = logging.getLogger("splittrain.server")

LATEST = "latest"
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=-]{0,63}")


@dataclass
class OptimSettings:
    """AdamW and its learning-rate schedule (transformers' ``get_scheduler`` names)."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = 0
    total_steps: int | None = None
    """Steps the schedule spans (linear/cosine); default: the trainer's max_steps."""


@dataclass
class TrunkSettings:
    """How the server trains the trunk: LoRA on its projections, with its own AdamW."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)


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


def build_optimizer(params: list[torch.nn.Parameter], settings: OptimSettings, total_steps: int | None):
    """AdamW + a warm-up schedule, identical for both parties so split equals monolithic training."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps,
                                  weight_decay=settings.weight_decay)
    steps = settings.total_steps or total_steps
    if settings.schedule != "constant_with_warmup" and not steps:
        raise ValueError(f"the {settings.schedule!r} schedule needs total_steps (or trainer.max_steps)")
    scheduler = get_scheduler(settings.schedule, optimizer, num_warmup_steps=settings.warmup_steps,
                              num_training_steps=steps)
    return optimizer, scheduler


def load_trunk(model: str, cuts: tuple[int, int], lora: LoraSettings, seed: int = 0, dtype: str | None = None,
               device_map: dict[str, str] | str | None = None) -> Segment:
    """The trunk of ``model`` cut at ``cuts`` (only its tensors are read), with LoRA on its projections."""
    from .loading import split_model

    parts = split_model(model, cuts=tuple(cuts), parts=("trunk",), dtype=dtype, device_map=device_map)
    return prepare(parts["trunk"], "lora", lora, seed)


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
        trunk: the trunk segment, its trainable parameters (LoRA) already marked.
        optim: the trunk's AdamW and schedule.
        total_steps: steps a linear/cosine schedule spans when ``optim.total_steps`` is unset.
        run_dir: folder for ``trunk/<tag>.safetensors`` checkpoints and ``server_status.json``.
        limits: per-client bounds and timeouts.
        save_every: save ``trunk/latest.safetensors`` every this many steps (0: only when asked).
        federation: several clients (:class:`~splittrain.federated.FederatedSettings`): trunk gradients are
            kept per client and combined at each step as the settings say.
    """

    def __init__(self, trunk: Segment, optim: OptimSettings | None = None, total_steps: int | None = None,
                 run_dir: str | Path | None = None, limits: ServerLimits | None = None, save_every: int = 0,
                 federation: FederatedSettings | None = None) -> None:
        self.trunk = trunk
        self.trainable = [(n, p) for n, p in trunk.named_parameters() if p.requires_grad]
        """The trunk's trainable parameters by name (looked up once: every backward pass and step uses them)."""
        self.federation = federation if federation is not None and federation.enabled else None
        if self.federation is not None and self.federation.trunk_update == "sequential" and total_steps:
            # every participant's step is a trunk step: the schedule spans them all
            total_steps *= len(self.federation.participants(0))
        self.optimizer, self.scheduler = build_optimizer([p for _, p in self.trainable], optim or OptimSettings(),
                                                         total_steps)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.limits = limits or ServerLimits()
        self.max_seq = self.limits.max_seq or int(getattr(trunk.config, "max_position_embeddings", 0) or 2**20)
        self.save_every = save_every
        self.fingerprint = fingerprint(trunk.config, trunk.family.name, (trunk.start, trunk.stop), trunk.dtype)
        self.instance = uuid.uuid4().hex
        self.steps = 0
        self.busy_seconds = 0.0
        """Seconds spent running the trunk's forward and backward passes (its compute: the rest is waiting)."""
        self.saved_step: int | None = None
        self.sessions: dict[str, Session] = {}
        self.counters = {"forward": 0, "backward": 0, "steps_applied": 0, "steps_repeated": 0,
                         "replies_repeated": 0, "handshakes": 0, "handshakes_refused": 0, "frames_refused": 0,
                         "sessions_expired": 0, "graphs_dropped": 0, "clients_dropped": 0,
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

    def count(self, counter: str) -> None:
        """Add one to a status counter (safe from any thread)."""
        with self._count_lock:
            self.counters[counter] += 1

    # ------------------------------------------------------------------------------------------ sessions
    def open_session(self, client: str, session_id: str) -> dict[str, Any]:
        """Attach a connection of ``client`` to its session ``session_id``, replacing any older session.

        Returns what the client needs to resume: whether the session was known (else the server restarted
        or the client did), the trunk's step and its last durable step.
        """
        with self.lock:
            session = self.sessions.get(client)
            known = session is not None and session.id == session_id
            if not known:
                if session is not None:
                    self._discard(session, "replaced by a new session")
                session = self.sessions[client] = Session(client, session_id)
            session.connections += 1
            return {"known": known, "step": self.steps, "saved": self.saved_step, "instance": self.instance}

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
            session = self.sessions[client] = Session(client, "local")
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
        """Check a frame's header from an authenticated ``client`` before its payload is read.

        Names, dtypes and shapes must be what the kind carries for this model; field types are checked too.
        """
        kind = header["kind"]
        if kind not in self._handlers:
            raise ProtocolError(f"unknown message kind {kind!r}; expected one of {sorted(self._handlers)}")
        if type(header.get("seq")) is not int or header["seq"] < 1:
            raise ProtocolError("every request needs a positive integer 'seq'")
        if "ack" in header and (type(header["ack"]) is not int or not 0 <= header["ack"] < header["seq"]):
            raise ProtocolError("'ack' must be an integer in 0..seq-1")
        spec = {s.name: s for s in specs}
        hidden = int(self.trunk.config.hidden_size)
        if kind == "forward":
            names = set(spec)
            if not {"hidden_states", "position_ids"} <= names <= {"hidden_states", "position_ids", "attention_mask"}:
                raise ProtocolError(f"forward carries hidden_states, position_ids and optionally attention_mask, "
                                    f"not {sorted(names)}")
            h = spec["hidden_states"]
            if h.dtype not in FLOAT_DTYPES or len(h.shape) != 3 or h.shape[2] != hidden:
                raise ProtocolError(f"hidden_states must be (batch, seq, {hidden}) in one of {FLOAT_DTYPES}, "
                                    f"got {list(h.shape)} {h.dtype}")
            batch, seq = h.shape[:2]
            if not (1 <= batch <= self.limits.max_batch and 1 <= seq <= self.max_seq):
                raise ProtocolError(f"batch {batch} x sequence {seq} is outside 1..{self.limits.max_batch} x "
                                    f"1..{self.max_seq}")
            p = spec["position_ids"]
            if p.dtype not in ("int32", "int64") or len(p.shape) != 2 or p.shape[0] not in (1, batch) \
                    or p.shape[1] != seq:
                raise ProtocolError(f"position_ids must be (1 or {batch}, {seq}) integers, got {list(p.shape)} {p.dtype}")
            m = spec.get("attention_mask")
            if m is not None and (m.dtype not in ("uint8", "bool", "int32", "int64") or list(m.shape) != [batch, seq]):
                raise ProtocolError(f"attention_mask must be ({batch}, {seq}) integers, got {list(m.shape)} {m.dtype}")
            _check_key(header.get("key"))
            for flag in ("training", "need_input_grad"):
                if type(header.get(flag, False)) is not bool:
                    raise ProtocolError(f"'{flag}' must be true or false")
            if header.get("training") and type(header.get("step")) is not int:
                raise ProtocolError("a training forward pass carries the client's optimizer step ('step')")
            if "generation" in header:
                _check_generation(header.get("generation"))
                if header.get("training") or type(header.get("start")) is not bool:
                    raise ProtocolError("a generation forward pass is not training and says whether it 'start's")
        elif kind == "backward":
            _check_key(header.get("key"))
            g = spec.get("grad")
            if set(spec) != {"grad"} or g.dtype not in FLOAT_DTYPES:
                raise ProtocolError(f"backward carries one gradient 'grad' in one of {FLOAT_DTYPES}")
            # Without the lock: another client's trunk compute must not hold up reading this payload. A graph that
            # goes meanwhile is refused by the handler.
            session = self.sessions.get(client)
            graph = session.graphs.get(tuple(header["key"])) if session is not None else None
            if graph is not None and list(g.shape) != list(graph.y.shape):
                raise ProtocolError(f"gradient of shape {list(g.shape)} for an output of shape {list(graph.y.shape)}")
            if graph is None and (len(g.shape) != 3 or g.shape[2] != hidden or not (
                    1 <= g.shape[0] <= self.limits.max_batch and 1 <= g.shape[1] <= self.max_seq)):
                raise ProtocolError(f"gradient must be (batch <= {self.limits.max_batch}, seq <= {self.max_seq}, "
                                    f"{hidden}), got {list(g.shape)}")
        elif kind == "aggregate":
            masked = spec.get("masked")
            if set(spec) != {"masked"} or masked.dtype != "int64" or len(masked.shape) != 1:
                raise ProtocolError("aggregate carries one 1-d int64 tensor 'masked'")
            participants = header.get("participants")
            if not (type(header.get("nonce")) is int and isinstance(header.get("weight"), (int, float))
                    and header["weight"] >= 0 and isinstance(participants, list)
                    and all(type(i) is int for i in participants) and len(participants) <= 2**16):
                raise ProtocolError("aggregate carries an integer 'nonce', a 'weight' >= 0 and 'participants'")
        else:
            if spec:
                raise ProtocolError(f"{kind} carries no tensors")
            if kind == "step":
                scale = header.get("scale")
                if type(header.get("participant", True)) is not bool:
                    raise ProtocolError("'participant' must be true or false")
                if type(header.get("step")) is not int or not (
                        scale is None or (isinstance(scale, (int, float)) and 0 <= scale <= 1)):
                    raise ProtocolError("step carries an integer 'step' and a 'scale' in [0, 1] or null")
            if kind == "keys" and not (isinstance(header.get("public"), str) and re.fullmatch(r"[0-9a-f]{64}", header["public"])
                                       and isinstance(header.get("weight"), (int, float)) and header["weight"] >= 0):
                raise ProtocolError("keys carries a 32-byte hex X25519 'public' key and a 'weight' >= 0")
            if kind == "join" and not (type(header.get("index")) is int and type(header.get("samples")) is int
                                       and header["samples"] >= 0):
                raise ProtocolError("join carries the client's integer 'index' and 'samples'")
            if kind == "end_generation":
                _check_generation(header.get("generation"))
            if kind in ("save", "load") and not (isinstance(header.get("tag"), str) and _TAG.fullmatch(header["tag"])):
                raise ProtocolError(f"bad checkpoint tag {header.get('tag')!r}")

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
        if training and self.federation is not None:
            if session.step is None:
                session.step = header["step"]
            if header["step"] != session.step:
                raise RuntimeError(f"client {session.client!r} trains optimizer step {header['step'] + 1} but has "
                                   f"completed {session.step} steps on this server")
        elif training and header["step"] != self.steps:
            raise RuntimeError(f"the client trains optimizer step {header['step'] + 1} but the trunk server has "
                               f"made {self.steps} steps: resume the client from the server's step "
                               f"(--ckpt_path) or the server from the client's (serve --resume)")
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
        params = self.trainable
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
        combined = _combine([(s.grads, 1.0) for s in self.sessions.values() if s.grads], mean=False)
        norms = [torch.linalg.vector_norm(g) for g in combined.values()]
        sq = torch.stack(norms).pow(2).sum() if norms else torch.zeros(())
        return {}, {"sq_norm": sq.float().cpu()}

    @torch.no_grad()
    def _apply(self, grads: dict[str, torch.Tensor], scale: float | None) -> None:
        """One optimizer (and scheduler) step of the trunk on ``grads``, scaled by ``scale`` (clipping)."""
        if grads:
            for name, p in self.trainable:
                p.grad = grads.get(name)
                if p.grad is not None and scale is not None:
                    p.grad.mul_(scale)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        self.steps += 1
        self.count("steps_applied")
        if self.save_every and self.steps % self.save_every == 0:
            self.save(LATEST)

    def _step(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        if self.federation is not None:
            return self._federated_step(session, header)
        target, scale = header["step"], header.get("scale")
        if target == self.steps:  # already applied; the reply was lost
            self.count("steps_repeated")
            return self._step_reply(), {}
        if target != self.steps + 1:
            raise RuntimeError(f"the client asks for optimizer step {target} but the trunk server has made "
                               f"{self.steps} steps")
        contributors = [s for s in self.sessions.values() if s.grads]
        self._apply(_combine([(s.grads, 1.0) for s in contributors], mean=False), scale)
        for s in contributors:
            s.grads.clear()
        return self._step_reply(), {}

    def _step_reply(self) -> Header:
        return {"step": self.steps, "saved": self.saved_step, "lr": self.optimizer.param_groups[0]["lr"]}

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
        return {"clients": clients, "step": self.steps}, {}

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
            return self._step_reply(), {}
        if target != done + 1:
            raise RuntimeError(f"client {session.client!r} asks for optimizer step {target} after {done}")
        participant = bool(header.get("participant", True))
        if federation.trunk_update == "sequential":  # each participant's step is a trunk step, in arrival order
            if participant:
                self._apply(dict(session.grads), header.get("scale"))
            session.grads.clear()
            session.step = target
            return self._step_reply(), {}
        if target <= self.federated_step:
            raise RuntimeError(f"client {session.client!r} was dropped from step {target} after "
                               f"round_timeout ({federation.round_timeout:g} s); the federation is at step "
                               f"{self.federated_step}")

        def finish(arrived: dict[int, Any]) -> None:
            # in client order, not arrival order: the sum is the same whoever came first
            weighted = [(s.grads, w) for s, w, _ in (arrived[i] for i in sorted(arrived)) if w > 0 and s.grads]
            scale = next((sc for _, _, sc in arrived.values() if sc is not None), None)
            self._apply(_combine(weighted, mean=True), scale)
            for s, _, _ in arrived.values():
                s.grads.clear()
                s.step = target
            self.federated_step = target

        weight = federation.weight(participant, session.samples) if participant else 0.0
        gathering = self._gather(f"step {target}", index, (session, weight, header.get("scale")), finish)
        if not gathering.done:
            return {"pending": True}, {}
        return self._step_reply(), {}

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
    def checkpoint_path(self, tag: str) -> Path:
        if self.run_dir is None:
            raise RuntimeError("this trunk server has no run folder to keep checkpoints in")
        if not _TAG.fullmatch(tag):
            raise ValueError(f"bad checkpoint tag {tag!r}")
        return self.run_dir / "trunk" / f"{tag}.safetensors"

    def state(self) -> dict[str, Any]:
        return {
            "trainable": {n: p.detach() for n, p in self.trainable},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "steps": self.steps,
            "federated_step": self.federated_step,
            "fingerprint": self.fingerprint,
        }

    def save(self, tag: str) -> Path:
        """Write the trunk's state to ``trunk/<tag>.safetensors`` atomically (write, then rename)."""
        with self.lock:
            path = save_state(self.state(), self.checkpoint_path(tag))
            if tag == LATEST or self.saved_step is None or self.steps >= self.saved_step:
                self.saved_step = self.steps
            return path

    @torch.no_grad()
    def restore(self, path: Path) -> int:
        """Load a checkpoint written by :meth:`save`; unapplied gradients and every graph are dropped."""
        with self.lock:
            state = load_state(path)
            params = dict(self.trainable)
            if set(params) != set(state["trainable"]):
                raise KeyError(f"trunk checkpoint {path} does not match the trunk's trainable tensors")
            saved_print = state.get("fingerprint")
            if saved_print is not None and saved_print["config"] != self.fingerprint["config"]:
                raise ValueError(f"trunk checkpoint {path} was written for another model")
            for name, tensor in state["trainable"].items():
                params[name].copy_(tensor)
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state["scheduler"] is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            self.optimizer.zero_grad(set_to_none=True)
            for session in self.sessions.values():
                session.graphs.clear()
                session.grads.clear()
                session.step = None
            self.steps = self.saved_step = int(state["steps"])
            self.federated_step = int(state.get("federated_step", 0))
            self._restored = (path.name, self.steps)
            return self.steps

    def resume(self) -> int | None:
        """Restore the checkpoint written last in the run folder (``latest`` or a client's ``step-N``); its step.

        The last written, not the highest step: after a client went back to an older checkpoint, files of the
        abandoned steps may remain."""
        folder = self.checkpoint_path(LATEST).parent
        candidates = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns) if folder.is_dir() else []
        if not candidates:
            return None
        self.restore(candidates[-1])
        log.info("resumed the trunk at step %d from %s", self.steps, candidates[-1])
        return self.steps

    def _save(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        return {"path": str(self.save(header["tag"])), "step": self.steps}, {}

    def _load(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        tag = header["tag"]
        path = self.checkpoint_path(tag)
        if self.federation is not None and self._restored == (path.name, self.steps):
            # another client of the federation resumed from the same checkpoint: the trunk is there already
            session.graphs.clear()
            session.grads.clear()
            session.step = None
            return {"step": self.steps}, {}
        if path.is_file():
            self.restore(path)
            return {"step": self.steps}, {}
        wanted = re.fullmatch(r"step-(\d+)", tag)
        if wanted and int(wanted.group(1)) == self.steps:  # already there: only the partial step goes
            session.graphs.clear()
            session.grads.clear()
            return {"step": self.steps}, {}
        at = f"step {wanted.group(1)}" if wanted else f"checkpoint {tag!r}"
        raise FileNotFoundError(f"the client resumes at {at} but the trunk server is at step {self.steps} and has "
                                f"no checkpoint {tag!r} ({path})")

    # ------------------------------------------------------------------------------------------ status
    def _counters(self) -> dict[str, int]:
        with self._count_lock:
            return dict(self.counters)

    def status(self) -> dict[str, Any]:
        """Counters and per-client holdings (no tensors, nothing private) for operators and tests."""
        from .loading import rss_bytes

        with self.lock:
            return {
                "instance": self.instance, "step": self.steps, "saved_step": self.saved_step,
                "busy_seconds": self.busy_seconds, "threads": torch.get_num_threads(),
                "counters": self._counters(), "rss_bytes": rss_bytes(),
                "gradients_waiting": any(s.grads for s in self.sessions.values()),
                "federated_step": self.federated_step, "dropped": sorted(self.dropped),
                "left": sorted(self.left),
                "sessions": {name: {"graphs": len(s.graphs), "graph_bytes": s.graph_bytes,
                                    "generations": len(s.generations),
                                    "generation_bytes": sum(g.nbytes for g in s.generations.values()),
                                    "connections": s.connections, "pending_gradients": s.pending}
                             for name, s in self.sessions.items()},
            }


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


def _check_key(key: Any) -> None:
    if (not isinstance(key, list) or not 1 <= len(key) <= 4
            or not all((type(k) is int and abs(k) < 2**53) or (isinstance(k, str) and len(k) <= 64) for k in key)):
        raise ProtocolError("'key' must be a list of 1 to 4 short strings or integers")


def _check_generation(generation: Any) -> None:
    if not (isinstance(generation, str) and re.fullmatch(r"[0-9A-Za-z_-]{1,64}", generation)):
        raise ProtocolError("'generation' must be an id of 1 to 64 letters, digits, '-' or '_'")


def _finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} holds non-finite values (inf/nan): refused so they cannot reach the trunk's weights")
