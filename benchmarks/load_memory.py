"""Memory and bytes read when loading a split model: naive (from_pretrained, then split) vs selective.

    python benchmarks/load_memory.py                      # ~500 MB checkpoint, cuts 2 6, writes JSON
    python benchmarks/load_memory.py --size small         # ~60 MB, for a quick look

Every measurement runs in a fresh interpreter. Baseline RSS is taken after the imports, one load + forward of
a tiny warm-up model (lazy imports) and one run of the model's matrix-multiply shapes on throwaway operands
(the BLAS library's cached workspaces; ``--plain-warm-up`` skips this); then the peak-RSS mark is reset, the model is
loaded, one forward pass runs on a 32-token sequence (memory-mapped weights count only once touched), and the
peak RSS over the baseline is reported. Targets: all parts in one process <= 1.10x the checkpoint bytes; each
part in its own process <= 1.10x its own bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from machine import write_result  # this folder is on sys.path when a script here runs

HERE = Path(__file__).resolve().parent
SIZES = {  # Qwen2 shapes; fp32, tied embeddings
    "default": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                    num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=16000),
}
TARGET = 1.10


def build_checkpoint(folder: Path, size: str) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SIZES[size], tie_word_embeddings=True))
    model.save_pretrained(folder, max_shard_size="64MB")
    return folder


def warm_up(folder: Path, config: dict | None, tokens: int) -> None:
    """Load and run a tiny model once, so lazy imports and first-use allocations land in the baseline.

    With ``config``, also run the model's own matrix-multiply shapes on throwaway operands: MKL keeps the
    packing buffers of the first GEMM of a size class (about 9 MiB for a 32k-vocabulary head), which is
    library state, not memory of the part. The operands are freed and the heap trimmed before the baseline is
    taken, so the part's weights, activations and outputs all count.
    """
    import gc

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import splittrain

    if not folder.is_dir():
        Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=1000)).save_pretrained(folder)
    with torch.no_grad():
        bottom, top = splittrain.split_model(folder, cuts=(1,))
        top(bottom(torch.randint(0, 1000, (1, tokens))))
        if config is not None:
            h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
            kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
            for out_features, in_features in ((h, h), (kv, h), (i, h), (h, i), (v, h)):
                torch.nn.functional.linear(torch.randn(1, tokens, in_features), torch.randn(out_features, in_features))
    del bottom, top
    gc.collect()
    try:  # hand freed heap pages back, so the measured forward pass cannot reuse warm-up memory for free
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(mode: str, folder: str, cuts: list[int], part: str | None, plain_warm_up: bool) -> dict:
    """Runs in a child process: load one way, run one forward pass, report peak RSS over the baseline."""
    import torch
    import transformers.masking_utils  # noqa: F401  (imports count in the baseline, not in the load)
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401
    from transformers import AutoModelForCausalLM

    import splittrain
    from splittrain.loading import peak_rss_bytes, reset_peak_rss, rss_bytes

    torch.set_num_threads(2)
    ids = torch.randint(0, 1000, (1, 32))
    config = None if plain_warm_up else json.loads((Path(folder) / "config.json").read_text())
    warm_up(Path(folder).parent / "warm-up", config, ids.shape[1])
    baseline = rss_bytes()
    reset_peak_rss()
    began = time.perf_counter()
    with torch.no_grad():
        if mode == "naive":
            model = AutoModelForCausalLM.from_pretrained(folder)
            parts = splittrain.split_model(model, cuts=cuts)
            bytes_read = json.loads((Path(folder) / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
            state = parts[0](ids)
            for segment in parts[1:]:
                state = segment(state)
        else:
            parts = splittrain.split_model(folder, cuts=cuts, parts=None if part is None else (part,))
            bytes_read = sum(r.bytes_read for r in parts.reports.values())
            first = parts[0]
            if first.is_first:
                state = first(ids)
            else:
                state = splittrain.Activations(torch.randn(1, ids.shape[1], first.config.hidden_size), None,
                                               torch.arange(ids.shape[1])[None])
                state = first(state)
            for segment in parts[1:]:
                state = segment(state)
    return {"mode": mode, "part": part or "all", "bytes_read": bytes_read,
            "peak_rss_over_baseline": peak_rss_bytes() - baseline, "seconds": time.perf_counter() - began}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--cuts", type=int, nargs="+", default=[2, 6])
    parser.add_argument("--workdir", type=Path, default=HERE / "work")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "load_memory.json")
    parser.add_argument("--plain-warm-up", action="store_true",
                        help="warm up with the tiny model only, not the model's own GEMM shapes")
    parser.add_argument("--measure", nargs=3, metavar=("MODE", "FOLDER", "PART"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        mode, folder, part = args.measure
        print(json.dumps(measure(mode, folder, args.cuts, None if part == "all" else part, args.plain_warm_up)))
        return

    from splittrain.loading import Checkpoint, part_ranges

    folder = build_checkpoint(args.workdir / f"qwen2-{args.size}", args.size)
    checkpoint = Checkpoint(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    total = index["metadata"]["total_size"]
    ranges = part_ranges(checkpoint.config.num_hidden_layers, args.cuts)
    cuts = [str(c) for c in args.cuts] + (["--plain-warm-up"] if args.plain_warm_up else [])

    rows = [run_child("naive", str(folder), "all", "--cuts", *cuts) | {"own_bytes": total},
            run_child("selective", str(folder), "all", "--cuts", *cuts) | {"own_bytes": total}]
    for name in ranges:
        row = run_child("selective", str(folder), name, "--cuts", *cuts)
        rows.append(row | {"own_bytes": row["bytes_read"]})
    for row in rows:
        row["ratio"] = row["peak_rss_over_baseline"] / row["own_bytes"]
        row["naive_ratio_for_this_party"] = rows[0]["peak_rss_over_baseline"] / row["own_bytes"]
        row["meets_target"] = row["mode"] == "naive" or row["ratio"] <= TARGET

    mib = 2**20
    print(f"checkpoint: {total / mib:.0f} MiB in {len(set(index['weight_map'].values()))} shards, "
          f"cuts {args.cuts}, parts {dict(ranges)}")
    print(f"{'path':<10} {'part':<7} {'own MiB':>8} {'read MiB':>9} {'peak MiB':>9} {'peak/own':>9} "
          f"{'naive/own':>10} {'target':>7}")
    for r in rows:
        target = "-" if r["mode"] == "naive" else ("ok" if r["meets_target"] else "MISSED")
        print(f"{r['mode']:<10} {r['part']:<7} {r['own_bytes'] / mib:>8.1f} {r['bytes_read'] / mib:>9.1f} "
              f"{r['peak_rss_over_baseline'] / mib:>9.1f} {r['ratio']:>9.3f} {r['naive_ratio_for_this_party']:>10.3f} "
              f"{target:>7}")
    write_result(args.out, {"checkpoint_bytes": total, "cuts": args.cuts, "size": args.size,
                            "plain_warm_up": args.plain_warm_up, "target": TARGET, "rows": rows})


if __name__ == "__main__":
    main()
