"""The ``dist`` transport keeps several requests in flight: ``submit`` returns before the server answers, replies
are read in order, each refusal or bad reply surfaces from the ``result()`` of the request it answers, ``close``
says goodbye after every pending reply, ``wire_bytes`` counts exactly what crossed; and a pipelined torchrun fit
gives the unpipelined one's and the in-process run's numbers.

Run as a script (``python test_dist_pipeline.py server|client FOLDER``) this file is one rank of the two-process
gloo job of :func:`test_submit_returns_before_the_server_answers` (rank 0: the real ``serve`` loop around a fake
trunk; rank 1: a :class:`~splittrain.transport.dist.DistTransport`).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from processes import Processes, assert_same_run, child_env, free_port, summary
from splittrain.transport import RemoteError
from splittrain.transport.wire import ProtocolError, encode, frame_bytes, join

pytestmark = pytest.mark.slow

HOLD_SECONDS = 30.0
"""How long the fake trunk holds its first answer of the burst, waiting for the client to have submitted all."""
FINGERPRINT = {"protocol": "test"}


def hidden(i: int) -> torch.Tensor:
    return torch.arange(12, dtype=torch.float32).reshape(1, 3, 4) + 100 * i


# ------------------------------------------------------------------------------------------------ the two ranks
class FakeTrunk:
    """What ``dist.serve`` asks of a trunk server: doubles ``hidden_states``, refuses ``key`` ["refuse"], and holds
    the request marked ``hold`` until the client says (a file) that every submit of its burst has returned."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.fingerprint = FINGERPRINT
        self.limits = SimpleNamespace(max_frame_bytes=1 << 20)
        self.events: list[Any] = []

    def open_session(self, client: str, session: str, schedule: Any) -> dict[str, Any]:
        return {}

    def check(self, client: str, header: dict, specs: list) -> None:
        pass

    def handle(self, client: str, kind: str, header: dict, tensors: dict, session: str | None = None):
        key = header["key"][0]
        if header.get("hold"):
            deadline = time.monotonic() + HOLD_SECONDS
            while not (self.folder / "submitted").exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no answer to request {header['seq']} before the client's burst was sent, "
                                       f"and after {HOLD_SECONDS:g} s the client had not sent it: submit waits")
                time.sleep(0.01)
            key = f"{key} (held until every submit had returned)"
        self.events.append(key)
        if key == "refuse":
            raise KeyError("refused on purpose")
        return {}, {"hidden_states": tensors["hidden_states"] * 2}

    def end_session(self, client: str, session: str | None = None) -> None:
        self.events.append("bye")

    def record(self, client: str, kind: str, received: int, sent: int) -> None:
        pass


def run_server(folder: Path) -> None:
    """Rank 0: serve the fake trunk, counting every byte it sends and receives."""
    import torch.distributed as dist

    from splittrain.transport.dist import serve

    counted = [0]

    def counting(op):
        def counted_op(tensor: torch.Tensor, *args, **kwargs):
            counted[0] += tensor.numel() * tensor.element_size()
            return op(tensor, *args, **kwargs)
        return counted_op

    dist.send, dist.recv = counting(dist.send), counting(dist.recv)
    trunk = FakeTrunk(folder)
    serve(trunk, timeout=60)
    (folder / "server.json").write_text(json.dumps({"events": trunk.events, "bytes": counted[0]}))


def run_client(folder: Path) -> None:
    """Rank 1: one request, a burst of submits before any reply is read, one request left pending at close."""
    from splittrain.transport.dist import DistTransport

    link = DistTransport(FINGERPRINT, timeout=60)
    _, reply = link.request("forward", {"key": ["plain"]}, {"hidden_states": hidden(0)})
    assert torch.equal(reply["hidden_states"], 2 * hidden(0))
    keys = ["held", "second", "refuse", "fourth"]
    burst = [link.submit("forward", {"key": [key], "hold": key == "held"}, {"hidden_states": hidden(i)})
             for i, key in enumerate(keys)]
    (folder / "submitted").write_text("every submit of the burst returned")  # the server answers only now
    assert torch.equal(burst[-1].result()[1]["hidden_states"], 2 * hidden(len(keys) - 1))  # reads the earlier ones too
    for i, (key, pending) in enumerate(zip(keys, burst)):
        if key == "refuse":
            with pytest.raises(RemoteError, match="refused on purpose"):
                pending.result()
        else:
            assert torch.equal(pending.result()[1]["hidden_states"], 2 * hidden(i))
    last = link.submit("forward", {"key": ["pending at close"]}, {"hidden_states": hidden(9)})
    link.close()
    assert torch.equal(last.result()[1]["hidden_states"], 2 * hidden(9))
    (folder / "client.json").write_text(json.dumps({"wire_bytes": link.wire_bytes}))


# ------------------------------------------------------------------------------------------------ tests
def test_submit_returns_before_the_server_answers(procs, tmp_path):
    """Over gloo the server answers the burst's first request only after the client has submitted every one of
    them; the server counts the bytes the client's ``wire_bytes`` says crossed."""
    env = child_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    ranks = [procs.start([sys.executable, __file__, role, str(tmp_path)], tmp_path / f"{role}.log",
                         env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
             for rank, role in enumerate(("server", "client"))]
    for rank in reversed(ranks):  # the client's failure, if any, says more than the server's
        Processes.finish(rank, timeout=120)
    server = json.loads((tmp_path / "server.json").read_text())
    client = json.loads((tmp_path / "client.json").read_text())
    assert server["events"] == ["plain", "held (held until every submit had returned)", "second", "refuse",
                                "fourth", "pending at close", "bye"]
    assert client["wire_bytes"] == server["bytes"]


class _SentWork:
    def wait(self) -> bool:
        return True


def fake_link(monkeypatch, backend: str, replies: list[list]) -> tuple[Any, Any, list[bytes]]:
    """A DistTransport of rank 1 under ``backend`` whose frames go to a list and whose replies come from
    ``replies`` (the welcome first); returns it, the replies' reader and the frames sent."""
    import torch.distributed

    from splittrain.transport import dist as dist_transport
    from splittrain.transport.wire import BufferReader

    sent: list[bytes] = []
    reader = BufferReader(b"".join(join(r) for r in [encode("welcome", {"fingerprint": FINGERPRINT}), *replies]))
    monkeypatch.setattr(dist_transport, "ensure_process_group", lambda timeout: (1, 2))
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *group: backend)
    monkeypatch.setattr(dist_transport, "DistReader", lambda src: reader)
    monkeypatch.setattr(dist_transport, "send_frame", lambda buffers, dst: sent.append(join(buffers)) or
                        frame_bytes(buffers))
    monkeypatch.setattr(dist_transport, "post_frame", lambda buffers, dst: sent.append(join(buffers)) or
                        [_SentWork()])
    return dist_transport.DistTransport(FINGERPRINT), reader, sent


def test_each_reply_surfaces_from_its_own_result(monkeypatch):
    """A refusal raises from the result() of the request it answers and later replies still arrive; a bad reply
    raises there too, and nothing after it can be read; close() then does not wait for the server."""
    replies = [encode("reply", {"seq": 1}, {"hidden_states": 2 * hidden(1)}),
               encode("error", {"error": "refused on purpose", "seq": 2, "fatal": False}),
               encode("reply", {"seq": 3}, {"hidden_states": 2 * hidden(3)}),
               encode("reply", {"seq": 4}, {"hidden_states": torch.zeros(2, 2)}),  # not the shape sent
               encode("reply", {"seq": 5}, {"hidden_states": 2 * hidden(5)})]
    link, reader, sent = fake_link(monkeypatch, "gloo", replies)
    welcome = reader.position
    pending = [link.submit("forward", {"key": [i]}, {"hidden_states": hidden(i)}) for i in range(1, 6)]
    assert reader.position == welcome and len(sent) == 6  # the hello and five frames out, no reply read
    assert torch.equal(pending[2].result()[1]["hidden_states"], 2 * hidden(3))
    with pytest.raises(RemoteError, match="refused on purpose"):
        pending[1].result()
    assert torch.equal(pending[0].result()[1]["hidden_states"], 2 * hidden(1))
    with pytest.raises(ProtocolError, match="replied to forward"):
        pending[3].result()
    with pytest.raises(RuntimeError, match="broke off before request 5"):
        pending[4].result()
    assert link.wire_bytes == sum(len(s) for s in sent) + welcome + sum(frame_bytes(r) for r in replies[:3])
    link.close()
    assert len(sent) == 6  # no goodbye on a broken stream


def test_under_nccl_submit_reads_its_reply(monkeypatch):
    """nccl queues a rank pair's sends and receives on one stream: a request is answered before submit returns."""
    link, reader, sent = fake_link(monkeypatch, "nccl", [encode("reply", {"seq": 1}, {"hidden_states": hidden(1)}),
                                                         encode("reply", {"seq": 2})])
    pending = link.submit("forward", {"key": [1]}, {"hidden_states": hidden(1)})
    assert not link.outstanding and torch.equal(pending.result()[1]["hidden_states"], hidden(1))
    link.close()
    assert len(sent) == 3 and reader.position == len(reader.data)


def test_torchrun_pipelined_equals_unpipelined_and_in_process(reference_run, procs, tmp_path):
    """The README's torchrun line (``--standalone``, 2 processes): whole batches over dist give the in-process
    run's losses and weights within 1e-6 (the in-process run the suite proves equal to monolithic peft), and 4
    micro-batches in flight give both within 1e-5."""
    config, ref = reference_run
    runs = {pipeline: tmp_path / f"pipeline{pipeline}" for pipeline in (1, 4)}
    jobs = [procs.start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         "-m", "splittrain", "fit", "--config", str(config), "--model.transport", "dist",
                         "--model.pipeline", str(pipeline), "--trainer.default_root_dir", str(run)],
                        tmp_path / f"torchrun{pipeline}.log")
            for pipeline, run in runs.items()]
    for job in jobs:
        Processes.finish(job, timeout=300)
    assert_same_run(runs[4], runs[4], runs[1], tolerance=1e-5)
    assert_same_run(runs[4], runs[4], ref, tolerance=1e-5)
    assert_same_run(runs[1], runs[1], ref)
    # wire_bytes counts what crossed the process group, headers too: more than the tensors in process. The same
    # tensors cross pipelined; 4 frames per batch and direction instead of 1 add their headers.
    assert summary(runs[1])["wire_bytes"] > summary(ref)["wire_bytes"]
    assert 1.0 < summary(runs[4])["wire_bytes"] / summary(runs[1])["wire_bytes"] < 1.05


if __name__ == "__main__":
    {"server": run_server, "client": run_client}[sys.argv[1]](Path(sys.argv[2]))
