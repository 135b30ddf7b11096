"""Several clients against one trunk server over tcp: aggregate tokens/s and how busy the server is.

    python benchmarks/clients.py                  # 1, 2 and 4 clients, ~20M-param Qwen2 shape, batch 8x128
    python benchmarks/clients.py --quick          # smoke run: 1 warm-up step, 3 timed steps

The model and batches are ``split_overhead.py``'s; the cuts are the server-heavy kind (``--cuts``, default 1 7:
the client keeps one layer on each side of its data, the trunk the six between). The clients are a federation
(``model.federated``: FedSGD, the trunk stepping once per step on the clients' averaged gradients, every client
waiting for the others at each step), each with a frozen bottom and top, all on the same seeded batches.

Each process is pinned (``os.sched_setaffinity``): client i to core i of the machine (round-robin, one torch
thread), the server to all cores with one thread, so it stands for one core's worth of compute wherever a client
leaves one idle. (A 2-core machine cannot give every party a core of its own; pinning the server to one core and
all clients to the other makes the clients' core the bottleneck: 1.2x for 2 clients.) Over one connection client
and server take turns, so one client leaves the server idle while its top computes; with several, the server runs
one client's trunk while another computes its top, and trunk work is serialized only where it must be (one trunk,
one optimizer). The server's busy fraction is the share of the timed steps' wall time it spent in trunk forward
and backward passes (``TrunkServer.busy_seconds``). Every count runs ``--rounds`` times (ratios within a round);
the median round is reported, every round is in the JSON. A round ends with one client again, and the counts are
compared with the mean of its two one-client runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine import write_result  # this folder is on sys.path when a script here runs

import splittrain  # before torch: it sets the OpenMP runtime's idle spin, as the CLI does
import torch

from split_overhead import SHAPE, client_fingerprint, lora_settings, make_model, run_parser, split_loop
from train_speed import make_batches

HERE = Path(__file__).resolve().parent
COUNTS = (1, 2, 4)


def pin(cores: list[int], threads: int) -> None:
    """This process on ``cores`` only, with ``threads`` torch threads."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(threads)


def shares(count: int) -> tuple[list[int], list[list[int]]]:
    """(server cores, each client's cores): client i gets core i of this process's cores (round-robin); the server
    one core's worth of threads on any of them."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return cores, [[cores[i % len(cores)]] for i in range(count)]


def trunk_steps(args, clients: int, steps: int) -> int:
    """The trunk's step count once every client made ``steps`` steps (``sequential``: one per client step)."""
    return steps * clients if args.trunk_update == "sequential" else steps


def role_serve(args) -> None:
    """The trunk server of a federation of ``--clients``; prints its address, then samples (time, step, busy
    seconds) until the last timed step is applied, writes them to ``--result``, and serves until every client
    said goodbye."""
    from splittrain.federated import FederatedSettings
    from splittrain.server import TrunkServer, load_trunk
    from splittrain.optim import OptimSettings
    from splittrain.transport.tcp import TcpServer

    pin(args.cores, 1)
    trunk = load_trunk(args.folder, tuple(args.cuts), lora_settings())
    federation = FederatedSettings(clients=args.clients, trunk_update=args.trunk_update)
    server = TrunkServer(trunk, OptimSettings(lr=1e-3), federation=federation)
    tcp = TcpServer(server, "127.0.0.1:0", {f"c{i}": os.environ["CLIENTS_TOKEN"] for i in range(args.clients)})
    thread = threading.Thread(target=tcp.serve_forever, daemon=True)
    thread.start()
    print(f"ADDRESS {tcp.address}", flush=True)
    samples, deadline = [], time.monotonic() + args.timeout
    while server.steps < trunk_steps(args, args.clients, args.warmup + args.steps) and time.monotonic() < deadline:
        samples.append((time.perf_counter(), server.steps, server.busy_seconds))
        time.sleep(0.002)
    samples.append((time.perf_counter(), server.steps, server.busy_seconds))
    Path(args.result).write_text(json.dumps(samples))
    # The last step's replies may still be on their way: stop once every client said goodbye, not before.
    while server.sessions and time.monotonic() < deadline:
        time.sleep(0.01)
    tcp.stop()
    thread.join(timeout=10)


def role_client(args) -> None:
    """Client ``--index``: the timed loop, its result as JSON."""
    from splittrain.cut import make_link

    pin(args.cores, len(args.cores))
    bottom, top = splittrain.split_model(args.folder, cuts=tuple(args.cuts), parts=("bottom", "top"))
    bottom.requires_grad_(False)
    top.requires_grad_(False)
    batches = make_batches(args.warmup + args.steps, args.batch, args.length, SHAPE["vocab_size"])
    fingerprint = {**client_fingerprint(args.folder), "cuts": list(args.cuts)}
    link = make_link("tcp", address=args.address, client=f"c{args.index}", token=os.environ["CLIENTS_TOKEN"],
                     fingerprint=fingerprint)
    try:
        link.join(args.index, 1)
        result = split_loop(link, bottom, top, batches, args.warmup)
    finally:
        link.close()
    Path(args.result).write_text(json.dumps(result))


def run(folder: str, count: int, args, tmp: Path) -> dict:
    """One server and ``count`` clients, each pinned; the aggregate figures of their timed steps."""
    from splittrain.transport.tcp import make_token

    server_cores, client_cores = shares(count)
    env = {**os.environ, "CLIENTS_TOKEN": make_token()}
    common = ["--folder", folder, "--cuts", *map(str, args.cuts), "--trunk_update", args.trunk_update, "--steps",
              str(args.steps), "--warmup",
              str(args.warmup), "--batch", str(args.batch), "--length", str(args.length)]
    samples_file = tmp / f"server-{count}.json"
    server = subprocess.Popen([sys.executable, __file__, "--role", "serve", "--clients", str(count), "--cores",
                               *map(str, server_cores), "--result", str(samples_file), "--timeout", "900", *common],
                              stdout=subprocess.PIPE, text=True, env=env)
    clients = []
    try:
        line = server.stdout.readline().strip()
        if not line.startswith("ADDRESS "):
            raise RuntimeError(f"the trunk server did not start (said {line!r})")
        address = line.split(" ", 1)[1]
        for index in range(count):
            clients.append(subprocess.Popen(
                [sys.executable, __file__, "--role", "client", "--index", str(index), "--address", address,
                 "--cores", *map(str, client_cores[index]), "--result", str(tmp / f"client-{count}-{index}.json"), *common],
                env=env))
        for proc in clients:
            if proc.wait(timeout=900):
                raise RuntimeError(f"a client exited with {proc.returncode}")
        if server.wait(timeout=60):
            raise RuntimeError(f"the trunk server exited with {server.returncode}")
    finally:
        for proc in [*clients, server]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    samples = json.loads(samples_file.read_text())
    results = [json.loads((tmp / f"client-{count}-{i}.json").read_text()) for i in range(count)]
    # The timed window: from the step that ended the warm-up to the last timed step, on the server's clock.
    warm = trunk_steps(args, count, args.warmup)
    began = next(t for t, step, _ in samples if step >= warm)
    busy_began = next(b for t, step, b in samples if step >= warm)
    ended, _, busy_ended = samples[-1]
    wall = ended - began
    tokens = count * args.steps * args.batch * args.length
    return {"clients": count, "server_cores": server_cores, "client_cores": client_cores,
            "tokens_per_s": tokens / wall, "server_busy": (busy_ended - busy_began) / wall, "window_s": wall,
            "client_median_ms": [sorted(r["times"])[len(r["times"]) // 2] * 1e3 for r in results],
            "losses": [r["losses"] for r in results]}


def main() -> None:
    parser = run_parser(__doc__, steps=8, warmup=2, per="client")
    parser.add_argument("--cuts", type=int, nargs=2, default=[1, 7])
    parser.add_argument("--trunk_update", choices=("sync", "sequential"), default="sync",
                        help="model.federated.trunk_update of the federation")
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS), help="numbers of clients to run")
    parser.add_argument("--rounds", type=int, default=3, help="repeat every count; the median round is reported")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up step, 3 timed steps, one round")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "clients.json")
    parser.add_argument("--role", choices=("main", "serve", "client"), default="main", help=argparse.SUPPRESS)
    for name in ("--folder", "--address", "--result"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--clients", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=float, default=900, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.rounds = 3, 1, 1
    if args.role == "serve":
        return role_serve(args)
    if args.role == "client":
        return role_client(args)

    began = time.perf_counter()
    folder, params = make_model()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="clients-") as tmp:
        for _ in range(args.rounds):
            runs = [run(folder, count, args, Path(tmp)) for count in args.counts]
            if 1 in args.counts and len(args.counts) > 1:
                # One client again at the round's end: the others are compared with the mean of both one-client
                # runs, which cancels a drift of the machine's speed that is linear over the round.
                again = run(folder, 1, args, Path(tmp))
                one = next(r for r in runs if r["clients"] == 1)
                one["tokens_per_s_each"] = [one["tokens_per_s"], again["tokens_per_s"]]
                one["tokens_per_s"] = statistics.mean(one["tokens_per_s_each"])
            one = next((r for r in runs if r["clients"] == 1), runs[0])
            for r in runs:
                r["ratio_to_one_client"] = r["tokens_per_s"] / one["tokens_per_s"]
            rounds.append(runs)
    # Whole runs vary more than steps within one (on a 2-vCPU machine 1.4x-1.7x for 2 clients): the median round.
    rows = []
    for i, count in enumerate(args.counts):
        runs = sorted((r[i] for r in rounds), key=lambda r: r["ratio_to_one_client"])
        rows.append({**runs[len(runs) // 2], "rounds_ratio_to_one_client": [r[i]["ratio_to_one_client"] for r in rounds]})
    print(f"Qwen2 shape {params / 1e6:.1f}M params, cuts {tuple(args.cuts)}, LoRA r=8 on the trunk, batch "
          f"{args.batch}x{args.length} per client, FedSGD (sync trunk steps), {args.steps} timed steps after "
          f"{args.warmup}; server on cores {rows[0]['server_cores']}, clients on {rows[0]['client_cores']}")
    print(f"{'clients':>7} {'tokens/s':>9} {'x one':>6} {'server busy':>11} {'client ms/step':>15}  x one, every round")
    for r in rows:
        per_client = "/".join(f"{m:.0f}" for m in r["client_median_ms"])
        every = " ".join(f"{x:.2f}" for x in r["rounds_ratio_to_one_client"])
        print(f"{r['clients']:>7} {r['tokens_per_s']:>9.0f} {r['ratio_to_one_client']:>6.2f} {r['server_busy']:>11.2f} "
              f"{per_client:>15}  {every}")
    print("tokens/s: all clients' timed tokens over the server's wall time for those steps; server busy: share of "
          "that time in trunk forward/backward passes; x one: within a round, the median round shown")
    elapsed = time.perf_counter() - began
    print(f"benchmark took {elapsed:.0f} s")
    write_result(args.out, {
        "params": params, "shape": SHAPE, "cuts": args.cuts, "batch": args.batch, "length": args.length,
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "elapsed_s": elapsed, "runs": rows,
        "every_round": rounds})


if __name__ == "__main__":
    main()
