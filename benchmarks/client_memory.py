"""The client's peak memory and step time at a ~300M-parameter Qwen2 shape with Qwen2's 152k vocabulary: today's
plain client against the chunked loss, activation checkpointing and quantized base weights.

    python benchmarks/client_memory.py               # 7 configurations, 6 steps each (~15 min on 2 cores)
    python benchmarks/client_memory.py --steps 3     # a quicker look

The model is random, Qwen2-shaped (vocab 151936, hidden 1024, intermediate 2816, 12 layers, 16 heads, 4 KV heads,
tied embeddings: 290M parameters, float32), built and saved in a child process. It is cut at (1, 11): the client
holds the embedding (which is also the head), layer 0 and layer 11 and trains LoRA r8 on them; the trunk server
holds layers 1-10 and trains LoRA r16 on them, the same (float32, no checkpointing) in every configuration. Training
runs over tcp on loopback with ``python -m splittrain serve`` and ``python -m splittrain fit`` as separate child
processes (``estimate_check.run_split``), on batches of 2 x 512 packed quickstart tokens, without validation.

A configuration sets only the client: ``model.loss_chunk`` (0: whole logits, today's default before the chunked
loss; 512: the default now; the last configuration, outside the targets, shows 128), ``model.gradient_checkpointing``,
``model.quantization`` (the decoder layers' projections) and ``model.embedding_quantization`` (the tied embedding and
head: the 152k x 1024 matrix, 594 MiB in float32, is most of the client's weights). Peak RSS is the fit
process's (``ru_maxrss``), loading and the first step included. Step time: a callback of this file (``StepTimes``,
given to fit) times every training step (start of the batch to the end of the optimizer step) and the part of it
the client spent waiting for the trunk server's replies; the first step is a warm-up and the median of the others
is reported, and the client's own time is the step minus that wait. Configurations run one after another, so the
machine's drift between runs is in the time ratios (each run records the 1-minute load average before and after it).
``splittrain.estimate_memory``'s figure for the client is printed beside each measurement.

Targets: client peak RSS with int8 + chunked + checkpointing <= 0.35x plain (met with the embedding in int8 too;
the layers-only figure is printed beside it); step time of chunked + checkpointing <= 1.35x plain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback  # the fit child's callback; this process stays below any child's peak

from estimate_check import build, run_split  # this folder is on sys.path when a script here runs
from machine import write_result

HERE = Path(__file__).resolve().parent
SHAPE = dict(vocab_size=151936, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
             num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True)
CUTS = (1, 11)
ROWS, LENGTH = 2, 512
CONFIGS = {  # name -> (loss_chunk, gradient_checkpointing, quantization, embedding_quantization)
    "plain": (0, False, None, None),
    "chunked": (512, False, None, None),
    "chunked + checkpointing": (512, True, None, None),
    "int8 + chunked + checkpointing": (512, True, "int8", None),
    "int8 + int8 embedding + chunked + checkpointing": (512, True, "int8", "int8"),
    "nf4 + chunked + checkpointing": (512, True, "nf4", None),
    "int8 + chunks of 128 + checkpointing": (128, True, "int8", None),  # no target: what a smaller loss_chunk leaves
}
MEMORY_TARGET, TIME_TARGET = 0.35, 1.35
MEMORY_CONFIG = "int8 + int8 embedding + chunked + checkpointing"
"""The configuration the memory target is read from; ``int8 + chunked + checkpointing`` (layers only) is printed too."""


class StepTimes(Callback):
    """Each training step's wall time and the time the client waited in it for the trunk server, written as JSON
    to ``out`` when training ends."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.steps: list[dict[str, float]] = []
        self.began = self.waited = 0.0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        transport = pl_module.crossing.link.transport
        wait = transport._wait  # every reply of the tcp transport is awaited here

        def timed(request: Any) -> Any:
            began = time.perf_counter()
            try:
                return wait(request)
            finally:
                self.waited += time.perf_counter() - began

        transport._wait = timed

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.began, self.waited = time.perf_counter(), 0.0

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps.append({"seconds": time.perf_counter() - self.began, "waited": self.waited, "loss": float(loss)})

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        Path(self.out).write_text(json.dumps(self.steps))


def run(work: Path, name: str, model: Path, steps: int) -> dict[str, Any]:
    """One configuration: both parties' peak RSS and the client's timed steps."""
    load_before = os.getloadavg()[0]
    chunk, checkpointing, quantization, embedding = CONFIGS[name]
    common = ["--model.model", str(model), "--model.cuts", json.dumps(list(CUTS)), "--model.client", "lora",
              "--model.client_lora.r", "8", "--model.trunk.lora.r", "16", "--model.loss_chunk", str(chunk),
              "--model.gradient_checkpointing", str(checkpointing).lower(), "--model.quantization",
              quantization or "null"]
    client_only = ["--model.embedding_quantization", embedding] if embedding else []  # the server has no embedding
    times = work / "steps.json"
    callback = json.dumps([{"class_path": "client_memory.StepTimes", "init_args": {"out": str(times)}}])
    peaks = run_split(work, name.replace(" + ", "-"), common, [
        "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0", "--trainer.callbacks", callback,
        "--data.batch_size", str(ROWS), "--data.packing", "true", "--data.max_length", str(LENGTH),
        "--data.limit", "4000", *client_only], env={"PYTHONPATH": str(HERE)})
    timed = json.loads(times.read_text())[1:]  # the first step warms up
    return {"config": name, "loss_chunk": chunk, "gradient_checkpointing": checkpointing,
            "quantization": quantization, "embedding_quantization": embedding, "client_peak_bytes": peaks["client"],
            "server_peak_bytes": peaks["server"],
            "steps": timed, "step_s": statistics.median(s["seconds"] for s in timed),
            "client_own_s": statistics.median(s["seconds"] - s["waited"] for s in timed),
            "losses": [s["loss"] for s in timed], "load_1min_before": load_before,
            "load_1min_after": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="training steps per configuration (the first warms up)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "client_memory.json")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is a warm-up")

    runs = []
    with tempfile.TemporaryDirectory(prefix="splittrain-client-memory-") as tmp:
        work = Path(tmp)
        params = build(work / "model", SHAPE)
        print(f"{params / 1e6:.0f}M-parameter Qwen2 shape, cuts {CUTS}, {ROWS} x {LENGTH} tokens, fp32", flush=True)
        for name in CONFIGS:
            began = time.monotonic()
            runs.append(run(work, name, work / "model", args.steps))
            r = runs[-1]
            print(f"{name:<48} client peak {r['client_peak_bytes'] / 2**30:.2f} GiB, server "
                  f"{r['server_peak_bytes'] / 2**30:.2f} GiB, step {r['step_s']:.2f} s (client's own "
                  f"{r['client_own_s']:.2f} s), run {time.monotonic() - began:.0f} s, load "
                  f"{r['load_1min_before']:.1f} -> {r['load_1min_after']:.1f}", flush=True)
        # imported only now: every child above started from this process's small high-water mark
        from splittrain.estimate import estimate_memory

        for r in runs:
            r["client_estimate"] = estimate_memory(
                str(work / "model"), CUTS, ROWS, LENGTH, client="lora", client_lora_r=8, trunk_lora_r=16,
                loss_chunk=r["loss_chunk"], quantization=r["quantization"],
                gradient_checkpointing=r["gradient_checkpointing"],
                embedding_quantization=r["embedding_quantization"])["client"].as_dict()
    plain = runs[0]
    for r in runs:
        r["memory_ratio"] = r["client_peak_bytes"] / plain["client_peak_bytes"]
        r["time_ratio"] = r["step_s"] / plain["step_s"]
        r["own_time_ratio"] = r["client_own_s"] / plain["client_own_s"]
        r["estimate_over_measured"] = r["client_estimate"]["total"] / r["client_peak_bytes"]
    print(f"\n{'configuration':<48}{'client GiB':>11}{'x plain':>9}{'step s':>8}{'x plain':>9}{'own s':>7}"
          f"{'x plain':>9}{'estimate':>10}")
    for r in runs:
        print(f"{r['config']:<48}{r['client_peak_bytes'] / 2**30:>11.2f}{r['memory_ratio']:>9.3f}{r['step_s']:>8.2f}"
              f"{r['time_ratio']:>9.3f}{r['client_own_s']:>7.2f}{r['own_time_ratio']:>9.3f}"
              f"{r['estimate_over_measured']:>9.3f}x")
    by = {r["config"]: r for r in runs}
    memory = by[MEMORY_CONFIG]["memory_ratio"]
    step = by["chunked + checkpointing"]["time_ratio"]
    print(f"target: {MEMORY_CONFIG} peak <= {MEMORY_TARGET}x plain: {memory:.3f} "
          f"({'met' if memory <= MEMORY_TARGET else f'missed by {memory / MEMORY_TARGET - 1:.1%}'}; the layers alone "
          f"in int8: {by['int8 + chunked + checkpointing']['memory_ratio']:.3f})")
    print(f"target: chunked + checkpointing step <= {TIME_TARGET}x plain: {step:.3f} "
          f"({'met' if step <= TIME_TARGET else f'missed by {step / TIME_TARGET - 1:.1%}'})")
    write_result(args.out, {"shape": SHAPE, "params": params, "cuts": list(CUTS), "rows": ROWS, "length": LENGTH,
                            "transport": "tcp", "client_lora_r": 8, "trunk_lora_r": 16, "steps": args.steps,
                            "memory_target": MEMORY_TARGET, "memory_config": MEMORY_CONFIG, "time_target": TIME_TARGET,
                            "runs": runs})


if __name__ == "__main__":
    main()
