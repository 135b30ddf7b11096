"""Peak memory of federated clients simulated in one process: 1 client vs 2 and 4, both averaging modes.

    python benchmarks/federated_memory.py                  # ~123M-param Qwen2, 3 steps of 4x128 tokens (~11 min)
    python benchmarks/federated_memory.py --size small     # split_overhead.py's ~20M shape (framework outweighs it)
    python benchmarks/federated_memory.py --no-malloc-check --clients 4    # the target alone (~5 min)
    python benchmarks/federated_memory.py --size small --full-client       # contrast: clients training bottom + top

Target: 4 clients simulated in one process peak at <= 1.2x the RSS of one client.

Every run is ``python -m splittrain fit --config configs/quickstart.yaml`` in its own child process, on a random
Qwen2-shaped model built as in ``split_overhead.py`` and saved with ``save_pretrained`` into a temporary folder
(vocabulary 32000: it covers the quickstart tokenizer's 384 ids), cuts (2, 6), trained on the quickstart rows with
``client: lora`` (LoRA r=8 on the client's bottom and top layers: the frozen base weights are shared by all
simulated clients, each client has its own adapters and AdamW) and the trunk's LoRA from the quickstart config.
Rows are packed into 128-token rows (``--no-packing``: padded to each batch's longest row), so every step of every
client has the same shape and a peak compares state, not which client drew the longest batch. Checkpoint callbacks
off, no sanity check, 2 validation batches, no sample answer, ``OMP_NUM_THREADS=1`` (``--threads``). Runs:

- ``floor``: the same command on the embedded 0.7M-parameter quickstart model: the Python/torch/Lightning/datasets
  floor that any run pays, whatever the model;
- ``base``: the model, one client, not federated (``model.federated.clients 1``);
- ``gradients``/``weights``: ``model.federated.clients`` 2 and 4 (iid shards), ``average: gradients`` (FedSGD)
  and ``average: weights`` (FedAvg, ``average_every`` 2);
- allocator ``mmap64k`` (``--malloc-check``, on by default): floor, base and the gradients runs again with
  ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc returns every freed block of 64 KiB or more to the kernel at once and
  the peak follows the live tensors instead of what the heap kept from earlier, differently shaped, allocations.

With several simulated clients ``fit`` hands the heap pages freed by each client's backward pass back to the
kernel (glibc's ``malloc_trim``, :func:`splittrain.loading.release_freed_memory`); a run with one client does
not, so glibc's heap keeps pages of earlier, differently shaped allocations there, and 2 or 4 clients can peak
slightly below one. The ``mmap64k`` runs show the live growth without that effect.

Peak RSS is exact per child: the child is reaped with ``os.wait4``, whose ``ru_maxrss`` is the kernel's peak
resident set (anonymous plus file-backed pages: the memory-mapped weights count once touched) of that process
(and of any descendant it reaped; ``fit`` starts none here). The ratio is peak / the base peak under the same
allocator. The script also prints what each extra client should cost: its trainable tensors (client-side LoRA) x 4
(fp32 weights, their gradients, AdamW's two moments), its trunk-LoRA gradients (the server keeps them per client);
the ``expected`` column adds the float64 vectors an average is computed in (one per client, the average, one in
the making) as if all were alive at the peak: an upper estimate of the live growth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # this folder is on sys.path when a script here runs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = ROOT / "configs" / "quickstart.yaml"
SHAPES = {  # Qwen2, fp32, tied embeddings; vocabulary 32000 >= the quickstart tokenizer's 384 ids
    # ~123M: embedding 32000 x 1024 = 32.8M, 8 layers x 11.3M = 90.4M (load_memory.py's default shape)
    "default": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                    num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True),
    # ~20M: split_overhead.py's shape
    "small": dict(vocab_size=32000, hidden_size=320, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=5,
                  num_key_value_heads=1, tie_word_embeddings=True),
}
CUTS = (2, 6)
TARGET = 1.2
AVERAGE_EVERY = 2  # average: weights
MMAP_THRESHOLD = 65536  # MALLOC_MMAP_THRESHOLD_ of the allocator check


def build_model(folder: str, size: str) -> int:
    """A random Qwen2 of ``size`` saved in ``folder``; returns its parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPES[size]))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    return params


def per_client_tensors(folder: str, client: str) -> dict:
    """Trainable elements one client holds (bottom + top as ``client`` trains them) and the trunk's LoRA elements
    (the server keeps one gradient of them per client), from the settings of configs/quickstart.yaml."""
    import yaml

    import splittrain
    from splittrain.lora import LoraSettings, prepare
    from splittrain.server import load_trunk

    trunk_lora = yaml.safe_load(CONFIG.read_text())["model"]["trunk"]["lora"]
    bottom, top = splittrain.split_model(folder, cuts=CUTS, parts=("bottom", "top"))
    bottom, top = prepare(bottom, client, LoraSettings()), prepare(top, client, LoraSettings())
    # tied embeddings: count a shared tensor once
    client_elems = sum(p.numel() for p in {id(p): p for m in (bottom, top) for p in m.parameters()
                                           if p.requires_grad}.values())
    trunk = load_trunk(folder, CUTS, LoraSettings(**trunk_lora))
    trunk_elems = sum(p.numel() for p in trunk.parameters() if p.requires_grad)
    return {"client_trainable": client_elems, "trunk_lora": trunk_elems,
            # fp32: weights + gradients + AdamW exp_avg + exp_avg_sq, and one trunk-LoRA gradient per client
            "bytes_per_extra_client": 16 * client_elems + 4 * trunk_elems}


def fit_command(model: str, run_dir: Path, args, client: str, clients: int, average: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "splittrain", "fit", "--config", str(CONFIG),
           "--model.model", model, "--model.cuts", json.dumps(list(CUTS) if model != "quickstart" else [2, 4]),
           "--model.client", client, "--model.sample_prompt", "null", "--model.eval_generate", "false",
           "--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", str(args.steps),
           "--trainer.val_check_interval", str(args.steps), "--trainer.limit_val_batches", "2",
           "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
           "--data.train", "quickstart", "--data.tokenizer", "quickstart", "--data.batch_size", str(args.batch),
           "--data.packing", str(args.packing).lower(), "--model.federated.clients", str(clients)]
    if average is not None:
        cmd += ["--model.federated.average", average, "--data.partition", "iid"]
        if average == "weights":
            cmd += ["--model.federated.average_every", str(AVERAGE_EVERY)]
    return cmd


def measure(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[int, float]:
    """Run ``cmd`` as a child; its peak RSS in bytes (``os.wait4``'s ru_maxrss, KiB on Linux) and seconds."""
    began = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **env})
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - began
    if proc.returncode != 0:
        sys.stdout.write(log.read_text()[-4000:])
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}")
    return usage.ru_maxrss * 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SHAPES), default="default")
    parser.add_argument("--steps", type=int, default=3, help="training steps per run")
    parser.add_argument("--batch", type=int, default=4, help="rows per client batch")
    parser.add_argument("--clients", type=int, nargs="+", default=[2, 4], help="federated client counts")
    parser.add_argument("--packing", action=argparse.BooleanOptionalAction, default=True,
                        help="pack the rows into max_length (128) token rows: every batch then has the same shape")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every fit")
    parser.add_argument("--malloc-check", action=argparse.BooleanOptionalAction, default=True,
                        help=f"repeat floor, base and the gradients runs with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}")
    parser.add_argument("--full-client", action="store_true",
                        help="also run `client: full` (1 and the largest count, gradients): per-client state is "
                             "then the whole bottom + top (heavy with --size default)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "federated_memory.json")
    args = parser.parse_args()

    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="splittrain-fedmem-"))
    env = {"OMP_NUM_THREADS": str(args.threads)}
    strict = {**env, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    try:
        folder = str(work / "model")
        params = build_model(folder, args.size)
        checkpoint_bytes = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
        tensors = {"lora": per_client_tensors(folder, "lora")}
        if args.full_client:
            tensors["full"] = per_client_tensors(folder, "full")

        # (mode, model folder, client mode, clients, average, allocator)
        plan = [("floor", "quickstart", "lora", 1, None, "glibc")]
        plan += [("base", folder, "lora", 1, None, "glibc")]
        for average in ("gradients", "weights"):
            plan += [(average, folder, "lora", n, average, "glibc") for n in args.clients]
        if args.malloc_check:
            plan += [("floor", "quickstart", "lora", 1, None, "mmap64k"), ("base", folder, "lora", 1, None, "mmap64k")]
            plan += [("gradients", folder, "lora", n, "gradients", "mmap64k") for n in args.clients]
        if args.full_client:
            plan += [("base", folder, "full", 1, None, "glibc"),
                     ("gradients", folder, "full", max(args.clients), "gradients", "glibc")]

        rows = []
        for mode, model, client, clients, average, allocator in plan:
            run_dir = work / f"run-{mode}-{client}-{clients}-{allocator}"
            peak, seconds = measure(fit_command(model, run_dir, args, client, clients, average),
                                    work / f"{run_dir.name}.log", strict if allocator == "mmap64k" else env)
            summary = json.loads((run_dir / "summary.json").read_text())
            rows.append({"mode": mode, "client": client, "clients": clients, "allocator": allocator,
                         "model": "quickstart" if model == "quickstart" else args.size, "peak_rss_bytes": peak,
                         "seconds": seconds, "steps": summary["steps"], "val_loss": summary["val_loss"]})
            print(f"  {mode:<9} client={client:<4} clients={clients} {allocator:<7}: peak {peak / 2**20:.0f} MiB, "
                  f"{seconds:.0f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    floors = {r["allocator"]: r["peak_rss_bytes"] for r in rows if r["mode"] == "floor"}
    bases = {(r["client"], r["allocator"]): r["peak_rss_bytes"] for r in rows if r["mode"] == "base"}
    for r in rows:
        if r["mode"] == "floor":
            r.update(ratio_to_one_client=None, over_floor_ratio=None, extra_vs_one_client_bytes=None,
                     expected_extra_bytes=None, meets_target=None)
            continue
        base, floor = bases[(r["client"], r["allocator"])], floors[r["allocator"]]
        t = tensors[r["client"]]
        r["ratio_to_one_client"] = r["peak_rss_bytes"] / base
        r["over_floor_ratio"] = (r["peak_rss_bytes"] - floor) / (base - floor)
        r["extra_vs_one_client_bytes"] = r["peak_rss_bytes"] - base
        # the extra clients' state, and (federated only) the float64 vectors of an average: one per client, the
        # average, and one client's pieces while they are concatenated
        buffers = 8 * t["client_trainable"] * (r["clients"] + 2) if r["clients"] > 1 else 0
        r["expected_extra_bytes"] = t["bytes_per_extra_client"] * (r["clients"] - 1) + buffers
        r["meets_target"] = r["ratio_to_one_client"] <= TARGET if r["clients"] == 4 else None

    shape = SHAPES[args.size]
    print(f"\nQwen2 shape '{args.size}': {params / 1e6:.1f}M params, {checkpoint_bytes / 2**20:.0f} MiB fp32 "
          f"checkpoint (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, vocab "
          f"{shape['vocab_size']}), cuts {CUTS}; {args.steps} steps of batch {args.batch} per client, packing "
          f"{'on' if args.packing else 'off'}, OMP_NUM_THREADS={args.threads}")
    for client, t in tensors.items():
        print(f"client: {client}: trainable per client {t['client_trainable'] / 1e6:.3f}M elements "
              f"({4 * t['client_trainable'] / 2**20:.2f} MiB fp32); trunk LoRA {t['trunk_lora'] / 1e6:.3f}M elements; "
              f"each extra client holds {t['bytes_per_extra_client'] / 2**20:.2f} MiB (16 B per trainable element: "
              "weight, gradient, 2 AdamW moments; 4 B per trunk-LoRA element: its trunk gradient on the server)")
    print(f"{'mode':<10} {'client':<6} {'clients':>7} {'allocator':<9} {'peak RSS MiB':>12} {'x 1 client':>10} "
          f"{'x over floor':>12} {'extra MiB':>9} {'expected':>8} {'seconds':>7}")
    for r in rows:
        cells = ("-", "-", "-", "-") if r["mode"] == "floor" else (
            f"{r['ratio_to_one_client']:.3f}", f"{r['over_floor_ratio']:.3f}",
            f"{r['extra_vs_one_client_bytes'] / 2**20:.1f}", f"{r['expected_extra_bytes'] / 2**20:.1f}")
        print(f"{r['mode']:<10} {r['client']:<6} {r['clients']:>7} {r['allocator']:<9} "
              f"{r['peak_rss_bytes'] / 2**20:>12.0f} {cells[0]:>10} {cells[1]:>12} {cells[2]:>9} {cells[3]:>8} "
              f"{r['seconds']:>7.0f}")
    print("floor: the same fit on the 0.7M quickstart model (framework only); x 1 client: peak / the base run's peak "
          "(same client mode and allocator); x over floor: (peak - floor) / (base - floor), same allocator; expected: "
          "the extra clients' state plus the float64 averaging vectors (an upper estimate); allocator mmap64k: "
          f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD} (glibc hands every freed block >= 64 KiB straight back, so RSS "
          "follows live memory)")
    strict_extra = {r["clients"]: r["extra_vs_one_client_bytes"] for r in rows
                    if r["allocator"] == "mmap64k" and r["mode"] == "gradients" and r["client"] == "lora"}
    for r in rows:
        if r["allocator"] == "glibc" and r["mode"] == "gradients" and r["clients"] in strict_extra:
            kept = r["extra_vs_one_client_bytes"] - strict_extra[r["clients"]]
            r["heap_retained_bytes"] = kept
            print(f"gradients, {r['clients']} clients: {r['extra_vs_one_client_bytes'] / 2**20:.0f} MiB over one "
                  f"client with glibc's defaults, {strict_extra[r['clients']] / 2**20:.0f} MiB when freed blocks go "
                  f"back at once: {kept / 2**20:.0f} MiB is freed memory that glibc's heap keeps, not live tensors")
    for r in rows:
        if r["meets_target"] is not None and r["client"] == "lora":
            print(f"target: 4 clients <= {TARGET}x one client ({r['mode']}, {r['allocator']}): "
                  f"{r['ratio_to_one_client']:.3f} -> {'met' if r['meets_target'] else 'MISSED'}")
    elapsed = time.perf_counter() - began
    print(f"benchmark took {elapsed:.0f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": machine(),
        "size": args.size, "shape": shape, "params": params, "checkpoint_bytes": checkpoint_bytes, "cuts": CUTS,
        "steps": args.steps, "batch": args.batch, "packing": args.packing, "max_length": 128, "threads": args.threads,
        "average_every_for_weights": AVERAGE_EVERY, "client_lora_r": 8, "per_client_tensors": tensors,
        "target": TARGET, "mmap_threshold_for_mmap64k": MMAP_THRESHOLD,
        "peak_rss_method": "os.wait4 ru_maxrss of each fit child process (kernel peak RSS, anon + file pages)",
        "elapsed_s": elapsed, "runs": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
