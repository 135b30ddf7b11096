"""Command line: ``python -m splittrain <command>`` (or the ``splittrain`` console script).

    python -m splittrain split --model Qwen/Qwen2-0.5B --cuts 6 18 --out parties/
        writes parties/client (bottom + top) and parties/server (trunk), each loadable on its own.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence


def split_command(model: str, cuts: Sequence[int], out: str | Path, dtype: str | None = None,
                  family: str | None = None, revision: str | None = None,
                  max_shard_size: str = "5GB", verbose: bool = True) -> dict[str, Path]:
    """Cut ``model`` and write one folder per party under ``out``; each party's parts are loaded alone."""
    from .loading import Checkpoint, load_parts, part_ranges, party_parts, save_segments, _text_config

    checkpoint = Checkpoint(model, revision=revision)
    ranges = part_ranges(_text_config(checkpoint.config).num_hidden_layers, tuple(cuts))
    written = {}
    for party, names in party_parts(list(ranges)).items():
        segments = load_parts(checkpoint, ranges, names, dtype=_dtype(dtype), verbose=verbose, family=family)
        written[party] = save_segments(list(segments), Path(out) / party, max_shard_size=max_shard_size)
        if verbose:
            print(f"{party}: {', '.join(names)} -> {written[party]}")
        del segments
    return written


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name.removeprefix("torch."))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splittrain", description="Split-learning fine-tuning of decoder LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    split = commands.add_parser("split", help="cut a checkpoint into one folder per party (client/, server/)")
    split.add_argument("--model", required=True, help="hub id or local folder of a safetensors checkpoint")
    split.add_argument("--cuts", required=True, type=int, nargs="+", help="cut layers, e.g. --cuts 6 12")
    split.add_argument("--out", required=True, help="output folder; gets client/ and server/")
    split.add_argument("--dtype", default=None, help="convert weights, e.g. bfloat16 (default: keep)")
    split.add_argument("--family", default=None, help="family for an unregistered model type of the same shape")
    split.add_argument("--revision", default=None, help="hub revision")
    split.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard to write")
    split.add_argument("--quiet", action="store_true", help="no progress bars or reports")
    return parser


def main(args: Sequence[str] | None = None) -> None:
    """Entry point; ``args`` is a list of command-line words (default: ``sys.argv[1:]``)."""
    ns = _parser().parse_args(args)
    if ns.command == "split":
        split_command(ns.model, ns.cuts, ns.out, dtype=ns.dtype, family=ns.family, revision=ns.revision,
                      max_shard_size=ns.max_shard_size, verbose=not ns.quiet)
