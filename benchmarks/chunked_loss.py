"""Peak memory and time of one training step of the top with whole logits vs the chunked loss (``model.loss_chunk``).

    python benchmarks/chunked_loss.py                  # vocab 151936, hidden 256, 2 x 512 tokens; writes JSON
    python benchmarks/chunked_loss.py --quick          # vocab 32000, 2 x 256 tokens, for a quick look

The top is a Qwen2 shape's last decoder layer, final norm and untied head (fp32) at a vocabulary large enough that
the head dominates. One step is what the client does with the top: forward with labels, the training metrics'
update (as ``ClientModule`` feeds them: whole logits, or the chunks' token stats), backward to the top's input and
the head's gradient when it trains (``client: full``) or to the input only (a frozen head, ``client: lora``).

Memory: every configuration runs in a fresh interpreter. After a warm-up step (lazy imports, BLAS workspaces) and
with the gradients freed, the peak-RSS mark is reset and one step's peak RSS over the RSS before it is reported
(glibc maps tensors this large on their own and unmaps them when freed, so RSS follows the tensors); the bytes
autograd saves for backward (not the weights) are counted with ``saved_tensors_hooks``.

Time: one process takes the configurations in turns, step by step, so that the machine's drift falls on all of them
alike; the median and the fastest of each configuration's steps are reported, as ratios to whole logits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import write_result  # this folder is on sys.path when a script here runs

HERE = Path(__file__).resolve().parent
SHAPES = {
    "default": dict(vocab_size=151936, hidden_size=256, intermediate_size=704, rows=2, length=512),
    "quick": dict(vocab_size=32000, hidden_size=256, intermediate_size=704, rows=2, length=256),
}
MiB = 2**20


class Top:
    """The top segment, its input and labels, and one training step of it."""

    def __init__(self, shape: dict) -> None:
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM

        import splittrain
        from splittrain.metrics import TokenMetrics

        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                             intermediate_size=shape["intermediate_size"], num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, tie_word_embeddings=False)
        self.top = splittrain.split_model(Qwen2ForCausalLM(config), cuts=(1,), parts=("top",))["top"].train()
        self.top.requires_grad_(False)
        self.hidden = torch.randn(shape["rows"], shape["length"], shape["hidden_size"])
        self.labels = torch.randint(0, shape["vocab_size"], (shape["rows"], shape["length"]))
        self.metrics = TokenMetrics(shape["vocab_size"], sync=False)

    def use(self, chunk: int, head: str) -> None:
        self.top.loss_chunk = chunk
        self.top.head_weight()[0].requires_grad_(head == "trains")

    def step(self) -> float:
        x = self.hidden.clone().requires_grad_(True)
        out = self.top(x, labels=self.labels)
        self.metrics.update_output(out, self.labels)
        out.loss.backward()
        return float(out.loss)

    def settle(self) -> None:
        import ctypes
        import gc

        self.top.zero_grad(set_to_none=True)
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory(shape: dict, chunk: int, head: str) -> dict:
    import torch

    from splittrain.loading import peak_rss_bytes, reset_peak_rss, rss_bytes

    top = Top(shape)
    top.use(chunk, head)
    top.step()  # warm-up
    top.settle()
    saved: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in top.top.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        top.step()
    top.settle()
    before = rss_bytes()
    reset_peak_rss()
    loss = top.step()
    peak = peak_rss_bytes() - before
    return {"chunk": chunk, "head": head, "loss": loss, "peak_mib": peak / MiB, "saved_mib": sum(saved.values()) / MiB}


def timing(shape: dict, configs: list[tuple[int, str]], rounds: int) -> dict[str, list[float]]:
    top = Top(shape)
    times: dict[str, list[float]] = {f"{c},{h}": [] for c, h in configs}
    for round_ in range(rounds + 1):  # round 0 warms up
        for chunk, head in configs:
            top.use(chunk, head)
            began = time.perf_counter()
            top.step()
            if round_:
                times[f"{chunk},{head}"].append(time.perf_counter() - began)
            top.settle()
    return times


def worker(args: list[str]) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["memory", "timing"])
    parser.add_argument("shape")
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--rounds", type=int, default=7)
    opts = parser.parse_args(args)
    shape = SHAPES[opts.shape]
    configs = [(int(c.split(",")[0]), c.split(",")[1]) for c in opts.configs]
    if opts.kind == "memory":
        return memory(shape, *configs[0])
    return timing(shape, configs, opts.rounds)


def run_worker(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(worker(sys.argv[2:])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller vocabulary and batch")
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 128, 256, 512])
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per configuration")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "chunked_loss.json")
    args = parser.parse_args()
    name = "quick" if args.quick else "default"
    shape = SHAPES[name]
    tokens = shape["rows"] * shape["length"]
    whole = tokens * shape["vocab_size"] * 4
    print(f"Qwen2 top (1 layer + norm + head), vocab {shape['vocab_size']}, hidden {shape['hidden_size']}, "
          f"{shape['rows']} x {shape['length']} tokens, fp32: one float32 tokens x vocab tensor is {whole / MiB:.0f} MiB",
          flush=True)
    configs = [f"{chunk},{head}" for head in ("frozen", "trains") for chunk in args.chunks]
    runs = [run_worker("memory", name, config) for config in configs]
    times = run_worker("timing", name, *configs, "--rounds", str(args.rounds))
    plain = {r["head"]: r for r in runs if r["chunk"] == 0}
    for r in runs:
        r["times"] = times[f"{r['chunk']},{r['head']}"]
        r["step_s"], r["fastest_s"] = statistics.median(r["times"]), min(r["times"])
    print(f"{'head':<7}{'loss_chunk':>11}{'peak MiB':>10}{'x whole':>9}{'saved MiB':>11}{'s/step':>8}{'x whole':>9}"
          f"{'fastest':>9}{'x whole':>9}{'loss diff':>11}")
    for r in runs:
        base = plain[r["head"]]
        r["peak_ratio"] = r["peak_mib"] / base["peak_mib"]
        r["time_ratio"] = r["step_s"] / base["step_s"]
        r["fastest_ratio"] = r["fastest_s"] / base["fastest_s"]
        r["loss_diff"] = abs(r["loss"] - base["loss"])
        print(f"{r['head']:<7}{r['chunk']:>11}{r['peak_mib']:>10.0f}{r['peak_ratio']:>9.3f}{r['saved_mib']:>11.0f}"
              f"{r['step_s']:>8.2f}{r['time_ratio']:>9.3f}{r['fastest_s']:>9.2f}{r['fastest_ratio']:>9.3f}"
              f"{r['loss_diff']:>11.1e}")
    write_result(args.out, {"shape": shape, "whole_logits_mib": whole / MiB, "rounds": args.rounds, "runs": runs})


if __name__ == "__main__":
    main()
