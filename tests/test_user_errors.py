"""A user's mistake on the command line: one line ``splittrain: error: ...`` on stderr, exit status 2, no traceback,
nothing changed in the run folder or the inputs; ``--debug`` (or SPLITTRAIN_DEBUG=1) shows the traceback.

Every case runs in this process through ``main()`` with ``sys.argv`` set (as ``python -m splittrain`` runs it, the
stderr file descriptor captured); the same cases run as ``python -m splittrain`` subprocesses too, the ones of
``fit``/``validate``/``test`` marked slow (importing Lightning takes most of their ~8 s).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from processes import child_env, run
from splittrain.cli import main
from splittrain.state import save_state

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "quickstart.yaml")
FIT = ["--config", CONFIG, "--trainer.default_root_dir", "run", "--trainer.max_steps", "2",
       "--trainer.enable_progress_bar", "false", "--data.limit", "16", "--model.eval_generate", "false"]
GOOD_ROW = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


@pytest.fixture(scope="module", autouse=True)
def quickstart_built():
    """The quickstart model is built on first use, with progress lines on stderr: before the cases, not in one."""
    from splittrain.quickstart import model_dir

    model_dir()


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    """The working folder (the cwd): a run folder with a config, a truncated client checkpoint and a trunk
    checkpoint; a second run whose client checkpoint is sound but whose trunk checkpoint is truncated; bad data,
    token, prompt and TLS files."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPLITTRAIN_DEBUG", raising=False)
    for name in ("run", "run2"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "config.yaml").write_text("# the config of an earlier run\n")
        (tmp_path / name / "run.json").write_text(json.dumps({"model": "quickstart", "cuts": [2, 4]}) + "\n")
        save_state({"state_dict": {"w": torch.ones(64)}, "trunk_checkpoint": "step-2"},
                   tmp_path / name / "checkpoints" / "last.ckpt")
        save_state({"trainable": {"a": torch.ones(256)}, "steps": 2},
                   tmp_path / name / "trunk" / "client0" / "step-2.safetensors")
    truncate(tmp_path / "run" / "checkpoints" / "last.ckpt")
    truncate(tmp_path / "run2" / "trunk" / "client0" / "step-2.safetensors", keep=100)
    (tmp_path / "empty-run").mkdir()
    rows = [json.dumps(GOOD_ROW)] * 3
    (tmp_path / "broken.jsonl").write_text("\n".join([rows[0], rows[0][:-9], *rows[1:]]) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    no_answer = {"messages": [{"role": "user", "content": "Hi"}]}
    (tmp_path / "no-answer.jsonl").write_text("\n".join([rows[0], json.dumps(no_answer), rows[1]]) + "\n")
    (tmp_path / "short.json").write_text(json.dumps({"client0": "short"}))
    (tmp_path / "tokens.json").write_text(json.dumps({"client0": "t" * 32}))
    (tmp_path / "broken-tokens.json").write_text("{client0: ")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Hi"}\n{"prompt": \n')
    (tmp_path / "not-a-cert.pem").write_text("not a certificate\n")
    for path in tmp_path.glob("*.json"):
        path.chmod(0o600)
    return tmp_path


def truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep if keep is not None else len(data) // 2])


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file and folder under ``folder``: its bytes (files) and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def busy_port():
    """A port that something listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


# (id, command-line words, fragments the one line must hold); "{port}" is a port in use
CASES = [
    ("bad-value", ["fit", *FIT, "--model.pipeline", "-1"], ["pipeline", "-1"]),
    ("bad-choice", ["fit", *FIT, "--model.client", "half"], ["--model.client", "frozen, lora, full", "half"]),
    ("unknown-recipe", ["fit", *FIT, "--model.recipe", "llama9"], ["--model.recipe", "qwen2", "llama9"]),
    ("bad-cuts", ["fit", *FIT, "--model.cuts", "[2, 9]"], ["model.cuts", "outside 1..5"]),
    ("wrong-recipe", ["fit", *FIT, "--model.recipe", "gemma"], ["model.recipe is 'gemma'", "'qwen2' model"]),
    ("missing-model", ["fit", *FIT, "--model.model", "./no-model"], ["model.model", "no-model"]),
    ("missing-tokenizer", ["fit", *FIT, "--data.tokenizer", "./no-tokenizer"], ["data.tokenizer", "no-tokenizer"]),
    ("unknown-setting", ["fit", *FIT, "--trainer.max_stepz", "3"], ["unrecognized", "max_stepz"]),
    ("missing-config", ["fit", "--config", "missing.yaml"], ["missing.yaml"]),
    ("missing-data", ["fit", *FIT, "--data.train", "missing.jsonl"], ["data.train", "missing.jsonl", "not exist"]),
    ("broken-jsonl", ["fit", *FIT, "--data.train", "broken.jsonl"], ["broken.jsonl:2: not valid JSON"]),
    ("empty-data", ["fit", *FIT, "--data.val", "empty.jsonl"], ["empty.jsonl holds no rows"]),
    ("no-assistant", ["fit", *FIT, "--data.train", "no-answer.jsonl"],
     ["no-answer.jsonl:2:", "no assistant turn"]),
    ("truncated-ckpt", ["fit", *FIT, "--ckpt_path", "last"], ["run/checkpoints/last.ckpt", "truncated or corrupt"]),
    ("truncated-ckpt-file", ["validate", *FIT, "--ckpt_path", "run/checkpoints/last.ckpt"],
     ["run/checkpoints/last.ckpt", "truncated or corrupt"]),
    ("truncated-trunk", ["test", *FIT, "--trainer.default_root_dir", "run2", "--ckpt_path", "last"],
     ["run2/trunk/client0/step-2.safetensors", "truncated or corrupt"]),
    ("no-checkpoint", ["validate", *FIT, "--trainer.default_root_dir", "empty-run", "--ckpt_path", "last"],
     ["no checkpoint", "has `fit` run"]),
    ("missing-ckpt", ["test", *FIT, "--ckpt_path", "missing.ckpt"], ["missing.ckpt"]),
    ("short-token", ["serve", "--config", CONFIG, "--tokens", "short.json"], ["shorter than 16 characters"]),
    ("missing-tokens", ["serve", "--config", CONFIG, "--tokens", "missing.json"], ["missing.json", "not exist"]),
    ("port-in-use", ["serve", "--config", CONFIG, "--tokens", "tokens.json", "--address", "127.0.0.1:{port}"],
     ["127.0.0.1:{port}", "in use"]),
    ("bad-host", ["serve", "--config", CONFIG, "--tokens", "tokens.json", "--address", "nohost.invalid:7000"],
     ["cannot resolve", "nohost.invalid"]),
    ("bad-port", ["serve", "--config", CONFIG, "--tokens", "tokens.json", "--address", "127.0.0.1:99999"],
     ["HOST:PORT", "99999"]),
    ("missing-tls", ["serve", "--config", CONFIG, "--tokens", "tokens.json", "--tls_cert", "cert.pem",
                     "--tls_key", "key.pem"], ["--tls_cert cert.pem", "no such file"]),
    ("bad-tls", ["serve", "--config", CONFIG, "--tokens", "tokens.json", "--tls_cert", "not-a-cert.pem",
                 "--tls_key", "not-a-cert.pem"], ["not a PEM certificate"]),
    ("serve-bad-value", ["serve", "--config", CONFIG, "--tokens", "tokens.json", "--model.cuts", "[4, 2]"],
     ["model.cuts", "increasing"]),
    ("serve-missing-option", ["serve", "--config", CONFIG], ["serve", "--tokens", "required"]),
    ("broken-prompts", ["generate", "--config", CONFIG, "--prompts", "prompts.jsonl"],
     ["prompts.jsonl:2: not valid JSON"]),
    ("generate-dist", ["generate", "--config", CONFIG, "--prompt", "Hi", "--model.transport", "dist"],
     ["transport dist", "torchrun", "--model.transport local"]),
    ("broken-tokens-file", ["token", "--tokens", "broken-tokens.json", "--client", "c1", "--out", "c1.token"],
     ["broken-tokens.json"]),
    ("export-truncated", ["export", "--run", "run", "--out", "exported"], ["last.ckpt", "truncated or corrupt"]),
    ("export-no-run", ["export", "--run", "empty-run", "--out", "exported"], ["empty-run", "run.json"]),
    ("no-command", [], ["required", "command"]),
]
LIGHTNING = {"fit", "validate", "test"}


def words_of(case: tuple, port: int) -> tuple[list[str], list[str]]:
    _, words, fragments = case
    return [w.replace("{port}", str(port)) for w in words], [f.replace("{port}", str(port)) for f in fragments]


def assert_one_line(status: int | None, err: str, out: str, fragments: list[str]) -> None:
    lines = err.splitlines()
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("splittrain: error: "), err
    assert "Traceback" not in err + out
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_and_changes_nothing(case, inputs, busy_port, capfd, monkeypatch):
    words, fragments = words_of(case, busy_port)
    monkeypatch.setattr(sys, "argv", ["splittrain", *words])
    before = snapshot(inputs)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capfd.readouterr()
    assert_one_line(exited.value.code, err, out, fragments)
    assert snapshot(inputs) == before  # no run folder, checkpoint, data or token file written or touched


def run_splittrain(words: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "splittrain", *words], cwd, child_env(**env), timeout=120)


# One case per path a mistake takes out of a real process (each start costs seconds; the test above covers every
# case in process): the argument parser, the data module under Lightning, a checkpoint, serve's bind, a command
# without a model.
SUBPROCESS_CASES = [pytest.param(c, id=c[0], marks=[pytest.mark.slow] if c[1] and c[1][0] in LIGHTNING else [])
                    for c in CASES if c[0] in {"bad-choice", "broken-jsonl", "truncated-trunk", "port-in-use",
                                               "broken-tokens-file"}]


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_python_m_splittrain_prints_one_line(case, inputs, busy_port):
    words, fragments = words_of(case, busy_port)
    before = snapshot(inputs)
    done = run_splittrain(words, inputs)
    assert_one_line(done.returncode, done.stderr, done.stdout, fragments)
    assert snapshot(inputs) == before


def test_debug_shows_the_traceback(inputs, capfd, monkeypatch):
    words = ["serve", "--config", CONFIG, "--tokens", "short.json"]
    for flag, env in ((["--debug"], {}), ([], {"SPLITTRAIN_DEBUG": "1"})):
        done = run_splittrain([*words, *flag], inputs, **env)
        assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr
        assert done.stderr.rstrip().splitlines()[-1].startswith("splittrain.errors.UserError: the token of client")
    monkeypatch.setattr(sys, "argv", ["splittrain", "--debug", *words])
    with pytest.raises(ValueError, match="shorter than 16 characters"):  # in process: the exception itself
        main()


def test_main_with_arguments_raises_instead():
    """Notebooks and tests call ``main([...])``: they get the exception, not an exit."""
    from splittrain.errors import UserError

    with pytest.raises(UserError, match="serve: the following arguments are required: --tokens"):
        main(["serve", "--config", CONFIG])


def test_a_run_that_fails_after_its_setup_leaves_the_run_folder_alone(inputs, capfd, monkeypatch):
    """Lightning saves config.yaml at setup; ours waits until the run has started: a client that cannot reach its
    trunk server (found after the data and the model loaded) leaves the earlier run's config.yaml as it was."""
    (inputs / "client0.token").write_text("t" * 32 + "\n")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(sys, "argv", ["splittrain", "fit", *FIT, "--model.transport", "tcp", "--model.address",
                                      f"127.0.0.1:{port}", "--model.token_file", "client0.token",
                                      "--model.reconnect_timeout", "0.5", "--model.timeout", "2"])
    before = snapshot(inputs)
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capfd.readouterr()
    assert exited.value.code == 2 and "Traceback" not in err + out
    last = err.splitlines()[-1]  # after the data's progress bars and the client's "waiting for the server" lines
    assert last.startswith("splittrain: error: ") and f"127.0.0.1:{port}" in last
    assert snapshot(inputs) == before
