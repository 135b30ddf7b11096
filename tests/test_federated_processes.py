"""Several clients across real process boundaries: torchrun (rank 0 the server) and tcp (one serve, a fit per
client, secure aggregation) give the one-process simulation's numbers; a client killed mid-run is dropped."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import torch

from processes import Processes, make_tokens, read_status, wait_for, write_config
from splittrain.state import load_state

pytestmark = pytest.mark.slow

STEPS = 6
# round_timeout: a client rank starting minutes after another on a loaded machine is slow, not gone
FEDERATED = {"clients": 2, "average": "gradients", "trunk_update": "sync", "round_timeout": 300}


def config(folder: Path, run: Path, **federated) -> Path:
    return write_config(folder / "config.yaml", run, steps=STEPS, every=3, batch_size=4, limit=120,
                        model={"client": "lora", "federated": {**FEDERATED, **federated}})


def client_figures(run: Path) -> dict:
    figures = {}
    for path in sorted(run.glob("summary*.json")):
        figures.update(json.loads(path.read_text())["clients"])
    return figures


def weights(client_run: Path, server_run: Path) -> dict[str, torch.Tensor]:
    client = load_state(client_run / "checkpoints" / "last.ckpt")["state_dict"]
    trunk = load_state(server_run / "trunk" / f"step-{STEPS}.safetensors")["trainable"]
    return {**{f"client.{k}": v for k, v in client.items()}, **{f"trunk.{k}": v for k, v in trunk.items()}}


def assert_same(figures: dict, reference: dict, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                clients: int, tolerance: float = 1e-6) -> None:
    for c in range(clients):
        a, b = figures[f"client{c}"]["train_losses"], reference[f"client{c}"]["train_losses"]
        assert len(a) == len(b) == STEPS
        worst = max(abs(x - y) for x, y in zip(a, b))
        assert worst <= tolerance, f"client{c}: largest per-step loss difference {worst}"
    assert got.keys() == want.keys() and any(k.startswith("trunk.") for k in got)
    diff = max((got[k] - want[k]).abs().max().item() for k in got)
    print(f"largest trainable-weight difference {diff:.3g} over {len(got)} tensors")
    assert diff <= tolerance, f"largest trainable-weight difference {diff}"


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """The one-process simulations every multi-process run must reproduce, by number of clients."""
    from splittrain.cli import main

    runs = {}
    for name, federated in {2: {"clients": 2}, 3: {"clients": 3},
                            "fedavg": {"clients": 2, "average": "weights", "average_every": 2}}.items():
        folder = tmp_path_factory.mktemp(f"simulated{name}")
        cfg = config(folder, folder / "run", **federated)
        main(["fit", "--config", str(cfg)])
        runs[name] = (cfg, folder / "run")
    return runs


def test_torchrun_clients_equal_the_simulation(simulated, procs, tmp_path):
    """Three clients and the server in one torchrun job (two clients: over tcp, below)."""
    clients = 3
    cfg, ref = simulated[clients]
    run = tmp_path / "dist"
    proc = procs.start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                        str(clients + 1), "-m", "splittrain", "fit", "--config", str(cfg), "--model.transport", "dist",
                        "--trainer.default_root_dir", str(run)], tmp_path / "torchrun.log")
    Processes.finish(proc, timeout=400)
    assert_same(client_figures(run), client_figures(ref), weights(run, run), weights(ref, ref), clients)


@pytest.mark.parametrize("setup", [2, "fedavg"])
def test_tcp_clients_equal_the_simulation(simulated, procs, tmp_path, setup):
    cfg, ref = simulated[setup]
    tokens, known = make_tokens(tmp_path, "alice", "bob")
    server_run = tmp_path / "server"
    server, address = procs.serve(cfg, tokens, server_run)
    fits = [procs.fit(cfg, "--model.transport", "tcp", "--model.address", address, "--model.client_name", name,
                      "--model.federated.client_index", str(index), "--trainer.default_root_dir",
                      str(tmp_path / name), token=known[name], log_name=f"{name}.log")
            for index, name in enumerate(("alice", "bob"))]
    for fit in fits:
        Processes.finish(fit, timeout=400)
    figures = {**client_figures(tmp_path / "alice"), **client_figures(tmp_path / "bob")}
    assert_same(figures, client_figures(ref), weights(tmp_path / "alice", server_run), weights(ref, ref), 2)
    bob = load_state(tmp_path / "bob" / "checkpoints" / "last.ckpt")["state_dict"]
    alice = load_state(tmp_path / "alice" / "checkpoints" / "last.ckpt")["state_dict"]
    assert all((alice[k] - bob[k]).abs().max() <= 1e-6 for k in alice)  # one client-side model
    status = read_status(server_run)
    # gradients: every step's average went through secure aggregation; weights: every second step's
    assert status["counters"]["aggregations"] == 2 * (STEPS if setup == 2 else STEPS // 2)


def test_a_killed_client_is_dropped_and_the_others_finish(procs, tmp_path):
    cfg = config(tmp_path, tmp_path / "unused", clients=3, round_timeout=8)
    tokens, known = make_tokens(tmp_path, "c0", "c1", "c2")
    server_run = tmp_path / "server"
    server, address = procs.serve(cfg, tokens, server_run)
    fits = {name: procs.fit(cfg, "--model.transport", "tcp", "--model.address", address, "--model.client_name", name,
                            "--model.federated.client_index", str(index), "--trainer.default_root_dir",
                            str(tmp_path / name), token=known[name], log_name=f"{name}.log")
            for index, name in enumerate(("c0", "c1", "c2"))}
    wait_for(lambda: (s := read_status(server_run)) and s["federated_step"] >= 2, 300, "two federated steps",
             server, server.log)
    Processes.signal(fits["c2"], signal.SIGKILL)
    for name in ("c0", "c1"):
        Processes.finish(fits[name], timeout=300)
    log = (tmp_path / "server.log").read_text()
    assert "without client(s) 2 ('c2')" in log
    status = read_status(server_run)
    assert status["federated_step"] == STEPS and 2 in status["dropped"]
    for name in ("c0", "c1"):
        figures = client_figures(tmp_path / name)
        assert figures[f"client{['c0', 'c1'].index(name)}"]["steps_taken"] == STEPS
