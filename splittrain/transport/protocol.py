"""The cut protocol in one place: every request the trunk server answers (:data:`KINDS`), how a request's header
and tensors are checked before its payload is read (:func:`check_request`), what a reply may carry
(:func:`check_reply`), and the loop that serves one client's frames over a serializing transport
(:func:`serve_frames`, used by ``tcp`` and ``dist``).

The frames of a connection (:mod:`~splittrain.transport.wire`):

* session frames, answered by the transport and carrying no tensors: ``hello`` opens a session (over ``tcp`` with
  ``challenge``, ``auth`` and ``welcome``: :mod:`~splittrain.transport.tcp`; over ``dist`` a ``welcome``), ``bye``
  ends it;
* requests, one of :data:`KINDS`: a positive integer ``seq``, optionally ``ack`` (the client has every reply up to
  it, ``ack < seq``), the kind's fields and tensors;
* replies: ``reply`` (the request's ``seq``, the handler's fields, the kind's reply tensors) or ``error``
  (``error``, ``seq``, ``fatal``).

A request's tensor dimensions are integers, the size a symbol takes (``hidden``: the model's hidden size;
``batch`` and ``seq``: set by the first tensor that has them, within the server's limits), any size (None), or
one of several (a tuple).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from . import Header, Tensors
from .codec import SCALE, WIRE_DTYPES
from .wire import (
    ST_HEADER_LIMIT,
    Frame,
    PeerClosed,
    ProtocolError,
    Reader,
    TensorSpec,
    encode,
    frame_bytes,
    read_frame,
)

FrameCheck = Callable[[Header, list[TensorSpec]], None]
Dim = int | str | None | tuple[int | str, ...]
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=-]{0,63}")
"""A checkpoint tag (the file name of a trunk checkpoint, never a path)."""
REFUSED = (KeyError, ValueError, RuntimeError, FileNotFoundError)
"""What a handler raises to refuse one request; the client gets a non-fatal error and the session goes on."""


# ------------------------------------------------------------------------------------------------ field types
def _int(value: Any) -> bool:
    return type(value) is int


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _bool(value: Any) -> bool:
    return type(value) is bool


def _weight(value: Any) -> bool:
    return isinstance(value, (int, float)) and value >= 0


def _fraction(value: Any) -> bool:
    return value is None or isinstance(value, (int, float)) and 0 <= value <= 1


def _key(value: Any) -> bool:
    return isinstance(value, list) and 1 <= len(value) <= 4 and all(
        (type(k) is int and abs(k) < 2**53) or (isinstance(k, str) and len(k) <= 64) for k in value)


def _generation(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9A-Za-z_-]{1,64}", value) is not None


def _tag(value: Any) -> bool:
    return isinstance(value, str) and TAG.fullmatch(value) is not None


def _public_key(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def _indices(value: Any) -> bool:
    return isinstance(value, list) and len(value) <= 2**16 and all(type(i) is int for i in value)


def _settings(value: Any) -> bool:
    return isinstance(value, dict) and len(value) <= 32 and all(
        isinstance(k, str) and len(k) <= 64 and (value[k] is None or type(value[k]) in (bool, int, float, str))
        and (not isinstance(value[k], str) or len(value[k]) <= 64) for k in value)


# ------------------------------------------------------------------------------------------------ the table
@dataclass(frozen=True)
class Field:
    """A request header field: when present (required: always; ``when``: only if that field is truthy) its value
    passes ``test``."""

    test: Callable[[Any], bool]
    required: bool = False
    when: str | None = None
    error: str = ""
    """What a refusal says (``{value!r}``: the value sent); empty: the kind's ``error``."""


@dataclass(frozen=True)
class Tensor:
    """A request tensor: one of ``dtypes``, with one dimension per entry of ``dims`` (module docstring)."""

    dtypes: tuple[str, ...]
    dims: tuple[Dim, ...]
    required: bool = True
    error: str = ""
    """What a wrong dtype or shape is told (``{shape}``, ``{dtype}``, ``{dtypes}``, the sizes); empty: the kind's."""
    bounds: str = ""
    """What a size outside the server's limits is told; empty: ``error``."""


@dataclass(frozen=True)
class Kind:
    """One request kind: its header fields, tensors, cross-field rules and reply tensors."""

    doc: str
    fields: dict[str, Field] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)
    replies: dict[str, str | tuple[int, ...]] = field(default_factory=dict)
    """Reply tensor -> its shape: that of the request tensor of this name, or these sizes."""
    rules: tuple[tuple[Callable[[Header], bool], str], ...] = ()
    """(what the header must satisfy, what a refusal says), checked after the fields."""
    error: str = ""
    tensor_error: str = "{kind} carries no tensors"
    """What a request with other tensors than the kind's is told (``{names}``: the ones it declared)."""


_KEY = Field(_key, required=True, error="'key' must be a list of 1 to 4 short strings or integers")
_GENERATION = "'generation' must be an id of 1 to 64 letters, digits, '-' or '_'"
_GENERATION_FORWARD = "a generation forward pass is not training and says whether it 'start's"
_TAGGED = {"tag": Field(_tag, required=True, error="bad checkpoint tag {value!r}")}
_HIDDEN = ("batch", "seq", "hidden")
_CROSSING = WIRE_DTYPES
_ROW_SCALE = Tensor(("float32",), ("batch", "seq"), required=False,
                    error="{name}_scale must be float32 of shape ({batch}, {seq}), one scale per row of {name}; got "
                          "{shape} {dtype}")

COMMON: dict[str, Field] = {
    "seq": Field(lambda v: _int(v) and v >= 1, required=True, error="every request needs a positive integer 'seq'"),
    "ack": Field(_count, error="'ack' must be an integer in 0..seq-1"),
}
"""The fields of every request (checked before the kind's)."""
_COMMON_RULES = ((lambda h: h.get("ack", 0) < h["seq"], "'ack' must be an integer in 0..seq-1"),)

KINDS: dict[str, Kind] = {
    "forward": Kind(
        "run the trunk: training keeps the graph under 'key' for the client's optimizer 'step'; a 'generation' "
        "runs with that generation's KV cache ('start': a new one)",
        fields={"key": _KEY,
                "training": Field(_bool, error="'training' must be true or false"),
                "need_input_grad": Field(_bool, error="'need_input_grad' must be true or false"),
                "step": Field(_int, required=True, when="training",
                              error="a training forward pass carries the client's optimizer step ('step')"),
                "generation": Field(_generation, error=_GENERATION),
                "start": Field(_bool, required=True, when="generation", error=_GENERATION_FORWARD)},
        rules=((lambda h: not ("generation" in h and h.get("training")), _GENERATION_FORWARD),),
        tensors={"hidden_states": Tensor(_CROSSING, _HIDDEN,
                                         error="hidden_states must be (batch, seq, {hidden}) in one of {dtypes}, got "
                                               "{shape} {dtype}",
                                         bounds="batch {batch} x sequence {seq} is outside 1..{max_batch} x "
                                                "1..{max_seq}"),
                 "hidden_states_scale": _ROW_SCALE,
                 "position_ids": Tensor(("int32", "int64"), ((1, "batch"), "seq"),
                                        error="position_ids must be (1 or {batch}, {seq}) integers, got {shape} "
                                              "{dtype}"),
                 "attention_mask": Tensor(("uint8", "bool", "int32", "int64"), ("batch", "seq"), required=False,
                                          error="attention_mask must be ({batch}, {seq}) integers, got {shape} "
                                                "{dtype}")},
        tensor_error="forward carries hidden_states (with hidden_states_scale when int8), position_ids and optionally "
                     "attention_mask, not {names}",
        replies={"hidden_states": "hidden_states", "hidden_states_scale": "hidden_states_scale"}),
    "backward": Kind(
        "back-propagate dL/dy 'grad' through the graph kept under 'key'; the reply's 'grad' is dL/dx (when the "
        "forward pass asked for it)",
        fields={"key": _KEY},
        tensors={"grad": Tensor(_CROSSING, _HIDDEN, error="gradient must be (batch <= {max_batch}, seq <= "
                                                          "{max_seq}, {hidden}) in one of {dtypes}, got {shape} "
                                                          "{dtype}"),
                 "grad_scale": _ROW_SCALE},
        tensor_error=f"backward carries one gradient 'grad' in one of {_CROSSING} (with 'grad_scale' when int8)",
        replies={"grad": "grad", "grad_scale": "grad_scale"}),
    "grad_sq_norm": Kind("the squared norm of the trunk gradients waiting for this client's next step",
                         replies={"sq_norm": ()}),
    "step": Kind(
        "apply optimizer step number 'step', the gradients scaled by 'scale' (clipping); in a federation, whether "
        "this client is a 'participant' of it",
        fields={"participant": Field(_bool, error="'participant' must be true or false"),
                "step": Field(_int, required=True), "scale": Field(_fraction)},
        error="step carries an integer 'step' and a 'scale' in [0, 1] or null"),
    "save": Kind("save the client's trunk adapter as checkpoint 'tag'", fields=_TAGGED),
    "load": Kind("restore the client's trunk adapter from checkpoint 'tag' (a truthy 'force': even while a "
                 "federation trains)", fields=_TAGGED),
    "join": Kind(
        "join the federation as client 'index' holding 'samples' training rows, having made 'step' optimizer steps "
        "(behind the federation's: it rejoins and catches up), with the federation 'settings' it trains with",
        fields={"index": Field(_int, required=True), "samples": Field(_count, required=True),
                "step": Field(_count, error="'step' must be the client's optimizer steps so far (an integer >= 0)"),
                "settings": Field(_settings, error="'settings' must map at most 32 names to short plain values")},
        error="join carries the client's integer 'index' and 'samples'"),
    "keys": Kind(
        "secure aggregation: relay this client's X25519 'public' key and 'weight' to every client",
        fields={"public": Field(_public_key, required=True), "weight": Field(_weight, required=True)},
        error="keys carries a 32-byte hex X25519 'public' key and a 'weight' >= 0"),
    "aggregate": Kind(
        "secure aggregation: add the clients' 'masked' updates of round 'nonce' among 'participants', masked with the "
        "keys of version 'roster' of the public keys",
        fields={"nonce": Field(_int, required=True), "weight": Field(_weight, required=True),
                "participants": Field(_indices, required=True), "roster": Field(_count)},
        error="aggregate carries an integer 'nonce', a 'weight' >= 0, 'participants' and a 'roster' version >= 0",
        tensors={"masked": Tensor(("int64",), (None,))},
        tensor_error="aggregate carries one 1-d int64 tensor 'masked'",
        replies={"sum": "masked"}),
    "catch_up": Kind(
        "a client that rejoined asks for the federation's step, its own data position and the client-side 'state' "
        "to go on from (waits for the next synchronisation point); 'room' is int64 zeros of the state's shape "
        "(FedSGD: weights and AdamW moments, float64 values as their int64 bits, (3, n); FedAvg: the last masked "
        "sum, (1, n))",
        tensors={"room": Tensor(("int64",), ((1, 3), None))},
        tensor_error="catch_up carries one tensor 'room': int64 zeros of shape (3, n) or (1, n)",
        replies={"state": "room"}),
    "share": Kind(
        "FedSGD: a member sends the federation's client-side 'state' at step 'step' (weights and AdamW moments after "
        "'optimizer_steps' steps, float64 values as their int64 bits, (3, n)) for a client that rejoins there; the "
        "server asked for it",
        fields={"step": Field(_count, required=True), "optimizer_steps": Field(_count, required=True)},
        error="share carries the 'step' and the 'optimizer_steps' of the state it holds",
        tensors={"state": Tensor(("int64",), (3, None))},
        tensor_error="share carries one int64 tensor 'state' of shape (3, n)"),
    "end_generation": Kind("free the KV cache of generation 'generation'",
                           fields={"generation": Field(_generation, required=True, error=_GENERATION)}),
}
"""Every request kind the trunk server answers."""


# ------------------------------------------------------------------------------------------------ checks
@dataclass(frozen=True)
class Bounds:
    """What the server's model and limits fix of a request's tensors."""

    hidden: int
    max_batch: int
    max_seq: int


def check_request(header: Header, specs: list[TensorSpec], bounds: Bounds) -> None:
    """Refuse (:class:`ProtocolError`) a request header whose kind, fields or declared tensors are not what
    :data:`KINDS` says, before its payload is read."""
    kind = header["kind"]
    rule = KINDS.get(kind)
    if rule is None:
        raise ProtocolError(f"unknown message kind {kind!r}; expected one of {sorted(KINDS)}")
    _check_fields(header, COMMON, "", _COMMON_RULES)
    _check_tensors(kind, rule, specs, bounds)
    _check_fields(header, rule.fields, rule.error, rule.rules)


def _check_fields(header: Header, fields: dict[str, Field], error: str,
                  rules: tuple[tuple[Callable[[Header], bool], str], ...]) -> None:
    for name, spec in fields.items():
        if spec.when is not None and not header.get(spec.when):
            continue
        if (name in header or spec.required) and not spec.test(header.get(name)):
            raise ProtocolError((spec.error or error).format(value=header.get(name)))
    for holds, message in rules:
        if not holds(header):
            raise ProtocolError(message)


def _check_tensors(kind: str, rule: Kind, specs: list[TensorSpec], bounds: Bounds) -> None:
    given = {s.name: s for s in specs}
    required = {name for name, t in rule.tensors.items() if t.required}
    if not required <= set(given) <= set(rule.tensors):
        raise ProtocolError(rule.tensor_error.format(kind=kind, names=sorted(given)))
    for name, spec in given.items():  # an int8 tensor comes with its per-row scale, and a scale only with one
        if name.endswith(SCALE):
            base = given.get(name[:-len(SCALE)])
            if base is None or base.dtype != "int8":
                raise ProtocolError(f"{name} comes only with an int8 {name[:-len(SCALE)]}")
        elif spec.dtype == "int8" and name + SCALE not in given:
            raise ProtocolError(f"int8 {name} needs its per-row scale {name + SCALE} (float32, one per row)")
    sizes: dict[str, int] = {"hidden": bounds.hidden}
    limits = {"batch": bounds.max_batch, "seq": bounds.max_seq}
    for name, tensor in rule.tensors.items():
        spec = given.get(name)
        if spec is None:
            continue
        told = dict(sizes, kind=kind, names=sorted(given), max_batch=bounds.max_batch, max_seq=bounds.max_seq,
                    dtypes=tensor.dtypes, shape=list(spec.shape), dtype=spec.dtype, name=name.removesuffix(SCALE))
        if spec.dtype not in tensor.dtypes or not _fits(spec.shape, tensor.dims, sizes):
            raise ProtocolError((tensor.error or rule.tensor_error).format(**told))
        new = {d: n for d, n in zip(tensor.dims, spec.shape) if isinstance(d, str) and d not in sizes}
        if any(not 1 <= n <= limits.get(d, 2**31) for d, n in new.items()):
            raise ProtocolError((tensor.bounds or tensor.error or rule.tensor_error).format(**{**told, **new}))
        sizes.update(new)


def _fits(shape: tuple[int, ...], dims: tuple[Dim, ...], sizes: dict[str, int]) -> bool:
    """Whether ``shape`` has the rank and the sizes ``dims`` say (a symbol not yet in ``sizes`` takes any size)."""
    if len(shape) != len(dims):
        return False
    for n, dim in zip(shape, dims):
        if isinstance(dim, tuple):
            if n not in [sizes.get(d) if isinstance(d, str) else d for d in dim]:
                return False
        elif isinstance(dim, int) and n != dim or isinstance(dim, str) and sizes.get(dim, n) != n:
            return False
    return True


def check_reply(kind: str, tensors: Tensors) -> FrameCheck:
    """The check of the reply to a ``kind`` request that carried ``tensors``: a ``reply`` or an ``error``, with at
    most the kind's reply tensors, each of the shape :data:`KINDS` gives it (a server cannot make a client allocate
    or trust junk)."""
    rule = KINDS.get(kind)
    replies = rule.replies if rule is not None else {}
    expected = {name: tuple(tensors[like].shape) if isinstance(like, str) else like
                for name, like in replies.items() if not isinstance(like, str) or like in tensors}

    def check(reply: Header, specs: list[TensorSpec]) -> None:
        if reply["kind"] not in ("reply", "error"):
            raise ProtocolError(f"unexpected {reply['kind']!r} frame from the server")
        shapes = {s.name: s.shape for s in specs}
        if not set(shapes) <= set(expected) or reply["kind"] == "reply" and any(
                shape != expected[name] for name, shape in shapes.items()):
            raise ProtocolError(f"the server replied to {kind} with tensors {shapes}, expected {expected}")

    return check


def reply_limit(tensors: Tensors) -> int:
    """The largest reply payload a request carrying ``tensors`` may get (no reply tensor outgrows them)."""
    return sum(t.nbytes for t in tensors.values()) + 1024 + ST_HEADER_LIMIT


# ------------------------------------------------------------------------------------------------ serving
class FrameLimits(Protocol):
    max_frame_bytes: int
    """Largest payload an authenticated client may send."""


class FrameServer(Protocol):
    """What :func:`serve_frames` asks of the server it serves (a :class:`~splittrain.server.TrunkServer`)."""

    @property
    def limits(self) -> FrameLimits: ...

    def check(self, client: str, header: Header, specs: list[TensorSpec]) -> None: ...

    def handle(self, client: str, kind: str, header: Header, tensors: Tensors,
               session_id: str | None = None) -> tuple[Header, Tensors]: ...

    def end_session(self, client: str, session_id: str | None = None) -> None: ...

    def record(self, client: str, kind: str, received: int, sent: int) -> None: ...


def serve_frames(server: FrameServer, client: str, next_reader: Callable[[], Reader],
                 send: Callable[[list], object], *, session: str | None = None,
                 hello: Callable[[Frame], None] | None = None, fatal_protocol_errors: bool = True,
                 log: logging.Logger | None = None) -> None:
    """Answer ``client``'s requests until it says ``bye`` (or closes between frames): read a frame from
    ``next_reader()``, its header checked by ``server.check`` before the payload is read, have the server handle
    it, ``send`` the encoded reply.

    ``session``: the session id the connection serves; ``hello``: answers a ``hello`` between requests (else a
    hello is an unknown kind). A request the server refuses (:data:`REFUSED`) gets a non-fatal error and serving
    goes on, except a :class:`ProtocolError` when ``fatal_protocol_errors`` (raised, as a bad frame's is). ``log``:
    where refusals are logged.
    """
    own = ("hello", "bye") if hello is not None else ("bye",)

    def check(header: Header, specs: list[TensorSpec]) -> None:
        if header["kind"] in own:
            if specs:
                raise ProtocolError(f"{header['kind']} carries no tensors")
            return
        server.check(client, header, specs)

    while True:
        try:
            frame = read_frame(next_reader(), server.limits.max_frame_bytes, check)
        except PeerClosed:
            return
        if frame.kind == "hello":
            hello(frame)
            continue
        if frame.kind == "bye":
            server.end_session(client, session)
            send(encode("reply", {"seq": frame.header.get("seq")}))
            return
        reply = _answer(server, client, frame, session, fatal_protocol_errors, log)
        send(reply)
        server.record(client, frame.kind, frame.nbytes, frame_bytes(reply))


def _answer(server: FrameServer, client: str, frame: Frame, session: str | None, fatal_protocol_errors: bool,
            log: logging.Logger | None) -> list:
    """The encoded reply to one request: the handler's, or a non-fatal error saying why it refused."""
    seq = frame.header.get("seq")
    fields = {k: v for k, v in frame.header.items() if k not in ("kind", "tensors")}
    try:
        header, tensors = server.handle(client, frame.kind, fields, frame.tensors, session)
    except REFUSED as exc:
        if fatal_protocol_errors and isinstance(exc, ProtocolError):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        if log is not None:
            log.warning("client %r: %s refused: %s", client, frame.kind, message)
        return encode("error", {"error": str(message), "seq": seq, "fatal": False})
    return encode("reply", {**header, "seq": seq}, tensors)
