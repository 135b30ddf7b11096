"""The embedded default that trains with no download: a small instruction data set, its tokenizer, and a tiny
Qwen2-shaped model built locally on first use.

The data and tokenizer ship with the package (regenerate them with ``make_data.py``); the model is random, built
by :func:`model_dir` with a fixed seed and cached.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

DATA_DIR = Path(__file__).resolve().parent / "data"
TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
TRAIN_FILE = DATA_DIR / "train.jsonl"
VAL_FILE = DATA_DIR / "val.jsonl"
MODEL_NAME = "quickstart-qwen2-v2"  # v2: the tokenizer saved beside the weights changed
MODEL_SEED = 0
TINY_PREFIX = "tiny-"
INDEX_FILE = "model.safetensors.index.json"  # written last by a sharded save: its presence means a complete model


def resolve_model(model: str) -> str:
    """``"quickstart"`` names the embedded tiny model and ``"tiny-<recipe>"`` (``tiny-gemma3``) a tiny random
    model of a recipe family (both built on first use); anything else is a hub id or folder."""
    if model == "quickstart":
        return str(model_dir())
    if model.startswith(TINY_PREFIX) and not Path(model).exists():
        return str(tiny_dir(model.removeprefix(TINY_PREFIX)))
    return model


def model_dir(cache: str | Path | None = None) -> Path:
    """Folder of the quickstart model (config, weights in 2 MB shards, tokenizer), built on the first call.

    The folder is ``<cache>/quickstart-qwen2-v2``; ``cache`` defaults to ``$SPLITTRAIN_CACHE``, else
    ``~/.cache/splittrain``.
    """
    return _cached(MODEL_NAME, _build_model, cache)


def tiny_dir(recipe: str, cache: str | Path | None = None) -> Path:
    """Folder of a tiny random model of a recipe family's architecture (``recipes.<family>``: its smallest
    published size's config keys with toy sizes), with a byte-level tokenizer trained on the quickstart rows that
    carries the family's special tokens and has no chat template (the recipe's fallback renders). Built on the
    first call into ``<cache>/tiny-<recipe>``; ``python -m splittrain fit`` names it ``model: tiny-<recipe>``."""
    from recipes import get_recipe

    get_recipe(recipe)  # a clear error for an unknown name, before anything is built
    return _cached(f"{TINY_PREFIX}{recipe}", lambda directory, shown: _build_tiny(directory, shown, recipe), cache)


def _cached(name: str, build: Callable[[Path, Path], None], cache: str | Path | None) -> Path:
    root = Path(cache or os.environ.get("SPLITTRAIN_CACHE") or Path.home() / ".cache" / "splittrain").expanduser()
    folder = root / name
    if (folder / INDEX_FILE).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: an interrupted build leaves only a temporary folder, never a half model.
    building = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        build(building, folder)
        try:
            building.rename(folder)
        except OSError:
            if not (folder / INDEX_FILE).is_file():  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder


def _build_tiny(directory: Path, announced_as: Path, recipe_name: str) -> None:
    import json

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from recipes import get_recipe

    from .make_data import train_tokenizer

    recipe = get_recipe(recipe_name)
    tokens = recipe.special_tokens
    rows = [json.loads(line) for line in TRAIN_FILE.read_text().splitlines() if line.strip()]
    tokenizer = train_tokenizer(rows, special_tokens=tokens["extra"], eos=tokens["eos"], pad=tokens["pad"],
                                bos=tokens["bos"], chat_template=None)
    model_type = min(recipe.sizes.values(), key=lambda s: s.architecture["hidden_size"]).model_type
    config = AutoConfig.for_model(model_type, **recipe.tiny_architecture(-(-len(tokenizer) // 8) * 8),
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(MODEL_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    print(f"splittrain: building a tiny {recipe_name} model ({model.num_parameters() / 1e6:.2f}M parameters) "
          f"in {announced_as}", file=sys.stderr)
    model.save_pretrained(directory, max_shard_size="256KB")  # several shards: the index marks a finished build
    tokenizer.save_pretrained(directory)


def _build_model(directory: Path, announced_as: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = Qwen2Config(
        vocab_size=-(-len(tokenizer) // 8) * 8,  # a multiple of 8, as real checkpoints pad theirs
        hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():  # a fixed model without disturbing the caller's random state
        torch.manual_seed(MODEL_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    print(f"splittrain: building the quickstart model ({model.num_parameters() / 1e6:.2f}M parameters) "
          f"in {announced_as}", file=sys.stderr)
    model.save_pretrained(directory, max_shard_size="2MB")
    tokenizer.save_pretrained(directory)
