"""Split training over a bandwidth-limited link, with and without pipelining, against the in-process run.

    sudo python benchmarks/slow_link.py            # 1 Gbit/s, 100 and 20 Mbit/s; float32, bfloat16, int8 wire
    sudo python benchmarks/slow_link.py --quick    # smoke run: 1 warm-up step, 3 timed steps

Linux and root only: the script makes a network namespace of its own, brings its loopback up with an
Ethernet-sized MTU (1500) and shapes it with the ``tbf`` qdisc (``netem`` is not available on every kernel), runs
the trunk server and the client inside it over 127.0.0.1 (no other address), and deletes the namespace at the
end. Elsewhere it says why it cannot run and exits 0. Both directions share the shaped loopback, as they would
share a half-duplex link: the rate is the sum of what goes up and what comes down.

The model and batches are ``split_overhead.py``'s (~20M-parameter Qwen2 shape, LoRA r=8 on the trunk, batch
8x128, frozen client). Per rate, one client process in the namespace runs, taking turns batch by batch (so a
machine that slows down mid-run slows all of them alike, and only one of them uses the link at a time): the trunk
in that process (the reference), and per wire dtype over tcp the unpipelined run and the run with each batch sent
as ``--pipeline`` micro-batches in flight at once (:class:`splittrain.cut.Pipeline`), whose losses must equal the
unpipelined run's (to rounding; with the int8 wire, to how the rounding of each micro-batch falls). Every tcp run
has a trunk server process of its own. The bytes per step of each wire are the transport's count, frame headers
included; int8's are compared with float32's (target <= 0.27x), and int8 pipelined at 20 Mbit/s with the in-process
step (target <= 1.3x).

The unpipelined run's transfer time is its step time minus the in-process step time (what the link adds);
pipelining hides the share ``1 - (pipelined - in process) / (unpipelined - in process)`` of it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from machine import write_result  # this folder is on sys.path when a script here runs

import splittrain  # noqa: F401  (before torch: it sets the OpenMP runtime's idle spin, as the CLI does)
import torch

from split_overhead import SHAPE, Split, client_parts, interleave, make_model, run_parser, tcp_server, trunk_server
from train_speed import make_batches

HERE = Path(__file__).resolve().parent
RATES = ("1gbit", "100mbit", "20mbit")
WIRES = ("float32", "bfloat16", "int8")
MTU = 1500


def cannot_run() -> str | None:
    """Why this machine cannot shape a link of its own, or None."""
    if not sys.platform.startswith("linux"):
        return f"needs Linux network namespaces and tc (this is {sys.platform})"
    if os.geteuid() != 0:
        return "needs root to make a network namespace and shape it with tc (run it with sudo)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs the {tool!r} command (iproute2)"
    return None


def rate_bits(rate: str) -> int:
    """Bits per second of a rate in tc's units (``100mbit``, ``1gbit``)."""
    number, unit = rate.removesuffix("bit")[:-1], rate.removesuffix("bit")[-1]
    return int(float(number) * {"k": 1e3, "m": 1e6, "g": 1e9}[unit])


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


class Namespace:
    """A network namespace whose loopback is the shaped link; deleted on exit."""

    def __init__(self) -> None:
        self.name = f"splittrain-bench-{os.getpid()}"

    def __enter__(self) -> "Namespace":
        sh("ip", "netns", "add", self.name)
        try:
            sh("ip", "-n", self.name, "link", "set", "lo", "mtu", str(MTU), "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def shape(self, rate: str) -> None:
        """``rate`` (tc's units: 100mbit, 1gbit) on the loopback, with a bucket of 1 ms of it (at least 4 frames)."""
        burst = max(4 * MTU, rate_bits(rate) // 8 // 1000)
        sh("ip", "netns", "exec", self.name, "tc", "qdisc", "replace", "dev", "lo", "root", "tbf", "rate", rate,
           "burst", str(burst), "latency", "200ms")

    def run(self, args: list[str], timeout: float) -> None:
        """Run a command inside the namespace; on timeout its whole process group (server included) is killed."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *args], start_new_session=True)
        try:
            if proc.wait(timeout=timeout):
                raise RuntimeError(f"{' '.join(args[:4])} ... exited with {proc.returncode}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)


def role_inside(args) -> None:
    """In the namespace: the in-process reference and every tcp run of this rate, interleaved (the servers child
    processes here); their results as JSON."""
    from splittrain.cut import make_link

    batches = make_batches(args.warmup + args.steps, args.batch, args.length, SHAPE["vocab_size"])
    with ExitStack() as stack:
        bottom, top = client_parts(args.folder)
        near = make_link("local", server=trunk_server(args.folder))
        stack.callback(near.close)
        runs = [Split("in process", near, bottom, top)]
        for wire in WIRES:
            for pipeline in (1, args.pipeline):
                link = make_link("tcp", wire_dtype=wire, **tcp_server(stack, args.folder, args.threads))
                stack.callback(link.close)
                runs.append(Split(f"{wire} {pipeline}", link, bottom, top, pipeline))
        result = interleave(runs, batches, args.warmup)
    Path(args.result).write_text(json.dumps(result))


def main() -> None:
    parser = run_parser(__doc__, steps=10, warmup=2)
    parser.add_argument("--pipeline", type=int, default=4, help="micro-batches per batch in the pipelined runs")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every process")
    parser.add_argument("--rates", nargs="+", default=list(RATES), help="link rates in tc's units")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up step, 3 timed steps")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "slow_link.json")
    parser.add_argument("--role", choices=("main", "inside"), default="main", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 3, 1
    torch.set_num_threads(args.threads)
    if args.role == "inside":
        return role_inside(args)

    why = cannot_run()
    if why is not None:
        print(f"slow_link: skipped: {why}")
        return write_result(args.out, {"skipped": why})

    began = time.perf_counter()
    folder, params = make_model()
    rows, in_process = [], {}
    with Namespace() as ns, tempfile.TemporaryDirectory(prefix="slow-link-") as tmp:
        for rate in args.rates:
            ns.shape(rate)
            out = Path(tmp) / f"{rate}.json"
            ns.run([sys.executable, __file__, "--role", "inside", "--folder", folder, "--pipeline", str(args.pipeline),
                    "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                    "--length", str(args.length), "--threads", str(args.threads), "--result", str(out)], timeout=1800)
            runs = json.loads(out.read_text())
            reference = statistics.median(runs["in process"]["times"])
            in_process[rate] = {"median_ms": reference * 1e3, "all_ms": [t * 1e3 for t in runs["in process"]["times"]]}
            for wire in WIRES:
                plain = runs[f"{wire} 1"]
                transfer = statistics.median(plain["times"]) - reference
                for pipeline in (1, args.pipeline):
                    run = runs[f"{wire} {pipeline}"]
                    med = statistics.median(run["times"])
                    rows.append({
                        "rate": rate, "wire": wire, "pipeline": pipeline, "median_ms": med * 1e3,
                        "in_process_ms": reference * 1e3, "wire_ms_at_rate": run["wire_bytes"] * 8 / rate_bits(rate) * 1e3,
                        "ratio_to_in_process": med / reference, "added_ms": (med - reference) * 1e3,
                        "unpipelined_transfer_ms": transfer * 1e3,
                        "hidden_share": 1 - (med - reference) / transfer if pipeline > 1 and transfer > 0 else None,
                        "target_ms": (reference + 0.5 * transfer) * 1e3 if pipeline > 1 else None,
                        "wire_bytes_per_step": run["wire_bytes"],
                        "max_loss_diff_vs_unpipelined": max(abs(a - b) for a, b in zip(run["losses"], plain["losses"])),
                        "all_ms": [t * 1e3 for t in run["times"]], "losses": run["losses"]})

    print(f"Qwen2 shape {params / 1e6:.1f}M params, batch {args.batch}x{args.length}, {args.threads} torch threads "
          f"per process, loopback MTU {MTU} shaped by tbf in a network namespace; medians of {args.steps} steps, "
          f"the runs of a rate taking turns")
    print(f"{'rate':<8} {'wire':<9} {'micro':>5} {'ms/step':>8} {'in-proc':>7} {'x in-proc':>9} {'added ms':>8} "
          f"{'wire ms':>7} {'hidden':>7} {'target ms':>9} {'MiB/step':>8} {'max |dloss|':>11}")
    for r in rows:
        hidden = f"{r['hidden_share']:.2f}" if r["hidden_share"] is not None else "-"
        target = f"{r['target_ms']:.0f}" if r["target_ms"] is not None else "-"
        print(f"{r['rate']:<8} {r['wire']:<9} {r['pipeline']:>5} {r['median_ms']:>8.1f} {r['in_process_ms']:>7.0f} "
              f"{r['ratio_to_in_process']:>9.3f} "
              f"{r['added_ms']:>8.1f} {r['wire_ms_at_rate']:>7.0f} {hidden:>7} {target:>9} "
              f"{r['wire_bytes_per_step'] / 2**20:>8.2f} {r['max_loss_diff_vs_unpipelined']:>11.2e}")
    print("added ms: step time minus in process; wire ms: the step's bytes at the link's rate; hidden: share of the "
          "unpipelined run's added time that pipelining hides; target: in process + half of that added time")
    elapsed = time.perf_counter() - began
    print(f"benchmark took {elapsed:.0f} s")
    write_result(args.out, {
        "params": params, "shape": SHAPE, "batch": args.batch, "length": args.length, "steps": args.steps,
        "warmup": args.warmup, "threads": args.threads, "pipeline": args.pipeline, "mtu": MTU,
        "in_process": in_process, "elapsed_s": elapsed, "runs": rows})


if __name__ == "__main__":
    main()
