"""What quantizing the frozen base weights costs in answer quality: the quickstart fit with a float32, int8 and nf4 base.

    python benchmarks/quantization_quality.py                        # the 5 runs below, seed 0 (~15-20 min on 2 cores)
    python benchmarks/quantization_quality.py --seeds 0 1            # twice: the run-to-run noise beside the differences
    python benchmarks/quantization_quality.py --runs lora/nf4 --seeds 1 --merge   # add runs to the JSON already there
    python benchmarks/quantization_quality.py --max-steps 20 --eval-rows 20 --out /tmp/q.json   # smoke run

Every run is ``python -m splittrain fit --config configs/quickstart.yaml`` (the tiny random Qwen2, cuts (2, 4),
the trunk's LoRA r16, 800 steps of batch 16, AdamW with the cosine schedule, validation, then the 200 held-out rows
answered by generation) in a child process of its own with its own temporary run folder
(``--trainer.default_root_dir``); the runs differ only in:

- ``full/float32``: the config as is (``client: full``: the client trains bottom and top in full, float32 base);
- ``lora/float32``: ``--model.client lora`` (the client trains LoRA on its frozen float32 base): the reference of
  the quantized runs, which need a LoRA (or frozen) client;
- ``lora/int8``: ``--model.client lora --model.quantization int8 --model.trunk.quantization int8``;
- ``lora/nf4``: ``--model.client lora --model.quantization nf4 --model.trunk.quantization nf4``;
- ``lora/int8 + int8 embedding``: ``lora/int8`` and ``--model.embedding_quantization int8`` (the client's tied
  embedding and head as int8 rows too).

Quantization (bitsandbytes) covers the decoder layers' projections of both parties; embedding, norms and head stay
float32 unless the last run's option quantizes the client's embedding and head. Seed ``s`` is ``--seed_everything s --model.seed s --data.seed s`` (Lightning's seed, the LoRA
initialisation, the training order); seed 0 is the config's own. The base model (built once with a fixed seed) and
the validation and held-out rows are the same for every seed.

From each run: held-out exact match, ROUGE-L and BLEU (``summary.json``'s ``test_*``, as in ``eval.json``), the
validation loss, perplexity and token accuracy after training (``val_*``), the test rows' perplexity and token
accuracy, the wall time of the child process and the fit's own seconds, and the distinct warning lines the run
printed. The table shows each quantized run's difference from ``lora/float32`` of the same seed. A child that runs
past ``--timeout`` (or running when this script is interrupted or TERM-killed) is killed by its pid (its process
group, which it leads); a run that fails is recorded with its log's tail and the script goes on with the others.

The fits import ``splittrain`` from this script's checkout (they run in its root); each record names the commit and
any modified files there. In a working tree others edit, run a copy pinned at a commit:
``git worktree add /tmp/pinned HEAD && python /tmp/pinned/benchmarks/quantization_quality.py --out
benchmarks/results/quantization_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # this folder is on sys.path when a script here runs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = ROOT / "configs" / "quickstart.yaml"
RUNS = {  # name -> the fit's extra arguments
    "full/float32": [],
    "lora/float32": ["--model.client", "lora"],
    "lora/int8": ["--model.client", "lora", "--model.quantization", "int8", "--model.trunk.quantization", "int8"],
    "lora/nf4": ["--model.client", "lora", "--model.quantization", "nf4", "--model.trunk.quantization", "nf4"],
    "lora/int8 + int8 embedding": ["--model.client", "lora", "--model.quantization", "int8",
                                   "--model.trunk.quantization", "int8", "--model.embedding_quantization", "int8"],
}
REFERENCE = "lora/float32"  # the float32 base with the quantized runs' client mode
METRICS = [  # (key in the record, key in summary.json, column, format)
    ("exact_match", "test_exact_match", "EM", "{:.3f}"),
    ("rouge_l", "test_rouge_l", "ROUGE-L", "{:.3f}"),
    ("bleu", "test_bleu", "BLEU", "{:.3f}"),
    ("val_loss", "val_loss", "val loss", "{:.4f}"),
    ("val_perplexity", "val_perplexity", "val ppl", "{:.3f}"),
    ("val_token_accuracy", "val_token_accuracy", "val acc", "{:.4f}"),
    ("test_perplexity", "test_perplexity", "test ppl", "{:.3f}"),
    ("test_token_accuracy", "test_token_accuracy", "test acc", "{:.4f}"),
]
WARNING = re.compile(r"warn|deprecat|fail|error", re.IGNORECASE)


def fit_command(run_dir: Path, name: str, seed: int, args) -> list[str]:
    cmd = [sys.executable, "-m", "splittrain", "fit", "--config", str(CONFIG),
           "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
           "--seed_everything", str(seed), "--model.seed", str(seed), "--data.seed", str(seed), *RUNS[name]]
    if args.max_steps:  # a smoke run: fewer steps (validated at the end), fewer held-out rows
        cmd += ["--trainer.max_steps", str(args.max_steps), "--trainer.val_check_interval", str(args.max_steps),
                "--trainer.callbacks", "[]"]
    if args.eval_rows:
        cmd += ["--model.eval_max_rows", str(args.eval_rows)]
    return cmd


def run_fit(cmd: list[str], log: Path, timeout: float, env: dict[str, str]) -> tuple[int | str, float]:
    """Run ``cmd`` as a child (output to ``log``); its exit status (or ``"timeout"``) and wall seconds. Past
    ``timeout`` the child is killed by its pid: the process group it leads (``start_new_session``), SIGTERM then
    SIGKILL."""
    began = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        try:
            status: int | str = proc.wait(timeout=timeout)
        except BaseException:  # the timeout, or Ctrl-C here: the child must not outlive this script
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            if sys.exc_info()[0] is not subprocess.TimeoutExpired:
                raise
            status = "timeout"
    return status, time.perf_counter() - began


def warnings_in(text: str) -> list[str]:
    """The distinct lines of a log that warn or report a failure (in order of first appearance, digits folded so repeats collapse)."""
    seen, lines = set(), []
    for line in text.splitlines():
        line = line.strip()
        if WARNING.search(line):
            key = re.sub(r"\d+", "#", line)
            if key not in seen:
                seen.add(key)
                lines.append(line[:400])
    return lines


def code_version() -> dict:
    """The commit the fits ran (``splittrain`` is imported from this checkout) and what in it differs from that commit:
    in a shared working tree another edit may land mid-run, so run from a worktree pinned at a commit."""
    git = lambda *a: subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()
    return {"root": str(ROOT), "commit": git("rev-parse", "HEAD"),
            "modified": git("status", "--porcelain", "--", "splittrain", "configs").splitlines()}


def one_run(work: Path, name: str, seed: int, args, env: dict[str, str]) -> dict:
    run_dir = work / f"{name.replace('/', '-')}-seed{seed}"
    log = run_dir.with_suffix(".log")
    cmd = fit_command(run_dir, name, seed, args)
    print(f"== {name} seed {seed}: {' '.join(cmd[1:])}", flush=True)
    load_before = os.getloadavg()[0]
    status, seconds = run_fit(cmd, log, args.timeout, env)
    text = log.read_text(errors="replace")
    record: dict = {"run": name, "seed": seed, "args": RUNS[name], "wall_s": seconds, "status": status,
                    "load_1min_before": load_before, "load_1min_after": os.getloadavg()[0],
                    "warnings": warnings_in(text)}
    summary_file = run_dir / "summary.json"
    if status != 0 or not summary_file.is_file():
        record["ok"] = False
        record["log_tail"] = text[-6000:]
        print(f"   FAILED ({status}) after {seconds:.0f} s; the log's tail:\n{text[-3000:]}", flush=True)
        return record
    summary = json.loads(summary_file.read_text())
    record["ok"] = True
    for key, source, _, _ in METRICS:
        value = summary.get(source)
        record[key] = value if isinstance(value, (int, float)) else None
    record.update(fit_s=summary.get("seconds"), steps=summary.get("steps"),
                  train_loss_first=summary.get("train_loss_first"), train_loss_last=summary.get("train_loss_last"))
    evaluation = run_dir / "eval.json"
    if evaluation.is_file():
        metrics = json.loads(evaluation.read_text())["metrics"]
        record["eval_rows"] = metrics.get("rows")
        record["eval_json_matches_summary"] = all(
            abs(metrics[k] - record[k]) < 1e-6 for k in ("exact_match", "rouge_l", "bleu")
            if isinstance(metrics.get(k), float) and record.get(k) is not None)
    print(f"   {fmt_row(record)}  wall {seconds:.0f} s, fit {record['fit_s'] or 0:.0f} s, "
          f"{len(record['warnings'])} distinct warning lines", flush=True)
    if args.keep:
        record["run_dir"] = str(run_dir)
    return record


def fmt_row(r: dict) -> str:
    return "  ".join(f"{col} " + (fmt.format(r[key]) if r.get(key) is not None else "-") for key, _, col, fmt in METRICS)


def differences(runs: list[dict]) -> None:
    """Each quantized run's ``diff_vs_reference``: its metrics minus those of ``REFERENCE`` with the same seed."""
    reference = {r["seed"]: r for r in runs if r["run"] == REFERENCE and r.get("ok")}
    for r in runs:
        base = reference.get(r["seed"])
        if r["run"] == REFERENCE or not r["run"].startswith("lora/") or not r.get("ok") or base is None:
            r.pop("diff_vs_reference", None)
            continue
        r["diff_vs_reference"] = {key: r[key] - base[key] for key, *_ in METRICS
                                  if r.get(key) is not None and base.get(key) is not None}
        r["diff_vs_reference"]["wall_s_ratio"] = r["wall_s"] / base["wall_s"]


def summarize(runs: list[dict]) -> dict:
    """Per run name over its seeds: the mean (and the spread, max - min, with two seeds or more) of each metric and
    of the difference from the reference."""
    out = {}
    for name in RUNS:
        done = [r for r in runs if r["run"] == name and r.get("ok")]
        if not done:
            continue
        entry = {"seeds": [r["seed"] for r in done]}
        for key, *_ in METRICS + [("wall_s",)]:
            values = [r[key] for r in done if r.get(key) is not None]
            if values:
                entry[key] = {"mean": statistics.fmean(values), "spread": max(values) - min(values)}
        diffs = [r["diff_vs_reference"] for r in done if "diff_vs_reference" in r]
        if diffs:
            entry["diff_vs_reference_mean"] = {k: statistics.fmean(d[k] for d in diffs) for k in diffs[0]}
        out[name] = entry
    return out


def print_table(runs: list[dict]) -> None:
    cols = [col for _, _, col, _ in METRICS]
    print(f"\n{'run':<14}{'seed':>5}" + "".join(f"{c:>10}" for c in cols) + f"{'wall s':>8}{'fit s':>7}")
    for r in sorted(runs, key=lambda r: (r["seed"], list(RUNS).index(r["run"]))):
        if not r.get("ok"):
            print(f"{r['run']:<14}{r['seed']:>5}  FAILED ({r['status']}) after {r['wall_s']:.0f} s")
            continue
        cells = "".join(f"{fmt.format(r[key]) if r.get(key) is not None else '-':>10}" for key, _, _, fmt in METRICS)
        print(f"{r['run']:<14}{r['seed']:>5}{cells}{r['wall_s']:>8.0f}{r['fit_s'] or 0:>7.0f}")
        if "diff_vs_reference" in r:
            d = r["diff_vs_reference"]
            cells = "".join(f"{('{:+' + fmt[2:]).format(d[key]) if key in d else '-':>10}" for key, _, _, fmt in METRICS)
            print(f"{'  - ' + REFERENCE:<19}{cells}{d['wall_s_ratio']:>7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which runs (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds; each run once per seed")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one fit may take before it is killed")
    parser.add_argument("--threads", type=int, default=0,
                        help="OMP_NUM_THREADS of every fit (default 0: left as the environment has it)")
    parser.add_argument("--max-steps", type=int, default=0, help="smoke run: this many steps instead of the config's")
    parser.add_argument("--eval-rows", type=int, default=0, help="smoke run: answer only this many held-out rows")
    parser.add_argument("--merge", action="store_true",
                        help="keep the runs of --out not rerun here (same steps and held-out rows)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders and logs (printed at the end)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "quantization_quality.json")
    args = parser.parse_args()

    # a TERM (a kill of this script) unwinds like Ctrl-C, so the running fit is killed too (see run_fit)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    code = code_version()
    if code["modified"]:
        print(f"warning: {ROOT} differs from {code['commit'][:10]} in {code['modified']}", flush=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    settings = {"config": str(CONFIG.relative_to(ROOT)), "steps": args.max_steps or "config (800)",
                "eval_rows": args.eval_rows or "all (200)", "threads": args.threads or env.get("OMP_NUM_THREADS"),
                "timeout_s": args.timeout, "reference": REFERENCE, "runs": RUNS,
                "seed_means": "--seed_everything s --model.seed s --data.seed s"}
    previous: list[dict] = []
    if args.merge and args.out.is_file():
        old = json.loads(args.out.read_text())
        same = all(old["settings"].get(k) == settings[k] for k in ("steps", "eval_rows"))
        if not same:
            sys.exit(f"{args.out} has other settings (steps {old['settings'].get('steps')}, held-out rows "
                     f"{old['settings'].get('eval_rows')}): not merged")
        previous = [r for r in old["runs"] if not (r["run"] in args.runs and r["seed"] in args.seeds)]

    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="splittrain-quantq-"))
    runs: list[dict] = []
    try:
        for seed in args.seeds:
            for name in args.runs:
                runs.append(one_run(work, name, seed, args, env))
    finally:
        if args.keep:
            print(f"run folders and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - began
    for r in runs:
        r["code"] = code

    runs = previous + runs
    runs.sort(key=lambda r: (r["seed"], list(RUNS).index(r["run"])))
    differences(runs)
    print_table(runs)
    for r in runs:
        if r.get("warnings"):
            print(f"\n{r['run']} seed {r['seed']}: warnings printed")
            for line in r["warnings"][:12]:
                print(f"  {line}")
    print(f"\nbenchmark took {elapsed:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "settings": settings, "elapsed_s": elapsed,
                                    "summary": summarize(runs), "runs": runs}, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not all(r.get("ok") for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
