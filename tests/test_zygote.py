"""The test zygote: a process it forks behaves as the fresh interpreter it stands for."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from processes import FRESH_ENV, Forked, child_env

SHOW = ("import json, os, sys; print(json.dumps({'argv': sys.argv, 'cwd': os.getcwd(), 'path0': sys.path[0], "
        "'token': os.environ.get('SPLITTRAIN_TOKEN'), 'group': os.getpgid(0), 'pid': os.getpid(), "
        "'warm': 'lightning.pytorch' in sys.modules})); sys.exit(3)")


@pytest.fixture
def forking():
    if os.environ.get(FRESH_ENV, "") not in ("", "0"):
        pytest.skip(f"{FRESH_ENV} is set: no process is forked")


def test_a_forked_process_has_its_argv_folder_environment_session_and_exit_code(procs, tmp_path, forking):
    import json

    proc = procs.start([sys.executable, "-c", SHOW, "a", "b"], tmp_path / "show.log",
                       child_env(SPLITTRAIN_TOKEN="t0k"))
    assert isinstance(proc, Forked)
    assert proc.wait(timeout=60) == 3
    seen = json.loads((tmp_path / "show.log").read_text())
    assert seen == {"argv": ["-c", "a", "b"], "cwd": str(tmp_path), "path0": "", "token": "t0k",
                    "group": proc.pid, "pid": proc.pid, "warm": True}


def test_a_forked_process_dies_by_signal_and_prints_its_traceback(procs, tmp_path, forking):
    killed = procs.start([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                         tmp_path / "killed.log")
    failed = procs.start([sys.executable, "-c", "raise ValueError('boom')"], tmp_path / "failed.log")
    asleep = procs.start([sys.executable, "-c", "import time; time.sleep(600)"], tmp_path / "asleep.log")
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert failed.wait(timeout=60) == 1
    assert "ValueError: boom" in (tmp_path / "failed.log").read_text()
    assert asleep.poll() is None
    procs.signal(asleep, signal.SIGTERM)
    assert asleep.returncode == -signal.SIGTERM


def test_python_m_splittrain_runs_its_main_and_other_environments_get_a_fresh_interpreter(procs, tmp_path, forking):
    helped = procs.start([sys.executable, "-m", "splittrain", "serve", "--help"], tmp_path / "help.log")
    assert isinstance(helped, Forked) and helped.wait(timeout=120) == 0
    assert "--session_timeout" in (tmp_path / "help.log").read_text()
    fresh = procs.start([sys.executable, "-c", "import os; print(os.environ['MALLOC_ARENA_MAX'])"],
                        tmp_path / "fresh.log", child_env(MALLOC_ARENA_MAX="2"))  # glibc reads it as it starts
    assert not isinstance(fresh, Forked) and fresh.wait(timeout=60) == 0
    assert (tmp_path / "fresh.log").read_text().strip() == "2"
