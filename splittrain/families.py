"""Per-family glue: the few things decoder families do differently around their layers.

Llama-shaped families are ``XForCausalLM(model=XModel(embed_tokens, layers, norm, rotary_emb), lm_head)``;
GPT-2 is ``GPT2LMHeadModel(transformer=GPT2Model(wte, wpe, drop, h, ln_f), lm_head)`` with a tied head,
learned absolute positions and no rotary. The decoder layers, embeddings (Gemma's sqrt(hidden) scale lives
inside its embedding module), norms and attention are always transformers' own modules; this file only says,
per family:

- where the modules sit (attribute names, which are also the checkpoint's key names),
- how the first segment embeds ``input_ids`` (token embedding; GPT-2 adds learned positions),
- which attention kind each layer uses (full or sliding window),
- how masks are built from the 2-D attention mask and position ids,
- what else each layer is called with (rotary (cos, sin); Gemma-3 has one module called per layer type),
- where text weights can sit in a checkpoint (multimodal Gemma-3 nests them under ``language_model``),
- which projections LoRA adapts by default, and whether they store weights (in, out) as GPT-2's Conv1D does.

The final-logit soft-cap (Gemma-2/3) is read from ``config.final_logit_softcapping`` for every family.
Adding a llama-shaped family is one ``Family(...)`` entry below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

FULL = "full_attention"
SLIDING = "sliding_attention"

Masks = dict[str, Any]
LayerInputs = dict[str, dict[str, Any]]
"""Per layer kind, the keyword arguments a decoder layer takes besides hidden states, mask and position ids."""

LLAMA_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def config_layer_types(config: Any) -> list[str]:
    """Layer kinds from ``config.layer_types``; families without it use full attention everywhere."""
    types = getattr(config, "layer_types", None)
    return list(types) if types else [FULL] * config.num_hidden_layers


def window_layer_types(config: Any) -> list[str]:
    """Mistral-style: one sliding window for every layer when ``config.sliding_window`` is set."""
    kind = SLIDING if getattr(config, "sliding_window", None) else FULL
    return [kind] * config.num_hidden_layers


def causal_masks(config: Any, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor, kinds: set[str], cache: Any = None,
                 layer_index: dict[str, int] | None = None) -> Masks:
    """Full and/or sliding causal masks, built exactly as the family's ``Model.forward`` builds them.

    With a KV ``cache`` each kind's mask is sized against ``layer_index[kind]``, a layer of that kind in the
    segment (a segment's cache holds only its own layers, so the model's first layer of a kind may be empty)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    builders = {FULL: create_causal_mask, SLIDING: create_sliding_window_causal_mask}
    return {kind: builders[kind](**_mask_kwargs(config, hidden, attention_mask, position_ids, cache, layer_index, kind))
            for kind in kinds}


def _mask_kwargs(config: Any, hidden: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                 cache: Any, layer_index: dict[str, int] | None, kind: str) -> dict[str, Any]:
    kwargs = dict(config=config, inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids,
                  cache=cache)
    if cache is not None and layer_index:
        kwargs["layer_idx"] = layer_index[kind]
    return kwargs


def gemma3_masks(config: Any, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                 position_ids: torch.Tensor, kinds: set[str], cache: Any = None,
                 layer_index: dict[str, int] | None = None) -> Masks:
    """Gemma-3 masks, including its optional bidirectional variant (``use_bidirectional_attention``)."""
    if not getattr(config, "use_bidirectional_attention", False):
        return causal_masks(config, hidden, attention_mask, position_ids, kinds, cache, layer_index)
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
    from transformers.models.gemma3.modeling_gemma3 import _bidirectional_window_overlay

    def kwargs(kind: str) -> dict[str, Any]:
        return _mask_kwargs(config, hidden, attention_mask, position_ids, cache, layer_index, kind)

    masks: Masks = {}
    if FULL in kinds:
        masks[FULL] = create_causal_mask(**kwargs(FULL), or_mask_function=lambda *args: torch.tensor(True, dtype=torch.bool))
    if SLIDING in kinds:
        overlay = _bidirectional_window_overlay(config.sliding_window)
        masks[SLIDING] = create_sliding_window_causal_mask(**kwargs(SLIDING), or_mask_function=overlay)
    return masks


def token_embedding(text: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Llama-shaped families: the token embedding alone (positions enter through rotary in every layer)."""
    return text.embed_tokens(input_ids)


def learned_position_embedding(text: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """GPT-2: token plus learned absolute position embeddings, then the embedding dropout (``GPT2Model.forward``)."""
    return text.drop(text.wte(input_ids) + text.wpe(position_ids))


def shared_rotary(text: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, kinds: set[str]) -> LayerInputs:
    """One rotary table for every layer (Llama, Qwen2, Gemma, Gemma-2, Mistral)."""
    table = text.rotary_emb(hidden, position_ids)
    return {kind: {"position_embeddings": table} for kind in kinds}


def per_kind_rotary(text: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, kinds: set[str]) -> LayerInputs:
    """Gemma-3: one module, called per layer kind (local theta 1e4, global 1e6)."""
    return {kind: {"position_embeddings": text.rotary_emb(hidden, position_ids, kind)} for kind in kinds}


def no_layer_inputs(text: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor, kinds: set[str]) -> LayerInputs:
    """Learned absolute positions (GPT-2) were added once, in the embedding: layers need nothing more."""
    return {kind: {} for kind in kinds}


@dataclass(frozen=True)
class Family:
    """How one decoder family is cut. ``model_types`` are the ``config.model_type`` values it covers.

    Module names are attributes of the causal LM and of its text model, so they are also the checkpoint's
    key names: a segment holds its modules under them (``model.layers.7...``, ``transformer.h.7...``).
    """

    name: str
    model_types: tuple[str, ...]
    layer_types: Callable[[Any], list[str]] = config_layer_types
    masks: Callable[..., Masks] = causal_masks
    layer_inputs: Callable[[nn.Module, torch.Tensor, torch.Tensor, set[str]], LayerInputs] = shared_rotary
    """What layers are called with besides hidden states, mask and position ids, from a segment's text model."""
    embed: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = token_embedding
    """``(text model, input_ids, position_ids) -> hidden states`` in the first segment (it holds ``input_modules``)."""
    stack: str = "model"
    """The causal LM's attribute holding the text model."""
    layers: str = "layers"
    """The text model's ``ModuleList`` of decoder layers."""
    embedding: str = "embed_tokens"
    """The token embedding; a tied head multiplies by its weight."""
    norm: str = "norm"
    """The final norm, before the head."""
    input_modules: tuple[str, ...] = ("embed_tokens",)
    """Text-model modules the first segment runs before its layers (``embed`` uses them)."""
    shared_modules: tuple[str, ...] = ("rotary_emb",)
    """Weightless text-model modules every segment holds its own copy of (``layer_inputs`` uses them)."""
    # Prefixes (tried in order) under which a checkpoint may store the text model's weights, and the
    # matching prefix of the LM head. Segments always use the causal-LM names (``stack + "."``, "lm_head.").
    checkpoint_prefixes: tuple[tuple[str, str], ...] = (("model.", ""), ("", ""))
    lora_targets: tuple[str, ...] = LLAMA_LORA_TARGETS
    """Projection names LoRA adapts by default: attention and MLP."""
    lora_fan_in_fan_out: bool = False
    """The projections store weights as (in, out) (transformers' Conv1D): peft's ``fan_in_fan_out``."""

    @property
    def layer_path(self) -> str:
        """Module path of the decoder layers in the causal LM: ``model.layers``, ``transformer.h``."""
        return f"{self.stack}.{self.layers}"


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
            layer_inputs=per_kind_rotary,
            checkpoint_prefixes=(
                ("model.", ""),
                ("model.language_model.", ""),  # Gemma3ForConditionalGeneration saved by transformers 5
                ("language_model.model.", "language_model."),  # original multimodal hub checkpoints
                ("", ""),
            ),
        ),
        Family(
            "gpt2",
            ("gpt2",),
            layer_inputs=no_layer_inputs,
            embed=learned_position_embedding,
            stack="transformer",
            layers="h",
            embedding="wte",
            norm="ln_f",
            input_modules=("wte", "wpe", "drop"),
            shared_modules=(),
            # transformers 5 saves ``transformer.h.0...``; the original hub checkpoints have no prefix (``h.0...``).
            checkpoint_prefixes=(("transformer.", ""), ("", "")),
            lora_targets=("c_attn", "c_proj", "c_fc"),  # c_proj: attention output and MLP down projection
            lora_fan_in_fan_out=True,
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
        "A model with the same shape as a supported one (e.g. model.embed_tokens, model.layers, model.norm, "
        "model.rotary_emb, lm_head) can be cut by naming that family, e.g. family='llama'."
    )
