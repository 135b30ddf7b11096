"""Command line: ``python -m splittrain <command>`` (or the ``splittrain`` console script).

Training follows LightningCLI conventions (``--config`` stackable, ``--print_config``, dotted overrides, the
resolved config saved in the run folder)::

    python -m splittrain fit --config configs/quickstart.yaml
    python -m splittrain fit --config configs/quickstart.yaml --trainer.max_steps 50 --model.optim.lr 1e-3
    python -m splittrain fit --config configs/quickstart.yaml --ckpt_path last      # resume both sides
    python -m splittrain validate --config configs/quickstart.yaml --ckpt_path last

The trunk in another process or on another machine (``serve`` in one terminal, ``fit`` in another), or under
torchrun (rank 0 serves the trunk)::

    python -m splittrain token --tokens tokens.json --client client0 --out client0.token
    python -m splittrain serve --config configs/quickstart.yaml --address 127.0.0.1:7000 --tokens tokens.json
    python -m splittrain fit --config configs/quickstart.yaml --model.transport tcp \
        --model.address 127.0.0.1:7000 --model.token_file client0.token
    torchrun --standalone --nproc_per_node 2 -m splittrain fit --config configs/quickstart.yaml --model.transport dist

Model owners and users of a finished run::

    python -m splittrain split --model Qwen/Qwen2-0.5B --cuts 6 18 --out parties/
    python -m splittrain export --run runs/quickstart --out exported/
    python -m splittrain test --config configs/quickstart.yaml --ckpt_path last          # eval.json, eval.md
    python -m splittrain generate --config configs/quickstart.yaml --ckpt_path last --prompt "Reverse the word cat."
    python -m splittrain generate --config configs/quickstart.yaml --ckpt_path last --prompts in.jsonl --out out.jsonl

Notebooks call the same entry point: ``splittrain.cli.main(["fit", "--config", "configs/quickstart.yaml"])``
or with a dict ``main({"fit": {...}})``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
    from .server import ServerLimits

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
    serve = commands.add_parser(
        "serve", help="run the trunk server of a config for tcp clients",
        epilog="--model.* overrides are applied to the config as for fit (e.g. --model.cuts '[2, 4]')")
    serve.add_argument("--config", required=True, action="append", help="the run's config (its model section)")
    serve.add_argument("--address", default="127.0.0.1:7000", help="HOST:PORT to listen on (port 0: any free)")
    serve.add_argument("--tokens", required=True, help="tokens.json: client name -> token (see `token`)")
    serve.add_argument("--tls_cert", default=None, help="TLS certificate (PEM); required off a private network")
    serve.add_argument("--tls_key", default=None, help="TLS private key (PEM)")
    serve.add_argument("--resume", action="store_true", help="restore the newest trunk checkpoint of the run folder")
    serve.add_argument("--save_every", type=int, default=1,
                       help="save trunk/latest.safetensors every N steps (a restarted server loses no step)")
    serve.add_argument("--run_dir", default=None, help="checkpoints and server_status.json (default: the "
                       "config's trainer.default_root_dir)")
    limits = ServerLimits()
    serve.add_argument("--session_timeout", type=float, default=limits.session_timeout,
                       help="seconds a disconnected client's session waits for it to reconnect")
    serve.add_argument("--max_connections", type=int, default=64, help="connections served at once")
    serve.add_argument("--max_graphs", type=int, default=limits.max_graphs,
                       help="forward passes waiting for their backward pass, per client")
    serve.add_argument("--max_graph_bytes", type=int, default=limits.max_graph_bytes,
                       help="bytes those graphs may keep for backward, per client")
    serve.add_argument("--max_graph_age", type=float, default=limits.max_graph_age,
                       help="seconds a forward pass may wait for its backward pass")
    serve.add_argument("--max_batch", type=int, default=limits.max_batch, help="rows per forward pass")
    serve.add_argument("--max_seq", type=int, default=None,
                       help="tokens per row (default: the model's max_position_embeddings)")
    serve.add_argument("--max_frame_bytes", type=int, default=limits.max_frame_bytes,
                       help="largest payload an authenticated client may send")
    serve.add_argument("--max_generations", type=int, default=limits.max_generations,
                       help="generations whose trunk KV cache is kept, per client (least recently used go first)")
    serve.add_argument("--max_generation_bytes", type=int, default=limits.max_generation_bytes,
                       help="bytes a client's trunk KV caches may hold")
    serve.add_argument("--generation_timeout", type=float, default=limits.generation_timeout,
                       help="seconds an idle generation's trunk KV cache is kept")
    serve.add_argument("--max_unacknowledged", type=int, default=limits.max_unacknowledged,
                       help="replies kept per client until it acknowledges them (a pipelining client's micro-batches "
                            "in flight)")
    serve.add_argument("--threads", type=int, default=None,
                       help="torch threads for the trunk's compute (default: torch's, one per core); give the server "
                            "its share of the cores when clients compute on the same machine")
    generate = commands.add_parser(
        "generate", help="answer prompts with a split model (after fit: --ckpt_path last)",
        epilog="--model.* and --data.* overrides are applied to the config as for fit; decoding defaults come from "
               "the config's model.generation")
    generate.add_argument("--config", required=True, action="append", help="the run's config")
    generate.add_argument("--ckpt_path", default=None,
                          help="'last' (the run folder's checkpoints/last.ckpt) or a checkpoint file")
    what = generate.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="one user message; the answer streams to the terminal")
    what.add_argument("--prompts", help="a .jsonl file: one {\"prompt\": ...} or {\"messages\": [...]} per line")
    generate.add_argument("--out", default=None, help="write answers as .jsonl here (default: print them)")
    generate.add_argument("--batch_size", type=int, default=16, help="prompts generated together (left-padded)")
    generate.add_argument("--max_new_tokens", type=int, default=None)
    generate.add_argument("--min_new_tokens", type=int, default=None)
    generate.add_argument("--do_sample", action="store_true", default=None, help="sample (default: greedy)")
    generate.add_argument("--temperature", type=float, default=None)
    generate.add_argument("--top_k", type=int, default=None)
    generate.add_argument("--top_p", type=float, default=None)
    generate.add_argument("--repetition_penalty", type=float, default=None)
    generate.add_argument("--stop", action="append", default=None, dest="stop_strings",
                          help="stop a row at this text (repeatable)")
    generate.add_argument("--stop_token_id", type=int, action="append", default=None, dest="eos_token_id",
                          help="stop a row at this token id (repeatable; default: the tokenizer's EOS)")
    generate.add_argument("--seed", type=int, default=None, help="seed of sampling")
    estimate = commands.add_parser(
        "estimate", help="memory per party of a config (weights, adapters, gradients, optimizer, activations)",
        epilog="needs no weights: parameter counts come from the model's config (a recipe's, a local config.json, "
               "or the hub's config.json alone); --model.* and --data.* overrides apply as for fit")
    estimate.add_argument("--config", required=True, action="append", help="a fit config")
    estimate.add_argument("--device", default=None,
                          help="cpu or cuda (default: cuda when the config's trainer.accelerator is gpu/cuda)")
    estimate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    audit = commands.add_parser(
        "audit", help="play the honest-but-curious server against a run: token recovery, label inference",
        epilog="the server's side learns only from public rows and the frames; --model.* and --data.* overrides "
               "apply as for fit; the trunk must run in this process (model.transport local)")
    audit.add_argument("--config", required=True, action="append", help="the run's config")
    audit.add_argument("--ckpt_path", default=None, help="'last' or a checkpoint file")
    audit.add_argument("--public", default=None, help="public rows for the attacks (default: the validation rows)")
    audit.add_argument("--client_rows", type=int, default=200, help="client training rows attacked")
    audit.add_argument("--public_rows", type=int, default=600, help="public rows the attacks learn from")
    token = commands.add_parser("token", help="add a client with a fresh random token to a tokens file")
    token.add_argument("--tokens", required=True, help="tokens.json to create or extend (mode 600)")
    token.add_argument("--client", required=True, help="the client's name")
    token.add_argument("--out", required=True, help="file to write the client's token to (mode 600)")
    return parser


def client_settings(configs: Sequence[str], overrides: Sequence[str] = (), with_data: bool = False):
    """The ``model`` section of fit configs as a :class:`ClientModule` (nothing loaded), the ``trainer`` dict and
    the ``data`` section: a dict, or an :class:`~splittrain.data.InstructionDataModule` (rows not loaded) when
    ``with_data``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from .modules import ClientModule

    parser = ArgumentParser(prog="splittrain serve")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(ClientModule, "model")
    parser.add_argument("--trainer", type=dict, default={})
    if with_data:
        from .data import InstructionDataModule

        parser.add_class_arguments(InstructionDataModule, "data")
    else:
        parser.add_argument("--data", type=dict, default={})
    words = [w for config in configs for w in ("--config", _sections(config))] + list(overrides)
    config = parser.parse_args(words)
    built = parser.instantiate(config)
    return built.model, dict(config.trainer), built.data if with_data else dict(config.data)


def _sections(config: str) -> str:
    """A fit config file as YAML text with only the sections a client or server is built from: a config that
    ``test`` or ``validate`` saved in a run folder also holds their own arguments (``verbose``, ``weights_only``)."""
    import yaml

    text = Path(config).read_text()
    loaded = yaml.safe_load(text)
    if not isinstance(loaded, dict):
        raise ValueError(f"config {config} is not a YAML mapping")
    return yaml.safe_dump({k: v for k, v in loaded.items() if k in ("model", "trainer", "data")})


def serve_command(configs: Sequence[str], tokens: str, address: str = "127.0.0.1:7000", tls_cert: str | None = None,
                  tls_key: str | None = None, resume: bool = False, save_every: int = 1, run_dir: str | None = None,
                  limits: Any = None, max_connections: int = 64, overrides: Sequence[str] = (),
                  threads: int | None = None) -> None:
    """Serve the trunk that ``configs`` describe on ``address`` until SIGTERM/SIGINT (then save and stop);
    ``limits`` is a :class:`~splittrain.server.ServerLimits`; ``threads`` torch threads compute the trunk."""
    import logging
    import signal

    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)

    from .server import LATEST
    from .transport.tcp import TcpServer, load_tokens, server_tls_context

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both --tls_cert and --tls_key")
    known = load_tokens(tokens)
    tls = server_tls_context(tls_cert, tls_key) if tls_cert else None
    module, trainer, _ = client_settings(configs, overrides)
    run = Path(run_dir or trainer.get("default_root_dir") or "runs/server")
    max_steps = trainer.get("max_steps") or -1
    server = module.build_server(max_steps if max_steps > 0 else None, run, limits, save_every=save_every)
    if resume:
        step = server.resume()
        print(f"splittrain: resumed the trunk at step {step}" if step is not None else
              f"splittrain: no trunk checkpoint in {run / 'trunk'}; starting at step 0", flush=True)
    tcp = TcpServer(server, address, known, tls, max_connections=max_connections,
                    status_file=run / "server_status.json")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: tcp.stop())
    fed = server.federation
    federation = "" if fed is None else (f"; a federation of {fed.clients} clients (average {fed.average}, trunk "
                                         f"update {fed.trunk_update}, round timeout {fed.round_timeout:g} s)")
    print(f"splittrain: trunk server (layers {server.trunk.start}-{server.trunk.stop - 1}) listening on {tcp.address}"
          f"{' with TLS' if tls else ''} for {len(known)} client(s){federation}; checkpoints in {run / 'trunk'}",
          flush=True)
    tcp.serve_forever()
    path = server.save(LATEST)
    print(f"splittrain: trunk server stopped at step {server.steps}; saved {path}", flush=True)


def generate_command(configs: Sequence[str], prompt: str | None = None, prompts: str | None = None,
                     out: str | None = None, ckpt_path: str | None = None, batch_size: int = 16,
                     overrides: Sequence[str] = (), **options: Any) -> list[str]:
    """Answer ``prompt`` (streamed to stdout) or every line of the ``prompts`` .jsonl file with the split model that
    ``configs`` describe, from ``ckpt_path`` (``last``: the run folder's ``checkpoints/last.ckpt``); ``options``
    override the config's ``model.generation``. Writes ``out`` (.jsonl) or prints the answers; returns them."""
    from dataclasses import asdict

    module, data = _load_run(configs, overrides, ckpt_path)
    options = {**asdict(module.generation), **{k: v for k, v in options.items() if v is not None}}
    try:
        if prompt is not None:
            from transformers import TextStreamer

            streamer = TextStreamer(data.tokenizer, skip_prompt=True, skip_special_tokens=True)
            answer = module.generate(prompt, streamer=streamer, **options)
            if out is not None:
                _write_jsonl(out, [{"prompt": prompt, "answer": answer}])
            return [answer]
        rows = _read_prompts(prompts)
        answers = module.generate([r["messages"] for r in rows], batch_size=batch_size, progress=True, **options)
        records = [{**r["source"], "answer": a} for r, a in zip(rows, answers)]
        if out is not None:
            _write_jsonl(out, records)
            print(f"{len(records)} answers -> {out}")
        else:
            for record in records:
                print(json.dumps(record, ensure_ascii=False))
        return answers
    finally:
        module.close()


def estimate_command(configs: Sequence[str], device: str | None = None, as_json: bool = False,
                     overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Print the memory estimate per party of the ``fit`` config(s); returns it."""
    from .estimate import estimate_json, estimate_memory, format_estimate

    module, trainer, data = client_settings(configs, overrides, with_data=False)
    data = {**{"batch_size": 8, "max_length": 512}, **data}
    if device is None:
        device = "cuda" if str(trainer.get("accelerator", "cpu")) in ("gpu", "cuda") else "cpu"
    parties = estimate_memory(module.model_name, module.cuts, int(data["batch_size"]), int(data["max_length"]),
                              module.dtype_name, module.client_mode, module.client_lora.r,
                              module.trunk_settings.lora.r, module.trunk_settings.lora.targets, device)
    if as_json:
        print(estimate_json(parties))
    else:
        print(format_estimate(parties, f"{module.model_name} cut at {list(module.cuts)}, batch {data['batch_size']} "
                                       f"x {data['max_length']} tokens, {module.dtype_name or 'checkpoint'} weights, "
                                       f"client {module.client_mode}, on {device}"))
    return {name: party.as_dict() for name, party in parties.items()}


def _load_run(configs: Sequence[str], overrides: Sequence[str], ckpt_path: str | None) -> tuple[Any, Any]:
    """The client module and data module of a run's config(s), outside a trainer's loop, restored from
    ``ckpt_path`` (``last``: the run folder's ``checkpoints/last.ckpt``) when given."""
    import logging

    import lightning as L

    module, trainer_args, data = client_settings(configs, overrides, with_data=True)
    root = Path(trainer_args.get("default_root_dir") or ".")
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # no trainer banners: this trainer only names the run folder and step count
    try:
        module.trainer = L.Trainer(default_root_dir=root, max_steps=trainer_args.get("max_steps") or -1, logger=False,
                                   enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    finally:
        quiet.setLevel(level)
    module.tokenizer, module.chat_template = data.tokenizer, data.chat_template
    if ckpt_path is not None:
        path = root / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint {path}" + (" (has `fit` run with this config?)"
                                                              if ckpt_path == "last" else ""))
        module.restore(path)
    return module, data


def audit_command(configs: Sequence[str], ckpt_path: str | None = None, public: str | None = None,
                  client_rows: int = 200, public_rows: int = 600, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Play the honest-but-curious server against the run of ``configs`` (see :func:`splittrain.privacy.audit`);
    prints the report and writes audit.json / audit.md in the run folder."""
    from .privacy import AuditSettings, audit

    module, data = _load_run(configs, overrides, ckpt_path)
    try:
        module.configure_model()
        data.setup("fit")
        report = audit(module, data, AuditSettings(public=public, client_rows=client_rows, public_rows=public_rows),
                       module.run_dir)
    finally:
        module.close()
    for key, value in report.items():
        print(f"  {key:<28} {value:.4f}" if isinstance(value, float) else f"  {key:<28} {value}")
    print(f"audit: {module.run_dir / 'audit.md'}")
    return report


def _read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a prompts .jsonl: ``{"prompt": str}`` or ``{"messages": [...]}`` (a trailing assistant turn, e.g. a
    reference answer, is dropped)."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            source = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from error
        if isinstance(source, dict) and isinstance(source.get("prompt"), str):
            messages = [{"role": "user", "content": source["prompt"]}]
        elif isinstance(source, dict) and isinstance(source.get("messages"), list) and source["messages"]:
            messages = list(source["messages"])
            if messages[-1].get("role") == "assistant":
                messages = messages[:-1]
        else:
            raise ValueError(f"{path}:{number}: expected {{\"prompt\": \"...\"}} or {{\"messages\": [...]}}")
        rows.append({"messages": messages, "source": source})
    if not rows:
        raise ValueError(f"{path} holds no prompts")
    return rows


def _write_jsonl(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def token_command(tokens: str | Path, client: str, out: str | Path) -> Path:
    """Add ``client`` with a fresh token to ``tokens`` and write the token alone to ``out`` (both mode 600)."""
    from .transport.tcp import make_token

    tokens, out = Path(tokens), Path(out)
    known = json.loads(tokens.read_text()) if tokens.exists() else {}
    known[client] = token = make_token()
    for path, text in ((tokens, json.dumps(known, indent=2) + "\n"), (out, token + "\n")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text(text)
    print(f"client {client!r} added to {tokens}; its token is in {out} (give it to the client only)")
    return out


def _lightning_cli(args: Sequence[str] | dict[str, Any]):
    from lightning.pytorch.cli import LightningCLI

    from .data import InstructionDataModule
    from .modules import ClientModule, SafetensorsCheckpointIO

    class SplitCLI(LightningCLI):
        """LightningCLI for the client side; after ``fit`` it validates, writes summary.json, shows a sample."""

        def after_fit(self) -> None:
            write_summary(self.trainer, self.model, self.datamodule)

        def after_test(self) -> None:
            if self.model.last_eval is not None and self.trainer.is_global_zero:
                print_eval(self.model.last_eval["metrics"], self.model.run_dir)

        def _run_subcommand(self, subcommand: str) -> None:
            """Under torchrun with ``transport: dist`` rank 0 serves the trunk; the client ends its session."""
            if self.model.transport == "dist" and int(os.environ.get("RANK", "0")) == 0:
                from .transport.dist import serve

                max_steps = self.trainer.max_steps
                serve(self.model.build_server(max_steps if max_steps > 0 else None,
                                              Path(self.trainer.default_root_dir)), self.model.timeout)
                return
            try:
                super()._run_subcommand(subcommand)
            finally:
                self.model.close()

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
    if model.eval_generate:
        tested = trainer.test(model, datamodule=datamodule, verbose=False)[0]
        summary.update({k: v for k, v in tested.items() if k.startswith("test_")})
    name = "summary.json"
    if model.federated.enabled:
        summary["clients"] = model.client_summaries(trainer, datamodule)
        held = model.held_clients()
        if 0 not in held and model.transport != "dist":  # tcp: each client process writes its own figures
            name = f"summary-client{held[0]}.json"
    if trainer.is_global_zero and (not model.federated.enabled or model.transport != "dist" or 0 in model.held_clients()):
        path = model.run_dir / name
        path.write_text(json.dumps(summary, indent=2) + "\n")
        print("\n".join(f"  {k:<20} {v:.4g}" if isinstance(v, float) else f"  {k:<20} {v}"
                        for k, v in summary.items() if not isinstance(v, (list, dict))))
        for name, figures in summary.get("clients", {}).items():
            print(f"  {name:<8} tokens {figures['tokens']:>8}  train loss {figures['train_loss_first']:.4g} -> "
                  f"{figures['train_loss_last']:.4g}  val loss (own shard) {figures['val_loss_own_shard']:.4g}")
        print(f"summary: {path}")
        if model.eval_generate and model.last_eval is not None:
            print_eval(model.last_eval["metrics"], model.run_dir)
        if model.sample_prompt:
            answer = model.generate(model.sample_prompt, max_new_tokens=48)
            print(f"sample  user: {model.sample_prompt}\n   assistant: {answer}")
    return summary


def print_eval(metrics: dict[str, Any], run_dir: Path, shown: int = 5) -> None:
    """The evaluation's scores and its first ``shown`` answers (from ``eval.json`` in ``run_dir``)."""
    print(f"held-out answers ({metrics['rows']} rows): exact match {metrics['exact_match']:.3f}  "
          f"ROUGE-L {metrics['rouge_l']:.3f}  BLEU {metrics['bleu']:.3f}   ({run_dir / 'eval.md'})")
    path = run_dir / "eval.json"
    for row in (json.loads(path.read_text())["rows"][:shown] if path.is_file() else []):
        print(f"  {'ok  ' if row['exact'] else 'MISS'} {row['prompt']!r} -> {row['generated']!r}"
              + ("" if row["exact"] else f" (expected {row['reference']!r})"))


def main(args: Sequence[str] | dict[str, Any] | None = None) -> Any:
    """Entry point; ``args`` is a list of command-line words or a dict (default: ``sys.argv[1:]``)."""
    import sys

    words = sys.argv[1:] if args is None else args
    command = next(iter(words)) if isinstance(words, dict) else (words[0] if words else None)
    if command in LIGHTNING_COMMANDS or isinstance(words, dict):
        return _lightning_cli(args)  # None: LightningCLI reads sys.argv itself
    ns, overrides = _tools_parser().parse_known_args(list(words))
    allowed = {"serve": ("--model.",), "generate": ("--model.", "--data."),
               "estimate": ("--model.", "--data."), "audit": ("--model.", "--data.")}.get(ns.command, ())
    if overrides and not (allowed and all(w.startswith(allowed) for w in overrides[::2])):
        _tools_parser().parse_args(list(words))  # reports the unknown arguments and exits
    if ns.command == "split":
        return split_command(ns.model, ns.cuts, ns.out, dtype=ns.dtype, family=ns.family, revision=ns.revision,
                             max_shard_size=ns.max_shard_size, verbose=not ns.quiet)
    if ns.command == "serve":
        from .server import ServerLimits

        limits = ServerLimits(max_graphs=ns.max_graphs, max_graph_bytes=ns.max_graph_bytes,
                              max_graph_age=ns.max_graph_age, max_batch=ns.max_batch, max_seq=ns.max_seq,
                              max_frame_bytes=ns.max_frame_bytes, session_timeout=ns.session_timeout,
                              max_generations=ns.max_generations, max_generation_bytes=ns.max_generation_bytes,
                              generation_timeout=ns.generation_timeout, max_unacknowledged=ns.max_unacknowledged)
        return serve_command(ns.config, ns.tokens, ns.address, ns.tls_cert, ns.tls_key, ns.resume, ns.save_every,
                             ns.run_dir, limits, ns.max_connections, overrides, ns.threads)
    if ns.command == "token":
        return token_command(ns.tokens, ns.client, ns.out)
    if ns.command == "audit":
        return audit_command(ns.config, ns.ckpt_path, ns.public, ns.client_rows, ns.public_rows, overrides)
    if ns.command == "estimate":
        return estimate_command(ns.config, ns.device, ns.json, overrides)
    if ns.command == "generate":
        options = {k: getattr(ns, k) for k in ("max_new_tokens", "min_new_tokens", "do_sample", "temperature",
                                                "top_k", "top_p", "repetition_penalty", "stop_strings",
                                                "eos_token_id", "seed")}
        return generate_command(ns.config, ns.prompt, ns.prompts, ns.out, ns.ckpt_path, ns.batch_size, overrides,
                                **options)
    if ns.command == "export":
        from .lora import export_run

        out = export_run(ns.run, ns.out, ns.ckpt)
        print(f"exported {ns.run} -> {out}")
        return out
