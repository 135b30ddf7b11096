"""Clients cannot touch each other: real processes on loopback against one ``serve`` process.

Two independent clients training at once end exactly as each would alone, each with its own trunk adapter (LoRA +
AdamW, no second copy of the trunk) and checkpoint folder; an authenticated attacker that sends made-up training
requests and saves under the victim's tags changes nothing of the victim's; a second process under a live name is
refused; connections that trickle bytes without authenticating do not keep a real client out; a server restarted
without its checkpoints is named at once; TLS and protocol mismatches are named at once; the trunk schedule is the
client's (its own adapter) or refused (a federation's).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from processes import (
    STEPS,
    Processes,
    assert_same_run,
    final_weights,
    free_port,
    make_tokens,
    needs_openssl,
    read_status,
    self_signed,
    summary,
    tail,
    wait_for,
    write_config,
)

from splittrain.cut import TrunkLink
from splittrain.segments import Activations
from splittrain.state import load_state
from splittrain.transport import RemoteError, fingerprint
from splittrain.transport.tcp import HandshakeError, TcpTransport, parse_address
from splittrain.transport.wire import encode

pytestmark = pytest.mark.slow

HIDDEN = 128
"""The quickstart model's hidden size."""
CHECKPOINT_STEPS = {f"step-{s}" for s in range(5, STEPS + 1, 5)}
"""The trunk tags the reference run's client saves (every 5 steps)."""


# ------------------------------------------------------------------------------------------ helpers
def quickstart_fingerprint() -> dict:
    from transformers import AutoConfig

    from splittrain.quickstart import model_dir

    return fingerprint(AutoConfig.from_pretrained(model_dir()), "qwen2", (2, 4), torch.float32)


def status_when(run: Path, predicate, what: str, proc=None, timeout: float = 180.0) -> dict:
    return wait_for(lambda: (s := read_status(run)) and predicate(s) and s, timeout, what, proc,
                    getattr(proc, "log", None))


def adapter_step(status: dict, owner: str) -> int:
    return status["adapters"].get(owner, {}).get("step", 0)


def tcp(address: str, run: Path, name: str | None = None, *extra: str) -> tuple[str, ...]:
    words = ("--model.transport", "tcp", "--model.address", address, "--trainer.default_root_dir", str(run))
    return words + (("--model.client_name", name) if name else ()) + extra


def trunk_files(folder: Path) -> set[str]:
    return {p.name.removesuffix(".safetensors") for p in folder.glob("*.safetensors")}


def assert_same_trunk_files(got: Path, want: Path, tags: set[str]) -> None:
    """The trunk checkpoints ``tags`` in ``got`` hold the steps and tensors of the same ones in ``want``."""
    for tag in sorted(tags):
        a, b = load_state(got / f"{tag}.safetensors"), load_state(want / f"{tag}.safetensors")
        assert a["steps"] == b["steps"] == int(tag.removeprefix("step-")), tag
        assert a["trainable"].keys() == b["trainable"].keys()
        worst = max((a["trainable"][k] - b["trainable"][k]).abs().max().item() for k in a["trainable"])
        assert worst <= 1e-6, f"{got / tag}: largest difference {worst} from the reference's"


def proc_status(pid: int) -> dict[str, int]:
    """Threads and resident bytes of a process, from /proc/<pid>/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"threads": int(fields["Threads"]), "rss": int(fields["VmRSS"].split()[0]) * 1024}


class Watcher:
    """Samples a process's threads and resident bytes every ``every`` s in a thread; keeps the largest."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.pid, self.every = pid, every
        self.max = {"threads": 0, "rss": 0}
        self.samples = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(self.every):
            try:
                now = proc_status(self.pid)
            except (FileNotFoundError, ProcessLookupError, KeyError):
                continue
            self.samples += 1
            for k, v in now.items():
                self.max[k] = max(self.max[k], v)

    def stop(self) -> dict[str, int]:
        self.stopping.set()
        self.thread.join(timeout=5)
        return self.max


class Slowloris:
    """``count`` connections that each trickle one byte of a genuine hello every ``every`` s and reconnect at once
    when the server cuts them off."""

    def __init__(self, address: str, count: int, every: float = 0.5) -> None:
        self.host, self.port = parse_address(address)
        self.every = every
        self.payload = b"".join(encode("hello", {"client": "slowloris", "nonce": "0" * 64, "session": "s" * 32,
                                                 "fingerprint": {}}))
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.connects = self.cut = self.bytes_sent = 0
        self.threads = [threading.Thread(target=self._run, daemon=True, name=f"slowloris-{i}") for i in range(count)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                sock = socket.create_connection((self.host, self.port), timeout=2)
            except OSError:
                self.stopping.wait(0.01)  # the listen queue is full: try again at once (but do not spin)
                continue
            with self.lock:
                self.connects += 1
            with sock:
                sock.settimeout(self.every)
                for i in range(len(self.payload)):
                    if self.stopping.is_set():
                        return
                    try:
                        sock.sendall(self.payload[i:i + 1])
                    except OSError:
                        break
                    with self.lock:
                        self.bytes_sent += 1
                    try:
                        sock.recv(1)  # the server never answers a half hello: anything here means it cut us off
                        break
                    except TimeoutError:
                        continue
                    except OSError:
                        break
            with self.lock:
                self.cut += 1

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=10)
        assert not any(t.is_alive() for t in self.threads)


def trunk_base_bytes() -> int:
    """Bytes of the frozen base weights of the quickstart trunk (layers 2 and 3), read from the model's files."""
    from safetensors import safe_open

    from splittrain.quickstart import model_dir

    itemsize = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
    total = 0
    for path in model_dir().glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                if re.search(r"\.layers\.(2|3)\.", name):
                    part = f.get_slice(name)
                    total += int(torch.Size(part.get_shape()).numel()) * itemsize[part.get_dtype()]
    return total


@pytest.fixture
def tiny_server(checkpoint, tmp_path):
    """``make(**tcp_options) -> (TrunkServer, TcpServer)``: a tiny trunk (qwen2, cuts 1-3) behind a TcpServer in a
    thread (``tls=`` a server context for TLS), for clients 'alice' (token "a" * 32) and 'bob' ("b" * 32); stopped at
    the end of the test."""
    from splittrain.lora import LoraSettings
    from splittrain.server import TrunkServer, load_trunk
    from splittrain.optim import OptimSettings
    from splittrain.transport.tcp import TcpServer

    _, folder = checkpoint("qwen2")
    running = []

    def make(**options):
        trunk = load_trunk(str(folder), (1, 3), LoraSettings(r=4, alpha=8), seed=1)
        server = TrunkServer(trunk, OptimSettings(lr=1e-2), run_dir=tmp_path / f"run{len(running)}")
        tcp_server = TcpServer(server, "127.0.0.1:0", {"alice": "a" * 32, "bob": "b" * 32}, **options)
        thread = threading.Thread(target=tcp_server.serve_forever, daemon=True)
        thread.start()
        running.append((tcp_server, thread))
        return server, tcp_server

    try:
        yield make
    finally:
        for tcp_server, thread in running:
            tcp_server.stop()
            thread.join(timeout=10)


# ------------------------------------------------------------------------------------------ 1. two clients at once
def test_two_clients_at_once_each_train_as_if_alone(reference_run, procs, tmp_path):
    """alice and bob train at once on one server; each ends with the lone in-process run's losses and weights, its
    trunk checkpoints in trunk/<name>/, and an adapter of LoRA + AdamW state only (the base weights are held once)."""
    config, ref = reference_run
    tokens, known = make_tokens(tmp_path, "alice", "bob")
    server_run = tmp_path / "server"
    server, address = procs.serve(config, tokens, server_run)
    alone = proc_status(server.pid)
    alice = procs.fit(config, *tcp(address, tmp_path / "alice", "alice"), token=known["alice"], log_name="alice.log")
    one = status_when(server_run, lambda s: adapter_step(s, "alice") >= 2, "alice's second step", alice)
    rss_one = one["rss_bytes"]
    # alice waits (frozen mid-run) until bob trains too, so the two runs overlap whatever the machine's load
    alice.send_signal(signal.SIGSTOP)
    try:
        bob = procs.fit(config, *tcp(address, tmp_path / "bob", "bob"), token=known["bob"], log_name="bob.log")
        two = status_when(server_run, lambda s: adapter_step(s, "bob") >= 2, "bob's second step", bob)
    finally:
        alice.send_signal(signal.SIGCONT)
    rss_two = two["rss_bytes"]
    assert set(two["sessions"]) == {"alice", "bob"} and adapter_step(two, "alice") < STEPS
    assert two["step"] is None  # no single step with two adapters
    both = status_when(server_run, lambda s: adapter_step(s, "alice") > adapter_step(two, "alice")
                       and len(s["sessions"]) == 2 and adapter_step(s, "bob") < STEPS, "both training at once")
    print(f"both training at once: alice at step {adapter_step(both, 'alice')}, bob at {adapter_step(both, 'bob')}")
    for proc in (alice, bob):
        Processes.finish(proc, timeout=300)

    for name in ("alice", "bob"):
        assert_same_run(tmp_path / name, server_run, ref)
        trunk_file = load_state(tmp_path / name / "checkpoints" / "last.ckpt")["trunk_file"]
        assert trunk_file == f"{name}/step-{STEPS}.safetensors"
        assert CHECKPOINT_STEPS <= trunk_files(server_run / "trunk" / name) <= CHECKPOINT_STEPS | {"latest"}
        assert_same_trunk_files(server_run / "trunk" / name, ref / "trunk" / "client0", CHECKPOINT_STEPS)
    assert {p.name for p in (server_run / "trunk").iterdir()} == {"alice", "bob"}  # nothing shared, nothing else

    final = status_when(server_run, lambda s: not s["sessions"], "the sessions to end")
    adapters = final["adapters"]
    assert set(adapters) == {"alice", "bob"} and all(a["step"] == STEPS for a in adapters.values())
    # An adapter is its LoRA tensors, AdamW's two moments of each and a step count per tensor: nothing of the base.
    lora = load_state(server_run / "trunk" / "bob" / f"step-{STEPS}.safetensors")["trainable"]
    lora_bytes = sum(t.nbytes for t in lora.values())
    expected = 3 * lora_bytes + 4 * len(lora)
    base = trunk_base_bytes()
    print(f"server rss: {alone['rss'] / 2**20:.1f} MiB listening, {rss_one / 2**20:.1f} MiB with one client, "
          f"{rss_two / 2**20:.1f} MiB with two (+{(rss_two - rss_one) / 2**20:.1f} MiB, graphs in flight included); "
          f"adapter bytes {adapters['alice']['bytes']} / {adapters['bob']['bytes']} (LoRA {lora_bytes} x 3 + steps); "
          f"trunk base weights {base} bytes; adapter / base = {adapters['bob']['bytes'] / base:.2f}")
    assert adapters["alice"]["bytes"] == adapters["bob"]["bytes"] == expected
    assert adapters["bob"]["bytes"] < base


# ------------------------------------------------------------------------------------------ 2. an attacker
def test_an_authenticated_attacker_cannot_touch_the_victim(reference_run, procs, tmp_path):
    """mallory (a valid token of its own) trains, steps, saves under the victim's tags, loads, asks for gradient norms
    and back-propagates into the victim's keys while client0 trains: client0 ends exactly as alone; mallory's
    checkpoints land only in trunk/mallory/."""
    config, ref = reference_run
    tokens, known = make_tokens(tmp_path, "client0", "mallory")
    server_run, victim_run = tmp_path / "server", tmp_path / "victim"
    _, address = procs.serve(config, tokens, server_run)
    victim = procs.fit(config, *tcp(address, victim_run), token=known["client0"], log_name="victim.log")
    status_when(server_run, lambda s: adapter_step(s, "client0") >= 1, "the victim's first step", victim)

    link = TrunkLink(TcpTransport(address, "mallory", known["mallory"], quickstart_fingerprint()))
    # mallory's adapter exists from its handshake on; it sends nothing until the victim has trained a step more
    joined = adapter_step(read_status(server_run), "client0")
    status_when(server_run, lambda s: adapter_step(s, "client0") >= joined + 2, "two more steps of the victim", victim)
    g = torch.Generator().manual_seed(7)
    step, rounds, saved = 0, 0, set()
    deadline = time.monotonic() + 400
    try:
        while victim.poll() is None and time.monotonic() < deadline:
            victim_step = adapter_step(read_status(server_run) or {"adapters": {}}, "client0")
            for micro in range(2):  # keys like the victim's: ("train", step, batch, micro-batch)
                key = ("train", step, rounds % 2, micro)
                hidden = torch.randn(8, 16, HIDDEN, generator=g)
                state = Activations(hidden, torch.ones(8, 16, dtype=torch.long), torch.arange(16)[None])
                out = link.forward(state, key, training=True, need_input_grad=True, step=step)
                assert link.backward(key, torch.randn(out.shape, generator=g)).shape == hidden.shape
                link.forward(state, ("validate", victim_step, micro), training=False, need_input_grad=False)
            assert link.grad_sq_norm() > 0
            with pytest.raises(RemoteError, match="no forward pass of client 'mallory'"):  # not ours to finish
                link.backward(("train", victim_step, 0, 0), torch.ones(8, 16, HIDDEN))
            step = link.step(step + 1, 0.5)["step"]
            for tag in (f"step-{step}", "latest"):  # step-5 and step-10 among them: names the victim uses
                assert link.save(tag)["file"] == f"mallory/{tag}.safetensors"
                saved.add(tag)
            if step >= 10:  # back to our own step-5: mallory stays below the victim's last tags
                step = link.request_plain("load", {"tag": "step-5"})["step"]
                assert step == 5
            for tag in ("step-15", f"step-{STEPS}"):  # the victim's checkpoints are not ours to load
                with pytest.raises(RemoteError, match=f"has no checkpoint '{tag}'"):
                    link.load(tag)
            rounds += 1
        with pytest.raises((RemoteError, ConnectionError), match="bad checkpoint tag"):  # no way out of its folder
            link.save("../client0/step-20")
    finally:
        link.close()
    Processes.finish(victim, timeout=300)
    print(f"mallory made {rounds} rounds of requests (ended at its step {step}) while the victim trained")
    assert rounds >= 5

    # mallory's checkpoints are in its folder only; the victim's folder holds the victim's tags only
    assert {p.name for p in (server_run / "trunk").iterdir()} == {"client0", "mallory"}
    assert not list((server_run / "trunk").glob("*.safetensors"))
    assert saved <= trunk_files(server_run / "trunk" / "mallory") and {"step-5", "step-10"} <= saved
    assert CHECKPOINT_STEPS <= trunk_files(server_run / "trunk" / "client0") <= CHECKPOINT_STEPS | {"latest"}
    assert load_state(server_run / "trunk" / "client0" / "latest.safetensors")["steps"] == STEPS
    # (mallory's session stays for --session_timeout: its connection was closed on the bad frame, no goodbye)
    final = status_when(server_run, lambda s: "client0" not in s["sessions"]
                        and s["counters"]["steps_applied"] >= STEPS + rounds, "the victim's session to end, and "
                        "every step to show")  # the status file is rewritten every 0.5 s
    assert final["adapters"]["client0"]["step"] == STEPS
    # and the victim's numbers are its lone run's
    assert_same_trunk_files(server_run / "trunk" / "client0", ref / "trunk" / "client0", CHECKPOINT_STEPS)
    assert_same_run(victim_run, server_run, ref)


# ------------------------------------------------------------------------------------------ 3. one name twice
def test_a_second_process_under_a_live_name_is_refused(reference_run, procs, tmp_path):
    config, ref = reference_run
    tokens, known = make_tokens(tmp_path, "client0")
    server_run, client_run = tmp_path / "server", tmp_path / "client"
    _, address = procs.serve(config, tokens, server_run)
    first = procs.fit(config, *tcp(address, client_run), token=known["client0"])
    status_when(server_run, lambda s: adapter_step(s, "client0") >= 2, "step 2", first)
    first.send_signal(signal.SIGSTOP)  # the first one holds its session while the second one tries
    try:
        began = time.monotonic()
        second = procs.fit(config, *tcp(address, tmp_path / "second"), token=known["client0"], log_name="second.log")
        try:
            code = second.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the second process is still running after 60 s:\n{tail(second.log)}") from None
        took = time.monotonic() - began
    finally:
        first.send_signal(signal.SIGCONT)
    log = second.log.read_text()
    print(f"second process under 'client0' exited {code} after {took:.1f} s (start included): "
          + next((line for line in log.splitlines() if "error" in line), ""))
    assert code != 0
    assert "client 'client0' is connected from another process" in log, tail(second.log)
    assert took <= 20, f"the refused process took {took:.1f} s to exit"
    Processes.finish(first, timeout=300)
    assert_same_run(client_run, server_run, ref)
    assert read_status(server_run)["counters"]["sessions_refused"] >= 1
    assert not (tmp_path / "second" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------ 4. slowloris
def test_slowloris_connections_do_not_keep_a_real_client_out(reference_run, procs, tmp_path):
    config, ref = reference_run
    tokens, known = make_tokens(tmp_path, "client0", "probe")
    server_run, client_run = tmp_path / "server", tmp_path / "client"
    server, address = procs.serve(config, tokens, server_run)
    before = proc_status(server.pid)
    watcher = Watcher(server.pid)
    attack = Slowloris(address, 74)
    try:
        wait_for(lambda: attack.connects >= 74 and (s := read_status(server_run)) and s["handshakes"] >= 8, 30,
                 "the slow connections to fill the handshake slots")
        times = []
        for _ in range(3):
            began = time.monotonic()
            probe = TcpTransport(address, "probe", known["probe"], quickstart_fingerprint(), reconnect_timeout=60)
            times.append(time.monotonic() - began)
            probe.close()
            time.sleep(0.3)
        print(f"real client handshakes under slowloris: {', '.join(f'{t:.3f}' for t in times)} s")
        assert max(times) <= 2.0, times

        client = procs.fit(config, *tcp(address, client_run), token=known["client0"])
        Processes.finish(client, timeout=400)
        during = read_status(server_run)
    finally:
        attack.stop()
        peak = watcher.stop()
    print(f"slowloris: {attack.connects} connections, {attack.cut} cut off, {attack.bytes_sent} bytes trickled; "
          f"server evicted {during['counters']['handshakes_evicted']} handshakes; server threads {before['threads']} "
          f"idle, at most {peak['threads']} under attack; rss {before['rss'] / 2**20:.1f} MiB idle, at most "
          f"{peak['rss'] / 2**20:.1f} MiB ({watcher.samples} samples)")
    assert_same_run(client_run, server_run, ref)
    assert during["counters"]["handshakes_evicted"] > 0 and attack.cut > 0
    assert peak["threads"] < 64 + 64 + 20
    assert peak["rss"] < before["rss"] + 512 * 2**20
    # once the attack stops, nothing of it remains
    after = status_when(server_run, lambda s: s["handshakes"] == 0 and s["connections"] == 0, "the slow connections "
                        "to go", timeout=30)
    # 3 probes and the fit client (more when a handshake was cut off after it authenticated and the client retried)
    print(f"authenticated handshakes: {after['counters']['handshakes']}")
    assert after["counters"]["handshakes"] >= 3 + 1


def test_a_handshake_cut_off_after_its_session_opened_leaks_nothing(tiny_server):
    """A handshake that is cut off after the server opened its session (evicted by a newer connection, or past
    handshake_timeout while it waited for the trunk's lock) gives back its connection slot: the client's retry is
    served, and the session is free once the client leaves."""
    server, tcp_server = tiny_server(max_connections=1)
    original, cut = server.open_session, []

    def open_then_cut(client, session_id, schedule=None):
        reply = original(client, session_id, schedule)
        if not cut:  # what _admit's eviction or the housekeeping's deadline does to a handshake at this moment
            timeout, tcp_server.handshake_timeout = tcp_server.handshake_timeout, -1.0
            tcp_server._end_late_handshakes()
            tcp_server.handshake_timeout = timeout
            cut.append(client)
        return reply

    server.open_session = open_then_cut
    began = time.monotonic()
    transport = TcpTransport(tcp_server.address, "alice", "a" * 32, server.fingerprint, reconnect_timeout=5)
    print(f"connected after one cut-off handshake in {time.monotonic() - began:.2f} s")
    assert cut == ["alice"]
    transport.close()
    wait_for(lambda: "alice" not in server.sessions, 5, "alice's session to end")
    # the one slot is free again: another client is served
    TcpTransport(tcp_server.address, "bob", "b" * 32, server.fingerprint, reconnect_timeout=5).close()


def test_a_new_clients_adapter_leaves_the_running_clients_adapter_in_place(tiny_server):
    """alice has trained a step; bob connects (his adapter is made) and sends nothing: alice's next forward pass is
    what it was before bob came, and its backward pass fills alice's gradients, not bob's."""
    server, _ = tiny_server()
    hidden = {"hidden_states": torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0)),
              "position_ids": torch.arange(5)[None]}

    def forward(training: bool, step: int = 1) -> torch.Tensor:
        header = {"key": ["train", step, 0], "training": training, "need_input_grad": training, "step": step}
        return server.handle("alice", "forward", header, hidden)[1]["hidden_states"]

    server.open_session("alice", "a")
    forward(True, 0)
    server.handle("alice", "backward", {"key": ["train", 0, 0]}, {"grad": torch.full((2, 5, 32), 0.1)})
    server.handle("alice", "step", {"step": 1}, {})
    before = forward(False)
    server.open_session("bob", "b")
    assert torch.equal(forward(False), before), "alice's forward pass ran with another adapter"
    forward(True)
    server.handle("alice", "backward", {"key": ["train", 1, 0]}, {"grad": torch.full((2, 5, 32), 0.1)})
    assert len(server.sessions["alice"].grads) == len(server.adapters["alice"].trainable)
    assert all(p.grad is None for _, p in server.adapters["bob"].trainable)


# ------------------------------------------------------------------------------------------ 5. restart without --resume
def test_a_server_restarted_without_its_checkpoints_is_named_at_once(reference_run, procs, tmp_path):
    config, _ = reference_run
    tokens, known = make_tokens(tmp_path, "client0")
    server_run, client_run = tmp_path / "server", tmp_path / "client"
    address = f"127.0.0.1:{free_port()}"
    server, _ = procs.serve(config, tokens, server_run, address=address)
    client = procs.fit(config, *tcp(address, client_run, None, "--model.reconnect_timeout", "240"),
                       token=known["client0"])
    status_when(server_run, lambda s: adapter_step(s, "client0") >= 7, "step 7", client)
    Processes.signal(server, signal.SIGKILL)
    assert client.poll() is None  # the client waits for its server
    restarted, _ = procs.serve(config, tokens, server_run, address=address, log_name="restarted.log")
    listening = time.monotonic()
    try:
        code = client.wait(timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the client still runs 60 s after the server came back:\n{tail(client.log)}") from None
    took = time.monotonic() - listening
    log = client.log.read_text()
    print(f"client exited {code} {took:.1f} s after the restarted server listened: "
          + next((line for line in log.splitlines() if "restarted without" in line), ""))
    assert code != 0
    assert "restarted without this client's trunk checkpoints" in log and "--resume" in log, tail(client.log)
    assert took <= 10, f"the client took {took:.1f} s to give up"
    assert restarted.poll() is None


# ------------------------------------------------------------------------------------------ 6. TLS and protocol
def refused_within(seconds: float, error, match: str, *args, **kwargs) -> float:
    """TcpTransport(*args, **kwargs) raises ``error`` matching ``match`` within ``seconds`` (it would retry for a
    minute if it took the refusal for a passing trouble)."""
    began = time.monotonic()
    with pytest.raises(error, match=match) as caught:
        TcpTransport(*args, reconnect_timeout=60, **kwargs)
    took = time.monotonic() - began
    print(f"{took:.3f} s: {caught.value}")
    assert took <= seconds, f"took {took:.1f} s"
    return took


@needs_openssl
def test_tls_mismatches_and_another_protocol_are_named_at_once(tiny_server, tmp_path):
    from splittrain.transport.tcp import server_tls_context

    cert, key = self_signed(tmp_path, "server")
    stranger, _ = self_signed(tmp_path, "stranger")
    server, tls_server = tiny_server(tls=server_tls_context(str(cert), str(key)))
    _, plain_server = tiny_server()
    tls_address, plain_address, fp, token = tls_server.address, plain_server.address, server.fingerprint, "a" * 32
    # the right CA works
    TcpTransport(tls_address, "alice", token, fp, tls_ca=str(cert)).close()
    TcpTransport(plain_address, "alice", token, fp).close()
    # a plain client of a TLS server, a TLS client of a plain server, a CA that did not sign the certificate
    refused_within(5, (HandshakeError, ConnectionError), r"speaks TLS.*--model\.tls_ca", tls_address, "alice", token,
                   fp)
    refused_within(5, HandshakeError, r"does not speak TLS.*drop --model\.tls_ca", plain_address, "alice", token, fp,
                   tls_ca=str(cert))
    refused_within(5, HandshakeError, r"certificate.*--model\.tls_ca", tls_address, "alice", token, fp,
                   tls_ca=str(stranger))
    # another protocol version in the fingerprint
    for address, ca in ((plain_address, None), (tls_address, str(cert))):
        refused_within(5, HandshakeError, r"protocol: client 999, server 1", address, "alice", token,
                       {**fp, "protocol": 999}, tls_ca=ca)


# ------------------------------------------------------------------------------------------ 7. the trunk schedule
LINEAR = {"lr": 0.002, "schedule": "linear", "warmup_steps": 2}


def test_a_federation_refuses_another_schedule_an_independent_client_gets_its_own(checkpoint, tmp_path):
    from splittrain.federated import FederatedSettings
    from splittrain.lora import LoraSettings
    from splittrain.server import TrunkServer, load_trunk
    from splittrain.optim import OptimSettings

    _, folder = checkpoint("qwen2")
    optim = OptimSettings(**LINEAR)
    trunk = load_trunk(str(folder), (1, 3), LoraSettings(r=4, alpha=8), seed=1)
    federation = TrunkServer(trunk, optim, total_steps=800, federation=FederatedSettings(clients=2))
    with pytest.raises(ValueError, match=r"client 'alice' trains the trunk with another schedule: total_steps 24 "
                                         r"\(server: 800\)"):
        federation.open_session("alice", "s1", optim.resolved(24))
    with pytest.raises(ValueError, match=r"lr 0\.001 \(server: 0\.002\)"):
        federation.open_session("alice", "s1", OptimSettings(**{**LINEAR, "lr": 0.001}).resolved(800))
    assert federation.open_session("alice", "s1", optim.resolved(800))["step"] == 0
    assert federation.open_session("bob", "s2", optim.resolved(800))["step"] == 0

    trunk = load_trunk(str(folder), (1, 3), LoraSettings(r=4, alpha=8), seed=1)
    independent = TrunkServer(trunk, optim, total_steps=800)
    independent.open_session("alice", "s1", optim.resolved(24))
    independent.open_session("bob", "s2", optim.resolved(800))
    independent.open_session("carol", "s3", None)  # no schedule: the server's own
    assert {o: a.schedule["total_steps"] for o, a in independent.adapters.items()} == {"alice": 24, "bob": 800,
                                                                                     "carol": 800}
    alice, bob = (independent.adapters[o].scheduler.lr_lambdas[0] for o in ("alice", "bob"))
    assert alice(23) != bob(23)


def test_an_independent_client_trains_with_its_own_schedule_over_tcp(procs, tmp_path):
    """The server's config says max_steps 40; a client run with --trainer.max_steps 24 (linear schedule) ends exactly
    as the in-process 24-step run, its trunk schedule's learning rate down to 0 at step 24."""
    from splittrain.cli import main
    from splittrain.optim import OptimSettings, build_optimizer

    quick = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml").read_text())
    trunk = {**quick["model"]["trunk"], "optim": LINEAR}
    config = write_config(tmp_path / "config.yaml", tmp_path / "unused", steps=40, every=8, batch_size=4, limit=200,
                          model={"trunk": trunk})
    reference = tmp_path / "reference"
    main(["fit", "--config", str(config), "--trainer.max_steps", "24", "--trainer.default_root_dir", str(reference)])

    tokens, known = make_tokens(tmp_path, "client0")
    server_run, client_run = tmp_path / "server", tmp_path / "client"
    _, address = procs.serve(config, tokens, server_run)
    client = procs.fit(config, *tcp(address, client_run, None, "--trainer.max_steps", "24"),
                       token=known["client0"])
    Processes.finish(client, timeout=300)

    got, want = summary(client_run)["train_losses"], summary(reference)["train_losses"]
    assert len(got) == len(want) == 24
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-6
    a, b = final_weights(client_run, server_run, step=24), final_weights(reference, reference, step=24)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    saved = load_state(server_run / "trunk" / "client0" / "step-24.safetensors")["scheduler"]
    # the server's own schedule (40 steps) would still be at a third of its peak
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer, scheduler = build_optimizer([param], OptimSettings(**LINEAR), 40)
    for _ in range(24):
        optimizer.step()
        scheduler.step()
    print(f"trunk lr after 24 steps: client's schedule {saved['_last_lr']}, the server's config's "
          f"{scheduler.get_last_lr()}")
    assert saved["_last_lr"] == [0.0] != scheduler.get_last_lr()
