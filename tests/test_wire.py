"""The wire frame format: round trips for every wire dtype, and a strict, allocation-free refusal of bad frames.

Frames are built by hand where a test needs to lie (``raw_frame`` / ``st_payload``), so every check of
:mod:`splittrain.transport.wire` is reached on its own; no test unpickles anything.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as safetensors_load

from splittrain.transport import wire
from splittrain.transport.wire import (
    DTYPES,
    MAGIC,
    MAX_HEADER_BYTES,
    PREAMBLE,
    ST_HEADER_LIMIT,
    VERSION,
    BufferReader,
    PeerClosed,
    ProtocolError,
    TensorSpec,
    decode,
    encode,
    join,
    read_frame,
)


# ------------------------------------------------------------------------------------------------ helpers
def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` with varied values (extremes included for integers)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    values = torch.randint(-1000 if info.min < 0 else 0, 1000, shape, generator=g).to(dtype)
    if values.numel() >= 2:
        values.view(-1)[:2] = torch.tensor([info.min, info.max], dtype=dtype)
    return values


def raw_frame(header: dict[str, Any] | bytes, payload: bytes = b"", *, magic: bytes = MAGIC, version: int = VERSION,
              flags: int = 0, header_len: int | None = None, payload_len: int | None = None) -> bytes:
    """A frame with any preamble fields; ``header`` is a dict (JSON-encoded) or raw bytes."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return PREAMBLE.pack(magic, version, flags, len(body) if header_len is None else header_len,
                         len(payload) if payload_len is None else payload_len) + body + payload


def st_payload(entries: dict[str, Any] | bytes, data: bytes, st_len: int | None = None) -> bytes:
    """A safetensors document: 8-byte header length, JSON header (any content), tensor bytes."""
    body = entries if isinstance(entries, bytes) else json.dumps(entries).encode()
    return struct.pack("<Q", len(body) if st_len is None else st_len) + body + data


def spec(name: str, dtype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": shape}


# Two float32 tensors of 8 bytes each: "a" (2,) at [0, 8), "b" (2,) at [8, 16).
TWO = [spec("a", "float32", [2]), spec("b", "float32", [2])]
TWO_DATA = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


def two_entries(**changes: Any) -> dict[str, Any]:
    entries = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    for name, entry in changes.items():
        if entry is None:
            del entries[name]
        else:
            entries[name] = entry
    return entries


def two_frame(entries: dict[str, Any] | bytes, data: bytes = TWO_DATA, **kwargs: Any) -> bytes:
    return raw_frame({"kind": "x", "tensors": TWO}, st_payload(entries, data, **kwargs))


class RecordingReader:
    """A reader over bytes that records every size it was asked for."""

    def __init__(self, data: bytes) -> None:
        self.inner, self.requests = BufferReader(data), []

    def read(self, n: int) -> bytes:
        self.requests.append(n)
        return self.inner.read(n)


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("name", list(DTYPES))
def test_round_trip_every_dtype(name):
    dtype = DTYPES[name][0]
    tensor = sample(dtype, (3, 5))
    data = join(encode("forward", {"seq": 7, "key": ["a", 1]}, {"t": tensor}))
    frame = decode(data)
    assert frame.kind == "forward" and frame.header["seq"] == 7 and frame.header["key"] == ["a", 1]
    assert frame.header["tensors"] == [{"name": "t", "dtype": name, "shape": [3, 5]}]
    assert frame.nbytes == len(data)
    out = frame.tensors["t"]
    assert out.dtype == dtype and out.shape == (3, 5) and torch.equal(out, tensor)


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Eight tensors: a 0-d scalar, empty ones, odd byte sizes and every dtype."""
    return {
        "scalar": torch.tensor(3.5),
        "empty_rows": torch.zeros(0, 4, dtype=torch.int64),
        "empty_bool": torch.zeros(0, dtype=torch.bool),
        "bf16": sample(torch.bfloat16, (2, 3, 4, 5)),
        "f16": sample(torch.float16, (3,)),
        "i32": sample(torch.int32, (1, 1, 1, 1)),
        "u8": sample(torch.uint8, (7,)),
        "mask": sample(torch.bool, (2, 5)),
    }


def test_round_trip_zero_d_empty_and_several_tensors():
    tensors = mixed_tensors()
    frame = decode(join(encode("reply", {"seq": 1}, tensors)))
    assert set(frame.tensors) == set(tensors)
    for name, tensor in tensors.items():
        out = frame.tensors[name]
        assert out.dtype == tensor.dtype and out.shape == tensor.shape and torch.equal(out, tensor), name


class MessageReader:
    """A message transport's reader (as dist's): each read must take exactly one message the sender sent."""

    def __init__(self, buffers: list) -> None:
        messages = [bytes(b) for b in buffers[:2]] + [b"".join(bytes(b) for b in buffers[2:4])]
        self.messages = messages + [bytes(b) for b in buffers[4:] if len(b)]

    def read(self, n: int) -> bytearray:
        return self.read_payload(n, [n])

    def read_payload(self, n: int, parts: list[int]) -> bytearray:
        out = bytearray()
        for size in parts:
            message = self.messages.pop(0)
            assert len(message) == size, f"read {size} bytes of a {len(message)}-byte message"
            out += message
        assert len(out) == n
        return out


def test_a_payload_read_as_messages_follows_the_senders_buffers():
    """Each tensor leaves as a message of its own (dist): the reader sizes them from the header alone."""
    tensors = mixed_tensors()
    reader = MessageReader(encode("reply", {"seq": 1}, tensors))
    frame = read_frame(reader, 2**30)
    assert not reader.messages
    assert all(torch.equal(frame.tensors[name], tensor) for name, tensor in tensors.items())


def test_frame_without_tensors_has_no_payload():
    data = join(encode("grad_sq_norm", {"seq": 3}))
    _, _, _, header_len, payload_len = PREAMBLE.unpack(data[:PREAMBLE.size])
    assert payload_len == 0 and len(data) == PREAMBLE.size + header_len
    frame = decode(data)
    assert frame.header == {"seq": 3, "kind": "grad_sq_norm", "tensors": []} and frame.tensors == {}


def test_non_contiguous_tensor_round_trips():
    tensor = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()
    assert torch.equal(decode(join(encode("x", None, {"t": tensor}))).tensors["t"], tensor)


def test_payload_is_a_safetensors_document():
    tensors = mixed_tensors()
    data = join(encode("reply", {"seq": 1}, tensors))
    header_len = PREAMBLE.unpack(data[:PREAMBLE.size])[3]
    loaded = safetensors_load(data[PREAMBLE.size + header_len:])
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_unaligned_tensor_data_is_copied_out_correctly():
    """A peer that does not pad its safetensors header still decodes to the right values."""
    values = torch.tensor([1.5, -2.25, 3.0], dtype=torch.float32)
    entries = json.dumps({"v": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}).encode()
    assert (8 + len(entries)) % 4  # the data starts unaligned
    data = raw_frame({"kind": "x", "tensors": [spec("v", "float32", [3])]},
                     st_payload(entries, values.numpy().tobytes()))
    assert torch.equal(decode(data).tensors["v"], values)


def test_safetensors_metadata_entry_is_ignored():
    entries = {"__metadata__": {"format": "pt"}, **two_entries()}
    frame = decode(two_frame(entries))
    assert frame.tensors["b"].tolist() == [3.0, 4.0]


def test_encode_refuses_what_cannot_cross():
    with pytest.raises(ProtocolError, match="cannot cross the wire"):
        encode("x", None, {"t": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(ProtocolError, match="at most 8 tensors"):
        encode("x", None, {f"t{i}": torch.zeros(1) for i in range(9)})
    with pytest.raises(ProtocolError, match="exceeds"):
        encode("x", {"blob": "x" * MAX_HEADER_BYTES})


# ------------------------------------------------------------------------------------------------ refusals
GOOD = join(encode("x", {"seq": 1}, {"a": torch.ones(2), "b": torch.zeros(2)}))
PICKLE = pickle.dumps(torch.zeros(2))
BIG_PICKLE = pickle.dumps(torch.zeros(64))  # big enough that its size fits a 16-byte declaration's payload

BAD_FRAMES: dict[str, tuple[bytes, str]] = {
    # preamble
    "wrong magic": (b"SPLX" + GOOD[4:], "not a splittrain frame"),
    "http request": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a splittrain frame"),
    "pickle as the frame": (PICKLE, "not a splittrain frame"),
    "wrong version": (raw_frame({"kind": "x"}, version=2), "protocol version 2"),
    "version zero": (raw_frame({"kind": "x"}, version=0), "protocol version 0"),
    "nonzero flags": (raw_frame({"kind": "x"}, flags=1), "unknown frame flags"),
    "header length 0": (raw_frame(b"", header_len=0), "declared header length 0"),
    "header length over the limit": (raw_frame({"kind": "x"}, header_len=MAX_HEADER_BYTES + 1),
                                     "declared header length"),
    "header length 2**32-1": (raw_frame({"kind": "x"}, header_len=2**32 - 1), "declared header length"),
    # header JSON
    "bad JSON": (raw_frame(b'{"kind": "x",'), "not valid JSON"),
    "not UTF-8": (raw_frame(b'{"kind": "\xff\xfe"}'), "not valid JSON"),
    "deeply nested JSON": (raw_frame(b"[" * 30_000 + b"]" * 30_000), "not valid JSON"),
    "NaN constant": (raw_frame(b'{"kind": "x", "v": NaN}'), "non-finite number NaN"),
    "overflowing number": (raw_frame(b'{"kind": "x", "scale": 1e400}'), "1e400"),
    "Infinity constant": (raw_frame(b'{"kind": "x", "v": [-Infinity]}'), "non-finite number -Infinity"),
    "JSON list": (raw_frame(b'["kind", "x"]'), "must be a JSON object"),
    "JSON string": (raw_frame(b'"kind"'), "must be a JSON object"),
    "JSON number": (raw_frame(b"7"), "must be a JSON object"),
    "missing kind": (raw_frame({"tensors": []}), "no valid 'kind'"),
    "kind not a string": (raw_frame({"kind": 5}), "no valid 'kind'"),
    "empty kind": (raw_frame({"kind": ""}), "no valid 'kind'"),
    "kind too long": (raw_frame({"kind": "k" * 65}), "no valid 'kind'"),
    # tensor declarations
    "tensors not a list": (raw_frame({"kind": "x", "tensors": {"a": 1}}), "'tensors' must be a list"),
    "too many tensors": (raw_frame({"kind": "x", "tensors": [spec(f"t{i}", "uint8", [1]) for i in range(9)]}),
                         "'tensors' must be a list"),
    "entry not an object": (raw_frame({"kind": "x", "tensors": [["a", "float32", [2]]]}), "each tensor entry"),
    "entry with an extra key": (raw_frame({"kind": "x", "tensors": [{**spec("a", "float32", [2]), "offset": 0}]}),
                                "each tensor entry"),
    "entry missing its shape": (raw_frame({"kind": "x", "tensors": [{"name": "a", "dtype": "float32"}]}),
                                "each tensor entry"),
    "dtype float64": (raw_frame({"kind": "x", "tensors": [spec("a", "float64", [2])]}), "'float64' is not allowed"),
    "dtype object": (raw_frame({"kind": "x", "tensors": [spec("a", "object", [2])]}), "'object' is not allowed"),
    "safetensors dtype name": (raw_frame({"kind": "x", "tensors": [spec("a", "F32", [2])]}), "'F32' is not allowed"),
    "dtype not a string": (raw_frame({"kind": "x", "tensors": [spec("a", 32, [2])]}), "32 is not allowed"),
    "dtype a list": (raw_frame({"kind": "x", "tensors": [spec("a", ["float32"], [2])]}), "is not allowed"),
    "dtype an object": (raw_frame({"kind": "x", "tensors": [spec("a", {"float32": 1}, [2])]}), "is not allowed"),
    "negative dimension": (raw_frame({"kind": "x", "tensors": [spec("a", "float32", [-1])]}), "non-negative ints"),
    "too many dimensions": (raw_frame({"kind": "x", "tensors": [spec("a", "float32", [1] * 5)]}), "at most 4"),
    "float dimension": (raw_frame({"kind": "x", "tensors": [spec("a", "float32", [2.0])]}), "non-negative ints"),
    "string dimension": (raw_frame({"kind": "x", "tensors": [spec("a", "float32", ["2"])]}), "non-negative ints"),
    "bool dimension": (raw_frame({"kind": "x", "tensors": [spec("a", "float32", [True])]}), "non-negative ints"),
    "huge dimension": (raw_frame({"kind": "x", "tensors": [spec("a", "float32", [2**31])]}), "non-negative ints"),
    "shape not a list": (raw_frame({"kind": "x", "tensors": [spec("a", "float32", 2)]}), "non-negative ints"),
    "duplicate names": (raw_frame({"kind": "x", "tensors": [spec("a", "float32", [2])] * 2}), "repeated tensor name"),
    "metadata as a name": (raw_frame({"kind": "x", "tensors": [spec("__metadata__", "float32", [2])]}),
                           "bad or repeated tensor name"),
    "empty name": (raw_frame({"kind": "x", "tensors": [spec("", "float32", [2])]}), "bad or repeated tensor name"),
    "name not a string": (raw_frame({"kind": "x", "tensors": [spec(3, "float32", [2])]}), "bad or repeated"),
    # payload size against the declared shapes (checked before the payload is read)
    "payload without tensors": (raw_frame({"kind": "x"}, b"\0" * 5), "without tensors declares a 5-byte payload"),
    "payload too small": (raw_frame({"kind": "x", "tensors": TWO}, b"\0" * 24), "does not fit"),
    "payload only the tensor bytes": (raw_frame({"kind": "x", "tensors": TWO}, TWO_DATA), "does not fit"),
    "payload too large": (raw_frame({"kind": "x", "tensors": TWO}, b"\0" * (24 + ST_HEADER_LIMIT + 1)),
                          "does not fit"),
    "pickle payload without tensors": (raw_frame({"kind": "x"}, PICKLE), "without tensors declares"),
    "pickle payload for one tensor": (raw_frame({"kind": "x", "tensors": [spec("a", "float32", [2])]}, BIG_PICKLE),
                                      "safetensors header length"),
    "pickle as the safetensors header": (raw_frame({"kind": "x", "tensors": TWO},
                                                   st_payload(BIG_PICKLE, TWO_DATA)), "not valid JSON"),
    # the safetensors document against the frame header
    "safetensors length lies": (two_frame(two_entries(), st_len=10), "safetensors header length 10"),
    "safetensors header not JSON": (two_frame(b"{not json}  "), "not valid JSON"),
    "safetensors header NaN": (two_frame(b'{"a": NaN}'), "non-finite"),
    "safetensors header a list": (two_frame(b"[1, 2, 3]"), "must be a JSON object"),
    "offsets overlap": (two_frame(two_entries(b={"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})),
                        "overlap or leave gaps"),
    "offsets leave a gap": (two_frame(two_entries(a={"dtype": "F32", "shape": [2], "data_offsets": [4, 12]})),
                            "overlap or leave gaps"),
    "offsets out of bounds": (two_frame(two_entries(b={"dtype": "F32", "shape": [2], "data_offsets": [12, 20]})),
                              "out of bounds"),
    "offsets negative": (two_frame(two_entries(a={"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]})),
                         "out of bounds"),
    "offsets span the wrong size": (two_frame(two_entries(a={"dtype": "F32", "shape": [2], "data_offsets": [0, 4]})),
                                    "wrong size"),
    "offsets reversed": (two_frame(two_entries(a={"dtype": "F32", "shape": [2], "data_offsets": [8, 0]})),
                         "out of bounds"),
    "offsets not ints": (two_frame(two_entries(a={"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]})),
                         "does not match its declaration"),
    "three offsets": (two_frame(two_entries(a={"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]})),
                      "does not match its declaration"),
    "wrong dtype in the payload": (two_frame(two_entries(a={"dtype": "I32", "shape": [2], "data_offsets": [0, 8]})),
                                   "does not match its declaration"),
    "wrong shape in the payload": (two_frame(two_entries(a={"dtype": "F32", "shape": [1, 2],
                                                            "data_offsets": [0, 8]})),
                                   "does not match its declaration"),
    "payload entry not an object": (two_frame(two_entries(a=[0, 8])), "does not match its declaration"),
    "extra payload entry": (two_frame(two_entries(c={"dtype": "F32", "shape": [0], "data_offsets": [16, 16]})),
                            "payload holds"),
    "missing payload entry": (two_frame(two_entries(b=None)), "payload holds"),
    "renamed payload entry": (two_frame({"a": two_entries()["a"], "c": two_entries()["b"]}), "payload holds"),
    # after the frame
    "trailing bytes": (GOOD + b"\0", "1 bytes follow the frame"),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_bad_frame_is_refused(name):
    data, message = BAD_FRAMES[name]
    with pytest.raises(ProtocolError, match=re.escape(message)):
        decode(data)


def test_every_truncation_is_peer_closed():
    """A frame cut anywhere is "the peer closed mid-frame", never a frame nor another error."""
    for cut in range(len(GOOD)):
        with pytest.raises(PeerClosed):
            decode(GOOD[:cut])


def test_oversized_payload_is_refused_from_the_preamble_alone():
    """The limit is checked before anything past the preamble is read: nothing of 2**40 bytes is requested."""
    reader = RecordingReader(raw_frame({"kind": "x", "tensors": TWO}, payload_len=2**40))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        read_frame(reader, max_payload=4 * 2**30)
    assert reader.requests == [PREAMBLE.size]


def test_payload_that_does_not_fit_its_shapes_is_never_read():
    header = {"kind": "x", "tensors": [spec("h", "float32", [4096, 4096])]}
    data = raw_frame(header, payload_len=2**30)  # under the limit, but not what 64 MiB of floats need
    reader = RecordingReader(data)
    with pytest.raises(ProtocolError, match="does not fit"):
        read_frame(reader, max_payload=2**31)
    assert reader.requests == [PREAMBLE.size, len(data) - PREAMBLE.size]


def test_check_runs_before_the_payload_is_read():
    seen: list[tuple[str, list[TensorSpec]]] = []

    def check(header: dict[str, Any], specs: list[TensorSpec]) -> None:
        seen.append((header["kind"], specs))
        raise ProtocolError("refused by the session")

    reader = RecordingReader(GOOD)
    with pytest.raises(ProtocolError, match="refused by the session"):
        read_frame(reader, max_payload=1 << 20, check=check)
    assert seen == [("x", [TensorSpec("a", "float32", (2,)), TensorSpec("b", "float32", (2,))])]
    assert len(reader.requests) == 2  # preamble and header only


def test_nothing_is_unpickled(monkeypatch):
    """Decoding valid and invalid frames never calls pickle or torch.load."""
    calls: list[str] = []

    def forbidden(name: str):
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} called while decoding a frame")
        return call

    for module, attr in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load"),
                         (torch.serialization, "load")):
        monkeypatch.setattr(module, attr, forbidden(f"{module.__name__}.{attr}"))
    for name in DTYPES:
        decode(join(encode("x", None, {"t": sample(DTYPES[name][0], (2, 3))})))
    decode(join(encode("x", None, mixed_tensors())))
    for data, _ in BAD_FRAMES.values():
        with pytest.raises(ProtocolError):
            decode(data)
    assert calls == []


# ------------------------------------------------------------------------------------------------ edge inputs
def test_huge_integer_in_header_is_a_protocol_error():
    with pytest.raises(ProtocolError):
        decode(raw_frame(b'{"kind": "x", "seq": ' + b"9" * 5000 + b"}"))


# ------------------------------------------------------------------------------------------------ property
@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_frames_decode_or_are_refused(data):
    """Any byte-level mutation of a valid frame decodes, is refused (ProtocolError) or reads as truncated."""
    frame = bytearray(GOOD)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        at = data.draw(st.integers(0, len(frame) - 1), label="at")
        how = data.draw(st.sampled_from(["flip", "set", "cut", "insert"]), label="how")
        if how == "flip":
            frame[at] ^= 1 << data.draw(st.integers(0, 7))
        elif how == "set":
            frame[at] = data.draw(st.integers(0, 255))
        elif how == "cut":
            del frame[at:at + data.draw(st.integers(1, 16))]
        else:
            frame[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        if not frame:
            break
    try:
        decoded = decode(bytes(frame))
    except (ProtocolError, PeerClosed):
        return
    for tensor in decoded.tensors.values():  # what decodes is well-formed
        assert tensor.dtype in {d for d, _ in DTYPES.values()} and tensor.dim() <= wire.MAX_DIMS
