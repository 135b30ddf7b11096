"""`python -m splittrain fit/validate/export` end to end on the embedded quickstart (few steps)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from splittrain.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "quickstart.yaml")


@pytest.fixture(autouse=True)
def quickstart_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPLITTRAIN_CACHE", str(tmp_path_factory.getbasetemp() / "splittrain-cache"))


def fit(run: Path, *extra: str, steps: int = 6):
    return main(["fit", "--config", CONFIG, "--trainer.default_root_dir", str(run),
                 "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "3",
                 "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
                 "--trainer.enable_model_summary", "false", "--trainer.callbacks.init_args.every_n_train_steps", "3",
                 "--data.limit", "64", "--data.batch_size", "8", "--model.sample_prompt", "null",
                 "--model.eval_generate", "false", *extra])


def test_fit_writes_summary_config_and_safetensors_checkpoints(tmp_path):
    run = tmp_path / "run"
    cli = fit(run)
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary) == {"train_loss_first", "train_loss_last", "val_loss", "val_perplexity",
                            "val_token_accuracy", "steps", "seconds", "tokens_per_second", "wire_bytes", "train_losses"}
    assert summary["steps"] == 6 and summary["wire_bytes"] > 0 and summary["tokens_per_second"] > 0
    assert summary["train_loss_first"] == pytest.approx(cli.model._stats["losses"][0])
    assert 0 < summary["val_token_accuracy"] <= 1 and summary["val_perplexity"] == pytest.approx(
        torch.tensor(summary["val_loss"]).exp().item(), rel=0.05)
    assert (run / "config.yaml").is_file() and (run / "run.json").is_file()
    # Both parties' checkpoints are safetensors: the client's (Lightning's name kept) and the trunk's own.
    with safe_open(str(run / "checkpoints" / "last.ckpt"), "pt") as f:
        client_keys = set(f.keys())
    assert client_keys and (run / "trunk" / "client0" / "step-6.safetensors").is_file()
    with safe_open(str(run / "trunk" / "client0" / "step-6.safetensors"), "pt") as f:
        assert len(list(f.keys())) > 0


def test_resume_equals_uninterrupted_run(tmp_path):
    """Stopped after step 3 (mid-epoch: 8 batches an epoch) and resumed with --ckpt_path last."""
    whole = fit(tmp_path / "whole", "--model.client", "lora").model._stats["losses"]
    fit(tmp_path / "parts", "--model.client", "lora", steps=3)
    resumed = fit(tmp_path / "parts", "--model.client", "lora", "--ckpt_path", "last").model._stats["losses"]
    assert len(whole) == 6 and len(resumed) == 3
    for a, b in zip(resumed, whole[3:]):
        assert abs(a - b) <= 1e-6, (resumed, whole)


def _split_logits(cli, ids):
    with torch.no_grad():
        return cli.model({"input_ids": ids}).logits


def test_export_lora_run_loads_in_plain_peft(tmp_path):
    run, out = tmp_path / "run", tmp_path / "adapter"
    cli = fit(run, "--model.client", "lora")
    main(["export", "--run", str(run), "--out", str(out)])
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    ids = torch.tensor([[1, 5, 40, 77, 100, 2, 1, 9]])
    expected = _split_logits(cli, ids)
    base = json.loads((run / "run.json").read_text())["model"]
    # Loaded in a fresh interpreter where splittrain cannot be imported.
    code = (
        "import sys, torch; sys.modules['splittrain'] = None\n"
        "from transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n"
        f"m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {str(out)!r}).eval()\n"
        "from safetensors.torch import save_file\n"
        f"save_file({{'logits': m(torch.tensor({ids.tolist()})).logits.detach()}}, {str(tmp_path / 'logits.safetensors')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    got = load_file(tmp_path / "logits.safetensors")["logits"]
    assert (got - expected).abs().max() <= 1e-5


def test_export_full_client_run_is_a_merged_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    run, out = tmp_path / "run", tmp_path / "merged"
    cli = fit(run)  # the quickstart trains the client in full
    main(["export", "--run", str(run), "--out", str(out)])
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 40, 77, 100, 2, 1, 9]])
    with torch.no_grad():
        assert (model(ids).logits - _split_logits(cli, ids)).abs().max() <= 1e-5


def test_bad_config_values_are_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        fit(tmp_path / "run", "--model.client", "half")
    assert "client" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"outside 1\.\.5"):
        fit(tmp_path / "run2", "--model.cuts", "[2, 9]")
    with pytest.raises(ValueError, match=r"unknown part\(s\) \['middle'\]; parts: bottom, trunk, top"):
        fit(tmp_path / "run3", "--model.device_map", "{middle: cpu}")


def test_export_needs_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="run.json"):
        main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "out")])


def test_validate_restores_both_sides_from_a_checkpoint(tmp_path):
    run = tmp_path / "run"
    fit(run, "--model.client", "lora")
    summary = json.loads((run / "summary.json").read_text())
    cli = main(["validate", "--config", CONFIG, "--trainer.default_root_dir", str(run), "--model.client", "lora",
                "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false",
                "--data.limit", "64", "--data.batch_size", "8", "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    assert cli.trainer.callback_metrics["val_loss"].item() == pytest.approx(summary["val_loss"], abs=1e-6)


def test_main_takes_a_dict_like_a_notebook_would(tmp_path):
    cli = main({"fit": {
        "trainer": {"max_steps": 2, "default_root_dir": str(tmp_path), "enable_progress_bar": False,
                    "limit_val_batches": 1},
        "model": {"model": "quickstart", "cuts": [2, 4], "client": "lora"},
        "data": {"train": "quickstart", "tokenizer": "quickstart", "limit": 32, "batch_size": 8},
    }})
    assert cli.model.global_step == 2 and cli.model.server.steps == 2
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
