"""Recipes: what splittrain knows about a model family's instruct models, as data.

One module per family (:mod:`recipes.qwen2`, :mod:`recipes.gemma`, :mod:`recipes.gemma3`), each holding a
:class:`Recipe`: the chat template used when a tokenizer has none (rendering as the official instruct models'
templates do), the end-of-turn stop token, the default LoRA targets, generation defaults, and per model size the
architecture numbers (from the published model cards and papers) with the recommended cuts and why.

A tokenizer's own chat template always wins over the recipe's fallback (:func:`chat_template_for`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
import pkgutil
from typing import Any, Literal

from splittrain.families import LLAMA_LORA_TARGETS

NAMES: tuple[str, ...] = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))
"""The recipes, by name: every module ``recipes/<name>.py`` is one, so a family's recipe is added as one file."""
RecipeName = Literal[NAMES]  # type: ignore[valid-type]
"""A recipe's name, typed from the recipes themselves (a config's ``model.recipe`` is checked against it)."""
UNRECIPED_END_OF_TURN_TOKENS = ("<|eot_id|>",)
"""End-of-turn tokens of chat formats without a recipe here (Llama-3)."""


@dataclass(frozen=True)
class Cuts:
    """A recommended pair of cut layers and the reason for it."""

    cuts: tuple[int, int]
    why: str


@dataclass(frozen=True)
class ModelSize:
    """One published model of a family: its hub ids, architecture numbers and recommended cuts.

    ``architecture`` holds ``transformers`` config keys of the text model with the published values (layers,
    hidden size, heads, key/value heads, head dim, MLP size, vocabulary, windows, ...); ``config()`` builds the
    family's config class from them, with no download.
    """

    name: str
    hub_id: str
    instruct_id: str
    model_type: str
    architecture: dict[str, Any]
    cuts: dict[str, Cuts]
    """``balanced`` (compute split evenly between the parties) and ``server_heavy`` (least client memory)."""
    source: str
    """Where the numbers were published."""

    @property
    def num_layers(self) -> int:
        return int(self.architecture["num_hidden_layers"])

    def config(self) -> Any:
        """The ``transformers`` config of this size, built from the recipe's numbers alone."""
        from transformers import AutoConfig

        return AutoConfig.for_model(self.model_type, **self.architecture)


@dataclass(frozen=True)
class Recipe:
    """A family's instruct conventions and sizes."""

    name: str
    chat_template: str
    """Jinja fallback for tokenizers without a template; renders as the official instruct template."""
    end_of_turn: str
    """The token that ends an assistant turn: generation stops on it (besides the tokenizer's EOS)."""
    system_role: str
    """How a system message is treated: ``native`` (its own turn), ``folded`` (into the first user turn) or
    ``refused`` (the official template raises)."""
    special_tokens: dict[str, Any] = field(default_factory=dict)
    """The family's tokenizer specials: ``bos``, ``eos``, ``pad`` (None where it has none) and ``extra`` (turn
    markers), in the order of their ids."""
    lora_targets: tuple[str, ...] = LLAMA_LORA_TARGETS
    generation: dict[str, Any] = field(default_factory=dict)
    """Generation defaults (:class:`splittrain.generate.GenerationOptions` names)."""
    sizes: dict[str, ModelSize] = field(default_factory=dict)
    tiny: dict[str, Any] = field(default_factory=dict)
    """Size keys that shrink the smallest published size to a CPU-test model of the same architecture."""

    def size(self, name: str) -> ModelSize:
        if name not in self.sizes:
            raise ValueError(f"recipe {self.name!r} has no size {name!r}; sizes: {', '.join(self.sizes)}")
        return self.sizes[name]

    def tiny_architecture(self, vocab_size: int) -> dict[str, Any]:
        """The smallest published size's config keys with :attr:`tiny`'s sizes and ``vocab_size``: the same family,
        attention layout (heads vs key/value heads, sliding and global layers), norms and tied head, at toy size."""
        smallest = min(self.sizes.values(), key=lambda s: s.architecture["hidden_size"])
        arch = {**smallest.architecture, **self.tiny, "vocab_size": vocab_size}
        if "layer_types" in smallest.architecture:  # keep the published pattern over the shrunk depth
            pattern = smallest.architecture["layer_types"]
            arch["layer_types"] = [pattern[i % len(pattern)] for i in range(arch["num_hidden_layers"])]
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            arch.pop(key, None)  # the tiny tokenizer's ids are set by whoever builds the model
        return arch


def get_recipe(name: str) -> Recipe:
    """The recipe of a family by name (``qwen2``, ``gemma``, ``gemma3``); a clear error lists them."""
    import importlib

    if name not in NAMES:
        raise ValueError(f"unknown recipe {name!r}; recipes: {', '.join(sorted(NAMES))}")
    return importlib.import_module(f"{__name__}.{name}").RECIPE


def chat_template_for(tokenizer: Any, recipe: Recipe | str) -> str:
    """The template to render with: the tokenizer's own when it has one, else the recipe's fallback."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.get_chat_template()
    return (get_recipe(recipe) if isinstance(recipe, str) else recipe).chat_template


def end_of_turn_tokens() -> tuple[str, ...]:
    """Special tokens that close an assistant turn in the chat formats splittrain knows (every recipe's, then
    :data:`UNRECIPED_END_OF_TURN_TOKENS`): without a recipe, generation stops on any the tokenizer has."""
    return tuple(dict.fromkeys([get_recipe(name).end_of_turn for name in NAMES] + list(UNRECIPED_END_OF_TURN_TOKENS)))


def stop_token_ids(tokenizer: Any, recipe: Recipe | str | None = None) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS and the recipe's end-of-turn token (without a recipe: each
    of :func:`end_of_turn_tokens`), those the tokenizer has."""
    if recipe is not None:
        turns: tuple[str, ...] = ((get_recipe(recipe) if isinstance(recipe, str) else recipe).end_of_turn,)
    else:
        specials = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
        turns = tuple(t for t in end_of_turn_tokens() if t in specials)
    eos = tokenizer.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    unknown = getattr(tokenizer, "unk_token_id", None)
    for token in turns:
        turn = tokenizer.convert_tokens_to_ids(token)
        if isinstance(turn, int) and turn != unknown and turn not in ids:
            ids.append(turn)
    return ids


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad token, falling back to EOS where it has none (padded positions are masked anyway)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an EOS token")
    return eos if isinstance(eos, int) else eos[0]
