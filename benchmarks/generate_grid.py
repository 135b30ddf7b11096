"""Split generation over a grid of prompt lengths, output lengths and batch sizes, beside ``transformers``'
``generate``.

    python benchmarks/generate_grid.py                      # ~105M Qwen2 shape, the whole grid (hours on 2 cores)
    python benchmarks/generate_grid.py --inputs 32 128 --outputs 16 128 --batches 1 8 --dtypes float32
    python benchmarks/generate_grid.py --smoke              # tiny shape, two cells per dtype, in process and tcp

Per cell (dtype x batch x prompt length x new tokens, the new tokens capped where the model's context ends), the
runs take turns repetition by repetition (the first one rotating), each decoding greedily the same prompts from
the same weights with no stop token:

- ``transformers``: ``model.generate`` of the unsplit model with a ``DynamicCache`` (the class split generation uses
  for each of its segments);
- ``in process``: :func:`splittrain.generate.generate` with the trunk segment in this process;
- ``tcp``: the trunk behind a :class:`~splittrain.transport.tcp.TcpServer` in a process of its own on loopback;
- ``shaped``: the same over a link of 100 Mbit/s each way with 20 ms of delay each way. Linux and root only (as
  ``slow_link.py``): the client runs in a network namespace, the server in another, joined by a veth pair whose
  two ends are shaped by ``tbf``. This kernel has no ``netem``, so the delay is added in user space by a relay in
  the server's process: every chunk read from one side is written to the other 20 ms after it arrived (TCP's own
  window sees no delay). Elsewhere the mode is skipped with the reason in the JSON.

Every run's tokens are checked equal to ``transformers'`` (the harness's accuracy half). Figures per run: time to
first token (the prompt through every segment, the first token chosen), the median and 90th percentile of the
time between later tokens, tokens/s (new tokens over the whole call) and tokens per CPU-second of the client
process and the trunk server process together (a shared machine's wall clock counts the time other jobs hold
the cores; CPU time does not, so run with ``--threads 1`` there), bytes per decode step (the transport's count,
both directions, frames included; the payload crossing each cut computed from the tensors), the round trips per
decode step (requests the link sent), and memory per party: the weights and KV cache each party holds at the end
(exact), the trunk server process's RSS before any generation and its peak during the run, and how far the
client process's peak RSS rose above its RSS before the run (``/proc/PID/clear_refs`` resets the peaks before
each run). On the shaped link the
per-token latency is compared with ``transformers``' per-token time + 2 x 20 ms x round trips + bytes / rate
(medians, and 10th percentiles: the fastest tokens, what a quieter machine shows). Each remote decode step is
also split into the trunk's request (server compute + link) and the client's work between requests.

``--append`` keeps the cells already in ``--out`` and measures the others, so a grid too long for one sitting
runs as several invocations (each logged with its load average).

Targets (read the ratios: absolute times depend on the machine): in process tokens/s >= 0.95x ``transformers'`` in
every cell; loopback tcp >= 0.85x at batch 8; shaped per-token latency within 10% of the model.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

from machine import write_result  # this folder is on sys.path when a script here runs

import splittrain  # noqa: F401  (before torch: it sets the OpenMP runtime's idle spin, as the CLI does)
import torch

from slow_link import MTU, cannot_run, rate_bits, sh

HERE = Path(__file__).resolve().parent
SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2304, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)
CUTS = (2, 10)
SMOKE_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
SMOKE_CUTS = (1, 3)
INPUTS, OUTPUTS, BATCHES = (32, 128, 512, 2048), (16, 128, 512), (1, 8)
MODES = ("in process", "tcp", "shaped")
DTYPES = ("float32", "bfloat16")
RATE, DELAY = "100mbit", 0.020
TARGETS = {"in process": 0.95, "tcp": 0.85, "shaped_error": 0.10}
CLIENT = "bench"
SUBNET = "10.213.0"
"""The veth pair's addresses (client .1, server .2), inside the benchmark's own namespaces."""


# ================================================================================================ the model
def build(folder: Path, shape: dict) -> int:
    """A seeded random Qwen2 of ``shape`` saved in float32 at ``folder``; its parameter count."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**shape), dtype=torch.float32)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def prompts(batch: int, length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random prompts of ``length`` tokens each (a deployment table's fixed input length)."""
    g = torch.Generator().manual_seed(length * 100 + batch)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    return ids, torch.ones_like(ids)


def kv_bytes(config: Any, layers: int, rows: int, positions: int, dtype: torch.dtype) -> int:
    """What a ``DynamicCache`` of ``layers`` full-attention layers holds after ``positions`` positions of ``rows``."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * layers * rows * positions * config.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8


def weight_bytes(*modules: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


# ================================================================================================ memory
def rss(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (peak since the last reset) of a process, bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of a process so far (``/proc/PID/task/*/schedstat``, nanoseconds)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended meanwhile
            pass
    return total / 1e9


def reset_peak(pid: int | str = "self") -> None:
    """Reset a process's peak RSS to its current RSS (Linux >= 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


# ================================================================================================ the server
def relay(listen: str, target: tuple[str, int], delay: float) -> str:
    """Accept on ``listen`` (a host; port picked), forward every connection to ``target``, each chunk written
    ``delay`` s after it was read, in both directions; returns the listening ``HOST:PORT``."""
    server = socket.create_server((listen, 0))

    def pump(src: socket.socket, dst: socket.socket) -> None:
        chunks: list[tuple[float, bytes]] = []
        ready = threading.Condition()

        def read() -> None:
            while True:
                try:
                    data = src.recv(1 << 16)
                except OSError:
                    data = b""
                with ready:
                    chunks.append((time.monotonic() + delay, data))
                    ready.notify()
                if not data:
                    return

        threading.Thread(target=read, daemon=True).start()
        while True:
            with ready:
                ready.wait_for(lambda: chunks)
                due, data = chunks.pop(0)
            time.sleep(max(0.0, due - time.monotonic()))
            if not data:
                dst.shutdown(socket.SHUT_WR)
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    def accept() -> None:
        while True:
            near, _ = server.accept()
            far = socket.create_connection(target)
            for sock in (near, far):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=pump, args=(near, far), daemon=True).start()
            threading.Thread(target=pump, args=(far, near), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    host, port = server.getsockname()[:2]
    return f"{host}:{port}"


def role_serve(args: argparse.Namespace) -> None:
    """A tcp trunk server on 127.0.0.1 (free port), behind a delaying relay on ``--relay`` when given; prints the
    address to reach, serves until killed."""
    from splittrain import split_model
    from splittrain.server import TrunkServer
    from splittrain.transport.tcp import TcpServer

    trunk = split_model(args.folder, cuts=tuple(args.cuts), parts=("trunk",), dtype=getattr(torch, args.dtype))["trunk"]
    server = TcpServer(TrunkServer(trunk, total_steps=1), "127.0.0.1:0", {CLIENT: os.environ["GENERATE_GRID_TOKEN"]})
    address = server.address
    if args.relay:
        host, port = address.rsplit(":", 1)
        address = relay(args.relay, (host, int(port)), args.delay)
    print(f"ADDRESS {address}", flush=True)
    server.serve_forever()


class Server:
    """A trunk server process of ``dtype`` (``prefix`` runs it in another namespace), started at once (servers
    start side by side); :meth:`wait` for its address; killed by :meth:`stop`."""

    def __init__(self, folder: str, cuts: tuple[int, int], dtype: str, threads: int, prefix: tuple[str, ...] = (),
                 relay_host: str | None = None) -> None:
        from splittrain.transport.tcp import make_token

        self.token, self.address, self.idle_rss = make_token(), "", 0
        extra = ["--relay", relay_host, "--delay", str(DELAY)] if relay_host else []
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, __file__, "--role", "serve", "--folder", folder, "--cuts", *map(str, cuts),
             "--dtypes", dtype, "--threads", str(threads), *extra],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "GENERATE_GRID_TOKEN": self.token})

    def wait(self, timeout: float = 120.0) -> "Server":
        """Its address, once it serves; its RSS then (trunk loaded, before any generation) as :attr:`idle_rss`."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().strip() if ready else ""
        if not line.startswith("ADDRESS "):
            raise RuntimeError(f"the trunk server did not start within {timeout:g} s (said {line!r})")
        self.address = line.split(" ", 1)[1]
        self.idle_rss = rss(self.proc.pid)["VmRSS"]
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


class Namespaces:
    """Two network namespaces, client and server, joined by a veth pair shaped to ``rate`` each way; deleted on
    exit."""

    def __init__(self, rate: str) -> None:
        pid = os.getpid()
        self.client, self.server, self.rate = f"gg-client-{pid}", f"gg-server-{pid}", rate
        self.ends = (f"ggc{pid}"[:15], f"ggs{pid}"[:15])

    def __enter__(self) -> "Namespaces":
        try:
            sh("ip", "netns", "add", self.client)
            sh("ip", "netns", "add", self.server)
            sh("ip", "link", "add", self.ends[0], "netns", self.client, "type", "veth", "peer", "name", self.ends[1],
               "netns", self.server)
            burst = max(4 * MTU, rate_bits(self.rate) // 8 // 1000)
            for ns, end, host in ((self.client, self.ends[0], 1), (self.server, self.ends[1], 2)):
                sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{host}/30", "dev", end)
                sh("ip", "-n", ns, "link", "set", end, "mtu", str(MTU), "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", end, "root", "tbf", "rate", self.rate,
                   "burst", str(burst), "latency", "200ms")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.client, self.server):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


# ================================================================================================ timed runs
class Clock:
    """A streamer that notes the time (and the link's byte count) of the prompt and of every new token."""

    def __init__(self, link: Any = None) -> None:
        self.link, self.times, self.bytes = link, [], []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if self.link is not None:
            self.bytes.append(self.link.wire_bytes)

    def end(self) -> None:
        pass


class Counted:
    """A :class:`~splittrain.cut.TrunkLink` whose requests are counted (round trips) and timed."""

    def __init__(self, link: Any) -> None:
        self.link, self.requests, self.spans = link, 0, []
        request = link._request

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.requests += 1
            began = time.perf_counter()
            try:
                return request(*args, **kwargs)
            finally:
                self.spans.append((began, time.perf_counter()))

        link._request = counted


def timed(run: Callable[[Clock], torch.Tensor], link: Any = None, counter: Counted | None = None,
          server: Server | None = None) -> dict[str, Any]:
    """One generation: its tokens, wall time, the times of its tokens, bytes and requests, memory peaks."""
    clock = Clock(link)
    requests, spans = (counter.requests, len(counter.spans)) if counter else (0, 0)
    if server is not None:
        reset_peak(server.proc.pid)
    reset_peak()
    before = rss()["VmRSS"]
    server_cpu = cpu_seconds(server.proc.pid) if server is not None else 0.0
    cpu = time.process_time()
    start = time.perf_counter()
    tokens = run(clock)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    if server is not None:
        cpu += cpu_seconds(server.proc.pid) - server_cpu
    out = {"tokens": tokens, "wall": wall, "cpu": cpu, "start": start, "times": clock.times, "bytes": clock.bytes,
           "client_rss_growth": rss()["VmHWM"] - before}
    if counter is not None:
        out["requests"] = counter.requests - requests
        steps = counter.spans[spans:][1:-1]  # the decode steps' requests (not the prompt's, not the cache's end)
        out["request_s"] = [end - began for began, end in steps]
        out["client_s"] = [b[0] - a[1] for a, b in zip(steps, steps[1:])]
    if server is not None:
        out["server_peak_rss"] = rss(server.proc.pid)["VmHWM"]
        out["server_idle_rss"] = server.idle_rss
    return out


def summary(records: list[dict], batch: int, new: int) -> dict[str, Any]:
    """Medians over repetitions; per-token latencies pooled over them."""
    gaps = [b - a for r in records for a, b in zip(r["times"][1:], r["times"][2:])]
    deciles = [x * 1e3 for x in statistics.quantiles(gaps, n=10)] if len(gaps) > 1 else [g * 1e3 for g in gaps] * 9
    wall = statistics.median(r["wall"] for r in records)
    out = {"ttft_ms": statistics.median((r["times"][1] - r["start"]) * 1e3 for r in records),
           "per_token_ms_median": statistics.median(gaps) * 1e3 if gaps else None,
           "per_token_ms_p90": deciles[-1] if gaps else None, "per_token_ms_p10": deciles[0] if gaps else None,
           "tokens_per_s": batch * new / wall, "tokens_per_s_fastest": batch * new / min(r["wall"] for r in records),
           "wall_s": [r["wall"] for r in records], "cpu_s": [r["cpu"] for r in records],
           "tokens_per_cpu_s": batch * new / statistics.median(r["cpu"] for r in records),
           "client_rss_growth_mib": max(r["client_rss_growth"] for r in records) / 2**20}
    if records[0]["bytes"] and new > 1:
        r = records[0]
        out["prefill_wire_bytes"] = r["bytes"][1] - r["bytes"][0]
        out["wire_bytes_per_step"] = (r["bytes"][-1] - r["bytes"][1]) / (new - 1)
    if "requests" in records[0]:
        out["requests"] = records[0]["requests"]
        # a decode step split in two: the trunk's request (server + link) and the client's own work between requests
        requests, client = [x for r in records for x in r["request_s"]], [x for r in records for x in r["client_s"]]
        if requests and client:
            out["request_ms_median"] = statistics.median(requests) * 1e3
            out["client_ms_median"] = statistics.median(client) * 1e3
        if new > 1:  # less the prompt's request and the one that frees the server's cache
            out["round_trips_per_step"] = (records[0]["requests"] - 2) / (new - 1)
    if "server_peak_rss" in records[0]:
        out["server_peak_rss_mib"] = max(r["server_peak_rss"] for r in records) / 2**20
        out["server_idle_rss_mib"] = records[0]["server_idle_rss"] / 2**20
    return out


# ================================================================================================ the grid
def cells(args: argparse.Namespace, context: int) -> list[tuple[str, int, int, int, bool]]:
    """(dtype, batch, prompt length, new tokens, capped) of every cell that fits the model's context."""
    out = []
    for dtype in args.dtypes:
        for batch in args.batches:
            for length in args.inputs:
                for new in args.outputs:
                    if length >= context:
                        continue
                    out.append((dtype, batch, length, min(new, context - length), new > context - length))
    return out


def role_grid(args: argparse.Namespace) -> None:
    """Every cell, its runs taking turns; the JSON is rewritten after each cell."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from splittrain import split_model
    from splittrain.cut import make_link
    from splittrain.generate import generate
    from splittrain.transport import fingerprint

    shape, cuts = (SMOKE_SHAPE, SMOKE_CUTS) if args.smoke else (SHAPE, CUTS)
    modes = list(args.modes)
    skipped = {}
    if "shaped" in modes and not args.far:
        skipped["shaped"] = args.shaped_skipped or "not asked for"
        modes.remove("shaped")
    done, log = previous(args, shape) if args.append else ([], [])
    have = {(row["dtype"], row["batch"], row["input"], row["output"]) for row in done}
    log.append({"cells": " ".join(f"--{k} {' '.join(map(str, getattr(args, k)))}" for k in
                                  ("inputs", "outputs", "batches", "dtypes", "modes")),
                "reps": args.reps, "load_average_1min": [os.getloadavg()[0]], "elapsed_s": 0.0})
    began = time.perf_counter()
    with ExitStack() as stack:
        folder = args.folder or stack.enter_context(tempfile.TemporaryDirectory(prefix="generate-grid-"))
        params = build(Path(folder), shape) if not args.folder else args.params
        grid = [cell for cell in cells(args, shape["max_position_embeddings"]) if cell[:4] not in have]
        dtypes = [dtype for dtype in args.dtypes if any(cell[0] == dtype for cell in grid)]
        started: dict[tuple[str, str], Server] = {}
        for dtype in dtypes:
            for mode in (m for m in modes if m != "in process"):
                prefix = ("ip", "netns", "exec", args.far) if mode == "shaped" else ()
                started[dtype, mode] = Server(folder, cuts, dtype, args.threads, prefix,
                                              f"{SUBNET}.2" if mode == "shaped" else None)
                stack.callback(started[dtype, mode].stop)
        for dtype in dtypes:
            dt = getattr(torch, dtype)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt).eval()
            parts = split_model(folder, cuts=cuts, dtype=dt)
            bottom, trunk, top = parts["bottom"], parts["trunk"], parts["top"]
            config = model.config
            fp = fingerprint(trunk.config, trunk.family.name, (trunk.start, trunk.stop), trunk.dtype)
            links: dict[str, Any] = {"in process": trunk}
            servers: dict[str, Server] = {}
            counters: dict[str, Counted] = {}
            for mode in (m for m in modes if m != "in process"):
                server = started[dtype, mode].wait()
                link = make_link("tcp", address=server.address, client=CLIENT, token=server.token, fingerprint=fp,
                                 wire_dtype=dtype)
                stack.callback(link.close)
                servers[mode], links[mode], counters[mode] = server, link, Counted(link)

            def hf(ids: torch.Tensor, mask: torch.Tensor, new: int) -> Callable[[Clock], torch.Tensor]:
                return lambda clock: model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None,
                    pad_token_id=0, cache=DynamicCache(config=config), streamer=clock)

            def split(mode: str, ids: torch.Tensor, mask: torch.Tensor, new: int) -> Callable[[Clock], torch.Tensor]:
                return lambda clock: generate(bottom, links[mode], top, ids, mask, max_new_tokens=new,
                                              eos_token_id=[], pad_token_id=0, streamer=clock)

            with torch.no_grad():  # warm-up: every run once on a small prompt
                ids, mask = prompts(1, 8, shape["vocab_size"])
                for run in (hf(ids, mask, 4), *(split(m, ids, mask, 4) for m in modes)):
                    run(Clock())
            for cell_dtype, batch, length, new, capped in grid:
                if cell_dtype != dtype:
                    continue
                ids, mask = prompts(batch, length, shape["vocab_size"])
                runs = {"transformers": (hf(ids, mask, new), None),
                        **{m: (split(m, ids, mask, new), m) for m in modes}}
                records: dict[str, list[dict]] = {name: [] for name in runs}
                cell_load = os.getloadavg()[0]
                with torch.no_grad():
                    for rep in range(args.reps):
                        names = list(runs)
                        turn = rep % len(names)
                        for name in names[turn:] + names[:turn]:
                            run, mode = runs[name]
                            remote = mode not in (None, "in process")
                            records[name].append(timed(run, links[mode] if remote else None,
                                                       counters.get(mode), servers.get(mode)))
                reference = records["transformers"][0]["tokens"]
                row = {"dtype": dtype, "batch": batch, "input": length, "output": new, "capped": capped,
                       "load_average_1min": [cell_load, os.getloadavg()[0]], "runs": {}}
                hidden = shape["hidden_size"] * torch.finfo(dt).bits // 8
                layers = {"bottom": cuts[0], "trunk": cuts[1] - cuts[0], "top": shape["num_hidden_layers"] - cuts[1]}
                positions = length + new - 1
                kv = {part: kv_bytes(config, n, batch, positions, dt) for part, n in layers.items()}
                for name, recs in records.items():
                    stats = summary(recs, batch, new)
                    stats["same_tokens"] = all(torch.equal(r["tokens"], reference) for r in recs)
                    if name == "transformers":
                        stats["memory_mib"] = {"weights": weight_bytes(model) / 2**20,
                                               "kv_cache": sum(kv.values()) / 2**20}
                    else:
                        stats["memory_mib"] = {
                            "client_weights": weight_bytes(bottom, top) / 2**20,
                            "client_kv_cache": (kv["bottom"] + kv["top"]) / 2**20,
                            "server_weights": weight_bytes(trunk) / 2**20, "server_kv_cache": kv["trunk"] / 2**20}
                        # per decode step: hidden states + int32 positions + uint8 mask up, hidden states down
                        stats["cut_bytes_per_step"] = {"cut1_up": batch * (hidden + 4 + 1), "cut2_down": batch * hidden}
                        base = row["runs"]["transformers"]
                        stats["ratio_tokens_per_s"] = stats["tokens_per_s"] / base["tokens_per_s"]
                        stats["ratio_fastest"] = stats["tokens_per_s_fastest"] / base["tokens_per_s_fastest"]
                        stats["ratio_cpu"] = stats["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
                        if name == "shaped" and stats.get("per_token_ms_median") is not None:
                            link_ms = (2 * DELAY * 1e3 * stats["round_trips_per_step"]
                                       + stats["wire_bytes_per_step"] * 8 / rate_bits(RATE) * 1e3)
                            stats["predicted_per_token_ms"] = base["per_token_ms_median"] + link_ms
                            stats["model_error"] = stats["per_token_ms_median"] / stats["predicted_per_token_ms"] - 1
                            # the fastest decile of tokens on both sides: what a quiet machine would show
                            fastest = base["per_token_ms_p10"] + link_ms
                            stats["model_error_p10"] = stats["per_token_ms_p10"] / fastest - 1
                    row["runs"][name] = stats
                done.append(row)
                print_cell(row)
                log[-1]["elapsed_s"] = time.perf_counter() - began
                save(args, shape, cuts, params, modes, skipped, done, log)
    log[-1]["load_average_1min"].append(os.getloadavg()[0])
    log[-1]["elapsed_s"] = time.perf_counter() - began
    save(args, shape, cuts, params, modes, skipped, done, log)
    summarize(done)
    if not all(r["same_tokens"] for row in done for r in row["runs"].values()):
        sys.exit("generate_grid: some run's tokens differ from transformers'")


def previous(args: argparse.Namespace, shape: dict) -> tuple[list[dict], list[dict]]:
    """The cells and run log already in ``--out`` (``--append``), when they were measured on ``shape``."""
    if not args.out.is_file():
        return [], []
    data = json.loads(args.out.read_text())
    if data.get("shape") != shape:
        sys.exit(f"generate_grid: {args.out} holds another shape; --append needs the same one")
    return data["cells"], data["log"]


def save(args: argparse.Namespace, shape: dict, cuts: tuple[int, int], params: int, modes: list[str],
         skipped: dict[str, str], done: list[dict], log: list[dict]) -> None:
    """The JSON so far (rewritten after every cell); ``log``: each invocation's cells, repetitions, 1-minute load
    average before and after, and seconds."""
    write_result(args.out, {
        "smoke": args.smoke, "params": params, "shape": shape, "cuts": list(cuts), "threads": torch.get_num_threads(),
        "modes": modes, "skipped": skipped, "rate": RATE, "delay_ms": DELAY * 1e3, "cache": "DynamicCache",
        "targets": TARGETS, "log": log, "cells": done})


def print_cell(row: dict) -> None:
    print(f"{row['dtype']:<9} batch {row['batch']} in {row['input']} out {row['output']}"
          f"{' (capped)' if row['capped'] else ''}, load {row['load_average_1min'][0]:.2f}->"
          f"{row['load_average_1min'][1]:.2f}")
    for name, r in row["runs"].items():
        tok = f"{r['per_token_ms_median']:.1f}/{r['per_token_ms_p90']:.1f}" if r["per_token_ms_median"] else "-"
        extra = f" {r['ratio_tokens_per_s']:.3f}x (cpu {r['ratio_cpu']:.3f}x)" if "ratio_tokens_per_s" in r else ""
        if "wire_bytes_per_step" in r:
            extra += f" {r['wire_bytes_per_step'] / 1e3:.1f} kB/step"
        if "model_error" in r:
            extra += (f" model {r['predicted_per_token_ms']:.1f} ms ({r['model_error']:+.1%}, fastest decile "
                      f"{r['model_error_p10']:+.1%})")
        print(f"  {name:<13} ttft {r['ttft_ms']:>8.1f} ms  token {tok:>13} ms  {r['tokens_per_s']:>8.1f} tok/s"
              f"{extra}  same {r['same_tokens']}", flush=True)


def summarize(done: list[dict]) -> None:
    """The targets against the worst cell of each."""
    for mode, limit in (("in process", TARGETS["in process"]), ("tcp", TARGETS["tcp"])):
        rows = [row for row in done if mode in row["runs"] and (mode != "tcp" or row["batch"] >= 8)]
        if rows:
            worst = min(rows, key=lambda row: row["runs"][mode]["ratio_tokens_per_s"])
            ratio = worst["runs"][mode]["ratio_tokens_per_s"]
            print(f"target {mode} >= {limit}x transformers' tokens/s: {'met' if ratio >= limit else 'MISSED'} "
                  f"(worst {ratio:.3f}x at {worst['dtype']} batch {worst['batch']} in {worst['input']} out "
                  f"{worst['output']})")
            cpu = min(row["runs"][mode]["ratio_cpu"] for row in rows)
            print(f"  per CPU-second (client + server): {'met' if cpu >= limit else 'MISSED'} (worst {cpu:.3f}x)")
    errors = [row["runs"]["shaped"]["model_error"] for row in done if "model_error" in row["runs"].get("shaped", {})]
    if errors:
        worst = max(errors, key=abs)
        print(f"target shaped per-token latency within {TARGETS['shaped_error']:.0%} of the model: "
              f"{'met' if abs(worst) <= TARGETS['shaped_error'] else 'MISSED'} (worst {worst:+.1%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, nargs="+", default=list(INPUTS), help="prompt lengths")
    parser.add_argument("--outputs", type=int, nargs="+", default=list(OUTPUTS), help="new tokens")
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--modes", nargs="+", choices=MODES, help="default: all three (--smoke: in process, tcp)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--append", action="store_true", help="keep the cells already in --out, measure the others")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of every run per cell")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads in every process")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, two cells per dtype, in process and tcp")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default results/generate_grid[_smoke].json)")
    parser.add_argument("--role", choices=("main", "grid", "serve"), default="main", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--params", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cuts", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--relay", help=argparse.SUPPRESS)
    parser.add_argument("--delay", type=float, default=DELAY, help=argparse.SUPPRESS)
    parser.add_argument("--far", help=argparse.SUPPRESS)
    parser.add_argument("--shaped-skipped", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.role == "serve":
        args.dtype = args.dtypes[0]
        return role_serve(args)
    if args.smoke:
        args.inputs, args.outputs, args.batches, args.reps = [8], [6], [1, 3], 1
    if args.modes is None:
        args.modes = ["in process", "tcp"] if args.smoke else list(MODES)
    if args.out is None:
        args.out = HERE / "results" / ("generate_grid_smoke.json" if args.smoke else "generate_grid.json")
    if args.role == "grid" or "shaped" not in args.modes:
        return role_grid(args)
    why = cannot_run()
    if why is not None:
        print(f"generate_grid: the shaped link is skipped: {why}")
        args.shaped_skipped = why
        return role_grid(args)
    with Namespaces(RATE) as ns:  # the whole grid runs in the client's namespace
        proc = subprocess.Popen(["ip", "netns", "exec", ns.client, sys.executable, __file__, *sys.argv[1:],
                                 "--role", "grid", "--far", ns.server, "--out", str(args.out)])
        try:
            sys.exit(proc.wait())
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    main()
