"""Segments: contiguous ranges of a decoder's layers that chain back into the whole model.

A ``Segment`` runs decoder layers ``[start, stop)`` with transformers' own modules, plus the embedding if it
is the first segment and the final norm + LM head if it is the last. Its ``state_dict()`` keys are exactly
the causal-LM checkpoint keys of the tensors it holds (``model.layers.7.mlp.up_proj.weight``), so a
segment's weights are a partial Hugging Face checkpoint and LoRA adapters keep the full model's layer
indices. Segments chain while the masks' ingredients travel with the activations::

    s = bottom(input_ids, attention_mask=mask)   # -> Activations
    s = trunk(s)                                  # -> Activations
    out = top(s)                                  # -> CausalLMOutputWithPast; out.logits
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .families import Family


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
        layers: dict[int, nn.Module],
        rotary_emb: nn.Module,
        embed_tokens: nn.Module | None = None,
        norm: nn.Module | None = None,
        lm_head: nn.Module | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        num_layers = config.num_hidden_layers
        if not 0 <= start < stop <= num_layers:
            raise ValueError(f"segment layers [{start}, {stop}) are outside a {num_layers}-layer model")
        if sorted(layers) != list(range(start, stop)):
            raise ValueError(f"segment [{start}, {stop}) was given layers {sorted(layers)}")
        self.family = family
        self.config = config
        self.start, self.stop = start, stop
        self.name = name or ("bottom" if start == 0 else "top" if stop == num_layers else "trunk")
        self.layer_types = family.layer_types(config)
        self.kinds = {self.layer_types[i] for i in range(start, stop)}
        # Tied heads: the last segment holds the embedding matrix under its checkpoint name and uses it as
        # the head, so in one process the bottom's embedding and the top's head share storage.
        self.tied = self.is_last and lm_head is None

        model = nn.Module()
        if embed_tokens is not None:
            model.embed_tokens = embed_tokens
        model.layers = nn.ModuleDict({str(i): layers[i] for i in range(start, stop)})
        if norm is not None:
            model.norm = norm
        model.rotary_emb = rotary_emb
        self.model = model
        if lm_head is not None:
            self.lm_head = lm_head
        if self.is_first and embed_tokens is None:
            raise ValueError("the first segment needs the embedding")
        if self.is_last and (norm is None or (lm_head is None and embed_tokens is None)):
            raise ValueError("the last segment needs the final norm and a head (lm_head or tied embedding)")

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
        return next(self.parameters()).dtype

    def extra_repr(self) -> str:
        return f"name={self.name!r}, family={self.family.name!r}, layers=[{self.start}, {self.stop})"

    def forward(
        self,
        inputs: torch.Tensor | Activations,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **loss_kwargs: Any,
    ) -> Activations | Any:
        """Run this segment.

        The first segment takes ``input_ids`` (B, T); the others take the previous segment's
        :class:`Activations` (or a bare hidden-state tensor with ``attention_mask``/``position_ids``).
        Returns ``Activations``, or for the last segment a ``CausalLMOutputWithPast`` with ``logits``
        (and ``loss`` when ``labels`` are given, computed by transformers' causal-LM loss).
        """
        device = self.device
        if isinstance(inputs, Activations):
            if self.is_first:
                raise TypeError(f"segment {self.name!r} is the first one: pass input_ids, not Activations")
            hidden, attention_mask, position_ids = inputs.hidden_states, inputs.attention_mask, inputs.position_ids
            hidden = hidden.to(device=device, dtype=self.dtype)
        elif self.is_first:
            if inputs.dtype.is_floating_point:
                raise TypeError(f"segment {self.name!r} is the first one: it takes integer input_ids")
            hidden = self.model.embed_tokens(inputs.to(device))
        else:
            hidden = inputs.to(device=device, dtype=self.dtype)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        if position_ids is None:
            position_ids = torch.arange(hidden.shape[1], device=device).unsqueeze(0)
        position_ids = position_ids.to(device)

        masks = self.family.masks(self.config, hidden, attention_mask, position_ids, self.kinds)
        rotary = self.family.rotary(self.model.rotary_emb, hidden, position_ids, self.kinds)
        for index, layer in self.model.layers.items():
            kind = self.layer_types[int(index)]
            hidden = layer(hidden, attention_mask=masks[kind], position_embeddings=rotary[kind],
                           position_ids=position_ids)
        if not self.is_last:
            return Activations(hidden, attention_mask, position_ids)
        return self._head(hidden, labels, loss_kwargs)

    def _head(self, hidden: torch.Tensor, labels: torch.Tensor | None, loss_kwargs: dict[str, Any]) -> Any:
        from transformers.loss.loss_utils import ForCausalLMLoss
        from transformers.modeling_outputs import CausalLMOutputWithPast

        hidden = self.model.norm(hidden)
        if self.tied:
            logits = nn.functional.linear(hidden, self.model.embed_tokens.weight)
        else:
            logits = self.lm_head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = ForCausalLMLoss(logits, labels.to(logits.device), self.config.vocab_size, **loss_kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def save(self, directory: str | Path) -> Path:
        """Write this segment as a partial checkpoint (safetensors + config + split.json) into ``directory``."""
        from .loading import save_segments

        return save_segments([self], directory)

    @classmethod
    def load(cls, directory: str | Path, **kwargs: Any) -> "Segment":
        """Load a segment written by :meth:`save` (seed-API spelling of :func:`splittrain.load_segment`)."""
        from .loading import load_segment

        return load_segment(directory, **kwargs)
