"""A live trunk server under at least 1,000 malformed frames while a well-behaved client trains against it.

Every malformed frame goes on a new loopback connection: garbage before the handshake (random bytes, truncated
or lying preambles, bad JSON, wrong kinds, bad hello fields), bad proofs and fingerprints during it, and after a
real handshake as client "fuzzer" frames the session must refuse (unknown kinds, wrong dtypes and shapes,
pickle payloads, safetensors headers whose offsets lie, payload sizes that do not fit, truncated payloads).
The server must answer each with an error and close the connection (a truncated frame may just be closed),
never hang or crash, count what it refused, keep its memory bounded, and the good client's losses must equal
an undisturbed run's.

Edge inputs found by earlier fuzzing (5000-digit integers, overflowing floats, non-ASCII proofs, a client's
error frame standing for a hello or an auth, ...) are tried one connection each against a second server: each
must be refused with a real message, not an internal server error.
"""

from __future__ import annotations

import json
import pickle
import re
import secrets
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator

import psutil
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from processes import Processes, make_tokens, read_status, wait_for, write_config
from splittrain.transport import fingerprint
from splittrain.transport.tcp import TLS_HANDSHAKE, SocketReader, _proof
from splittrain.transport.wire import (
    MAGIC,
    MAX_HEADER_BYTES,
    PREAMBLE,
    ST_HEADER_LIMIT,
    VERSION,
    Frame,
    PeerClosed,
    ProtocolError,
    decode,
    encode,
    join,
    read_frame,
    read_preamble,
)

FRAMES = 1000
"""Malformed frames the fuzzer sends at least (one connection each)."""
TIMEOUT = 5.0
"""Seconds any read or write on a fuzzing connection may take before the server counts as hung."""
HIDDEN, MAX_SEQ, MAX_BATCH = 128, 512, 4096  # the quickstart model's hidden size and the server's default limits
AUTH_PAYLOAD_LIMIT = 4 * 2**30  # ServerLimits.max_frame_bytes
KINDS = ("forward", "backward", "grad_sq_norm", "step", "save", "load")
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=-]{0,63}")  # a checkpoint tag the server accepts
RSS_GROWTH_LIMIT = 200 * 2**20
PICKLE_MARKER = f"UNPICKLED-{secrets.token_hex(8)}"


# ================================================================================================ frames
def frame(header: dict[str, Any] | bytes, payload: bytes = b"", *, magic: bytes = MAGIC, version: int = VERSION,
          flags: int = 0, header_len: int | None = None, payload_len: int | None = None) -> bytes:
    """A frame with any preamble fields; ``header`` is a dict (JSON-encoded) or raw bytes."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return PREAMBLE.pack(magic, version, flags, len(body) if header_len is None else header_len,
                         len(payload) if payload_len is None else payload_len) + body + payload


def spec(name: str, dtype: Any, shape: Any) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": shape}


def declared(kind: str, fields: dict[str, Any], specs: list[dict[str, Any]], payload_len: int | None = None) -> bytes:
    """A frame declaring ``specs`` whose header the server refuses; a little of its payload follows (never read)."""
    if payload_len is None:
        payload_len = min(nbytes(specs) + 8 + 160, AUTH_PAYLOAD_LIMIT) if specs else 0
    return frame({**fields, "kind": kind, "tensors": specs}, b"\0" * min(payload_len, 256), payload_len=payload_len)


def nbytes(specs: list[dict[str, Any]]) -> int:
    """The data bytes ``specs`` would need (junk dimensions count as 1, unknown dtypes as 8 bytes)."""
    sizes = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "uint8": 1, "bool": 1}
    total = 0
    for s in specs:
        count = 1
        for d in s["shape"] if isinstance(s["shape"], list) else []:
            count *= d if type(d) is int and d > 0 else 1
        total += count * sizes.get(s["dtype"], 8) if isinstance(s["dtype"], str) else 0
    return total


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
"""A field value that means: leave the field out."""


FUZZER_SESSION = secrets.token_hex(16)
"""The fuzzer's session: each of its connections comes back to it, as a reconnecting client's does (a new session
under a name whose session is alive would be refused: one live session per name)."""


def hello_fields(nonce: bytes, fp: Any, /, **overrides: Any) -> dict[str, Any]:
    """A hello from "fuzzer" (fields overridden, or left out with MISSING)."""
    fields = {"client": "fuzzer", "nonce": nonce.hex(), "session": FUZZER_SESSION, "fingerprint": fp}
    fields.update(overrides)
    return {k: v for k, v in fields.items() if v is not MISSING}


def forward_tensors(batch: int, seq: int, mask: bool = True) -> dict[str, torch.Tensor]:
    """What a client's forward pass carries (fixed values: they do not matter here)."""
    tensors = {"hidden_states": torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(0)),
               "position_ids": torch.arange(seq, dtype=torch.int32)[None]}
    if mask:
        tensors["attention_mask"] = torch.ones(batch, seq, dtype=torch.uint8)
    return tensors


def forward_fields(**changes: Any) -> dict[str, Any]:
    """An inference forward pass: even if one slipped through it would leave nothing on the server."""
    fields = {"seq": 1, "key": ["fuzz", 0], "training": False, "need_input_grad": False}
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not MISSING}


def refused_by_wire(data: bytes) -> bool:
    """The frame format alone (no session checks) refuses ``data``."""
    try:
        decode(data)
    except ProtocolError:
        return True
    except Exception:  # truncated, or an edge input tried on its own: not what this case is about
        return False
    return False


# ================================================================================================ cases
@dataclass(frozen=True)
class Case:
    """One malformed connection: what to send, at which point of the handshake, and what the server must do.

    ``stage``: "raw" sends ``data`` first thing; "hello" sends a hello (with ``hello`` overrides), reads the
    challenge, then ``data`` (or, with ``proper_auth``, the correct proof); "auth" completes a real handshake
    as "fuzzer" first. Our side shuts its writing half after ``data``.
    ``expect``: "refused" (one fatal error frame, then close; ``counter`` goes up), "error" (one non-fatal
    error frame answering seq 1, then close once we shut), "closed" (a truncated frame: closed, an error allowed).
    """

    category: str
    data: bytes
    stage: str = "raw"
    expect: str = "refused"
    counter: str | None = "frames_refused"
    hello: tuple[tuple[str, Any], ...] = ()
    proper_auth: bool = False
    auth_kind: str = "auth"


def refused(category: str, data: bytes, stage: str = "raw", **kwargs: Any) -> Case:
    if stage == "raw" and data[:1] == TLS_HANDSHAKE:  # a connection that opens like TLS is told it is the wrong one
        kwargs.setdefault("counter", "handshakes_refused")
    return Case(category, data, stage, "refused", **kwargs)


ints = st.integers
small = ints(1, 4)
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12)
PLACEHOLDER_FP = {"protocol": VERSION, "family": "qwen2"}
PRE_AUTH_HELLO = frame({**hello_fields(b"\1" * 32, PLACEHOLDER_FP), "kind": "hello", "tensors": []})


@st.composite
def raw_bytes(draw: st.DrawFn, stage: str) -> Case:
    """Random bytes: a bad preamble when there are 20 of them, else a truncated one (as is a valid preamble)."""
    data = draw(st.one_of(st.binary(max_size=PREAMBLE.size - 1), st.binary(min_size=PREAMBLE.size, max_size=120)))
    if len(data) < PREAMBLE.size:
        return Case(f"{stage}:random bytes", data, stage, "closed", None)
    try:
        read_preamble(data[:PREAMBLE.size], 0 if stage == "raw" else AUTH_PAYLOAD_LIMIT)
    except ProtocolError:
        return refused(f"{stage}:random bytes", data, stage)
    return Case(f"{stage}:random bytes", data[:PREAMBLE.size - 1], stage, "closed", None)


@st.composite
def truncated(draw: st.DrawFn, stage: str, data: bytes) -> Case:
    return Case(f"{stage}:truncated frame", data[:draw(ints(0, len(data) - 1))], stage, "closed", None)


@st.composite
def bad_preamble(draw: st.DrawFn) -> Case:
    """A hello whose preamble lies: magic, version, flags, header length, or a payload (2**40 included)."""
    body = PRE_AUTH_HELLO[PREAMBLE.size:]
    field = draw(st.sampled_from(["magic", "version", "flags", "header_len", "payload_len"]))
    kwargs: dict[str, Any] = {}
    if field == "magic":
        kwargs["magic"] = draw(st.binary(min_size=4, max_size=4).filter(lambda m: m != MAGIC))
    elif field == "version":
        kwargs["version"] = draw(ints(0, 2**16 - 1).filter(lambda v: v != VERSION))
    elif field == "flags":
        kwargs["flags"] = draw(ints(1, 2**16 - 1))
    elif field == "header_len":
        kwargs["header_len"] = draw(st.one_of(st.just(0), ints(MAX_HEADER_BYTES + 1, 2**32 - 1)))
    else:
        kwargs["payload_len"] = draw(st.one_of(st.sampled_from([2**40, 2**64 - 1]), ints(1, 2**64 - 1)))
    return refused(f"raw:bad preamble ({field})", frame(body, **kwargs))


BAD_JSON = [b"{", b'{"kind": "hello"', b"\xff\xfe\x00", b'{"kind": NaN}', b'{"kind": "hello", "x": Infinity}',
            b"[1, 2]", b'"hello"', b"null", b"{}", b'{"kind": 5}', b'{"kind": ""}', b'{"kind": "' + b"k" * 65 + b'"}',
            b'{"kind": "hello", "tensors": {}}', b'{"kind": "hello"} trailing', b"[" * 20_000 + b"]" * 20_000,
            b'{"kind": "hello", "tensors": [1]}', b'{"kind": "hello", "tensors": [{"name": "x"}]}']


@st.composite
def bad_header(draw: st.DrawFn, stage: str) -> Case:
    """A header the format refuses: junk, non-finite constants, non-objects, no kind, bad tensor lists."""
    body = draw(st.one_of(st.sampled_from(BAD_JSON), st.binary(min_size=1, max_size=120),
                          st.text(max_size=60).map(str.encode)).filter(lambda b: refused_by_wire(frame(b))))
    return refused(f"{stage}:bad JSON header", frame(body), stage)


@st.composite
def wrong_kind_hello(draw: st.DrawFn) -> Case:
    # "error" is left out: the server takes an error frame in place of a hello (an edge input below).
    kind = draw(st.one_of(st.sampled_from(["auth", "forward", "welcome", "challenge", "bye", "HELLO", "hello "]),
                          st.text(min_size=1, max_size=64)).filter(lambda k: k not in ("hello", "error")))
    return refused("raw:wrong kind instead of hello",
                   frame({**hello_fields(b"\2" * 32, PLACEHOLDER_FP), "kind": kind, "tensors": []}))


@st.composite
def hello_with_tensors(draw: st.DrawFn) -> Case:
    dtype = draw(st.sampled_from(["float32", "uint8", "int64"]))
    specs = [spec(draw(names), dtype, draw(st.lists(ints(0, 8), max_size=3)))]
    return refused("raw:hello with tensors",
                   frame({**hello_fields(b"\3" * 32, PLACEHOLDER_FP), "kind": "hello", "tensors": specs}))


NON_STRINGS = st.one_of(st.none(), ints(), st.booleans(), st.lists(ints(), max_size=2),
                        st.floats(allow_nan=False, allow_infinity=False))


@st.composite
def bad_hello_fields(draw: st.DrawFn) -> Case:
    """A hello with a malformed client name, nonce or session id."""
    field = draw(st.sampled_from(["client", "nonce", "session"]))
    if field == "client":
        value = draw(st.one_of(NON_STRINGS, st.just(MISSING), st.just(""), st.just("c" * 65),
                               st.text(min_size=1, max_size=64).filter(
                                   lambda s: not set(s) <= set("abcdefghijklmnopqrstuvwxyz"
                                                               "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-@"))))
    elif field == "nonce":
        value = draw(st.one_of(NON_STRINGS, st.just(MISSING), st.text(max_size=80).filter(lambda s: len(s) != 64),
                               st.text(min_size=64, max_size=64).filter(lambda s: not _is_hex(s))))
    else:
        value = draw(st.one_of(st.none(), ints(), st.just(MISSING), st.just(""), st.text(min_size=65, max_size=90)))
    fields = hello_fields(b"\4" * 32, PLACEHOLDER_FP, **{field: value})
    return refused(f"raw:bad hello {field}", frame({**fields, "kind": "hello", "tensors": []}))


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


@st.composite
def bad_proof(draw: st.DrawFn) -> Case:
    """After a proper hello: a wrong, missing or mistyped proof (ASCII only: non-ASCII is an edge input below)."""
    proof = draw(st.one_of(st.binary(min_size=32, max_size=32).map(bytes.hex), st.text(alphabet=st.characters(
        max_codepoint=127), max_size=80), NON_STRINGS, st.just(MISSING)))
    fields = {} if proof is MISSING else {"proof": proof}
    return Case("hello:bad proof", frame({**fields, "kind": "auth", "tensors": []}), "hello",
                counter="handshakes_refused")


@st.composite
def impostor(draw: st.DrawFn) -> Case:
    """A hello under another client's name ("good" included) or an unknown one, with a guessed proof."""
    name = draw(st.one_of(st.just("good"), names.filter(lambda n: n not in ("good", "fuzzer"))))
    proof = draw(st.binary(min_size=32, max_size=32)).hex()
    return Case("hello:impostor", frame({"kind": "auth", "proof": proof, "tensors": []}), "hello",
                counter="handshakes_refused", hello=(("client", name),))


@st.composite
def wrong_fingerprint(draw: st.DrawFn) -> Case:
    """The right proof for a client that cut another model, at other layers, or says nothing."""
    change = draw(st.sampled_from([("cuts", [1, 3]), ("hidden_size", 64), ("dtype", "bfloat16"), ("protocol", 2),
                                   ("family", "llama"), ("num_layers", 7), ("config", "0" * 16), ("all", {}),
                                   ("all", MISSING)]))
    return Case(f"hello:wrong fingerprint ({change[0]})", b"", "hello", counter="handshakes_refused",
                hello=(("fingerprint_change", change),), proper_auth=True)


@st.composite
def not_auth(draw: st.DrawFn) -> Case:
    kind = draw(st.one_of(st.sampled_from(["hello", "forward", "welcome", "bye"]), st.text(min_size=1, max_size=64))
                .filter(lambda k: k not in ("auth", "error")))
    how = draw(st.sampled_from(["kind", "tensors", "payload"]))
    if how == "kind":
        data = frame({"kind": kind, "proof": "00" * 32, "tensors": []})
    elif how == "tensors":
        data = frame({"kind": "auth", "proof": "00" * 32, "tensors": [spec("x", "uint8", [4])]})
    else:
        data = frame({"kind": "auth", "proof": "00" * 32, "tensors": []}, b"\0" * 16)
    return refused(f"hello:not an auth frame ({how})", data, "hello")


# ------------------------------------------------------------------------------------------------ after auth
def auth_case(category: str, data: bytes, expect: str = "refused") -> Case:
    return Case(f"auth:{category}", data, "auth", expect, "frames_refused" if expect == "refused" else None)


@st.composite
def unknown_kind(draw: st.DrawFn) -> Case:
    kind = draw(st.one_of(st.sampled_from(["error", "reply", "hello", "auth", "welcome", "FORWARD", "_forward",
                                           "__init__", "forward\0"]), st.text(min_size=1, max_size=64))
                .filter(lambda k: k not in KINDS + ("bye",)))
    return auth_case("unknown kind", declared(kind, {"seq": 1}, []))


@st.composite
def bad_seq(draw: st.DrawFn) -> Case:
    kind = draw(st.sampled_from(KINDS))
    seq = draw(st.one_of(st.just(MISSING), st.none(), ints(max_value=0), st.text(max_size=4), st.booleans(),
                         st.floats(allow_nan=False, allow_infinity=False), st.lists(ints(), max_size=2)))
    fields = {} if seq is MISSING else {"seq": seq}
    return auth_case("bad seq", declared(kind, fields, []))


@st.composite
def forward_bad_hidden(draw: st.DrawFn) -> Case:
    """hidden_states in a non-float dtype, or of the wrong rank, hidden size, batch or length."""
    b, s = draw(small), draw(ints(1, 16))
    how = draw(st.sampled_from(["dtype", "disallowed dtype", "hidden size", "rank", "batch", "length"]))
    dtype, shape = "float32", [b, s, HIDDEN]
    if how == "dtype":
        dtype = draw(st.sampled_from(["int64", "int32", "uint8", "bool"]))
    elif how == "disallowed dtype":
        dtype = draw(st.sampled_from(["float64", "object", "F32", "int8", "complex64"]))
    elif how == "hidden size":
        shape[2] = draw(ints(0, 2**31 - 1).filter(lambda h: h != HIDDEN))
    elif how == "rank":
        shape = draw(st.lists(ints(0, 64), max_size=4).filter(lambda l: len(l) != 3))
    elif how == "batch":
        shape[0] = draw(st.one_of(st.just(0), ints(MAX_BATCH + 1, 2**31 - 1)))
    else:
        shape[1] = draw(st.one_of(st.just(0), ints(MAX_SEQ + 1, 2**31 - 1)))
    specs = [spec("hidden_states", dtype, shape), spec("position_ids", "int32", [1, s])]
    return auth_case(f"forward: hidden_states {how}", declared("forward", forward_fields(), specs))


@st.composite
def forward_bad_inputs(draw: st.DrawFn) -> Case:
    """Positions or mask that disagree with the hidden states, or missing/extra tensors."""
    b, s = draw(ints(2, 4)), draw(ints(2, 16))
    hidden = spec("hidden_states", "float32", [b, s, HIDDEN])
    positions, mask = spec("position_ids", "int32", [1, s]), spec("attention_mask", "uint8", [b, s])
    how = draw(st.sampled_from(["positions dtype", "positions shape", "mask dtype", "mask shape", "no positions",
                                "no hidden_states", "extra tensor"]))
    if how == "positions dtype":
        positions["dtype"] = draw(st.sampled_from(["float32", "bfloat16", "uint8", "bool"]))
    elif how == "positions shape":
        positions["shape"] = draw(st.sampled_from([[s], [1, 1, s], [b + 1, s], [1, s + 1], [1, s - 1], [b, s, 1]]))
    elif how == "mask dtype":
        mask["dtype"] = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    elif how == "mask shape":
        mask["shape"] = draw(st.sampled_from([[b], [1, s], [b, s + 1], [b - 1, s], [b, s, 1], [b * s]]))
    specs = [hidden, positions, mask]
    if how == "no positions":
        specs = [hidden, mask]
    elif how == "no hidden_states":
        specs = [positions, mask]
    elif how == "extra tensor":
        specs.append(spec(draw(st.sampled_from(["labels", "input_ids", "hidden"])), "int64", [b, s]))
    return auth_case(f"forward: {how}", declared("forward", forward_fields(), specs))


BAD_KEYS = st.one_of(st.just(MISSING), st.none(), st.text(max_size=5), ints(), st.just([]),
                     st.lists(ints(0, 9), min_size=5, max_size=6), st.just([[1]]), st.just([1.5]),
                     st.just(["k" * 65]), st.just([2**53]), st.just([{"a": 1}]))


@st.composite
def forward_bad_fields(draw: st.DrawFn) -> Case:
    how = draw(st.sampled_from(["key", "training", "need_input_grad", "step"]))
    if how == "key":
        fields = forward_fields(key=draw(BAD_KEYS))
    elif how in ("training", "need_input_grad"):
        fields = forward_fields(**{how: draw(st.one_of(st.none(), ints(0, 1), st.text(max_size=4)))})
    else:
        fields = forward_fields(training=True, step=draw(st.one_of(st.just(MISSING), st.none(), st.text(max_size=3),
                                                                   st.floats(allow_nan=False), st.just([0]))))
    data = join(encode("forward", fields, forward_tensors(draw(small), draw(ints(1, 8)))))
    return auth_case(f"forward: bad {how}", data)


@st.composite
def backward_bad(draw: st.DrawFn) -> Case:
    b, s = draw(small), draw(ints(1, 8))
    grad = spec("grad", "float32", [b, s, HIDDEN])
    how = draw(st.sampled_from(["dtype", "shape", "extra tensor", "no tensor", "name", "key"]))
    fields: dict[str, Any] = {"seq": 1, "key": ["fuzz", 1]}
    specs = [grad]
    if how == "dtype":
        grad["dtype"] = draw(st.sampled_from(["int64", "int32", "uint8", "bool", "float64"]))
    elif how == "shape":
        grad["shape"] = draw(st.one_of(st.lists(ints(0, 64), max_size=4).filter(lambda l: len(l) != 3),
                                       st.tuples(small, small, ints(0, 2**31 - 1).filter(lambda h: h != HIDDEN))
                                       .map(list)))
    elif how == "extra tensor":
        specs.append(spec("hidden_states", "float32", [b, s, HIDDEN]))
    elif how == "no tensor":
        specs = []
    elif how == "name":
        grad["name"] = draw(st.sampled_from(["grads", "hidden_states", "g"]))
    else:
        fields = {"seq": 1} if (key := draw(BAD_KEYS)) is MISSING else {"seq": 1, "key": key}
    return auth_case(f"backward: bad {how}", declared("backward", fields, specs))


@st.composite
def backward_without_graph(draw: st.DrawFn) -> Case:
    """A well-formed gradient for a forward pass that never happened: an error for that request."""
    key = draw(st.lists(st.one_of(ints(-2**40, 2**40), names), min_size=1, max_size=4))
    grad = torch.randn(draw(small), draw(ints(1, 8)), HIDDEN)
    return auth_case("backward for a key without a graph", join(encode("backward", {"seq": 1, "key": key},
                                                                       {"grad": grad})), expect="error")


@st.composite
def non_finite(draw: st.DrawFn) -> Case:
    """An inference forward pass whose hidden states hold inf or NaN: refused before the trunk sees them."""
    tensors = forward_tensors(draw(small), draw(ints(1, 8)))
    flat = tensors["hidden_states"].view(-1)
    flat[draw(ints(0, flat.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    return auth_case("forward with non-finite hidden states", join(encode("forward", forward_fields(), tensors)),
                     expect="error")


@st.composite
def control_bad(draw: st.DrawFn) -> Case:
    """grad_sq_norm/step/save/load with tensors, a step with a bad number or scale, a checkpoint with a bad tag."""
    how = draw(st.sampled_from(["tensors", "step", "scale", "tag"]))
    if how == "tensors":
        kind = draw(st.sampled_from(["grad_sq_norm", "step", "save", "load"]))
        fields = {"seq": 1, "step": 10**6, "scale": None, "tag": "fuzz"}
        return auth_case(f"{kind} with tensors", declared(kind, fields, [spec("x", "float32", [draw(small)])]))
    if how == "step":
        step = draw(st.one_of(st.just(MISSING), st.none(), st.text(max_size=3), st.floats(allow_nan=False),
                              st.booleans()))
        fields = {"seq": 1, "scale": None} if step is MISSING else {"seq": 1, "step": step, "scale": None}
        return auth_case("step with a bad step number", declared("step", fields, []))
    if how == "scale":  # any step number: the scale alone makes the frame invalid
        scale = draw(st.one_of(st.floats(max_value=-1e-9, allow_infinity=False), st.floats(min_value=1.0001,
                                                                                           allow_infinity=False),
                               st.text(max_size=3), st.lists(st.floats(0, 1), max_size=2), st.just({})))
        return auth_case("step with a bad scale", declared("step", {"seq": 1, "step": draw(ints(0, 100)),
                                                                    "scale": scale}, []))
    tag = draw(st.one_of(st.text(max_size=80).filter(lambda t: not TAG.fullmatch(t)), NON_STRINGS,
                         st.sampled_from(["../latest", "a/b", "", ".x", "-x", "t" * 65])))
    kind = draw(st.sampled_from(["save", "load"]))
    return auth_case(f"{kind} with a bad tag", declared(kind, {"seq": 1, "tag": tag}, []))


class Evil:
    """Unpickling this prints a marker into the server's log: it must never appear there."""

    def __reduce__(self) -> tuple:
        return print, (PICKLE_MARKER,)


@st.composite
def pickle_payload(draw: st.DrawFn) -> Case:
    """Pickles where a safetensors payload belongs: whole, as its header, or as the tensor bytes."""
    obj = draw(st.sampled_from(["evil", "tensor"]))
    blob = pickle.dumps(Evil() if obj == "evil" else torch.zeros(draw(ints(1, 400))))
    grad = spec("grad", "float32", [1, 1, HIDDEN])
    fields = {"seq": 1, "key": ["fuzz", 2]}
    how = draw(st.sampled_from(["whole payload", "safetensors header", "no tensors declared", "tensor bytes"]))
    if how == "whole payload":
        return auth_case("pickle payload", frame({**fields, "kind": "backward", "tensors": [grad]}, blob))
    if how == "safetensors header":
        payload = struct.pack("<Q", len(blob)) + blob + b"\0" * (HIDDEN * 4)
        return auth_case("pickle as the safetensors header",
                         frame({**fields, "kind": "backward", "tensors": [grad]}, payload))
    if how == "no tensors declared":
        return auth_case("pickle payload without tensors", frame({"seq": 1, "kind": "grad_sq_norm"}, blob))
    # Pickle bytes are only numbers to a safetensors reader: a well-formed gradient for no graph.
    data = (blob * (HIDDEN * 4 // len(blob) + 1))[:HIDDEN * 4]
    buffers = encode("backward", fields, {"grad": torch.frombuffer(bytearray(data), dtype=torch.float32)
                                          .reshape(1, 1, HIDDEN)})
    return auth_case("pickle bytes as tensor data", join(buffers), expect="error")


ST_DTYPES = ["F32", "F16", "BF16", "I64", "I32", "U8", "BOOL", "F64", "I8", "object"]


@st.composite
def lying_offsets(draw: st.DrawFn) -> Case:
    """A forward pass whose safetensors header lies about offsets, dtypes, shapes, entries or its length."""
    tensors = forward_tensors(draw(small), draw(ints(1, 8)), mask=draw(st.booleans()))
    buffers = encode("forward", forward_fields(), tensors)
    header, entries = bytes(buffers[1]), json.loads(bytes(buffers[3]))
    data = b"".join(bytes(b) for b in buffers[4:])
    names_ = sorted(entries)
    a, b = draw(st.permutations(names_))[:2]
    how = draw(st.sampled_from(["shift", "overlap", "swap", "out of bounds", "dtype", "shape", "extra entry",
                                "missing entry", "offsets type", "length prefix", "not JSON"]))
    st_len_change = 0
    if how == "shift":
        delta = draw(ints(-4096, 4096).filter(bool))
        entries[a]["data_offsets"] = [o + delta for o in entries[a]["data_offsets"]]
    elif how == "overlap":
        begin = entries[a]["data_offsets"][0]
        size = entries[b]["data_offsets"][1] - entries[b]["data_offsets"][0]
        entries[b]["data_offsets"] = [begin, begin + size]
    elif how == "swap":
        entries[a]["data_offsets"], entries[b]["data_offsets"] = entries[b]["data_offsets"], entries[a]["data_offsets"]
    elif how == "out of bounds":
        entries[a]["data_offsets"][1] = draw(ints(len(data) + 1, 2**64))
    elif how == "dtype":
        entries[a]["dtype"] = draw(st.sampled_from(ST_DTYPES).filter(lambda d: d != entries[a]["dtype"]))
    elif how == "shape":
        entries[a]["shape"] = draw(st.lists(ints(0, 64), max_size=4).filter(lambda s: s != entries[a]["shape"]))
    elif how == "extra entry":
        entries[draw(names.filter(lambda n: n not in entries))] = {"dtype": "U8", "shape": [0],
                                                                   "data_offsets": [len(data), len(data)]}
    elif how == "missing entry":
        del entries[a]
    elif how == "offsets type":
        entries[a]["data_offsets"] = draw(st.sampled_from([[str(o) for o in entries[a]["data_offsets"]],
                                                           [float(o) for o in entries[a]["data_offsets"]],
                                                           entries[a]["data_offsets"][:1], None, {}]))
    elif how == "length prefix":
        st_len_change = draw(ints(-64, 2**20).filter(bool))
    st_header = json.dumps(entries).encode() if how != "not JSON" else draw(st.binary(min_size=1, max_size=200))
    st_header += b" " * (-len(st_header) % 8)
    payload = struct.pack("<Q", max(0, len(st_header) + st_len_change)) + st_header + data
    return auth_case(f"safetensors header lies ({how})", frame(header, payload))


@st.composite
def payload_size_lies(draw: st.DrawFn) -> Case:
    """A well-formed header whose declared payload is too small, too large, or beyond any limit."""
    kind = draw(st.sampled_from(["forward", "backward"]))
    b, s = draw(small), draw(ints(1, 8))
    tensors = forward_tensors(b, s) if kind == "forward" else {"grad": torch.zeros(b, s, HIDDEN)}
    fields = forward_fields() if kind == "forward" else {"seq": 1, "key": ["fuzz", 3]}
    buffers = encode(kind, fields, tensors)
    need = sum(t.nbytes for t in tensors.values())
    size = draw(st.one_of(ints(0, need + 8), ints(need + 9 + ST_HEADER_LIMIT, AUTH_PAYLOAD_LIMIT),
                          ints(AUTH_PAYLOAD_LIMIT + 1, 2**64 - 1), st.just(2**40)))
    body = b"".join(bytes(x) for x in buffers[2:])[:min(size, 4096)]
    return auth_case("declared payload does not fit", frame(bytes(buffers[1]), body, payload_len=size))


@st.composite
def truncated_request(draw: st.DrawFn) -> Case:
    """A valid request cut anywhere (preamble, header or payload); then our side closes."""
    if draw(st.booleans()):
        data = join(encode("forward", forward_fields(), forward_tensors(draw(small), draw(ints(1, 8)))))
    else:
        data = join(encode("backward", {"seq": 1, "key": ["fuzz", 4]}, {"grad": torch.zeros(draw(small), 2, HIDDEN)}))
    return Case("auth:truncated request", data[:draw(ints(0, len(data) - 1))], "auth", "closed", None)


WEIGHTED: list[tuple[st.SearchStrategy[Case], int]] = [
    (raw_bytes("raw"), 2), (truncated("raw", PRE_AUTH_HELLO), 1), (bad_preamble(), 2), (bad_header("raw"), 2),
    (wrong_kind_hello(), 1), (hello_with_tensors(), 1), (bad_hello_fields(), 2),
    (bad_proof(), 2), (impostor(), 1), (wrong_fingerprint(), 1), (not_auth(), 1),
    (truncated("hello", frame({"kind": "auth", "proof": "00" * 32, "tensors": []})), 1),
    (raw_bytes("auth"), 1), (bad_header("auth"), 1), (unknown_kind(), 1), (bad_seq(), 1), (forward_bad_hidden(), 2),
    (forward_bad_inputs(), 2), (forward_bad_fields(), 1), (backward_bad(), 1), (backward_without_graph(), 1),
    (non_finite(), 1), (control_bad(), 2), (pickle_payload(), 3),
    # swapping the offsets of two tensors of the same size tells no lie: such frames are left out
    (lying_offsets().filter(lambda case: refused_by_wire(case.data)), 3), (payload_size_lies(), 2),
    (truncated_request(), 2),
]
CASES = st.sampled_from([s for s, weight in WEIGHTED for _ in range(weight)]).flatmap(lambda s: s)
"""One malformed connection of any kind; hypothesis alone weights them unevenly, hence the repeats."""


# ================================================================================================ the client side
@dataclass
class Target:
    """The server under test and what the fuzzer knows: its token and the trunk's fingerprint."""

    host: str
    port: int
    token: str
    fingerprint: dict[str, Any]
    handshakes: int = 0
    """Handshakes completed so far."""


def read_reply(reader: SocketReader) -> Frame | None:
    """The server's next frame, or None once it closed the connection; a silent server fails the test."""
    try:
        return read_frame(reader, 1 << 16)
    except (PeerClosed, ConnectionResetError):
        return None
    except socket.timeout:
        raise AssertionError(f"the server sent nothing and kept the connection open for {TIMEOUT} s") from None


def send(sock: socket.socket, data: bytes) -> None:
    """Send what the server still takes: it may refuse and close before reading everything."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def hello(sock: socket.socket, reader: SocketReader, target: Target, **overrides: Any) -> tuple[bytes, bytes, str]:
    """Send a hello, read the challenge: (client nonce, server nonce, client name)."""
    nonce = secrets.token_bytes(32)
    fields = hello_fields(nonce, target.fingerprint, **overrides)
    send(sock, join(encode("hello", fields)))
    challenge = read_reply(reader)
    assert challenge is not None and challenge.kind == "challenge", f"no challenge for {fields}: {challenge}"
    return nonce, bytes.fromhex(challenge.header["nonce"]), fields.get("client", "")


def handshake(sock: socket.socket, reader: SocketReader, target: Target) -> dict[str, Any]:
    client_nonce, server_nonce, name = hello(sock, reader, target)
    send(sock, join(encode("auth", {"proof": _proof(target.token, b"client", client_nonce, server_nonce, name)})))
    welcome = read_reply(reader)
    assert welcome is not None and welcome.kind == "welcome", f"handshake refused: {welcome}"
    assert welcome.header["proof"] == _proof(target.token, b"server", client_nonce, server_nonce, name)
    target.handshakes += 1
    return welcome.header


def connect(target: Target) -> tuple[socket.socket, SocketReader]:
    sock = socket.create_connection((target.host, target.port), timeout=TIMEOUT)
    sock.settimeout(TIMEOUT)
    return sock, SocketReader(sock)


def exchange(target: Target, case: Case) -> list[Frame]:
    """Play ``case`` on a new connection; the frames the server sent until it closed."""
    sock, reader = connect(target)
    with sock:
        if case.stage == "hello":
            overrides = dict(case.hello)
            change = overrides.pop("fingerprint_change", None)
            if change is not None:
                key, value = change
                overrides["fingerprint"] = value if key == "all" else {**target.fingerprint, key: value}
            client_nonce, server_nonce, name = hello(sock, reader, target, **overrides)
            data = case.data
            if case.proper_auth:
                proof = _proof(target.token, b"client", client_nonce, server_nonce, name)
                data = join(encode(case.auth_kind, {"proof": proof}))
        else:
            if case.stage == "auth":
                handshake(sock, reader, target)
            data = case.data
        send(sock, data)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        replies = []
        while (reply := read_reply(reader)) is not None:
            replies.append(reply)
            assert len(replies) <= 2, f"the server keeps talking: {[r.header for r in replies]}"
    return replies


def check_outcome(case: Case, replies: list[Frame]) -> None:
    """What the server must have done with ``case``."""
    headers = [r.header for r in replies]
    if case.expect == "refused":
        assert len(replies) == 1 and replies[0].kind == "error" and replies[0].header.get("fatal") is True, \
            f"{case.category}: expected one fatal error frame, then the connection closed; got {headers}"
    elif case.expect == "error":
        assert len(replies) == 1 and replies[0].kind == "error" and replies[0].header.get("seq") == 1 \
            and replies[0].header.get("fatal") is False, \
            f"{case.category}: expected a non-fatal error answering request 1; got {headers}"
    else:
        assert all(r.kind == "error" for r in replies) and len(replies) <= 1, \
            f"{case.category}: a truncated frame may only be answered by an error; got {headers}"


class RssSampler:
    """Samples a process's resident set size in the background; ``peak`` is the largest seen."""

    def __init__(self, pid: int, every: float = 0.01) -> None:
        self.process, self.every, self.peak = psutil.Process(pid), every, 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopping.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.stopping.wait(self.every)

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopping.set()
        self.thread.join()


# ================================================================================================ the tests
def quickstart_fingerprint() -> dict[str, Any]:
    """The fingerprint of the quickstart trunk (cuts 2 and 4, float32), computed as a client does."""
    from transformers import AutoConfig

    from splittrain.quickstart import model_dir

    return fingerprint(AutoConfig.from_pretrained(model_dir()), "qwen2", (2, 4), torch.float32)


@pytest.mark.slow
def test_live_server_survives_malformed_frames_while_a_client_trains(tmp_path, procs: Processes):
    from splittrain.cli import main

    began = time.monotonic()
    fp = quickstart_fingerprint()  # builds the model once, before any process needs it
    tokens_file, tokens = make_tokens(tmp_path, "good", "fuzzer")
    reference_dir, client_dir, server_dir = tmp_path / "reference", tmp_path / "client", tmp_path / "server"
    config = write_config(tmp_path / "config.yaml", client_dir, steps=30, every=10, batch_size=8)

    # The server starts (seconds of imports) while the undisturbed reference trains in this process.
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(procs.serve, config, tokens_file, server_dir, "--session_timeout", "5")
        main(["fit", "--config", str(config), "--trainer.default_root_dir", str(reference_dir)])
        reference_seconds = time.monotonic() - began
        server, address = starting.result(timeout=180)
    reference = json.loads((reference_dir / "summary.json").read_text())["train_losses"]
    host, port = address.rsplit(":", 1)
    target = Target(host, int(port), tokens["fuzzer"], fp)
    assert host == "127.0.0.1"

    client = procs.fit(config, "--model.transport", "tcp", "--model.address", address,
                       "--model.client_name", "good", token=tokens["good"])
    status = wait_for(lambda: (s := read_status(server_dir)) and s["counters"]["forward"] >= 1 and s, 180,
                      "the good client to train", client, client.log)
    counters_before = status["counters"]
    rss_start = psutil.Process(server.pid).memory_info().rss
    setup_seconds = time.monotonic() - began

    # ---- fuzz: one malformed frame per connection, >= FRAMES of them
    sent: Counter[str] = Counter()
    expected: Counter[str] = Counter()

    @settings(max_examples=FRAMES + 50, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(CASES)
    def fuzz(case: Case) -> None:
        check_outcome(case, exchange(target, case))
        sent[case.category] += 1
        if case.expect == "refused":
            expected[case.counter] += 1

    fuzz_began = time.monotonic()
    with RssSampler(server.pid) as sampler:
        while sum(sent.values()) < FRAMES:
            fuzz()
    fuzz_seconds = time.monotonic() - fuzz_began
    forward_after = read_status(server_dir)["counters"]["forward"]
    assert server.poll() is None, "the server died while fuzzed"
    assert forward_after > counters_before["forward"] or client.poll() is None, "the client did not train meanwhile"

    # ---- the good client finished undisturbed
    Processes.finish(client, timeout=240)
    losses = json.loads((client_dir / "summary.json").read_text())["train_losses"]
    assert len(losses) == len(reference) == 30
    worst = max(abs(a - b) for a, b in zip(losses, reference))
    assert worst <= 1e-6, f"the fuzzed client's losses differ from the undisturbed run's by up to {worst}"
    assert PICKLE_MARKER not in server.log.read_text(), "the server unpickled a payload"

    # ---- the server still serves, counted what it refused, and kept its memory
    assert server.poll() is None, "the server died"
    sock, reader = connect(target)
    with sock:
        handshake(sock, reader, target)
        send(sock, join(encode("grad_sq_norm", {"seq": 1})))
        reply = read_reply(reader)
        assert reply is not None and reply.kind == "reply" and reply.header["seq"] == 1, reply
        # The last step cleared the trunk's gradients and no fuzz frame left any behind.
        assert reply.tensors["sq_norm"].shape == () and reply.tensors["sq_norm"].item() == 0.0
    handshakes = counters_before["handshakes"] + target.handshakes
    status = wait_for(lambda: (s := read_status(server_dir)) and s["counters"]["handshakes"] >= handshakes and s,
                      10, "the status to show the last handshake")
    counters = status["counters"]
    refusals = {name: counters[name] - counters_before[name] for name in ("frames_refused", "handshakes_refused")}
    rss_end = psutil.Process(server.pid).memory_info().rss

    print(f"\nreference run {reference_seconds:.1f} s; the good client was training {setup_seconds:.1f} s after "
          "the start")
    print(f"fuzzing: {sum(sent.values())} malformed frames in {fuzz_seconds:.1f} s; the client trained "
          f"{forward_after - counters_before['forward']} forward passes meanwhile")
    for category, count in sorted(sent.items()):
        print(f"  {count:5d}  {category}")
    print(f"refusals expected {dict(expected)}, counted {refusals}")
    print(f"server RSS: {rss_start / 2**20:.0f} MiB when fuzzing began, peak {sampler.peak / 2**20:.0f} MiB while "
          f"fuzzed, {rss_end / 2**20:.0f} MiB at the end")
    print(f"whole test {time.monotonic() - began:.1f} s")

    assert sum(sent.values()) >= FRAMES
    assert refusals["frames_refused"] >= expected["frames_refused"]
    assert refusals["handshakes_refused"] >= expected["handshakes_refused"]
    assert sum(refusals.values()) >= expected["frames_refused"] + expected["handshakes_refused"]
    assert sampler.peak - rss_start < RSS_GROWTH_LIMIT, "the server's memory grew while fuzzed"
    assert rss_end - rss_start < RSS_GROWTH_LIMIT, "the server's memory grew"
    assert status["sessions"].get("fuzzer", {}).get("graphs", 0) == 0


# ------------------------------------------------------------------------------------------------ edge inputs
@pytest.fixture(scope="module")
def lone_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Target, subprocess.Popen]]:
    """A trunk server without a training client, for single hand-made connections."""
    folder = tmp_path_factory.mktemp("lone-server")
    processes = Processes(folder)
    try:
        fp = quickstart_fingerprint()
        tokens_file, tokens = make_tokens(folder, "fuzzer")
        config = write_config(folder / "config.yaml", folder / "client")
        server, address = processes.serve(config, tokens_file, folder / "server")
        host, port = address.rsplit(":", 1)
        yield Target(host, int(port), tokens["fuzzer"], fp), server
    finally:
        processes.close()


HUGE_INT = b"9" * 5000  # beyond Python's 4300-digit limit for int(str)
EDGE_INPUTS: dict[str, tuple[Case, str]] = {
    "5000-digit integer before the handshake": (
        Case("edge", frame(b'{"kind": "hello", "seq": ' + HUGE_INT + b"}")), "^bad frame"),
    "5000-digit integer after the handshake": (
        Case("edge", frame(b'{"kind": "grad_sq_norm", "seq": ' + HUGE_INT + b"}"), "auth"), "^bad frame"),
    "overflowing float after the handshake": (
        Case("edge", frame(b'{"kind": "grad_sq_norm", "seq": 1, "note": 1e400}'), "auth"), "^bad frame"),
    "tensor dtype that is a list": (
        Case("edge", frame({"kind": "forward", "seq": 1, "tensors": [spec("hidden_states", ["float32"], [1, 1, 8])]}),
             "auth"), "^bad frame"),
    "non-ASCII proof": (
        Case("edge", frame({"kind": "auth", "proof": "\u00e9" * 64, "tensors": []}), "hello"), "^authentication failed"),
    "fingerprint that is not an object": (
        Case("edge", b"", "hello", hello=(("fingerprint", "not an object"),), proper_auth=True),
        "serves another split"),
    "error frame instead of a hello": (
        Case("edge", frame({**hello_fields(b"\5" * 32, PLACEHOLDER_FP), "kind": "error", "tensors": []})), "^bad frame"),
    "garbage whose first byte is TLS's handshake byte": (
        refused("edge", TLS_HANDSHAKE + PRE_AUTH_HELLO[1:]), "^this trunk server does not speak TLS"),
    "error frame carrying the right proof instead of an auth": (
        Case("edge", b"", "hello", proper_auth=True, auth_kind="error"), "^bad frame"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EDGE_INPUTS))
def test_edge_input_is_refused_cleanly(lone_server: tuple[Target, subprocess.Popen], name: str):
    """Inputs off the random mix's paths: each is refused like any bad frame (a fatal error saying why, then the
    connection closes), not as an internal server error, and the handshake goes no further."""
    target, server = lone_server
    case, message = EDGE_INPUTS[name]
    replies = exchange(target, case)
    assert server.poll() is None, "the server died"
    headers = [r.header for r in replies]
    assert [r.kind for r in replies] == ["error"], f"expected one error frame, then the close; got {headers}"
    assert replies[0].header["fatal"] is True and re.search(message, replies[0].header["error"]), headers


@pytest.mark.slow
def test_memory_for_a_declared_payload_is_returned(lone_server: tuple[Target, subprocess.Popen]):
    """A session may declare a payload as large as its limits allow and never send it: the server holds memory
    only for bytes that arrive (pages of the receive buffer are touched as data lands), and nothing after the
    connection closes."""
    target, server = lone_server
    process, megabytes = psutil.Process(server.pid), 256
    batch = megabytes * 2**20 // (HIDDEN * 4 * 1024)
    header = frame({"seq": 1, "key": ["fuzz", 5], "kind": "backward",
                    "tensors": [spec("grad", "float32", [batch, 1024, HIDDEN])]},
                   payload_len=batch * 1024 * HIDDEN * 4 + 8 + 128)
    before = process.memory_info().rss
    sock, reader = connect(target)
    with sock:
        handshake(sock, reader, target)
        send(sock, header)
        deadline, held = time.monotonic() + 2.0, 0
        while time.monotonic() < deadline:
            time.sleep(0.05)
            held = max(held, process.memory_info().rss - before)
    wait_for(lambda: process.memory_info().rss - before < 64 * 2**20, 10.0, "the server to free the buffer", server)
    print(f"\n{len(header)} bytes declaring a {megabytes} MiB payload held {held / 2**20:.0f} MiB of the server's "
          f"RSS until the connection closed; {(process.memory_info().rss - before) / 2**20:.0f} MiB after")
    assert held < 32 * 2**20, f"a declared, unsent payload held {held / 2**20:.0f} MiB"
    assert server.poll() is None
