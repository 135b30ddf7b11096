"""The client's embedding and head in int8 (``embedding_quantization``): the numbers of transformers over the same
int8 matrix (bitsandbytes' own quantization of it), the chunked loss's against the plain path's, no float copy of the
matrix ever whole, and the mistakes refused."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from splittrain import quantize, split_model
from splittrain.errors import UserError
from conftest import batch
from test_chunked_loss import assert_close, inputs

bnb = pytest.importorskip("bitsandbytes")
CUTS = (1, 3)


def dequantized_by_bitsandbytes(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` quantized by bitsandbytes' ``Int8Params`` (as ``Embedding8bit`` holds it), then dequantized."""
    int8 = bnb.nn.Int8Params(weight.detach().clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    return int8.data * (int8.SCB[:, None] / 127.0)


def int8_reference(model: torch.nn.Module) -> torch.nn.Module:
    """The unsplit transformers model whose embedding and head are bitsandbytes' int8 rows, dequantized."""
    reference = copy.deepcopy(model)
    embedding, head = reference.get_input_embeddings(), reference.get_output_embeddings()
    with torch.no_grad():
        embedding.weight.copy_(dequantized_by_bitsandbytes(embedding.weight))
        if head.weight is not embedding.weight:
            head.weight.copy_(dequantized_by_bitsandbytes(head.weight))
    return reference


@pytest.mark.parametrize("family", ["qwen2", "gemma", "gemma3", "gpt2"])  # untied, tied + scaled, softcap, learned pos
def test_int8_embedding_logits_equal_transformers_over_the_same_int8_matrix(checkpoint, monkeypatch, family):
    """bottom -> trunk -> top with the embedding (and head) int8 = transformers with bitsandbytes' int8 matrix
    dequantized in place of the float one, with the head dequantized 40 rows at a time (vocabulary 96)."""
    monkeypatch.setattr(quantize, "HEAD_BLOCK", 40)
    model, folder = checkpoint(family)
    ids, mask = batch("left")
    with torch.no_grad():
        expected = int8_reference(model)(input_ids=ids, attention_mask=mask).logits
        bottom, trunk, top = split_model(folder, cuts=CUTS, embedding_quantization="int8")
        logits = top(trunk(bottom(ids, attention_mask=mask))).logits
        plain = model(input_ids=ids, attention_mask=mask).logits
    embedding = bottom.text_model.get_submodule(bottom.family.embedding)
    assert isinstance(embedding, bnb.nn.Embedding8bit) and embedding.weight.dtype == torch.int8
    weight, _ = top.head_weight()
    assert weight.dtype == torch.int8 and (weight is embedding.weight) == top.tied
    assert bottom.dtype == top.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert (plain - logits).abs().max() > 1e-4  # the int8 matrix really changed the numbers


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])  # untied, tied + softcap
def test_int8_head_chunked_loss_and_gradients_equal_the_plain_path(checkpoint, monkeypatch, family):
    """The frozen int8 head through the chunked loss (chunks that do and do not divide the 20 trained positions) =
    whole logits through transformers' loss over the same int8 head: loss, token stats and every gradient."""
    monkeypatch.setattr(quantize, "HEAD_BLOCK", 40)
    model, folder = checkpoint(family)
    ids, mask, labels = inputs(model)
    parts = split_model(folder, cuts=CUTS, embedding_quantization="int8")
    for segment in parts:
        for param in segment.parameters():
            param.requires_grad_(param.is_floating_point())

    def run(chunk: int):
        parts[2].loss_chunk = chunk
        for segment in parts:
            segment.zero_grad(set_to_none=True)
        out = parts[2](parts[1](parts[0](ids, attention_mask=mask)), labels=labels)
        out.loss.backward()
        grads = {f"{s.name}.{n}": p.grad.clone() for s in parts for n, p in s.named_parameters() if p.requires_grad}
        return out, grads

    plain, plain_grads = run(0)
    assert plain.logits is not None and plain_grads
    for chunk in (5, 7, 20):
        out, grads = run(chunk)
        assert out.logits is None and grads.keys() == plain_grads.keys()
        assert_close(out.loss, plain.loss, f"{family} chunk {chunk} loss")
        assert int(out.token_stats.count) == 20
        for name in grads:
            assert_close(grads[name], plain_grads[name], f"{family} chunk {chunk} {name}", 5e-6)


class FloatMatrix(TorchDispatchMode):
    """Whether any operation makes a float tensor of ``size`` elements or more that is not logits (last dimension
    ``vocab``) while active."""

    def __init__(self, size: int, vocab: int) -> None:
        super().__init__()
        self.size, self.vocab, self.made = size, vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() >= self.size \
                    and t.shape[-1] != self.vocab:
                self.made.append((str(func), tuple(t.shape)))
        return out


def test_no_float_copy_of_the_int8_matrix_is_ever_whole(tmp_path, monkeypatch):
    """A training step of an int8 tied embedding and head (vocabulary 4096 x hidden 32), chunked and plain: no
    operation, forward or backward, makes a float tensor of the matrix's size (the plain path's whole logits aside)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    monkeypatch.setattr(quantize, "HEAD_BLOCK", 512)
    vocab, hidden = 4096, 32
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    bottom, top = split_model(tmp_path, cuts=(1,), embedding_quantization="int8")
    ids, labels = torch.randint(0, vocab, (2, 64)), torch.randint(0, vocab, (2, 64))
    for chunk in (0, 16):
        top.loss_chunk = chunk
        with FloatMatrix(vocab * hidden, vocab) as probe:
            states = bottom(ids)
            states.hidden_states = states.hidden_states.detach().requires_grad_(True)
            top(states, labels=labels).loss.backward()
        assert not probe.made, (chunk, probe.made)
        assert states.hidden_states.grad is not None


def test_int8_embedding_loads_block_by_block(tmp_path):
    """The embedding is quantized as its rows are read (never memory-mapped or read whole): the load's peak resident
    growth stays within the int8 matrix plus 8 MiB, where the float32 one is 62.5 MiB."""
    import json
    import subprocess
    import sys

    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "model")
    script = (
        "import json, sys, torch\n"
        "import safetensors\n"
        "from splittrain import quantize, split_model\n"
        "quantize.probe('int8', torch.device('cpu'), torch.float32)  # import bitsandbytes before measuring\n"
        "read, safe_open = [], safetensors.safe_open\n"
        "class Recording:\n"
        "    def __init__(self, *args, **kwargs): self.f = safe_open(*args, **kwargs)\n"
        "    def __enter__(self): self.f.__enter__(); return self\n"
        "    def __exit__(self, *exc): return self.f.__exit__(*exc)\n"
        "    def keys(self): return self.f.keys()\n"
        "    def get_tensor(self, key): read.append(key); return self.f.get_tensor(key)\n"
        "safetensors.safe_open = Recording\n"
        "parts = split_model(sys.argv[1], cuts=(1,), embedding_quantization='int8')\n"
        "weight = parts['bottom'].text_model.embed_tokens.weight\n"
        "print(json.dumps({'int8': weight.numel() + 4 * len(weight), 'read': read,\n"
        "                  'peak': max(r.peak_rss_delta for r in parts.reports.values())}))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert "model.embed_tokens.weight" not in figures["read"] and figures["read"]
    assert figures["peak"] <= figures["int8"] + 8 * 2**20, figures


def test_tied_client_parts_hold_the_matrix_once(checkpoint):
    """Bottom and tied top loaded together share one embedding tensor (float or int8): the client's parameters are
    the checkpoint's client tensors once each, nothing duplicated."""
    _, folder = checkpoint("gemma")  # tied
    for embedding in (None, "int8"):
        bottom, top = split_model(folder, cuts=CUTS, parts=("bottom", "top"), embedding_quantization=embedding)
        assert top.head_weight()[0] is bottom.text_model.embed_tokens.weight
        storages = {}
        for segment in (bottom, top):
            for param in segment.parameters():
                storages[param.untyped_storage().data_ptr()] = param.untyped_storage().nbytes()
        distinct = {id(p): p for s in (bottom, top) for p in s.parameters()}.values()
        assert sum(storages.values()) == sum(p.numel() * p.element_size() for p in distinct)


def test_int8_embedding_mistakes_get_one_clear_line(checkpoint, tmp_path):
    from splittrain import save_segments

    model, folder = checkpoint("qwen2")
    with pytest.raises(UserError, match=r"unknown embedding quantization 'nf4'; known: int8 \(or null for none\)"):
        split_model(folder, cuts=CUTS, embedding_quantization="nf4")
    with pytest.raises(ValueError, match="quantization happens while a part loads"):
        split_model(model, cuts=CUTS, embedding_quantization="int8")
    bottom = split_model(folder, cuts=CUTS, parts=("bottom",), embedding_quantization="int8")["bottom"]
    with pytest.raises(ValueError, match="hold quantized weights"):
        save_segments([bottom], tmp_path / "bottom")


def test_fit_with_an_int8_embedding_trains_lora_over_it(tmp_path, monkeypatch):
    """``model.embedding_quantization: int8`` through ``fit``: the client's embedding (and tied head) load as int8
    rows, LoRA trains over them, the first loss is the float model's to the quantization's cost, the checkpoint
    holds only the adapters, and ``client: full`` is refused in one line."""
    from test_cli import fit

    from splittrain.modules import ClientModule
    from splittrain.state import load_state

    monkeypatch.setenv("SPLITTRAIN_CACHE", str(tmp_path / "cache"))
    plain = fit(tmp_path / "plain", "--model.client", "lora", steps=3)
    cli = fit(tmp_path / "run", "--model.client", "lora", "--model.embedding_quantization", "int8", steps=3)
    embedding = cli.model.bottom.text_model.embed_tokens.weight
    assert embedding.dtype == torch.int8 and not embedding.requires_grad
    assert cli.model.top.head_weight()[0] is embedding  # the quickstart's head is tied: one int8 matrix
    first, quantized = plain.model._stats["losses"], cli.model._stats["losses"]
    assert quantized != first and all(math.isfinite(loss) for loss in quantized)
    assert quantized == pytest.approx(first, rel=0.01)  # each step tracks the float model's
    adapters = cli.model.client_adapters()
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # LoRA trained over the int8 rows
    keys = set(load_state(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"])
    assert keys and not any("embed_tokens" in key for key in keys) and any("lora_A" in key for key in keys)
    with pytest.raises(UserError, match=r"embedding_quantization int8 freezes the client's embedding and head"):
        ClientModule(model="quickstart", client="full", embedding_quantization="int8")
