"""Nested training state (dicts/lists of tensors, numbers, strings) <-> one safetensors file.

Checkpoints of both parties use this instead of pickling: tensors go into the safetensors body, the
structure into a JSON document in the safetensors metadata. Loading never runs code from the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

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
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt", META_KEY: json.dumps(structure)})
    tmp.replace(path)  # never leave a half-written checkpoint under the real name
    return path


def load_state(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """Read a file written by :func:`save_state`."""
    from safetensors import safe_open

    with safe_open(str(path), "pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if META_KEY not in meta:
            raise ValueError(f"{path} is not a splittrain state file")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return _decode(json.loads(meta[META_KEY]), tensors)
