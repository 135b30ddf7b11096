"""The estimate of a client whose embedding and head are int8 (``embedding_quantization``), on a config alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    plain, int8 = (estimate_memory(folder, (1, 3), 2, 64, client="lora", loss_chunk=loss_chunk,
                                   embedding_quantization=e) for e in (None, "int8"))
    rows = VOCAB * (1 if tied else 2)
    assert plain["client"].weights - int8["client"].weights == rows * HIDDEN * WIDTH - (rows * HIDDEN + 4 * rows)
    block = min(HEAD_BLOCK, VOCAB)
    assert int8["client"].workspace - plain["client"].workspace == block * (HIDDEN + (loss_chunk or 128)) * WIDTH
    assert int8["client"].runtime - plain["client"].runtime == BITSANDBYTES_BYTES
    assert int8["client"].parameters == plain["client"].parameters
    assert int8["server"].as_dict() == plain["server"].as_dict()


def test_int8_embedding_mistakes(tmp_path):
    folder = config(tmp_path, True)
    with pytest.raises(UserError, match="unknown embedding quantization 'fp8'"):
        estimate_memory(folder, (1, 3), 2, 64, embedding_quantization="fp8")
    with pytest.raises(ValueError, match="client 'full' trains them"):
        estimate_memory(folder, (1, 3), 2, 64, client="full", embedding_quantization="int8")
