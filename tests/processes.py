"""Real processes for transport tests: servers on free loopback ports, ended by pid whatever happens.

Every process is started in a session of its own and killed by its process-group id (= its pid) at the end of
the test, so a torchrun and its workers go too. Waits are bounded; a process that exits early fails the test
with its log.

``python -m splittrain ...`` and ``python -c ...`` are forked from a zygote that imported the libraries once
(``tests/zygote.py``: it saves each about 6 s of CPU) unless ``SPLITTRAIN_TEST_FRESH_PROCESSES=1``, the
environment differs from the zygote's in a variable a process reads as it starts, or no zygote could start;
then, and for every other command, a fresh interpreter.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml

from splittrain.state import load_state

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
"""Optimizer steps of the reference run every transport must reproduce."""
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def free_ports(count: int = 1) -> int:
    """A port P with P .. P + count - 1 free on 127.0.0.1 right now (replica r listens on P + r).

    Picked below the kernel's ephemeral range where there is room: no outgoing connection's own port and no bind to
    port 0 (gloo's, torchrun's, another test's) lands there, so nothing takes it before the test's server binds it,
    and a client retrying while its server is down cannot connect to itself."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 1024
    for _ in range(200):
        if low - count > 10_000:
            base = random.SystemRandom().randrange(10_000, low - count)  # whatever seed the tests set
        else:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                base = probe.getsockname()[1]
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"found no {count} consecutive free ports on 127.0.0.1")


def free_port() -> int:
    """A port free on 127.0.0.1 right now (see :func:`free_ports`)."""
    return free_ports(1)


def child_env(**extra: str) -> dict[str, str]:
    """Environment for child processes: offline, loopback-only gloo, the test's cache folder."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONUNBUFFERED": "1"}
    env.pop("SPLITTRAIN_TOKEN", None)
    env.update(extra)
    return env


def write_config(path: Path, run_dir: Path, **trainer_and_model: Any) -> Path:
    """The quickstart config, made small: few steps, small batches, checkpoints every ``every`` steps.

    Keyword arguments ``steps``, ``every``, ``accumulate``, ``clip``, ``batch_size``, ``limit`` and ``model``
    (a dict merged into the model section).
    """
    config = yaml.safe_load(QUICKSTART.read_text())
    steps = trainer_and_model.get("steps", 20)
    every = trainer_and_model.get("every", 10)
    config["trainer"].update({
        "max_steps": steps, "default_root_dir": str(run_dir), "val_check_interval": every,
        "limit_val_batches": 2, "enable_progress_bar": False, "enable_model_summary": False,
        "accumulate_grad_batches": trainer_and_model.get("accumulate", 1),
        "gradient_clip_val": trainer_and_model.get("clip"), "num_sanity_val_steps": 0,
    })
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = every
    config["model"]["sample_prompt"] = None
    config["model"]["eval_generate"] = False
    config["model"].update(trainer_and_model.get("model", {}))
    config["data"].update({"batch_size": trainer_and_model.get("batch_size", 8),
                           "limit": trainer_and_model.get("limit", 400)})
    path.write_text(yaml.safe_dump(config))
    return path


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, proc: subprocess.Popen | None = None,
             log: Path | None = None, every: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s or if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) while waiting for {what}:\n{tail(log)}")
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{tail(log)}")


def tail(log: Path | None, lines: int = 60) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def read_status(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "server_status.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


FRESH_ENV = "SPLITTRAIN_TEST_FRESH_PROCESSES"
RUNTIME_ENV = re.compile(r"SPLITTRAIN_\w+|PYTEST_CURRENT_TEST|MASTER_ADDR|MASTER_PORT|RANK|LOCAL_RANK|WORLD_SIZE")
"""Variables read when a process runs, not as it starts: a forked process may set them otherwise than the zygote."""
PR_SET_CHILD_SUBREAPER = 36


class Forked:
    """A process the zygote forked for this one, which (a child subreaper) inherits it: waited for, signalled and
    killed by its pid like a ``Popen``."""

    def __init__(self, pid: int, args: list[str]) -> None:
        self.pid, self.args, self.returncode = pid, args, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


class Zygote:
    """The session's zygote (``tests/zygote.py``), started at its first use and killed by pid when pytest exits."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        self.socket = ""
        self.broken = False

    def fork(self, args: list[str], env: dict[str, str], cwd: Path, stdout: Path, stderr: Path | None = None
             ) -> Forked | None:
        """The process ``args`` forked from the zygote, its output appended to ``stdout`` (and ``stderr``, else
        the same file), or None where it takes a fresh interpreter."""
        forkable = (len(args) >= 2 and args[0] == sys.executable
                    and (args[1] == "-c" or args[1:3] == ["-m", "splittrain"]))
        if not forkable or self.broken or os.environ.get(FRESH_ENV, "") not in ("", "0"):
            return None
        if self.proc is None:
            # started from the main thread only: the zygote goes when the thread that started it ends
            if threading.current_thread() is not threading.main_thread() or not self._start():
                return None
        if any(env.get(k) != self.env.get(k) and not RUNTIME_ENV.fullmatch(k) for k in {*env, *self.env}):
            return None
        request = {"argv": args[1:], "env": env, "cwd": str(cwd), "stdout": str(stdout),
                   "stderr": str(stderr or stdout)}
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(60)
                conn.connect(self.socket)
                conn.sendall(json.dumps(request).encode() + b"\n")
                return Forked(json.loads(conn.makefile("rb").readline())["pid"], args)
        except (OSError, ValueError, KeyError) as exc:
            print(f"tests: the zygote stopped answering ({exc!r}); fresh interpreters from now on", file=sys.stderr)
            self.broken = True
            return None

    def _start(self) -> bool:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1) != 0:  # the forked processes must come to this one
            self.broken = True
            return False
        folder = Path(tempfile.mkdtemp(prefix="splittrain-zygote-"))
        self.socket, self.env, log = str(folder / "zygote.sock"), child_env(), folder / "zygote.log"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("zygote.py")), self.socket],
                                         stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        atexit.register(self.close, folder)
        try:
            wait_for(lambda: b"ready" in log.read_bytes(), 120, "the test zygote", self.proc, log)
        except AssertionError as exc:
            print(f"tests: no zygote, fresh interpreters instead: {exc}", file=sys.stderr)
            self.close(folder)
            self.broken = True
            return False
        return True

    def close(self, folder: Path) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


ZYGOTE = Zygote()


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True)``, forked from the zygote where it can be; killed by
    its pid if it outlives ``timeout``."""
    folder = Path(tempfile.mkdtemp(prefix="splittrain-run-"))
    try:
        proc = ZYGOTE.fork(args, env, cwd, folder / "stdout", folder / "stderr")
        if proc is None:
            return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                Processes.signal(proc, signal.SIGKILL)
        out, err = ((folder / name).read_text(errors="replace") if (folder / name).exists() else ""
                    for name in ("stdout", "stderr"))
        return subprocess.CompletedProcess(args, proc.returncode, out, err)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class Processes:
    """Starts processes for one test and ends every one of them, by pid, when the test ends."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[subprocess.Popen | Forked] = []

    def start(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen | Forked:
        env = env or child_env()
        proc = ZYGOTE.fork(args, env, self.folder, log)
        if proc is None:
            with open(log, "ab") as out:
                proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.folder,
                                        start_new_session=True)
        proc.log = log  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def serve(self, config: Path, tokens: Path, run_dir: Path, *extra: str, address: str = "127.0.0.1:0",
              log_name: str = "server.log", wait: bool = True) -> tuple[subprocess.Popen, str | None]:
        """``python -m splittrain serve`` in the background; returns it and (``wait``) the address it listens on."""
        log = self.folder / log_name
        start = log.stat().st_size if log.exists() else 0
        proc = self.start([sys.executable, "-m", "splittrain", "serve", "--config", str(config), "--address", address,
                           "--tokens", str(tokens), "--run_dir", str(run_dir), *extra], log)
        proc.log_start = start  # type: ignore[attr-defined]
        return proc, (self.address_of(proc) if wait else None)

    @staticmethod
    def address_of(proc: subprocess.Popen, timeout: float = 180.0) -> str:
        """Wait until a ``serve`` process says where it listens."""

        def listening() -> str | None:
            with open(proc.log, "rb") as f:  # type: ignore[attr-defined]
                f.seek(proc.log_start)  # type: ignore[attr-defined]
                found = re.findall(r"listening on (\S+)", f.read().decode(errors="replace"))
            return found[-1] if found else None

        return wait_for(listening, timeout, "the trunk server to listen", proc, proc.log)  # type: ignore[attr-defined]

    def fit(self, config: Path, *extra: str, token: str | None = None, log_name: str = "client.log",
            env: dict[str, str] | None = None) -> subprocess.Popen:
        """``python -m splittrain fit`` in the background."""
        env = env or child_env(**({"SPLITTRAIN_TOKEN": token} if token else {}))
        return self.start([sys.executable, "-m", "splittrain", "fit", "--config", str(config), *extra],
                          self.folder / log_name, env)

    @staticmethod
    def signal(proc: subprocess.Popen, sig: int = signal.SIGKILL, timeout: float = 60.0) -> int:
        """Send ``sig`` to the process's group (its pid) and wait for it to end."""
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        return proc.wait(timeout=timeout)

    @staticmethod
    def finish(proc: subprocess.Popen, timeout: float) -> None:
        """Wait for ``proc`` to exit 0 (bounded), failing with its log otherwise."""
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process still running after {timeout} s:\n{tail(proc.log)}") from None
        assert code == 0, f"process exited {code}:\n{tail(proc.log)}"

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                self.signal(proc, signal.SIGKILL, timeout=30)


def make_tokens(folder: Path, *names: str) -> tuple[Path, dict[str, str]]:
    """tokens.json for ``names`` with fresh tokens (mode 600)."""
    from splittrain.transport.tcp import make_token

    tokens = {name: make_token() for name in names}
    path = folder / "tokens.json"
    path.write_text(json.dumps(tokens))
    path.chmod(0o600)
    return path, tokens


def self_signed(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made by the openssl command (tests that need one skip
    without it: ``needs_openssl``)."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test "
                                   "certificate")


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def final_weights(client_run: Path, server_run: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    """The client's trainable tensors (its last checkpoint) and the trunk's (the server's checkpoint)."""
    state = load_state(client_run / "checkpoints" / "last.ckpt")
    assert state["trunk_checkpoint"] == f"step-{step}"
    trunk = load_state(server_run / "trunk" / state["trunk_file"])["trainable"]  # client0/step-N: its own adapter's
    return {**{f"client.{k}": v for k, v in state["state_dict"].items()}, **{f"trunk.{k}": v for k, v in trunk.items()}}


def assert_same_run(client_run: Path, server_run: Path, reference: Path, tolerance: float = 1e-6,
                    losses_too: bool = True) -> None:
    """Per-micro-batch losses (``losses_too``) and final trainable weights of both sides match ``reference``."""
    if losses_too:
        got, want = summary(client_run)["train_losses"], summary(reference)["train_losses"]
        assert len(got) == len(want) == 2 * STEPS  # accumulation 2: two micro-batches per step
        worst = max(abs(a - b) for a, b in zip(got, want))
        print(f"{client_run.name}: largest per-micro-batch loss difference {worst:.3g}")
        assert worst <= tolerance, f"largest per-micro-batch loss difference {worst}"
    a, b = final_weights(client_run, server_run), final_weights(reference, reference)
    assert a.keys() == b.keys() and any(k.startswith("trunk.") for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"{client_run.name}: largest trainable-weight difference {diff:.3g} over {len(a)} tensors")
    assert diff <= tolerance, f"largest trainable-weight difference {diff}"


