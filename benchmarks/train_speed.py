"""Training step time: split LoRA training (in-process transport) vs the unsplit model with peft.

    python benchmarks/train_speed.py                # Qwen2 shape ~17M params, batch 8x128, fp32
    python benchmarks/train_speed.py --steps 5      # quicker

Both runs train the same LoRA adapters (r=8 on the 7 projections of the trunk layers) with AdamW on the same
batches, from the same initial adapters, in the same process, alternating runs to spread machine noise.
The ratio split/monolithic is the figure to read: absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SHAPE = dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
             num_key_value_heads=2, tie_word_embeddings=True)


def make_batches(count: int, batch: int, length: int, vocab_size: int = SHAPE["vocab_size"]) -> list[dict[str, torch.Tensor]]:
    """Seeded random token batches (every position trained)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab_size, (batch, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def monolithic(folder: str, cuts: tuple[int, int], batches, settings) -> list[float]:
    from peft import inject_adapter_in_model
    from transformers import AutoModelForCausalLM

    from splittrain.lora import init_lora, lora_config, model_family
    from splittrain.optim import OptimSettings, build_optimizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.requires_grad_(False)
    inject_adapter_in_model(lora_config(model_family(model), range(*cuts), settings), model)
    init_lora(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, _ = build_optimizer(params, OptimSettings(lr=1e-3), None)
    times = []
    for batch in batches:
        began = time.perf_counter()
        model(**batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - began)
    return times


def split(folder: str, cuts: tuple[int, int], batches, settings) -> tuple[list[float], int]:
    import splittrain
    from splittrain.crossing import Crossing
    from splittrain.cut import make_link
    from splittrain.server import TrunkServer, load_trunk
    from splittrain.optim import OptimSettings

    bottom, top = splittrain.split_model(folder, cuts=cuts, parts=("bottom", "top"))
    bottom.requires_grad_(False)
    top.requires_grad_(False)
    server = TrunkServer(load_trunk(folder, cuts, settings), OptimSettings(lr=1e-3))
    link = make_link("local", server=server)
    crossing = Crossing(bottom, top, link)
    times = []
    for step, batch in enumerate(batches):
        began = time.perf_counter()
        crossing.forward(batch, ("bench", step, 0), step).loss.backward()
        link.step(step + 1)
        times.append(time.perf_counter() - began)
    return times, link.wire_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="alternating split/monolithic rounds")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "train_speed.json")
    args = parser.parse_args()

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from splittrain.lora import LoraSettings

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    folder = tempfile.mkdtemp(prefix="splittrain-bench-")
    model = Qwen2ForCausalLM(Qwen2Config(**SHAPE))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    cuts, settings = (2, 6), LoraSettings(r=8, alpha=16)
    batches = make_batches(args.warmup + args.steps, args.batch, args.length)
    mono_times, split_times, wire = [], [], 0
    for _ in range(args.rounds):
        mono_times += monolithic(folder, cuts, batches, settings)[args.warmup:]
        t, wire = split(folder, cuts, batches, settings)
        split_times += t[args.warmup:]
    mono, spl = statistics.median(mono_times), statistics.median(split_times)
    tokens = args.batch * args.length
    print(f"Qwen2 shape {params / 1e6:.1f}M params, cuts {cuts}, LoRA r={settings.r} on the trunk, "
          f"batch {args.batch}x{args.length}, fp32, {torch.get_num_threads()} threads")
    print(f"{'run':<12} {'ms/step':>9} {'tokens/s':>9}")
    print(f"{'monolithic':<12} {mono * 1e3:>9.1f} {tokens / mono:>9.0f}")
    print(f"{'split':<12} {spl * 1e3:>9.1f} {tokens / spl:>9.0f}")
    print(f"split / monolithic step time: {spl / mono:.3f}; bytes across the cuts per step: "
          f"{wire / (args.warmup + args.steps) / 2**20:.2f} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "params": params, "cuts": cuts, "batch": args.batch, "length": args.length,
        "monolithic_ms": mono * 1e3, "split_ms": spl * 1e3, "ratio": spl / mono,
        "wire_bytes_per_step": wire / (args.warmup + args.steps),
        "monolithic_all_ms": [t * 1e3 for t in mono_times], "split_all_ms": [t * 1e3 for t in split_times],
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
