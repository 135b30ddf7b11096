"""torch.distributed transport: the trunk server is rank 0 of a ``torchrun`` job, the client rank 1.

One node::

    torchrun --standalone --nproc_per_node 2 -m splittrain fit --config C --model.transport dist

Two nodes: run the same line on each, ``--node_rank 0`` on the server's machine. The static rendezvous
(torchrun's default) is what pins rank 0, and so the trunk, to node 0; under ``--rdzv_backend c10d`` torchrun
ignores ``--node_rank`` and rank 0 may land on the client's machine::

    torchrun --nnodes 2 --nproc_per_node 1 --node_rank R --master_addr HOST0 --master_port 29500 \\
        -m splittrain fit --config C --model.transport dist

Frames are :mod:`~splittrain.transport.wire` frames sent as uint8 tensors over point-to-point ``send``/``recv``
(preamble, header, then the payload's parts), so the receiver checks lengths and the header before it allocates
the payload, exactly as over TCP. gloo on CPU, nccl with CUDA. The processes of one job trust each other
(torchrun's rendezvous admits them), so there is no token; the fingerprints are still compared.

A client keeps several requests in flight (pipelined micro-batches): ``submit`` posts its frame's parts with
``isend`` and returns, and replies are read in order as ``result()`` asks for them. gloo sends a part only once the
server has posted its receive, from gloo's own thread, so the client is never blocked sending frame k+1 while the
server is blocked sending reply k. Under nccl a rank pair's sends and receives queue on one CUDA stream, where a
frame queued before an unread reply would wait for it forever: there ``submit`` reads its reply before it returns.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import threading
from collections import deque
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from . import Header, LinkOptions, RemoteError, Tensors, fingerprint_mismatch
from .protocol import check_reply, reply_limit, serve_frames
from .wire import Frame, ProtocolError, encode, frame_bytes, read_frame

SERVER_RANK = 0


def ensure_process_group(timeout: float) -> tuple[int, int]:
    """Join torchrun's process group (gloo on CPU, nccl with CUDA); returns (rank, world size)."""
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise RuntimeError("transport 'dist' runs under torchrun: torchrun --standalone --nproc_per_node 2 "
                               "-m splittrain fit --config C --model.transport dist")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    return dist.get_rank(), dist.get_world_size()


_CLIENT_GROUP: Any = None


def client_group() -> Any:
    """The process group of the client ranks only (1..world-1): client-side averages never reach rank 0.

    Every rank creates it when it joins (:func:`serve` and :class:`DistTransport`), as ``new_group`` requires."""
    global _CLIENT_GROUP
    if _CLIENT_GROUP is None:
        world = dist.get_world_size()
        if world < 3:
            raise RuntimeError("client-side averaging needs at least 2 client ranks (3 processes)")
        _CLIENT_GROUP = dist.new_group(ranks=list(range(1, world)))
    return _CLIENT_GROUP


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


class DistReader:
    """Exact reads of one frame's parts from a peer (the first read may come from any rank); what it returns is
    the received tensor's own memory."""

    def __init__(self, src: int | None) -> None:
        self.src, self.received = src, 0

    def read(self, n: int) -> memoryview:
        return self.read_payload(n, [n])

    def read_payload(self, n: int, parts: list[int]) -> memoryview:
        """``n`` bytes that arrive as messages of ``parts`` bytes (the sender's buffers), received in place."""
        buffer = torch.empty(n, dtype=torch.uint8, device=_device())
        offset = 0
        for size in parts:
            sender = dist.recv(buffer[offset:offset + size], src=self.src)
            self.src = sender if self.src is None else self.src
            offset += size
        self.received += n
        return memoryview((buffer.cpu() if buffer.is_cuda else buffer).numpy())


def _parts(buffers: list) -> Iterator[torch.Tensor]:
    """An encoded frame as the messages it crosses in: preamble, header, the payload's safetensors header, then each
    tensor straight from its memory (the receiver knows the sizes from the frame's header:
    :func:`~.wire.payload_parts`)."""
    device = _device()
    parts = [buffers[0], buffers[1], b"".join(buffers[2:4]), *buffers[4:]] if len(buffers) > 2 else buffers
    for part in parts:
        if len(part):
            data = torch.frombuffer(part if not isinstance(part, bytes) else bytearray(part), dtype=torch.uint8)
            yield data.to(device)


def send_frame(buffers: list, dst: int) -> int:
    """Send an encoded frame (:func:`_parts`) and return its size once every part has left."""
    for data in _parts(buffers):
        dist.send(data, dst=dst)
    return frame_bytes(buffers)


def post_frame(buffers: list, dst: int) -> list:
    """Start sending an encoded frame (:func:`_parts`) without waiting: each returned work completes once the
    receiver has taken its part. Keep them until then: gloo drops the send of a work that is gone."""
    return [dist.isend(data, dst=dst) for data in _parts(buffers)]


# ================================================================================================ server
def serve(server: Any, timeout: float = 600.0) -> None:
    """Rank 0: answer the client ranks until every one of them has said goodbye."""
    rank, world = ensure_process_group(timeout)
    if rank != SERVER_RANK:
        raise RuntimeError(f"the trunk server runs on rank {SERVER_RANK}, not {rank}")
    if world < 2:
        raise RuntimeError("transport 'dist' needs at least 2 processes (--nproc_per_node 2): rank 0 serves the "
                           "trunk, the others are clients")
    federation = getattr(server, "federation", None)
    clients = federation.clients if federation is not None else 1
    if world - 1 != clients:
        raise RuntimeError(f"{world} processes make {world - 1} client rank(s) but the config has {clients} client(s): "
                           f"run --nproc_per_node {clients + 1} (rank 0 serves the trunk) or set "
                           f"--model.federated.clients {world - 1}")
    if world > 2:
        client_group()
    print(f"splittrain: trunk server on rank 0 (host {socket.gethostname()}) serving client ranks "
          f"{list(range(1, world))}", file=sys.stderr, flush=True)
    failures: list[BaseException] = []

    def serve_rank(rank: int) -> None:
        try:
            _serve_rank(server, rank)
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    # One thread per client rank, as over TCP: a client waiting at a federation's synchronisation point does
    # not hold up the others.
    threads = [threading.Thread(target=serve_rank, args=(rank,), name=f"splittrain-rank{rank}", daemon=True)
               for rank in range(1, world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    print("splittrain: every client said goodbye; the trunk server on rank 0 stops", file=sys.stderr, flush=True)


def _serve_rank(server: Any, rank: int) -> None:
    """Answer client ``rank`` until it says goodbye."""
    client = f"rank{rank}"
    serve_frames(server, client, lambda: DistReader(rank), lambda buffers: send_frame(buffers, rank),
                 hello=lambda frame: _hello(server, rank, client, frame), fatal_protocol_errors=False)


def _hello(server: Any, rank: int, client: str, frame: Frame) -> None:
    """Open ``client``'s session (rank ``rank``) if its fingerprint and trunk schedule are the server's."""
    claimed = frame.header.get("fingerprint")
    mismatch = fingerprint_mismatch(claimed if isinstance(claimed, dict) else {}, server.fingerprint)
    if mismatch:
        send_frame(encode("error", {"error": f"the trunk server serves another split: {mismatch}", "fatal": True}),
                   rank)
        raise RuntimeError(f"rank {rank} has another split than the trunk server: {mismatch}")
    try:
        resume = server.open_session(client, frame.header.get("session", client), frame.header.get("schedule"))
    except ValueError as exc:  # another trunk schedule
        send_frame(encode("error", {"error": str(exc), "fatal": True}), rank)
        raise RuntimeError(f"rank {rank} refused: {exc}") from None
    send_frame(encode("welcome", {"fingerprint": server.fingerprint, **resume}), rank)


# ================================================================================================ client
class _Request:
    """A request of a :class:`DistTransport` in flight; ``result()`` reads replies until its own is there."""

    def __init__(self, transport: "DistTransport", kind: str, seq: int, tensors: Tensors, sends: list) -> None:
        self.transport, self.kind, self.seq, self.sends = transport, kind, seq, sends
        self.check, self.limit = check_reply(kind, tensors), reply_limit(tensors)
        self.frame: Frame | None = None

    def result(self) -> tuple[Header, Tensors]:
        self.transport._read_until(self)
        if self.frame.kind == "error":
            raise RemoteError(f"trunk server: {self.frame.header.get('error')}")
        return {k: v for k, v in self.frame.header.items() if k not in ("kind", "tensors", "seq")}, self.frame.tensors


class DistTransport:
    """Client side: this rank talks to the trunk server on rank 0 of the same torchrun job."""

    def __init__(self, fingerprint: dict[str, Any], timeout: float = 600.0,
                 schedule: dict[str, Any] | None = None) -> None:
        """``schedule``: the trunk schedule this client trains with, compared with the server's at the handshake."""
        self.rank, self.world = ensure_process_group(timeout)
        if self.rank == SERVER_RANK:
            raise RuntimeError(f"rank {SERVER_RANK} runs the trunk server, not a client")
        if self.world > 2:
            client_group()
        self.pipelined = dist.get_backend() != "nccl"
        """Whether requests stay in flight after ``submit`` (module docstring)."""
        self.wire_bytes = 0
        self.seq = 0
        self.closed = False
        self.outstanding: deque[_Request] = deque()
        """Requests sent whose replies have not been read yet, oldest first."""
        self.broken: BaseException | None = None
        """What broke the stream of replies (a bad reply, a failed receive): nothing more can be read after it."""
        hello = {"client": f"rank{self.rank}", "session": secrets.token_hex(16), "fingerprint": fingerprint}
        if schedule is not None:
            hello["schedule"] = schedule
        reply = self._exchange(encode("hello", hello), lambda h, s: None)
        if reply.kind == "error":
            raise RemoteError(f"the trunk server on rank {SERVER_RANK} refused rank {self.rank}: "
                              f"{reply.header.get('error')}")
        print(f"splittrain: client rank {self.rank} (host {socket.gethostname()}) talks to the trunk server on rank "
              f"{SERVER_RANK}", file=sys.stderr, flush=True)

    def _exchange(self, buffers: list, check: Callable, limit: int = 0) -> Frame:
        """One frame and its reply, nothing else in flight (the handshake and the goodbye)."""
        self.wire_bytes += send_frame(buffers, SERVER_RANK)
        frame = read_frame(DistReader(SERVER_RANK), limit, check)
        self.wire_bytes += frame.nbytes
        return frame

    def request(self, kind: str, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        return self.submit(kind, header, tensors).result()

    def submit(self, kind: str, header: Header, tensors: Tensors) -> _Request:
        """Send a request without waiting for its reply (under nccl: having read it); replies come back in the
        order requests were sent."""
        if self.closed:
            raise RuntimeError("this client said goodbye to the trunk server on rank 0; it serves no more requests")
        self.seq += 1
        buffers = encode(kind, {**header, "seq": self.seq}, tensors)
        request = _Request(self, kind, self.seq, tensors, post_frame(buffers, SERVER_RANK))
        self.wire_bytes += frame_bytes(buffers)
        self.outstanding.append(request)
        if not self.pipelined:
            self._read_until(request)
        return request

    def _read_until(self, request: _Request) -> None:
        """Read replies, in order, until ``request`` has its own (a refusal stays with the request it answers)."""
        while request.frame is None:
            if self.broken is not None:
                raise RuntimeError(f"the replies from the trunk server on rank {SERVER_RANK} broke off before request "
                                   f"{request.seq} ({self.broken})") from self.broken
            head = self.outstanding[0]
            try:
                for work in head.sends:
                    work.wait()
                frame = read_frame(DistReader(SERVER_RANK), head.limit, head.check)
                if frame.kind != "error" and frame.header.get("seq") != head.seq:
                    raise ProtocolError(f"reply to request {frame.header.get('seq')} while waiting for {head.seq}")
            except BaseException as exc:  # the rest of the stream cannot be read in step any more
                self.broken = exc
                raise
            self.wire_bytes += frame.nbytes
            self.outstanding.popleft()
            head.frame, head.sends = frame, []

    def close(self) -> None:
        """Say goodbye once every reply in flight is read: the server stops once every client rank has."""
        if self.closed:
            return
        self.closed = True
        if self.broken is not None:  # the server cannot be told; torchrun ends the job when this rank fails
            return
        if self.outstanding:
            self._read_until(self.outstanding[-1])
        self.seq += 1
        self._exchange(encode("bye", {"seq": self.seq}), lambda h, s: None)


def connect(options: LinkOptions) -> DistTransport:
    """The registered entry point: this rank's client side, talking to rank 0 of this torchrun job."""
    return DistTransport(options.fingerprint, timeout=options.timeout, schedule=options.schedule)
