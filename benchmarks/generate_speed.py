"""Generation speed: split generation with a KV cache per segment vs ``transformers``' ``generate``.

    python benchmarks/generate_speed.py            # ~20M-param Qwen2 shape, 4 prompts x 64 tokens, 64 new tokens
    python benchmarks/generate_speed.py --quick    # smoke run

Both decode greedily the same left-padded prompts from the same weights, with no stop token, so both generate
exactly ``--new`` tokens per row (the script checks the tokens are equal). Runs, interleaved and repeated
(``--repeats``), median wall time each:

- ``transformers``: ``model.generate`` of the unsplit model (its own DynamicCache);
- ``split``: :func:`splittrain.generate.generate` over the bottom, trunk and top segments in this process (three
  caches; the trunk run beside the client);
- ``server``: the same with the trunk behind an in-process :class:`~splittrain.server.TrunkServer`
  (``LocalTransport``: the server's per-generation cache, its checks and bookkeeping, no serialization);
- ``tcp``: the trunk server in a thread behind a loopback :class:`~splittrain.transport.tcp.TcpServer` (frames,
  authentication, one round trip per token).

Target: ``split`` tokens/s >= 0.8x ``transformers``'. Read the ratios: absolute times depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from machine import machine  # this folder is on sys.path when a script here runs

HERE = Path(__file__).resolve().parent
SHAPE = dict(vocab_size=32000, hidden_size=320, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=5,
             num_key_value_heads=1, tie_word_embeddings=True)  # split_overhead.py's ~20M shape
CUTS = (2, 6)
TARGET = 0.8


def build(folder: Path):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**SHAPE), dtype=torch.float32).eval()
    model.save_pretrained(folder, max_shard_size="20MB")
    return model


def prompts(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, SHAPE["vocab_size"], (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):  # rows of different lengths, left-padded
        mask[row, :row * length // (2 * batch)] = 0
    return ids, mask


def tcp_server(trunk):
    """A tcp trunk server of ``trunk`` in a thread: the options of ``make_link("tcp", ...)`` that reach it, the
    server and its thread."""
    from splittrain.server import TrunkServer
    from splittrain.transport import fingerprint
    from splittrain.transport.tcp import TcpServer

    token = secrets.token_hex(32)
    tcp = TcpServer(TrunkServer(trunk, total_steps=1), "127.0.0.1:0", {"bench": token})
    thread = threading.Thread(target=tcp.serve_forever, daemon=True)
    thread.start()
    fp = fingerprint(trunk.config, trunk.family.name, (trunk.start, trunk.stop), trunk.dtype)
    return {"address": tcp.address, "client": "bench", "token": token, "fingerprint": fp}, tcp, thread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64, help="prompt tokens (the longest row)")
    parser.add_argument("--new", type=int, default=64, help="tokens generated per row")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repeats of 8 new tokens")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "generate_speed.json")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.new = 2, 8
    if args.threads:
        torch.set_num_threads(args.threads)

    from splittrain import split_model
    from splittrain.cut import make_link
    from splittrain.generate import generate
    from splittrain.server import TrunkServer

    with tempfile.TemporaryDirectory() as folder:
        model = build(Path(folder))
        parts = split_model(folder, cuts=CUTS)
    bottom, trunk, top = parts["bottom"], parts["trunk"], parts["top"]
    ids, mask = prompts(args.batch, args.length)
    remote, tcp, thread = tcp_server(trunk)
    link = make_link("tcp", **remote)
    server_link = make_link("local", server=TrunkServer(trunk, total_steps=1), client="bench")
    runs = {
        "transformers": lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new,
                                               do_sample=False, eos_token_id=None, pad_token_id=0),
        "split": lambda: generate(bottom, trunk, top, ids, mask, max_new_tokens=args.new, eos_token_id=[],
                                  pad_token_id=0),
        "server": lambda: generate(bottom, server_link, top, ids, mask, max_new_tokens=args.new, eos_token_id=[],
                                   pad_token_id=0),
        "tcp": lambda: generate(bottom, link, top, ids, mask, max_new_tokens=args.new, eos_token_id=[],
                                pad_token_id=0),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    outputs = {}
    try:
        with torch.no_grad():
            for name, run in runs.items():  # warm-up, and the tokens every run must agree on
                outputs[name] = run()
            for _ in range(args.repeats):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
    finally:
        link.close()
        tcp.stop()
        thread.join(timeout=10)
    same = {name: bool(torch.equal(out, outputs["transformers"])) for name, out in outputs.items()}
    tokens = args.batch * args.new
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = {name: {"median_s": median[name], "tokens_per_s": tokens / median[name],
                   "ratio_to_transformers": median["transformers"] / median[name], "same_tokens": same[name],
                   "times_s": times[name]} for name in runs}
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.1f}M-param Qwen2, cuts {CUTS}, {args.batch} prompts of <= {args.length} tokens, "
          f"{args.new} new tokens each, greedy, median of {args.repeats}, torch threads {torch.get_num_threads()}")
    print(f"{'run':<14}{'median s':>10}{'tokens/s':>10}{'vs transformers':>17}{'same tokens':>13}")
    for name, row in rows.items():
        print(f"{name:<14}{row['median_s']:>10.3f}{row['tokens_per_s']:>10.1f}{row['ratio_to_transformers']:>16.3f}x"
              f"{str(row['same_tokens']):>13}")
    ratio = rows["split"]["ratio_to_transformers"]
    print(f"target: split >= {TARGET}x transformers' tokens/s: {'met' if ratio >= TARGET else 'MISSED'} ({ratio:.3f}x)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": machine(), "shape": SHAPE, "params": params, "cuts": list(CUTS), "batch": args.batch,
        "prompt_length": args.length, "new_tokens": args.new, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "target": TARGET, "runs": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
