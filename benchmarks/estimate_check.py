"""How close ``splittrain estimate`` comes to the measured peak memory of each party, for every combination of
quantization (none, int8, nf4), chunked loss (on, off) and activation checkpointing (on, off).

    python benchmarks/estimate_check.py        # the whole grid on the ~123M shape, 3 combinations on ~347M (~20 min)
    python benchmarks/estimate_check.py --sizes medium --combos none/0/off int8/128/on

For each shape, a random Qwen2-shaped model is built and saved with ``save_pretrained`` into a temporary folder,
then trained split over tcp on loopback: ``python -m splittrain serve`` (the trunk, LoRA r16) and ``python -m
splittrain fit`` (bottom + top, ``client: lora`` r8) are separate child processes, 8 steps of batch 4 x 128 packed
quickstart tokens, one validation batch (the peaks grow over the first steps as the heap fragments: after 2 steps
they were about 3% lower, after 16 or 60 steps no higher than after 8). A combination ``QUANT/CHUNK/CKPT`` sets the
quantization and the activation checkpointing of both parties (``model.quantization`` and
``model.trunk.quantization``, ``model.gradient_checkpointing`` and ``model.trunk.gradient_checkpointing``) and the
client's ``model.loss_chunk`` (0: whole logits; 128: four chunks of the batch's 512 positions). Each child's peak
RSS is the kernel's (``os.wait4``'s ``ru_maxrss``: anon plus touched file-backed pages of the memory-mapped
weights; the script builds the model in a child too, since a child's figure starts from the spawning process's own
peak). The estimate is ``splittrain.estimate_memory(model, cuts, 4, 128, client="lora", client_lora_r=8,
trunk_lora_r=16, ...)`` with the combination's settings, on CPU.

Target: every party within 10% of its measured peak.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from machine import machine  # this folder is on sys.path when a script here runs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = ROOT / "configs" / "quickstart.yaml"
SHAPES = {  # Qwen2, fp32, tied embeddings (the head touches the whole matrix, as on a GPU)
    "medium": (dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                    num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=True), (2, 6)),
    "large": (dict(vocab_size=32000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=12,
                   num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=True), (3, 9)),
}
BATCH, LENGTH, CHUNK, STEPS, TARGET = 4, 128, 128, 8, 0.10
GRID = [f"{q}/{c}/{g}" for q in ("none", "int8", "nf4") for c in (0, CHUNK) for g in ("off", "on")]
COMBOS = {"medium": GRID, "large": ["none/0/off", f"int8/{CHUNK}/on", f"nf4/{CHUNK}/on"]}
"""The combinations each shape runs by default: the whole grid on the medium shape, three on the large one."""


@dataclass(frozen=True)
class Combo:
    """One setting of both parties: quantization (None: the weight dtype), the client's loss_chunk (0: whole
    logits) and activation checkpointing."""

    quantization: str | None
    loss_chunk: int
    checkpointing: bool

    @classmethod
    def parse(cls, text: str) -> "Combo":
        quantization, chunk, checkpointing = text.split("/")
        return cls(None if quantization == "none" else quantization, int(chunk), checkpointing == "on")

    @property
    def name(self) -> str:
        return f"{self.quantization or 'none'}/{self.loss_chunk}/{'on' if self.checkpointing else 'off'}"

    def options(self) -> list[str]:
        quantization = self.quantization or "null"
        checkpointing = str(self.checkpointing).lower()
        return ["--model.quantization", quantization, "--model.trunk.quantization", quantization,
                "--model.gradient_checkpointing", checkpointing, "--model.trunk.gradient_checkpointing",
                checkpointing, "--model.loss_chunk", str(self.loss_chunk)]


BUILD = """
import json, sys, torch
from transformers import AutoModelForCausalLM, Qwen2Config
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(Qwen2Config(**json.loads(sys.argv[2])), dtype=torch.float32)
model.save_pretrained(sys.argv[1], max_shard_size="200MB")
print(sum(p.numel() for p in model.parameters()))
"""


def build(folder: Path, shape: dict) -> int:
    """Build and save the model in a child process: a child's ``ru_maxrss`` starts from this process's peak (the
    kernel carries the spawning process's high-water mark across vfork + exec), so this process stays small."""
    done = subprocess.run([sys.executable, "-c", BUILD, str(folder), json.dumps(shape)], capture_output=True,
                          text=True, check=True)
    return int(done.stdout.split()[-1])


def reap(proc: subprocess.Popen, timeout: float) -> int:
    """Wait for ``proc`` (at most ``timeout`` s, then kill it by pid); its peak RSS in bytes."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_maxrss * 1024
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.2)


def run_split(work: Path, name: str, common: list[str], fit_args: list[str], env: dict[str, str] | None = None,
              ) -> dict[str, int]:
    """Serve the trunk and fit the client of the quickstart config as two child processes over tcp on loopback
    (``common``: options of both, ``fit_args``: the client's); each party's peak RSS in bytes."""
    token = secrets.token_hex(32)
    (work / "tokens.json").write_text(json.dumps({"client0": token}))
    (work / "client0.token").write_text(token + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    log = (work / f"{name}-serve.log").open("w")
    serve = subprocess.Popen([sys.executable, "-m", "splittrain", "serve", "--config", str(CONFIG), "--address",
                              "127.0.0.1:0", "--tokens", str(work / "tokens.json"), "--run_dir", str(work / "server"),
                              "--save_every", "0", *common], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        address = None
        deadline = time.monotonic() + 300
        while address is None and time.monotonic() < deadline:
            line = serve.stdout.readline()
            if not line and serve.poll() is not None:
                raise RuntimeError(f"serve exited: see {log.name}")
            match = re.search(r"listening on (\S+)", line)
            address = match.group(1) if match else None
        if address is None:
            raise RuntimeError("serve did not start within 300 s")
        with (work / f"{name}-fit.log").open("w") as out:
            fit = subprocess.Popen(
                [sys.executable, "-m", "splittrain", "fit", "--config", str(CONFIG), *common,
                 "--model.transport", "tcp", "--model.address", address, "--model.token_file",
                 str(work / "client0.token"), "--model.eval_generate", "false", "--model.sample_prompt", "null",
                 "--trainer.default_root_dir", str(work / "client"), "--trainer.num_sanity_val_steps", "0",
                 "--trainer.enable_progress_bar", "false", *fit_args], stdout=out, stderr=subprocess.STDOUT, env=env)
            client = reap(fit, 1800)
        if fit.returncode != 0:
            raise RuntimeError(f"fit exited with {fit.returncode}: see {out.name}")
        serve.send_signal(signal.SIGTERM)
        server = reap(serve, 120)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait(timeout=30)
        log.close()
    return {"client": client, "server": server}


def measure(work: Path, name: str, model: Path, cuts: tuple[int, int], combo: Combo) -> dict[str, int]:
    """Each party's peak RSS over one short split training run of ``combo``."""
    common = ["--model.model", str(model), "--model.cuts", json.dumps(list(cuts)), "--model.client", "lora",
              "--model.client_lora.r", "8", "--model.trunk.lora.r", "16", *combo.options()]
    return run_split(work, name, common, [
        "--trainer.max_steps", str(STEPS), "--trainer.val_check_interval", str(STEPS),
        "--trainer.limit_val_batches", "1",
        "--trainer.callbacks", "[]", "--data.batch_size", str(BATCH), "--data.packing", "true",
        "--data.max_length", str(LENGTH), "--data.limit", "400"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SHAPES), default=["medium", "large"])
    parser.add_argument("--combos", nargs="+", default=None,
                        help="QUANT/CHUNK/CKPT, e.g. int8/128/on (default: each shape's COMBOS)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "estimate_check.json")
    args = parser.parse_args()

    measured = []
    for size in args.sizes:
        shape, cuts = SHAPES[size]
        with tempfile.TemporaryDirectory(prefix="splittrain-estimate-") as tmp:
            work = Path(tmp)
            params = build(work / "model", shape)
            for combo in [Combo.parse(c) for c in args.combos or COMBOS[size]]:
                began = time.monotonic()
                peaks = measure(work, size, work / "model", cuts, combo)
                measured.append((size, params, combo, peaks, time.monotonic() - began))
                print(f"{size:<7} {combo.name:<12} client {peaks['client'] / 2**30:6.3f} GiB, server "
                      f"{peaks['server'] / 2**30:6.3f} GiB ({measured[-1][-1]:.0f} s)", flush=True)
    # imported only now: every child above started from this process's small high-water mark
    from transformers import Qwen2Config

    from splittrain.estimate import GiB, estimate_memory

    rows = []
    for size, params, combo, peaks, seconds in measured:
        shape, cuts = SHAPES[size]
        with tempfile.TemporaryDirectory(prefix="splittrain-estimate-") as tmp:
            Qwen2Config(**shape, dtype="float32").to_json_file(Path(tmp) / "config.json")
            estimate = estimate_memory(tmp, cuts, BATCH, LENGTH, client="lora", client_lora_r=8, trunk_lora_r=16,
                                       device="cpu", loss_chunk=combo.loss_chunk, quantization=combo.quantization,
                                       trunk_quantization=combo.quantization,
                                       gradient_checkpointing=combo.checkpointing,
                                       trunk_gradient_checkpointing=combo.checkpointing)
        for party in ("client", "server"):
            est = estimate[party].as_dict()
            ratio = est["total"] / peaks[party]
            rows.append({"size": size, "params": params, "cuts": list(cuts), "combo": combo.name,
                         "quantization": combo.quantization, "loss_chunk": combo.loss_chunk,
                         "checkpointing": combo.checkpointing, "party": party, "measured_bytes": peaks[party],
                         "estimate": est, "estimate_over_measured": ratio, "within_target": abs(ratio - 1) <= TARGET,
                         "run_seconds": seconds})
            print(f"{size:<7} {params / 1e6:6.1f}M {combo.name:<12} {party:<7} measured {peaks[party] / GiB:6.3f} GiB"
                  f"  estimate {est['total'] / GiB:6.3f} GiB (weights {est['weights'] / GiB:.3f}, activations "
                  f"{est['activations'] / GiB:.3f}, workspace {est['workspace'] / GiB:.3f}, runtime "
                  f"{est['runtime'] / GiB:.3f})  ratio {ratio:.3f}")
    print(f"\n{'size':<7} {'combination':<13}{'client':>8}{'server':>8}   (estimate / measured)")
    for size, combo in dict.fromkeys((r["size"], r["combo"]) for r in rows):
        ratios = {r["party"]: r["estimate_over_measured"] for r in rows if (r["size"], r["combo"]) == (size, combo)}
        print(f"{size:<7} {combo:<13}{ratios['client']:>8.3f}{ratios['server']:>8.3f}")
    worst = max(rows, key=lambda r: abs(r["estimate_over_measured"] - 1))
    met = all(r["within_target"] for r in rows)
    print(f"target: every party within {TARGET:.0%} of its measured peak: {'met' if met else 'MISSED'} (worst "
          f"{worst['size']} {worst['combo']} {worst['party']}: {worst['estimate_over_measured']:.3f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "batch": BATCH, "length": LENGTH, "steps": STEPS,
                                    "target": TARGET,
                                    "shapes": {s: {"config": SHAPES[s][0], "cuts": SHAPES[s][1]} for s in args.sizes},
                                    "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
