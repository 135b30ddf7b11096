"""Nested training state (dicts/lists of tensors, numbers, strings) <-> one safetensors file.

Checkpoints of both parties use this instead of pickling: tensors go into the safetensors body, the
structure into a JSON document in the safetensors metadata. Loading never runs code from the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

META_KEY = "splittrain.state"


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"__dict__": {k: _encode(v, f"{path}.{k}", tensors) for k, v in value.items()}}
        return {"__items__": [[_encode(k, path, tensors), _encode(v, f"{path}[{k!r}]", tensors)]
                              for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{path}[{i}]", tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, torch.dtype):
        return {"__dtype__": str(value).removeprefix("torch.")}
    raise TypeError(f"cannot store {type(value).__name__} at {path or 'the top'} without pickling")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    (tag, inner), = value.items()
    if tag == "__tensor__":
        return tensors[inner]
    if tag == "__dict__":
        return {k: _decode(v, tensors) for k, v in inner.items()}
    if tag == "__items__":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in inner}
    if tag == "__tuple__":
        return tuple(_decode(v, tensors) for v in inner)
    if tag == "__float__":
        return float(inner)
    if tag == "__dtype__":
        return getattr(torch, inner)
    raise ValueError(f"unknown entry {tag!r} in a state file")


def save_state(state: Any, path: str | Path) -> Path:
    """Write ``state`` to ``path`` as safetensors (tensors) + JSON metadata (structure)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, "", tensors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temporary name of this process's own: two processes saving the same path must not rename each other's file
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file(tensors, tmp, metadata={"format": "pt", META_KEY: json.dumps(structure)})
    tmp.replace(path)  # never leave a half-written checkpoint under the real name
    return path


def load_state(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """Read a file written by :func:`save_state`.

    Raises :class:`~splittrain.errors.UserError` naming the file when it is missing, is not a splittrain state file,
    or is truncated or corrupt."""
    path = Path(path)
    with _opened(path, device) as f:
        meta = f.metadata() or {}
        structure = _structure(path, meta)
        try:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as error:  # safetensors reports a damaged body as its own error type
            raise _corrupt(path, error) from error
    try:
        return _decode(structure, tensors)
    except (KeyError, ValueError, TypeError) as error:
        raise _corrupt(path, f"its structure does not match its tensors: {error!r}") from error


def check_state(path: str | Path) -> dict[str, Any]:
    """Check that ``path`` is a readable state file without reading its tensors (the header only) and return its
    top-level entries that are not tensors (numbers, strings, ...; e.g. a client checkpoint's
    ``trunk_checkpoint``). Raises :class:`~splittrain.errors.UserError` as :func:`load_state` does."""
    path = Path(path)
    with _opened(path, "cpu") as f:
        meta = f.metadata() or {}
        structure = _structure(path, meta)
        keys = set(f.keys())
    entries = structure.get("__dict__", {}) if isinstance(structure, dict) else {}
    missing = {v["__tensor__"] for v in _tensor_refs(structure)} - keys
    if missing:
        raise _corrupt(path, f"it lacks {len(missing)} of the tensors its structure names")
    return {k: v for k, v in entries.items() if not isinstance(v, (dict, list))}


def _tensor_refs(value: Any) -> Iterator[dict[str, str]]:
    if isinstance(value, list):
        for item in value:
            yield from _tensor_refs(item)
    elif isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            yield value
        else:
            for item in value.values():
                yield from _tensor_refs(item)


@contextmanager
def _opened(path: Path, device: str | torch.device) -> Iterator[Any]:
    from safetensors import safe_open

    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder, not a state file")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        handle = safe_open(str(path), "pt", device=str(device))
    except PermissionError as error:
        raise UserError(f"checkpoint {path} cannot be read: {error.strerror or error}") from error
    except Exception as error:  # SafetensorError: a header that is too short, too long or not JSON
        raise _corrupt(path, error) from error
    with handle as f:
        yield f


def _structure(path: Path, meta: dict[str, str]) -> Any:
    if META_KEY not in meta:
        raise UserError(f"{path} is a safetensors file but not a splittrain state file (no {META_KEY!r} entry in "
                        "its metadata): a checkpoint of `fit` or of the trunk server was expected")
    try:
        return json.loads(meta[META_KEY])
    except json.JSONDecodeError as error:
        raise _corrupt(path, f"its structure is not JSON ({error})") from error


def _corrupt(path: Path, error: Any) -> UserError:
    return UserError(f"checkpoint {path} is truncated or corrupt ({str(error).strip() or type(error).__name__}): "
                     "restore it or pick another checkpoint")
