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

On the command line a user's mistake (a bad setting, a missing or malformed file, a bad token file, an address in
use, a corrupt checkpoint, a refusal by the trunk server) prints one line, ``splittrain: error: ...``, on stderr and
exits with status 2, having changed nothing in the run folder; ``--debug`` (or ``SPLITTRAIN_DEBUG=1``) shows the
traceback instead. Anything else is a bug and keeps its traceback. Called with arguments (a notebook, a test),
:func:`main` raises the exceptions instead.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, Sequence

from .errors import UserError

LIGHTNING_COMMANDS = ("fit", "validate", "test")
DEBUG_ENV = "SPLITTRAIN_DEBUG"
"""Set to 1 to see the traceback of a user's mistake (as ``--debug`` does)."""


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


class _Parser(argparse.ArgumentParser):
    """argparse that raises a mistake as a :class:`UserError` (printed as one line) instead of printing its usage."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("splittrain").strip()
        raise UserError(f"{command + ': ' if command else ''}{message} (see `python -m {self.prog} --help`)")


def _tools_parser() -> argparse.ArgumentParser:
    from .server import ServerLimits
    from .transport.tcp import HANDSHAKE_TIMEOUT

    parser = _Parser(prog="splittrain", description="Split-learning fine-tuning of decoder LLMs.",
                     epilog="python -m splittrain fit --help lists every training setting; --debug (anywhere, or "
                            f"{DEBUG_ENV}=1) shows the traceback of an error")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
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
        epilog="--model.* overrides are applied to the config as for fit (e.g. --model.cuts '[2, 4]'), and "
               "--trainer.max_steps N (the steps a federation's trunk schedule spans; independent clients bring "
               "their own)")
    serve.add_argument("--config", required=True, action="append", help="the run's config (its model section)")
    serve.add_argument("--address", default="127.0.0.1:7000", help="HOST:PORT to listen on (port 0: any free)")
    serve.add_argument("--tokens", required=True, help="tokens.json: client name -> token (see `token`)")
    serve.add_argument("--tls_cert", default=None, help="TLS certificate (PEM); required off a private network")
    serve.add_argument("--tls_key", default=None, help="TLS private key (PEM)")
    serve.add_argument("--resume", action="store_true", help="restore the newest trunk checkpoint of the run folder")
    serve.add_argument("--save_every", type=int, default=1,
                       help="save each client's trunk/<client>/latest.safetensors every N of its steps (a restarted "
                            "server loses no step)")
    serve.add_argument("--run_dir", default=None, help="checkpoints and server_status.json (default: the "
                       "config's trainer.default_root_dir)")
    limits = ServerLimits()
    serve.add_argument("--session_timeout", type=float, default=limits.session_timeout,
                       help="seconds a disconnected client's session waits for it to reconnect")
    serve.add_argument("--max_connections", type=int, default=64, help="authenticated connections served at once")
    serve.add_argument("--handshake_timeout", type=float, default=HANDSHAKE_TIMEOUT,
                       help="seconds a connection has to authenticate (TLS included)")
    serve.add_argument("--max_handshakes", type=int, default=64, help="connections authenticating at once (past "
                       "it, a new connection takes the place of the oldest)")
    serve.add_argument("--max_handshakes_per_address", type=int, default=8,
                       help="connections authenticating at once from one address")
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
    generate.add_argument("--force_load", action="store_true",
                          help="restore --ckpt_path's trunk on a server even while other clients of its federation "
                               "train it (it goes back for them too; refused without this flag)")
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
    from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

    from .modules import ClientModule

    parser = ArgumentParser(prog="splittrain", exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(ClientModule, "model")
    parser.add_argument("--trainer", type=dict, default={})
    if with_data:
        from .data import InstructionDataModule

        parser.add_class_arguments(InstructionDataModule, "data")
    else:
        parser.add_argument("--data", type=dict, default={})
    words = [w for config in configs for w in ("--config", _sections(config))] + list(overrides)
    try:
        config = parser.parse_args(words)
    except ArgumentError as error:
        raise UserError(argument_error_message(str(error))) from error
    with _settings_errors():
        built = parser.instantiate(config)
    return built.model, dict(config.trainer), built.data if with_data else dict(config.data)


@contextmanager
def _settings_errors() -> Iterator[None]:
    """Turns what building classes from a config raises on a bad value (``ValueError``, a missing file or hub id,
    Lightning's ``MisconfigurationException``) into a :class:`UserError`: building them reads nothing else."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        if isinstance(error, (ValueError, OSError)) or type(error).__name__ == "MisconfigurationException":
            raise UserError(f"bad setting: {_one_line(error)}") from error
        raise


def _sections(config: str) -> str:
    """A fit config file as YAML text with only the sections a client or server is built from: a config that
    ``test`` or ``validate`` saved in a run folder also holds their own arguments (``verbose``, ``weights_only``)."""
    import yaml

    try:
        text = Path(config).read_text()
    except OSError as error:
        raise UserError(f"--config {config}: {error.strerror or error}") from error
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UserError(f"config {config} is not valid YAML: {_one_line(error)}") from error
    if not isinstance(loaded, dict):
        raise UserError(f"config {config} is not a YAML mapping")
    return yaml.safe_dump({k: v for k, v in loaded.items() if k in ("model", "trainer", "data")})


def serve_command(configs: Sequence[str], tokens: str, address: str = "127.0.0.1:7000", tls_cert: str | None = None,
                  tls_key: str | None = None, resume: bool = False, save_every: int = 1, run_dir: str | None = None,
                  limits: Any = None, max_connections: int = 64, overrides: Sequence[str] = (),
                  threads: int | None = None, handshakes: dict[str, Any] | None = None) -> None:
    """Serve the trunk that ``configs`` describe on ``address`` until SIGTERM/SIGINT (then save and stop);
    ``limits`` is a :class:`~splittrain.server.ServerLimits`; ``threads`` torch threads compute the trunk;
    ``handshakes``: :class:`~splittrain.transport.tcp.TcpServer`'s handshake limits."""
    import logging
    import signal

    import torch

    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)

    from .server import LATEST
    from .transport.tcp import TcpServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    # Everything the user gave is checked before the model loads (seconds to minutes): files, then the address.
    known, tls = _serve_credentials(tokens, tls_cert, tls_key)
    check_address(address)
    module, trainer, _ = client_settings(configs, overrides)
    run = Path(run_dir or trainer.get("default_root_dir") or "runs/server")
    max_steps = trainer.get("max_steps") or -1
    check_model(module)
    server = module.build_server(max_steps if max_steps > 0 else None, run, limits, save_every=save_every)
    if resume:
        resumed = server.resume()
        for owner, step in resumed.items():
            print(f"splittrain: resumed the trunk adapter of {owner!r} at step {step} (when it connects)", flush=True)
        if not resumed:
            print(f"splittrain: no trunk checkpoint in {run / 'trunk'}; starting at step 0", flush=True)
    try:
        tcp = TcpServer(server, address, known, tls, max_connections=max_connections,
                        status_file=run / "server_status.json", **(handshakes or {}))
    except OSError as error:  # taken while the model loaded
        raise UserError(f"--address {address}: {_bind_problem(error)}") from error
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: tcp.stop())
    fed = server.federation
    federation = "" if fed is None else (f"; a federation of {fed.clients} clients (average {fed.average}, trunk "
                                         f"update {fed.trunk_update}, round timeout {fed.round_timeout:g} s)")
    print(f"splittrain: trunk server (layers {server.trunk.start}-{server.trunk.stop - 1}) listening on {tcp.address}"
          f"{' with TLS' if tls else ''} for {len(known)} client(s){federation}; checkpoints in {run / 'trunk'}",
          flush=True)
    tcp.serve_forever()
    paths = server.save_all(LATEST)
    steps = ", ".join(f"{owner!r} at step {adapter.steps}" for owner, adapter in server.adapters.items())
    print(f"splittrain: trunk server stopped ({steps or 'no client trained'}); saved "
          f"{', '.join(map(str, paths)) or 'nothing'}", flush=True)


def _serve_credentials(tokens: str, tls_cert: str | None, tls_key: str | None) -> tuple[dict[str, str], Any]:
    """The tokens file's clients and the TLS context, or a :class:`UserError` saying what is wrong with the files."""
    import ssl

    from .transport.tcp import load_tokens, server_tls_context

    if (tls_cert is None) != (tls_key is None):
        raise UserError("TLS needs both --tls_cert and --tls_key")
    try:
        known = load_tokens(tokens)
    except (OSError, ValueError) as error:  # missing, unreadable, not JSON, bad names, short tokens
        raise UserError(f"--tokens {tokens}: {_one_line(error)}" if str(tokens) not in str(error)
                        else _one_line(error)) from error
    tls = None
    if tls_cert is not None:
        for option, path in (("--tls_cert", tls_cert), ("--tls_key", tls_key)):
            if not Path(path).is_file():
                raise UserError(f"{option} {path}: no such file")
        try:
            tls = server_tls_context(tls_cert, tls_key)
        except (ssl.SSLError, OSError) as error:
            raise UserError(f"--tls_cert {tls_cert} / --tls_key {tls_key}: not a PEM certificate and its private "
                            f"key ({getattr(error, 'reason', None) or _one_line(error)})") from error
    return known, tls


def check_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` that this machine can listen on now: parsed, the host resolved, a socket bound to it and closed
    again (as :class:`~splittrain.transport.tcp.TcpServer` binds it). Raises :class:`UserError` saying what is
    wrong (a bad form, an unknown host, an address of another machine, a port in use or reserved)."""
    import socket

    from .transport.tcp import parse_address

    try:
        host, port = parse_address(address)
    except ValueError as error:
        raise UserError(f"--address: {error}") from error
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise UserError(f"--address {address}: cannot resolve the host {host!r} ({error.strerror})") from error
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as error:
        raise UserError(f"--address {address}: {_bind_problem(error)}") from error
    finally:
        probe.close()
    return host, port


def _bind_problem(error: OSError) -> str:
    import socket

    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host ({error.strerror})"
    return {errno.EADDRINUSE: "the port is in use (another server? pick another port, or port 0 for any free one)",
            errno.EADDRNOTAVAIL: "not an address of this machine (listen on one of its own, e.g. 0.0.0.0 for all)",
            errno.EACCES: "permission denied (ports below 1024 need privileges)"}.get(
        error.errno, error.strerror or str(error))


def generate_command(configs: Sequence[str], prompt: str | None = None, prompts: str | None = None,
                     out: str | None = None, ckpt_path: str | None = None, batch_size: int = 16,
                     overrides: Sequence[str] = (), force_load: bool = False, **options: Any) -> list[str]:
    """Answer ``prompt`` (streamed to stdout) or every line of the ``prompts`` .jsonl file with the split model that
    ``configs`` describe, from ``ckpt_path`` (``last``: the run folder's ``checkpoints/last.ckpt``); ``options``
    override the config's ``model.generation``. Writes ``out`` (.jsonl) or prints the answers; returns them."""
    from dataclasses import asdict

    rows = _read_prompts(prompts) if prompt is None else None  # a bad prompts file fails before the model loads
    module, data = _load_run(configs, overrides, ckpt_path, force_load)
    options = {**asdict(module.generation), **{k: v for k, v in options.items() if v is not None}}
    try:
        if prompt is not None:
            from transformers import TextStreamer

            streamer = TextStreamer(data.tokenizer, skip_prompt=True, skip_special_tokens=True)
            answer = module.generate(prompt, streamer=streamer, **options)
            if out is not None:
                _write_jsonl(out, [{"prompt": prompt, "answer": answer}])
            return [answer]
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
    trunk = module.trunk_settings
    parties = estimate_memory(module.model_name, module.cuts, int(data["batch_size"]), int(data["max_length"]),
                              module.dtype_name, module.client_mode, module.client_lora.r, trunk.lora.r,
                              trunk.lora.targets, device, loss_chunk=module.loss_chunk,
                              quantization=module.quantization, trunk_quantization=trunk.quantization,
                              gradient_checkpointing=module.gradient_checkpointing,
                              trunk_gradient_checkpointing=trunk.gradient_checkpointing)
    if as_json:
        print(estimate_json(parties))
    else:
        weights = module.dtype_name or "checkpoint"
        client = (f"client {module.client_mode} ({module.quantization or weights} weights, checkpointing "
                  f"{'on' if module.gradient_checkpointing else 'off'}, "
                  f"{f'loss chunks of {module.loss_chunk}' if module.loss_chunk > 0 else 'whole logits'})")
        server = (f"server ({trunk.quantization or weights} weights, checkpointing "
                  f"{'on' if trunk.gradient_checkpointing else 'off'})")
        print(format_estimate(parties, f"{module.model_name} cut at {list(module.cuts)}, batch {data['batch_size']} "
                                       f"x {data['max_length']} tokens, {client}, {server}, on {device}"))
    return {name: party.as_dict() for name, party in parties.items()}


def _load_run(configs: Sequence[str], overrides: Sequence[str], ckpt_path: str | None,
              force_load: bool = False) -> tuple[Any, Any]:
    """The client module and data module of a run's config(s), outside a trainer's loop, restored from
    ``ckpt_path`` (``last``: the run folder's ``checkpoints/last.ckpt``) when given (``force_load``: even while
    other clients of a federation train the server's trunk)."""
    import logging

    import lightning as L

    module, trainer_args, data = client_settings(configs, overrides, with_data=True)
    if module.transport == "dist":
        raise UserError("model.transport dist needs torchrun's processes, one of them serving the trunk; generate and "
                        "audit run in one process: use --model.transport local (the trunk here) or tcp (against a "
                        "`serve` of the run's trunk)")
    root = Path(trainer_args.get("default_root_dir") or ".")
    check_model(module)
    path = None
    if ckpt_path is not None:  # checked before the model loads
        path = root / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
        if not path.is_file():
            raise UserError(f"--ckpt_path {ckpt_path}: no checkpoint {path}" + (
                " (has `fit` run with this config?)" if ckpt_path == "last" else ""))
        check_checkpoint(path, root if module.transport == "local" else None)
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # no trainer banners: this trainer only names the run folder and step count
    try:
        module.trainer = L.Trainer(default_root_dir=root, max_steps=trainer_args.get("max_steps") or -1, logger=False,
                                   enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    finally:
        quiet.setLevel(level)
    module.tokenizer, module.chat_template = data.tokenizer, data.chat_template
    if path is not None:
        module.restore(path, force_trunk=force_load)
    return module, data


def check_model(module: Any) -> None:
    """Check a :class:`~splittrain.modules.ClientModule`'s model settings against the model's config alone (no
    weights load): the model is there and of a known family (``model.recipe``'s, if given), its cuts leave every
    part a layer, its device map names its parts. Raises :class:`UserError` saying which setting is wrong."""
    from .families import get_family
    from .loading import Checkpoint, part_ranges, resolve_device_map
    from .quickstart import resolve_model

    try:
        checkpoint = Checkpoint(resolve_model(module.model_name))
        family = get_family(checkpoint.text_config.model_type)
    except (OSError, ValueError) as error:
        raise UserError(f"model.model {module.model_name!r}: {_one_line(error)}") from error
    recipe = getattr(module, "recipe", None)
    if recipe is not None and family.name != recipe.name:
        raise UserError(f"model.recipe is {recipe.name!r} but {module.model_name} is a {family.name!r} model: name its "
                        "own family's recipe, or none")
    try:
        ranges = part_ranges(checkpoint.text_config.num_hidden_layers, module.cuts)
    except (TypeError, ValueError) as error:
        raise UserError(f"model.cuts {list(module.cuts)}: {_one_line(error)}") from error
    try:
        resolve_device_map(list(ranges), device_map=module.device_map)
    except (RuntimeError, ValueError) as error:
        raise UserError(f"model.device_map: {_one_line(error)}") from error


def check_checkpoint(path: str | Path, run_dir: str | Path | None = None) -> None:
    """Check a client checkpoint of ``fit`` before anything loads: its header and structure (not its tensors) and,
    with the trunk in this process (``run_dir``, the run folder), the trunk checkpoints of the step it names that
    are there. Raises :class:`UserError` naming a missing, truncated or corrupt file."""
    from .state import check_state

    tag = check_state(path).get("trunk_checkpoint")
    if run_dir is not None and isinstance(tag, str) and re.fullmatch(r"[0-9A-Za-z_.-]{1,64}", tag):
        for trunk in sorted((Path(run_dir) / "trunk").rglob(f"{tag}.safetensors")):
            check_state(trunk)


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
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--prompts {path}: {getattr(error, 'strerror', None) or _one_line(error)}") from error
    for number, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            source = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from error
        if isinstance(source, dict) and isinstance(source.get("prompt"), str):
            messages = [{"role": "user", "content": source["prompt"]}]
        elif isinstance(source, dict) and isinstance(source.get("messages"), list) and source["messages"]:
            messages = list(source["messages"])
            if messages[-1].get("role") == "assistant":
                messages = messages[:-1]
        else:
            raise UserError(f"{path}:{number}: expected {{\"prompt\": \"...\"}} or {{\"messages\": [...]}}")
        rows.append({"messages": messages, "source": source})
    if not rows:
        raise UserError(f"{path} holds no prompts")
    return rows


def _write_jsonl(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def token_command(tokens: str | Path, client: str, out: str | Path) -> Path:
    """Add ``client`` with a fresh token to ``tokens`` and write the token alone to ``out`` (both mode 600)."""
    from .transport.tcp import make_token

    tokens, out = Path(tokens), Path(out)
    known = {}
    if tokens.exists():
        try:
            known = json.loads(tokens.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"--tokens {tokens} cannot be extended: {_one_line(error)}") from error
        if not isinstance(known, dict):
            raise UserError(f"--tokens {tokens} must map client names to tokens: {{\"client0\": \"<token>\"}}")
    known[client] = token = make_token()
    for path, text in ((tokens, json.dumps(known, indent=2) + "\n"), (out, token + "\n")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text(text)
    print(f"client {client!r} added to {tokens}; its token is in {out} (give it to the client only)")
    return out


def _lightning_cli(args: Sequence[str] | dict[str, Any] | None, command_line: bool = False):
    """``fit``/``validate``/``test``. On the ``command_line`` a bad argument raises jsonargparse's ``ArgumentError``
    (printed as one line by :func:`main`) instead of printing the usage, and Lightning's info lines go to stdout, so
    that stderr holds only warnings and errors."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from .data import InstructionDataModule
    from .modules import ClientModule, SafetensorsCheckpointIO

    if command_line:
        _lightning_info_to_stdout()

    class SaveConfigOnceStarted(SaveConfigCallback):
        """Writes the run's resolved ``config.yaml`` once the run has started (data read, model built, checkpoint
        restored: at the first of the sanity check, training, validation or test), not at ``setup`` as Lightning
        does: a run that stops on a bad input leaves the run folder as it was."""

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            pass

        def _save_now(self, trainer: Any, pl_module: Any) -> None:
            if not self.already_saved:
                super().setup(trainer, pl_module, str(getattr(trainer.state.fn, "value", trainer.state.fn)))

        def on_sanity_check_start(self, trainer: Any, pl_module: Any) -> None:
            self._save_now(trainer, pl_module)

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self._save_now(trainer, pl_module)

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            self._save_now(trainer, pl_module)

        def on_test_start(self, trainer: Any, pl_module: Any) -> None:
            self._save_now(trainer, pl_module)

    class SplitCLI(LightningCLI):
        """LightningCLI for the client side; after ``fit`` it validates, writes summary.json, shows a sample."""

        def instantiate_classes(self) -> None:
            with _settings_errors():  # a bad value that only the class itself checks (e.g. model.pipeline -1)
                super().instantiate_classes()

        def after_fit(self) -> None:
            write_summary(self.trainer, self.model, self.datamodule)

        def after_test(self) -> None:
            if self.model.last_eval is not None and self.trainer.is_global_zero:
                print_eval(self.model.last_eval["metrics"], self.model.run_dir)

        def _run_subcommand(self, subcommand: str) -> None:
            """Under torchrun with ``transport: dist`` rank 0 serves the trunk; the client ends its session."""
            check_model(self.model)  # the inputs, before the data and the model load
            if self.model.transport == "dist" and int(os.environ.get("RANK", "0")) == 0:
                from .transport.dist import serve

                max_steps = self.trainer.max_steps
                serve(self.model.build_server(max_steps if max_steps > 0 else None,
                                              Path(self.trainer.default_root_dir)), self.model.timeout)
                return
            try:
                self._check_ckpt_path(subcommand)
                super()._run_subcommand(subcommand)
            finally:
                self.model.close()

        def _check_ckpt_path(self, subcommand: str) -> None:
            """A ``--ckpt_path`` file (``last``: the run folder's) that cannot be restored is refused before the
            data and the model load; ``validate``/``test`` with ``last`` and no checkpoint too (they would run the
            untrained model). ``fit`` with ``last`` and none starts afresh, as Lightning does."""
            ckpt_path = self._get(self.config_init, "ckpt_path")
            if ckpt_path in (None, "best", "hpc") or str(ckpt_path).startswith("registry"):
                return
            root = Path(self.trainer.default_root_dir)
            local_trunk = root if self.model.transport == "local" and not self.trainer.loggers else None
            if ckpt_path == "last":
                folders = [Path(c.dirpath) if c.dirpath else root / "checkpoints"
                           for c in self.trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
                found = [f / "last.ckpt" for f in folders or [root / "checkpoints"] if (f / "last.ckpt").exists()]
                if not found and subcommand != "fit":
                    raise UserError(f"--ckpt_path last: no checkpoint {root / 'checkpoints' / 'last.ckpt'} (has `fit` "
                                    "run with this config?)")
                for path in found:
                    check_checkpoint(path, local_trunk)
                return
            if not Path(ckpt_path).is_file():
                raise UserError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
            check_checkpoint(ckpt_path, local_trunk)

        def _parse_ckpt_path(self) -> None:
            """LightningCLI would torch.load a checkpoint file to read hyper-parameters from it; ours are
            safetensors and hold none (the run's config is its --config), so there is nothing to read."""

    return SplitCLI(
        ClientModule,
        InstructionDataModule,
        args=args,
        save_config_callback=SaveConfigOnceStarted,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False} if command_line else None,
        auto_configure_optimizers=False,  # each party builds its own AdamW from model.optim / model.trunk
        trainer_defaults={"plugins": [{"class_path": f"{SafetensorsCheckpointIO.__module__}.SafetensorsCheckpointIO"}],
                          "logger": False},
    )


def _lightning_info_to_stdout() -> None:
    """Lightning's loggers write info lines ("Seed set to 0", "GPU available: ...") to stderr: send the lines below
    WARNING to stdout, so that a mistake's one line is all stderr shows."""
    import logging

    class Stdout(logging.StreamHandler):
        """Writes to the ``sys.stdout`` of the moment (a notebook's or a test's capture included)."""

        @property
        def stream(self) -> Any:
            return sys.stdout

        @stream.setter
        def stream(self, value: Any) -> None:
            pass

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        if any(isinstance(h, Stdout) or type(h).__name__ == "Stdout" for h in logger.handlers):
            continue  # done before in this process
        for handler in list(logger.handlers):
            if type(handler) is not logging.StreamHandler or handler.stream in (sys.stdout, sys.__stdout__):
                continue
            handler.addFilter(lambda record: record.levelno >= logging.WARNING)
            info = Stdout()
            info.setLevel(handler.level)
            info.setFormatter(handler.formatter)
            info.addFilter(lambda record: record.levelno < logging.WARNING)
            logger.addHandler(info)


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
    """Entry point; ``args`` is a list of command-line words or a dict (default: ``sys.argv[1:]``).

    Without ``args`` (the command line: ``python -m splittrain``, the ``splittrain`` script) a user's mistake prints
    one line, ``splittrain: error: ...``, on stderr and exits with status 2 (see :func:`user_error_message`);
    ``--debug`` anywhere on the line, or ``SPLITTRAIN_DEBUG=1``, shows the traceback instead. Returns None there (the
    script's exit status is 0). With ``args`` (a notebook, a test) exceptions propagate and the result is returned
    (the LightningCLI object for fit/validate/test)."""
    if args is not None:
        return _run(args)
    words = sys.argv[1:]
    debug = "--debug" in words or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    words = [w for w in words if w != "--debug"]
    sys.argv[1:] = words  # LightningCLI reads them there
    try:
        _run(words, command_line=True)
    except Exception as error:
        message = None if debug else user_error_message(error)
        if message is None:
            raise
        sys.stdout.flush()
        print(f"splittrain: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return None


def user_error_message(error: BaseException) -> str | None:
    """One line for an exception that reports a user's mistake, or None for a bug (which keeps its traceback).

    Mistakes: :class:`~splittrain.errors.UserError` (also as the cause of another exception); a missing, unreadable
    or misplaced file (``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError``, ``NotADirectoryError``);
    an address in use or not this machine's, an unknown host, a server that cannot be reached; a refusal by the
    trunk server (:class:`~splittrain.transport.RemoteError`, :class:`~splittrain.transport.tcp.HandshakeError`);
    a command-line argument that does not parse (jsonargparse's ``ArgumentError``)."""
    import socket

    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, UserError):
            return _one_line(cause)
        cause = cause.__cause__
    transport = sys.modules.get("splittrain.transport")  # never imported: it cannot have raised
    if transport is not None and isinstance(error, transport.RemoteError):
        return _one_line(error)
    jsonargparse = sys.modules.get("jsonargparse")
    if jsonargparse is not None and isinstance(error, jsonargparse.ArgumentError):
        return argument_error_message(str(error))
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        if error.filename is not None and error.strerror:
            return f"{error.strerror}: {error.filename}"
        return _one_line(error)
    if isinstance(error, socket.gaierror):
        return f"cannot resolve a host name ({error.strerror})"
    if isinstance(error, OSError) and error.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
        return f"cannot listen there: {_bind_problem(error)}"
    if isinstance(error, ConnectionError):  # the trunk server could not be reached, or was lost for good
        return _one_line(error)
    return None


def argument_error_message(message: str) -> str:
    """jsonargparse's error for a bad argument (several indented lines) as one line, e.g.
    ``--model.client: expected one of frozen, lora, full; got 'half'``."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return "bad arguments (see --help)"
    key = re.match(r'Parser key "([^"]+)":\s*(.*)$', lines[0])
    rest = ([key.group(2)] if key and key.group(2) else []) + lines[1:] if key else lines
    expected = [m.group(1) for line in rest for m in [re.match(r"(?:- )?Expected an? (.+?)(?:\. Got value: .*)?$",
                                                               line)] if m]
    got = next((m.group(1) for line in rest for m in [re.search(r"(?:Got value|Given value): (.*)$", line)] if m),
               None)

    def plain(kind: str) -> str:
        literal = re.fullmatch(r"typing\.Literal\[(.*)\]", kind)
        if literal:
            return "one of " + ", ".join(v.strip().strip("'\"") for v in literal.group(1).split(","))
        return {"<class 'NoneType'>": "null"}.get(kind, re.sub(r"<class '([\w.]+)'>", r"\1", kind))

    where = f"--{key.group(1)}" if key else None
    if expected and got is not None:
        text = f"expected {' or '.join(dict.fromkeys(plain(k) for k in expected))}; got {got!r}"
    else:
        text = " ".join(line for line in rest if not line.startswith(("Subtypes:", "Errors:", "Given value type:")))
    return (f"{where}: {text}" if where else text) + " (see --help)"


def _one_line(error: BaseException | str) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(error).__name__


def _run(args: Sequence[str] | dict[str, Any], command_line: bool = False) -> Any:
    words = args
    command = next(iter(words)) if isinstance(words, dict) else (words[0] if words else None)
    if command in LIGHTNING_COMMANDS or isinstance(words, dict):
        return _lightning_cli(None if command_line else args, command_line)  # None: LightningCLI reads sys.argv
    ns, overrides = _tools_parser().parse_known_args(list(words))
    allowed = {"serve": ("--model.", "--trainer.max_steps"), "generate": ("--model.", "--data."),
               "estimate": ("--model.", "--data."), "audit": ("--model.", "--data.")}.get(ns.command, ())
    if overrides and not (allowed and all(w.startswith(allowed) for w in overrides[::2])):
        takes = f"; it takes {' and '.join(a + '* overrides' for a in allowed)} besides its options" if allowed else ""
        raise UserError(f"{ns.command}: unrecognized arguments: {' '.join(overrides)}{takes} (see `python -m "
                        f"splittrain {ns.command} --help`)")
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
                             ns.run_dir, limits, ns.max_connections, overrides, ns.threads,
                             {"handshake_timeout": ns.handshake_timeout, "max_handshakes": ns.max_handshakes,
                              "max_handshakes_per_address": ns.max_handshakes_per_address})
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
                                ns.force_load, **options)
    if ns.command == "export":
        from .lora import export_run

        out = export_run(ns.run, ns.out, ns.ckpt)
        print(f"exported {ns.run} -> {out}")
        return out
