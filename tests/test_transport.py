"""The cut across real process boundaries: ``tcp`` (a ``serve`` process) and ``dist`` (torchrun on two "nodes")
give the in-process run's numbers; the wire dtype halves the bytes; authentication, replays, fingerprints and TLS.
torchrun on one node, pipelined and not, is in ``test_dist_pipeline.py``."""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from processes import (STEPS, Processes, assert_same_run, free_port, make_tokens, needs_openssl, read_status, self_signed,
                       summary, wait_for, write_config)
from splittrain.cli import main
from splittrain.cut import TrunkLink
from splittrain.segments import Activations
from splittrain.transport import RemoteError, fingerprint
from splittrain.transport.tcp import HandshakeError, SocketReader, TcpTransport, _proof, parse_address, send_frame
from splittrain.transport.wire import encode, read_frame

pytestmark = pytest.mark.slow



def quickstart_fingerprint(cuts: tuple[int, int] = (2, 4)) -> dict:
    from transformers import AutoConfig

    from splittrain.quickstart import model_dir

    return fingerprint(AutoConfig.from_pretrained(model_dir()), "qwen2", cuts, torch.float32)


def test_tcp_fit_equals_in_process(reference_run, procs, tmp_path):
    config, ref = reference_run
    tokens, known = make_tokens(tmp_path, "client0")
    server_run, client_run = tmp_path / "server", tmp_path / "client"
    server, address = procs.serve(config, tokens, server_run)
    client = procs.fit(config, "--model.transport", "tcp", "--model.address", address,
                       "--trainer.default_root_dir", str(client_run), token=known["client0"])
    Processes.finish(client, timeout=300)
    assert_same_run(client_run, server_run, ref)
    status = wait_for(lambda: (s := read_status(server_run)) and not s["sessions"] and s, 10, "the session to end")
    assert status["step"] == STEPS and status["counters"]["steps_applied"] == STEPS
    assert status["counters"]["handshakes"] == 1 and status["counters"]["frames_refused"] == 0
    # wire_bytes counts real frames: the tensors' bytes (what in-process counts) plus headers, a little more.
    ratio = summary(client_run)["wire_bytes"] / summary(ref)["wire_bytes"]
    assert 1.0 < ratio < 1.02, ratio
    assert known["client0"] not in (tmp_path / "client.log").read_text() + (tmp_path / "server.log").read_text()


def test_torchrun_on_two_nodes_equals_in_process(reference_run, procs, tmp_path):
    """The README's two-node line, both "nodes" on this machine: static rendezvous pins the trunk to node 0."""
    config, ref = reference_run
    run, port = tmp_path / "two-nodes", free_port()
    nodes = [procs.start([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                          "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                          "-m", "splittrain", "fit", "--config", str(config), "--model.transport", "dist",
                          "--trainer.default_root_dir", str(run)], tmp_path / f"node{rank}.log")
             for rank in (0, 1)]
    for node in nodes:
        Processes.finish(node, timeout=300)
    assert_same_run(run, run, ref)
    assert "trunk server on rank 0" in (tmp_path / "node0.log").read_text()


def test_bfloat16_wire_halves_the_bytes(procs, tmp_path):
    """Bytes per step over tcp: bfloat16 wire 0.50x float32 (+-2%), headers and masks included."""
    tokens, known = make_tokens(tmp_path, "client0")
    runs = {}
    servers = {}
    for dtype in ("float32", "bfloat16"):
        config = write_config(tmp_path / f"{dtype}.yaml", tmp_path / f"client-{dtype}", steps=4, every=4,
                              model={"wire_dtype": dtype})
        servers[dtype] = (config, *procs.serve(config, tokens, tmp_path / f"server-{dtype}", log_name=f"{dtype}.log",
                                               wait=False))
    for dtype, (config, server, _) in servers.items():
        address = Processes.address_of(server)
        client = procs.fit(config, "--model.transport", "tcp", "--model.address", address,
                           "--trainer.limit_val_batches", "0", token=known["client0"], log_name=f"client-{dtype}.log")
        Processes.finish(client, timeout=300)
        runs[dtype] = summary(tmp_path / f"client-{dtype}")
    per_step = {dtype: s["wire_bytes"] / s["steps"] for dtype, s in runs.items()}
    ratio = per_step["bfloat16"] / per_step["float32"]
    print(f"bytes per step: float32 {per_step['float32']:.0f}, bfloat16 {per_step['bfloat16']:.0f}, ratio {ratio:.4f}")
    assert 0.49 <= ratio <= 0.51
    assert runs["bfloat16"]["train_losses"] != runs["float32"]["train_losses"]  # the cast really happened


def test_bfloat16_and_int8_wires_train_like_float32(tmp_path):
    """100 quickstart steps: the bfloat16 and int8 wires' training losses are within 3% of the float32 wire's.

    In process, the link packs exactly as over a socket (same dtype on the wire, cast back by the receiver)."""
    losses = {}
    for dtype in ("float32", "bfloat16", "int8"):
        cli = main(["fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"),
                    "--trainer.max_steps", "100", "--trainer.default_root_dir", str(tmp_path / dtype),
                    "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
                    "--model.sample_prompt", "null", "--model.eval_generate", "false", "--model.wire_dtype", dtype])
        losses[dtype] = sum(cli.model._stats["losses"][-10:]) / 10
    print(f"mean loss of steps 91-100: {losses}")
    for dtype in ("bfloat16", "int8"):
        assert abs(losses[dtype] - losses["float32"]) <= 0.03 * losses["float32"]
        assert losses[dtype] != losses["float32"]


# ------------------------------------------------------------------------------------------ one shared server
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A quickstart trunk server for the handshake tests (they never train it)."""
    from splittrain.quickstart import model_dir

    model_dir()
    folder = tmp_path_factory.mktemp("server")
    tokens, known = make_tokens(folder, "alice", "bob", "carol", "dave")
    config = write_config(folder / "config.yaml", folder / "client")
    processes = Processes(folder)
    try:
        # A test that leaves a session behind (a refused frame closes its connection) frees the name for the next
        # within 2 s: one live session per name would otherwise keep it for the default 120 s.
        proc, address = processes.serve(config, tokens, folder / "run", "--max_connections", "3", "--max_batch", "4",
                                        "--threads", "1", "--session_timeout", "2")
        yield {"address": address, "tokens": known, "run": folder / "run", "log": folder / "server.log",
               "proc": proc, "config": config}
    finally:
        processes.close()


def counters(server) -> dict | None:
    status = read_status(server["run"])
    return status["counters"] if status else None


def settled(server, **expected: int) -> dict:
    """Status counters once they reached ``expected`` (the status file is rewritten every 0.5 s)."""
    return wait_for(lambda: (c := counters(server)) and all(c[k] >= v for k, v in expected.items()) and c, 10,
                    f"counters {expected}")


def trunk_forward(link: TrunkLink) -> torch.Tensor:
    hidden = torch.randn(2, 5, 128)
    return link.forward(Activations(hidden, torch.ones(2, 5, dtype=torch.long), torch.arange(5)[None]),
                        ("probe", 0, 0), training=False, need_input_grad=False)


def test_wrong_or_missing_token_is_refused_and_others_are_served(server):
    address, fp = server["address"], quickstart_fingerprint()
    before = settled(server)
    with pytest.raises(HandshakeError, match="authentication failed for client 'alice': wrong token"):
        TcpTransport(address, "alice", "0" * 64, fp, reconnect_timeout=5)
    with pytest.raises(HandshakeError, match="client 'alice' presented no token"):
        TcpTransport(address, "alice", None, fp, reconnect_timeout=5)
    with pytest.raises(HandshakeError, match="authentication failed for client 'mallory'"):
        TcpTransport(address, "mallory", server["tokens"]["alice"], fp, reconnect_timeout=5)
    after = settled(server, handshakes_refused=before["handshakes_refused"] + 3)
    assert after["forward"] == before["forward"] and after["handshakes"] == before["handshakes"]  # nothing computed
    log = server["log"].read_text()
    assert "refused client 'alice' from 127.0.0.1" in log and "wrong token" in log and "no token" in log
    assert server["tokens"]["alice"] not in log
    # The server keeps serving clients that authenticate.
    link = TrunkLink(TcpTransport(address, "bob", server["tokens"]["bob"], fp))
    assert trunk_forward(link).shape == (2, 5, 128)
    link.close()
    assert trunk_forward(link).shape == (2, 5, 128)  # a closed link opens a new session when used again
    link.close()
    assert settled(server, forward=before["forward"] + 2)["forward"] == before["forward"] + 2
    assert server["proc"].poll() is None


def _raw_handshake(address: str, hello: bytes, auth: bytes | None = None) -> tuple[dict, dict | None]:
    """Send recorded handshake frames on a fresh connection; returns the challenge and the final answer."""
    host, port = parse_address(address)
    with socket.create_connection((host, port), timeout=10) as sock:
        reader = SocketReader(sock)
        sock.sendall(hello)
        challenge = read_frame(reader, 0).header
        if auth is None:
            return challenge, None
        sock.sendall(auth)
        return challenge, read_frame(reader, 0).header


def test_a_replayed_handshake_is_refused(server):
    """Frames recorded from a successful handshake do not authenticate when sent again."""
    name, token, fp = "alice", server["tokens"]["alice"], quickstart_fingerprint()
    client_nonce = bytes(range(32))
    hello = b"".join(encode("hello", {"client": name, "nonce": client_nonce.hex(), "session": "s" * 32,
                                      "fingerprint": fp}))
    challenge, _ = _raw_handshake(server["address"], hello)
    # What an eavesdropper saw: the hello and a valid auth for that connection's server nonce.
    host, port = parse_address(server["address"])
    with socket.create_connection((host, port), timeout=10) as sock:
        reader = SocketReader(sock)
        sock.sendall(hello)
        server_nonce = bytes.fromhex(read_frame(reader, 0).header["nonce"])
        auth = b"".join(encode("auth", {"proof": _proof(token, b"client", client_nonce, server_nonce, name)}))
        sock.sendall(auth)
        welcome = read_frame(reader, 0).header
    assert welcome["kind"] == "welcome"
    replayed_challenge, answer = _raw_handshake(server["address"], hello, auth)
    assert replayed_challenge["nonce"] != server_nonce.hex() != challenge["nonce"]
    assert answer["kind"] == "error" and "authentication failed for client 'alice'" in answer["error"]


def test_a_server_that_replays_a_welcome_is_refused_by_the_client():
    """The client checks the server's proof over its own fresh nonce: a recorded welcome does not pass."""
    token = "t" * 64
    recorded_proof = _proof(token, b"server", b"\0" * 32, b"\1" * 32, "alice")  # from some earlier handshake
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def impostor() -> None:
        sock, _ = listener.accept()
        with sock:
            reader = SocketReader(sock)
            read_frame(reader, 0)
            send_frame(sock, encode("challenge", {"nonce": (b"\1" * 32).hex()}))
            read_frame(reader, 0)
            send_frame(sock, encode("welcome", {"proof": recorded_proof, "known": False, "step": 0, "saved": None}))

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    try:
        with pytest.raises(HandshakeError, match="could not prove it knows client 'alice'"):
            TcpTransport(f"127.0.0.1:{listener.getsockname()[1]}", "alice", token, {}, reconnect_timeout=2)
    finally:
        thread.join(timeout=10)
        listener.close()


def test_fingerprint_mismatch_names_the_difference(server, checkpoint):
    address, token = server["address"], server["tokens"]["alice"]
    with pytest.raises(HandshakeError, match=r"cuts: client \[1, 4\], server \[2, 4\]"):
        TcpTransport(address, "alice", token, quickstart_fingerprint((1, 4)))
    other, _ = checkpoint("qwen2")
    with pytest.raises(HandshakeError, match=r"hidden_size: client 32, server 128.*num_layers: client 4, server 6"):
        TcpTransport(address, "alice", token, fingerprint(other.config, "qwen2", (2, 4), torch.float32))
    # The same through fit: another cut is refused before anything is computed.
    before = settled(server)
    with pytest.raises(HandshakeError, match=r"cuts: client \[1, 4\], server \[2, 4\]"):
        main(["fit", "--config", str(server["config"]), "--model.transport", "tcp", "--model.address", address,
              "--model.client_name", "alice", "--model.cuts", "[1, 4]", "--model.token_file",
              str(_token_file(server, "alice"))])
    assert counters(server)["forward"] == before["forward"]


def _token_file(server, name: str) -> Path:
    path = server["run"].parent / f"{name}.token"
    path.write_text(server["tokens"][name] + "\n")
    return path


def test_a_client_resuming_at_another_step_is_refused(server):
    """The server is at step 0 with no checkpoints: a client resuming at step 7 hears both step numbers."""
    link = TrunkLink(TcpTransport(server["address"], "alice", server["tokens"]["alice"], quickstart_fingerprint()))
    with pytest.raises(RemoteError, match="resumes at step 7 but its trunk adapter is at step 0"):
        link.load("step-7")
    with pytest.raises(RemoteError, match="trains optimizer step 4 but its trunk adapter has made 0 steps"):
        hidden = torch.randn(1, 3, 128)
        link.forward(Activations(hidden, None, torch.arange(3)[None]), ("train", 3, 0), training=True,
                     need_input_grad=True, step=3)
    link.close()


def test_idle_connections_hold_no_slot_and_sessions_beyond_the_limit_are_told(server):
    """--max_connections 3 counts authenticated connections: three that never authenticate take none of them."""
    host, port = parse_address(server["address"])
    idle = [socket.create_connection((host, port), timeout=10) for _ in range(3)]
    links = []
    try:
        wait_for(lambda: (s := read_status(server["run"])) and s["handshakes"] == 3, 10, "three idle connections")
        links = [TcpTransport(server["address"], name, server["tokens"][name], quickstart_fingerprint())
                 for name in ("alice", "bob", "carol")]
        with pytest.raises(ConnectionError, match="connection limit"):  # a client retries, then says why
            TcpTransport(server["address"], "dave", server["tokens"]["dave"], quickstart_fingerprint(),
                         reconnect_timeout=1)
    finally:
        for sock in idle:
            sock.close()
        for transport in links:
            transport.close()
    wait_for(lambda: (s := read_status(server["run"])) and s["connections"] == 0, 10, "the connections to close")
    link = TrunkLink(TcpTransport(server["address"], "dave", server["tokens"]["dave"], quickstart_fingerprint()))
    assert trunk_forward(link).shape == (2, 5, 128)
    link.close()


def test_serve_limits_come_from_the_command_line(server):
    """This server runs with --max_batch 4 (a larger forward pass is refused before its payload is read) and
    --threads 1."""
    assert read_status(server["run"])["threads"] == 1
    link = TrunkLink(TcpTransport(server["address"], "bob", server["tokens"]["bob"], quickstart_fingerprint()))
    hidden = torch.randn(5, 3, 128)
    with pytest.raises(RemoteError, match=r"batch 5 x sequence 3 is outside 1\.\.4"):
        link.forward(Activations(hidden, None, torch.arange(3)[None]), ("probe", 0, 0), training=False,
                     need_input_grad=False)


# ------------------------------------------------------------------------------------------ TLS
@needs_openssl
def test_tls(procs, tmp_path):
    cert, key = self_signed(tmp_path, "server")
    stranger, _ = self_signed(tmp_path, "stranger")
    tokens, known = make_tokens(tmp_path, "alice")
    config = write_config(tmp_path / "config.yaml", tmp_path / "client")
    _, address = procs.serve(config, tokens, tmp_path / "run", "--tls_cert", str(cert), "--tls_key", str(key))
    fp = quickstart_fingerprint()
    link = TrunkLink(TcpTransport(address, "alice", known["alice"], fp, tls_ca=str(cert)))
    assert trunk_forward(link).shape == (2, 5, 128)
    link.close()
    with pytest.raises(HandshakeError, match="certificate"):
        TcpTransport(address, "alice", known["alice"], fp, tls_ca=str(stranger), reconnect_timeout=2)
    began = time.monotonic()
    with pytest.raises(HandshakeError, match="speaks TLS.*--model.tls_ca"):  # told at once, not retried
        TcpTransport(address, "alice", known["alice"], fp, reconnect_timeout=300)
    assert time.monotonic() - began < 5
