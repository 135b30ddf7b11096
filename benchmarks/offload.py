"""Offloading the trunk: is the data holder's training step faster when a server on another core runs the middle?

    python benchmarks/offload.py            # 12-layer ~25M-parameter Qwen2 shape, batch 8x128, 4 micro-batches (~5 min)
    python benchmarks/offload.py --quick    # smoke run: a tiny shape, 1 warm-up and 2 timed steps (~30 s)

The client (this process) is pinned to one core with one torch thread and holds the frozen bottom and top; the
trunk server (``TcpServer`` in a subprocess, over tcp on 127.0.0.1) is pinned to another core with one thread and
trains LoRA r=8 on the trunk's layers. Each batch crosses as ``--micro`` micro-batches in flight
(:class:`splittrain.cut.Pipeline`). The floor is the unsplit model trained alone on the client's core with one
thread: LoRA on the same layers from the same initial adapters, AdamW, the same batches. For every measured cut the
unsplit and the pipelined split run take turns batch by batch with every other cut's pair, so the machine's drift
falls on all of them alike; their losses differ only by summation order.

Stage times are measured on the client's core with one thread, through the code the split step runs and in its
order, so that as many graphs are alive as there (one at a time, the tops' forward passes ran ~15% faster): every
micro-batch's bottom, the trunk's forward passes through a ``TrunkServer``'s handlers in this process, every top
with its loss, one backward pass through the tops, the trunk's backward passes, the optimizer step. They are timed
at two splits of the model, so that each stage is a fixed part plus a part per layer and any cut can be predicted;
their repetitions take turns with the timed steps too. A transfer takes bytes / rate + latency: on
loopback the rate is measured with raw bytes between the two pinned cores, the latency as half the round trip of a
request without payload to the trunk server.

:func:`step_time` simulates the schedule the client code runs (see there) from those stage times and predicts the
pipelined split step's wall-clock for any cut, micro-batch count and link. The report compares it with the measured
steps and names the cut it finds fastest on loopback and on 100 and 20 Mbit/s links.
"""

from __future__ import annotations

import argparse
import atexit
import math
import os
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from machine import write_result  # this folder is on sys.path when a script here runs

import splittrain  # before torch: it sets the OpenMP runtime's idle spin, as the CLI does
import torch

from split_overhead import Split, interleave, lora_settings, run_parser
from train_speed import make_batches

HERE = Path(__file__).resolve().parent
# ~25M parameters: embedding 32000 x 320 (tied) = 10.2M, 12 layers x 1.23M = 14.7M.
SHAPE = dict(vocab_size=32000, hidden_size=320, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=5,
             num_key_value_heads=1, tie_word_embeddings=True)
QUICK_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                   num_key_value_heads=1, tie_word_embeddings=True)
SLOW_LINKS = {"100 Mbit/s": 100e6, "20 Mbit/s": 20e6}
"""The slow links the best cut is predicted for: bits per second each way, ``SLOW_LATENCY`` one way."""
SLOW_LATENCY = 0.005
STAGES = ("bottom", "trunk_forward", "top_forward", "top_backward", "trunk_backward", "server_step")
TIMEOUT = 120.0
"""Seconds any wait for a child process may take."""


# ================================================================================================ the step-time model
@dataclass(frozen=True)
class Stages:
    """Seconds of one micro-batch in each stage of a split step; ``server_step``: the trunk's optimizer step, once
    per step."""

    bottom: float
    trunk_forward: float
    top_forward: float
    top_backward: float
    trunk_backward: float
    server_step: float = 0.0


@dataclass(frozen=True)
class Link:
    """A full-duplex link: ``rate`` bytes per second each way (``math.inf``: no transfer time), ``latency`` seconds
    one way."""

    rate: float
    latency: float


def step_time(stages: Stages, micro: int, crossing_bytes: float, link: Link) -> float:
    """The client's wall-clock for one pipelined split step of ``micro`` micro-batches, simulated as the code runs.

    The client's core computes every micro-batch's bottom, each leaving as soon as it is computed; then each top's
    forward pass as the trunk's output comes back; then the tops' backward passes, the last micro-batch first
    (autograd runs the later graph first), each dL/dh leaving as soon as it is computed. The server's core runs the
    trunk's forward and backward passes one request at a time, in arrival order. The client then waits for the last
    backward reply (empty: the frozen bottom needs no dL/dh_in) and asks for the optimizer step (one round trip).
    Hidden states and dL/dh are ``crossing_bytes`` each; each direction of the link carries one frame at a time and
    delivers it ``latency`` after it has left.
    """
    free = {"up": 0.0, "down": 0.0}  # when each direction of the link has sent what it was given

    def send(ready: float, way: str, nbytes: float) -> float:
        """When a frame ready to leave at ``ready`` arrives."""
        free[way] = max(ready, free[way]) + nbytes / link.rate
        return free[way] + link.latency

    client = server = 0.0  # when each core is done with what it was given
    arrivals = []
    for _ in range(micro):
        client += stages.bottom
        arrivals.append(send(client, "up", crossing_bytes))
    outputs = []
    for arrival in arrivals:
        server = max(server, arrival) + stages.trunk_forward
        outputs.append(send(server, "down", crossing_bytes))
    for output in outputs:
        client = max(client, output) + stages.top_forward
    grads = []
    for _ in range(micro):
        client += stages.top_backward
        grads.append(send(client, "up", crossing_bytes))
    for grad in grads:
        server = max(server, grad) + stages.trunk_backward
    replied = send(server, "down", 0)
    asked = send(max(client, replied), "up", 0)
    return send(max(server, asked) + stages.server_step, "down", 0)


def one_core_time(stages: Stages, micro: int) -> float:
    """The same stages run one after another on one core: what the split step costs without a second core."""
    per_micro = stages.bottom + stages.trunk_forward + stages.top_forward + stages.top_backward + stages.trunk_backward
    return micro * per_micro + stages.server_step


# ================================================================================================ stage times
def all_cuts(layers: int) -> list[tuple[int, int]]:
    """Every (c1, c2) with at least one layer in each of bottom, trunk and top."""
    return [(a, b) for a in range(1, layers - 1) for b in range(a + 1, layers)]


def stage_layers(stage: str, cuts: tuple[int, int], layers: int) -> int:
    """Decoder layers ``stage`` runs at ``cuts``."""
    if stage == "bottom":
        return cuts[0]
    if stage.startswith("top"):
        return layers - cuts[1]
    return cuts[1] - cuts[0]


def fit_splits(layers: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Two splits whose stages differ in their numbers of layers: (1, L-1) and (k, L-k) with k = (L-1)//2."""
    k = (layers - 1) // 2
    if k < 2:
        raise ValueError(f"a model of {layers} layers is too small to time stages per layer (at least 5)")
    return (1, layers - 1), (k, layers - k)


@dataclass(frozen=True)
class StageFit:
    """Each stage's seconds per micro-batch as ``fixed`` + ``per_layer`` x the layers it runs."""

    layers: int
    fixed: dict[str, float]
    per_layer: dict[str, float]

    @classmethod
    def from_medians(cls, layers: int, medians: dict[tuple[int, int], dict[str, float]]) -> "StageFit":
        """The line through each stage's median seconds at the two ``fit_splits``."""
        a, b = fit_splits(layers)
        fixed, per_layer = {}, {}
        for stage in STAGES:
            na, nb = stage_layers(stage, a, layers), stage_layers(stage, b, layers)
            per_layer[stage] = (medians[b][stage] - medians[a][stage]) / (nb - na)
            fixed[stage] = medians[a][stage] - per_layer[stage] * na
        return cls(layers, fixed, per_layer)

    def stages(self, cuts: tuple[int, int]) -> Stages:
        return Stages(**{s: self.fixed[s] + self.per_layer[s] * stage_layers(s, cuts, self.layers) for s in STAGES})


class StageTimer:
    """Times every stage of a step at both ``fit_splits``, the trunk in this process, one repetition per ``step`` (a
    run of ``interleave``, so its repetitions take turns with the timed steps). The first repetition is a warm-up."""

    name, wire_bytes = "stages", 0

    def __init__(self, folder: str, layers: int, micro: int) -> None:
        from splittrain.crossing import Crossing
        from splittrain.cut import make_link

        self.micro, self.layers, self.calls = micro, layers, 0
        self.parts = {}
        for cuts in fit_splits(layers):
            link = make_link("local", server=trunk_server(folder, cuts))
            self.parts[cuts] = Crossing(*client_parts(folder, cuts), link)
        self.samples = {cuts: {stage: [] for stage in STAGES} for cuts in self.parts}

    def step(self, index: int, batch: dict) -> float:
        from splittrain.cut import micro_batches

        chunks = micro_batches(batch, self.micro)
        trained = (batch["labels"][..., 1:] != -100).sum()
        for cuts, crossing in self.parts.items():
            for stage, seconds in self.repetition(crossing, chunks, trained, self.calls).items():
                if self.calls:
                    self.samples[cuts][stage].append(seconds)
        self.calls += 1
        return 0.0

    @staticmethod
    def repetition(crossing, chunks: list[dict], trained: torch.Tensor, step: int) -> dict[str, float]:
        """One batch's stages in the order the pipelined step runs them, so that as many graphs are alive as there:
        every micro-batch's bottom, the trunk's forward passes, every top's forward pass, one backward pass through
        the tops, the trunk's backward passes (the last micro-batch first) and optimizer step ``step`` + 1. Seconds of
        each stage per micro-batch (the step's once)."""
        from splittrain.segments import Activations

        link, key, spent = crossing.link, ("stages", step), dict.fromkeys(STAGES, 0.0)

        @contextmanager
        def timing(stage: str):
            began = time.perf_counter()
            yield
            spent[stage] += time.perf_counter() - began

        with timing("bottom"):
            states = [crossing.leave(c["input_ids"], c["attention_mask"]) for c in chunks]
        with timing("trunk_forward"):
            outputs = [link.send_forward(s, (*key, i), True, False, step).result()[1]["hidden_states"]
                       for i, s in enumerate(states)]
        with timing("top_forward"):
            loss = sum(crossing.top(Activations(h.requires_grad_(), s.attention_mask, s.position_ids),
                                    labels=c["labels"], num_items_in_batch=trained).loss
                       for h, s, c in zip(outputs, states, chunks))
        with timing("top_backward"):
            loss.backward()
        with timing("trunk_backward"):
            for i in reversed(range(len(chunks))):
                link.send_backward((*key, i), outputs[i].grad).result()
        with timing("server_step"):
            link.step(step + 1)
        return {stage: seconds / (1 if stage == "server_step" else len(chunks)) for stage, seconds in spent.items()}

    def medians(self, of=statistics.median) -> dict[tuple[int, int], dict[str, float]]:
        """Each split's seconds per stage: the median repetition's (``of``: another statistic)."""
        return {cuts: {s: of(v) for s, v in samples.items()} for cuts, samples in self.samples.items()}

    def fit(self, of=statistics.median) -> StageFit:
        return StageFit.from_medians(self.layers, self.medians(of))


# ================================================================================================ the parties
def pin(core: int) -> None:
    """This process on ``core`` only, with one torch thread."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, [core])
    torch.set_num_threads(1)


def cores() -> tuple[int, int]:
    """(client core, server core): the first two this process may use (one core: both on it)."""
    usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return usable[0], usable[1 % len(usable)]


def make_model(shape: dict) -> tuple[str, int]:
    """The benchmark's model (seeded random weights) in a temporary folder removed at exit; (folder, parameters)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="splittrain-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    model = Qwen2ForCausalLM(Qwen2Config(**shape))
    model.save_pretrained(folder)
    return folder, sum(p.numel() for p in model.parameters())


def trunk_server(folder: str, cuts: tuple[int, int]):
    from splittrain.optim import OptimSettings
    from splittrain.server import TrunkServer, load_trunk

    return TrunkServer(load_trunk(folder, cuts, lora_settings()), OptimSettings(lr=1e-3))


def client_parts(folder: str, cuts: tuple[int, int]):
    bottom, top = splittrain.split_model(folder, cuts=cuts, parts=("bottom", "top"))
    return bottom.requires_grad_(False), top.requires_grad_(False)


class Unsplit:
    """The whole model on this process's core, peft LoRA on the trunk layers of ``cuts``; one batch per ``step``.
    ``shares``: per step, the share of its wall-clock this thread was on the core (below 1: other processes ran)."""

    wire_bytes = 0

    def __init__(self, folder: str, cuts: tuple[int, int]) -> None:
        from peft import inject_adapter_in_model
        from transformers import AutoModelForCausalLM

        from splittrain.lora import init_lora, lora_config, model_family
        from splittrain.optim import OptimSettings, build_optimizer

        self.name = f"unsplit {cuts}"
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        self.model.requires_grad_(False)
        inject_adapter_in_model(lora_config(model_family(self.model), range(*cuts), lora_settings()), self.model)
        init_lora(self.model)
        self.optimizer, _ = build_optimizer([p for p in self.model.parameters() if p.requires_grad],
                                            OptimSettings(lr=1e-3), None)
        self.shares: list[float] = []

    def step(self, index: int, batch: dict) -> float:
        began, cpu = time.perf_counter(), time.thread_time()
        loss = self.model(**batch, use_cache=False).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.shares.append((time.thread_time() - cpu) / (time.perf_counter() - began))
        return loss.item()


def start(stack: ExitStack, role: str, core: int, *extra: str, env: dict[str, str] | None = None) -> str:
    """This script in ``role`` on ``core`` as a child process, killed by its pid when ``stack`` closes; the
    address it prints."""
    proc = subprocess.Popen([sys.executable, __file__, "--role", role, "--core", str(core), *extra],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})

    def end() -> None:
        proc.kill()
        proc.wait(timeout=TIMEOUT)

    stack.callback(end)
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        line = proc.stdout.readline().strip() if selector.select(timeout=TIMEOUT) else ""
    if not line.startswith("ADDRESS "):
        raise RuntimeError(f"the {role} process did not start (said {line!r}, exit {proc.poll()})")
    return line.split(" ", 1)[1]


def split_link(stack: ExitStack, folder: str, cuts: tuple[int, int], core: int):
    """A trunk server for ``cuts`` on ``core`` and this client's tcp link to it, both ended with ``stack``."""
    from transformers import AutoConfig

    from splittrain.cut import make_link
    from splittrain.transport import fingerprint
    from splittrain.transport.tcp import make_token

    token = make_token()
    address = start(stack, "serve", core, "--folder", folder, "--trunk", *map(str, cuts),
                    env={"OFFLOAD_TOKEN": token})
    link = make_link("tcp", address=address, client="bench", token=token, timeout=TIMEOUT, reconnect_timeout=10,
                     fingerprint=fingerprint(AutoConfig.from_pretrained(folder), "qwen2", cuts, torch.float32))
    stack.callback(link.close)
    return link


def loopback(stack: ExitStack, core: int, link, repeats: int, nbytes: int = 8 << 20) -> Link:
    """The loopback link between this core and ``core``: the rate of ``nbytes`` of raw bytes to a sink there (each
    acknowledged, less a 1-byte message's round trip), the latency half the round trip of ``grad_sq_norm`` over
    ``link``."""
    address = start(stack, "sink", core)
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def round_trip(payload: bytes) -> float:
            began = time.perf_counter()
            sock.sendall(struct.pack("!Q", len(payload)))
            sock.sendall(payload)
            if sock.recv(1) != b"k":
                raise RuntimeError("the sink closed")
            return time.perf_counter() - began

        payload = bytes(nbytes)
        small = statistics.median(round_trip(b"x") for _ in range(repeats))
        big = statistics.median(round_trip(payload) for _ in range(repeats))
        sock.sendall(struct.pack("!Q", 0))
    trips = []
    for _ in range(repeats):
        began = time.perf_counter()
        link.grad_sq_norm()
        trips.append(time.perf_counter() - began)
    return Link(rate=nbytes / max(big - small, 1e-9), latency=statistics.median(trips) / 2)


# ================================================================================================ roles
def role_serve(args) -> None:
    """TCP trunk server for the cuts ``--trunk`` on 127.0.0.1 (free port), pinned; prints its address, serves until killed."""
    from splittrain.transport.tcp import TcpServer

    pin(args.core)
    server = TcpServer(trunk_server(args.folder, tuple(args.trunk)), "127.0.0.1:0",
                       {"bench": os.environ["OFFLOAD_TOKEN"]})
    print(f"ADDRESS {server.address}", flush=True)
    server.serve_forever()


def role_sink(args) -> None:
    """Accepts one connection on 127.0.0.1, pinned; answers each length-prefixed message with one byte until a
    zero length."""
    pin(args.core)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(TIMEOUT)
        print(f"ADDRESS 127.0.0.1:{listener.getsockname()[1]}", flush=True)
        sock, _ = listener.accept()
        with sock:
            sock.settimeout(TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buffer = memoryview(bytearray(1 << 22))
            while True:
                head = sock.recv(8, socket.MSG_WAITALL)
                if len(head) < 8 or (size := struct.unpack("!Q", head)[0]) == 0:
                    return
                while size:
                    got = sock.recv_into(buffer, min(size, len(buffer)))
                    if not got:
                        return
                    size -= got
                sock.sendall(b"k")


# ================================================================================================ main
def measure(folder: str, args, layers: int, server_core: int) -> dict:
    """Stage times, the loopback link and the interleaved timed runs of every measured cut (the servers on
    ``server_core``)."""
    batches = make_batches(args.warmup + args.steps, args.batch, args.length, args.shape["vocab_size"])
    timer = StageTimer(folder, layers, args.micro)
    for index, batch in enumerate(batches[:args.first_repeats + 1]):  # a first fit chooses the cuts to measure
        timer.step(index, batch)
    rows = args.batch // args.micro
    crossing_bytes = rows * args.length * args.shape["hidden_size"] * 4
    first = timer.fit()
    ranked = sorted(all_cuts(layers), key=lambda c: step_time(first.stages(c), args.micro, crossing_bytes,
                                                              Link(math.inf, 0.0)))
    measured = list(dict.fromkeys([ranked[0], *(tuple(c) for c in args.cuts or default_cuts(layers))]))
    load_before = os.getloadavg()[0]
    with ExitStack() as stack:
        runs = []
        for cuts in measured:
            link = split_link(stack, folder, cuts, server_core)
            runs += [Unsplit(folder, cuts), Split(f"split {cuts}", link, *client_parts(folder, cuts), args.micro)]
        link = loopback(stack, server_core, runs[1].link, args.link_repeats)
        results = interleave([*runs, timer], batches, args.warmup)
    results.pop("stages")
    for run in runs:
        if isinstance(run, Unsplit):
            results[run.name]["cpu_shares"] = run.shares[args.warmup:]
    return {"measured": measured, "results": results, "fit": timer.fit(), "fastest_fit": timer.fit(min),
            "first_choice": ranked[0], "stage_medians": timer.medians(), "link": link,
            "crossing_bytes": crossing_bytes, "load_average": [load_before, os.getloadavg()[0]]}


def default_cuts(layers: int) -> list[tuple[int, int]]:
    """Besides the model's best: the thinnest client (one layer on each side) and a third of the layers each."""
    return [(1, layers - 1), (layers // 3, layers - layers // 3)]


def main() -> None:
    parser = run_parser(__doc__, steps=10, warmup=2)
    parser.add_argument("--micro", type=int, default=4, help="micro-batches per batch in the pipelined split runs")
    parser.add_argument("--cuts", type=int, nargs=2, action="append",
                        help="a cut to measure besides the model's best (repeat; default: 1 L-1 and L/3 2L/3)")
    parser.add_argument("--first-repeats", type=int, default=3,
                        help="stage repetitions before the timed runs (the fit that chooses the best cut)")
    parser.add_argument("--link-repeats", type=int, default=50, help="round trips per loopback figure")
    parser.add_argument("--quick", action="store_true", help="smoke run: a tiny shape, 1 warm-up and 2 timed steps")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "offload.json")
    parser.add_argument("--role", choices=("main", "serve", "sink"), default="main", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--trunk", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "serve":
        return role_serve(args)
    if args.role == "sink":
        return role_sink(args)
    args.shape = SHAPE
    if args.quick:
        args.shape, args.steps, args.warmup, args.batch, args.length = QUICK_SHAPE, 2, 1, 4, 32
        args.micro, args.first_repeats, args.link_repeats = 2, 1, 5

    began = time.perf_counter()
    layers = args.shape["num_hidden_layers"]
    folder, params = make_model(args.shape)
    client_core, server_core = cores()
    pin(client_core)
    m = measure(folder, args, layers, server_core)
    rows = measured_rows(m, args.micro)
    # The unsplit step over the stages run one after another on one core (whole batch vs micro-batches).
    calibration = statistics.median(r["unsplit_median_ms"] / r["one_core_ms"] for r in rows)
    links = {"loopback": m["link"], **{name: Link(bits / 8, SLOW_LATENCY) for name, bits in SLOW_LINKS.items()}}
    predictions = {name: predict_cuts(m["fit"], layers, args.micro, m["crossing_bytes"], link, calibration)
                   for name, link in links.items()}
    best = {name: table[0] for name, table in predictions.items()}
    best_ratio = {name: min(table, key=lambda r: r["ratio_to_unsplit_estimate"]) for name, table in predictions.items()}
    headline = next(r for r in rows if tuple(r["cuts"]) == m["first_choice"])
    floors = [t for r in rows for t in r["unsplit_all_ms"]]
    drift = {str(r["cuts"]): statistics.median(r["unsplit_all_ms"][len(r["unsplit_all_ms"]) // 2:])
             / statistics.median(r["unsplit_all_ms"][:max(1, len(r["unsplit_all_ms"]) // 2)]) - 1 for r in rows}
    fit, link = m["fit"], m["link"]
    result = {
        "params": params, "shape": args.shape, "lora_r": 8, "batch": args.batch, "length": args.length,
        "micro": args.micro, "steps": args.steps, "warmup": args.warmup, "threads": 1,
        "cores": {"client": client_core, "server": server_core},
        "stage_fit_ms": {"fixed": {s: v * 1e3 for s, v in fit.fixed.items()},
                         "per_layer": {s: v * 1e3 for s, v in fit.per_layer.items()}},
        "stage_medians_ms": {str(list(c)): {s: v * 1e3 for s, v in st.items()} for c, st in m["stage_medians"].items()},
        "crossing_bytes": m["crossing_bytes"], "loopback": asdict(link), "slow_links_bits_per_s": SLOW_LINKS,
        "slow_link_latency_s": SLOW_LATENCY, "first_choice": list(m["first_choice"]),
        "ratio_to_unsplit": headline["ratio_to_unsplit"], "min_ratio_to_unsplit": headline["min_ratio_to_unsplit"],
        "max_abs_model_error": max(abs(r["model_error"]) for r in rows),
        "max_loss_diff_vs_unsplit": max(r["max_loss_diff_vs_unsplit"] for r in rows),
        "unsplit_over_one_core_stages": calibration, "unsplit_drift": drift, "unsplit_spread": max(floors) / min(floors),
        "load_average_1min": m["load_average"],
        "runs": rows, "best": best, "best_ratio": best_ratio, "predictions": predictions}
    print_report(result, args)
    result["elapsed_s"] = time.perf_counter() - began
    print(f"benchmark took {result['elapsed_s']:.0f} s")
    write_result(args.out, result)


def measured_rows(m: dict, micro: int) -> list[dict]:
    """Per measured cut: the split and unsplit step times, their ratio, the model's prediction and its error."""
    rows = []
    for cuts in m["measured"]:
        split, unsplit = m["results"][f"split {cuts}"], m["results"][f"unsplit {cuts}"]
        stages = m["fit"].stages(cuts)
        med, floor = statistics.median(split["times"]), statistics.median(unsplit["times"])
        predicted = step_time(stages, micro, m["crossing_bytes"], m["link"])
        fastest = step_time(m["fastest_fit"].stages(cuts), micro, m["crossing_bytes"], m["link"])
        rows.append({
            "cuts": list(cuts), "split_median_ms": med * 1e3, "split_min_ms": min(split["times"]) * 1e3,
            "unsplit_median_ms": floor * 1e3, "unsplit_min_ms": min(unsplit["times"]) * 1e3,
            "ratio_to_unsplit": med / floor, "min_ratio_to_unsplit": min(split["times"]) / min(unsplit["times"]),
            "predicted_ms": predicted * 1e3, "model_error": predicted / med - 1,
            "predicted_fastest_ms": fastest * 1e3, "model_error_fastest": fastest / min(split["times"]) - 1,
            "one_core_ms": one_core_time(stages, micro) * 1e3,
            "max_loss_diff_vs_unsplit": max(abs(a - b) for a, b in zip(split["losses"], unsplit["losses"])),
            "unsplit_cpu_share_median": statistics.median(unsplit["cpu_shares"]),
            "unsplit_cpu_share_min": min(unsplit["cpu_shares"]),
            "wire_bytes_per_step": split["wire_bytes"], "split_all_ms": [t * 1e3 for t in split["times"]],
            "unsplit_all_ms": [t * 1e3 for t in unsplit["times"]], "losses": split["losses"]})
    return rows


def predict_cuts(fit: StageFit, layers: int, micro: int, crossing_bytes: float, link: Link,
                 calibration: float) -> list[dict]:
    """Every cut's predicted split step over ``link``, fastest first, with the unsplit step estimated as the stages
    one after another on one core x ``calibration`` (the measured unsplit step / that sum)."""
    table = []
    for cuts in all_cuts(layers):
        predicted = step_time(fit.stages(cuts), micro, crossing_bytes, link)
        unsplit = one_core_time(fit.stages(cuts), micro) * calibration
        table.append({"cuts": list(cuts), "predicted_ms": predicted * 1e3, "unsplit_estimate_ms": unsplit * 1e3,
                      "ratio_to_unsplit_estimate": predicted / unsplit})
    return sorted(table, key=lambda r: r["predicted_ms"])


def print_report(result: dict, args) -> None:
    shape, fit, link = result["shape"], result["stage_fit_ms"], result["loopback"]
    cores = result["cores"]
    print(f"Qwen2 shape {result['params'] / 1e6:.1f}M params (hidden {shape['hidden_size']}, "
          f"{shape['num_hidden_layers']} layers, vocab {shape['vocab_size']}), LoRA r=8 on the trunk, frozen bottom "
          f"and top, batch {args.batch}x{args.length} as {args.micro} micro-batches, fp32; client on core "
          f"{cores['client']}, server on core {cores['server']}, one torch thread each; {args.steps} timed steps after "
          f"{args.warmup} warm-up, all runs taking turns")
    if cores["client"] == cores["server"]:
        print("client and server share one core: the split step cannot be faster than the unsplit one here")
    print(f"stage ms per micro-batch ({args.batch // args.micro} rows), fixed + per layer: "
          + ", ".join(f"{s} {fit['fixed'][s]:.1f} + {fit['per_layer'][s]:.1f}" for s in STAGES))
    print(f"loopback: {result['crossing_bytes'] / 1e3:.0f} kB per crossing, rate {link['rate'] / 1e9:.2f} GB/s, "
          f"latency {link['latency'] * 1e6:.0f} us one way")
    print(f"{'cuts':<9} {'split ms':>8} {'unsplit ms':>10} {'x unsplit':>9} {'min x':>6} {'model ms':>8} "
          f"{'error':>7} {'min error':>9} {'max |dloss|':>11}")
    for r in result["runs"]:
        print(f"{str(tuple(r['cuts'])):<9} {r['split_median_ms']:>8.1f} {r['unsplit_median_ms']:>10.1f} "
              f"{r['ratio_to_unsplit']:>9.3f} {r['min_ratio_to_unsplit']:>6.3f} {r['predicted_ms']:>8.1f} "
              f"{r['model_error']:>+7.1%} {r['model_error_fastest']:>+9.1%} {r['max_loss_diff_vs_unsplit']:>11.2e}")
    print("medians of the timed steps and stage repetitions; min x: fastest split step / fastest unsplit step; min "
          "error: the model on the fastest stage repetitions / the fastest split step - 1")
    print(f"unsplit step / the stages one after another on one core: {result['unsplit_over_one_core_stages']:.3f}")
    shares = [r["unsplit_cpu_share_min"] for r in result["runs"]]
    print("noise: the unsplit medians moved " + ", ".join(f"{d:+.1%}" for d in result["unsplit_drift"].values())
          + f" from the first half of the steps to the second; the unsplit steps had {min(shares):.0%} of their core "
          f"at least (others ran there); 1-minute load average {result['load_average_1min'][0]:.2f} before the "
          f"timed runs, {result['load_average_1min'][1]:.2f} after (this benchmark adds up to 2)")
    for name, r in result["best"].items():
        low = result["best_ratio"][name]
        print(f"fastest cut for the client, {name}: {tuple(r['cuts'])}, model {r['predicted_ms']:.0f} ms/step, "
              f"{r['ratio_to_unsplit_estimate']:.3f}x its unsplit step (estimated); lowest ratio: "
              f"{tuple(low['cuts'])}, {low['ratio_to_unsplit_estimate']:.3f}x")


if __name__ == "__main__":
    main()
