"""How hidden states and their gradients cross the cut in the wire dtype (``model.wire_dtype``).

``float32`` is exact; ``bfloat16`` and ``float16`` are casts (half the bytes). ``int8`` sends each row (one
token's vector) as int8 with a float32 scale per row, ``absmax / 127``, in a tensor of its own named
``<name>_scale`` of shape ``(batch, seq)``: a little over a quarter of float32's bytes. The receiver dequantizes
into float32 and casts to its compute dtype. A sender of int8 *gradients* keeps an :class:`ErrorFeedback`: what
rounding lost from one gradient is added to the next one it sends, so that the sum of what crosses tracks the sum
of the true gradients (error feedback, as in compressed-gradient training) and the training does not drift.

Every transport, the in-process link included, packs and unpacks through these functions, so a wire dtype gives
the same numbers whatever carries it.
"""

from __future__ import annotations

import torch

from .wire import DTYPES, FLOAT_DTYPES

WIRE_DTYPES = (*FLOAT_DTYPES, "int8")
"""The dtypes hidden states and their gradients may cross in (``model.wire_dtype``)."""
SCALE = "_scale"
"""Suffix of an int8 tensor's per-row scale tensor."""
INT8_MAX = 127


def check_wire_dtype(wire: str) -> str:
    if wire not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be one of {', '.join(WIRE_DTYPES)}, got {wire!r}")
    return wire


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (..., hidden) as int8 rows and their float32 scales (absmax / 127; 0 for a row of zeros)."""
    x = x.detach().float()
    scale = x.abs().amax(dim=-1) / INT8_MAX
    q = torch.round(x / scale.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1))
    return q.clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.unsqueeze(-1)


def pack(name: str, x: torch.Tensor, wire: str) -> dict[str, torch.Tensor]:
    """The tensors that carry ``x`` as ``name`` in the wire dtype ``wire``."""
    if wire == "int8":
        q, scale = quantize(x)
        return {name: q, name + SCALE: scale}
    return {name: x.detach().to(DTYPES[wire][0])}


def wire_of(tensors: dict[str, torch.Tensor], name: str) -> str:
    """The wire dtype ``name`` came in (a reply goes back in the same one)."""
    dtype = tensors[name].dtype
    return "int8" if dtype == torch.int8 else next(n for n in FLOAT_DTYPES if DTYPES[n][0] == dtype)


def unpack(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The tensor that crossed as ``name``: dequantized (float32) when it came as int8, else as it came.

    An int8 tensor without its scale, or a scale of another shape, non-finite or negative, raises ValueError (a
    server refuses that one request; the session goes on)."""
    x = tensors[name]
    if x.dtype != torch.int8:
        return x
    scale = tensors.get(name + SCALE)
    if scale is None:
        raise ValueError(f"int8 {name} came without its per-row scale {name + SCALE}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"{name + SCALE} must be float32 of shape {list(x.shape[:-1])} (one scale per row of "
                            f"{name}), got {scale.dtype} {list(scale.shape)}")
    if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
        raise ValueError(f"{name + SCALE} holds non-finite or negative scales: refused so they cannot reach "
                            "the weights")
    return dequantize(x, scale)


class ErrorFeedback:
    """The quantization residual of one sender's int8 gradients (one per client on each side of a cut).

    Each gradient sent gets the residual of the one before added where it is non-zero (a row that is zero, such as
    a padding token's, stays zero: a residual must not create gradient where there is none), over the rows and
    positions both have (batches differ in length); the new residual is what rounding this sum lost.
    """

    def __init__(self) -> None:
        self.residual: torch.Tensor | None = None

    def pack(self, name: str, grad: torch.Tensor, wire: str) -> dict[str, torch.Tensor]:
        """The tensors that carry ``grad`` as ``name`` in ``wire``, with error feedback when it is int8."""
        if wire != "int8":
            return pack(name, grad, wire)
        g = grad.detach().float()
        if self.residual is not None:
            carried = torch.zeros_like(g)
            overlap = tuple(slice(0, min(a, b)) for a, b in zip(self.residual.shape, g.shape))
            carried[overlap] = self.residual.to(g.device)[overlap]
            g = g + carried * (g != 0).any(dim=-1, keepdim=True)
        q, scale = quantize(g)
        self.residual = g - dequantize(q, scale)
        return {name: q, name + SCALE: scale}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.residual is None else {"residual": self.residual.detach().cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.residual = state.get("residual")
