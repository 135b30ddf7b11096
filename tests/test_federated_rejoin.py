"""Rejoin: a client that dropped runs fit again and is brought back into the run in progress.

The reference a rejoin must equal: the one-process simulation of the same federation in which client ``c`` is
away for steps ``[k, A)`` (it dropped at the start of step ``k`` and is expected again from step ``A``):

* while away it trains nothing, its weight in every average (client side and trunk) is 0, and its data loader does
  not move: from step ``A`` on it trains the batches it had not trained on, in order (batch ``k`` at step ``A``);
* FedSGD: it holds the members' state at ``A`` (weights, AdamW moments, schedule), as a client sitting out steps
  does in the simulation;
* FedAvg: at ``A`` it takes the last weight average before ``A`` (the initial weights before the first), a fresh
  AdamW, its schedule at ``A``.

The processes tests kill a client (SIGKILL, by itself at the start of step ``k``), start ``fit`` again for it, read
``A`` from the server's status and compare the trunk's and every client's final weights with that reference.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from processes import Processes, child_env, free_port, make_tokens, read_status, tail, wait_for, write_config
from splittrain.federated import FederatedSettings, Masker, aggregate, decode, flatten, unflatten_into
from splittrain.federated.client import FederatedClients
from splittrain.federated.trunk import TrunkFederation
from splittrain.state import load_state

STEPS = 6
"""Optimizer steps of a run (FedAvg's: 8, so that a slow rejoin still lands before the end)."""
DIES = '''import os, signal, sys
from splittrain.federated.client import FederatedClients
from splittrain.cli import main
step = FederatedClients.step
def step_or_die(self, index, *args):  # SIGKILL at the start of step SPLITTRAIN_TEST_DIE_AT (0-based)
    if index == int(os.environ["SPLITTRAIN_TEST_DIE_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, index, *args)
FederatedClients.step = step_or_die
main()
'''
"""``python -c DIES fit ...``: a client that kills itself (SIGKILL) before it trains step ``k``."""


# ================================================================================================ bookkeeping
@dataclass
class Adapter:
    steps: int = 0

    def step_reply(self) -> dict:
        return {"step": self.steps}


@dataclass
class Session:
    client: str
    adapter: Adapter
    index: int | None = None
    samples: int = 0
    step: int | None = None
    connections: int = 1
    grads: dict = field(default_factory=dict)


def federation(**settings) -> tuple[TrunkFederation, dict[str, Session], Adapter]:
    sessions: dict[str, Session] = {}
    adapter = Adapter()

    def apply(shared, grads, scale) -> None:
        shared.steps += 1

    fed = TrunkFederation(FederatedSettings(**{"clients": 3, **settings}), sessions, threading.RLock(),
                          lambda counter: None, apply, "instance")
    fed.block = False
    return fed, sessions, adapter


def join(fed, sessions, adapter, name: str, index: int, step: int = 0, samples: int = 10, **extra) -> dict:
    session = sessions[name] = Session(name, adapter)
    header = {"index": index, "samples": samples, "step": step, "settings": fed.settings.common(), **extra}
    with fed.changed:  # every call comes with the server's lock held
        return fed.join(session, header, {})[0]


def step_all(fed, sessions, names, target: int, block: bool = False) -> None:
    for name in names:
        with fed.changed:
            fed.block = block
            fed.forward(sessions[name], target - 1)
            fed.step(sessions[name], {"step": target})


def test_rejoin_bookkeeping_and_refusals():
    """Who may come back as which index and with what; a comeback stops the open synchronisation points waiting;
    the client is expected from the step it catches up at, with its own data position; a dropped process that goes
    on 50 steps later is told how far behind it is, and run again it catches up from there."""
    fed, sessions, adapter = federation(average="weights", average_every=100, round_timeout=1.0)
    for index, name in enumerate(("c0", "c1", "c2")):
        assert join(fed, sessions, adapter, name, index) == {"clients": 3, "step": 0, "federated_step": 0,
                                                             "rejoin": False}
    step_all(fed, sessions, ("c0", "c1", "c2"), 1)
    assert fed.federated_step == 1 and fed.positions == {0: 1, 1: 1, 2: 1}
    del sessions["c2"]  # c2's process is gone (its session expired) with step 2 under way
    step_all(fed, sessions, ("c0",), 2)
    assert fed.gatherings["step 2"].expected == {0, 1, 2}
    # another authenticated client may not take the index of one that is away, nor come with other settings
    with pytest.raises(ValueError, match="client index 2 belongs to client 'c2': client 'mallory' cannot"):
        join(fed, sessions, adapter, "mallory", 2)
    with pytest.raises(ValueError, match=r"another federation: average_every 2 \(server: 100\)"):
        join(fed, sessions, adapter, "c2", 2, settings={**fed.settings.common(), "average_every": 2})
    with pytest.raises(ValueError, match="with 10 training rows and comes back with 11"):
        join(fed, sessions, adapter, "c2", 2, samples=11)
    with pytest.raises(ValueError, match="has made 5 steps but the federation 1"):
        join(fed, sessions, adapter, "c2", 2, step=5)
    # c2 comes back in a new process: step 2 stops waiting for it, and no point expects it until it caught up
    assert join(fed, sessions, adapter, "c2", 2)["rejoin"] is True
    assert fed.gatherings["step 2"].expected == {0, 1} and fed.dropped_at[2] == 1
    with fed.changed, pytest.raises(RuntimeError, match="it trains from step None once it caught up"):
        fed.forward(sessions["c2"], 1)
    step_all(fed, sessions, ("c1",), 2)
    assert fed.federated_step == 2 and fed.positions == {0: 2, 1: 2, 2: 1}
    assert fed._expected(2) == {0, 1}
    # it asks to catch up: it is expected from step 3, answered once the federation has made step 3's steps before
    answer = {}

    def catch_up(name: str) -> None:
        with fed.changed:
            fed.block = True
            answer[name] = fed.catch_up(sessions[name], {}, {"room": torch.zeros(1, 4, dtype=torch.int64)})

    threading.Thread(target=catch_up, args=("c2",), daemon=True).start()
    while fed.rejoining[2] is None:
        time.sleep(0.01)
    assert fed._expected(2) == {0, 1} and fed._expected(3) == {0, 1, 2} and not answer
    step_all(fed, sessions, ("c0", "c1"), 3)
    header, tensors = wait_for(lambda: answer.get("c2"), 10, "c2 to catch up")
    assert header == {"step": 3, "position": 1} and not tensors  # before the first average: its own initial weights
    assert fed.status()["rejoins"][0] | {"seconds": 0} == {"index": 2, "client": "c2", "dropped_at": 1, "step": 3,
                                                          "position": 1, "seconds": 0}
    step_all(fed, sessions, ("c0", "c1", "c2"), 4)
    assert fed.federated_step == 4 and fed.positions == {0: 4, 1: 4, 2: 2}
    # c1 stops answering: step 5 goes on without it after round_timeout; when it goes on, it is told how far behind
    began = time.monotonic()
    step_all(fed, sessions, ("c2",), 5)
    step_all(fed, sessions, ("c0",), 5, block=True)
    assert time.monotonic() - began >= 1.0 and fed.dropped == {1} and fed.federated_step == 5
    for target in range(6, 55):
        step_all(fed, sessions, ("c0", "c2"), target)
    with fed.changed, pytest.raises(RuntimeError, match=r"client 'c1' \(index 1\) was dropped from the federation "
                                                        r"at step 4 and the federation is at step 54, 50 step\(s\) "
                                                        r"ahead: run fit again to rejoin"):
        fed.forward(sessions["c1"], 4)
    # run again, 54 steps behind, it catches up: back from step 55 (the one after the federation's), its data from
    # batch 4 (the fifth it trains on)
    del sessions["c1"]
    assert join(fed, sessions, adapter, "c1", 1)["rejoin"] is True and fed.dropped == set()
    threading.Thread(target=catch_up, args=("c1",), daemon=True).start()
    while fed.rejoining[1] is None:
        time.sleep(0.01)
    step_all(fed, sessions, ("c0", "c2"), 55)
    assert wait_for(lambda: answer.get("c1"), 10, "c1 to catch up")[0] == {"step": 55, "position": 4}


def test_a_client_whose_update_is_in_a_steps_average_took_part_in_that_step():
    """A FedSGD client that sent its update for step 2's average and died before asking for the step: the step
    takes its trunk gradients too, so it took part in step 2: its data position counts it, and its rejoin record
    says it was away from the next step on (the reference's window starts there)."""
    fed, sessions, adapter = federation()
    for index, name in enumerate(("c0", "c1", "c2")):
        join(fed, sessions, adapter, name, index)
    step_all(fed, sessions, ("c0", "c1", "c2"), 1)

    def average(name: str) -> None:  # step 2's forward pass and secure average, all three waiting for each other
        session = sessions[name]
        with fed.changed:
            fed.block = True
            fed.forward(session, 1)
            session.grads = {"w": torch.ones(2)}
            fed.aggregate(session, {"nonce": 2 << 8, "weight": 1.0, "participants": [0, 1, 2], "roster": 0},
                          {"masked": torch.zeros(4, dtype=torch.int64)})

    threads = [threading.Thread(target=average, args=(name,), daemon=True) for name in ("c0", "c1", "c2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads) and fed.summed[1].keys() == {0, 1, 2}
    del sessions["c2"]  # its process dies before it asks for step 2; a new one joins
    assert join(fed, sessions, adapter, "c2", 2)["rejoin"] is True
    step_all(fed, sessions, ("c0", "c1"), 2)
    assert fed.federated_step == 2 and fed.positions == {0: 2, 1: 2, 2: 2}
    assert fed.dropped_at[2] == 2


def test_a_member_admits_a_rejoining_clients_new_public_key():
    """Masks agreed before a client came back with a new key pair do not cancel with its new ones; they do again
    once the others admit its new public key."""
    names = ["000000", "000001", "000002"]
    maskers = {n: Masker(n) for n in names}
    for m in maskers.values():
        m.agree({n: maskers[n].public for n in names})
    maskers["000002"] = Masker("000002")  # the new process
    publics = {n: maskers[n].public for n in names}
    maskers["000002"].agree(publics)
    values = {n: torch.randn(50, dtype=torch.float64) for n in names}

    def error(nonce: int) -> float:
        total = decode(aggregate([maskers[n].protect(values[n], 1.0, names, nonce) for n in names]), 1.0)
        return (total - sum(values.values())).abs().max().item()

    assert error(7) > 1.0
    for n in names[:2]:
        maskers[n].admit(publics)
    assert error(8) < 1e-6


# ================================================================================================ processes
class Away(FederatedClients):
    """The reference (module docstring): client :attr:`away` is away for steps [:attr:`start`, :attr:`stop`)."""

    away, start, stop = 2, 0, 0

    def step(self, step, batches, train):
        fed, index = self.settings, self.away
        client = self.clients[index]
        if step == 0:
            self._queue, self._average = deque(), flatten(client.params)
        self._queue.append(batches[index])  # its loader moves every step; it takes its batches in order when here
        here = not self.start <= step < self.stop
        batches = {**batches, index: self._queue.popleft()} if here else batches
        if step == self.stop and fed.average == "weights":
            client.optimizer.state.clear()
            unflatten_into(self._average, client.params)
        drawn = FederatedSettings.participants
        fed.participants = lambda round: [c for c in drawn(fed, round) if here or c != index]
        try:
            return super().step(step, batches, train)
        finally:
            del fed.participants

    def _average_weights(self, step, participants) -> None:
        super()._average_weights(step, participants)
        self._average = flatten(self.clients[self.away].params)


def config(folder: Path, steps: int = STEPS, every: int = 3, **federated) -> Path:
    # 8 rows a client: epochs of 2 batches, so a rejoin lands in another epoch than the first
    return write_config(folder / "config.yaml", folder / "unused", steps=steps, every=every, batch_size=4, limit=24,
                        model={"client": "lora", "federated": {"clients": 3, "trunk_update": "sync",
                                                               "round_timeout": 300, **federated}})


def reference(monkeypatch, cfg: Path, run: Path, start: int, stop: int) -> Path:
    from splittrain.cli import main

    monkeypatch.setattr("splittrain.modules.FederatedClients", type("Away", (Away,), {"start": start, "stop": stop}))
    main(["fit", "--config", str(cfg), "--trainer.default_root_dir", str(run)])
    return run


def clients_of(run: Path) -> dict[str, dict]:
    """Per client: its trainable tensors, optimizer state and losses, from the run's last checkpoint."""
    return load_state(run / "checkpoints" / "last.ckpt")["federated"]


def losses_of(run: Path, index: int) -> list[float]:
    """Client ``index``'s per-step losses in ``run`` (its own summary over tcp, the one summary in process)."""
    path = run / f"summary-client{index}.json"
    path = path if path.exists() else run / "summary.json"
    return json.loads(path.read_text())["clients"][f"client{index}"]["train_losses"]


def assert_equal_to_reference(runs: dict[int, Path], server_run: Path, ref: Path, start: int, stop: int,
                              steps: int = STEPS) -> None:
    """Every client's client-side weights, the trunk's weights and the per-step losses equal the reference's (the
    rejoined client's since it came back)."""
    want = clients_of(ref)
    worst = 0.0
    for index, run in runs.items():
        got = clients_of(run)[str(index)]["params"]
        assert len(got) == len(want[str(index)]["params"])
        worst = max([worst] + [(a - b).abs().max().item() for a, b in zip(got, want[str(index)]["params"])])
        mine, theirs = losses_of(run, index), losses_of(ref, index)
        if index == 2:
            theirs = theirs[start:]  # the new process's: from step `stop` on
        assert len(mine) == len(theirs) and max(abs(a - b) for a, b in zip(mine, theirs)) <= 1e-5, (mine, theirs)
    trunk = load_state(server_run / "trunk" / f"step-{steps}.safetensors")["trainable"]
    trunk_ref = load_state(ref / "trunk" / f"step-{steps}.safetensors")["trainable"]
    assert trunk.keys() == trunk_ref.keys()
    worst = max([worst] + [(trunk[k] - trunk_ref[k]).abs().max().item() for k in trunk])
    print(f"largest difference from the reference (client 2 away for steps {start}..{stop - 1}): {worst:.3g}")
    assert worst <= 1e-5


def start_clients(procs, cfg: Path, address: str, known: dict[str, str], folder: Path, dies_at: int
                  ) -> dict[str, object]:
    """c0 and c1, and c2 that kills itself at the start of step ``dies_at``."""
    def args(name: str, index: int, run: str) -> list[str]:
        return ["fit", "--config", str(cfg), "--model.transport", "tcp", "--model.address", address,
                "--model.client_name", name, "--model.federated.client_index", str(index),
                "--trainer.default_root_dir", str(folder / run)]

    fits = {name: procs.fit(cfg, *args(name, index, name)[3:], token=known[name], log_name=f"{name}.log")
            for index, name in enumerate(("c0", "c1"))}
    fits["c2"] = procs.start([sys.executable, "-c", DIES, *args("c2", 2, "c2")], folder / "c2.log",
                             env=child_env(SPLITTRAIN_TOKEN=known["c2"], SPLITTRAIN_TEST_DIE_AT=str(dies_at)))
    return fits


def rejoin(procs, cfg: Path, address: str, token: str, folder: Path, *extra: str, run: str = "c2-again",
           log: str = "c2-again.log"):
    return procs.fit(cfg, "--model.transport", "tcp", "--model.address", address, "--model.client_name", "c2",
                     "--model.federated.client_index", "2", "--trainer.default_root_dir", str(folder / run), *extra,
                     token=token, log_name=log)


def refused(proc, timeout: float, *messages: str) -> None:
    """``proc`` exits with an error whose log holds ``messages``."""
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout} s:\n{tail(proc.log)}") from None
    text = Path(proc.log).read_text(errors="replace")
    assert code != 0 and all(m in text for m in messages), f"exit {code}:\n{tail(proc.log)}"


def rejoined(server_run: Path) -> dict:
    status = read_status(server_run)
    assert status is not None and len(status["rejoins"]) == 1, status
    return status["rejoins"][0]


@pytest.mark.slow
def test_fedavg_client_killed_across_a_round_and_rejoined_equals_the_reference(procs, tmp_path, monkeypatch):
    """FedAvg (2 local steps a round), 3 clients over tcp: c2 is killed at the start of step 3, the last of round 1,
    so the round's average goes on without it. Coming back from its checkpoint of 2 steps, it is refused with how far
    behind it is; fit without a checkpoint rejoins from the last average. The run equals the reference in which c2
    was away for steps 3..A-1."""
    cfg = config(tmp_path, steps=8, every=2, average="weights", average_every=2)
    tokens, known = make_tokens(tmp_path, "c0", "c1", "c2")
    server_run = tmp_path / "server"
    server, address = procs.serve(cfg, tokens, server_run, "--session_timeout", "1")
    fits = start_clients(procs, cfg, address, known, tmp_path, dies_at=3)
    assert fits["c2"].wait(timeout=300) == -signal.SIGKILL, tail(fits["c2"].log)
    stale = rejoin(procs, cfg, address, known["c2"], tmp_path, "--ckpt_path",
                   str(tmp_path / "c2" / "checkpoints" / "last.ckpt"), run="c2", log="c2-stale.log")
    refused(stale, 300, "checkpoint 'step-2' is 1 step(s) behind the federation (step 3)",
            "rejoins the run in progress with fit without --ckpt_path")
    again = rejoin(procs, cfg, address, known["c2"], tmp_path)
    for proc in (fits["c0"], fits["c1"], again):
        Processes.finish(proc, timeout=300)
    back = rejoined(server_run)
    assert back["dropped_at"] == 3 and back["position"] == 3 and 3 < back["step"] < 8, back
    ref = reference(monkeypatch, cfg, tmp_path / "reference", 3, back["step"])
    assert_equal_to_reference({0: tmp_path / "c0", 1: tmp_path / "c1", 2: tmp_path / "c2-again"}, server_run, ref,
                              3, back["step"], steps=8)


SERVER_DIES = '''import os, signal
from splittrain.federated.trunk import TrunkFederation
from splittrain.cli import main
step = TrunkFederation.step
def step_or_die(self, session, header):  # SIGKILL when the first member asks for step SPLITTRAIN_TEST_DIE_AT
    if header["step"] == int(os.environ["SPLITTRAIN_TEST_DIE_AT"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, session, header)
TrunkFederation.step = step_or_die
main()
'''
"""``python -c SERVER_DIES serve ...``: a trunk server that kills itself (SIGKILL) at a federation's step."""


@pytest.mark.slow
def test_fedsgd_client_killed_and_rejoined_equals_the_reference(procs, tmp_path, monkeypatch):
    """FedSGD, 3 clients over tcp. The trunk server dies (SIGKILL) when step 5 is asked for and is started again
    with --resume from its last checkpoint (step 4: it saves every step); the clients join again and replay step 5's
    requests (their masked updates too). Then c2 is killed at the start of step 7 and runs fit again; meanwhile
    another authenticated client claiming index 2 is refused on both sides. The restarted server kept every client's
    data position in its checkpoint, so c2 rejoins. The run equals the reference in which c2 was away for steps
    6..A-1, and no step was applied twice."""
    steps = 9
    cfg = config(tmp_path, steps=steps, every=3)
    tokens, known = make_tokens(tmp_path, "c0", "c1", "c2", "mallory")
    server_run, address = tmp_path / "server", f"127.0.0.1:{free_port()}"
    serve = ["serve", "--config", str(cfg), "--address", address, "--tokens", str(tokens), "--run_dir",
             str(server_run), "--session_timeout", "1"]
    dying = procs.start([sys.executable, "-c", SERVER_DIES, *serve], tmp_path / "server-dies.log",
                        env=child_env(SPLITTRAIN_TEST_DIE_AT="5"))
    dying.log_start = 0
    procs.address_of(dying)
    fits = start_clients(procs, cfg, address, known, tmp_path, dies_at=6)
    assert dying.wait(timeout=300) == -signal.SIGKILL, tail(dying.log)
    assert all(fit.poll() is None for fit in fits.values())  # the clients wait for their server
    procs.serve(cfg, tokens, server_run, "--resume", "--session_timeout", "1", address=address)
    assert fits["c2"].wait(timeout=300) == -signal.SIGKILL, tail(fits["c2"].log)
    mallory = procs.fit(cfg, "--model.transport", "tcp", "--model.address", address, "--model.client_name",
                        "mallory", "--model.federated.client_index", "2", "--trainer.default_root_dir",
                        str(tmp_path / "mallory"), token=known["mallory"], log_name="mallory.log")
    again = rejoin(procs, cfg, address, known["c2"], tmp_path)
    refused(mallory, 300, "client index 2 belongs to client 'c2': client 'mallory' cannot take part as it")
    for proc in (fits["c0"], fits["c1"], again):
        Processes.finish(proc, timeout=300)
    # Each client replays what it had sent of step 5 when the server died: all four requests for the member whose
    # step request killed it, as many as it had got to (one to four) for the other.
    replayed = []
    for name in ("c0", "c1"):
        found = re.search(r"the trunk server restarted at step 4; replaying (\d+) requests",
                          (tmp_path / f"{name}.log").read_text())
        assert found is not None, tail(tmp_path / f"{name}.log")
        replayed.append(int(found[1]))
    assert max(replayed) == 4 and min(replayed) >= 1, replayed
    log = (tmp_path / "server.log").read_text()
    assert "client 'mallory': join refused: client index 2 belongs to client 'c2'" in log
    assert "goes on without client(s) 2 ('c2'): it came back in a new process" in log
    status = read_status(server_run)
    assert status["counters"]["steps_applied"] == steps - 4 and status["counters"].get("steps_repeated", 0) == 0
    back = rejoined(server_run)
    assert back["dropped_at"] == 6 and back["position"] == 6 and 6 < back["step"] < steps, back
    ref = reference(monkeypatch, cfg, tmp_path / "reference", 6, back["step"])
    assert_equal_to_reference({0: tmp_path / "c0", 1: tmp_path / "c1", 2: tmp_path / "c2-again"}, server_run, ref,
                              6, back["step"], steps=steps)
