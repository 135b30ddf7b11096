"""The memory estimate's quantization, checkpointing and workspace terms, on a config alone (no weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splittrain.estimate import BITSANDBYTES_BYTES, HEAP_RETAINED, MMAP_THRESHOLD, estimate_memory

HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 256, 512, 4, 2, 64, 1000
Q, KV = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
LINEAR = 2 * HIDDEN * Q + 2 * HIDDEN * KV + 3 * HIDDEN * INTER  # q, o, k, v, gate, up, down weights of a layer
ROWS = Q + 2 * KV + HIDDEN + 2 * INTER + HIDDEN  # their output rows
OTHER = Q + 2 * KV + 2 * HIDDEN  # q/k/v biases and the two norms
CUTS, ROWS_N, LENGTH = (1, 3), 2, 64
TOKENS = ROWS_N * LENGTH


@pytest.fixture
def folder(tmp_path: Path) -> str:
    """A 4-layer bfloat16 Qwen2 config with an untied head."""
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=VOCAB, hidden_size=HIDDEN,
        intermediate_size=INTER, num_hidden_layers=4, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
        tie_word_embeddings=False, dtype="bfloat16")))
    return str(tmp_path)


def estimate(folder: str, **kwargs):
    return estimate_memory(folder, CUTS, ROWS_N, LENGTH, client="lora", trunk_lora_r=16, **kwargs)


def test_quantized_weights_are_the_layers_projections_in_the_format(folder):
    plain, int8, nf4 = (estimate(folder, quantization=q, trunk_quantization=q) for q in (None, "int8", "nf4"))
    layers = 2  # each party holds two of the four layers
    assert plain["server"].weights == layers * (LINEAR + OTHER) * 2
    assert int8["server"].weights == layers * (LINEAR + 4 * ROWS + OTHER * 2)
    assert nf4["server"].weights == layers * (LINEAR // 2 + 4 * (LINEAR // 64) + OTHER * 2)
    assert 0.5 < int8["server"].weights / plain["server"].weights < 0.52
    assert 0.28 < nf4["server"].weights / plain["server"].weights < 0.3
    # the embedding, the final norm and the head stay in bfloat16
    outside = (2 * VOCAB * HIDDEN + HIDDEN) * 2
    assert plain["client"].weights - outside == plain["server"].weights
    assert int8["client"].weights - outside == int8["server"].weights
    assert int8["client"].parameters == plain["client"].parameters  # the same tensors, fewer bytes
    assert int8["client"].runtime == plain["client"].runtime + BITSANDBYTES_BYTES


def test_each_party_has_its_own_settings(folder):
    plain = estimate(folder)
    client = estimate(folder, quantization="int8", gradient_checkpointing=True)
    assert client["server"].as_dict() == plain["server"].as_dict()
    assert client["client"].weights < plain["client"].weights
    assert client["client"].activations < plain["client"].activations
    trunk = estimate(folder, trunk_quantization="nf4", trunk_gradient_checkpointing=True)
    assert trunk["client"].as_dict() == plain["client"].as_dict()
    assert trunk["server"].weights < plain["server"].weights / 3
    assert trunk["server"].activations < plain["server"].activations
    with pytest.raises(ValueError, match="client 'full' trains them"):
        estimate_memory(folder, CUTS, ROWS_N, LENGTH, client="full", quantization="int8")


def test_checkpointing_keeps_each_layers_input_and_one_layers_activations(folder):
    # bytes per token of a bfloat16 Qwen2 layer, LoRA r16 on its 7 projections, norms and log-sum-exp in float32
    saved = (4 * HIDDEN + 2 * Q + 2 * KV + 4 * INTER + 16 * 7) * 2 + 2 * HIDDEN * 2 + HEADS * 4
    plain = estimate(folder)["server"]
    checkpointed = estimate(folder, trunk_gradient_checkpointing=True)["server"]
    assert plain.activations == 2 * TOKENS * saved
    assert checkpointed.activations == TOKENS * (2 * HIDDEN * 2 + saved)
    assert checkpointed.workspace == plain.workspace  # the recomputation allocates what the forward pass did
    # quantized layers save nothing more than plain ones
    assert estimate(folder, trunk_quantization="int8")["server"].activations == plain.activations


def test_workspace_on_cpu_and_cuda(folder):
    # per token, one LoRA'd layer's forward allocations: 4 x each output, norms, residuals, rotary, attention, act
    allocated = (4 * (Q + 2 * KV + HIDDEN + 2 * INTER + HIDDEN) + 8 * HIDDEN + 5 * Q + Q // 2 + 4 * KV + KV // 2
                 + 2 * INTER)
    layer = TOKENS * allocated * 2
    cpu, cuda = estimate(folder)["server"], estimate(folder, device="cuda")["server"]
    assert cpu.workspace == int(HEAP_RETAINED * layer)  # two layers (all but one), blocks below the mmap threshold
    assert cuda.workspace == layer  # the caching allocator reuses one layer's blocks
    # a quantized trunk dequantizes one layer's projections (CPU: all kept; CUDA: the largest at a time)
    assert estimate(folder, trunk_quantization="int8")["server"].workspace == cpu.workspace + LINEAR * 2
    checkpointed = estimate(folder, trunk_quantization="int8", trunk_gradient_checkpointing=True)["server"]
    assert checkpointed.workspace == cpu.workspace + 2 * LINEAR * 2  # dequantized again when recomputed
    assert estimate(folder, trunk_quantization="int8", device="cuda")["server"].workspace == layer + HIDDEN * INTER * 2
    # over a 4-bit base peft's Linear4bit clones each adapted projection's output: five copies of it, not four
    nf4 = estimate(folder, trunk_quantization="nf4")["server"]
    assert nf4.workspace == int(HEAP_RETAINED * TOKENS * (allocated + ROWS) * 2) + LINEAR * 2
    nf4_cuda = estimate(folder, trunk_quantization="nf4", device="cuda")["server"]
    assert nf4_cuda.workspace == layer + TOKENS * ROWS * 2 + HIDDEN * INTER * 2
    assert estimate(folder, trunk_quantization="fp4")["server"].workspace == nf4.workspace
    # blocks above glibc's mmap threshold go back to the system when freed: of those, one layer's count
    tokens = 40000  # intermediate-sized blocks are above the threshold, hidden-sized ones below
    assert tokens * HIDDEN * 2 < MMAP_THRESHOLD < tokens * INTER * 2
    big = 10 * INTER  # gate and up outputs (four each), the activation and the product
    long = estimate_memory(folder, CUTS, 1, tokens, client="lora", trunk_lora_r=16)["server"]
    assert long.workspace == int(HEAP_RETAINED * tokens * (allocated - big) * 2) + tokens * big * 2

def test_cli_estimate_passes_quantization_and_checkpointing(capsys):
    from splittrain.cli import main

    config = str(Path(__file__).resolve().parents[1] / "configs" / "gemma" / "7b_lora.yaml")
    off = ["--model.trunk.gradient_checkpointing", "false"]  # the config turns on all three
    plain = main(["estimate", "--config", config, "--model.quantization", "null", "--model.gradient_checkpointing",
                  "false", *off])
    capsys.readouterr()
    quantized = main(["estimate", "--config", config, "--model.quantization", "int8",
                      "--model.gradient_checkpointing", "true", *off])
    title = capsys.readouterr().out.splitlines()[0]
    assert "client lora (int8 weights, checkpointing on, loss chunks of 128)" in title
    assert "server (bfloat16 weights, checkpointing off)" in title
    assert quantized["server"] == plain["server"]
    client, before = quantized["client"], plain["client"]
    assert client["parameters"] == before["parameters"]
    embedding = 256000 * 3072 * 2  # Gemma-7B's tied embedding and head, never quantized
    assert 0.5 < (client["weights"] - embedding) / (before["weights"] - embedding) < 0.51
    assert client["activations"] < before["activations"] / 10


def test_cli_estimate_passes_the_embedding_quantization(capsys):
    """``--model.embedding_quantization int8`` reaches the estimate: Gemma-7B's tied 256k x 3072 bfloat16 matrix
    (1.5 GB) becomes int8 rows plus their scales, about half; the title says so."""
    from splittrain.cli import main

    config = str(Path(__file__).resolve().parents[1] / "configs" / "gemma" / "7b_lora.yaml")
    plain = main(["estimate", "--config", config])
    capsys.readouterr()
    int8 = main(["estimate", "--config", config, "--model.embedding_quantization", "int8"])
    assert ", int8 embedding, checkpointing on" in capsys.readouterr().out.splitlines()[0]
    saved = plain["client"]["weights"] - int8["client"]["weights"]
    assert 0.45 * 256000 * 3072 * 2 < saved <= 0.5 * 256000 * 3072 * 2
    assert int8["server"] == plain["server"]
