"""What splitting costs: the same LoRA training step unsplit, split in one process, over ``dist`` and over ``tcp``.

    python benchmarks/split_overhead.py              # ~20M-param Qwen2 shape, batch 8x128, 20 timed steps (~5 min)
    python benchmarks/split_overhead.py --quick      # smoke run: 1 warm-up step, 3 timed steps

Every run trains LoRA r=8 (the 7 projections of the trunk layers, cuts (2, 6)) with AdamW on the same batches
from the same initial adapters; the client's bottom and top are frozen, as in ``train_speed.py``. Runs:

- ``unsplit``: the whole model with peft adapters on the trunk layers (the floor);
- ``local``: split, the trunk server in the same process (``LocalTransport``);
- ``tcp``: the trunk server (``TcpServer``) in a subprocess on 127.0.0.1, the client in this process;
- ``dist``: ``torch.distributed.run --standalone --nproc_per_node 2`` with gloo on ``lo``; rank 0 serves the
  trunk, rank 1 is the timed client;

each split run with a float32 and a bfloat16 wire. The runs of one job take turns batch by batch (each holds
its own adapters and optimizer), so a machine that slows down mid-run slows all of them alike: this process runs
unsplit, local and tcp; each torchrun job runs unsplit, local/float32 (the in-process figure dist is compared
with) and dist with one wire in its client rank. Every process sets the same number of torch threads (``--threads``,
default: all cores; torchrun's ``OMP_NUM_THREADS=1`` is overridden). Client and server take turns (the protocol
is synchronous), so they never compute at the same time; a server whose client is not stepping waits in a
blocking read.

Bytes on the wire are the transport's own count (frames and headers over dist/tcp; tensor bytes in process).
The payload floor is what must cross per step: the hidden states up to the trunk, the trunk's output back
and dL/dh of that output up again (3 crossings of B x T x H elements in the wire dtype); dL/dh_in coming back
down is not needed because nothing below the cut trains. Read the ratios: absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from machine import write_result  # this folder is on sys.path when a script here runs

import splittrain  # before torch: it sets the OpenMP runtime's idle spin, as the CLI does
import torch

from train_speed import make_batches  # this folder is on sys.path when a script here runs

HERE = Path(__file__).resolve().parent
# ~20M parameters: embedding 32000 x 320 (tied) = 10.2M, 8 layers x 1.23M = 9.8M.
SHAPE = dict(vocab_size=32000, hidden_size=320, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=5,
             num_key_value_heads=1, tie_word_embeddings=True)
CUTS = (2, 6)
WIRES = ("float32", "bfloat16")
CROSSINGS = 3  # hidden up, hidden down, dL/dh up (no dL/dh_in down: the bottom is frozen)


def lora_settings():
    from splittrain.lora import LoraSettings

    return LoraSettings(r=8, alpha=16)


def trunk_server(folder: str):
    from splittrain.server import TrunkServer, load_trunk
    from splittrain.optim import OptimSettings

    return TrunkServer(load_trunk(folder, CUTS, lora_settings()), OptimSettings(lr=1e-3))


def client_parts(folder: str):
    bottom, top = splittrain.split_model(folder, cuts=CUTS, parts=("bottom", "top"))
    bottom.requires_grad_(False)
    top.requires_grad_(False)
    return bottom, top


def client_fingerprint(folder: str) -> dict:
    from transformers import AutoConfig

    from splittrain.transport import fingerprint

    return fingerprint(AutoConfig.from_pretrained(folder), "qwen2", CUTS, torch.float32)


def make_model() -> tuple[str, int]:
    """The benchmark's model (seeded random weights) saved in a temporary folder, removed when this process exits;
    (folder, parameter count)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="splittrain-overhead-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPE))
    model.save_pretrained(folder)
    return folder, sum(p.numel() for p in model.parameters())


# ================================================================================================ timed runs
class Unsplit:
    """The floor: the whole model with peft adapters on the trunk layers, trained one batch per ``step``."""

    name, wire_bytes = "unsplit", 0

    def __init__(self, folder: str) -> None:
        from peft import inject_adapter_in_model
        from transformers import AutoModelForCausalLM

        from splittrain.lora import init_lora, lora_config, model_family
        from splittrain.optim import OptimSettings, build_optimizer

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        self.model.requires_grad_(False)
        inject_adapter_in_model(lora_config(model_family(self.model), range(*CUTS), lora_settings()), self.model)
        init_lora(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, _ = build_optimizer(params, OptimSettings(lr=1e-3), None)

    def step(self, index: int, batch: dict) -> float:
        loss = self.model(**batch, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item()


class Split:
    """Split training through ``link``, one batch per ``step``; ``pipeline`` > 1 sends each batch as that many
    micro-batches in flight."""

    def __init__(self, name: str, link, bottom, top, pipeline: int = 1) -> None:
        from splittrain.crossing import Crossing

        self.name, self.link, self.pipeline = name, link, pipeline
        self.crossing = Crossing(bottom, top, link)

    @property
    def wire_bytes(self) -> int:
        return self.link.wire_bytes

    def step(self, index: int, batch: dict) -> float:
        if self.pipeline > 1:
            loss, pipe = self.crossing.pipelined_loss(batch, self.pipeline, ("bench", index, 0), index)
            loss.backward()
            pipe.finish()
        else:
            loss = self.crossing.forward(batch, ("bench", index, 0), index).loss
            loss.backward()
        self.link.step(index + 1)
        return loss.item()


def interleave(runs: list, batches, warmup: int) -> dict[str, dict]:
    """Every batch through every run, the runs taking turns (the first one rotates each step), so that the
    machine's drift falls on all of them alike. Per run: timed step seconds, every loss, wire bytes per timed step."""
    out = {run.name: {"times": [], "losses": [], "wire_at": 0} for run in runs}
    for index, batch in enumerate(batches):
        turn = index % len(runs)
        for run in runs[turn:] + runs[:turn]:
            record = out[run.name]
            if index == warmup:
                record["wire_at"] = run.wire_bytes
            began = time.perf_counter()
            record["losses"].append(run.step(index, batch))
            if index >= warmup:
                record["times"].append(time.perf_counter() - began)
    timed = len(batches) - warmup
    for run in runs:
        record = out[run.name]
        record["wire_bytes"] = (run.wire_bytes - record.pop("wire_at")) / timed
    return out


def split_loop(link, bottom, top, batches, warmup: int, pipeline: int = 1) -> dict:
    """Timed split training steps through ``link`` alone (see ``interleave``)."""
    return interleave([Split("split", link, bottom, top, pipeline)], batches, warmup)["split"]


def local(folder: str, batches, warmup: int, wire: str) -> dict:
    from splittrain.cut import make_link

    bottom, top = client_parts(folder)
    link = make_link("local", wire_dtype=wire, server=trunk_server(folder))
    try:
        return split_loop(link, bottom, top, batches, warmup)
    finally:
        link.close()


def start_server(folder: str, threads: int, *extra: str, token: str, prefix: tuple[str, ...] = ()):
    """A tcp trunk server process on 127.0.0.1 (a free port); returns (process, address). ``prefix`` runs it under
    another command (``ip netns exec NS``, ``taskset``)."""
    env = {**os.environ, "SPLIT_OVERHEAD_TOKEN": token}
    proc = subprocess.Popen([*prefix, sys.executable, str(HERE / "split_overhead.py"), "--role", "serve", "--folder",
                             folder, "--threads", str(threads), *extra], stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline().strip()
    if not line.startswith("ADDRESS "):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the tcp trunk server did not start (said {line!r}, exit {proc.poll()})")
    return proc, line.split(" ", 1)[1]


def tcp_server(stack: ExitStack, folder: str, threads: int) -> dict:
    """A fresh tcp trunk server process, killed when ``stack`` closes: the options of ``make_link("tcp", ...)`` that
    reach it as client ``bench``."""
    from splittrain.transport.tcp import make_token

    token = make_token()
    proc, address = start_server(folder, threads, token=token)

    def end() -> None:
        proc.kill()
        proc.wait()

    stack.callback(end)
    return {"address": address, "client": "bench", "token": token, "fingerprint": client_fingerprint(folder)}


def tcp(folder: str, batches, warmup: int, wire: str, threads: int, pipeline: int = 1) -> dict:
    from splittrain.cut import make_link

    with ExitStack() as stack:
        link = make_link("tcp", wire_dtype=wire, **tcp_server(stack, folder, threads))
        stack.callback(link.close)
        bottom, top = client_parts(folder)
        return split_loop(link, bottom, top, batches, warmup, pipeline)


def one_process(folder: str, batches, args) -> dict[str, dict]:
    """The floor, in process and tcp (each wire), interleaved in this process; the tcp servers are subprocesses."""
    from splittrain.cut import make_link

    with ExitStack() as stack:
        bottom, top = client_parts(folder)  # frozen and stateless: the split runs share them
        runs = [Unsplit(folder)]
        for wire in WIRES:
            link = make_link("local", wire_dtype=wire, server=trunk_server(folder))
            stack.callback(link.close)
            runs.append(Split(f"local/{wire}", link, bottom, top))
        for wire in WIRES:
            link = make_link("tcp", wire_dtype=wire, **tcp_server(stack, folder, args.threads))
            stack.callback(link.close)
            runs.append(Split(f"tcp/{wire}", link, bottom, top))
        return interleave(runs, batches, args.warmup)


def dist(folder: str, args, wire: str) -> dict[str, dict]:
    """A torchrun job: unsplit, in process (float32) and dist with ``wire`` interleaved in its client rank."""
    with tempfile.TemporaryDirectory(prefix="split-overhead-") as tmp:
        out = Path(tmp) / "dist.json"
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--role", "dist", "--folder", folder, "--wire", wire, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--length", str(args.length),
               "--threads", str(args.threads), "--result", str(out)]
        subprocess.run(cmd, env=env, check=True, timeout=900)
        return json.loads(out.read_text())


# ================================================================================================ roles
def role_serve(args) -> None:
    """TCP trunk server on 127.0.0.1 (free port); prints its address, serves until killed."""
    from splittrain.transport.tcp import TcpServer

    server = TcpServer(trunk_server(args.folder), "127.0.0.1:0", {"bench": os.environ["SPLIT_OVERHEAD_TOKEN"]})
    print(f"ADDRESS {server.address}", flush=True)
    server.serve_forever()


def role_dist(args) -> None:
    """One rank of the torchrun job: rank 0 serves the trunk; rank 1 runs unsplit, in process and dist
    interleaved, and writes their results."""
    import torch.distributed as tdist

    from splittrain.cut import make_link
    from splittrain.transport.dist import ensure_process_group, serve

    rank, _ = ensure_process_group(600.0)
    if rank == 0:
        serve(trunk_server(args.folder))
    else:
        batches = make_batches(args.warmup + args.steps, args.batch, args.length, SHAPE["vocab_size"])
        bottom, top = client_parts(args.folder)
        remote = make_link("dist", wire_dtype=args.wire, fingerprint=client_fingerprint(args.folder))
        near = make_link("local", server=trunk_server(args.folder))
        try:
            runs = [Unsplit(args.folder), Split("local/float32", near, bottom, top),
                    Split(f"dist/{args.wire}", remote, bottom, top)]
            result = interleave(runs, batches, args.warmup)
        finally:
            near.close()
            remote.close()
        Path(args.result).write_text(json.dumps(result))
    tdist.destroy_process_group()


# ================================================================================================ main
def rows_of(job: str, runs: dict[str, dict], floor: dict, tokens: int, hidden: int) -> list[dict]:
    """The table's rows of one job; ratios to the runs of the same job (``unsplit``, ``local/float32``)."""
    near = runs["local/float32"]
    near_s, near_min = statistics.median(near["times"]), min(near["times"])
    base = runs.get("unsplit")
    rows = []
    for name, run in runs.items():
        wire = name.split("/")[1] if "/" in name else None
        med = statistics.median(run["times"])
        payload = CROSSINGS * tokens * hidden * (torch.finfo(getattr(torch, wire)).bits // 8) if wire else 0
        rows.append({
            "job": job, "run": name, "median_ms": med * 1e3, "min_ms": min(run["times"]) * 1e3,
            "ratio_to_unsplit": med / statistics.median(base["times"]) if base else None,
            "min_ratio_to_unsplit": min(run["times"]) / min(base["times"]) if base else None,
            "ratio_to_in_process": med / near_s, "min_ratio_to_in_process": min(run["times"]) / near_min,
            "tokens_per_s": tokens / med, "wire_bytes_per_step": run["wire_bytes"], "payload_floor_bytes": payload,
            "wire_to_payload": run["wire_bytes"] / payload if payload else None,
            "max_loss_diff_vs_unsplit": max(abs(a - b) for a, b in zip(run["losses"], floor["losses"])),
            "all_ms": [t * 1e3 for t in run["times"]], "losses": run["losses"]})
    return rows


def run_parser(doc: str, steps: int, warmup: int, per: str = "run") -> argparse.ArgumentParser:
    """The cost benchmarks' shared options: timed and warm-up steps, batch rows and length."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps, help=f"timed steps per {per}")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed steps before them")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    return parser


def main() -> None:
    parser = run_parser(__doc__, steps=20, warmup=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every process")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up step, 3 timed steps")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "split_overhead.json")
    parser.add_argument("--role", choices=("main", "serve", "dist"), default="main", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--wire", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = 3, 1
    torch.set_num_threads(args.threads)
    if args.role == "serve":
        return role_serve(args)
    if args.role == "dist":
        return role_dist(args)

    began = time.perf_counter()
    folder, params = make_model()
    batches = make_batches(args.warmup + args.steps, args.batch, args.length, SHAPE["vocab_size"])
    hidden, tokens = SHAPE["hidden_size"], args.batch * args.length

    jobs = {"one process": one_process(folder, batches, args)}
    for wire in WIRES:
        jobs[f"torchrun, dist/{wire}"] = dist(folder, args, wire)
    floor = jobs["one process"]["unsplit"]
    rows = [row for job, runs in jobs.items() for row in rows_of(job, runs, floor, tokens, hidden)]
    half = len(floor["times"]) // 2
    first, last = statistics.median(floor["times"][:half or 1]), statistics.median(floor["times"][half:])

    print(f"Qwen2 shape {params / 1e6:.1f}M params (hidden {hidden}, {SHAPE['num_hidden_layers']} layers, vocab "
          f"{SHAPE['vocab_size']}), cuts {CUTS}, LoRA r=8 on the trunk, batch {args.batch}x{args.length}, fp32 "
          f"compute, {args.threads} torch threads in every process, {args.steps} timed steps after {args.warmup} "
          f"warm-up, the runs of a job taking turns; payload floor = {CROSSINGS} crossings x B x T x H x bytes")
    print(f"{'job':<22} {'run':<15} {'ms/step':>8} {'x unsplit':>9} {'x in-proc':>9} {'min x':>6} {'tokens/s':>9} "
          f"{'MiB/step':>9} {'x payload':>9} {'max |dloss|':>11}")
    for r in rows:
        payload = f"{r['wire_to_payload']:.3f}" if r["wire_to_payload"] else "-"
        mib = f"{r['wire_bytes_per_step'] / 2**20:.2f}" if r["wire_bytes_per_step"] else "-"
        unsplit_ratio = f"{r['ratio_to_unsplit']:.3f}" if r["ratio_to_unsplit"] is not None else "-"
        print(f"{r['job']:<22} {r['run']:<15} {r['median_ms']:>8.1f} {unsplit_ratio:>9} {r['ratio_to_in_process']:>9.3f} "
              f"{r['min_ratio_to_in_process']:>6.3f} {r['tokens_per_s']:>9.0f} {mib:>9} {payload:>9} "
              f"{r['max_loss_diff_vs_unsplit']:>11.2e}")
    print("ms/step: median over the timed steps; x unsplit, x in-proc: to the medians of the same job's unsplit and "
          "local/float32 runs; min x: fastest step / the fastest local/float32 step")
    print(f"unsplit medians: first half {first * 1e3:.1f} ms, second half {last * 1e3:.1f} ms")
    elapsed = time.perf_counter() - began
    print(f"benchmark took {elapsed:.0f} s")

    write_result(args.out, {
        "params": params, "shape": SHAPE, "cuts": CUTS, "lora_r": 8, "batch": args.batch, "length": args.length,
        "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "payload_crossings": CROSSINGS,
        "unsplit_median_first_half_ms": first * 1e3, "unsplit_median_second_half_ms": last * 1e3,
        "elapsed_s": elapsed, "runs": rows,
    })


if __name__ == "__main__":
    main()
