"""What each independent client costs the trunk server: its own trunk LoRA adapter and AdamW state, not a trunk.

    python benchmarks/isolation_memory.py                 # ~123M-param Qwen2 shape, cuts (2, 6), 6 clients (~1 min)
    python benchmarks/isolation_memory.py --clients 3 --r 8

One process builds a random Qwen2 of federated_memory.py's default shape (hidden 1024, 8 layers; vocabulary 1024,
the embedding does not matter here), saves it, loads its trunk (layers 2-5) with the quickstart's trunk LoRA
(r 16, alpha 32) into a :class:`~splittrain.server.TrunkServer`, and lets clients arrive one by one: each opens a
session (its adapter is made), trains one micro-batch (4 x 128 tokens) and makes one step, so its AdamW state
exists. After each client the script prints the server's resident set (``rss_bytes``, after ``gc`` and glibc's
``malloc_trim``), its growth since the previous client, and the adapter's ``bytes`` as ``server_status.json`` shows
them (LoRA tensors + AdamW's two moments + a step count per tensor), against the trunk's frozen base weights, which
are held once whatever the number of clients. The first client's growth also holds the first pass's one-time costs
(torch's and autograd's working memory); from the second client on, the growth is that client's adapter.

Measured on 2 shared CPU cores (r 16): base 172.1 MiB; adapter 13.31 MiB (0.077 of the base); rss +195.7 MiB for
the first client, then +13.8-14.0 MiB per client for clients 2-6.

It also prints the same ratio computed from the configs of real models (no weights loaded): what a second client
costs next to what a second trunk would.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import tempfile

SHAPE = {"vocab_size": 1024, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
         "num_attention_heads": 16, "num_key_value_heads": 4, "tie_word_embeddings": True}
CUTS = (2, 6)
# Real shapes: (hidden, intermediate, heads, kv heads, head dim, layers in the trunk)
REAL = {"Qwen2.5-0.5B, trunk of 20 layers": (896, 4864, 14, 2, 64, 20),
        "Qwen2.5-7B, trunk of 24 layers": (3584, 18944, 28, 4, 128, 24),
        "Llama-3.1-8B, trunk of 28 layers": (4096, 14336, 32, 8, 128, 28)}


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def analytic(hidden: int, inter: int, heads: int, kv: int, head_dim: int, layers: int, r: int) -> tuple[int, int]:
    """(base bytes, adapter bytes) in fp32 of a trunk of ``layers`` Qwen2/Llama layers with LoRA r on q,k,v,o,gate,
    up,down: base = the layers' weights; adapter = LoRA tensors x 3 (weights, AdamW's two moments)."""
    q, k = heads * head_dim, kv * head_dim
    shapes = [(hidden, q), (hidden, k), (hidden, k), (q, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    base = sum(i * o for i, o in shapes) + 2 * hidden
    lora = sum(r * (i + o) for i, o in shapes)
    return 4 * base * layers, 3 * 4 * lora * layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from splittrain.loading import rss_bytes
    from splittrain.lora import LoraSettings
    from splittrain.server import TrunkServer, load_trunk
    from splittrain.optim import OptimSettings

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        config = AutoConfig.for_model("qwen2", **SHAPE)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="200MB")
        trim()
        trunk = load_trunk(folder, CUTS, LoraSettings(r=args.r, alpha=2 * args.r), seed=0)
    base = sum(p.nbytes for p in trunk.parameters() if not p.requires_grad)
    server = TrunkServer(trunk, OptimSettings(lr=2e-3))
    trim()
    print(f"trunk layers {CUTS[0]}-{CUTS[1] - 1} of a {SHAPE['hidden_size']}-wide Qwen2: frozen base weights "
          f"{base / 2**20:.1f} MiB; LoRA r {args.r}")
    print(f"{'clients':>7} {'rss MiB':>9} {'+rss MiB':>9} {'adapter MiB':>12} {'adapter/base':>13}")
    last = rss_bytes()
    print(f"{0:>7} {last / 2**20:>9.1f}")
    g = torch.Generator().manual_seed(1)
    for n in range(1, args.clients + 1):
        name = f"client{n}"
        server.open_session(name, name)
        hidden = {"hidden_states": torch.randn(4, 128, SHAPE["hidden_size"], generator=g),
                  "position_ids": torch.arange(128)[None]}
        server.handle(name, "forward", {"key": ["train", 0, 0], "training": True, "need_input_grad": True,
                                        "step": 0}, hidden)
        server.handle(name, "backward", {"key": ["train", 0, 0]},
                      {"grad": torch.randn(4, 128, SHAPE["hidden_size"], generator=g)})
        server.handle(name, "step", {"step": 1}, {})
        server.end_session(name)  # graphs and gradients go; the adapter stays
        trim()
        now, adapter = rss_bytes(), server.status()["adapters"][name]["bytes"]
        print(f"{n:>7} {now / 2**20:>9.1f} {(now - last) / 2**20:>9.1f} {adapter / 2**20:>12.2f} "
              f"{adapter / base:>13.3f}")
        last = now
    print(f"\nfrom real configs, fp32, LoRA r {args.r} on q,k,v,o,gate,up,down:")
    for name, shape in REAL.items():
        b, a = analytic(*shape, r=args.r)
        print(f"  {name}: base {b / 2**30:.2f} GiB, one client's adapter {a / 2**20:.0f} MiB ({a / b:.3f} of the base)")


if __name__ == "__main__":
    main()
