"""Selective loading: each part opens only its shards and reads only its tensors; save/load; clear errors."""

from __future__ import annotations

import json
import re
import shutil
from types import SimpleNamespace

import pytest
import safetensors
import torch

import splittrain
from splittrain.loading import part_ranges, resolve_device_map
from conftest import batch, save_sharded, tiny_model

TOL = 1e-5


class SafeOpenSpy:
    """Wraps ``safetensors.safe_open`` to record every file opened and every tensor read."""

    def __init__(self, monkeypatch):
        self.files: list[str] = []
        self.tensors: list[str] = []
        real = safetensors.safe_open
        spy = self

        class Handle:
            def __init__(self, path, framework, device="cpu"):
                spy.files.append(str(path).rsplit("/", 1)[-1])
                self.inner = real(path, framework, device=device)

            def __enter__(self):
                self.inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_tensor(self, key):
                spy.tensors.append(key)
                return self.inner.get_tensor(key)

        monkeypatch.setattr(safetensors, "safe_open", Handle)


def layer_keys(model, start, stop, extra=()):
    keys = set()
    for key in model.state_dict():
        m = re.match(r"model\.layers\.(\d+)\.", key)
        if (m and start <= int(m.group(1)) < stop) or key in extra:
            keys.add(key)
    return keys


def shards_of(folder, keys):
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return {weight_map[k] for k in keys}


@pytest.mark.parametrize("tied", [False, True])
def test_each_part_reads_only_its_tensors_and_shards(checkpoint, monkeypatch, tied):
    model, folder = checkpoint("qwen2", tie_word_embeddings=tied)
    assert len(list(folder.glob("model-*.safetensors"))) >= 6
    head = {"model.embed_tokens.weight"} if tied else {"lm_head.weight"}
    expected = {
        "bottom": layer_keys(model, 0, 1, {"model.embed_tokens.weight"}),
        "trunk": layer_keys(model, 1, 3),
        "top": layer_keys(model, 3, 4, {"model.norm.weight"} | head),
    }
    if not tied:
        assert "lm_head.weight" in model.state_dict()
    for part, keys in expected.items():
        spy = SafeOpenSpy(monkeypatch)
        parts = splittrain.split_model(folder, cuts=(1, 3), parts=(part,))
        assert parts.names == (part,)
        assert set(spy.tensors) == keys and len(spy.tensors) == len(keys)
        assert set(spy.files) == shards_of(folder, keys) and len(spy.files) == len(set(spy.files))
        report = parts.reports[part]
        assert set(report.tensors) == keys and set(report.shards) == set(spy.files)
        assert report.bytes_read == sum(model.state_dict()[k].nbytes for k in keys)
        monkeypatch.undo()
    # The trunk never touches embeddings, norm or head, and the shard holding only the embedding stays closed.
    assert not any("embed" in k or "lm_head" in k or k == "model.norm.weight" for k in expected["trunk"])


def test_tied_head_shares_storage_in_one_process_and_loads_apart(checkpoint, monkeypatch):
    model, folder = checkpoint("gemma")  # tied
    ids, mask = batch("left")
    bottom, trunk, top = splittrain.split_model(folder, cuts=(1, 3))
    assert top.tied and "lm_head.weight" not in top.state_dict()
    assert top.model.embed_tokens.weight.data_ptr() == bottom.model.embed_tokens.weight.data_ptr()
    spy = SafeOpenSpy(monkeypatch)
    (top_alone,) = splittrain.split_model(folder, cuts=(1, 3), parts=("top",))
    assert "model.embed_tokens.weight" in spy.tensors and "lm_head.weight" not in spy.tensors
    assert spy.tensors.count("model.embed_tokens.weight") == 1
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        got = top_alone(trunk(bottom(ids, attention_mask=mask))).logits
    assert (got - expected).abs().max() <= TOL


@pytest.mark.parametrize("layout", ["multimodal", "causal"])
def test_gemma3_checkpoint_under_language_model_prefix(tmp_path, monkeypatch, layout):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                layer_types=["sliding_attention", "full_attention"] * 2)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=16, patch_size=8)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    folder = save_sharded(model, tmp_path / "gemma3-mm")
    keys = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.startswith("language_model.model.layers.") for k in keys)  # the hub layout
    ids, mask = batch("left")
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    spy = SafeOpenSpy(monkeypatch)
    parts = splittrain.split_model(folder, cuts=(1, 3))
    assert not any("vision" in k or "multi_modal" in k for k in spy.tensors)
    assert parts[0].config.model_type == "gemma3_text"
    with torch.no_grad():
        got = parts[2](parts[1](parts[0](ids, attention_mask=mask))).logits
    assert (got - expected).abs().max() <= TOL
    if layout == "causal":  # saved segments use the causal-LM names and load back the same
        out = tmp_path / "client"
        splittrain.save_segments([parts[0], parts[2]], out)
        saved = set(safetensors.safe_open(str(out / "model.safetensors"), "pt").keys())
        assert "model.embed_tokens.weight" in saved and not any(k.startswith("language_model") for k in saved)
        bottom, top = splittrain.load_segments(out)
        with torch.no_grad():
            again = top(parts[1](bottom(ids, attention_mask=mask))).logits
        assert torch.equal(again, got)


def test_save_and_load_segments_round_trip(checkpoint, tmp_path):
    model, folder = checkpoint("qwen2")
    bottom, trunk, top = splittrain.split_model(folder, cuts=(1, 3))
    trunk.save(tmp_path / "server")
    splittrain.save_segments([bottom, top], tmp_path / "client")
    meta = json.loads((tmp_path / "client" / "split.json").read_text())
    assert meta == {"family": "qwen2", "num_layers": 4, "parts": {"bottom": [0, 1], "top": [3, 4]}}
    server = set(safetensors.safe_open(str(tmp_path / "server" / "model.safetensors"), "pt").keys())
    assert server == set(trunk.state_dict())
    loaded_trunk = splittrain.load_segment(tmp_path / "server")
    assert (loaded_trunk.start, loaded_trunk.stop, loaded_trunk.name) == (1, 3, "trunk")
    c_bottom, c_top = splittrain.load_segments(tmp_path / "client")
    ids, mask = batch("right")
    with torch.no_grad():
        got = c_top(loaded_trunk(c_bottom(ids, attention_mask=mask))).logits
        expected = model(ids, attention_mask=mask).logits
    assert (got - expected).abs().max() <= TOL
    with pytest.raises(ValueError, match="name one with part"):
        splittrain.load_segment(tmp_path / "client")
    assert splittrain.load_segment(tmp_path / "client", part="top").is_last


GPT2_DROPOUTS = dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)


def test_loaded_parts_come_back_in_eval_mode_like_from_pretrained(checkpoint, tmp_path):
    """Dropout on in the saved config: every way of loading parts gives from_pretrained's (eval-mode) logits."""
    from transformers import AutoModelForCausalLM

    _, folder = checkpoint("gpt2", **GPT2_DROPOUTS)
    reference = AutoModelForCausalLM.from_pretrained(folder)  # no .eval(): from_pretrained's own mode
    assert not reference.training
    split = splittrain.split_model(folder, cuts=(1, 3))
    split[0].save(tmp_path / "bottom")
    splittrain.save_segments([split[1], split[2]], tmp_path / "rest")
    loaded = (splittrain.load_segment(tmp_path / "bottom"), *splittrain.load_segments(tmp_path / "rest"))
    ids, mask = batch("left")
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        for parts in (split, loaded):
            assert not any(m.training for part in parts for m in part.modules())
            got = parts[2](parts[1](parts[0](ids, attention_mask=mask))).logits
            assert (got - expected).abs().max() <= TOL


@pytest.mark.parametrize("training", [False, True])
def test_split_of_a_loaded_model_keeps_its_mode(training):
    """Its segments are the model's own modules: splitting changes no module's mode."""
    model = tiny_model("gpt2", **GPT2_DROPOUTS).train(training)
    parts = splittrain.split_model(model, cuts=(1, 3))
    assert {m.training for part in parts for m in part.modules()} == {training}
    assert {m.training for m in model.modules()} == {training}


def test_split_command_writes_one_folder_per_party(checkpoint, tmp_path, capsys):
    from splittrain.cli import main

    model, folder = checkpoint("gemma3")
    main(["split", "--model", str(folder), "--cuts", "1", "3", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "client: bottom, top" in printed and "MiB read" in printed
    client = set(safetensors.safe_open(str(tmp_path / "out/client/model.safetensors"), "pt").keys())
    server = set(safetensors.safe_open(str(tmp_path / "out/server/model.safetensors"), "pt").keys())
    assert server == layer_keys(model, 1, 3)
    assert client == set(model.state_dict()) - server - {"lm_head.weight"}  # tied: the embedding once
    assert not any(k.startswith(("model.layers.1.", "model.layers.2.")) for k in client)
    bottom, top = splittrain.load_segments(tmp_path / "out/client")
    trunk = splittrain.load_segment(tmp_path / "out/server")
    ids, mask = batch("left", length=9)
    with torch.no_grad():
        assert (top(trunk(bottom(ids, attention_mask=mask))).logits
                - model(ids, attention_mask=mask).logits).abs().max() <= TOL


def test_split_points_spelling(checkpoint):
    """SplitLearn's ``split_point_1/2`` names on the native API (the facade itself: tests/test_splitlearn.py)."""
    _, folder = checkpoint("llama")
    parts = splittrain.split_model(folder, split_point_1=1, split_point_2=3)
    assert [p.name for p in parts] == ["bottom", "trunk", "top"]
    with pytest.raises(ValueError, match="not both"):
        splittrain.split_model(folder, cuts=(1, 3), split_point_1=1)


def test_dtype_conversion_matches_transformers(checkpoint):
    from transformers import AutoModelForCausalLM

    _, folder = checkpoint("qwen2")
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    parts = splittrain.split_model(folder, cuts=(2,), dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in parts)
    ids, mask = batch("left")
    with torch.no_grad():
        assert torch.equal(parts[1](parts[0](ids, attention_mask=mask)).logits,
                           reference(ids, attention_mask=mask).logits)


def test_verbose_reports_bytes_and_rss(checkpoint, capsys):
    _, folder = checkpoint("llama")
    splittrain.split_model(folder, cuts=(2,), verbose=True)
    out = capsys.readouterr()
    assert re.search(r"bottom: layers \[0, 2\), \d+ shard\(s\), \d+ tensors, [\d.]+ MiB read, peak RSS \+", out.out)
    assert "loading top" in out.err  # the progress bar


def test_device_map_policy():
    names = ["bottom", "trunk", "top"]
    cpu, c0, c1, c2 = (torch.device(d) for d in ("cpu", "cuda:0", "cuda:1", "cuda:2"))
    assert resolve_device_map(names, "cpu") == {n: cpu for n in names}
    assert resolve_device_map(names, device_map="auto", gpu_count=0) == {n: cpu for n in names}
    assert resolve_device_map(names, device_map="auto", gpu_count=1) == {"bottom": cpu, "trunk": c0, "top": c0}
    assert resolve_device_map(names, device_map="auto", gpu_count=2) == {"bottom": cpu, "trunk": c0, "top": c1}
    assert resolve_device_map(names, device_map="auto", gpu_count=4) == {"bottom": c0, "trunk": c1, "top": c2}
    assert resolve_device_map(names, device_map={"trunk": "cuda:1"}) == {"bottom": cpu, "trunk": c1, "top": cpu}
    with pytest.raises(ValueError, match="unknown part"):
        resolve_device_map(names, device_map={"middle": "cpu"})
    with pytest.raises(ValueError, match="device_map must be"):
        resolve_device_map(names, device_map="balanced")


def test_device_map_places_parts(checkpoint):
    """Only CPU here: check a dict map is applied per part and "auto" with no GPU keeps the CPU."""
    _, folder = checkpoint("llama")
    for device_map in ({"trunk": "cpu"}, "auto"):
        parts = splittrain.split_model(folder, cuts=(1, 3), device_map=device_map)
        assert all(p.device == torch.device("cpu") for p in parts) or torch.cuda.is_available()


# ------------------------------------------------------------------------------------------ errors
def test_unknown_family_lists_supported(checkpoint, tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(num_hidden_layers=2, hidden_size=16, ffn_dim=32, num_attention_heads=2, vocab_size=50,
                       word_embed_proj_dim=16, max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                       pad_token_id=1)
    OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    with pytest.raises(ValueError, match=r"unknown model family 'opt'; supported families: gemma, gemma2, gemma3, gpt2,"
                                         r" llama"):
        splittrain.split_model(tmp_path / "opt", cuts=(1,))
    # naming a family for a model of another shape: no decoder stack where segments need one
    for family in ("llama", "gpt2"):
        with pytest.raises(ValueError, match="no decoder-layer stack"):
            splittrain.split_model(tmp_path / "opt", cuts=(1,), family=family)
        with pytest.raises(ValueError, match="no decoder-layer stack"):
            splittrain.split_model(OPTForCausalLM(config), cuts=(1,), family=family)


@pytest.mark.parametrize("cuts, message", [
    ((3, 1), "strictly increasing"), ((2, 2), "strictly increasing"), ((0, 2), r"outside 1\.\.3"),
    ((1, 4), r"outside 1\.\.3"), ((), "at least one"), ((1.5,), "integers"),
])
def test_bad_cuts(cuts, message):
    with pytest.raises((ValueError, TypeError), match=message):
        part_ranges(4, cuts)


def test_first_and_last_legal_cuts():
    assert part_ranges(4, (1, 3)) == {"bottom": (0, 1), "trunk": (1, 3), "top": (3, 4)}
    assert part_ranges(4, (1, 2, 3)) == {"bottom": (0, 1), "trunk1": (1, 2), "trunk2": (2, 3), "top": (3, 4)}
    assert part_ranges(4, 2) == {"bottom": (0, 2), "top": (2, 4)}


def test_unknown_part_name(checkpoint):
    _, folder = checkpoint("llama")
    with pytest.raises(ValueError, match="unknown part.*bottom, trunk, top"):
        splittrain.split_model(folder, cuts=(1, 3), parts=("middle",))


def test_missing_shard_and_tensor_are_named(checkpoint, tmp_path):
    _, folder = checkpoint("qwen2")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    trunk_shard = index["weight_map"]["model.layers.2.mlp.down_proj.weight"]
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / trunk_shard).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(trunk_shard)):
        splittrain.split_model(broken, cuts=(1, 3), parts=("trunk",))
    # the client does not need that shard and loads fine
    splittrain.split_model(broken, cuts=(1, 3), parts=("bottom", "top"))

    dropped = tmp_path / "dropped"
    shutil.copytree(folder, dropped)
    del index["weight_map"]["model.layers.1.self_attn.q_proj.bias"]
    (dropped / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.self_attn\.q_proj\.bias.*trunk"):
        splittrain.split_model(dropped, cuts=(1, 3), parts=("trunk",))

    # the index lists a tensor its shard does not hold
    lying = tmp_path / "lying"
    shutil.copytree(folder, lying)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    assert weight_map["model.layers.2.mlp.up_proj.weight"] != weight_map["model.layers.0.mlp.up_proj.weight"]
    weight_map["model.layers.2.mlp.up_proj.weight"] = weight_map["model.layers.0.mlp.up_proj.weight"]
    (lying / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"model\.layers\.2\.mlp\.up_proj\.weight.*missing from shard"):
        splittrain.split_model(lying, cuts=(1, 3), parts=("trunk",))

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(folder / "config.json", empty)
    with pytest.raises(FileNotFoundError, match="safetensors checkpoints only"):
        splittrain.split_model(empty, cuts=(1, 3))
    with pytest.raises(FileNotFoundError, match="no model folder"):
        splittrain.split_model(tmp_path / "nowhere", cuts=(1, 3))


def test_single_file_checkpoint(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "one")
    assert (tmp_path / "one" / "model.safetensors").is_file()
    ids, mask = batch("left")
    with torch.no_grad():
        got = splittrain.split_model(tmp_path / "one", cuts=(2,))
        assert (got[1](got[0](ids, attention_mask=mask)).logits - model(ids, attention_mask=mask).logits).abs().max() <= TOL


def test_unreachable_hub_repo_says_how_to_log_in(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match=r"hf auth login.*local folder"):
        splittrain.split_model("splittrain-tests/no-such-model", cuts=(1,))


def test_gated_hub_repo_says_how_to_log_in(monkeypatch):
    import transformers.utils.hub as hub
    from huggingface_hub.errors import GatedRepoError

    def gated(*args, **kwargs):
        response = SimpleNamespace(status_code=403, headers={}, request=None, url="config.json")
        raise GatedRepoError("Access to model google/gemma-2b is restricted.", response=response)

    monkeypatch.setattr(hub, "hf_hub_download", gated)
    monkeypatch.setattr(hub, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(PermissionError, match=r"gated repository.*licence.*hf auth login"):
        splittrain.split_model("google/gemma-2b", cuts=(6, 12))
