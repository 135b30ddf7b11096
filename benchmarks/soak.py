"""A federation that runs for minutes while its clients are killed and come back: is anything applied twice or lost?

    python benchmarks/soak.py                                    # 16 clients, 650 FedSGD steps (~12 min, then the replay)
    python benchmarks/soak.py --clients 4 --steps 40 --kill-every 10 --out /tmp/soak.json   # a smoke run (~2 min)
    python benchmarks/soak.py --replicas 2 --steps 600 --out benchmarks/results/soak_replicas.json   # 2 replicas
    python benchmarks/soak.py --replicas 2 --steps 600 --restart-replica 0.5 --out benchmarks/results/soak_restart.json

One ``python -m splittrain serve`` (``--replicas`` R: R of them under torchrun, replica r serving the clients
``c % R == r``) and ``--clients`` ``python -m splittrain fit`` processes over tcp on loopback train the quickstart model (``client: lora``, 40 rows a client, batches of 8) as a FedSGD federation (``average:
gradients``, ``trunk_update: sync``: every step waits for every client it expects). While the federation is short
of 80% of its steps, a client drawn at random (seeded) is killed with SIGKILL every ``--kill-every`` seconds on
average (its process group, by pid) and started again after a pause of up to ``--reboot`` seconds, as a machine
that crashed and rebooted: a new ``fit`` in a run folder of its own, which rejoins the run in progress (it catches
up with the federation's state and its own data position and is expected again from the next step).

Recorded (``results/soak.json``): the server's counters (steps applied, step requests answered again), its resident
set every ``--rss-every`` seconds, every kill (when, which client, the federation's step) and the latency until the
server's status lists that client as caught up again, and the final check. The check replays the run in one
process: the same federation with each client away for exactly the steps the server's status says it was away
(``rejoins``: dropped at, expected again from), its data loader moving while it is away and its batches taken in
order when it is back (the reference of ``tests/test_federated_rejoin.py``). Every update that counted must be in
the final weights and none twice: the trunk's and every client's final weights are compared with the replay's.

Targets (issue "a federation that runs for days"): 0 steps applied twice (steps applied == the federation's steps),
0 lost updates (the replay's weights equal, to float rounding, the soak's), server RSS at the end within 5% of its
level after the first minute of training (medians of the second and the last minute of training), every killed
client caught up again within its ``reconnect_timeout``.

With replicas, every replica's resident set is recorded, the rejoins are those of every replica, and both
replicas' final trunks are compared with the replay's. A killed client's replica always keeps another live client
(it sends the state the rejoining one catches up from). ``--restart-replica F`` runs the replicas under
``torchrun --max-restarts 1`` with ``serve --resume`` and SIGKILLs the last replica once the federation has made
that share of its steps (when no killed client is still on its way back; no client is killed until the federation
has moved again): torchrun restarts them, they resume at the last step both saved, and the clients replay the
steps since. Recorded: the step it was killed at, the step resumed at, the seconds until the replicas listened
again and until the federation moved past the step it was killed at, and the steps the restarted replicas applied
(exactly the federation's steps after the one resumed at, or some were applied twice).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from machine import machine  # this folder is on sys.path when a script here runs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
TOLERANCE = 1e-5
"""Largest weight difference from the replay that counts as float rounding (a lost or doubled update moves weights
by about the learning rate, 1e-4 by default)."""
RSS_TARGET = 0.05
KILL_UNTIL = 0.8
"""Clients are killed while the federation has made less than this share of its steps (later ones could not catch
up before the run ends)."""
REPLAY = '''import json, sys
from collections import deque
from splittrain.federated.client import FederatedClients
from splittrain.federated.settings import FederatedSettings
import splittrain.modules


class Replay(FederatedClients):
    """Each client away for the steps [dropped at, expected again from) the soak's server recorded."""

    away = {int(i): spans for i, spans in json.loads(sys.argv.pop(1)).items()}
    # held by the class: the CLI runs this method where the script's globals are not found
    queue, drawn = deque, staticmethod(FederatedSettings.participants)

    def step(self, step, batches, train):
        if step == 0:
            self._queues = {i: self.queue() for i in self.away}
        here = {}
        for i, spans in self.away.items():
            self._queues[i].append(batches[i])  # the loader moves every step; a client takes its batches in order
            here[i] = not any(a <= step < b for a, b in spans)
            if here[i]:
                batches = {**batches, i: self._queues[i].popleft()}
        fed, drawn = self.settings, self.drawn
        fed.participants = lambda round: [c for c in drawn(fed, round) if here.get(c, True)]
        try:
            return super().step(step, batches, train)
        finally:
            del fed.participants


splittrain.modules.FederatedClients = Replay
from splittrain.cli import main
main()
'''
"""``python -c REPLAY AWAY_JSON fit ...``: the soak's federation in one process, clients away as recorded."""


def child_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("SPLITTRAIN_TOKEN", None)
    env.update(extra)
    return env


def write_config(folder: Path, clients: int, steps: int, batch_size: int, lr: float, round_timeout: float,
                 reconnect_timeout: float) -> Path:
    """The quickstart config as a FedSGD federation of ``clients`` LoRA clients, ``steps`` steps."""
    config = yaml.safe_load(QUICKSTART.read_text())
    config["trainer"].update({"max_steps": steps, "default_root_dir": str(folder / "unused"),
                              "val_check_interval": steps, "limit_val_batches": 1, "enable_progress_bar": False,
                              "enable_model_summary": False, "num_sanity_val_steps": 0, "logger": False})
    config["trainer"]["callbacks"][0]["init_args"]["every_n_train_steps"] = steps
    config["model"].update({"client": "lora", "sample_prompt": None, "eval_generate": False,
                            "reconnect_timeout": reconnect_timeout,
                            "federated": {"clients": clients, "average": "gradients", "trunk_update": "sync",
                                          "round_timeout": round_timeout}})
    config["model"]["optim"]["lr"] = config["model"]["trunk"]["optim"]["lr"] = lr
    config["data"].update({"batch_size": batch_size, "limit": 40 * clients})
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def make_tokens(folder: Path, names: list[str]) -> tuple[Path, dict[str, str]]:
    from splittrain.transport.tcp import make_token

    tokens = {name: make_token() for name in names}
    path = folder / "tokens.json"
    path.write_text(json.dumps(tokens))
    path.chmod(0o600)
    return path, tokens


class Soak:
    """The server and the clients' processes, each in a session of its own and ended by its pid (group)."""

    def __init__(self, folder: Path, config: Path, clients: int, session_timeout: float, replicas: int = 1,
                 restart: bool = False) -> None:
        self.folder, self.config, self.clients, self.replicas, self.restart = folder, config, clients, replicas, restart
        self.names = [f"c{i:02d}" for i in range(clients)]
        self.tokens_file, self.tokens = make_tokens(folder, self.names)
        self.server_run = folder / "server"
        self.session_timeout = session_timeout
        self.procs: list[subprocess.Popen] = []
        self.fits: dict[int, subprocess.Popen] = {}
        self.runs: dict[int, list[Path]] = {i: [] for i in range(clients)}
        self.server: subprocess.Popen | None = None
        self.addresses: dict[int, str] = {}
        """Replica rank -> the address it listens on."""
        self.pids: dict[int, int] = {}
        """Replica rank -> its pid (torchrun's worker, or the one server)."""
        self.workers: set[int] = set()
        """Every torchrun worker seen: each runs in a session of its own, so ending torchrun's group misses them."""
        self.rejoin_records: dict[tuple[int, int, int], dict[str, Any]] = {}
        """Every rejoin seen in a replica's status, by (index, dropped at, back at): a restarted replica's status
        no longer lists the ones before."""

    def run_dir(self, rank: int) -> Path:
        """Replica ``rank``'s run folder (checkpoints, status)."""
        return self.server_run if rank == 0 else self.server_run / f"replica{rank}"

    def owner(self, index: int) -> int:
        return index % self.replicas

    def start(self, args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.folder,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def serve(self, timeout: float = 300.0) -> None:
        log = self.folder / "server.log"
        launch = [sys.executable, "-m", "splittrain"] if self.replicas == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(self.replicas),
            *(["--max-restarts", "1"] if self.restart else []), "-m", "splittrain"]
        # restarted replicas must listen where their clients reconnect: fixed ports
        address = f"127.0.0.1:{free_ports(self.replicas)}" if self.restart else "127.0.0.1:0"
        self.server = self.start([*launch, "serve", "--config", str(self.config), "--address", address,
                                  "--tokens", str(self.tokens_file), "--run_dir", str(self.server_run),
                                  "--session_timeout", str(self.session_timeout),
                                  *(["--resume"] if self.restart else [])], log, child_env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.listening(1):
                return
            if self.server.poll() is not None:
                raise RuntimeError(f"the server exited ({self.server.returncode}):\n{tail(log)}")
            time.sleep(0.2)
        raise RuntimeError(f"the server did not listen within {timeout} s:\n{tail(log)}")

    def listening(self, lives: int) -> bool:
        """Whether every replica of the ``lives``-th start listens; learns their addresses and pids if so."""
        lines = [line for line in (self.folder / "server.log").read_text(errors="replace").splitlines()
                 if "listening on " in line]
        if self.replicas == 1:
            if lines:
                self.addresses, self.pids = {0: lines[-1].split("listening on ", 1)[1].split()[0]}, {0: self.server.pid}
            return bool(lines)
        found = [m for line in lines
                 if (m := re.search(r"listening on (\S+) .*trunk replica (\d+) of \d+ \(pid (\d+)\)", line))]
        if len(found) < lives * self.replicas:
            return False
        self.addresses = {int(m[2]): m[1] for m in found}
        self.pids = {int(m[2]): int(m[3]) for m in found}  # the last start's
        self.workers.update(int(m[3]) for m in found)
        return True

    def fit(self, index: int) -> None:
        """Client ``index``'s ``fit`` in a new run folder (its first or a rejoin after a kill)."""
        run = self.folder / f"{self.names[index]}-{len(self.runs[index])}"
        self.runs[index].append(run)
        self.fits[index] = self.start(
            [sys.executable, "-m", "splittrain", "fit", "--config", str(self.config), "--model.transport", "tcp",
             "--model.address", self.addresses[self.owner(index)], "--model.client_name", self.names[index],
             "--model.federated.client_index", str(index), "--trainer.default_root_dir", str(run)],
            self.folder / f"{run.name}.log", child_env(SPLITTRAIN_TOKEN=self.tokens[self.names[index]]))

    def kill(self, proc: subprocess.Popen, timeout: float = 60.0) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)

    def status(self, rank: int = 0) -> dict[str, Any] | None:
        try:
            return json.loads((self.run_dir(rank) / "server_status.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def rejoins(self) -> list[dict[str, Any]]:
        """Every replica's rejoin records, those of earlier starts too."""
        for rank in range(self.replicas):
            for r in (self.status(rank) or {}).get("rejoins", []):
                self.rejoin_records.setdefault((r["index"], r["dropped_at"], r["step"]), r)
        return list(self.rejoin_records.values())

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.kill(proc, timeout=30)
        for pid in self.workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def free_ports(count: int) -> int:
    """A port P with P .. P + count - 1 free on 127.0.0.1 right now (replica r listens on P + r)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        held = []
        try:
            for port in range(base, base + count):
                held.append(socket.socket())
                held[-1].bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError(f"found no {count} consecutive free ports")


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def federation_of(status: dict[str, Any] | None) -> dict[str, Any]:
    """The federation's part of the server's status (its step, who is dropped, data positions, rejoins)."""
    return {k: v for k, v in (status or {}).items() if k in ("federated_step", "dropped", "positions", "rejoins")}


def soak(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Run the soak in ``folder``; the record of what happened."""
    config = write_config(folder, args.clients, args.steps, args.batch_size, args.lr, args.round_timeout,
                          args.reconnect_timeout)
    rng = random.Random(args.seed)
    run = Soak(folder, config, args.clients, args.session_timeout, args.replicas, args.restart_replica > 0)
    restart: dict[str, Any] = {}
    kills: list[dict[str, Any]] = []
    rss: list[tuple[float, int, int]] = []  # (seconds, bytes, the federation's step); replica 0's
    rss_replicas: dict[int, list[tuple[float, int, int]]] = {}
    try:
        run.serve()
        began = time.monotonic()
        for index in range(args.clients):
            run.fit(index)
        next_kill = began + args.warmup + rng.expovariate(1 / args.kill_every)
        next_rss = began
        restarts: list[tuple[float, int]] = []  # (when, index) of killed clients waiting to start again
        deadline = began + args.timeout
        last_step, moved, stalls, longest, first_step = -1, began, [], 0.0, None
        while any(p.poll() is None for p in run.fits.values()) or restarts:
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"the soak ran past --timeout {args.timeout} s")
            status = run.status()
            fed = federation_of(status)
            step = fed.get("federated_step", 0)
            if step != last_step:
                if step and first_step is None:
                    first_step = now - began
                if last_step > 0:
                    longest = max(longest, now - moved)
                last_step, moved = step, now
            elif step and now - moved > args.stall and (not stalls or stalls[-1]["step"] != step):
                # what the server held when the federation stopped moving (a dead client's wait is one)
                stalls.append({"at_s": round(now - began, 1), "step": step, "status": status})
                (folder / "stall.json").write_text(json.dumps(stalls[-1], indent=2))
                print(f"[{now - began:6.0f} s] the federation has not moved for {args.stall:g} s at step {step}",
                      flush=True)
            caught = run.rejoins()
            for kill in kills:
                if kill.get("back_s") is None and sum(r["index"] == kill["index"] for r in caught) >= kill["nth"]:
                    kill["back_s"] = round(now - kill["at"], 2)
            if now >= next_rss:
                for rank, pid in run.pids.items():
                    value = rss_bytes(pid)
                    if value is not None:
                        rss_replicas.setdefault(rank, []).append((round(now - began, 1), value, step))
                rss = rss_replicas.get(0, [])
                next_rss = now + args.rss_every
            for when, index in list(restarts):
                if now >= when:
                    restarts.remove((when, index))
                    run.fit(index)
            for index, proc in run.fits.items():
                if proc.poll() not in (None, 0):
                    raise RuntimeError(f"client {index} exited {proc.returncode}:\n"
                                       f"{tail(folder / f'{run.runs[index][-1].name}.log')}")
            waiting = {k["index"] for k in kills if k.get("back_s") is None}
            if (args.restart_replica and not restart and step >= args.restart_replica * args.steps and not waiting
                    and not restarts):
                rank = args.replicas - 1
                os.kill(run.pids[rank], signal.SIGKILL)  # torchrun's worker: torchrun restarts the replicas
                restart = {"replica": rank, "at": now, "at_s": round(now - began, 1), "federated_step": step,
                           "instance": (status or {}).get("instance")}
                print(f"[{now - began:6.0f} s] step {step}: killed trunk replica {rank}", flush=True)
            if restart and "listening_s" not in restart and run.listening(2):
                restart["listening_s"] = round(now - restart["at"], 2)
                found = re.findall(r"resumes at step (\d+)", (folder / "server.log").read_text(errors="replace"))
                restart["resumed_at"] = int(found[-1]) if found else None
            if restart and "moved_s" not in restart and "listening_s" in restart \
                    and (status or {}).get("instance") != restart["instance"] and step > restart["federated_step"]:
                restart["moved_s"] = round(now - restart["at"], 2)
                next_kill = now + args.warmup
                print(f"[{now - began:6.0f} s] the replicas resumed at step {restart['resumed_at']}; the federation "
                      f"is at step {step} again {restart['moved_s']:.1f} s after the kill", flush=True)
            paused = bool(restart) and "moved_s" not in restart
            if now >= next_kill and 2 <= step < KILL_UNTIL * args.steps and not paused:
                live = [i for i, p in run.fits.items() if p.poll() is None and i not in waiting]
                # a replica keeps a live client besides the killed one: it sends the state the rejoiner catches up from
                candidates = [i for i in live if sum(run.owner(j) == run.owner(i) for j in live) > 1]
                if len(candidates) > 1:
                    index = rng.choice(candidates)
                    run.kill(run.fits.pop(index))
                    nth = sum(k["index"] == index for k in kills) + 1
                    kills.append({"index": index, "nth": nth, "at": now, "at_s": round(now - began, 1),
                                  "federated_step": step, "back_s": None})
                    restarts.append((now + rng.uniform(0, args.reboot), index))
                    print(f"[{now - began:6.0f} s] step {step}: killed client {index}", flush=True)
                next_kill = now + rng.expovariate(1 / args.kill_every)
            time.sleep(0.25)
        seconds = time.monotonic() - began
        for index, proc in run.fits.items():
            if proc.wait(timeout=60) != 0:
                raise RuntimeError(f"client {index} exited {proc.returncode}")
        status = run.status()
        rejoins = run.rejoins()
        if restart:
            restart["steps_applied_after"] = status["counters"]["steps_applied"]
            restart.pop("at"), restart.pop("instance")
    finally:
        run.close()
    fed = {**federation_of(status), "rejoins": rejoins}
    return {"seconds": round(seconds, 1), "counters": status["counters"], "federation": fed, "kills": kills,
            "stalls": stalls, "longest_without_a_step_s": round(longest, 1),
            **({"replica_restart": restart} if restart else {}),
            "first_step_s": round(first_step or 0.0, 1),
            "rss": rss, **({"rss_replicas": {str(r): v for r, v in rss_replicas.items()}} if args.replicas > 1 else {}),
            "runs": {str(i): [str(p) for p in r] for i, r in run.runs.items()},
            "server_runs": [str(run.run_dir(r)) for r in range(args.replicas)], "config": str(config)}


def away_spans(federation: dict[str, Any]) -> dict[int, list[tuple[int, int]]]:
    """Per client, the steps [dropped at, expected again from) it was away, from the server's rejoin records."""
    spans: dict[int, list[tuple[int, int]]] = {}
    for r in federation.get("rejoins", []):
        spans.setdefault(int(r["index"]), []).append((int(r["dropped_at"]), int(r["step"])))
    return spans


def replay(record: dict[str, Any], folder: Path, timeout: float) -> dict[str, Any]:
    """The soak's federation in one process with each client away as recorded; the largest differences of the
    trunk's and the clients' final weights from the soak's."""
    from splittrain.state import load_state

    spans = away_spans(record["federation"])
    ref = folder / "replay"
    done = subprocess.run([sys.executable, "-c", REPLAY, json.dumps(spans), "fit", "--config", record["config"],
                           "--trainer.default_root_dir", str(ref)], env=child_env(), cwd=folder, timeout=timeout,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the replay failed ({done.returncode}):\n{done.stderr[-3000:]}")
    steps = record["federation"]["federated_step"]
    trunk_ref = load_state(ref / "trunk" / f"step-{steps}.safetensors")["trainable"]
    trunk_diff = 0.0
    for server_run in record["server_runs"]:  # every replica's trunk
        trunk = load_state(Path(server_run) / "trunk" / f"step-{steps}.safetensors")["trainable"]
        trunk_diff = max([trunk_diff] + [(trunk[k] - trunk_ref[k]).abs().max().item() for k in trunk_ref])
    want = load_state(ref / "checkpoints" / "last.ckpt")["federated"]
    client_diff = 0.0
    for index, runs in record["runs"].items():
        got = load_state(Path(runs[-1]) / "checkpoints" / "last.ckpt")["federated"][index]["params"]
        client_diff = max([client_diff] + [(a - b).abs().max().item()
                                           for a, b in zip(got, want[index]["params"], strict=True)])
    return {"spans": {str(k): v for k, v in spans.items()}, "trunk_max_diff": trunk_diff,
            "client_max_diff": client_diff}


def median(values: list[int]) -> int | None:
    return sorted(values)[len(values) // 2] if values else None


def report(record: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The targets, from the record."""
    counters, fed = record["counters"], record["federation"]
    rss = record["rss"]
    # the first minute of training: the clients take a while to start before the federation's first step
    # while the federation trains (its clients start before the first step and leave after the last), the median of
    # its second minute against that of its last minute
    training = [(t, v) for t, v, step in rss if 0 < step < args.steps]
    start = training[0][0] if training else 0.0
    after_minute = median([v for t, v in training if start + 60 <= t < start + 120])
    end = median([v for t, v in training if t >= training[-1][0] - 60]) if training else None
    backs = [k["back_s"] for k in record["kills"]]
    per_replica = {}
    for rank, values in record.get("rss_replicas", {}).items():
        span = [(t, v) for t, v, step in values if 0 < step < args.steps]
        if span:
            second = median([v for t, v in span if span[0][0] + 60 <= t < span[0][0] + 120])
            last = median([v for t, v in span if t >= span[-1][0] - 60])
            per_replica[rank] = last / second if second and last else None
    check = record.get("replay", {})
    worst = max(check.get("trunk_max_diff", float("nan")), check.get("client_max_diff", float("nan")))
    return {
        "steps_applied": counters["steps_applied"], "federated_steps": fed.get("federated_step"),
        # after a replica restart the status counts the restarted replicas' steps: those after the step resumed at
        "steps_applied_twice": counters["steps_applied"] - fed.get("federated_step", 0)
        + (record["replica_restart"].get("resumed_at") or 0 if "replica_restart" in record else 0),
        "step_requests_answered_again": counters["steps_repeated"],
        "lost_updates": None if not check else int(not worst <= TOLERANCE),
        "replay_max_diff": worst if check else None,
        "rss_second_training_minute": after_minute, "rss_last_training_minute": end,
        "rss_end_ratio": end / after_minute if end and after_minute else None,
        **({"rss_end_ratio_per_replica": per_replica} if per_replica else {}),
        "kills": len(backs), "rejoins": len(fed.get("rejoins", [])),
        "longest_without_a_step_s": record["longest_without_a_step_s"],
        "rejoin_latency_s": {"max": max((b for b in backs if b is not None), default=None),
                             "median": sorted(b for b in backs if b is not None)[len(backs) // 2]
                             if backs and None not in backs else None},
        "clients_not_back": sum(b is None for b in backs),
        **({"replica_restart": {k: record["replica_restart"].get(k) for k in
                                ("federated_step", "resumed_at", "listening_s", "moved_s")}}
           if "replica_restart" in record else {}),
        "all_back_within_reconnect_timeout": all(b is not None and b <= args.reconnect_timeout for b in backs),
    }


def stop_soak(signum: int, frame: Any) -> None:
    """A signal ends the soak as an interrupt does: the ``finally`` blocks kill and reap every child."""
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--replicas", type=int, default=1, help="trunk replicas (serve under torchrun)")
    parser.add_argument("--restart-replica", type=float, default=0.0,
                        help="with replicas: kill the last replica once the federation made this share of its steps "
                             "(torchrun restarts them, serve --resume); 0: never")
    parser.add_argument("--steps", type=int, default=650, help="the federation's optimizer steps")
    parser.add_argument("--batch-size", type=int, default=8, help="each client's rows per step (40 rows a client)")
    parser.add_argument("--lr", type=float, default=1e-4,
                        help="both parties' learning rate: at the quickstart's 2e-3 float rounding between the tcp run "
                             "and its one-process replay grows past 1e-5 after ~70 steps of 16 clients, kills or not")
    parser.add_argument("--kill-every", type=float, default=25.0, help="mean seconds between two kills")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before the first kill")
    parser.add_argument("--reboot", type=float, default=5.0, help="most seconds a killed client stays down")
    parser.add_argument("--round-timeout", type=float, default=120.0, help="model.federated.round_timeout")
    parser.add_argument("--session-timeout", type=float, default=2.0,
                        help="serve --session_timeout: how soon a dead client's session ends")
    parser.add_argument("--reconnect-timeout", type=float, default=120.0, help="model.reconnect_timeout")
    parser.add_argument("--rss-every", type=float, default=5.0)
    parser.add_argument("--stall", type=float, default=60.0,
                        help="seconds without a federation step after which the server's status is recorded")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds the soak may take at most")
    parser.add_argument("--no-replay", action="store_true", help="skip the final replay")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (printed)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "soak.json")
    args = parser.parse_args()
    # SIGTERM, and SIGINT where a background shell ignored it, end the soak through its cleanup (every child by pid)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_soak)
    folder = Path(tempfile.mkdtemp(prefix="splittrain-soak-"))
    try:
        record = soak(args, folder)
        if not args.no_replay:
            record["replay"] = replay(record, folder, args.timeout)
        summary = report(record, args)
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            subprocess.run(["rm", "-rf", str(folder)], check=False)
    for key, value in summary.items():
        print(f"{key:36} {value}")
    record.pop("config"), record.pop("server_runs"), record.pop("runs")
    result = {"machine": machine(), "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "tolerance": TOLERANCE, "rss_target": RSS_TARGET, "summary": summary, **record}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
