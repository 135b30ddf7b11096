"""TrunkServer: sessions, exactly-once replies and steps, bounded graphs, frame checks (mostly without sockets; the
requests in flight over a loopback connection)."""

from __future__ import annotations

import sys
import time

import pytest
import torch
from processes import needs_openssl, self_signed

from splittrain.lora import LoraSettings
from splittrain.optim import OptimSettings
from splittrain.server import ServerLimits, SessionBusy, TrunkServer, load_trunk
from splittrain.state import load_state
from splittrain.transport.wire import ProtocolError, TensorSpec

HIDDEN = 32


@pytest.fixture
def make_server(checkpoint, tmp_path):
    _, folder = checkpoint("qwen2")

    def make(**limits) -> TrunkServer:
        trunk = load_trunk(str(folder), (1, 3), LoraSettings(r=4, alpha=8), seed=1)
        return TrunkServer(trunk, OptimSettings(lr=1e-2), run_dir=tmp_path / "run", limits=ServerLimits(**limits))

    return make


def forward(server: TrunkServer, client: str, micro: int, seq: int | None = None, step: int = 0, batch: int = 2,
            session: str | None = None):
    g = torch.Generator().manual_seed(micro)
    header = {"key": ["train", step, micro], "training": True, "need_input_grad": True, "step": step}
    if seq is not None:
        header["seq"] = seq
    tensors = {"hidden_states": torch.randn(batch, 5, HIDDEN, generator=g), "position_ids": torch.arange(5)[None]}
    return server.handle(client, "forward", header, tensors, session)[1]["hidden_states"]


def backward(server: TrunkServer, client: str, micro: int, seq: int | None = None, step: int = 0, batch: int = 2):
    header = {"key": ["train", step, micro]}
    if seq is not None:
        header["seq"] = seq
    grad = torch.full((batch, 5, HIDDEN), 0.1)
    return server.handle(client, "backward", header, {"grad": grad})[1]


def trunk_grads(server: TrunkServer) -> dict[str, torch.Tensor]:
    """The trunk gradients waiting for a step, in every session."""
    return {f"{s.client}/{n}": g.clone() for s in server.sessions.values() for n, g in s.grads.items()}


def test_a_repeated_request_is_answered_not_reapplied(make_server):
    server = make_server()
    server.open_session("alice", "s1")
    forward(server, "alice", 0, seq=1, session="s1")
    backward(server, "alice", 0, seq=2)
    once = trunk_grads(server)
    again = backward(server, "alice", 0, seq=2)  # the reply was lost; the client sends the same request again
    assert torch.equal(again["grad"], server.sessions["alice"].replies[2][1]["grad"])
    assert all(torch.equal(once[k], v) for k, v in trunk_grads(server).items())
    assert server.counters["replies_repeated"] == 1 and server.counters["backward"] == 1
    with pytest.raises(ProtocolError, match="older than the last one answered"):
        backward(server, "alice", 0, seq=1)


def test_replies_in_flight_are_kept_until_acknowledged(make_server):
    """A pipelining client has several requests in flight (it acknowledges the replies it has): after a lost
    connection each of them is answered again from the cache, and an acknowledged reply is forgotten."""
    server = make_server()
    header = lambda micro, seq, ack: {"key": ["train", 0, micro], "training": True, "need_input_grad": True,
                                      "step": 0, "seq": seq, "ack": ack}
    hidden = {m: {"hidden_states": torch.randn(2, 5, HIDDEN), "position_ids": torch.arange(5)[None]} for m in range(3)}
    replies = [server.handle("alice", "forward", header(m, m + 1, 0), hidden[m])[1]["hidden_states"] for m in range(3)]
    assert sorted(server.sessions["alice"].replies) == [1, 2, 3] and server.counters["forward"] == 3
    # the client had read only the first reply when the connection dropped: it sends the other two again
    for m in (1, 2):
        again = server.handle("alice", "forward", header(m, m + 1, 1), hidden[m])[1]["hidden_states"]
        assert torch.equal(again, replies[m])
    assert server.counters["forward"] == 3 and server.counters["replies_repeated"] == 2
    assert sorted(server.sessions["alice"].replies) == [2, 3]
    server.handle("alice", "backward", {"key": ["train", 0, 0], "seq": 4, "ack": 3}, {"grad": torch.ones(2, 5, HIDDEN)})
    assert sorted(server.sessions["alice"].replies) == [4]
    with pytest.raises(ProtocolError, match="its reply is gone"):
        server.handle("alice", "forward", header(2, 3, 3), hidden[2])


def test_each_step_is_applied_once(make_server):
    server = make_server()
    forward(server, "alice", 0)
    backward(server, "alice", 0)
    assert server.handle("alice", "step", {"step": 1, "scale": None}, {})[0]["step"] == 1
    weights = {n: p.detach().clone() for n, p in server.trainable}
    assert server.handle("alice", "step", {"step": 1, "scale": None}, {})[0]["step"] == 1  # answered, not applied
    assert all(torch.equal(weights[n], p) for n, p in server.trainable)
    assert server.counters["steps_applied"] == 1 and server.counters["steps_repeated"] == 1
    with pytest.raises(RuntimeError, match="asks for optimizer step 3 but its trunk adapter has made 1 steps"):
        server.handle("alice", "step", {"step": 3, "scale": None}, {})
    with pytest.raises(RuntimeError, match="trains optimizer step 1 but its trunk adapter has made 1 steps"):
        forward(server, "alice", 1, step=0)


def test_one_live_session_per_name_and_a_replaced_session_takes_its_graphs(make_server):
    server = make_server(session_timeout=0.5)
    assert server.open_session("alice", "old")["known"] is False
    forward(server, "alice", 0, session="old")
    backward(server, "alice", 0)
    forward(server, "alice", 1, session="old")
    assert server.status()["gradients_waiting"] and server.status()["sessions"]["alice"]["graphs"] == 1
    # A second process under the same name is refused while the first is connected, and while its session waits
    # for it to reconnect; the first one's work is untouched.
    with pytest.raises(SessionBusy, match="connected from another process"):
        server.open_session("alice", "new")
    server.detach("alice", "old")
    with pytest.raises(SessionBusy, match="disconnected 0 s ago") as refused:
        server.open_session("alice", "new")
    assert 0 < refused.value.retry_after <= 0.5
    assert server.sessions["alice"].graphs and trunk_grads(server)
    # Gone past the session timeout: the new session replaces it, and the half-made step is gone.
    time.sleep(0.6)
    assert server.open_session("alice", "new")["known"] is False
    assert not server.sessions["alice"].graphs and trunk_grads(server) == {}
    with pytest.raises(ProtocolError, match="replaced by a newer one"):
        forward(server, "alice", 2, session="old")
    assert server.open_session("alice", "new")["known"] is True  # a reconnect of the same session
    # A client that said goodbye frees its name at once.
    server.end_session("alice", "new")
    assert server.open_session("alice", "third")["known"] is False


def test_a_silent_session_expires_and_old_graphs_go(make_server):
    server = make_server(session_timeout=5.0, max_graph_age=60.0)
    server.open_session("alice", "s")
    forward(server, "alice", 0, session="s")
    server.detach("alice", "s")
    server.expire(now=time.monotonic() + 1)
    assert "alice" in server.sessions  # still within the timeout: it may reconnect
    server.open_session("alice", "s")
    server.expire(now=time.monotonic() + 120)
    assert not server.sessions["alice"].graphs and server.counters["graphs_dropped"] == 1
    server.detach("alice", "s")
    server.expire(now=time.monotonic() + 10)
    assert "alice" not in server.sessions and server.counters["sessions_expired"] == 1


def test_graphs_are_bounded_per_client_by_count_and_bytes(make_server):
    server = make_server(max_graphs=3)
    for micro in range(5):
        forward(server, "alice", micro)
    forward(server, "bob", 0)
    assert list(server.sessions["alice"].graphs) == [("train", 0, m) for m in (2, 3, 4)]
    assert len(server.sessions["bob"].graphs) == 1  # one client's graphs never push out another's
    with pytest.raises(KeyError, match=r"no forward pass of client 'alice' is waiting .* \['train', 0, 0\]"):
        backward(server, "alice", 0)
    one = server.sessions["bob"].graph_bytes
    assert one > 2 * 5 * HIDDEN * 4  # the activations the trunk keeps for backward, not only its input
    server = make_server(max_graph_bytes=int(2.5 * one))
    for micro in range(4):
        forward(server, "alice", micro)
    assert len(server.sessions["alice"].graphs) == 2


def test_non_finite_tensors_never_reach_the_trunk(make_server):
    server = make_server()
    tensors = {"hidden_states": torch.full((1, 3, HIDDEN), float("nan")), "position_ids": torch.arange(3)[None]}
    with pytest.raises(ValueError, match="non-finite"):
        server.handle("alice", "forward", {"key": ["t", 0, 0], "training": True, "step": 0}, tensors)
    forward(server, "alice", 0)
    with pytest.raises(ValueError, match="non-finite"):
        server.handle("alice", "backward", {"key": ["train", 0, 0]}, {"grad": torch.full((2, 5, HIDDEN), float("inf"))})
    assert trunk_grads(server) == {}


def spec(name: str, dtype: str, *shape: int) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


@pytest.mark.parametrize("header, specs, message", [
    ({"kind": "forward", "seq": 1, "key": ["k"]}, [spec("hidden_states", "float32", 2, 5, 16),
                                                   spec("position_ids", "int64", 1, 5)], r"\(batch, seq, 32\)"),
    ({"kind": "forward", "seq": 1, "key": ["k"]}, [spec("hidden_states", "int64", 2, 5, 32),
                                                   spec("position_ids", "int64", 1, 5)], "float32"),
    ({"kind": "forward", "seq": 1, "key": ["k"]}, [spec("hidden_states", "float32", 2, 5, 32),
                                                   spec("position_ids", "int64", 3, 5)], "position_ids"),
    ({"kind": "forward", "seq": 1, "key": ["k"]}, [spec("hidden_states", "float32", 2, 5, 32),
                                                   spec("position_ids", "int64", 1, 5),
                                                   spec("attention_mask", "uint8", 2, 4)], "attention_mask"),
    ({"kind": "forward", "seq": 1, "key": ["k"]}, [spec("hidden_states", "float32", 9000, 5, 32),
                                                   spec("position_ids", "int64", 1, 5)], "outside"),
    ({"kind": "forward", "seq": 1, "key": [{"a": 1}]}, [spec("hidden_states", "float32", 2, 5, 32),
                                                        spec("position_ids", "int64", 1, 5)], "'key'"),
    ({"kind": "forward", "seq": 1, "key": ["k"], "training": True}, [
        spec("hidden_states", "float32", 2, 5, 32), spec("position_ids", "int64", 1, 5)], "optimizer step"),
    ({"kind": "backward", "seq": 1, "key": ["k"]}, [spec("grad", "float32", 2, 5, 8)], r"seq <= \d+, 32\)"),
    ({"kind": "step", "seq": 1, "step": 1, "scale": 3.0}, [], "scale"),
    ({"kind": "step", "seq": 1, "step": 1, "scale": None}, [spec("x", "float32", 1)], "no tensors"),
    ({"kind": "save", "seq": 1, "tag": "../../etc/passwd"}, [], "bad checkpoint tag"),
    ({"kind": "forward", "key": ["k"]}, [], "'seq'"),
    ({"kind": "shutdown", "seq": 1}, [], "unknown message kind"),
])
def test_frame_headers_are_checked_against_the_model(make_server, header, specs, message):
    with pytest.raises(ProtocolError, match=message):
        make_server().check("alice", header, specs)


def test_backward_shape_must_match_its_forward(make_server):
    server = make_server()
    forward(server, "alice", 0)
    server.check("alice", {"kind": "backward", "seq": 1, "key": ["train", 0, 0]}, [spec("grad", "float32", 2, 5, 32)])
    with pytest.raises(ProtocolError, match=r"gradient of shape \[1, 5, 32\] for an output of shape \[2, 5, 32\]"):
        server.check("alice", {"kind": "backward", "seq": 1, "key": ["train", 0, 0]},
                     [spec("grad", "float32", 1, 5, 32)])


def test_resume_takes_the_checkpoint_written_last(make_server):
    server = make_server()
    forward(server, "alice", 0)
    backward(server, "alice", 0)
    server.handle("alice", "step", {"step": 1, "scale": None}, {})
    server.save("step-1")
    state = {n: p.detach().clone() for n, p in server.trainable}
    assert (server.run_dir / "trunk" / "alice" / "step-1.safetensors").is_file()
    fresh = make_server()
    assert fresh.resume() == {"alice": 1} and fresh.adapter("alice").saved_step == 1
    assert all(torch.equal(state[n], p) for n, p in fresh.trainable)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_tcp_server_in_a_thread_serves_a_link(make_server, host, tmp_path):
    """TcpServer and TcpTransport in one process (IPv4 and IPv6 loopback): a training micro-batch and a step."""
    import threading

    from splittrain.cut import TrunkLink
    from splittrain.segments import Activations
    from splittrain.transport.tcp import TcpServer, TcpTransport

    server = make_server()
    try:
        tcp = TcpServer(server, f"[{host}]:0" if ":" in host else f"{host}:0", {"alice": "a" * 32},
                        status_file=tmp_path / "status.json")
    except OSError as exc:
        pytest.skip(f"no {host} here: {exc}")
    thread = threading.Thread(target=tcp.serve_forever, daemon=True)
    thread.start()
    try:
        link = TrunkLink(TcpTransport(tcp.address, "alice", "a" * 32, server.fingerprint))
        hidden = torch.randn(2, 5, HIDDEN, requires_grad=True)
        state = Activations(hidden, torch.ones(2, 5, dtype=torch.long), torch.arange(5)[None])
        out = link.forward(state, ("train", 0, 0), training=True, need_input_grad=True, step=0)
        grad = link.backward(("train", 0, 0), torch.ones_like(out))
        assert out.shape == grad.shape == (2, 5, HIDDEN) and grad.abs().sum() > 0
        assert link.step(1)["step"] == 1 and server.steps == 1
        assert link.wire_bytes > 4 * hidden.nbytes  # four tensors of this size crossed, plus headers
        link.close()
        assert "alice" not in server.sessions
    finally:
        tcp.stop()
        thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.parametrize("tls", [False, pytest.param(True, marks=needs_openssl)], ids=["plain", "tls"])
def test_requests_in_flight_survive_a_lost_connection(make_server, tmp_path, tls):
    """Three training forward passes in flight when the connection drops, before any reply was read (over TLS
    too): the client reconnects, sends them again, and the server answers each from its reply cache without
    running it twice."""
    import threading

    from splittrain.cut import TrunkLink
    from splittrain.segments import Activations
    from splittrain.transport.tcp import TcpServer, TcpTransport, server_tls_context

    server = make_server()
    cert, key = self_signed(tmp_path, "server") if tls else (None, None)
    tcp = TcpServer(server, "127.0.0.1:0", {"alice": "a" * 32}, tls=server_tls_context(str(cert), str(key)) if tls else None)
    thread = threading.Thread(target=tcp.serve_forever, daemon=True)
    thread.start()
    try:
        transport = TcpTransport(tcp.address, "alice", "a" * 32, server.fingerprint, reconnect_timeout=10,
                                 tls_ca=str(cert) if tls else None)
        link = TrunkLink(transport)
        g = torch.Generator().manual_seed(0)
        states = [Activations(torch.randn(2, 5, HIDDEN, generator=g), torch.ones(2, 5, dtype=torch.long),
                              torch.arange(5)[None]) for _ in range(3)]
        pending = [link.send_forward(state, ("train", 0, i), True, False, 0) for i, state in enumerate(states)]
        assert len(transport.outstanding) == 3  # all in flight at once: none waited for an earlier reply
        deadline = time.monotonic() + 10
        while server.counters["forward"] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        transport.sock.close()  # the replies waiting in its buffer are lost with it
        outs = [p.result()[1]["hidden_states"] for p in pending]
        assert server.counters["forward"] == 3 and server.counters["replies_repeated"] == 3
        for state, out in zip(states, outs):  # each reply is that micro-batch's trunk output
            assert torch.equal(out, link.forward(state, ("eval", 0), training=False, need_input_grad=False))
        for i in range(3):
            link.backward(("train", 0, i), torch.ones(2, 5, HIDDEN))
        assert link.step(1)["step"] == 1 and server.counters["backward"] == 3
        link.close()
    finally:
        tcp.stop()
        thread.join(timeout=10)


def _train(server: TrunkServer, plan: list[tuple[str, str, int]]) -> dict[str, list[torch.Tensor]]:
    """Run ``plan``'s (client, kind, step) requests in order; each client's inputs depend only on the client and the
    step. Returns every client's replies (trunk outputs, input gradients, grad norms) in order."""
    seen: dict[str, list[torch.Tensor]] = {}
    for client, kind, step in plan:
        g = torch.Generator().manual_seed(1000 * (client == "bob") + step)
        x, dy = torch.randn(2, 5, HIDDEN, generator=g), torch.randn(2, 5, HIDDEN, generator=g)
        if kind == "forward":
            header = {"key": ["train", step, 0], "training": True, "need_input_grad": True, "step": step}
            reply = server.handle(client, kind, header, {"hidden_states": x, "position_ids": torch.arange(5)[None]})
        elif kind == "backward":
            reply = server.handle(client, kind, {"key": ["train", step, 0]}, {"grad": dy})
        elif kind == "norm":
            reply = server.handle(client, "grad_sq_norm", {}, {})
        elif kind == "save":
            reply = server.handle(client, "save", {"tag": f"step-{step}"}, {})
        else:
            reply = server.handle(client, "step", {"step": step + 1, "scale": 0.5}, {})
        seen.setdefault(client, []).extend(t.clone() for t in reply[1].values())
    return seen


def test_independent_clients_train_their_own_adapters_bit_identically(make_server):
    """Two clients interleaved on one server (each also reading norms and saving under the same tags) end exactly
    as each trained alone: replies, adapter weights, files. The second client costs its adapter and optimizer."""
    steps = 3
    plan = {c: [(c, kind, s) for s in range(steps) for kind in ("forward", "backward", "norm", "step", "save")]
            for c in ("alice", "bob")}
    alone = {}
    for client in ("alice", "bob"):
        server = make_server()
        alone[client] = (_train(server, plan[client]), {n: p.detach().clone() for n, p in server.trainable})
    shared = make_server()
    base = sum(p.nbytes for p in shared.trunk.parameters())
    # bob's passes land between alice's forward and backward, and his step between her norm and her step
    order = [("alice", "forward"), ("bob", "forward"), ("alice", "backward"), ("bob", "backward"), ("bob", "norm"),
             ("alice", "norm"), ("bob", "step"), ("alice", "step"), ("bob", "save"), ("alice", "save")]
    interleaved = [(c, kind, s) for s in range(steps) for c, kind in order]
    assert sorted(interleaved) == sorted(plan["alice"] + plan["bob"])
    replies = _train(shared, interleaved)
    for client in ("alice", "bob"):
        want_replies, want_weights = alone[client][0][client], alone[client][1]
        assert len(replies[client]) == len(want_replies) == 3 * steps  # outputs, input gradients, norms
        assert all(torch.equal(a, b) for a, b in zip(replies[client], want_replies))
        adapter = shared.adapter(client)
        assert adapter.steps == steps and all(torch.equal(want_weights[n], p) for n, p in adapter.trainable)
        saved = load_state(shared.run_dir / "trunk" / client / f"step-{steps - 1}.safetensors")
        assert all(torch.equal(saved["trainable"][n], want_weights[n]) for n in want_weights)
    # The base is held once: the trunk grew by bob's adapter alone.
    grown = sum(p.nbytes for p in shared.trunk.parameters()) - base
    bob = shared.adapter("bob")
    assert grown == sum(p.nbytes for _, p in bob.trainable) > 0
    assert 3 * grown <= bob.nbytes <= 3 * grown + 8 * len(bob.trainable)  # the adapter, AdamW's moments and steps
    print(f"trunk {base} bytes; a second client's adapter {grown} bytes, with its optimizer {bob.nbytes}")
    assert shared.status()["adapters"].keys() == {"alice", "bob"} and shared.status()["step"] is None


def test_a_new_client_leaves_the_others_running_their_own_adapters(make_server):
    """A client that connects (its adapter made at the handshake, peft injecting it) between another's steps does
    not change what the trunk runs for that other one."""
    one_step = [("alice", "forward", 0), ("alice", "backward", 0), ("alice", "step", 0), ("alice", "forward", 1)]
    alone, shared = make_server(), make_server()
    want = _train(alone, one_step)["alice"]
    got = _train(shared, one_step[:3])["alice"]
    shared.open_session("mallory", "m1")
    got += _train(shared, one_step[3:])["alice"]
    assert len(got) == len(want) == 3 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_client_reaches_only_its_own_state(make_server):
    """An authenticated attacker's made-up passes, steps, norms, saves and loads leave the victim as it was."""
    server = make_server()
    _train(server, [("alice", "forward", 0), ("alice", "backward", 0)])
    waiting = dict(server.sessions["alice"].grads)
    norm = server.handle("alice", "grad_sq_norm", {}, {})[1]["sq_norm"]
    attack = [("mallory", kind, 0) for kind in ("forward", "backward", "norm", "step", "save")]
    _train(server, attack)
    assert server.handle("alice", "grad_sq_norm", {}, {})[1]["sq_norm"] == norm
    assert all(torch.equal(waiting[n], g) for n, g in server.sessions["alice"].grads.items())
    assert server.adapter("alice").steps == 0 and server.adapter("mallory").steps == 1
    assert (server.run_dir / "trunk" / "mallory" / "step-0.safetensors").is_file()
    assert not (server.run_dir / "trunk" / "alice").exists()
    with pytest.raises(FileNotFoundError, match="no checkpoint 'step-9'"):
        server.handle("mallory", "load", {"tag": "step-9"}, {})
    with pytest.raises(KeyError, match="no forward pass of client 'mallory'"):  # alice's graph is not its to finish
        server.handle("mallory", "backward", {"key": ["train", 0, 0]}, {"grad": torch.zeros(2, 5, HIDDEN)})


def test_a_federation_is_trained_only_by_its_members_and_refuses_another_schedule(checkpoint, tmp_path):
    from splittrain.federated import FederatedSettings

    _, folder = checkpoint("qwen2")
    trunk = load_trunk(str(folder), (1, 3), LoraSettings(r=4, alpha=8), seed=1)
    optim = OptimSettings(lr=1e-2, schedule="linear")
    server = TrunkServer(trunk, optim, total_steps=800, run_dir=tmp_path / "run",
                         federation=FederatedSettings(clients=2))
    # The schedule is the federation's: a client that trains with another is refused, both values named.
    with pytest.raises(ValueError, match=r"another schedule: total_steps 24 \(server: 800\)"):
        server.open_session("alice", "a1", optim.resolved(24))
    server.open_session("alice", "a1", optim.resolved(800))
    with pytest.raises(RuntimeError, match="has not joined the federation"):
        forward(server, "alice", 0, session="a1")
    server.handle("alice", "join", {"index": 0, "samples": 10}, {}, "a1")
    forward(server, "alice", 0, session="a1")
    backward(server, "alice", 0)
    server.handle("alice", "save", {"tag": "step-0"}, {}, "a1")
    # An outsider (a generation from a checkpoint) may run the trunk but not take it back while alice trains ...
    server.open_session("reader", "r1")
    inference = {"key": ["eval", 0], "training": False, "need_input_grad": False}
    tensors = {"hidden_states": torch.randn(2, 5, HIDDEN), "position_ids": torch.arange(5)[None]}
    assert server.handle("reader", "forward", inference, tensors, "r1")[1]["hidden_states"].shape == (2, 5, HIDDEN)
    with pytest.raises(RuntimeError, match="has not joined the federation"):
        forward(server, "reader", 1, session="r1")
    for kind, header in (("save", {"tag": "mine"}), ("grad_sq_norm", {}), ("step", {"step": 1, "scale": None})):
        with pytest.raises(RuntimeError, match="has not joined the federation"):
            server.handle("reader", kind, header, {}, "r1")
    with pytest.raises(RuntimeError, match="training the federation with client.*'alice'.*--force_load"):
        server.handle("reader", "load", {"tag": "step-0"}, {}, "r1")
    assert server.sessions["alice"].grads  # alice's half-made step is still there
    # ... unless it says so, or the members are gone.
    assert server.handle("reader", "load", {"tag": "step-0", "force": True}, {}, "r1")[0]["step"] == 0
    server.detach("alice", "a1")
    assert server.handle("reader", "load", {"tag": "step-0"}, {}, "r1")[0]["step"] == 0


@needs_openssl
def test_handshake_mistakes_are_named_at_once(make_server, tmp_path):
    """A hello that declares tensors is told so; a TLS client of a plain server and a client whose CA file is
    missing stop at once, naming the option; a failed construction leaves no noise from __del__."""
    import gc
    import socket
    import threading

    from splittrain.transport import RemoteError
    from splittrain.transport.tcp import HandshakeError, SocketReader, TcpServer, TcpTransport, parse_address
    from splittrain.transport.wire import PREAMBLE, encode, read_frame

    server = make_server()
    tcp = TcpServer(server, "127.0.0.1:0", {"alice": "a" * 32})
    thread = threading.Thread(target=tcp.serve_forever, daemon=True)
    thread.start()
    try:
        with socket.create_connection(parse_address(tcp.address), timeout=10) as sock:
            # a header that declares a tensor, and no payload
            preamble, header = encode("hello", {"client": "alice"}, {"x": torch.zeros(2)})[:2]
            magic, version, flags, header_len, _ = PREAMBLE.unpack(bytes(preamble))
            sock.sendall(PREAMBLE.pack(magic, version, flags, header_len, 0) + bytes(header))
            answer = read_frame(SocketReader(sock), 0).header
        assert answer["kind"] == "error" and "a hello frame carries no tensors, this one declares 1" in answer["error"]
        cert, _ = self_signed(tmp_path, "server")
        began = time.monotonic()
        with pytest.raises(HandshakeError, match="does not speak TLS.*drop --model.tls_ca"):
            TcpTransport(tcp.address, "alice", "a" * 32, server.fingerprint, tls_ca=str(cert), reconnect_timeout=300)
        assert time.monotonic() - began < 5
        with pytest.raises((OSError, RemoteError)):
            TcpTransport(tcp.address, "alice", "a" * 32, server.fingerprint, tls_ca=str(tmp_path / "missing.pem"))
        unraisable = []
        hook = sys.unraisablehook
        sys.unraisablehook = unraisable.append
        try:
            with pytest.raises(ValueError, match="HOST:PORT"):
                TcpTransport("no-port", "alice", "a" * 32, server.fingerprint)
            gc.collect()
        finally:
            sys.unraisablehook = hook
        assert not unraisable, unraisable
    finally:
        tcp.stop()
        thread.join(timeout=10)


def test_a_refused_frame_is_not_sent_again(make_server):
    """A request the server refuses as a bad frame (and closes the connection on) is dropped by the client: close()
    neither waits for its reply nor reconnects to send it again."""
    import threading

    from splittrain.transport import RemoteError
    from splittrain.transport.tcp import TcpServer, TcpTransport

    server = make_server()
    tcp = TcpServer(server, "127.0.0.1:0", {"alice": "a" * 32})
    thread = threading.Thread(target=tcp.serve_forever, daemon=True)
    thread.start()
    try:
        transport = TcpTransport(tcp.address, "alice", "a" * 32, server.fingerprint)
        wrong = {"hidden_states": torch.zeros(2, 5, HIDDEN + 1), "position_ids": torch.arange(5)[None]}
        with pytest.raises(RemoteError, match="bad frame: hidden_states must be"):
            transport.request("forward", {"key": ["eval", 0], "training": False, "need_input_grad": False}, wrong)
        assert not transport.outstanding
        began = time.monotonic()
        transport.close()
        assert time.monotonic() - began < 2 and server.counters["handshakes"] == 1
    finally:
        tcp.stop()
        thread.join(timeout=10)


def test_client_names_cannot_leave_the_trunk_folder():
    """A client's name is the folder of its checkpoints (trunk/<name>/): names of dots only are refused."""
    from splittrain.transport.tcp import _check_name

    for name in (".", "..", "...", "a/b", ""):
        with pytest.raises(ProtocolError, match="client names"):
            _check_name(name)
    assert _check_name("lab.two@site-1") == "lab.two@site-1"
