"""The causal-LM loss without full-vocabulary logits: a chunked LM head + cross-entropy.

The plain top computes ``logits = lm_head(norm(h))`` for every position and transformers' ``ForCausalLMLoss``
upcasts them to float32: at a 256k vocabulary and 2 x 1024 tokens the float32 logits, their log-softmax and their
gradient are 2 GiB each, more than the rest of a small client. :func:`chunked_causal_lm_loss` computes the same
loss chunk by chunk of ``chunk`` trained positions (rows of the flattened batch x tokens whose shifted label is not
``ignore_index``; the others add nothing to the loss or the gradients and are skipped), so no float32
rows x vocab tensor is ever larger than ``chunk x vocab``:

- forward, per chunk: logits in the head's compute dtype (the weight's, or autocast's), Gemma-2/3's
  ``final_logit_softcapping`` in that dtype, upcast to float32, the summed cross-entropy of the chunk's labels
  and the argmax hits the token accuracy needs (:class:`~splittrain.metrics.TokenStats`);
- backward, per chunk, when the head's weight (or bias) trains (``client: full``, a tied embedding included): the
  chunk's logits again, then ``dL/dlogits`` and from it ``dL/dhidden`` rows and the weight's gradient, accumulated
  in one buffer of the weight's shape;
- when only the hidden states need a gradient (a frozen head, e.g. ``client: lora``), the forward pass computes
  ``dL/dhidden`` of each chunk while it has the chunk's logits, and the backward pass only scales it by the
  incoming gradient: no logits are recomputed, so it costs the plain path's two head matmuls.

The numbers are transformers' (``ForCausalLMLoss``: labels shifted left with ``ignore_index`` padding, or
``shift_labels`` as given; the mean over non-ignored labels, or the sum over ``num_items_in_batch``), to float
rounding: sums are taken chunk by chunk and the softmax is computed in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .metrics import IGNORE, TokenStats
from .quantize import head_input_grad, head_linear

LOSS_CHUNK = 512
"""Default trained positions per chunk of :class:`~splittrain.modules.ClientModule` (``model.loss_chunk``).

512 rows x a 256k vocabulary is 0.5 GiB per float32 chunk tensor (a quarter of one of the plain path's three
2 GiB tensors at Gemma's 2 x 1024 tokens), while each chunk's head matmul (512 x hidden x vocab) stays large
enough to run at the full speed of a GPU. A segment computes a batch of at most that many positions as the plain
path does (the same numbers to the bit)."""


@dataclass
class CausalLMLoss(CausalLMOutputWithPast):
    """The top's output when the loss was computed chunk by chunk: ``loss`` and ``token_stats`` (the summed
    negative log-likelihood, the argmax hits and the number of trained tokens); ``logits`` is None."""

    token_stats: TokenStats | None = None


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear(hidden, weight)`` computes in here: autocast's when it is on, else the weight's (the hidden
    states' for an int8 weight, which dequantizes into it)."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return weight.dtype if weight.is_floating_point() else hidden.dtype


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 logits of one chunk as the plain head computes them (linear and softcap in the compute dtype, then
    the upcast); also ``tanh`` of the capped logits (for the softcap's backward), or None."""
    logits = head_linear(h, weight, bias)
    tanh = None
    if softcap is not None:
        tanh = logits.div_(softcap).tanh_()
        logits = tanh * softcap
    return logits.float(), tanh


def _softmax_(logits: torch.Tensor, targets: torch.Tensor, stats: bool = True,
              ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Turn float32 ``logits`` into their softmax in place; returns (softmax, the rows' negative log-likelihood of
    ``targets``, the rows' argmax), the last two None unless ``stats``."""
    nll = argmax = None
    if stats:
        argmax = logits.argmax(-1)
        picked = logits.gather(1, targets[:, None]).squeeze(1)
    top = logits.amax(-1, keepdim=True)
    probs = logits.sub_(top).exp_()
    total = probs.sum(-1, keepdim=True)
    if stats:
        nll = total.log().squeeze(1) + top.squeeze(1) - picked
    return probs.div_(total), nll, argmax


def _grad_logits(probs: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor | float, tanh: torch.Tensor | None,
                 softcap: float | None, dtype: torch.dtype) -> torch.Tensor:
    """dL/d(raw logits) of one chunk, in the compute dtype, from its softmax (overwritten): ``(softmax - onehot) *
    scale`` back through the upcast and the softcap (``cap * tanh(z / cap)``), as autograd takes the plain path."""
    grad = probs
    grad[torch.arange(len(targets), device=grad.device), targets] -= 1
    grad = grad.mul_(scale).to(dtype)
    if softcap is not None:
        grad = grad.mul_(softcap).mul_(tanh.mul_(tanh).neg_().add_(1)).div_(softcap)
    return grad


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(softcap(hidden_i @ weight.T + bias), targets_i)`` over rows that all count, chunk by chunk.

    Outputs the float32 sum (differentiable) and the argmax hits (not). See the module docstring for when the
    backward pass recomputes the chunks' logits and when the forward pass already holds ``dL/dhidden``.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int, softcap: float | None, dtype: torch.dtype, grad_mode: bool):
        ctx.chunk, ctx.softcap, ctx.dtype = chunk, softcap, dtype
        need_hidden = grad_mode and ctx.needs_input_grad[0]
        need_head = grad_mode and (ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2]))
        eager = need_hidden and not need_head
        ctx.eager = eager
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype) if weight.is_floating_point() else weight
            b = bias.to(dtype) if bias is not None else None
            nll_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
            correct = torch.zeros((), dtype=torch.long, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if eager else None
            for start in range(0, len(hidden), chunk):
                h, t = hidden[start:start + chunk].to(dtype), targets[start:start + chunk]
                logits, tanh = _chunk_logits(h, w, b, softcap)
                probs, nll, argmax = _softmax_(logits, t)
                nll_sum += nll.sum()
                correct += (argmax == t).sum()
                if eager:
                    grad = _grad_logits(probs, t, 1.0, tanh, softcap, dtype)
                    grad_hidden[start:start + chunk] = head_input_grad(grad, w)
                    del grad
                del logits, tanh, probs
        if eager:
            ctx.save_for_backward(grad_hidden)
        elif need_head or need_hidden:
            ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.mark_non_differentiable(correct)
        return nll_sum, correct

    @staticmethod
    def backward(ctx: Any, grad_sum: torch.Tensor, _grad_correct: Any):
        if ctx.eager:
            (grad_hidden,) = ctx.saved_tensors
            return grad_hidden * grad_sum.to(grad_hidden.dtype), None, None, None, None, None, None, None
        hidden, weight, bias, targets = ctx.saved_tensors
        dtype, softcap, chunk = ctx.dtype, ctx.softcap, ctx.chunk
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_bias = bias is not None and ctx.needs_input_grad[2]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype) if weight.is_floating_point() else weight
            b = bias.to(dtype) if bias is not None else None
            for start in range(0, len(hidden), chunk):
                h, t = hidden[start:start + chunk].to(dtype), targets[start:start + chunk]
                logits, tanh = _chunk_logits(h, w, b, softcap)
                probs, _, _ = _softmax_(logits, t, stats=False)
                grad = _grad_logits(probs, t, grad_sum, tanh, softcap, dtype)
                del logits, probs, tanh
                if want_hidden:
                    grad_hidden[start:start + chunk] = head_input_grad(grad, w)
                if want_weight:
                    if grad_weight.dtype == dtype:
                        grad_weight.addmm_(grad.t(), h)
                    else:
                        grad_weight += (grad.t() @ h).to(grad_weight.dtype)
                if want_bias:
                    grad_bias += grad.sum(0, dtype=torch.float32)
                del grad
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def chunked_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None = None,
                           bias: torch.Tensor | None = None, *, chunk: int = LOSS_CHUNK, softcap: float | None = None,
                           num_items_in_batch: torch.Tensor | int | None = None, ignore_index: int = IGNORE,
                           shift_labels: torch.Tensor | None = None, **_unused: Any,
                           ) -> tuple[torch.Tensor, TokenStats]:
    """transformers' ``ForCausalLMLoss(softcap(linear(hidden, weight, bias)), labels, ...)`` without the logits.

    ``hidden`` (B, T, H): the final norm's output; ``weight`` (V, H): the LM head's (or the tied embedding's);
    ``labels`` (B, T) are shifted left by one (or give ``shift_labels`` already shifted). Returns the loss (float32)
    and the :class:`~splittrain.metrics.TokenStats` of the trained positions.
    """
    if chunk < 1:
        raise ValueError(f"chunk is the number of positions per chunk (>= 1), got {chunk}")
    if shift_labels is None:
        if labels is None:
            raise ValueError("the loss needs labels or shift_labels")
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    rows = hidden.reshape(-1, hidden.shape[-1])
    if len(targets) != len(rows):
        raise ValueError(f"{len(targets)} labels for {len(rows)} positions")
    trained = (targets != ignore_index).nonzero().squeeze(1)
    count = trained.new_tensor(len(trained))
    dtype = _compute_dtype(hidden, weight)
    nll_sum, correct = _LinearCrossEntropy.apply(rows[trained], weight, bias, targets[trained], chunk, softcap, dtype,
                                                 torch.is_grad_enabled())
    if num_items_in_batch is None:
        loss = nll_sum / count
    else:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(nll_sum.device)
        loss = nll_sum / num_items_in_batch
    return loss, TokenStats(nll_sum.detach(), correct, count)
