"""Tiny models built from transformers configs and written sharded with ``save_pretrained``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 96
# The configs mirror the real families' shapes at toy size. Gemma-3 mixes sliding (window 4) and full layers.
TINY: dict[str, dict[str, Any]] = {
    "qwen2": dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),  # GQA, q/k/v bias
    "llama": dict(model_type="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),  # MHA
    "gemma": dict(model_type="gemma", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=24),  # MQA, 2*24 != 32 (Gemma-7B-like), tied
    "gemma3": dict(model_type="gemma3_text", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                   query_pre_attn_scalar=16, sliding_window=4, final_logit_softcapping=3.0,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]),
    "mistral": dict(model_type="mistral", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1, sliding_window=5,
                    tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8),
    "gemma2": dict(model_type="gemma2", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                   query_pre_attn_scalar=16, sliding_window=4, final_logit_softcapping=3.0,
                   attn_logit_softcapping=5.0),
    # Learned positions, LayerNorm with biases, Conv1D projections, tied head; dropouts off for exactness.
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
}


def tiny_model(name: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised causal LM of family ``name`` with every weight perturbed.

    Gemma norms start at zero (they compute x * (1 + w)) and biases at zero: the perturbation makes sure a
    wrong norm or a dropped bias changes the logits.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**TINY[name], **overrides}
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def save_sharded(model: torch.nn.Module, directory: Path, shard: str = "20KB") -> Path:
    model.save_pretrained(directory, max_shard_size=shard)
    return directory


@pytest.fixture
def checkpoint(tmp_path):
    """``checkpoint(name, **overrides) -> (hf_model, folder)``: a tiny model saved in several shards."""

    def make(name: str, seed: int = 0, shard: str = "20KB", **overrides: Any):
        model = tiny_model(name, seed=seed, **overrides)
        folder = tmp_path / f"{name}-{seed}-{len(list(tmp_path.iterdir()))}"
        return model, save_sharded(model, folder, shard)

    return make


def batch(padding: str | None, batch_size: int = 3, length: int = 11, seed: int = 1):
    """Random ids and a mask with ``left``/``right`` padding of different lengths (or none)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    if padding is not None:
        for row, pad in enumerate([0, 3, 5][:batch_size]):
            if pad:
                if padding == "left":
                    mask[row, :pad] = 0
                else:
                    mask[row, length - pad:] = 0
    return ids, mask


@pytest.fixture
def procs(tmp_path):
    """Start background processes for a test; all of them are killed by pid when it ends, also on failure."""
    from processes import Processes

    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.close()


@pytest.fixture(autouse=True, scope="session")
def quickstart_model(tmp_path_factory):
    """One quickstart model for the whole session, built before any test starts processes that need it."""
    cache = tmp_path_factory.getbasetemp() / "splittrain-cache"
    os.environ["SPLITTRAIN_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """``(config, run folder)`` of the in-process run every transport must reproduce: 20 steps of the quickstart
    (batch 8), gradient accumulation 2 and clipping on, checkpoints every 5 steps."""
    from processes import STEPS, write_config
    from splittrain.cli import main
    from splittrain.quickstart import model_dir

    model_dir()  # built once, before processes race to build it
    folder = tmp_path_factory.mktemp("reference")
    config = write_config(folder / "config.yaml", folder / "run", steps=STEPS, every=5, accumulate=2, clip=0.5)
    cli = main(["fit", "--config", str(config)])
    assert len(cli.model._stats["losses"]) == 2 * STEPS
    return config, folder / "run"
