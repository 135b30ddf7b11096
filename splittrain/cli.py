"""Command line: ``python -m splittrain <command>`` (or the ``splittrain`` console script).

Training follows LightningCLI conventions (``--config`` stackable, ``--print_config``, dotted overrides, the
resolved config saved in the run folder)::

    python -m splittrain fit --config configs/quickstart.yaml
    python -m splittrain fit --config configs/quickstart.yaml --trainer.max_steps 50 --model.optim.lr 1e-3
    python -m splittrain fit --config configs/quickstart.yaml --ckpt_path last      # resume both sides
    python -m splittrain validate --config configs/quickstart.yaml --ckpt_path last

Model owners and users of a finished run::

    python -m splittrain split --model Qwen/Qwen2-0.5B --cuts 6 18 --out parties/
    python -m splittrain export --run runs/quickstart --out exported/

Notebooks call the same entry point: ``splittrain.cli.main(["fit", "--config", "configs/quickstart.yaml"])``
or with a dict ``main({"fit": {...}})``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Sequence

LIGHTNING_COMMANDS = ("fit", "validate", "test")


def split_command(model: str, cuts: Sequence[int], out: str | Path, dtype: str | None = None,
                  family: str | None = None, revision: str | None = None,
                  max_shard_size: str = "5GB", verbose: bool = True) -> dict[str, Path]:
    """Cut ``model`` and write one folder per party under ``out``; each party's parts are loaded alone."""
    from .loading import Checkpoint, load_parts, part_ranges, party_parts, save_segments

    checkpoint = Checkpoint(model, revision=revision)
    ranges = part_ranges(checkpoint.text_config.num_hidden_layers, tuple(cuts))
    written = {}
    for party, names in party_parts(list(ranges)).items():
        segments = load_parts(checkpoint, ranges, names, dtype=dtype, verbose=verbose, family=family)
        written[party] = save_segments(list(segments), Path(out) / party, max_shard_size=max_shard_size)
        if verbose:
            print(f"{party}: {', '.join(names)} -> {written[party]}")
        del segments
    return written


def _tools_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splittrain", description="Split-learning fine-tuning of decoder LLMs.",
                                     epilog="python -m splittrain fit --help lists every training setting")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, what in (("fit", "train split (LightningCLI: --config, --print_config, dotted overrides)"),
                       ("validate", "validate a model or checkpoint"), ("test", "test a model or checkpoint")):
        commands.add_parser(name, help=what, add_help=False)  # handled by LightningCLI before parsing gets here
    split = commands.add_parser("split", help="cut a checkpoint into one folder per party (client/, server/)")
    split.add_argument("--model", required=True, help="hub id or local folder of a safetensors checkpoint")
    split.add_argument("--cuts", required=True, type=int, nargs="+", help="cut layers, e.g. --cuts 6 12")
    split.add_argument("--out", required=True, help="output folder; gets client/ and server/")
    split.add_argument("--dtype", default=None, help="convert weights, e.g. bfloat16 (default: keep)")
    split.add_argument("--family", default=None, help="family for an unregistered model type of the same shape")
    split.add_argument("--revision", default=None, help="hub revision")
    split.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard to write")
    split.add_argument("--quiet", action="store_true", help="no progress bars or reports")
    export = commands.add_parser("export", help="write one peft adapter (or merged checkpoint) for a run")
    export.add_argument("--run", required=True, help="run folder of a fit (holds run.json and checkpoints/)")
    export.add_argument("--out", required=True, help="output folder")
    export.add_argument("--ckpt", default=None, help="client checkpoint (default: RUN/checkpoints/last.ckpt)")
    return parser


def _lightning_cli(args: Sequence[str] | dict[str, Any]):
    from lightning.pytorch.cli import LightningCLI

    from .data import InstructionDataModule
    from .modules import ClientModule, SafetensorsCheckpointIO

    class SplitCLI(LightningCLI):
        """LightningCLI for the client side; after ``fit`` it validates, writes summary.json, shows a sample."""

        def after_fit(self) -> None:
            write_summary(self.trainer, self.model, self.datamodule)

        def _parse_ckpt_path(self) -> None:
            """LightningCLI would torch.load a checkpoint file to read hyper-parameters from it; ours are
            safetensors and hold none (the run's config is its --config), so there is nothing to read."""

    return SplitCLI(
        ClientModule,
        InstructionDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,  # each party builds its own AdamW from model.optim / model.trunk
        trainer_defaults={"plugins": [{"class_path": f"{SafetensorsCheckpointIO.__module__}.SafetensorsCheckpointIO"}],
                          "logger": False},
    )


def write_summary(trainer, model, datamodule) -> dict[str, Any]:
    """Validate once more, then write and print ``summary.json`` in the run folder and a sample answer."""
    summary = model.fit_summary()
    validated = {}
    if trainer.limit_val_batches != 0 and getattr(datamodule, "val_dataset", None) is not None:
        validated = trainer.validate(model, datamodule=datamodule, verbose=False)[0]
    summary["val_loss"] = validated.get("val_loss", math.nan)
    summary["val_perplexity"] = validated.get("val_perplexity", math.nan)
    summary["val_token_accuracy"] = validated.get("val_token_accuracy", math.nan)
    if trainer.is_global_zero:
        path = model.run_dir / "summary.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
        print("\n".join(f"  {k:<20} {v:.4g}" if isinstance(v, float) else f"  {k:<20} {v}"
                        for k, v in summary.items()))
        print(f"summary: {path}")
        if model.sample_prompt:
            from .generate import greedy_answer

            answer = greedy_answer(model, datamodule.tokenizer, model.sample_prompt)
            print(f"sample  user: {model.sample_prompt}\n   assistant: {answer}")
    return summary


def main(args: Sequence[str] | dict[str, Any] | None = None) -> Any:
    """Entry point; ``args`` is a list of command-line words or a dict (default: ``sys.argv[1:]``)."""
    import sys

    words = sys.argv[1:] if args is None else args
    command = next(iter(words)) if isinstance(words, dict) else (words[0] if words else None)
    if command in LIGHTNING_COMMANDS or isinstance(words, dict):
        return _lightning_cli(args)  # None: LightningCLI reads sys.argv itself
    ns = _tools_parser().parse_args(list(words))
    if ns.command == "split":
        return split_command(ns.model, ns.cuts, ns.out, dtype=ns.dtype, family=ns.family, revision=ns.revision,
                             max_shard_size=ns.max_shard_size, verbose=not ns.quiet)
    if ns.command == "export":
        from .lora import export_run

        out = export_run(ns.run, ns.out, ns.ckpt)
        print(f"exported {ns.run} -> {out}")
        return out
