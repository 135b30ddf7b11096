"""Frozen base weights quantized with bitsandbytes, tensor by tensor as a part loads.

``model.quantization`` (the client's bottom and top) and ``model.trunk.quantization`` (the server's trunk) name a
format: ``int8`` (LLM.int8: per-output-channel absmax scales, outliers above 6.0 computed in 16 bits), ``nf4`` or
``fp4`` (4-bit blocks of 64 weights, each with a float32 absmax; ``nf4`` is QLoRA's normal-float code). What is
quantized is every ``nn.Linear`` inside the decoder layers (the attention and MLP projections, which LoRA adapts
through peft's bitsandbytes layers); the embedding, the norms and the LM head stay in the weight dtype, as
transformers' own ``BitsAndBytesConfig`` loading leaves the head and as the tied Gemma head must (it *is* the
embedding). The quantized numbers are bitsandbytes' own, so a split model over a quantized base computes what
``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` computes.

bitsandbytes was chosen because it is the library peft's LoRA layers, transformers' loader and QLoRA were built on,
and since 0.49 it runs int8 and 4-bit on the CPU as well as on CUDA (torchao's 4-bit LoRA path and hqq's are
CUDA-first or unsupported by peft's export). Quantized weights are frozen: a ``full`` client, which trains its base
weights, cannot use them.

``embedding_quantization: int8`` (the client's own option, beside ``quantization``) stores the token embedding, and an
untied LM head, in int8 too: bitsandbytes' ``Embedding8bit`` layout (int8 rows with a float32 absmax scale per row,
quantized as ``Int8Params`` quantizes), which a tied head shares. At a 152k-256k vocabulary this matrix is most of a
client's weights; in float32 the head's matmul reads all of it every step. The embedding looks up and dequantizes only
the rows it needs (bitsandbytes' own ``Embedding8bit.forward``); the head dequantizes :data:`HEAD_BLOCK` vocabulary
rows at a time (:func:`head_linear`), so no float copy of the matrix is ever whole. The cost in quality is measured
(``benchmarks/quantization_quality.py``); transformers' ``BitsAndBytesConfig`` has no such option, so this is not part
of ``quantization``, whose numbers stay transformers' own.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .errors import UserError

QUANTIZATIONS = {"int8": "8-bit LLM.int8, per-output-channel scales", "nf4": "4-bit normal float, blocks of 64",
                 "fp4": "4-bit float, blocks of 64"}
"""The formats ``model.quantization`` / ``model.trunk.quantization`` accept (null: the weight dtype)."""
BLOCKSIZE = 64
INT8_THRESHOLD = 6.0
"""LLM.int8's outlier threshold, transformers' default (``llm_int8_threshold``)."""
CHUNK_ELEMENTS = 2**16
"""Weights quantized at a time while a part loads (bounds the float copy and the quantizer's temporaries)."""
INSTALL = "pip install 'bitsandbytes>=0.50'"
EMBEDDING_QUANTIZATIONS = {"int8": "8-bit rows with a float32 absmax scale each (bitsandbytes' Embedding8bit)"}
"""The formats ``embedding_quantization`` accepts (null: the weight dtype)."""
HEAD_BLOCK = 8192
"""Vocabulary rows of an int8 head dequantized at a time (8192 x hidden float32: 32 MiB at hidden 1024)."""


def check_name(quantization: str | None) -> str | None:
    """``quantization`` if it is a known format (or None / ``"none"`` -> None); otherwise a one-line error."""
    if quantization in (None, "none"):
        return None
    if quantization not in QUANTIZATIONS:
        raise UserError(f"unknown quantization {quantization!r}; known: {', '.join(QUANTIZATIONS)} (or null for "
                        "none)")
    return quantization


def check_embedding_name(quantization: str | None) -> str | None:
    """``quantization`` if it is a known embedding format (or None / ``"none"`` -> None); otherwise a one-line
    error."""
    if quantization in (None, "none"):
        return None
    if quantization not in EMBEDDING_QUANTIZATIONS:
        raise UserError(f"unknown embedding quantization {quantization!r}; known: "
                        f"{', '.join(EMBEDDING_QUANTIZATIONS)} (or null for none)")
    return quantization


def bitsandbytes() -> Any:
    """The bitsandbytes module, or a one-line error saying what to install."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"quantization needs the bitsandbytes library, which is not installed: {INSTALL}") from None
    # On a float32 or bfloat16 model LLM.int8 casts each matmul's input to float16 and says so on every call
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return bnb


def quantized_linear(linear: nn.Module, quantization: str, compute_dtype: torch.dtype) -> nn.Module:
    """The bitsandbytes layer (on the meta device, weight not yet loaded) that replaces ``linear``."""
    bnb = bitsandbytes()
    if type(linear) is not nn.Linear:
        raise UserError(f"quantization replaces torch.nn.Linear projections; this model's are "
                        f"{type(linear).__name__} (load it without quantization)")
    bias = linear.bias is not None
    with torch.device("meta"):
        if quantization == "int8":
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias, has_fp16_weights=False,
                                        threshold=INT8_THRESHOLD)
        else:
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias, compute_dtype=compute_dtype,
                                      compress_statistics=False, quant_type=quantization, quant_storage=torch.uint8)
            # Its CPU inference path repacks the weights for AVX512-BF16 on the first no-grad forward (validation,
            # generation), after which a training forward computes no gradient for its input: keep one layout.
            layer.support_avx512bf16_for_cpu = False
    layer.requires_grad_(False)
    return layer


def quantize_weight(layer: nn.Module, rows: Callable[[int, int], torch.Tensor], shape: Sequence[int],
                    device: torch.device, dtype: torch.dtype) -> None:
    """Quantize a ``shape`` (out, in) weight into ``layer`` on ``device``, reading it ``rows(start, stop)`` at a
    time in ``dtype``: bitsandbytes quantizes each block of rows (int8 scales are per row, 4-bit absmax per 64
    consecutive weights, so blocks of whole rows and whole 64s give its whole-tensor numbers bit for bit), and
    neither the float weight nor the quantizer's temporaries of more than :data:`CHUNK_ELEMENTS` are ever held."""
    bnb = bitsandbytes()
    out_features, in_features = shape
    if isinstance(layer, (bnb.nn.Linear8bitLt, bnb.nn.Embedding8bit)):
        step = max(1, CHUNK_ELEMENTS // in_features)
        cb = torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        scb = torch.empty(out_features, dtype=torch.float32, device=device)
        for start in range(0, out_features, step):
            stop = min(start + step, out_features)
            # as Int8Params quantizes: row-wise absmax of the float16 weight
            block = rows(start, stop).to(device=device, dtype=torch.float16)
            cb[start:stop], scb[start:stop], _ = bnb.functional.int8_vectorwise_quant(block)
            del block
        layer.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
        return
    old = layer.weight
    unit = old.blocksize // math.gcd(in_features, old.blocksize)  # rows per whole number of blocks
    step = max(unit, CHUNK_ELEMENTS // in_features // unit * unit)
    numel = out_features * in_features
    packed = torch.empty((numel + 1) // 2, 1, dtype=old.quant_storage, device=device)
    absmax = torch.empty(-(-numel // old.blocksize), dtype=torch.float32, device=device)
    code = None
    for start in range(0, out_features, step):
        stop = min(start + step, out_features)
        block = rows(start, stop).to(device=device, dtype=dtype)
        data, state = bnb.functional.quantize_4bit(block, blocksize=old.blocksize, compress_statistics=False,
                                                   quant_type=old.quant_type, quant_storage=old.quant_storage)
        first = start * in_features
        packed[first // 2:first // 2 + data.shape[0]] = data
        absmax[first // old.blocksize:first // old.blocksize + state.absmax.numel()] = state.absmax
        code = state.code
        del block, data
    state = bnb.functional.QuantState(absmax=absmax, shape=torch.Size(shape), code=code, blocksize=old.blocksize,
                                      quant_type=old.quant_type, dtype=dtype)
    layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=old.blocksize,
                                     compress_statistics=False, quant_type=old.quant_type,
                                     quant_storage=old.quant_storage, module=layer, bnb_quantized=True)
    layer.quant_state = state


@functools.cache
def _embedding8bit() -> type:
    """bitsandbytes' ``Embedding8bit`` with a state dict (the int8 rows under ``weight``; bitsandbytes' own refuses
    to save) and the constant scale of an embedding that multiplies by one (Gemma's ``embed_scale``)."""
    bnb = bitsandbytes()

    class Embedding8bit(bnb.nn.Embedding8bit):
        scalar_embed_scale: float | None = None
        """Multiplies the dequantized rows, as transformers' scaled word embeddings multiply theirs (None: 1)."""

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            rows = super().forward(input_ids)
            if self.scalar_embed_scale is None:
                return rows
            return rows * torch.tensor(self.scalar_embed_scale, device=rows.device).to(self.dtype)

        def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
            nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    return Embedding8bit


def quantized_embedding(embedding: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The int8 embedding (on the meta device, weight not yet loaded) that replaces ``embedding``: an
    ``nn.Embedding``, or a transformers scaled word embedding (its ``scalar_embed_scale`` kept)."""
    scale = getattr(embedding, "scalar_embed_scale", None)
    if not isinstance(embedding, nn.Embedding) or (type(embedding) is not nn.Embedding and scale is None):
        raise UserError(f"embedding quantization replaces torch.nn.Embedding token embeddings; this model's is "
                        f"{type(embedding).__name__} (load it without embedding quantization)")
    with torch.device("meta"):
        layer = _embedding8bit()(embedding.num_embeddings, embedding.embedding_dim, dtype=dtype)
    layer.scalar_embed_scale = scale
    layer.requires_grad_(False)
    return layer


def is_int8(weight: torch.Tensor) -> bool:
    """Whether ``weight`` holds int8 rows with a float32 scale per row (``Int8Params`` with its ``SCB``)."""
    return weight.dtype == torch.int8 and getattr(weight, "SCB", None) is not None


def dequantized_blocks(weight: torch.Tensor, dtype: torch.dtype) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, stop, rows)`` of an int8 weight, :data:`HEAD_BLOCK` rows at a time in ``dtype``: ``int8 * (absmax /
    127)`` in float32, as bitsandbytes' ``Embedding8bit`` dequantizes the rows it looks up, into one buffer that each
    block overwrites (use a block before taking the next)."""
    buffer = torch.empty(min(HEAD_BLOCK, len(weight)), weight.shape[1], dtype=torch.float32, device=weight.device)
    for start in range(0, len(weight), HEAD_BLOCK):
        stop = min(start + HEAD_BLOCK, len(weight))
        rows = buffer[:stop - start].copy_(weight.data[start:stop])  # int8 -> float32 in place (a mixed-dtype
        rows.mul_(weight.SCB[start:stop, None] / 127.0)  # multiply would cast the block into a temporary on CPU)
        yield start, stop, rows.to(dtype)


class _Int8Linear(torch.autograd.Function):
    """``linear(hidden, dequantized weight, bias)`` with the frozen int8 weight dequantized a block of rows at a time
    in forward and again in backward (which gives the hidden states' and the bias's gradients)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.has_bias = bias is not None
        flat = hidden.reshape(-1, hidden.shape[-1])
        out = hidden.new_empty(len(flat), len(weight))
        buffer = hidden.new_empty(len(flat) * min(HEAD_BLOCK, len(weight)))  # each block's logits, then copied
        for start, stop, rows in dequantized_blocks(weight, hidden.dtype):
            block = buffer[:len(flat) * (stop - start)].view(len(flat), stop - start)
            if bias is None:
                torch.mm(flat, rows.t(), out=block)
            else:
                torch.addmm(bias[start:stop], flat, rows.t(), out=block)
            out[:, start:stop] = block
        return out.view(*hidden.shape[:-1], len(weight))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        flat = grad.reshape(-1, grad.shape[-1])
        grad_hidden = head_input_grad(flat, weight).view(*grad.shape[:-1], -1) if ctx.needs_input_grad[0] else None
        grad_bias = flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_hidden, None, grad_bias


def head_linear(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(hidden, weight, bias)``; an int8 weight (:func:`is_int8`) in ``hidden``'s dtype, a block of rows at a
    time, so its float copy is never whole."""
    if is_int8(weight):
        return _Int8Linear.apply(hidden, weight, bias)
    return nn.functional.linear(hidden, weight, bias)


def head_input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad @ weight`` for a (rows, vocab) gradient of the logits; an int8 weight a block of rows at a time."""
    if not is_int8(weight):
        return grad @ weight
    out = grad.new_zeros(len(grad), weight.shape[1])
    for start, stop, rows in dequantized_blocks(weight, grad.dtype):
        out.addmm_(grad[:, start:stop], rows)
    return out


def replace_linears(segment: nn.Module, quantization: str, compute_dtype: torch.dtype) -> dict[str, nn.Module]:
    """Swap every ``nn.Linear`` of ``segment``'s decoder layers for its bitsandbytes layer (meta, unloaded);
    returns ``{weight key in segment.state_dict(): new layer}``."""
    replaced: dict[str, nn.Module] = {}
    layers = segment.decoder_layers
    prefix = next(name for name, module in segment.named_modules() if module is layers)
    for name, module in list(layers.named_modules()):
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            new = quantized_linear(module, quantization, compute_dtype)
            layers.set_submodule(name, new)
            replaced[f"{prefix}.{name}.weight"] = new
    return replaced


def probe(quantization: str, device: torch.device, dtype: torch.dtype) -> None:
    """Run one tiny quantized layer forward and backward on ``device``: a format the library cannot run there
    fails here with one clear line, not later inside a kernel."""
    bnb = bitsandbytes()
    if device.type == "meta":
        return
    try:
        layer = quantized_linear(nn.Linear(128, 64, bias=False), quantization, dtype)
        weight = torch.randn(64, 128, dtype=dtype)
        quantize_weight(layer, lambda start, stop: weight[start:stop], weight.shape, device, dtype)
        x = torch.randn(2, 128, dtype=dtype, device=device, requires_grad=True)
        with torch.enable_grad():
            layer(x).sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            raise RuntimeError("the input gradient is missing or not finite")
    except UserError:
        raise
    except Exception as exc:  # whatever the kernel raised: say which format, device and library failed
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"bitsandbytes {bnb.__version__} cannot run {quantization} on {device} with {dtype} "
                        f"({reason}); use another quantization or device") from None


def quantized_bytes(parameters: int, quantization: str | None, rows: int = 0, width: int = 2) -> int:
    """Bytes of ``parameters`` weights (in ``rows`` output channels) stored in ``quantization`` (None: ``width``
    bytes each): int8 adds a float32 scale per row, 4-bit a float32 absmax per block of 64."""
    if quantization is None:
        return parameters * width
    if quantization == "int8":
        return parameters + 4 * rows
    return parameters // 2 + 4 * (parameters // BLOCKSIZE)
