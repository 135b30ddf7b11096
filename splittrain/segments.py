"""Segments: contiguous ranges of a decoder's layers that chain back into the whole model.

A ``Segment`` runs decoder layers ``[start, stop)`` with transformers' own modules, plus the embedding if it
is the first segment and the final norm + LM head if it is the last. Its ``state_dict()`` keys are exactly
the causal-LM checkpoint keys of the tensors it holds (``model.layers.7.mlp.up_proj.weight``,
``transformer.h.7.mlp.c_fc.weight``), so a segment's weights are a partial Hugging Face checkpoint and LoRA
adapters keep the full model's module names and layer indices. Segments chain while the masks' ingredients
travel with the activations::

    s = bottom(input_ids, attention_mask=mask)   # -> Activations
    s = trunk(s)                                  # -> Activations
    out = top(s)                                  # -> CausalLMOutputWithPast; out.logits

:func:`save_segments` (and :meth:`Segment.save`) write segments into a folder a party loads alone
(:func:`splittrain.load_segment`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .families import Family

SPLIT_FILE = "split.json"
"""A saved segment folder's record of the split: family, number of layers, each part's layer range."""
TRIM_LOGITS_BYTES = 32 * 2**20
"""A CPU top gives the heap's free pages back around its chunked loss when a chunk's float32 logits are at least this
large (glibc's largest mmap threshold): then they are the step's largest tensor and would stack on the freed
activations; below it the trim costs more time than it saves memory (a heap walk and the pages faulted in again:
~0.15 s a step on the quickstart, whose chunks are 4 MiB)."""


M_ARENA_MAX = -8
"""glibc's ``mallopt`` parameter for the most heaps (arenas) its threads spread over."""


@functools.cache
def _glibc(name: str) -> Any:
    """glibc's function ``name`` (``malloc_trim``, ``mallopt``), or None where the C library has none (macOS,
    Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def limit_heap_arenas(count: int) -> bool:
    """Let the threads started from now on share at most ``count`` glibc heaps (``mallopt(M_ARENA_MAX)``), unless
    the environment sets ``MALLOC_ARENA_MAX`` itself; True when the limit was set.

    By default glibc gives each busy thread a heap of its own, up to 8 per core, and a heap keeps what its thread
    freed for that thread's next allocations of the same sizes: a trunk server runs each client's requests in the
    client's connection thread, so its free bytes grew with every client that came and went (the soak:
    ``benchmarks/soak.py``, 16 clients rejoining, ran 12% lower with 2 heaps, as fast)."""
    mallopt = _glibc("mallopt")
    if mallopt is None or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    return bool(mallopt(M_ARENA_MAX, count))


def release_freed_memory() -> None:
    """Give the heap pages freed since the last call back to the kernel (glibc only; a no-op elsewhere).

    glibc keeps freed pages for the next allocation of another shape (it returns only the top of its heap), so without
    this the resident peak grows with work whose live tensors do not: simulated clients run one after another
    (``benchmarks/federated_memory.py``), tensors quantized one after another while a part loads, and a chunk's logits
    (a CPU top's largest tensor, :meth:`Segment._head`, :data:`TRIM_LOGITS_BYTES`) on top of the freed activations of
    the layers before them."""
    trim = _glibc("malloc_trim")
    if trim is not None:
        trim(0)


@dataclass
class Activations:
    """What crosses a cut: hidden states (B, T, H) plus the 2-D attention mask and position ids.

    Each segment rebuilds its own masks and rotary tables from ``attention_mask`` and ``position_ids``,
    so neither 4-D masks nor (cos, sin) ever travel.
    """

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor


class Segment(nn.Module):
    """Decoder layers ``[start, stop)`` of a ``num_layers``-layer model, with embedding/head at the ends.

    Build segments with :func:`splittrain.split_model` (selective loading) or :func:`splittrain.load_segment`.
    """

    def __init__(
        self,
        family: Family,
        config: Any,
        start: int,
        stop: int,
        layers: Mapping[int, nn.Module],
        modules: Mapping[str, nn.Module],
        lm_head: nn.Module | None = None,
        name: str | None = None,
    ) -> None:
        """``layers`` by index; ``modules``: the text model's other modules this segment holds, under their names
        there (the family's input modules in the first segment, its final norm and any tied embedding in the
        last, its shared modules in every one)."""
        super().__init__()
        num_layers = config.num_hidden_layers
        if not 0 <= start < stop <= num_layers:
            raise ValueError(f"segment layers [{start}, {stop}) are outside a {num_layers}-layer model")
        if sorted(layers) != list(range(start, stop)):
            raise ValueError(f"segment [{start}, {stop}) was given layers {sorted(layers)}")
        self.family = family
        self.config = config
        self._mode: bool | None = None
        """The mode the last ``train``/``eval`` set (:meth:`switch_mode`); None before the first."""
        self.start, self.stop = start, stop
        self.name = name or ("bottom" if start == 0 else "top" if stop == num_layers else "trunk")
        self.layer_types = family.layer_types(config)
        self.kinds = {self.layer_types[i] for i in range(start, stop)}
        self.first_layer_of_kind = {kind: next(i for i in range(start, stop) if self.layer_types[i] == kind)
                                    for kind in self.kinds}
        """Per attention kind, this segment's first layer of it (KV-cache masks are sized against it)."""
        # Tied heads: the last segment holds the embedding matrix under its checkpoint name and uses it as
        # the head, so in one process the bottom's embedding and the top's head share storage.
        self.tied = self.is_last and lm_head is None
        needed = list(family.shared_modules)
        if self.is_first:
            needed += family.input_modules
        if self.is_last:
            needed += [family.norm, family.embedding] if self.tied else [family.norm]
        missing = [m for m in needed if m not in modules]
        if missing:
            raise ValueError(f"segment {self.name!r} lacks the text model's {missing}: the first segment needs the "
                             "embedding, the last one the final norm and a head (lm_head or the tied embedding)")

        text = nn.Module()
        for key, module in modules.items():
            text.add_module(key, module)
        text.add_module(family.layers, nn.ModuleDict({str(i): layers[i] for i in range(start, stop)}))
        self.add_module(family.stack, text)
        if lm_head is not None:
            self.lm_head = lm_head
        self.loss_chunk = 0
        """Positions per chunk of the last segment's loss when it is given labels (see :mod:`splittrain.loss`): the
        output of a batch of more positions then has the ``loss`` and its ``token_stats`` but no ``logits``; 0
        computes whole logits."""

    @property
    def text_model(self) -> nn.Module:
        """The segment's part of the text model (``self.model``; ``self.transformer`` for GPT-2)."""
        return getattr(self, self.family.stack)

    @property
    def decoder_layers(self) -> nn.ModuleDict:
        """This segment's decoder layers, keyed by their index in the whole model."""
        return getattr(self.text_model, self.family.layers)

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.stop == self.config.num_hidden_layers

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the first floating-point tensor (quantized weights are integers)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether the decoder layers recompute their activations in the backward pass instead of keeping them."""
        return any(getattr(layer, "gradient_checkpointing", False) for layer in self.decoder_layers.values())

    def train(self, mode: bool = True) -> "Segment":
        super().train(mode)
        self._mode = mode
        return self

    def switch_mode(self, training: bool) -> None:
        """``train(training)`` unless the segment's last ``train``/``eval`` set that mode already: ``train`` walks
        every submodule, 1.7 ms per decode step on a 100M-parameter trunk with LoRA. Modules added or switched since
        (peft makes its LoRA layers in training mode) are brought to the segment's mode by ``train(self.training)``,
        as :func:`~splittrain.lora.add_lora` does."""
        if self._mode is not training:
            self.train(training)

    def set_gradient_checkpointing(self, enable: bool = True) -> "Segment":
        """Activation checkpointing of every decoder layer, through transformers' own mechanism (its
        ``GradientCheckpointingLayer``) with torch's non-reentrant ``checkpoint``: in training each layer keeps only
        its input and runs again in the backward pass (dropout masks included, from the saved RNG state), so the
        gradients are the same and the layer's inner activations are never all kept at once."""
        from functools import partial

        from torch.utils.checkpoint import checkpoint

        layers = list(self.decoder_layers.values())
        if not all(hasattr(layer, "gradient_checkpointing") for layer in layers):
            raise ValueError(f"{type(layers[0]).__name__} layers do not support transformers' gradient checkpointing")
        for layer in layers:
            layer.gradient_checkpointing = enable
            layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
        return self

    def extra_repr(self) -> str:
        return f"name={self.name!r}, family={self.family.name!r}, layers=[{self.start}, {self.stop})"

    def forward(
        self,
        inputs: torch.Tensor | Activations,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: Any = None,
        logits_to_keep: int = 0,
        **loss_kwargs: Any,
    ) -> Activations | Any:
        """Run this segment.

        The first segment takes ``input_ids`` (B, T); the others take the previous segment's
        :class:`Activations` (or a bare hidden-state tensor with ``attention_mask``/``position_ids``).
        Returns ``Activations``, or for the last segment a ``CausalLMOutputWithPast`` with ``logits``
        (and ``loss`` when ``labels`` are given, computed by transformers' causal-LM loss). With labels and
        more than ``loss_chunk`` (> 0) positions the last segment computes the same loss chunk by chunk and returns
        a :class:`~splittrain.loss.CausalLMLoss` (``loss``, ``token_stats``; ``logits`` None).

        For generation, ``cache`` is a transformers KV cache (``DynamicCache(config=segment.config)``) that
        this segment's layers fill and read, and ``attention_mask`` then covers the cached positions too;
        ``logits_to_keep`` > 0 computes the head only for the last that many positions.
        """
        device = self.device
        if isinstance(inputs, Activations):
            if self.is_first:
                raise TypeError(f"segment {self.name!r} is the first one: pass input_ids, not Activations")
            inputs, attention_mask, position_ids = inputs.hidden_states, inputs.attention_mask, inputs.position_ids
        elif self.is_first and inputs.dtype.is_floating_point:
            raise TypeError(f"segment {self.name!r} is the first one: it takes integer input_ids")
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        if position_ids is None:
            position_ids = torch.arange(inputs.shape[1], device=device).unsqueeze(0)
        position_ids = position_ids.to(device)
        if self.is_first:
            hidden = self.family.embed(self.text_model, inputs.to(device), position_ids)
        else:
            hidden = inputs.to(device=device, dtype=self.dtype)

        masks = self.family.masks(self.config, hidden, attention_mask, position_ids, self.kinds, cache,
                                  self.first_layer_of_kind)
        extra = self.family.layer_inputs(self.text_model, hidden, position_ids, self.kinds)
        cached = {} if cache is None else {"cache": cache, "use_cache": True}
        for index, layer in self.decoder_layers.items():
            kind = self.layer_types[int(index)]
            hidden = layer(hidden, attention_mask=masks[kind], position_ids=position_ids, **extra[kind], **cached)
        if not self.is_last:
            return Activations(hidden, attention_mask, position_ids)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        return self._head(hidden, labels, loss_kwargs)

    def head_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's weight (V, H) and bias (or None): ``lm_head``'s, or the embedding matrix when tied."""
        if self.tied:
            return getattr(self.text_model, self.family.embedding).weight, None
        return self.lm_head.weight, getattr(self.lm_head, "bias", None)

    def _head(self, hidden: torch.Tensor, labels: torch.Tensor | None, loss_kwargs: dict[str, Any]) -> Any:
        from transformers.loss.loss_utils import ForCausalLMLoss
        from transformers.modeling_outputs import CausalLMOutputWithPast

        hidden = getattr(self.text_model, self.family.norm)(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        # A batch of at most loss_chunk positions is one chunk: the plain path computes it (the same numbers to the
        # bit, and no tensor larger than a chunk's).
        chunked = 0 < self.loss_chunk < hidden.shape[:-1].numel()
        weight, bias = self.head_weight()
        int8 = not weight.is_floating_point()  # an int8 head (embedding_quantization) dequantizes block by block
        if labels is not None and chunked and (self.tied or int8 or type(self.lm_head) is nn.Linear):
            from .loss import CausalLMLoss, chunked_causal_lm_loss

            rows = min(self.loss_chunk, hidden.shape[:-1].numel())
            trim = hidden.device.type == "cpu" and rows * len(weight) * 4 >= TRIM_LOGITS_BYTES
            if trim:  # the heap pages the layers freed go back before a chunk's logits (the step's largest tensor)
                release_freed_memory()
            loss, stats = chunked_causal_lm_loss(hidden, weight, labels.to(hidden.device), bias,
                                                 chunk=self.loss_chunk, softcap=cap, **loss_kwargs)
            if trim:  # and those of the chunks' logits before the backward pass
                release_freed_memory()
            return CausalLMLoss(loss=loss, logits=None, token_stats=stats)
        if int8:
            from .quantize import head_linear

            logits = head_linear(hidden, weight, bias)
        elif self.tied:
            logits = nn.functional.linear(hidden, weight)
        else:
            logits = self.lm_head(hidden)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = ForCausalLMLoss(logits, labels.to(logits.device), self.config.vocab_size, **loss_kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def save(self, directory: str | Path) -> Path:
        """Write this segment as a partial checkpoint (safetensors + config + split.json) into ``directory``."""
        return save_segments([self], directory)


def save_segments(segments: Sequence[Segment], directory: str | os.PathLike,
                  max_shard_size: int | str = "5GB") -> Path:
    """Write segments of one model into ``directory`` as a partial checkpoint a party can load alone.

    The folder holds ``config.json`` (the model's transformers config), ``model.safetensors`` (or shards
    plus an index) with the segments' tensors under their checkpoint names, and ``split.json`` (family,
    number of layers, each part's layer range).
    """
    from huggingface_hub import save_torch_state_dict

    if not segments:
        raise ValueError("nothing to save")
    first = segments[0]
    if any(s.config.to_dict() != first.config.to_dict() for s in segments[1:]):
        raise ValueError("segments to save together must come from the same model")
    if any(getattr(s, "is_loaded_in_8bit", False) or getattr(s, "is_loaded_in_4bit", False)
           or not all(p.is_floating_point() for p in s.parameters()) for s in segments):
        raise ValueError("these segments hold quantized weights: save them from the unquantized checkpoint and "
                         "quantize when each party loads its folder (load_segments(..., quantization=...))")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    for segment in segments:
        for key, tensor in segment.state_dict().items():
            state.setdefault(key, tensor)
    save_torch_state_dict(state, directory, max_shard_size=max_shard_size, metadata={"format": "pt"})
    first.config.save_pretrained(directory)
    meta = {
        "family": first.family.name,
        "num_layers": first.config.num_hidden_layers,
        "parts": {s.name: [s.start, s.stop] for s in sorted(segments, key=lambda s: s.start)},
    }
    (directory / SPLIT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory
