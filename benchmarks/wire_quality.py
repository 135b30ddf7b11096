"""What the wire dtype costs in training quality: the quickstart with a float32, bfloat16 and int8 wire.

    python benchmarks/wire_quality.py                   # 3 wires x (200 steps, the full 800-step run): ~15 min on 2 cores
    python benchmarks/wire_quality.py --eval-rows 20 --full-steps 40 --short-steps 20 --out /tmp/w.json   # smoke run

Every run is ``python -m splittrain fit --config configs/quickstart.yaml --model.wire_dtype W`` in a child process of
its own (the tiny random Qwen2, cuts (2, 4), ``client: full``: the bottom trains, so gradients cross the first cut
back down too; the trunk's LoRA r16, AdamW with the cosine schedule). Per wire:

- ``short``: 200 steps, validated once at the end (no generation): its validation loss is compared with the float32
  wire's (target: within 3%);
- ``full``: the config as is (800 steps, validation, the 200 held-out rows answered by generation): held-out exact
  match, ROUGE-L and BLEU and the validation loss, beside float32's and bfloat16's.

The int8 wire sends each token's vector as int8 with a float32 scale and carries the rounding error of gradients into
the next one (error feedback); bfloat16 is a cast. The fits import ``splittrain`` from this checkout (they run in
its root); the record names the commit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from machine import write_result  # this folder is on sys.path when a script here runs
from quantization_quality import CONFIG, METRICS, code_version, run_fit, warnings_in

HERE = Path(__file__).resolve().parent
WIRES = ("float32", "bfloat16", "int8")


def command(run_dir: Path, wire: str, steps: int | None, args) -> list[str]:
    cmd = [sys.executable, "-m", "splittrain", "fit", "--config", str(CONFIG), "--trainer.default_root_dir",
           str(run_dir), "--trainer.enable_progress_bar", "false", "--model.wire_dtype", wire]
    if steps is not None:
        cmd += ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps),
                "--trainer.callbacks", "[]"]
    if steps == args.short_steps:
        cmd += ["--model.eval_generate", "false", "--model.sample_prompt", "null"]
    if args.eval_rows:
        cmd += ["--model.eval_max_rows", str(args.eval_rows)]
    return cmd


def one_run(work: Path, wire: str, kind: str, args) -> dict:
    steps = args.short_steps if kind == "short" else args.full_steps
    run_dir = work / f"{kind}-{wire}"
    log = run_dir.with_suffix(".log")
    cmd = command(run_dir, wire, steps, args)
    print(f"== {kind} {wire}: {' '.join(cmd[2:])}", flush=True)
    status, seconds = run_fit(cmd, log, args.timeout, None)
    text = log.read_text(errors="replace")
    record = {"kind": kind, "wire": wire, "status": status, "wall_s": seconds, "warnings": warnings_in(text)}
    summary_file = run_dir / "summary.json"
    if status != 0 or not summary_file.is_file():
        record.update(ok=False, log_tail=text[-6000:])
        print(f"   FAILED ({status}):\n{text[-3000:]}", flush=True)
        return record
    summary = json.loads(summary_file.read_text())
    record.update(ok=True, steps=summary.get("steps"), wire_bytes=summary.get("wire_bytes"),
                  train_loss_last=summary.get("train_loss_last"))
    for key, source, _, _ in METRICS:
        value = summary.get(source)
        record[key] = value if isinstance(value, (int, float)) else None
    print("   " + "  ".join(f"{col} {fmt.format(record[key])}" for key, _, col, fmt in METRICS
                            if record.get(key) is not None), flush=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wires", nargs="+", default=list(WIRES), choices=WIRES)
    parser.add_argument("--short-steps", type=int, default=200)
    parser.add_argument("--full-steps", type=int, default=None, help="steps of the full run (default: the config's)")
    parser.add_argument("--eval-rows", type=int, default=None, help="held-out rows answered (default: all)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "wire_quality.json")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="wire-quality-") as tmp:
        for kind in ("short", "full"):
            for wire in args.wires:
                runs.append(one_run(Path(tmp), wire, kind, args))
    base = {r["kind"]: r for r in runs if r["wire"] == "float32" and r.get("ok")}
    for r in runs:
        ref = base.get(r["kind"])
        if r.get("ok") and ref is not None and r.get("val_loss") and ref.get("val_loss"):
            r["val_loss_vs_float32"] = r["val_loss"] / ref["val_loss"] - 1
            r["bytes_vs_float32"] = r["wire_bytes"] / ref["wire_bytes"]
    print(f"{'run':<6} {'wire':<9} {'val loss':>8} {'vs f32':>7} {'EM':>6} {'ROUGE-L':>7} {'bytes x f32':>11}")
    for r in runs:
        if r.get("ok"):
            em = f"{r['exact_match']:.3f}" if r.get("exact_match") is not None else "-"
            rouge = f"{r['rouge_l']:.3f}" if r.get("rouge_l") is not None else "-"
            print(f"{r['kind']:<6} {r['wire']:<9} {r['val_loss']:>8.4f} {r.get('val_loss_vs_float32', 0):>+7.2%} "
                  f"{em:>6} {rouge:>7} {r.get('bytes_vs_float32', 1):>11.3f}")
    write_result(args.out, {"short_steps": args.short_steps, "full_steps": args.full_steps, "code": code_version(),
                            "runs": runs})


if __name__ == "__main__":
    main()
