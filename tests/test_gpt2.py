"""GPT-2 cut like any family: learned positions, Conv1D projections, a tied head, ``transformer.h`` names.

Exact logits and gradients against ``GPT2LMHeadModel``, each part reading only its own tensors (sharded,
single-file and the original unprefixed hub layout), split LoRA training equal to monolithic peft training,
and export to one standard peft adapter.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import splittrain
from splittrain.families import get_family
from splittrain.lora import LoraSettings, prepare
from conftest import batch, save_sharded, tiny_model
from test_loading import SafeOpenSpy
from test_training import CUTS as TRAIN_CUTS, LORA, OPTIM, STEPS, assert_same, batches, monolithic_run, split_run

TOL = 1e-5
CUTS = [(1,), (3,), (1, 3), (2, 3), (1, 2, 3)]
PROJECTIONS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def chain(parts, ids, mask=None, position_ids=None, labels=None):
    state = parts[0](ids, attention_mask=mask, position_ids=position_ids)
    for segment in parts[1:-1]:
        state = segment(state)
    return parts[-1](state, labels=labels)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("padding", [None, "left", "right"])
def test_logits_match_transformers(checkpoint, padding):
    model, folder = checkpoint("gpt2")
    assert model.config.tie_word_embeddings and not model.config.add_cross_attention
    ids, mask = batch(padding)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        for cuts in CUTS:
            diff = max_diff(chain(splittrain.split_model(folder, cuts=cuts), ids, mask).logits, expected)
            assert diff <= TOL, f"cuts={cuts} padding={padding}: max abs diff {diff}"


def test_explicit_position_ids(checkpoint):
    """Positions index the learned table in the bottom only: packed rows and offset positions must follow."""
    model, folder = checkpoint("gpt2")
    ids, mask = batch("left", batch_size=2, length=12)
    packed = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
    offset = torch.arange(40, 52).expand(2, -1)
    parts = splittrain.split_model(folder, cuts=(1, 3))
    with torch.no_grad():
        for positions, attention in ((packed, None), (offset, mask), (offset, None)):
            # use_cache=False: with a cache transformers does not detect packed rows (as in test_segments)
            expected = model(ids, attention_mask=attention, position_ids=positions, use_cache=False).logits
            assert max_diff(chain(parts, ids, attention, positions).logits, expected) <= TOL
        # the positions really matter
        shifted = chain(parts, ids, mask, offset).logits
        assert max_diff(shifted, chain(parts, ids, mask).logits) > 1e-2


def test_twelve_layers_at_the_splitlearn_quickstart_cuts(checkpoint):
    model, folder = checkpoint("gpt2", n_layer=12)
    parts = splittrain.split_model(folder, split_point_1=2, split_point_2=10)
    assert [(p.start, p.stop) for p in parts] == [(0, 2), (2, 10), (10, 12)]
    ids, mask = batch("right")
    with torch.no_grad():
        assert max_diff(chain(parts, ids, mask).logits, model(ids, attention_mask=mask).logits) <= TOL


def test_state_dict_keys_are_checkpoint_keys(checkpoint):
    model, folder = checkpoint("gpt2")
    bottom, trunk, top = splittrain.split_model(folder, cuts=(1, 3))
    full = model.state_dict()
    assert set(bottom.state_dict()) == {k for k in full if k.startswith(
        ("transformer.h.0.", "transformer.wte.", "transformer.wpe."))}
    assert set(trunk.state_dict()) == {k for k in full if k.startswith(("transformer.h.1.", "transformer.h.2."))}
    assert set(top.state_dict()) == {k for k in full if k.startswith(
        ("transformer.h.3.", "transformer.ln_f.", "transformer.wte."))}
    assert top.tied and "lm_head.weight" not in top.state_dict()
    for segment in (bottom, trunk, top):
        for key, value in segment.state_dict().items():
            assert torch.equal(value, full[key])


def _write(model, folder, layout: str):
    """``sharded`` and ``single`` as transformers 5 saves; ``unprefixed``: the original hub layout (``h.0...``,
    ``wte.weight``, no head, plus the old causal-mask buffers ``h.N.attn.bias`` nobody should read)."""
    if layout == "sharded":
        return save_sharded(model, folder)
    if layout == "single":
        model.save_pretrained(folder)
        return folder
    folder.mkdir()
    state = {k.removeprefix("transformer."): v.contiguous()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state.update({f"h.{i}.attn.bias": torch.ones(1, 1, 4, 4) for i in range(model.config.n_layer)})
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("layout", ["sharded", "single", "unprefixed"])
def test_each_part_reads_only_its_tensors(tmp_path, monkeypatch, layout):
    model = tiny_model("gpt2")
    folder = _write(model, tmp_path / layout, layout)
    prefix = "" if layout == "unprefixed" else "transformer."
    keys = {k.removeprefix("transformer.") for k in model.state_dict() if k != "lm_head.weight"}

    def owned(*starts: str) -> set[str]:
        return {prefix + k for k in keys if k.startswith(starts)}

    expected = {"bottom": owned("wte.", "wpe.", "h.0."), "trunk": owned("h.1.", "h.2."),
                "top": owned("h.3.", "ln_f.", "wte.")}
    weight_map = (json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
                  if layout == "sharded" else None)
    loaded = {}
    for part, tensors in expected.items():
        spy = SafeOpenSpy(monkeypatch)
        loaded[part] = splittrain.split_model(folder, cuts=(1, 3), parts=(part,))[part]
        assert set(spy.tensors) == tensors and len(spy.tensors) == len(tensors)
        if weight_map:
            shards = {weight_map[k] for k in tensors}
            assert set(spy.files) == shards and len(spy.files) == len(shards)
        else:  # one file, opened for its header (the weight map) and for the part's tensors
            assert set(spy.files) == {"model.safetensors"}
        monkeypatch.undo()
    if weight_map:
        assert len(set(weight_map.values())) >= 6
    ids, mask = batch("left")
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        assert max_diff(chain([loaded["bottom"], loaded["trunk"], loaded["top"]], ids, mask).logits, expected) <= TOL
        if layout == "unprefixed":  # a layout transformers itself loads
            reference = AutoModelForCausalLM.from_pretrained(folder)
            assert max_diff(reference(ids, attention_mask=mask).logits, expected) <= TOL


def test_saved_parts_load_alone(checkpoint, tmp_path):
    """A model owner's per-party folders keep the ``transformer.`` names and load back part by part."""
    model, folder = checkpoint("gpt2")
    bottom, trunk, top = splittrain.split_model(folder, cuts=(1, 3))
    splittrain.save_segments([bottom, top], tmp_path / "client")
    trunk.save(tmp_path / "server")
    saved = load_file(tmp_path / "server" / "model.safetensors")
    assert set(saved) == set(trunk.state_dict()) and all(k.startswith("transformer.h.") for k in saved)
    ids, mask = batch("right")
    client = splittrain.load_segments(tmp_path / "client")
    with torch.no_grad():
        got = chain([client["bottom"], splittrain.load_segment(tmp_path / "server"), client["top"]], ids, mask).logits
        assert max_diff(got, model(ids, attention_mask=mask).logits) <= TOL


def test_lora_defaults_come_from_the_family(checkpoint):
    from peft.tuners.lora import LoraLayer

    _, folder = checkpoint("gpt2")
    assert LoraSettings().targets_for(get_family("gpt2")) == ["c_attn", "c_proj", "c_fc"]
    assert LoraSettings(targets=["c_attn"]).targets_for(get_family("gpt2")) == ["c_attn"]
    trunk = prepare(splittrain.split_model(folder, cuts=(1, 3), parts=("trunk",))["trunk"], "lora", LoraSettings())
    adapted = {name: m for name, m in trunk.named_modules() if isinstance(m, LoraLayer)}
    assert set(adapted) == {f"transformer.h.{i}.{p}" for i in (1, 2) for p in PROJECTIONS}
    assert all(m.fan_in_fan_out for m in adapted.values())  # Conv1D stores (in, out)
    assert {n for n, p in trunk.named_parameters() if p.requires_grad} == {
        f"{name}.lora_{ab}.default.weight" for name in adapted for ab in "AB"}


@pytest.mark.parametrize("client", ["lora", "full"])
def test_split_training_equals_monolithic_peft(checkpoint, tmp_path, client):
    _, folder = checkpoint("gpt2")
    module, weights = split_run(folder, tmp_path, client)
    assert module.server.steps == STEPS
    losses, mono = monolithic_run(folder, client)
    assert_same(module._stats["losses"], weights, losses, mono)
    trained = {k.split(".lora_B.")[0] for k, v in weights.items() if ".lora_B." in k and v.abs().sum() > 0}
    lora_layers = range(4) if client == "lora" else range(*TRAIN_CUTS)
    assert trained == {f"transformer.h.{i}.{p}" for i in lora_layers for p in PROJECTIONS}


def test_export_is_one_standard_peft_adapter(checkpoint, tmp_path):
    """A LoRA run exports to one adapter that plain ``PeftModel.from_pretrained`` loads onto GPT2LMHeadModel."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from peft import PeftModel
    from torch.utils.data import DataLoader

    from splittrain.lora import export_run
    from splittrain.modules import ClientModule, SafetensorsCheckpointIO, TrunkSettings

    _, folder = checkpoint("gpt2")
    run, out = tmp_path / "run", tmp_path / "adapter"
    module = ClientModule(model=str(folder), cuts=TRAIN_CUTS, client="lora", client_lora=LORA, optim=OPTIM,
                          trunk=TrunkSettings(lora=LoraSettings(r=2, alpha=8), optim=OPTIM), seed=3)
    trainer = L.Trainer(max_steps=STEPS, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=run, accelerator="cpu",
                        plugins=[SafetensorsCheckpointIO()], callbacks=[ModelCheckpoint(save_last=True)])
    trainer.fit(module, train_dataloaders=DataLoader(batches(STEPS), batch_size=None))
    export_run(run, out)

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] and config["peft_type"] == "LORA" and config["rank_pattern"]  # r 4 and r 2
    tensors = load_file(out / "adapter_model.safetensors")
    assert {k.split(".lora_")[0] for k in tensors} == {
        f"base_model.model.transformer.h.{i}.{p}" for i in range(4) for p in PROJECTIONS}
    ids, mask = batch("left")
    module.eval()
    with torch.no_grad():
        expected = module({"input_ids": ids, "attention_mask": mask}).logits
        base = AutoModelForCausalLM.from_pretrained(folder)
        plain = base(ids, attention_mask=mask).logits
        peft_model = PeftModel.from_pretrained(base, out).eval()
        got = peft_model(ids, attention_mask=mask).logits
    assert max_diff(got, expected) <= TOL
    assert max_diff(plain, expected) > 1e-3  # the adapter changes the model
