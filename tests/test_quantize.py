"""Quantized frozen base weights: bitsandbytes' own numbers, the same training as monolithic peft over the same
quantized base, a light load, and one clear line for each mistake."""

from __future__ import annotations

import json
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from splittrain import quantize, split_model
from splittrain.errors import UserError
from splittrain.lora import adapter_state_dict, init_lora, lora_config, model_family
from splittrain.modules import ClientModule, TrunkSettings
from splittrain.optim import build_optimizer
from conftest import batch
from test_training import CUTS, LORA, OPTIM, STEPS, assert_same, batches

bnb = pytest.importorskip("bitsandbytes")


def bnb_config(quantization: str):
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                              bnb_4bit_compute_dtype=torch.float32)


def quantized_hf(folder, quantization: str):
    """The unsplit model quantized by transformers' own bitsandbytes loading (the reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 quantization_config=bnb_config(quantization))
    for module in model.modules():  # bitsandbytes' CPU inference repacking: off, as splittrain keeps it
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


@pytest.mark.parametrize("quantization", ["int8", "nf4", "fp4"])
@pytest.mark.parametrize("shape", [(96, 32), (48, 40), (24, 72)])
def test_block_by_block_quantization_is_bitsandbytes_whole_tensor(monkeypatch, quantization, shape):
    """Rows quantized a few at a time (blocks far smaller than the tensor) give bitsandbytes' whole-tensor numbers."""
    monkeypatch.setattr(quantize, "CHUNK_ELEMENTS", 200)
    weight = torch.randn(*shape) * 0.2
    weight[3, 5] = 9.0  # an outlier row
    layer = quantize.quantized_linear(torch.nn.Linear(shape[1], shape[0], bias=False), quantization, torch.float32)
    quantize.quantize_weight(layer, lambda a, b: weight[a:b], shape, torch.device("cpu"), torch.float32)
    if quantization == "int8":
        whole = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        assert torch.equal(layer.weight.data, whole.data) and torch.equal(layer.weight.SCB, whole.SCB)
    else:
        whole = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type=quantization, blocksize=64,
                                  compress_statistics=False).to("cpu")
        assert torch.equal(layer.weight.data, whole.data)
        assert torch.equal(layer.weight.quant_state.absmax, whole.quant_state.absmax)
    x = torch.randn(3, shape[1])
    reference = torch.nn.functional.linear(x, bnb.functional.dequantize_4bit(whole.data, whole.quant_state)) \
        if quantization != "int8" else None
    out = layer(x)
    assert out.shape == (3, shape[0]) and torch.isfinite(out).all()
    if reference is not None:
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_split_quantized_logits_equal_transformers(checkpoint, family, quantization):
    """bottom -> trunk -> top over a base quantized while each part loads = transformers' quantized model."""
    _, folder = checkpoint(family)
    reference = quantized_hf(folder, quantization)
    ids, mask = batch("left")
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        bottom, trunk, top = split_model(folder, cuts=CUTS, quantization=quantization)
        logits = top(trunk(bottom(ids, attention_mask=mask))).logits
    layer = trunk.decoder_layers[str(CUTS[0])].mlp.up_proj
    assert type(layer).__name__ == ("Linear8bitLt" if quantization == "int8" else "Linear4bit")
    assert bottom.text_model.embed_tokens.weight.dtype == torch.float32  # the embedding keeps its dtype
    assert bottom.dtype == trunk.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    unquantized = split_model(folder, cuts=CUTS)
    with torch.no_grad():
        plain = unquantized[2](unquantized[1](unquantized[0](ids, attention_mask=mask))).logits
    assert (plain - logits).abs().max() > 1e-4  # the quantization really changed the weights


def monolithic_quantized_run(folder, quantization: str):
    """Monolithic peft training over transformers' quantized model: adapters on every layer, one AdamW."""
    from peft import inject_adapter_in_model

    model = quantized_hf(folder, quantization)
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(lora_config(model_family(model), range(model.config.num_hidden_layers), LORA), model)
    init_lora(model, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, OPTIM, STEPS)
    model.train()
    losses = []
    for data in batches(STEPS):
        loss = model(**data).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return losses, adapter_state_dict(model)


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_split_training_over_quantized_base_equals_monolithic_peft(checkpoint, tmp_path, quantization):
    """Split LoRA training, client and trunk both over a quantized base, with activation checkpointing on both
    parties: the losses and adapter weights of monolithic peft training over transformers' quantized model."""
    _, folder = checkpoint("qwen2")
    module = ClientModule(model=str(folder), cuts=CUTS, client="lora", client_lora=LORA, optim=OPTIM, seed=3,
                          trunk=TrunkSettings(lora=LORA, optim=OPTIM, quantization=quantization,
                                              gradient_checkpointing=True),
                          quantization=quantization, gradient_checkpointing=True)
    trainer = L.Trainer(max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(module, train_dataloaders=DataLoader(batches(STEPS), batch_size=None))
    assert module.bottom.gradient_checkpointing and module.server.trunk.gradient_checkpointing
    weights = {**module.client_adapters(), **adapter_state_dict(module.server.trunk)}
    losses, mono = monolithic_quantized_run(folder, quantization)
    assert_same(module._stats["losses"], weights, losses, mono)


def test_quantized_load_stays_within_the_quantized_part(tmp_path):
    """Each projection is quantized as its rows are read: the load's peak resident growth stays within 1.1x the
    quantized part plus its largest float tensor (the float part is 4-7x larger)."""
    import json
    import subprocess

    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=1000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "model", max_shard_size="60MB")
    script = (
        "import json, sys, torch\n"
        "from splittrain import quantize, split_model\n"
        "quantize.probe(sys.argv[2], torch.device('cpu'), torch.float32)  # import bitsandbytes before measuring\n"
        "part = split_model(sys.argv[1], cuts=(1, 7), parts=('trunk',), quantization=sys.argv[2])\n"
        "trunk, report = part['trunk'], part.reports['trunk']\n"
        "size = sum(t.numel() * t.element_size() for t in trunk.state_dict().values())\n"
        "print(json.dumps({'part': size, 'peak': report.peak_rss_delta, 'read': report.bytes_read}))\n")
    for quantization in ("int8", "nf4"):
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model"), quantization],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        largest = 2048 * 512 * 4
        assert figures["read"] > 3.5 * figures["part"]
        assert figures["peak"] <= 1.1 * (figures["part"] + largest), (quantization, figures)


def test_quantization_mistakes_get_one_clear_line(checkpoint, monkeypatch):
    _, folder = checkpoint("qwen2")
    with pytest.raises(UserError, match=r"unknown quantization 'int4'; known: int8, nf4, fp4"):
        split_model(folder, cuts=CUTS, quantization="int4")
    with pytest.raises(UserError, match=r"client: full trains them"):
        ClientModule(model=str(folder), cuts=CUTS, client="full", quantization="int8")
    with pytest.raises(UserError, match=r"unknown quantization"):
        ClientModule(model=str(folder), cuts=CUTS, trunk=TrunkSettings(quantization="q4"))
    # a format the library cannot run on this device: the kernel's failure becomes one line naming both
    def broken(*args, **kwargs):
        raise NotImplementedError("No kernel registered for bitsandbytes::quantize_4bit on this device")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", broken)
    with pytest.raises(UserError, match=r"cannot run nf4 on cpu with torch.float32 \(No kernel registered"):
        split_model(folder, cuts=CUTS, quantization="nf4")
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(UserError, match=r"needs the bitsandbytes library.*pip install 'bitsandbytes>=0.50'"):
        split_model(folder, cuts=CUTS, quantization="int8")


def test_a_party_folder_quantizes_as_it_loads_and_quantized_segments_are_not_saved(checkpoint, tmp_path):
    from splittrain import load_segments, save_segments

    _, folder = checkpoint("qwen2")
    bottom, trunk, top = split_model(folder, cuts=CUTS)
    save_segments([trunk], tmp_path / "server")
    loaded = load_segments(tmp_path / "server", quantization="nf4")["trunk"]
    direct = split_model(folder, cuts=CUTS, parts=("trunk",), quantization="nf4")["trunk"]
    for (name, a), (_, b) in zip(loaded.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="hold quantized weights: save them from the unquantized checkpoint"):
        save_segments([loaded], tmp_path / "again")


def test_gpt2_conv1d_projections_are_refused(checkpoint):
    _, folder = checkpoint("gpt2")
    with pytest.raises(UserError, match=r"replaces torch.nn.Linear projections; this model's are Conv1D"):
        split_model(folder, cuts=CUTS, quantization="int8")


def test_a_quantized_run_exports_one_standard_peft_adapter(tmp_path, monkeypatch):
    """fit over an int8 base on both parties, then export: a plain peft adapter that, over transformers' own int8
    model of the base, gives the split model's logits."""
    from peft import PeftModel

    from splittrain.cli import main
    from test_cli import _split_logits, fit

    monkeypatch.setenv("SPLITTRAIN_CACHE", str(tmp_path / "cache"))
    run, out = tmp_path / "run", tmp_path / "adapter"
    cli = fit(run, "--model.client", "lora", "--model.quantization", "int8", "--model.trunk.quantization", "int8",
              "--model.gradient_checkpointing", "true", steps=3)
    main(["export", "--run", str(run), "--out", str(out)])
    ids = torch.tensor([[1, 5, 40, 77, 100, 2, 1, 9]])
    cli.model.eval()  # LLM.int8 treats outlier inputs differently in training mode
    expected = _split_logits(cli, ids)
    base = quantized_hf(json.loads((run / "run.json").read_text())["model"], "int8")
    model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        got = model(ids).logits
    assert any(v.abs().sum() > 0 for k, v in cli.model.client_adapters().items() if "lora_B" in k)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
