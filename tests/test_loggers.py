"""Watching a run: every fit/validate/test logs to Lightning's CSVLogger (and TensorBoard's when tensorboard is
installed) under RUN/logs/version_N, ``trainer.logger`` replaces them (``false``: none), and fit draws curves.png
beside summary.json."""

from __future__ import annotations

import csv
import json
import re
import struct
import sys
import warnings
from importlib.util import find_spec
from pathlib import Path

import pytest

from splittrain.cli import main, write_curves
from test_cli import CONFIG, fit
from test_federated import quickstart_fit

STEP_FIGURES = {"train_loss", "lr/client", "lr/trunk", "tokens_per_second", "wire_bytes_per_step"}


def rows(path: Path) -> list[dict[str, float]]:
    """metrics.csv as rows of the columns each has a value in."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def column(table: list[dict[str, float]], name: str) -> list[float]:
    return [row[name] for row in table if name in row]


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, checked to be one (its signature, then the IHDR chunk first)."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """A 6-step quickstart fit with the default loggers, and the warnings it raised."""
    run = tmp_path_factory.mktemp("loggers") / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(run)
    return run, json.loads((run / "summary.json").read_text()), caught


def test_quickstart_writes_a_csv_log_that_ends_where_summary_json_does(quickstart):
    run, summary, caught = quickstart
    table = rows(run / "logs" / "version_0" / "metrics.csv")
    # 6 steps against the config's log_every_n_steps 10: a run this short logs every step (Lightning's step N - 1)
    train = [row for row in table if "train_loss" in row]
    assert [row["step"] for row in train] == [0, 1, 2, 3, 4, 5]
    assert all(STEP_FIGURES <= set(row) for row in train)
    assert column(table, "train_loss") == summary["train_losses"]
    assert column(table, "train_loss")[-1] == summary["train_loss_last"]
    assert all(row["tokens_per_second"] > 0 and row["wire_bytes_per_step"] > 0 for row in train)
    # warm-up of 20 steps on both sides: the rate each step leaves is lr * steps / 20, on the server too
    assert column(table, "lr/trunk") == pytest.approx([0.002 * step / 20 for step in range(1, 7)])
    assert column(table, "lr/client") == pytest.approx(column(table, "lr/trunk"))
    # validation after steps 3 and 6, and once more for summary.json
    assert len(column(table, "val_loss")) == 3 and column(table, "val_loss")[-1] == pytest.approx(summary["val_loss"])
    assert {"val_perplexity", "val_token_accuracy", "train_perplexity"} <= {k for row in table for k in row}
    # the run folder stays where it was: checkpoints, config and trunk beside the logs, not inside them
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    assert (run / "trunk" / "client0" / "step-6.safetensors").is_file()
    logging = [str(w.message) for w in caught if "/loggers/" in w.filename.replace("\\", "/")
               or re.search(r"log_every_n_steps|logs directory|tensorboardX", str(w.message))]
    assert not logging, logging


@pytest.mark.skipif(find_spec("tensorboard") is None, reason="tensorboard is not installed (the tensorboard extra)")
def test_quickstart_writes_tensorboard_events(quickstart):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, summary, _ = quickstart
    events = EventAccumulator(str(run / "logs" / "version_0"))
    events.Reload()
    assert STEP_FIGURES | {"val_loss"} <= set(events.Tags()["scalars"])
    train = events.Scalars("train_loss")
    assert [e.step for e in train] == [0, 1, 2, 3, 4, 5]
    assert train[-1].value == pytest.approx(summary["train_loss_last"], rel=1e-6)  # stored as float32


def test_fit_draws_curves_png(quickstart):
    run, _, _ = quickstart
    path = run / "curves.png"
    assert png_size(path) == (1000, 360) and 10_000 < path.stat().st_size < 500_000


def test_curves_need_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if matplotlib were absent
    assert write_curves({"train_loss": {1: 2.0}}, tmp_path / "curves.png") is None
    assert not (tmp_path / "curves.png").exists()


def test_trainer_logger_replaces_the_default_and_false_turns_logging_off(tmp_path):
    other = tmp_path / "config.yaml"
    other.write_text(json.dumps({"trainer": {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                                        "init_args": {"save_dir": str(tmp_path / "mine"),
                                                                      "name": "csv"}}}}))
    fit(tmp_path / "run", "--config", str(other), steps=3)
    table = rows(tmp_path / "mine" / "csv" / "version_0" / "metrics.csv")
    assert column(table, "train_loss") == json.loads((tmp_path / "run" / "summary.json").read_text())["train_losses"]
    assert not (tmp_path / "run" / "logs").exists() and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()

    fit(tmp_path / "quiet", "--trainer.logger", "false", steps=3)
    assert not (tmp_path / "quiet" / "logs").exists() and not (tmp_path / "quiet" / "lightning_logs").exists()
    assert (tmp_path / "quiet" / "summary.json").is_file() and (tmp_path / "quiet" / "curves.png").is_file()


def test_validate_logs_to_a_new_version(quickstart):
    run, summary, _ = quickstart
    main(["validate", "--config", CONFIG, "--trainer.default_root_dir", str(run), "--trainer.limit_val_batches", "2",
          "--trainer.enable_progress_bar", "false", "--data.limit", "64", "--data.batch_size", "8",
          "--ckpt_path", "last"])
    table = rows(run / "logs" / "version_1" / "metrics.csv")
    assert column(table, "val_loss") == pytest.approx([summary["val_loss"]], abs=1e-6)


def test_federated_run_logs_each_clients_curve(tmp_path):
    run = tmp_path / "run"
    quickstart_fit(run)
    summary = json.loads((run / "summary.json").read_text())
    table = rows(run / "logs" / "version_0" / "metrics.csv")
    assert column(table, "train_loss")[-1] == summary["train_loss_last"]
    for name, figures in summary["clients"].items():
        # a client's loss at the steps it took part in, none at those it sat out
        assert column(table, f"train_loss/{name}") == figures["train_losses"]
        assert column(table, f"val_loss/{name}") == pytest.approx([figures["val_loss_own_shard"]])
    assert len(column(table, "lr/trunk")) == 6
    assert png_size(run / "curves.png") == (1000, 360)
