"""The estimate of a client whose embedding and head are int8 (``embedding_quantization``), on a config alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splittrain import estimate
from splittrain.errors import UserError
from splittrain.estimate import BITSANDBYTES_BYTES, estimate_memory
from splittrain.quantize import HEAD_BLOCK

HIDDEN, VOCAB, WIDTH = 256, 10000, 2  # bfloat16


def config(tmp_path: Path, tied: bool) -> str:
    folder = tmp_path / ("tied" if tied else "untied")
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=VOCAB, hidden_size=HIDDEN,
        intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=tied, dtype="bfloat16")))
    return str(folder)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("loss_chunk", [0, 32])
def test_the_int8_matrix_replaces_the_float_one_and_adds_its_blocks(tmp_path, tied, loss_chunk):
    folder = config(tmp_path, tied)

    def client(device: str, embedding: str | None):
        return estimate_memory(folder, (1, 3), 2, 64, client="lora", loss_chunk=loss_chunk, device=device,
                               embedding_quantization=embedding)

    plain, int8 = client("cuda", None), client("cuda", "int8")
    rows = VOCAB * (1 if tied else 2)
    assert plain["client"].weights - int8["client"].weights == rows * HIDDEN * WIDTH - (rows * HIDDEN + 4 * rows)
    block = min(HEAD_BLOCK, VOCAB)
    assert int8["client"].workspace - plain["client"].workspace == block * (HIDDEN + (loss_chunk or 128)) * WIDTH
    assert int8["client"].parameters == plain["client"].parameters
    assert int8["server"].as_dict() == plain["server"].as_dict()
    assert client("cpu", "int8")["client"].runtime - client("cpu", None)["client"].runtime == BITSANDBYTES_BYTES


@pytest.mark.parametrize("loss_chunk", [16, 32, 64])
def test_on_cpu_a_large_chunk_takes_the_place_of_the_heap_the_top_gives_back(tmp_path, monkeypatch, loss_chunk):
    """Where the CPU top trims the heap before its chunks (logits of TRIM_LOGITS_BYTES or more), the workspace is the
    layers' or one chunk's logits (two copies in bfloat16), the larger; below that threshold, and on CUDA, both."""
    folder = config(tmp_path, True)
    logits = 2 * loss_chunk * VOCAB * 4

    def workspaces(device: str) -> tuple[int, int]:
        return tuple(estimate_memory(folder, (1, 3), 2, 64, loss_chunk=c, device=device)["client"].workspace
                     for c in (0, loss_chunk))

    whole, chunked = workspaces("cpu")
    assert chunked == whole + logits  # 5 MiB chunks or less: no trim
    monkeypatch.setattr(estimate, "TRIM_LOGITS_BYTES", loss_chunk * VOCAB * 4)
    whole, chunked = workspaces("cpu")
    assert chunked == max(whole, logits)
    whole, chunked = workspaces("cuda")
    assert chunked == whole + logits


def test_int8_embedding_mistakes(tmp_path):
    folder = config(tmp_path, True)
    with pytest.raises(UserError, match="unknown embedding quantization 'fp8'"):
        estimate_memory(folder, (1, 3), 2, 64, embedding_quantization="fp8")
    with pytest.raises(ValueError, match="client 'full' trains them"):
        estimate_memory(folder, (1, 3), 2, 64, client="full", embedding_quantization="int8")
