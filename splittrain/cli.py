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
import dataclasses
import errno
import functools
import inspect
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Sequence

from .errors import UserError

LIGHTNING_COMMANDS = {"fit": "train split (LightningCLI: --config, --print_config, dotted overrides)",
                      "validate": "validate a model or checkpoint", "test": "test a model or checkpoint"}
"""The commands LightningCLI parses and runs (:func:`_lightning_cli`), with their help."""
DEBUG_ENV = "SPLITTRAIN_DEBUG"
REPLICA_GRACE_SECONDS = 3.0
"""How long a trunk replica that lost another one goes on refusing its clients' requests with why, before it stops."""
"""Set to 1 to see the traceback of a user's mistake (as ``--debug`` does)."""


# ================================================================================= options from dataclasses
@dataclass
class Options:
    """Command-line options made from the fields of a dataclass, or from the parameters of a callable (help from
    its ``Args:``), with their names, types, defaults and help: a flag for a ``bool``, a repeatable option for a
    list (one option followed by its values where the field's metadata says ``nargs``)."""

    source: Callable[..., Any]
    only: tuple[str, ...] = ()
    """The fields offered (default: every one)."""
    skip: tuple[str, ...] = ()
    """Fields left at their defaults."""
    flags: dict[str, str] = field(default_factory=dict)
    """An option's spelling where it is not its field's name (``stop`` for ``stop_strings``)."""
    one_of: tuple[str, ...] = ()
    """Options of which exactly one must be given."""
    overrides: bool = False
    """Every option defaults to None and :meth:`value` is a dict of those given (they override a config's)."""
    help: dict[str, str] = field(default_factory=dict)
    """Help of a field whose source does not document it."""

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        """Add the options to ``parser``."""
        group = parser.add_mutually_exclusive_group(required=True) if self.one_of else None
        docs = _field_docs(self.source)
        for name, (kind, default, metadata) in self._fields().items():
            help_ = self.help.get(name, docs.get(name))
            kwargs = _argument(name, kind, None if self.overrides else default, help_, metadata)
            target = group if group is not None and name in self.one_of else parser
            target.add_argument(f"--{self.flags.get(name, name)}", **kwargs)

    def value(self, ns: argparse.Namespace) -> Any:
        """The source's instance from the options parsed into ``ns`` (a dict of keyword arguments for a callable,
        or of the options given when they are ``overrides``)."""
        given = {name: getattr(ns, name) for name in self._fields() if getattr(ns, name) is not None}
        return self.source(**given) if dataclasses.is_dataclass(self.source) and not self.overrides else given

    def _fields(self) -> dict[str, tuple[Any, Any, Mapping[str, Any]]]:
        """The offered fields: type, default (``REQUIRED`` when it has none) and metadata, by name."""
        fields = _parameters(self.source)
        return {name: spec for name, spec in fields.items()
                if (not self.only or name in self.only) and name not in self.skip}


REQUIRED = inspect.Parameter.empty
"""The default of a field that has none."""


def _parameters(source: Callable[..., Any]) -> dict[str, tuple[Any, Any, Mapping[str, Any]]]:
    """A dataclass's fields, or a callable's parameters: type, default and metadata, by name."""
    import typing

    if dataclasses.is_dataclass(source):
        hints = typing.get_type_hints(source)
        return {f.name: (hints[f.name], _field_default(f), f.metadata) for f in dataclasses.fields(source) if f.init}
    hints = typing.get_type_hints(source.__init__ if isinstance(source, type) else source)
    return {p.name: (hints.get(p.name, str), p.default, {}) for p in inspect.signature(source).parameters.values()}


def _field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default (its factory's product), or ``REQUIRED``."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else REQUIRED


def _field_docs(source: Callable[..., Any]) -> dict[str, str]:
    """Help for a dataclass's fields (their attribute docstrings) or a callable's parameters (its ``Args:``), as
    plain text: reST markup dropped, one line, a lower-case start and no final period, as argparse's own help."""
    import docstring_parser

    docs = {}
    for param in docstring_parser.parse_from_object(source).params:
        text = re.sub(r":\w+:`~?(?:[\w.]*\.)?([^`]+)`", r"\1", param.description or "").replace("``", "")
        text = " ".join(text.split()).rstrip(".")
        if text[:1].isupper() and text[1:2].islower():
            text = text[0].lower() + text[1:]
        docs[param.arg_name] = text.replace("%", "%%")
    return docs


def _argument(name: str, kind: Any, default: Any, help_: str | None, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """argparse's ``add_argument`` keywords for a field of type ``kind``."""
    import types
    import typing

    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    kwargs: dict[str, Any] = {"dest": name, "help": help_}
    if default is REQUIRED:
        kwargs["required"] = True
    if kind is bool:
        return {**kwargs, "action": "store_true", "default": False if default is REQUIRED else default}
    if typing.get_origin(kind) is list:
        kind = typing.get_args(kind)[0]
        if "nargs" in metadata:
            kwargs["nargs"] = metadata["nargs"]
        else:  # repeated; None for no value: argparse would append to a default list
            kwargs.update(action="append", help=f"{help_} (repeatable)" if help_ else "repeatable")
            default = None
    if default is not REQUIRED:
        kwargs["default"] = default
    return {**kwargs, "type": kind}


@dataclass
class Command:
    """A command besides LightningCLI's: its function, called with one value per :class:`Options` (and, when it
    takes them, the config overrides), its help and its options."""

    run: Callable[..., Any]
    help: str
    options: tuple[Options, ...]
    epilog: str | None = None
    overrides: tuple[str, ...] = ()
    """Prefixes of the config overrides it takes besides its options (``--model.``)."""

    def __call__(self, ns: argparse.Namespace, overrides: Sequence[str]) -> Any:
        values = [options.value(ns) for options in self.options]
        return self.run(*values, overrides) if self.overrides else self.run(*values)


class _Parser(argparse.ArgumentParser):
    """argparse that raises a mistake as a :class:`UserError` (printed as one line) instead of printing its usage."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("splittrain").strip()
        raise UserError(f"{command + ': ' if command else ''}{message} (see `python -m {self.prog} --help`)")


def _tools_parser(commands: Mapping[str, Command]) -> argparse.ArgumentParser:
    """The command line of ``commands``; LightningCLI's commands are listed, and parsed by it."""
    parser = _Parser(prog="splittrain", description="Split-learning fine-tuning of decoder LLMs.",
                     epilog="python -m splittrain fit --help lists every training setting; --debug (anywhere, or "
                            f"{DEBUG_ENV}=1) shows the traceback of an error")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, what in LIGHTNING_COMMANDS.items():
        subparsers.add_parser(name, help=what, add_help=False)  # handled by LightningCLI before parsing gets here
    for name, command in commands.items():
        subparser = subparsers.add_parser(name, help=command.help, epilog=command.epilog)
        for options in command.options:
            options.add_to(subparser)
    return parser


@functools.cache
def _commands() -> dict[str, Command]:
    """The commands besides LightningCLI's, by name: each one's function and the dataclasses of its options."""
    from .generate import GenerationOptions
    from .audit import AuditSettings, audit
    from .server import ServerLimits
    from .transport.tcp import TcpServer

    config = ("--model.", "--data.")
    applied = "--model.* and --data.* overrides apply as for fit"
    return {
        "split": Command(split_command, "cut a checkpoint into one folder per party (client/, server/)",
                         (Options(SplitOptions),)),
        "export": Command(export_command, "write one peft adapter (or merged checkpoint) for a run",
                          (Options(ExportOptions),)),
        "serve": Command(
            serve_command, "run the trunk server of a config for tcp clients",
            (Options(ServeOptions), Options(TcpServer, only=("max_connections", "handshake_timeout", "max_handshakes",
                                                             "max_handshakes_per_address")), Options(ServerLimits)),
            epilog="--model.* overrides are applied to the config as for fit (e.g. --model.cuts '[2, 4]'), and "
                   "--trainer.max_steps N (the steps a federation's trunk schedule spans; independent clients bring "
                   "their own)", overrides=("--model.", "--trainer.max_steps")),
        "generate": Command(
            generate_command, "answer prompts with a split model (after fit: --ckpt_path last)",
            (Options(RunOptions), Options(GenerateOptions, one_of=("prompt", "prompts")),
             Options(GenerationOptions, skip=("pad_token_id",), flags={"stop_strings": "stop",
                                                                         "eos_token_id": "stop_token_id"},
                     overrides=True)),
            epilog="--model.* and --data.* overrides are applied to the config as for fit; decoding defaults come "
                   "from the config's model.generation", overrides=config),
        "estimate": Command(
            estimate_command, "memory per party of a config (weights, adapters, gradients, optimizer, activations)",
            (Options(EstimateOptions),), overrides=config,
            epilog="needs no weights: parameter counts come from the model's config (a recipe's, a local config.json, "
                   f"or the hub's config.json alone); {applied}"),
        "audit": Command(
            functools.partial(audit_command, audit),
            "play the honest-but-curious server against a run: token recovery, label inference",
            (Options(RunOptions), Options(AuditSettings, only=("public", "client_rows", "public_rows"),
                                          help={"public_rows": "public rows the attacks learn from"})),
            epilog=f"the server's side learns only from public rows and the frames; {applied}; the trunk must run "
                   "in this process (model.transport local)", overrides=config),
        "token": Command(token_command, "add a client with a fresh random token to a tokens file",
                         (Options(TokenOptions),)),
        "status": Command(status_command, "a trunk server's clients, steps, bytes and load as a table",
                          (Options(StatusOptions),)),
    }


# ============================================================================================ the commands' options
@dataclass(kw_only=True)
class SplitOptions:
    """``split``: the checkpoint, where to cut it, and how its parts are written."""

    model: str
    """hub id or local folder of a safetensors checkpoint"""
    cuts: list[int] = field(metadata={"nargs": "+"})
    """cut layers, e.g. --cuts 6 12"""
    out: str
    """output folder; gets client/ and server/"""
    dtype: str | None = None
    """convert weights, e.g. bfloat16 (default: keep)"""
    family: str | None = None
    """family for an unregistered model type of the same shape"""
    revision: str | None = None
    """hub revision"""
    max_shard_size: str = "5GB"
    """largest safetensors shard to write"""
    quiet: bool = False
    """no progress bars or reports"""


@dataclass(kw_only=True)
class ExportOptions:
    """``export``: the run and where its adapter goes."""

    run: str
    """run folder of a fit (holds run.json and checkpoints/)"""
    out: str
    """output folder"""
    ckpt: str | None = None
    """client checkpoint (default: RUN/checkpoints/last.ckpt)"""


@dataclass(kw_only=True)
class TokenOptions:
    """``token``: the tokens file, the client and where its token goes."""

    tokens: str
    """tokens.json to create or extend (mode 600)"""
    client: str
    """the client's name"""
    out: str
    """file to write the client's token to (mode 600)"""


@dataclass(kw_only=True)
class ServeOptions:
    """``serve``: the trunk's config, the address, the credentials and the run folder (the limits per client are
    :class:`~splittrain.server.ServerLimits`, the connections' :class:`~splittrain.transport.tcp.TcpServer`'s)."""

    config: list[str]
    """the run's config (its model section)"""
    address: str = "127.0.0.1:7000"
    """HOST:PORT to listen on (port 0: any free)"""
    tokens: str
    """tokens.json: client name -> token (see `token`)"""
    tls_cert: str | None = None
    """TLS certificate (PEM); required off a private network"""
    tls_key: str | None = None
    """TLS private key (PEM)"""
    resume: bool = False
    """restore the newest trunk checkpoint of the run folder"""
    save_every: int = 1
    """save each client's trunk/<client>/latest.safetensors every N of its steps (a restarted server loses no
    step)"""
    run_dir: str | None = None
    """checkpoints and server_status.json (default: the config's trainer.default_root_dir)"""
    threads: int | None = None
    """torch threads for the trunk's compute (default: torch's, one per core); give the server its share of the
    cores when clients compute on the same machine"""
    http: str | None = None
    """HOST:PORT of a monitor: /metrics (Prometheus), /status (JSON) and / (a live page); off by default"""
    http_token_file: str | None = None
    """file holding the bearer token /metrics and /status require (required to bind the monitor off loopback)"""
    replica_timeout: float = 30.0
    """several trunk replicas (serve under torchrun): seconds without a replica's heartbeat before the run stops"""


@dataclass(kw_only=True)
class StatusOptions:
    """``status``: where to read a trunk server's status."""

    address: str | None = None
    """HOST:PORT of the server's monitor (serve --http)"""
    run_dir: str | None = None
    """the server's run folder (reads its server_status.json)"""
    token_file: str | None = None
    """file holding the monitor's bearer token"""


@dataclass(kw_only=True)
class RunOptions:
    """``generate``, ``audit``: the run's config and the checkpoint to restore."""

    config: list[str]
    """the run's config"""
    ckpt_path: str | None = None
    """'last' (the run folder's checkpoints/last.ckpt) or a checkpoint file"""


@dataclass(kw_only=True)
class GenerateOptions:
    """``generate``: the prompts and where the answers go (decoding: :class:`~splittrain.generate.GenerationOptions`,
    over the config's ``model.generation``)."""

    prompt: str | None = None
    """one user message; the answer streams to the terminal"""
    prompts: str | None = None
    """a .jsonl file: one {"prompt": ...} or {"messages": [...]} per line"""
    out: str | None = None
    """write answers as .jsonl here (default: print them)"""
    batch_size: int = 16
    """prompts generated together (left-padded)"""
    force_load: bool = False
    """restore --ckpt_path's trunk on a server even while other clients of its federation train it (it goes back
    for them too; refused without this flag)"""


@dataclass(kw_only=True)
class EstimateOptions:
    """``estimate``: the config, the device and the output's form."""

    config: list[str]
    """a fit config"""
    device: str | None = None
    """cpu or cuda (default: cuda when the config's trainer.accelerator is gpu/cuda)"""
    json: bool = False
    """print JSON instead of a table"""


# ============================================================================================ the commands
def split_command(options: SplitOptions) -> dict[str, Path]:
    """Cut ``options.model`` and write one folder per party under ``options.out``; each party's parts are loaded
    alone."""
    from .loading import Checkpoint, load_parts, part_ranges, party_parts
    from .segments import save_segments

    checkpoint = Checkpoint(options.model, revision=options.revision)
    ranges = part_ranges(checkpoint.text_config.num_hidden_layers, tuple(options.cuts))
    written = {}
    for party, names in party_parts(list(ranges)).items():
        segments = load_parts(checkpoint, ranges, names, dtype=options.dtype, verbose=not options.quiet,
                              family=options.family)
        written[party] = save_segments(list(segments), Path(options.out) / party,
                                       max_shard_size=options.max_shard_size)
        if not options.quiet:
            print(f"{party}: {', '.join(names)} -> {written[party]}")
        del segments
    return written


def export_command(options: ExportOptions) -> Path:
    """Write the peft adapter (or merged checkpoint) of the run ``options.run`` to ``options.out``."""
    from .lora import export_run

    out = export_run(options.run, options.out, options.ckpt)
    print(f"exported {options.run} -> {out}")
    return out


def client_settings(configs: Sequence[str], overrides: Sequence[str] = (),
                    with_data: bool = False) -> tuple[Any, dict[str, Any], Any]:
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


SERVER_HEAP_ARENAS = 2
"""glibc heaps a trunk server's threads share (:func:`~splittrain.segments.limit_heap_arenas`): its compute is
serialized by one lock, so more heaps buy no speed, only free bytes held per connection thread."""


def serve_command(options: ServeOptions, connections: dict[str, Any], limits: Any,
                  overrides: Sequence[str] = ()) -> None:
    """Serve the trunk that ``options.config`` describes on ``options.address`` until SIGTERM/SIGINT (then save and
    stop); ``connections``: :class:`~splittrain.transport.tcp.TcpServer`'s connection and handshake limits;
    ``limits``: a :class:`~splittrain.server.ServerLimits`."""
    import logging
    import signal

    from .segments import limit_heap_arenas
    from .server import LATEST
    from .transport.tcp import TcpServer

    _set_threads(options.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    # Everything the user gave is checked before the model loads (seconds to minutes): files, then the address.
    known, tls = _serve_credentials(options.tokens, options.tls_cert, options.tls_key)
    check_address(options.address)
    http_token = _monitor_token(options.http, options.http_token_file)
    limit_heap_arenas(SERVER_HEAP_ARENAS)  # before the model loads and any thread allocates
    server, run, replicas = _trunk_server(options, limits, overrides)
    try:
        address = options.address
        if replicas is not None:  # replica r listens on the port plus r
            host, _, port = address.rpartition(":")
            address = f"{host}:{replicas.listen_port(int(port))}"
        try:
            tcp = TcpServer(server, address, known, tls, status_file=run / "server_status.json", **connections)
        except OSError as error:  # taken while the model loaded
            raise UserError(f"--address {address}: {_bind_problem(error)}") from error
        if replicas is not None:
            _replicate(server, replicas, tcp)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: tcp.stop() if replicas is None else replicas.request_stop())
        if options.http:
            from .server.monitor import Monitor

            try:
                monitor = Monitor(tcp.status, options.http, http_token)
            except OSError as error:
                raise UserError(f"--http {options.http}: {_bind_problem(error)}") from error
            monitor.start()
            _say(f"splittrain: monitor on http://{monitor.address}/ (/metrics, /status)")
        fed = server.federation
        federation = "" if fed is None else (f"; a federation of {fed.clients} clients (average {fed.average}, trunk "
                                             f"update {fed.trunk_update}, round timeout {fed.round_timeout:g} s)")
        replica = "" if replicas is None else (f"; trunk replica {replicas.rank} of {replicas.size} "
                                               f"(pid {os.getpid()}) for clients {sorted(replicas.own(fed.clients))}")
        layers = f"{server.trunk.start}-{server.trunk.stop - 1}"
        _say(f"splittrain: trunk server (layers {layers}) listening on {tcp.address}{' with TLS' if tls else ''} for "
             f"{len(known)} client(s){federation}{replica}; checkpoints in {run / 'trunk'}")
        tcp.serve_forever()
        if replicas is not None and replicas.failure is not None:  # mid-step: the checkpoints save_every wrote stand
            raise UserError(replicas.failure)
        paths = server.save_all(LATEST)
        steps = ", ".join(f"{owner!r} at step {adapter.steps}" for owner, adapter in server.adapters.items())
        _say(f"splittrain: trunk server stopped ({steps or 'no client trained'}); saved "
             f"{', '.join(map(str, paths)) or 'nothing'}")
    finally:  # leave the replicas' group on every path: its threads abort the process if left to exit
        if replicas is not None:
            replicas.close()


def _say(line: str) -> None:
    """Print one line of a server's progress in one write: the replicas under torchrun share one output, and an
    unbuffered stdout (``PYTHONUNBUFFERED``) would otherwise let another process's line land before the newline."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _replicate(server: Any, replicas: Any, tcp: Any) -> None:
    """Make ``server`` one of the trunk's ``replicas`` (configs compared, addresses learnt) and watch the others:
    when one is lost, this replica refuses its clients' requests with why for a few seconds, then stops."""
    import threading

    from .server.replicas import ReplicaError

    try:
        server.replicate(replicas, tcp.address)
    except ReplicaError as error:
        tcp.listener.close()
        raise UserError(str(error)) from error

    def failed(why: str) -> None:
        threading.Timer(REPLICA_GRACE_SECONDS, tcp.stop).start()
        server.fail(why)

    replicas.watch(failed, tcp.stop)
    if replicas.rank == 0:
        _say("splittrain: trunk replicas (client c connects to replica c % "
             f"{replicas.size}): {', '.join(f'{r}: {a}' for r, a in enumerate(replicas.addresses))}")


def _monitor_token(http: str | None, token_file: str | None) -> str | None:
    """``serve --http``'s bearer token (from ``--http_token_file``), checked before the model loads: binding the
    monitor off loopback requires one."""
    from .transport.tcp import is_loopback, parse_address

    if http is None:
        if token_file is not None:
            raise UserError("--http_token_file protects the monitor: give --http HOST:PORT too")
        return None
    check_address(http, "--http")
    token = _read_secret(token_file, "--http_token_file") if token_file is not None else None
    if token is None and not is_loopback(parse_address(http)[0]):
        raise UserError(f"--http {http} binds the monitor beyond loopback: its status and metrics would be open to "
                        "the network; give --http_token_file (a bearer token) or bind 127.0.0.1")
    return token


def _read_secret(path: str, flag: str) -> str:
    try:
        token = Path(path).read_text().strip()
    except OSError as error:
        raise UserError(f"{flag} {path}: {error.strerror or error}") from error
    if not token:
        raise UserError(f"{flag} {path} is empty")
    return token


def status_command(options: StatusOptions) -> None:
    """Print a trunk server's status as a table: from its monitor (``--address``) or its run folder."""
    import json

    from .server.monitor import fetch_status, status_table

    if (options.address is None) == (options.run_dir is None):
        raise UserError("status: give either --address HOST:PORT (a server's serve --http) or --run_dir FOLDER")
    if options.address is not None:
        token = _read_secret(options.token_file, "--token_file") if options.token_file else None
        status = fetch_status(options.address, token)
    else:
        path = Path(options.run_dir) / "server_status.json"
        if not path.is_file():
            raise UserError(f"--run_dir {options.run_dir}: no server_status.json there (is it a serve run folder?)")
        status = json.loads(path.read_text())
    print(status_table(status))


def _set_threads(threads: int | None) -> None:
    """``--threads``: torch's threads for the trunk's compute (None: torch's default)."""
    import torch

    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def _trunk_server(options: ServeOptions, limits: Any, overrides: Sequence[str]) -> tuple[Any, Path, Any]:
    """The trunk server of ``options.config`` (model loaded, resumed with ``options.resume``), its run folder and,
    under torchrun, the trunk's replicas it is one of (:mod:`splittrain.server.replicas`; replica r > 0 keeps its
    run folder in ``replica<r>/`` of the given one)."""
    from .server.replicas import ReplicaError, Replicas

    module, trainer, _ = client_settings(options.config, overrides)
    run = Path(options.run_dir or trainer.get("default_root_dir") or "runs/server")
    if options.replica_timeout <= 0:
        raise UserError(f"--replica_timeout must be positive, got {options.replica_timeout}")
    try:
        replicas = Replicas.from_environment(module.federated.round_timeout, options.replica_timeout)
    except ReplicaError as error:
        raise UserError(str(error)) from error
    if replicas is not None and replicas.rank:
        run = run / f"replica{replicas.rank}"
    max_steps = trainer.get("max_steps") or -1
    try:
        check_model(module)
        server = module.build_server(max_steps if max_steps > 0 else None, run, limits, save_every=options.save_every)
        if options.resume:
            resumed = server.resume()
            for owner, step in resumed.items():
                _say(f"splittrain: resumed the trunk adapter of {owner!r} at step {step} (when it connects)")
            if not resumed:
                _say(f"splittrain: no trunk checkpoint in {run / 'trunk'}; starting at step 0")
    except BaseException:
        if replicas is not None:
            replicas.close()
        raise
    return server, run, replicas


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


def check_address(address: str, flag: str = "--address") -> tuple[str, int]:
    """``HOST:PORT`` that this machine can listen on now: parsed, the host resolved, a socket bound to it and closed
    again (as :class:`~splittrain.transport.tcp.TcpServer` binds it). Raises :class:`UserError` saying what is
    wrong (a bad form, an unknown host, an address of another machine, a port in use or reserved)."""
    import socket

    from .transport.tcp import parse_address

    try:
        host, port = parse_address(address)
    except ValueError as error:
        raise UserError(f"{flag}: {error}") from error
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise UserError(f"{flag} {address}: cannot resolve the host {host!r} ({error.strerror})") from error
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except OSError as error:
        raise UserError(f"{flag} {address}: {_bind_problem(error)}") from error
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


def generate_command(run: RunOptions, options: GenerateOptions, generation: dict[str, Any],
                     overrides: Sequence[str] = ()) -> list[str]:
    """Answer ``options.prompt`` (streamed to stdout) or every line of the ``options.prompts`` .jsonl file with the
    split model of the run (restored from ``run.ckpt_path``: ``last`` is the run folder's
    ``checkpoints/last.ckpt``); ``generation`` overrides the config's ``model.generation``. Writes ``options.out``
    (.jsonl) or prints the answers; returns them."""
    from dataclasses import asdict

    rows = _read_prompts(options.prompts) if options.prompt is None else None  # fails before the model loads
    module, data = _load_run(run.config, overrides, run.ckpt_path, options.force_load)
    decoding = {**asdict(module.generation), **generation}
    try:
        if options.prompt is not None:
            from transformers import TextStreamer

            streamer = TextStreamer(data.tokenizer, skip_prompt=True, skip_special_tokens=True)
            answer = module.generate(options.prompt, streamer=streamer, **decoding)
            if options.out is not None:
                _write_jsonl(options.out, [{"prompt": options.prompt, "answer": answer}])
            return [answer]
        answers = module.generate([r["messages"] for r in rows], batch_size=options.batch_size, progress=True,
                                  **decoding)
        records = [{**r["source"], "answer": a} for r, a in zip(rows, answers)]
        if options.out is not None:
            _write_jsonl(options.out, records)
            print(f"{len(records)} answers -> {options.out}")
        else:
            for record in records:
                print(json.dumps(record, ensure_ascii=False))
        return answers
    finally:
        module.close()


def estimate_command(options: EstimateOptions, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Print the memory estimate per party of the ``fit`` config(s) (a table, or JSON with ``options.json``);
    returns it."""
    from .estimate import estimate_json, estimate_memory, format_estimate

    module, trainer, data = client_settings(options.config, overrides, with_data=False)
    data = {**{"batch_size": 8, "max_length": 512}, **data}
    device = options.device
    if device is None:
        device = "cuda" if str(trainer.get("accelerator", "cpu")) in ("gpu", "cuda") else "cpu"
    trunk = module.trunk_settings
    parties = estimate_memory(module.model_name, module.cuts, int(data["batch_size"]), int(data["max_length"]),
                              module.dtype_name, module.client_mode, module.client_lora.r, trunk.lora.r,
                              trunk.lora.targets, device, loss_chunk=module.loss_chunk,
                              quantization=module.quantization, trunk_quantization=trunk.quantization,
                              gradient_checkpointing=module.gradient_checkpointing,
                              trunk_gradient_checkpointing=trunk.gradient_checkpointing,
                              embedding_quantization=module.embedding_quantization)
    if options.json:
        print(estimate_json(parties))
    else:
        weights = module.dtype_name or "checkpoint"
        embedding = f", {module.embedding_quantization} embedding" if module.embedding_quantization else ""
        client = (f"client {module.client_mode} ({module.quantization or weights} weights{embedding}, checkpointing "
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


def audit_command(attack: Callable[..., dict[str, Any]], run: RunOptions, settings: Any,
                  overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Play the honest-but-curious server against the run (``attack``: the audit function, ``settings``: its
    ``AuditSettings``); prints the report and writes audit.json / audit.md in the run folder."""
    module, data = _load_run(run.config, overrides, run.ckpt_path)
    try:
        module.configure_model()
        data.setup("fit")
        report = attack(module, data, settings, module.run_dir)
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
    """Write ``records`` one JSON object a line, making the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def token_command(options: TokenOptions) -> Path:
    """Add ``options.client`` with a fresh token to ``options.tokens`` and write the token alone to
    ``options.out`` (both mode 600)."""
    from .transport.tcp import make_token

    tokens, out, client = Path(options.tokens), Path(options.out), options.client
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


def _lightning_cli(args: Sequence[str] | dict[str, Any] | None, command_line: bool = False) -> Any:
    """``fit``/``validate``/``test``. On the ``command_line`` a bad argument raises jsonargparse's ``ArgumentError``
    (printed as one line by :func:`main`) instead of printing the usage, and Lightning's info lines go to stdout, so
    that stderr holds only warnings and errors."""
    from .data import InstructionDataModule
    from .modules import ClientModule, SafetensorsCheckpointIO

    if command_line:
        _lightning_info_to_stdout()
    return _split_cli()(
        ClientModule,
        InstructionDataModule,
        args=args,
        save_config_callback=_save_config_once_started(),
        save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
        parser_kwargs={"exit_on_error": False} if command_line else None,
        auto_configure_optimizers=False,  # each party builds its own AdamW from model.optim / model.trunk
        # logger null: the run's own logs (run_loggers); any Lightning logger, a list of them, or false instead
        trainer_defaults={"plugins": [{"class_path": f"{SafetensorsCheckpointIO.__module__}.SafetensorsCheckpointIO"}],
                          "logger": None},
    )


def run_loggers(run_dir: str | Path) -> list[Any]:
    """The loggers of a run whose ``trainer.logger`` is null (the default): Lightning's CSVLogger and, when
    tensorboard is installed (the ``tensorboard`` extra), its TensorBoardLogger, both writing to
    ``RUN/logs/version_N`` (a new N for each fit, validate or test)."""
    from importlib.util import find_spec

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    versions = [p.name.removeprefix("version_") for p in (Path(run_dir) / "logs").glob("version_*")]
    version = max((int(v) for v in versions if v.isdigit()), default=-1) + 1
    loggers: list[Any] = [CSVLogger(run_dir, name="logs", version=version)]  # first: it wants its folder empty
    if find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(run_dir, name="logs", version=version, default_hp_metric=False))
    return loggers


@functools.cache
def _run_logs() -> type:
    """A callback attaching :func:`run_loggers` to its trainer."""
    from lightning.pytorch.callbacks import Callback

    class RunLogs(Callback):
        """Attaches :func:`run_loggers` once the data are read (at ``setup``; the loggers' folders appear when the
        model is built and its checkpoint restored): Lightning makes its loggers' folders before it reads the data,
        and a run refused for a bad input leaves the run folder as it was."""

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            if not trainer.loggers:  # the first fit/validate/test of this trainer
                trainer.loggers = run_loggers(trainer.default_root_dir)

    return RunLogs


@functools.cache
def _save_config_once_started() -> type:
    """Lightning's ``SaveConfigCallback``, writing the run's resolved ``config.yaml`` once the run has started."""
    from lightning.pytorch.cli import SaveConfigCallback

    class SaveConfigOnceStarted(SaveConfigCallback):
        """Writes the run's resolved ``config.yaml`` once the run has started (data read, model built, checkpoint
        restored: at the first of the sanity check, training, validation or test), not at ``setup`` as Lightning
        does: a run that stops on a bad input leaves the run folder as it was. It goes to the run folder
        (``default_root_dir``), not to the first logger's folder."""

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            pass

        def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
            root = Path(trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(root / self.config_filename), skip_unset=False,
                             overwrite=self.overwrite, multifile=self.multifile)

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

    return SaveConfigOnceStarted


@functools.cache
def _split_cli() -> type:
    """The LightningCLI class of ``fit``/``validate``/``test`` (Lightning imported only when one runs)."""
    from lightning.pytorch.cli import LightningCLI

    class SplitCLI(LightningCLI):
        """LightningCLI for the client side: the inputs are checked before anything loads; after ``fit`` it
        validates, writes summary.json, shows a sample."""

        def instantiate_classes(self) -> None:
            with _settings_errors():  # a bad value that only the class itself checks (e.g. model.pipeline -1)
                super().instantiate_classes()

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            """The trainer, with :func:`run_loggers` where ``trainer.logger`` is null (attached by
            :func:`_run_logs`); checkpoints go to the run folder's ``checkpoints/`` whatever the loggers (Lightning
            would put them in the first one's folder)."""
            from lightning.pytorch.callbacks import ModelCheckpoint

            config = self._get(self.config_init, "trainer", default={})
            run_logs = config.get("logger") is None and "logger" not in kwargs
            if run_logs:
                kwargs["logger"] = False  # until RunLogs attaches them
            trainer = super().instantiate_trainer(**kwargs)
            if run_logs:
                trainer.callbacks.append(_run_logs()())
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                    callback.dirpath = os.path.join(trainer.default_root_dir, "checkpoints")
            return trainer

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
                _check_ckpt_path(self._get(self.config_init, "ckpt_path"), subcommand, self.trainer, self.model)
                super()._run_subcommand(subcommand)
            finally:
                self.model.close()

        def _parse_ckpt_path(self) -> None:
            """LightningCLI would torch.load a checkpoint file to read hyper-parameters from it; ours are
            safetensors and hold none (the run's config is its --config), so there is nothing to read."""

    return SplitCLI


def _check_ckpt_path(ckpt_path: Any, subcommand: str, trainer: Any, model: Any) -> None:
    """A ``--ckpt_path`` file (``last``: the run folder's) that cannot be restored is refused before the data and
    the model load; ``validate``/``test`` with ``last`` and no checkpoint too (they would run the untrained model).
    ``fit`` with ``last`` and none starts afresh, as Lightning does."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    if ckpt_path in (None, "best", "hpc") or str(ckpt_path).startswith("registry"):
        return
    root = Path(trainer.default_root_dir)
    local_trunk = root if model.transport == "local" else None
    if ckpt_path == "last":
        folders = [Path(c.dirpath) if c.dirpath else root / "checkpoints"
                   for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)]
        found = [f / "last.ckpt" for f in folders or [root / "checkpoints"] if (f / "last.ckpt").exists()]
        if not found and subcommand != "fit":
            raise UserError(f"--ckpt_path last: no checkpoint {root / 'checkpoints' / 'last.ckpt'} (has `fit` run "
                            "with this config?)")
        for path in found:
            check_checkpoint(path, local_trunk)
        return
    if not Path(ckpt_path).is_file():
        raise UserError(f"--ckpt_path {ckpt_path}: no such checkpoint file")
    check_checkpoint(ckpt_path, local_trunk)


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


def write_summary(trainer: Any, model: Any, datamodule: Any) -> dict[str, Any]:
    """Validate once more, then write and print ``summary.json`` in the run folder, draw ``curves.png`` beside it
    (:func:`write_curves`) and show a sample answer."""
    from importlib.util import find_spec

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
        curves = write_curves(model.history, path.with_name(path.name.replace("summary", "curves", 1))
                              .with_suffix(".png"))
        if curves is not None:
            print(f"curves:  {curves}")
        elif find_spec("matplotlib") is None:
            print("curves:  not drawn (pip install matplotlib to have curves.png)")
        if model.eval_generate and model.last_eval is not None:
            print_eval(model.last_eval["metrics"], model.run_dir)
        if model.sample_prompt:
            answer = model.generate(model.sample_prompt, max_new_tokens=48)
            print(f"sample  user: {model.sample_prompt}\n   assistant: {answer}")
    return summary


def write_curves(history: Mapping[str, Mapping[int, float]], path: Path) -> Path | None:
    """Draw a fit's figures (:attr:`~splittrain.modules.ClientModule.history`) as ``path`` (a PNG): the train and
    validation losses (per client in a federation: its train loss and the validation loss on its own shard) beside
    both sides' learning rates, by optimizer steps done. Returns None without matplotlib or a step to draw."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    if not history.get("train_loss"):
        return None
    figure = Figure(figsize=(10, 3.6), layout="constrained")
    loss, rate = figure.subplots(1, 2)

    def draw(axes: Any, name: str, **style: Any) -> None:
        series = history.get(name, {})
        steps = sorted(series)
        if steps:
            axes.plot(steps, [series[s] for s in steps], **style)

    clients = sorted({name.split("/", 1)[1] for name in history if name.startswith("train_loss/")},
                     key=lambda name: int(name.removeprefix("client")))
    named = len(clients) <= 6  # beyond, the clients' lines go without a legend entry each
    for n, client in enumerate(clients):
        draw(loss, f"train_loss/{client}", color=f"C{n + 2}", lw=0.8, marker=".", alpha=0.7,
             label=f"{client} train (the steps it took part in)" if named else None)
        draw(loss, f"val_loss/{client}", color=f"C{n + 2}", marker="s", ls="none",
             label=f"{client} validation (own shard)" if named else None)
    draw(loss, "train_loss", color="C0", lw=1.5, label="train (mean of the clients)" if clients else "train")
    draw(loss, "val_loss", color="C1", marker="o", label="validation")
    draw(rate, "lr/client", color="C0", label="client")
    draw(rate, "lr/trunk", color="C3", ls="--", label="trunk (server)")
    loss.set(title="loss", xlabel="optimizer steps", ylabel="cross-entropy")
    rate.set(title="learning rate after each step", xlabel="optimizer steps")
    for axes in (loss, rate):
        axes.grid(alpha=0.3)
        axes.legend(fontsize="x-small" if clients else "small")
    figure.savefig(path, dpi=100)
    return path


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
    """An error's message on one line (its type's name when it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) if lines else type(error).__name__


def _run(args: Sequence[str] | dict[str, Any], command_line: bool = False) -> Any:
    """Run the command that ``args`` name: LightningCLI's (on the ``command_line`` it reads ``sys.argv``), or one of
    :func:`_commands`."""
    command = next(iter(args)) if isinstance(args, dict) else (args[0] if args else None)
    if command in LIGHTNING_COMMANDS or isinstance(args, dict):
        return _lightning_cli(None if command_line else args, command_line)  # None: LightningCLI reads sys.argv
    commands = _commands()
    ns, overrides = _tools_parser(commands).parse_known_args(list(args))
    _check_overrides(ns.command, overrides, commands[ns.command].overrides)
    return commands[ns.command](ns, overrides)


def _check_overrides(command: str, overrides: Sequence[str], allowed: tuple[str, ...]) -> None:
    """Words of the command line that are not ``command``'s options must be config overrides that it takes."""
    if overrides and not (allowed and all(w.startswith(allowed) for w in overrides[::2])):
        takes = f"; it takes {' and '.join(a + '* overrides' for a in allowed)} besides its options" if allowed else ""
        raise UserError(f"{command}: unrecognized arguments: {' '.join(overrides)}{takes} (see `python -m "
                        f"splittrain {command} --help`)")
