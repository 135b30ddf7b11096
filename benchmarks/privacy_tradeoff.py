"""The privacy-utility curve: token recovery by the audit's server against validation loss, over the cut-1 noise
and the number of bottom layers, on the quickstart.

    python benchmarks/privacy_tradeoff.py                 # 3 bottom depths x (no defense + 5 noise levels), ~4 min
    python benchmarks/privacy_tradeoff.py --quick         # 1 depth, 2 settings

Every run is ``python -m splittrain fit --config configs/quickstart.yaml`` in this process (``client: lora``, cuts
``[k, 4]`` for k bottom layers, ``--steps`` steps, no evaluation by generation), then ``splittrain.audit.audit``
on it (the server learns from the validation rows, attacks ``--client-rows`` of the client's training rows).
Defenses: none, then ``activation_clip`` ``--clip`` with ``activation_noise`` sigma (the gradients at cut 2 are
not defended here, so label inference shows what they leak regardless). The table and the PNG
(``benchmarks/results/privacy_tradeoff.png``) show token recovery (the better of nearest neighbour and the learned
decoder), the share of rows with half their tokens recovered, label inference and the validation loss.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import yaml

from machine import machine  # this folder is on sys.path when a script here runs

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = ROOT / "configs" / "quickstart.yaml"


def run(work: Path, layers: int, sigma: float | None, args) -> dict:
    from splittrain.cli import main
    from splittrain.audit import AuditSettings, audit

    name = f"k{layers}-" + ("open" if sigma is None else f"sigma{sigma:g}")
    config = yaml.safe_load(CONFIG.read_text())
    config["trainer"].update(default_root_dir=str(work / name), max_steps=args.steps, val_check_interval=args.steps,
                             limit_val_batches=4, enable_progress_bar=False, callbacks=[], num_sanity_val_steps=0)
    privacy = {} if sigma is None else {"activation_clip": args.clip, "activation_noise": sigma}
    config["model"].update(cuts=[layers, 4], client="lora", eval_generate=False, sample_prompt=None,
                           privacy=privacy)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    began = time.perf_counter()
    cli = main(["fit", "--config", str(path)])
    report = audit(cli.model, cli.datamodule, AuditSettings(client_rows=args.client_rows, public_rows=args.public_rows),
                   work / name)
    cli.model.close()
    row = {"bottom_layers": layers, "sigma": sigma, "clip": None if sigma is None else args.clip,
           **{k: report[k] for k in ("token_recovery", "token_recovery_nearest", "token_recovery_decoder",
                                     "rows_half_recovered_decoder", "rows_half_recovered_nearest",
                                     "label_inference", "val_loss")},
           "seconds": time.perf_counter() - began}
    row["rows_half_recovered"] = max(row["rows_half_recovered_decoder"], row["rows_half_recovered_nearest"])
    print(f"  bottom {layers}  {'no defense' if sigma is None else f'sigma {sigma:<5g}'}  recovery "
          f"{row['token_recovery']:.3f}  rows >= 50% {row['rows_half_recovered']:.3f}  labels "
          f"{row['label_inference']:.3f}  val loss {row['val_loss']:.3f}  ({row['seconds']:.0f} s)", flush=True)
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for layers in sorted({r["bottom_layers"] for r in rows}):
        mine = [r for r in rows if r["bottom_layers"] == layers]
        open_ = [r for r in mine if r["sigma"] is None]
        noised = sorted((r for r in mine if r["sigma"] is not None), key=lambda r: r["sigma"])
        xs = [0.0] * len(open_) + [r["sigma"] for r in noised]
        ordered = open_ + noised
        left.plot(xs, [r["token_recovery"] for r in ordered], "o-", label=f"{layers} bottom layer(s)")
        right.plot([r["val_loss"] for r in ordered], [r["token_recovery"] for r in ordered], "o-",
                   label=f"{layers} bottom layer(s)")
    left.set_xlabel("activation noise sigma (x clip); 0 = no defense")
    left.set_ylabel("token recovery by the server")
    right.set_xlabel("validation loss")
    right.set_ylabel("token recovery by the server")
    right.set_title("privacy-utility")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3], help="bottom layers (cut 1)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.001, 0.003, 0.01, 0.03, 0.1])
    parser.add_argument("--clip", type=float, default=20.0, help="activation_clip C of the defended runs")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--client-rows", type=int, default=100)
    parser.add_argument("--public-rows", type=int, default=300)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 bottom layer, no defense and sigma 1")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "privacy_tradeoff.json")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.sigmas, args.steps = [1], [1.0], 20
    began = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="splittrain-privacy-") as tmp:
        for layers in args.layers:
            for sigma in [None, *args.sigmas]:
                rows.append(run(Path(tmp), layers, sigma, args))
    print(f"\nquickstart, client lora, {args.steps} steps, cut-1 defense: clip {args.clip:g} + noise sigma x clip; "
          f"audit on {args.client_rows} client rows, attacks trained on {args.public_rows} validation rows")
    print(f"{'bottom':>6} {'sigma':>6} {'recovery':>9} {'rows>=50%':>10} {'labels':>7} {'val loss':>9}")
    for r in rows:
        sigma = "-" if r["sigma"] is None else f"{r['sigma']:g}"
        print(f"{r['bottom_layers']:>6} {sigma:>6} {r['token_recovery']:>9.3f} {r['rows_half_recovered']:>10.3f} "
              f"{r['label_inference']:>7.3f} {r['val_loss']:>9.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    plot(rows, png)
    args.out.write_text(json.dumps({"machine": machine(), "steps": args.steps, "clip": args.clip,
                                    "client_rows": args.client_rows, "public_rows": args.public_rows,
                                    "elapsed_s": time.perf_counter() - began, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
