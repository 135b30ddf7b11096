"""Non-IID federated training: 3 clients that each hold 2 of the quickstart's 6 tasks, together vs alone.

    python benchmarks/federated_noniid.py                     # 240 steps: federated (gradients, weights) + 3 alone
    python benchmarks/federated_noniid.py --quick             # smoke run: 20 steps, gradients only
    python benchmarks/federated_noniid.py --no-weights --centralized     # FedSGD, the alone runs and pooled data

The quickstart rows (tasks add, colour, count, reverse, subtract, upper) are split with ``--data.partition column
--data.partition_column task`` among 3 clients: the k-th task in sorted order goes to client k % 3, so client 0
holds add + reverse, client 1 colour + subtract, client 2 count + upper. Every run is ``python -m splittrain fit
--config configs/quickstart.yaml`` (the tiny random Qwen2, ``client: full``, the quickstart's AdamW settings and
cosine schedule over ``--steps``, batch 16 per client, ``seed_everything`` 0, model seed 0) in a child process;
the runs are:

- ``federated/gradients``: ``model.federated.clients 3``, ``average: gradients`` (FedSGD: client-side gradients
  averaged every step, the trunk steps on the averaged trunk gradients);
- ``federated/weights``: the same with ``average: weights`` (FedAvg) every ``--average-every`` steps
  (``--no-weights`` skips it);
- ``alone/client<c>``: one client (``clients: 1``) trained only on client c's shard for the same number of steps:
  the shard is computed with ``splittrain.federated.partition`` on the loaded quickstart rows exactly as
  ``InstructionDataModule.shard`` does (same method, column and seed), written to a jsonl and passed as
  ``--data.train``; ``--data.seed c`` gives it the batch order client c has inside the federation (its loader is
  seeded with seed + c), so it sees the very batches it trains on there: the first training loss of each alone
  run equals its client's first loss in the federated run (checked and reported);
- ``centralized`` (``--centralized``): one client on all training rows with batch 48 (the rows a federated step
  sees), the pooled-data reference.

Every run is validated on the whole quickstart validation set (all 6 tasks, 200 rows): the table reports that
global validation loss and token accuracy (``summary.json``: ``val_loss``, ``val_token_accuracy``) and the exact
match of the answers generated for those rows (``test_exact_match``; the quickstart config evaluates by generation
after ``fit``). The target: federated training beats the best client alone. Token accuracy is a mean over the
scored answer tokens, so a task weighs by its tokens: the script prints each task's share (the share of the scored
tokens in a client's own two tasks is roughly the most that a client which learns only its own tasks can score).
240 steps keep the whole script near 10 minutes on 2 cores (a federated step costs ~3 client steps); ``--steps
800`` is the quickstart's length. ``OMP_NUM_THREADS`` is 1 in every run (``--threads``): on a shared 2-core machine
two threads per process can be many times slower than one.
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
CLIENTS = 3
COLUMN = "task"


def shards(seed: int) -> tuple[list[list[int]], object]:
    """The rows of each client's shard, as ``InstructionDataModule.shard`` draws them (``partition`` on the loaded
    training rows, method ``column``, this column and seed), and the loaded rows."""
    from datasets import load_dataset

    from splittrain.federated.partition import partition
    from splittrain.quickstart import TRAIN_FILE

    rows = load_dataset("json", data_files=str(TRAIN_FILE), split="train")  # as InstructionDataModule._load does
    return partition(rows, CLIENTS, "column", column=COLUMN, seed=seed), rows


def val_token_shares() -> dict[str, dict[str, int]]:
    """Rows and trained (scored) label tokens of each task in the quickstart validation set: token accuracy is a
    mean over these tokens, so a task weighs by its tokens, not its rows."""
    from transformers import AutoTokenizer

    from splittrain.data import IGNORE_INDEX, tokenize_conversation, to_messages
    from splittrain.quickstart import TOKENIZER_DIR, VAL_FILE

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    shares: dict[str, dict[str, int]] = {}
    for line in VAL_FILE.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        labels = tokenize_conversation(tokenizer, to_messages(row), max_length=128)["labels"]
        task = shares.setdefault(row[COLUMN], {"rows": 0, "tokens": 0})
        task["rows"] += 1
        task["tokens"] += sum(label != IGNORE_INDEX for label in labels[1:])  # the metric scores labels[1:]
    return dict(sorted(shares.items()))


def fit(run_dir: Path, args, *extra: str) -> tuple[dict, float]:
    """One ``fit`` in a child process; its summary.json and wall seconds."""
    cmd = [sys.executable, "-m", "splittrain", "fit", "--config", str(CONFIG),
           "--trainer.default_root_dir", str(run_dir), "--trainer.max_steps", str(args.steps),
           "--trainer.val_check_interval", str(args.steps), "--trainer.num_sanity_val_steps", "0",
           "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
           "--trainer.enable_model_summary", "false", "--model.sample_prompt", "null",
           "--model.optim.lr", str(args.lr), "--model.trunk.optim.lr", str(args.trunk_lr),
           "--data.batch_size", str(args.batch), *extra]
    log = run_dir.with_suffix(".log")
    began = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        sys.stdout.write(log.read_text()[-4000:])
        raise RuntimeError(f"{' '.join(cmd)} exited with {done.returncode}")
    return json.loads((run_dir / "summary.json").read_text()), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=240, help="optimizer steps of every run")
    parser.add_argument("--lr", type=float, default=0.002, help="client AdamW learning rate (the quickstart's)")
    parser.add_argument("--trunk-lr", type=float, default=0.002, help="trunk AdamW learning rate (the quickstart's)")
    parser.add_argument("--batch", type=int, default=16, help="rows per client batch")
    parser.add_argument("--average-every", type=int, default=5, help="local steps between averages (weights)")
    parser.add_argument("--weights", action=argparse.BooleanOptionalAction, default=True,
                        help="also run average: weights (FedAvg)")
    parser.add_argument("--centralized", action="store_true", help="also run one client on all rows, batch 3x")
    parser.add_argument("--seed", type=int, default=0, help="data seed of the federated runs (shards, order)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every fit")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 steps, no weights run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "federated_noniid.json")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.weights = 20, False

    from splittrain.quickstart import VAL_FILE

    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="splittrain-noniid-"))
    federation = ["--model.federated.clients", str(CLIENTS), "--data.partition", "column",
                  "--data.partition_column", COLUMN, "--data.seed", str(args.seed)]
    runs: list[dict] = []

    def record(name: str, summary: dict, seconds: float, **info) -> dict:
        run = {"run": name, "val_loss": summary["val_loss"], "val_token_accuracy": summary["val_token_accuracy"],
               "val_perplexity": summary["val_perplexity"], "steps": summary["steps"],
               "train_loss_first": summary["train_loss_first"], "train_loss_last": summary["train_loss_last"],
               "train_loss_every_10": summary["train_losses"][::10], "fit_seconds": summary["seconds"],
               "seconds": seconds, "test_exact_match": summary.get("test_exact_match"), **info}
        if "clients" in summary:
            run["clients"] = {client: {k: v for k, v in figures.items() if k != "train_losses"}
                              | {"train_loss_every_10": figures["train_losses"][::10]}
                              for client, figures in summary["clients"].items()}
            run["client_first_losses"] = [summary["clients"][f"client{c}"]["train_losses"][0] for c in range(CLIENTS)]
        runs.append(run)
        print(f"  {name:<22} val loss {run['val_loss']:.4f}  val token accuracy {run['val_token_accuracy']:.4f}  "
              f"exact match {run['test_exact_match']:.3f}  ({seconds:.0f} s)", flush=True)
        return run

    try:
        parts, rows = shards(args.seed)
        tasks = [sorted(set(rows.select(part)[COLUMN])) for part in parts]
        for c, (part, names) in enumerate(zip(parts, tasks)):
            print(f"client{c}: tasks {', '.join(names)}, {len(part)} training rows")

        shares = val_token_shares()
        scored = sum(t["tokens"] for t in shares.values())
        client_share = [sum(shares[t]["tokens"] for t in names) / scored for names in tasks]
        print("validation: " + ", ".join(f"{t} {v['rows']} rows / {v['tokens']} scored tokens"
                                         for t, v in shares.items()))
        print("share of the scored validation tokens in each client's tasks: "
              + ", ".join(f"client{c} {share:.1%}" for c, share in enumerate(client_share)))

        summary, seconds = fit(work / "federated-gradients", args, *federation, "--model.federated.average",
                               "gradients")
        fed = record("federated/gradients", summary, seconds, average="gradients", clients_n=CLIENTS)
        if args.weights:
            summary, seconds = fit(work / "federated-weights", args, *federation, "--model.federated.average",
                                   "weights", "--model.federated.average_every", str(args.average_every))
            record("federated/weights", summary, seconds, average="weights", average_every=args.average_every,
                   clients_n=CLIENTS)
        for c, part in enumerate(parts):
            shard_file = work / f"client{c}.jsonl"
            rows.select(part).to_json(str(shard_file), lines=True)
            # data.seed = seed + c: client c's loader seed inside the federation, hence the same batches
            summary, seconds = fit(work / f"alone-client{c}", args, "--data.train", str(shard_file),
                                   "--data.val", str(VAL_FILE), "--data.seed", str(args.seed + c))
            run = record(f"alone/client{c}", summary, seconds, tasks=tasks[c], train_rows=len(part), clients_n=1)
            run["first_loss_in_federation"] = fed["client_first_losses"][c]
            run["first_loss_matches_federation"] = abs(run["train_loss_first"] - fed["client_first_losses"][c]) <= 1e-5
        if args.centralized:
            summary, seconds = fit(work / "centralized", args, "--data.batch_size", str(args.batch * CLIENTS),
                                   "--data.seed", str(args.seed))
            record("centralized", summary, seconds, train_rows=len(rows), clients_n=1, batch=args.batch * CLIENTS)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    alone = [r for r in runs if r["run"].startswith("alone/")]
    val_rows = sum(1 for line in VAL_FILE.read_text().splitlines() if line.strip())
    best = max(alone, key=lambda r: r["val_token_accuracy"])
    best_loss = min(alone, key=lambda r: r["val_loss"])
    print(f"\n{CLIENTS} clients, quickstart rows partitioned by {COLUMN!r} (2 tasks each), {args.steps} steps of batch "
          f"{args.batch} per client, client: full, lr {args.lr} (trunk {args.trunk_lr}), cosine, "
          f"OMP_NUM_THREADS={args.threads}; global validation = all {val_rows} quickstart val rows (6 tasks)")
    print(f"{'run':<22} {'tasks':<18} {'val loss':>8} {'val acc':>8} {'exact':>6} {'train loss first -> last':>25} "
          f"{'seconds':>7}")
    for r in runs:
        what = ", ".join(r["tasks"]) if "tasks" in r else ("all 6" if r["run"] != "centralized" else "all 6, pooled")
        print(f"{r['run']:<22} {what:<18} {r['val_loss']:>8.4f} {r['val_token_accuracy']:>8.4f} "
              f"{r['test_exact_match']:>6.3f} {r['train_loss_first']:>12.4f} -> {r['train_loss_last']:<9.4f} "
              f"{r['seconds']:>7.0f}")
    verdicts = {}
    for r in runs:
        if r["run"].startswith("federated/"):
            beats = r["val_token_accuracy"] > best["val_token_accuracy"] and r["val_loss"] < best_loss["val_loss"]
            verdicts[r["run"]] = beats
            print(f"{r['run']} vs the best client alone ({best['run']}: accuracy {best['val_token_accuracy']:.4f}; "
                  f"{best_loss['run']}: loss {best_loss['val_loss']:.4f}): accuracy "
                  f"{r['val_token_accuracy'] - best['val_token_accuracy']:+.4f}, loss "
                  f"{r['val_loss'] - best_loss['val_loss']:+.4f} -> {'beats it' if beats else 'does NOT beat it'}")
    print("first training loss of each client alone = its first loss in federated/gradients (same init, same batch): "
          + ", ".join(f"{r['run']} {'yes' if r['first_loss_matches_federation'] else 'NO'}" for r in alone))
    elapsed = time.perf_counter() - began
    print(f"benchmark took {elapsed:.0f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": machine(),
        "settings": {"config": str(CONFIG.relative_to(ROOT)), "clients": CLIENTS, "partition": "column",
                     "partition_column": COLUMN, "client_tasks": tasks, "client_train_rows": [len(p) for p in parts],
                     "steps": args.steps, "batch_per_client": args.batch, "lr": args.lr, "trunk_lr": args.trunk_lr,
                     "schedule": "cosine, 20 warm-up steps (quickstart)", "client": "full",
                     "average_every_for_weights": args.average_every, "seed_everything": 0, "data_seed": args.seed,
                     "threads": args.threads, "validation": f"all {val_rows} quickstart validation rows (6 tasks)"},
        "val_tasks": shares, "val_token_share_of_client_tasks": client_share,
        "best_alone_by_accuracy": best["run"], "best_alone_by_loss": best_loss["run"],
        "federated_beats_best_alone": verdicts, "elapsed_s": elapsed, "runs": runs,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
