"""Several server processes for one trunk (``serve`` under torchrun, gloo on loopback): 2 replicas x 2 tcp clients
give what one server of 4 clients gives (the one-process simulation of 4 clients, which one tcp server reproduces:
test_federated_processes); a replica killed mid-run stops the run with a message naming it; a replica started with
another config is refused on both sides."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import threading
from types import SimpleNamespace

import pytest
import torch

from processes import (Processes, child_env, free_port, free_ports, make_tokens, read_status, tail, wait_for,
                       write_config)
from splittrain.federated import FederatedSettings
from splittrain.federated.trunk import TrunkFederation
from splittrain.server.replicas import Replicas
from splittrain.state import load_state

STEPS = 4
FEDERATED = {"clients": 4, "average": "gradients", "trunk_update": "sync", "round_timeout": 300}
LISTENING = re.compile(r"listening on (\S+) .*?trunk replica (\d+) of (\d+) \(pid (\d+)\)")


def test_a_replica_serves_its_share_of_the_clients():
    """Replica 0 of 2 serves clients 0 and 2, waits for them alone at a synchronisation point, refuses client 1 with
    the address of the replica that serves it, and takes a client that comes back behind the federation as a
    rejoin."""
    replicas = Replicas(0, 2, None, None, 1.0)
    replicas.addresses = ["127.0.0.1:7000", "127.0.0.1:7001"]
    sessions: dict = {}
    fed = TrunkFederation(FederatedSettings(clients=4), sessions, threading.RLock(), lambda counter: None,
                          lambda *args: None, "instance")
    fed.replicas, fed.block = replicas, False

    def join(name: str, index: int, step: int = 0) -> dict:
        session = sessions[name] = SimpleNamespace(client=name, index=None, samples=0, step=None, connections=1,
                                                   grads={}, adapter=SimpleNamespace(steps=0))
        with fed.changed:
            return fed.join(session, {"index": index, "samples": 10, "step": step}, {})[0]

    assert replicas.own(4) == {0, 2} and replicas.listen_port(7000) == 7000 and replicas.listen_port(0) == 0
    assert join("c0", 0)["rejoin"] is False
    with pytest.raises(ValueError, match=r"client index 1 is served by trunk replica 1 at 127.0.0.1:7001, not by this "
                                         r"one \(replica 0\): client c connects to replica c % 2"):
        join("c1", 1)
    assert fed._expected(0) == {0, 2}
    fed.federated_step = 3
    assert join("c2", 2)["rejoin"] is True


def test_a_replica_keeps_its_checkpoint_of_the_step_before(tmp_path):
    """A replica's every-step ``latest`` keeps the one it replaces as ``previous`` when that holds another step (the
    replicas may resume at the step before this one's last), also after a restart; the checkpoint of a step is found
    by the step it holds."""
    from splittrain.server import FEDERATION, Checkpoints
    from splittrain.server.checkpoints import checkpoint_at

    fed = TrunkFederation(FederatedSettings(clients=2), {}, threading.RLock(), lambda counter: None,
                          lambda *args: None, "instance")
    weight = torch.nn.Parameter(torch.zeros(3))
    adapter = SimpleNamespace(trainable=[("w", weight)], optimizer=torch.optim.AdamW([weight]), scheduler=None,
                              steps=3, owner=FEDERATION, folder=tmp_path / "trunk", saved_step=None)

    def held() -> dict[str, int]:
        return {p.stem: int(load_state(p)["steps"]) for p in sorted(adapter.folder.glob("*.safetensors"))}

    checkpoints = Checkpoints({"config": {}}, fed, tmp_path)
    checkpoints.keep_previous = True
    checkpoints.save("latest", adapter)
    assert held() == {"latest": 3}
    adapter.steps = 4
    checkpoints.save("latest", adapter)
    checkpoints.save("latest", adapter)  # the same step again (serve saves when it stops): step 3 stays
    assert held() == {"latest": 4, "previous": 3}
    restarted = Checkpoints({"config": {}}, fed, tmp_path)  # a new process reads the step of the file it replaces
    restarted.keep_previous = True
    restarted.save("latest", adapter)
    assert held() == {"latest": 4, "previous": 3}
    adapter.steps = 5
    restarted.save("latest", adapter)
    assert held() == {"latest": 5, "previous": 4}
    assert checkpoint_at(adapter.folder, 4).stem == "previous" and checkpoint_at(adapter.folder, 3) is None
    assert load_state(checkpoint_at(adapter.folder, 5))["federation"]["instance"] == "instance"


@pytest.fixture
def quickstart_built():
    """The quickstart model, built before processes race to build it."""
    from splittrain.quickstart import model_dir

    model_dir()


@pytest.fixture
def workers():
    """Pids of torchrun's workers (the replicas), which run in sessions of their own: killed by pid when the test
    ends, also on failure."""
    pids: list[int] = []
    try:
        yield pids
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def config(folder: Path, steps: int = STEPS, **federated) -> Path:
    return write_config(folder / "config.yaml", folder / "run", steps=steps, every=2, batch_size=4, limit=120,
                        model={"client": "lora", "federated": {**FEDERATED, **federated}})


def replicas(procs: Processes, workers: list[int], cfg: Path, tokens: Path, run: Path, *extra: str, count: int = 2
             ) -> tuple[subprocess.Popen, dict[int, tuple[str, int]]]:
    """``serve`` under torchrun with ``count`` replicas on free loopback ports; returns torchrun and, by rank, each
    replica's address and pid (added to ``workers``)."""
    proc = procs.start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(count),
                        "-m", "splittrain", "serve", "--config", str(cfg), "--address", "127.0.0.1:0", "--tokens",
                        str(tokens), "--run_dir", str(run), "--threads", "1", *extra], procs.folder / "replicas.log")

    def listening() -> dict[int, tuple[str, int]] | None:
        found = {int(m[1]): (m[0], int(m[3])) for m in LISTENING.findall(proc.log.read_text(errors="replace"))}
        return found if len(found) == count else None

    where = wait_for(listening, 300, "every replica to listen", proc, proc.log)
    workers.extend(pid for _, pid in where.values())
    return proc, where


def fits(procs: Processes, cfg: Path, known: dict[str, str], where: dict[int, tuple[str, int]], *extra: str
         ) -> dict[int, subprocess.Popen]:
    """A tcp client per name, client c at replica c % R."""
    return {index: procs.fit(cfg, "--model.transport", "tcp", "--model.address", where[index % len(where)][0],
                             "--model.client_name", name, "--model.federated.client_index", str(index),
                             "--trainer.default_root_dir", str(procs.folder / name), *extra, token=known[name],
                             log_name=f"{name}.log")
            for index, name in enumerate(known)}


def losses(run: Path) -> dict[str, list[float]]:
    import json

    figures = {}
    for path in sorted(run.glob("summary*.json")):
        figures.update(json.loads(path.read_text())["clients"])
    return {client: f["train_losses"] for client, f in figures.items()}


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_two_replicas_of_two_clients_equal_one_server_of_four(procs, workers, tmp_path, quickstart_built):
    from splittrain.cli import main

    reference = tmp_path / "reference"
    reference.mkdir()
    main(["fit", "--config", str(config(reference))])  # 4 clients, one trunk
    want_losses = losses(reference / "run")
    want_client = load_state(reference / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    want_trunk = load_state(reference / "run" / "trunk" / f"step-{STEPS}.safetensors")["trainable"]

    cfg = config(tmp_path)
    tokens, known = make_tokens(tmp_path, "c0", "c1", "c2", "c3")
    server_run = tmp_path / "server"
    torchrun, where = replicas(procs, workers, cfg, tokens, server_run)
    clients = fits(procs, cfg, known, where)
    for fit in clients.values():
        Processes.finish(fit, timeout=400)
    Processes.signal(torchrun, signal.SIGTERM, timeout=120)  # torchrun exits 1 on a signal whatever its workers do
    log = torchrun.log.read_text()
    assert log.count("trunk server stopped") == 2 and "splittrain: error" not in log, tail(torchrun.log)

    worst_loss = 0.0
    for index in range(4):
        got, want = losses(tmp_path / f"c{index}")[f"client{index}"], want_losses[f"client{index}"]
        assert len(got) == len(want) == STEPS
        worst_loss = max(worst_loss, *(abs(x - y) for x, y in zip(got, want)))
    worst_client = max(largest_difference(load_state(tmp_path / f"c{i}" / "checkpoints" / "last.ckpt")["state_dict"],
                                          want_client) for i in range(4))
    trunks = [load_state(run / "trunk" / f"step-{STEPS}.safetensors")["trainable"]
              for run in (server_run, server_run / "replica1")]
    worst_trunk = max(largest_difference(trunk, want_trunk) for trunk in trunks)
    print(f"largest differences from one server of 4 clients: loss {worst_loss:.3g}, client weights "
          f"{worst_client:.3g}, trunk LoRA {worst_trunk:.3g} (replicas apart: "
          f"{largest_difference(*trunks):.3g})")
    assert worst_loss <= 1e-5 and worst_client <= 1e-5 and worst_trunk <= 1e-5
    for rank, run in enumerate((server_run, server_run / "replica1")):
        status = read_status(run)
        assert status["replica"]["rank"] == rank and status["federated_step"] == STEPS
        assert status["counters"]["aggregations"] == 2 * STEPS  # its 2 clients' masked updates, every step
        assert sorted(status["clients"]) == [f"c{i}" for i in range(4) if i % 2 == rank]


@pytest.mark.slow
def test_a_client_rejoins_and_a_killed_replica_is_restarted(procs, workers, tmp_path, quickstart_built, monkeypatch):
    """2 replicas x 2 clients under torchrun --max-restarts 1 with serve --resume. c2 (replica 0's) is killed at the
    start of step 2 and runs fit again: it catches up through its replica (the state from c0, its new public key to
    every replica's clients). Later replica 1 is killed (SIGKILL): torchrun restarts both, they resume at the last
    step both saved, and every client joins again and replays the steps since. The run equals the one-process run
    in which c2 was away for steps 2..A-1, and no step is applied twice."""
    from test_federated_rejoin import DIES, assert_equal_to_reference, reference

    steps = 12
    cfg = config(tmp_path, steps=steps)
    tokens, known = make_tokens(tmp_path, "c0", "c1", "c2", "c3")
    server_run, base = tmp_path / "server", free_ports(2)
    where = {0: (f"127.0.0.1:{base}", 0), 1: (f"127.0.0.1:{base + 1}", 0)}
    torchrun = procs.start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "--max-restarts", "1", "-m", "splittrain", "serve", "--config", str(cfg), "--address",
                            where[0][0], "--tokens", str(tokens), "--run_dir", str(server_run), "--threads", "1",
                            "--session_timeout", "1", "--resume"], tmp_path / "replicas.log")

    def listening(lives: int) -> dict[int, int] | None:
        found = LISTENING.findall(torchrun.log.read_text(errors="replace"))
        pids = {int(m[1]): int(m[3]) for m in found}  # the last life's
        return pids if len(found) == 2 * lives else None

    first = wait_for(lambda: listening(1), 300, "every replica to listen", torchrun, torchrun.log)
    workers.extend(first.values())
    clients = fits(procs, cfg, {name: known[name] for name in ("c0", "c1")}, where)
    clients[3] = procs.fit(cfg, "--model.transport", "tcp", "--model.address", where[1][0], "--model.client_name",
                           "c3", "--model.federated.client_index", "3", "--trainer.default_root_dir",
                           str(tmp_path / "c3"), token=known["c3"], log_name="c3.log")
    c2 = ["fit", "--config", str(cfg), "--model.transport", "tcp", "--model.address", where[0][0],
          "--model.client_name", "c2", "--model.federated.client_index", "2"]
    dying = procs.start([sys.executable, "-c", DIES, *c2, "--trainer.default_root_dir", str(tmp_path / "c2")],
                        tmp_path / "c2.log", env=child_env(SPLITTRAIN_TOKEN=known["c2"], SPLITTRAIN_TEST_DIE_AT="2"))
    assert dying.wait(timeout=300) == -signal.SIGKILL, tail(dying.log)
    clients[2] = procs.fit(cfg, *c2[3:], "--trainer.default_root_dir", str(tmp_path / "c2-again"), token=known["c2"],
                           log_name="c2-again.log")
    status = wait_for(lambda: (s := read_status(server_run)) and s["rejoins"] and s, 300, "c2 to catch up", torchrun,
                      torchrun.log)
    back = status["rejoins"][0]
    assert back["index"] == 2 and back["dropped_at"] == 2 and back["position"] == 2 and 2 < back["step"] < steps - 2
    assert not read_status(server_run / "replica1")["rejoins"]
    wait_for(lambda: read_status(server_run)["federated_step"] > back["step"], 300, "a step with c2 back", torchrun,
             torchrun.log)
    os.kill(first[1], signal.SIGKILL)
    workers.extend(wait_for(lambda: listening(2), 300, "the replicas to restart", torchrun, torchrun.log).values())
    for fit in clients.values():
        Processes.finish(fit, timeout=400)
    Processes.signal(torchrun, signal.SIGTERM, timeout=120)

    log = torchrun.log.read_text(errors="replace")
    resumed = [int(m) for m in re.findall(r"trunk replica \d resumes at step (\d+)", log)]
    assert len(resumed) == 2 and resumed[0] == resumed[1] and back["step"] < resumed[0] < steps, tail(torchrun.log)
    for name in ("c0", "c1", "c2-again", "c3"):
        text = (tmp_path / f"{name}.log").read_text()
        assert f"the trunk server restarted at step {resumed[0]}; replaying" in text, tail(tmp_path / f"{name}.log")
    for run in (server_run, server_run / "replica1"):
        status = read_status(run)
        assert status["federated_step"] == steps and status["counters"]["steps_applied"] == steps - resumed[0]
    print(f"c2 back at step {back['step']}, the replicas restarted at step {resumed[0]}")
    ref = reference(monkeypatch, cfg, tmp_path / "reference", 2, back["step"])
    runs = {0: tmp_path / "c0", 1: tmp_path / "c1", 2: tmp_path / "c2-again", 3: tmp_path / "c3"}
    for run in (server_run, server_run / "replica1"):
        assert_equal_to_reference(runs, run, ref, 2, back["step"], steps=steps)


@pytest.mark.slow
def test_a_killed_replica_stops_the_run_naming_it(procs, workers, tmp_path, quickstart_built):
    cfg = config(tmp_path, steps=400, clients=2)
    tokens, known = make_tokens(tmp_path, "c0", "c1")
    server_run = tmp_path / "server"
    torchrun, where = replicas(procs, workers, cfg, tokens, server_run)
    clients = fits(procs, cfg, known, where, "--model.reconnect_timeout", "5")
    wait_for(lambda: (s := read_status(server_run)) and s["federated_step"] >= 2, 300, "two federated steps",
             torchrun, torchrun.log)
    dead, pid = where[1]
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    codes = {name: proc.wait(timeout=120) for name, proc in (("torchrun", torchrun), ("c0", clients[0]),
                                                              ("c1", clients[1]))}
    seconds = time.monotonic() - killed
    print(f"every process ended {seconds:.1f} s after the replica was killed: {codes}")
    assert all(code != 0 for code in codes.values()), codes
    named = f"trunk replica 1 ({dead}) died or stopped answering"
    assert named in torchrun.log.read_text(), tail(torchrun.log)  # the surviving replica says which one died
    assert named in (tmp_path / "c0.log").read_text(), tail(tmp_path / "c0.log")  # and so does its client
    assert dead in (tmp_path / "c1.log").read_text(), tail(tmp_path / "c1.log")  # the dead one's client names it
    assert seconds < 60


@pytest.mark.slow
def test_a_replica_with_another_config_is_refused_on_both_sides(procs, tmp_path, quickstart_built):
    cfg = config(tmp_path, clients=2)
    tokens, _ = make_tokens(tmp_path, "c0", "c1")
    port = free_port()
    started = []
    for rank, extra in ((0, ()), (1, ("--model.trunk.lora.r", "8"))):
        env = child_env(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        started.append(procs.start([sys.executable, "-m", "splittrain", "serve", "--config", str(cfg), "--address",
                                    "127.0.0.1:0", "--tokens", str(tokens), "--run_dir", str(tmp_path / "server"),
                                    "--threads", "1", *extra], tmp_path / f"replica{rank}.log", env))
    for rank, proc in enumerate(started):
        assert proc.wait(timeout=300) == 2, tail(proc.log)  # a user error
        text = proc.log.read_text()
        assert "trunk replica 1 was started with another config than replica 0: lora.r 8 (replica 0: 16)" in text, \
            tail(proc.log)
        assert "Traceback" not in text and "listening on" not in text
