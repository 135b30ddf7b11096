"""What splitting costs: the same LoRA training step unsplit, split in one process, over ``dist`` and over ``tcp``.

    python benchmarks/split_overhead.py              # ~20M-param Qwen2 shape, batch 8x128, 10 timed steps
    python benchmarks/split_overhead.py --quick      # smoke run: 1 warm-up step, 3 timed steps
    python benchmarks/split_overhead.py --rounds 2   # every split run twice, pooled (~6 min on 2 cores)

Every run trains LoRA r=8 (the 7 projections of the trunk layers, cuts (2, 6)) with AdamW on the same batches
from the same initial adapters; the client's bottom and top are frozen, as in ``train_speed.py``. Runs:

- ``unsplit``: the whole model with peft adapters on the trunk layers (the floor);
- ``local``: split, the trunk server in the same process (``LocalTransport``);
- ``dist``: ``torch.distributed.run --standalone --nproc_per_node 2`` with gloo on ``lo``; rank 0 serves the
  trunk, rank 1 is the timed client;
- ``tcp``: the trunk server (``TcpServer``) in a subprocess on 127.0.0.1, the client in this process;

each split run with a float32 and a bfloat16 wire. Every process sets the same number of torch threads
(``--threads``, default: all cores), torchrun's ``OMP_NUM_THREADS=1`` is overridden. Client and server take
turns (the protocol is synchronous), so they never compute at the same time.

Bytes on the wire are the transport's own count (frames and headers over dist/tcp; tensor bytes in process).
The payload floor is what must cross per step: the hidden states up to the trunk, the trunk's output back
and dL/dh of that output up again (3 crossings of B x T x H elements in the wire dtype); dL/dh_in coming back
down is not needed because nothing below the cut trains. Read the ratios: absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
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
    from splittrain.server import OptimSettings, TrunkServer, load_trunk

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
    """The benchmark's model (seeded random weights) saved in a temporary folder; (folder, parameter count)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="splittrain-overhead-")
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPE))
    model.save_pretrained(folder)
    return folder, sum(p.numel() for p in model.parameters())


# ================================================================================================ timed loops
def unsplit(folder: str, batches, warmup: int) -> dict:
    from peft import inject_adapter_in_model
    from transformers import AutoModelForCausalLM

    from splittrain.lora import init_lora, lora_config, model_family
    from splittrain.server import OptimSettings, build_optimizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.requires_grad_(False)
    inject_adapter_in_model(lora_config(model_family(model), range(*CUTS), lora_settings()), model)
    init_lora(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, _ = build_optimizer(params, OptimSettings(lr=1e-3), None)
    times, losses = [], []
    for batch in batches:
        began = time.perf_counter()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - began)
        losses.append(loss.item())
    return {"times": times[warmup:], "losses": losses, "wire_bytes": 0}


def split_loop(link, bottom, top, batches, warmup: int, pipeline: int = 1) -> dict:
    """Timed split training steps; ``pipeline`` > 1 sends each batch as that many micro-batches in flight."""
    from splittrain.cut import cross, pipelined_loss

    times, losses, wire_at = [], [], 0
    for step, batch in enumerate(batches):
        if step == warmup:
            wire_at = link.wire_bytes
        began = time.perf_counter()
        if pipeline > 1:
            loss, pipe = pipelined_loss(link, bottom, top, batch, pipeline, ("bench", step, 0), step)
            loss.backward()
            pipe.finish()
        else:
            state = bottom(batch["input_ids"], attention_mask=batch["attention_mask"])
            loss = top(cross(link, state, ("bench", step, 0), step), labels=batch["labels"]).loss
            loss.backward()
        link.step(step + 1)
        times.append(time.perf_counter() - began)
        losses.append(loss.item())
    timed = len(batches) - warmup
    return {"times": times[warmup:], "losses": losses, "wire_bytes": (link.wire_bytes - wire_at) / timed}


def local(folder: str, batches, warmup: int, wire: str) -> dict:
    from splittrain.cut import TrunkLink
    from splittrain.transport.local import LocalTransport

    bottom, top = client_parts(folder)
    link = TrunkLink(LocalTransport(trunk_server(folder)), wire_dtype=wire)
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


def tcp(folder: str, batches, warmup: int, wire: str, threads: int, pipeline: int = 1) -> dict:
    from splittrain.cut import TrunkLink
    from splittrain.transport.tcp import TcpTransport, make_token

    token = make_token()
    proc, address = start_server(folder, threads, token=token)
    try:
        bottom, top = client_parts(folder)
        link = TrunkLink(TcpTransport(address, "bench", token, client_fingerprint(folder)), wire_dtype=wire)
        try:
            return split_loop(link, bottom, top, batches, warmup, pipeline)
        finally:
            link.close()
    finally:
        proc.kill()
        proc.wait()


def dist(folder: str, args, wire: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="split-overhead-") as tmp:
        out = Path(tmp) / "dist.json"
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--role", "dist", "--folder", folder, "--wire", wire, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch", str(args.batch), "--length", str(args.length),
               "--threads", str(args.threads), "--result", str(out)]
        subprocess.run(cmd, env=env, check=True, timeout=600)
        return json.loads(out.read_text())


# ================================================================================================ roles
def role_serve(args) -> None:
    """TCP trunk server on 127.0.0.1 (free port); prints its address, serves until killed."""
    from splittrain.transport.tcp import TcpServer

    server = TcpServer(trunk_server(args.folder), "127.0.0.1:0", {"bench": os.environ["SPLIT_OVERHEAD_TOKEN"]})
    print(f"ADDRESS {server.address}", flush=True)
    server.serve_forever()


def role_dist(args) -> None:
    """One rank of the torchrun job: rank 0 serves the trunk, rank 1 runs the timed loop and writes its result."""
    import torch.distributed as tdist

    from splittrain.cut import TrunkLink
    from splittrain.transport.dist import DistTransport, ensure_process_group, serve

    rank, _ = ensure_process_group(600.0)
    if rank == 0:
        serve(trunk_server(args.folder))
    else:
        batches = make_batches(args.warmup + args.steps, args.batch, args.length, SHAPE["vocab_size"])
        bottom, top = client_parts(args.folder)
        link = TrunkLink(DistTransport(client_fingerprint(args.folder)), wire_dtype=args.wire)
        try:
            result = split_loop(link, bottom, top, batches, args.warmup)
        finally:
            link.close()
        result["threads"] = torch.get_num_threads()
        Path(args.result).write_text(json.dumps(result))
    tdist.destroy_process_group()


# ================================================================================================ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every process")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the split runs (an unsplit run after each)")
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

    runs: dict[str, dict] = {}

    def add(name: str, run: dict) -> None:
        if name in runs:
            runs[name]["times"] += run["times"]
        else:
            runs[name] = run

    # The floor runs first and after every round, so the machine's drift shows in it as in the others.
    floor_first = unsplit(folder, batches, args.warmup)
    add("unsplit", dict(floor_first, times=list(floor_first["times"])))
    for _ in range(args.rounds):
        for wire in WIRES:
            add(f"local/{wire}", local(folder, batches, args.warmup, wire))
        for wire in WIRES:
            add(f"dist/{wire}", dist(folder, args, wire))
        for wire in WIRES:
            add(f"tcp/{wire}", tcp(folder, batches, args.warmup, wire, args.threads))
        floor_last = unsplit(folder, batches, args.warmup)
        add("unsplit", floor_last)
    floor = runs["unsplit"]
    floor["median_first_s"] = statistics.median(floor_first["times"])
    floor["median_last_s"] = statistics.median(floor_last["times"])

    floor_s = statistics.median(floor["times"])
    rows = []
    for name, run in runs.items():
        wire = name.split("/")[1] if "/" in name else None
        med = statistics.median(run["times"])
        payload = CROSSINGS * tokens * hidden * (torch.finfo(getattr(torch, wire)).bits // 8) if wire else 0
        max_loss_diff = max(abs(a - b) for a, b in zip(run["losses"], floor["losses"]))
        rows.append({"run": name, "median_ms": med * 1e3, "min_ms": min(run["times"]) * 1e3,
                     "min_ratio_to_unsplit": min(run["times"]) / min(floor["times"]), "ratio_to_unsplit": med / floor_s, "tokens_per_s": tokens / med,
                     "wire_bytes_per_step": run["wire_bytes"], "payload_floor_bytes": payload,
                     "wire_to_payload": run["wire_bytes"] / payload if payload else None,
                     "max_loss_diff_vs_unsplit": max_loss_diff,
                     "all_ms": [t * 1e3 for t in run["times"]], "losses": run["losses"]})

    print(f"Qwen2 shape {params / 1e6:.1f}M params (hidden {hidden}, {SHAPE['num_hidden_layers']} layers, vocab "
          f"{SHAPE['vocab_size']}), cuts {CUTS}, LoRA r=8 on the trunk, batch {args.batch}x{args.length}, fp32 "
          f"compute, {args.threads} torch threads in every process, {args.steps} timed steps after {args.warmup} "
          f"warm-up; payload floor = {CROSSINGS} crossings x B x T x H x bytes")
    print(f"{'run':<15} {'ms/step':>8} {'x unsplit':>9} {'min x':>6} {'tokens/s':>9} {'MiB/step':>9} {'x payload':>9} "
          f"{'max |dloss|':>11}")
    for r in rows:
        ratio = f"{r['wire_to_payload']:.3f}" if r["wire_to_payload"] else "-"
        mib = f"{r['wire_bytes_per_step'] / 2**20:.2f}" if r["wire_bytes_per_step"] else "-"
        print(f"{r['run']:<15} {r['median_ms']:>8.1f} {r['ratio_to_unsplit']:>9.3f} {r['min_ratio_to_unsplit']:>6.3f} {r['tokens_per_s']:>9.0f} "
              f"{mib:>9} {ratio:>9} {r['max_loss_diff_vs_unsplit']:>11.2e}")
    print("ms/step and x unsplit: medians over the timed steps; min x: fastest step / fastest unsplit step")
    print(f"unsplit medians: first {floor['median_first_s'] * 1e3:.1f} ms, last {floor['median_last_s'] * 1e3:.1f} ms")
    elapsed = time.perf_counter() - began
    print(f"benchmark took {elapsed:.0f} s")

    write_result(args.out, {
        "params": params, "shape": SHAPE, "cuts": CUTS, "lora_r": 8, "batch": args.batch, "length": args.length,
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "threads": args.threads, "payload_crossings": CROSSINGS,
        "unsplit_median_first_ms": floor["median_first_s"] * 1e3, "unsplit_median_last_ms": floor["median_last_s"] * 1e3,
        "elapsed_s": elapsed, "runs": rows,
    })


if __name__ == "__main__":
    main()
