"""Faults over tcp with real processes: a client SIGKILLed mid-step, a server SIGKILLed and restarted.

Either way no step is lost or applied twice: the runs end with the uninterrupted run's losses and weights.
"""

from __future__ import annotations

import re
import signal
import time

import pytest
import torch

from processes import (
    STEPS,
    Processes,
    assert_same_run,
    free_port,
    make_tokens,
    read_status,
    summary,
    tail,
    wait_for,
)
from splittrain.state import load_state
from splittrain.transport.tcp import TcpTransport

pytestmark = pytest.mark.slow


def status_when(run, predicate, what: str, proc=None, timeout: float = 120.0) -> dict:
    return wait_for(lambda: (s := read_status(run)) and predicate(s) and s, timeout, what, proc,
                    getattr(proc, "log", None))


def test_client_killed_mid_step_then_resumed(reference_run, procs, tmp_path):
    config, ref = reference_run
    tokens, known = make_tokens(tmp_path, "client0")
    server_run, client_run = tmp_path / "server", tmp_path / "client"
    server, address = procs.serve(config, tokens, server_run, "--session_timeout", "3")
    tcp = ("--model.transport", "tcp", "--model.address", address, "--trainer.default_root_dir", str(client_run))
    client = procs.fit(config, *tcp, token=known["client0"])
    status_when(server_run, lambda s: s["step"] >= 6, "step 6", client)

    # Freeze the client, and kill it once the server shows it holding a half-made step (graphs or gradients).
    def caught_mid_step() -> dict | None:
        client.send_signal(signal.SIGSTOP)
        time.sleep(0.7)  # the status file is rewritten every 0.5 s
        s = read_status(server_run)
        held = s["sessions"].get("client0", {})
        if held.get("graphs", 0) or held.get("pending_gradients"):
            return s
        client.send_signal(signal.SIGCONT)
        time.sleep(0.05)
        return None

    frozen = wait_for(caught_mid_step, 60, "the client to be caught mid-step", client, client.log, every=0)
    Processes.signal(client, signal.SIGKILL)
    step = frozen["step"]
    print(f"client killed during step {step + 1} holding {frozen['sessions']['client0']}")
    assert step < STEPS

    # The server frees the dead client's session (graphs and unapplied gradients) and makes no step for it.
    after = status_when(server_run, lambda s: not s["sessions"], "the dead client's session to expire")
    assert after["counters"]["sessions_expired"] == 1 and not after["gradients_waiting"]
    assert after["step"] == step and after["counters"]["steps_applied"] == step
    # Its trunk is the one of the last whole step: what it saved after step `step`.
    probe = TcpTransport(address, "client0", known["client0"], frozen_fingerprint(server_run))
    probe.request("save", {"tag": "probe"}, {})
    probe.close()
    now, saved = (load_state(server_run / "trunk" / "client0" / f"{tag}.safetensors") for tag in ("probe", "latest"))
    assert now["steps"] == saved["steps"] == step
    assert all(torch.equal(now["trainable"][k], saved["trainable"][k]) for k in saved["trainable"])

    # Restarted from its last checkpoint, the client continues exactly.
    resumed_at = (step // 5) * 5
    client = procs.fit(config, *tcp, "--ckpt_path", "last", token=known["client0"], log_name="resumed.log")
    Processes.finish(client, timeout=300)
    losses, reference = summary(client_run)["train_losses"], summary(ref)["train_losses"]
    assert len(losses) == 2 * (STEPS - resumed_at), tail(client.log)
    assert max(abs(a - b) for a, b in zip(losses, reference[2 * resumed_at:])) <= 1e-6
    assert_same_run(client_run, server_run, ref, losses_too=False)
    # SIGTERM: the server saves its trunk and stops cleanly.
    assert Processes.signal(server, signal.SIGTERM) == 0
    assert load_state(server_run / "trunk" / "client0" / "latest.safetensors")["steps"] == STEPS
    assert f"trunk server stopped ('client0' at step {STEPS})" in server.log.read_text()


def frozen_fingerprint(server_run) -> dict:
    """The server's own fingerprint, from its checkpoint (what a client of this split presents)."""
    return load_state(server_run / "trunk" / "client0" / "latest.safetensors")["fingerprint"]


def test_server_killed_and_resumed_client_reconnects(reference_run, procs, tmp_path):
    config, ref = reference_run
    tokens, known = make_tokens(tmp_path, "client0")
    server_run, client_run = tmp_path / "server", tmp_path / "client"
    address = f"127.0.0.1:{free_port()}"
    server, _ = procs.serve(config, tokens, server_run, address=address)
    client = procs.fit(config, "--model.transport", "tcp", "--model.address", address, "--model.reconnect_timeout",
                       "240", "--trainer.default_root_dir", str(client_run), token=known["client0"])
    killed = status_when(server_run, lambda s: s["step"] >= 7, "step 7", client)
    Processes.signal(server, signal.SIGKILL)
    assert client.poll() is None  # the client waits for its server

    server, _ = procs.serve(config, tokens, server_run, "--resume", address=address, log_name="restarted.log")
    Processes.finish(client, timeout=300)
    log = client.log.read_text()
    assert "lost the trunk server" in log and "reconnected" in log and "replaying" in log
    resumed = int(re.search(r"resumed the trunk adapter of 'client0' at step (\d+)",
                            (tmp_path / "restarted.log").read_text()).group(1))
    print(f"server killed at step >= {killed['step']}, resumed at step {resumed}; client log:\n"
          + "\n".join(line for line in log.splitlines() if line.startswith("splittrain:")))
    assert killed["step"] <= resumed < STEPS
    final = status_when(server_run, lambda s: s["step"] == STEPS, "the last step")
    # No lost or repeated step: the restarted server applied exactly the steps after its checkpoint.
    assert final["counters"]["steps_applied"] == STEPS - resumed
    assert summary(client_run)["steps"] == STEPS
    assert_same_run(client_run, server_run, ref)
