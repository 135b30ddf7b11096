"""The one frame format of every transport that serializes (``tcp``, ``dist``).

A frame is::

    preamble   20 bytes, little-endian: magic b"SPLT", protocol version (u16), flags (u16, zero),
               header length (u32), payload length (u64)
    header     UTF-8 JSON object: ``kind``, the kind's fields, and ``tensors``: [{name, dtype, shape}, ...]
    payload    the tensors as one safetensors document (empty when there are none)

A receiver checks the preamble's lengths against its limits before it allocates anything, parses the header
(bounded JSON), lets the caller check the declared names, dtypes and shapes against the session's model, and
only then reads the payload, whose size must follow from the declared shapes. The safetensors document is
parsed here, strictly: its entries must be the declared tensors and tile the data exactly. Tensors are views
of the received buffer. Nothing is ever unpickled or ``torch.load``-ed.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import torch

MAGIC = b"SPLT"
VERSION = 1
PREAMBLE = struct.Struct("<4sHHIQ")
MAX_HEADER_BYTES = 64 * 1024
"""Largest JSON header a receiver accepts."""
MAX_TENSORS = 8
MAX_DIMS = 4
MAX_NAME = 64
ST_HEADER_LIMIT = 16 * 1024
"""Largest safetensors header inside a payload (a few entries' JSON; padded to 8 bytes)."""

# Wire dtypes: name in a frame header -> (torch dtype, safetensors name). Anything else is refused.
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float32": (torch.float32, "F32"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "float16": (torch.float16, "F16"),
    "int64": (torch.int64, "I64"),
    "int32": (torch.int32, "I32"),
    "uint8": (torch.uint8, "U8"),
    "int8": (torch.int8, "I8"),
    "bool": (torch.bool, "BOOL"),
}
_NAMES = {dtype: name for name, (dtype, _) in DTYPES.items()}
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
"""The floating dtypes hidden states and their gradients may cross in (int8 too, with a scale per row:
:mod:`~splittrain.transport.codec`)."""


class ProtocolError(ValueError):
    """A frame that breaks the format or the session's expectations; the connection is answered and closed."""


class PeerClosed(ConnectionError):
    """The peer closed the connection (cleanly, between frames, or in the middle of one)."""


class Reader(Protocol):
    def read(self, n: int) -> bytes | bytearray | memoryview:
        """Exactly ``n`` bytes, writable for payloads (raise :class:`PeerClosed` or a timeout if they do not come)."""
        ...


@dataclass(frozen=True)
class TensorSpec:
    """A tensor as a frame header declares it."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][0].itemsize


@dataclass
class Frame:
    """A decoded frame: its header (``kind`` and fields) and tensors; ``nbytes`` counts every byte received."""

    header: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    nbytes: int

    @property
    def kind(self) -> str:
        return self.header["kind"]


# ------------------------------------------------------------------------------------------------ encode
def encode(kind: str, fields: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None) -> list:
    """A frame as a list of buffers (preamble, header, payload parts); tensor bytes are not copied."""
    tensors = tensors or {}
    if len(tensors) > MAX_TENSORS:
        raise ProtocolError(f"a frame carries at most {MAX_TENSORS} tensors, got {len(tensors)}")
    specs, parts, entries, offset = [], [], {}, 0
    # Largest elements first keeps every tensor aligned to its element size inside the payload.
    for name, tensor in sorted(tensors.items(), key=lambda kv: -kv[1].element_size()):
        if tensor.dtype not in _NAMES:
            raise ProtocolError(f"tensor {name!r} has dtype {tensor.dtype}, which cannot cross the wire")
        data = tensor.detach().to("cpu").contiguous()
        dtype = _NAMES[data.dtype]
        specs.append({"name": name, "dtype": dtype, "shape": list(data.shape)})
        raw = memoryview(data.reshape(-1).view(torch.uint8).numpy()) if data.numel() else memoryview(b"")
        entries[name] = {"dtype": DTYPES[dtype][1], "shape": list(data.shape),
                         "data_offsets": [offset, offset + raw.nbytes]}
        parts.append(raw)
        offset += raw.nbytes
    payload: list = []
    if tensors:
        st_header = json.dumps(entries, separators=(",", ":")).encode()
        st_header += b" " * (-len(st_header) % 8)
        payload = [struct.pack("<Q", len(st_header)), st_header, *parts]
    header = json.dumps({**(fields or {}), "kind": kind, "tensors": specs}, separators=(",", ":")).encode()
    if len(header) > MAX_HEADER_BYTES:
        raise ProtocolError(f"frame header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in payload)
    return [PREAMBLE.pack(MAGIC, VERSION, 0, len(header), size), header, *payload]


def frame_bytes(buffers: Iterable) -> int:
    return sum(len(b) if isinstance(b, bytes) else b.nbytes for b in buffers)


def join(buffers: Iterable) -> bytes:
    """One contiguous copy of an encoded frame (for transports that need a single buffer)."""
    return b"".join(bytes(b) if not isinstance(b, bytes) else b for b in buffers)


# ------------------------------------------------------------------------------------------------ decode
def read_preamble(data: bytes | bytearray, max_payload: int) -> tuple[int, int]:
    """Check a preamble and return ``(header_len, payload_len)``; limits are checked before any allocation."""
    if len(data) != PREAMBLE.size:
        raise ProtocolError(f"truncated preamble ({len(data)} of {PREAMBLE.size} bytes)")
    magic, version, flags, header_len, payload_len = PREAMBLE.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"not a splittrain frame (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version} is not supported (this side speaks {VERSION})")
    if flags != 0:
        raise ProtocolError(f"unknown frame flags {flags:#x}")
    if not 0 < header_len <= MAX_HEADER_BYTES:
        raise ProtocolError(f"declared header length {header_len} is outside 1..{MAX_HEADER_BYTES}")
    if payload_len > max_payload:
        raise ProtocolError(f"declared payload of {payload_len} bytes exceeds the limit of {max_payload}")
    return header_len, payload_len


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"non-finite number {name} in a frame header")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf
        raise ProtocolError(f"number {text[:20]} overflows in a frame header")
    return value


def _json(data: bytes | bytearray | memoryview, what: str) -> Any:
    try:
        return json.loads(bytes(data).decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as exc:  # also int() beyond Python's digit limit
        raise ProtocolError(f"{what} is not valid JSON: {str(exc)[:200]}") from None


def parse_header(data: bytes | bytearray) -> tuple[dict[str, Any], list[TensorSpec]]:
    """Parse and shape-check a JSON header: a ``kind`` string and a well-formed ``tensors`` list."""
    header = _json(data, "frame header")
    if not isinstance(header, dict):
        raise ProtocolError("frame header must be a JSON object")
    kind = header.get("kind")
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_NAME:
        raise ProtocolError("frame header has no valid 'kind'")
    raw = header.get("tensors", [])
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise ProtocolError(f"'tensors' must be a list of at most {MAX_TENSORS} entries")
    specs, names = [], set()
    for entry in raw:
        if not isinstance(entry, dict) or set(entry) != {"name", "dtype", "shape"}:
            raise ProtocolError("each tensor entry must be {name, dtype, shape}")
        name, dtype, shape = entry["name"], entry["dtype"], entry["shape"]
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or name in names or name == "__metadata__":
            raise ProtocolError(f"bad or repeated tensor name {name!r}")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ProtocolError(f"tensor {name!r}: dtype {dtype!r} is not allowed (allowed: {', '.join(DTYPES)})")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(type(d) is int and 0 <= d < 2**31 for d in shape)):
            raise ProtocolError(f"tensor {name!r}: shape {shape!r} must be at most {MAX_DIMS} non-negative ints")
        names.add(name)
        specs.append(TensorSpec(name, dtype, tuple(shape)))
    return header, specs


def check_payload_size(specs: list[TensorSpec], payload_len: int) -> int:
    """The data bytes the specs need; the payload's declared size must fit them (before it is read)."""
    data = sum(spec.nbytes for spec in specs)
    if not specs:
        if payload_len:
            raise ProtocolError(f"a frame without tensors declares a {payload_len}-byte payload")
        return 0
    if not data + 8 < payload_len <= data + 8 + ST_HEADER_LIMIT:
        raise ProtocolError(f"declared payload of {payload_len} bytes does not fit its tensors' {data} bytes")
    return data


def payload_parts(specs: list[TensorSpec], payload_len: int) -> list[int]:
    """Sizes of the buffers :func:`encode` makes of a payload: the safetensors length and header, then each
    non-empty tensor in the header's order."""
    data = [spec.nbytes for spec in specs if spec.nbytes]
    return [payload_len - sum(data), *data]


def parse_payload(payload: bytearray | memoryview, specs: list[TensorSpec]) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors payload that must hold exactly ``specs`` and tile its data exactly."""
    if not specs:
        return {}
    (st_len,) = struct.unpack_from("<Q", payload, 0)
    data_len = sum(spec.nbytes for spec in specs)
    if st_len != len(payload) - 8 - data_len:
        raise ProtocolError(f"safetensors header length {st_len} does not match the payload")
    entries = _json(payload[8:8 + st_len], "safetensors header")
    if not isinstance(entries, dict):
        raise ProtocolError("safetensors header must be a JSON object")
    entries.pop("__metadata__", None)
    if set(entries) != {spec.name for spec in specs}:
        raise ProtocolError(f"payload holds {sorted(entries)[:MAX_TENSORS]}, the header declared "
                            f"{sorted(s.name for s in specs)}")
    base, spans, tensors = 8 + st_len, [], {}
    for spec in specs:
        entry = entries[spec.name]
        dtype, st_dtype = DTYPES[spec.dtype]
        if (not isinstance(entry, dict) or entry.get("dtype") != st_dtype or entry.get("shape") != list(spec.shape)
                or not isinstance(entry.get("data_offsets"), list) or len(entry["data_offsets"]) != 2
                or not all(type(o) is int for o in entry["data_offsets"])):
            raise ProtocolError(f"payload entry for {spec.name!r} does not match its declaration")
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end <= data_len or end - begin != spec.nbytes:
            raise ProtocolError(f"payload offsets of {spec.name!r} are out of bounds or the wrong size")
        spans.append((begin, end))
        if spec.nbytes == 0:
            tensors[spec.name] = torch.empty(spec.shape, dtype=dtype)
        elif (base + begin) % dtype.itemsize:
            raw = torch.frombuffer(payload, dtype=torch.uint8, count=end - begin, offset=base + begin).clone()
            tensors[spec.name] = raw.view(dtype).reshape(spec.shape)
        else:
            count = math.prod(spec.shape)
            tensors[spec.name] = torch.frombuffer(payload, dtype=dtype, count=count, offset=base + begin).reshape(
                spec.shape)
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise ProtocolError("payload tensors overlap or leave gaps")
        position = end
    if position != data_len:
        raise ProtocolError("payload tensors do not cover the data")
    return tensors


def read_frame(reader: Reader, max_payload: int,
               check: Callable[[dict[str, Any], list[TensorSpec]], None] | None = None) -> Frame:
    """Read one frame: preamble, header, ``check(header, specs)`` (may raise), then the payload."""
    header_len, payload_len = read_preamble(reader.read(PREAMBLE.size), max_payload)
    header, specs = parse_header(reader.read(header_len))
    if check is not None:
        check(header, specs)
    check_payload_size(specs, payload_len)
    read_payload = getattr(reader, "read_payload", None)
    if not payload_len:
        payload = bytearray()
    elif read_payload is not None:  # a transport of messages rather than a stream (dist)
        payload = read_payload(payload_len, payload_parts(specs, payload_len))
    else:
        payload = reader.read(payload_len)
    if isinstance(payload, bytes):
        payload = bytearray(payload)
    tensors = parse_payload(payload, specs)
    return Frame(header, tensors, PREAMBLE.size + header_len + payload_len)


def decode(data: bytes | bytearray, max_payload: int = 2**40,
           check: Callable[[dict[str, Any], list[TensorSpec]], None] | None = None) -> Frame:
    """Decode one whole frame held in memory (tests, tools); trailing bytes are an error."""
    reader = BufferReader(data)
    frame = read_frame(reader, max_payload, check)
    if reader.position != len(data):
        raise ProtocolError(f"{len(data) - reader.position} bytes follow the frame")
    return frame


class BufferReader:
    """A :class:`Reader` over bytes already received."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data, self.position = memoryview(data), 0

    def read(self, n: int) -> bytes:
        if self.position + n > len(self.data):
            raise PeerClosed(f"frame truncated: wanted {n} bytes, {len(self.data) - self.position} left")
        chunk = bytes(self.data[self.position:self.position + n])
        self.position += n
        return chunk
