"""Per-family glue: the few things decoder families do differently around their layers.

Every supported family has the shape ``XForCausalLM(model=XModel(embed_tokens, layers, norm, rotary_emb),
lm_head)``. The decoder layers, embeddings (Gemma's sqrt(hidden) scale lives inside its embedding module),
norms and attention are always transformers' own modules; this file only says, per family:

- which attention kind each layer uses (full or sliding window),
- how masks are built from the 2-D attention mask and position ids,
- how rotary (cos, sin) are computed (Gemma-3 has one module called per layer type),
- where text weights can sit in a checkpoint (multimodal Gemma-3 nests them under ``language_model``).

The final-logit soft-cap (Gemma-2/3) is read from ``config.final_logit_softcapping`` for every family.
Adding a llama-shaped family is one ``Family(...)`` entry below.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

FULL = "full_attention"
SLIDING = "sliding_attention"

Masks = dict[str, Any]
RotaryTable = dict[str, tuple[torch.Tensor, torch.Tensor]]


def config_layer_types(config: Any) -> list[str]:
    """Layer kinds from ``config.layer_types``; families without it use full attention everywhere."""
    types = getattr(config, "layer_types", None)
    return list(types) if types else [FULL] * config.num_hidden_layers


def window_layer_types(config: Any) -> list[str]:
    """Mistral-style: one sliding window for every layer when ``config.sliding_window`` is set."""
    kind = SLIDING if getattr(config, "sliding_window", None) else FULL
    return [kind] * config.num_hidden_layers


@functools.cache
def _cache_name(builder: Callable) -> str:
    return "cache" if "cache" in inspect.signature(builder).parameters else "past_key_values"


def _cache_kwarg(builder: Callable, cache: Any) -> dict[str, Any]:
    """The mask builders' cache argument: ``cache`` since transformers 5.24, ``past_key_values`` before."""
    return {_cache_name(builder): cache}


def causal_masks(config: Any, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor, kinds: set[str], past_key_values: Any = None) -> Masks:
    """Full and/or sliding causal masks, built exactly as the family's ``Model.forward`` builds them."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids,
                  **_cache_kwarg(create_causal_mask, past_key_values))
    builders = {FULL: create_causal_mask, SLIDING: create_sliding_window_causal_mask}
    return {kind: builders[kind](**kwargs) for kind in kinds}


def gemma3_masks(config: Any, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor, kinds: set[str], past_key_values: Any = None) -> Masks:
    """Gemma-3 masks, including its optional bidirectional variant (``use_bidirectional_attention``)."""
    if not getattr(config, "use_bidirectional_attention", False):
        return causal_masks(config, hidden, attention_mask, position_ids, kinds, past_key_values)
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.models.gemma3.modeling_gemma3 import _bidirectional_window_overlay

    kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=attention_mask,
                  position_ids=position_ids, **_cache_kwarg(create_causal_mask, past_key_values))
    masks: Masks = {}
    if FULL in kinds:
        masks[FULL] = create_causal_mask(**kwargs, or_mask_function=lambda *args: torch.tensor(True, dtype=torch.bool))
    if SLIDING in kinds:
        overlay = _bidirectional_window_overlay(config.sliding_window)
        masks[SLIDING] = create_sliding_window_causal_mask(**kwargs, or_mask_function=overlay)
    return masks


def shared_rotary(rotary: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, kinds: set[str]) -> RotaryTable:
    """One rotary table for every layer (Llama, Qwen2, Gemma, Gemma-2, Mistral)."""
    table = rotary(hidden, position_ids)
    return {kind: table for kind in kinds}


def per_kind_rotary(rotary: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, kinds: set[str]) -> RotaryTable:
    """Gemma-3: one module, called per layer kind (local theta 1e4, global 1e6)."""
    return {kind: rotary(hidden, position_ids, kind) for kind in kinds}


@dataclass(frozen=True)
class Family:
    """How one decoder family is cut. ``model_types`` are the ``config.model_type`` values it covers."""

    name: str
    model_types: tuple[str, ...]
    layer_types: Callable[[Any], list[str]] = config_layer_types
    masks: Callable[..., Masks] = causal_masks
    rotary: Callable[[nn.Module, torch.Tensor, torch.Tensor, set[str]], RotaryTable] = shared_rotary
    # Prefixes (tried in order) under which a checkpoint may store the text model's weights, and the
    # matching prefix of the LM head. Segments always use the causal-LM names ("model.", "lm_head.").
    checkpoint_prefixes: tuple[tuple[str, str], ...] = (("model.", ""), ("", ""))


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("llama", ("llama",)),
        Family("mistral", ("mistral",), layer_types=window_layer_types),
        Family("qwen2", ("qwen2",)),
        Family("qwen3", ("qwen3",)),
        Family("gemma", ("gemma",)),
        Family("gemma2", ("gemma2",)),
        Family(
            "gemma3",
            ("gemma3_text", "gemma3"),
            masks=gemma3_masks,
            rotary=per_kind_rotary,
            checkpoint_prefixes=(
                ("model.", ""),
                ("model.language_model.", ""),  # Gemma3ForConditionalGeneration saved by transformers 5
                ("language_model.model.", "language_model."),  # original multimodal hub checkpoints
                ("", ""),
            ),
        ),
    )
}


def get_family(name_or_model_type: str) -> Family:
    """The family for a family name or a ``config.model_type``; a clear error listing the supported ones."""
    if name_or_model_type in FAMILIES:
        return FAMILIES[name_or_model_type]
    for family in FAMILIES.values():
        if name_or_model_type in family.model_types:
            return family
    supported = ", ".join(sorted(FAMILIES))
    raise ValueError(
        f"unknown model family {name_or_model_type!r}; supported families: {supported}. "
        "A model with the same shape (model.embed_tokens, model.layers, model.norm, lm_head) can be cut "
        "by naming the closest family, e.g. family='llama'."
    )
