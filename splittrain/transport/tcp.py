"""TCP transport: a trunk server that organisations which do not trust each other can reach over a socket.

Server (``python -m splittrain serve``)::

    python -m splittrain serve --config C --address 127.0.0.1:7000 --tokens tokens.json [--tls_cert F --tls_key F]

Client (``python -m splittrain fit --config C --model.transport tcp --model.address HOST:PORT``).

Every connection starts with a mutual HMAC-SHA256 challenge-response: the client sends its name and a fresh
nonce, the server answers with its own fresh nonce, the client proves it holds its token by an HMAC over both
nonces and its name, and only then does the server prove the same and compare the two sides' fingerprints.
The token never crosses the wire and a replayed handshake fails on the other side's new nonce. Then frames
(:mod:`~splittrain.transport.wire`) go back and forth; the server checks each header against the session's
model before it reads the payload, answers a bad frame with an error and closes that connection.

A client may keep several requests in flight (pipelined micro-batches): its frames leave from a sender thread,
replies come back in order, and each request acknowledges the replies the client has, so the server keeps only
the unacknowledged ones. A client whose server goes away reconnects with backoff and resumes its session: every
request in flight is sent again on the new connection and answered from the server's reply cache, never applied
twice. If the server itself restarted
(``serve --resume``, from a checkpoint it writes every ``--save_every`` steps), the client replays the
micro-batches of the steps the server had not yet saved, so no step is lost or repeated.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import queue
import secrets
import socket
import ssl
import sys
import threading
import time
from collections import OrderedDict, deque
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy

from ..errors import UserError
from . import Header, LinkOptions, RemoteError, ServerUnavailable, SessionBusy, Tensors, fingerprint_mismatch
from .protocol import check_reply, reply_limit, serve_frames
from .wire import (
    Frame,
    PeerClosed,
    ProtocolError,
    TensorSpec,
    encode,
    frame_bytes,
    read_frame,
)

log = logging.getLogger("splittrain.tcp")

NONCE_BYTES = 32
HANDSHAKE_TIMEOUT = 5.0
TLS_HANDSHAKE = b"\x16"
"""The first byte a TLS client sends (a handshake record)."""
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-@")
_LOGGED_KINDS = ("forward", "backward", "step", "aggregate")  # what a restarted server must see again


class HandshakeError(RemoteError):
    """Authentication or fingerprint check failed; retrying cannot help."""


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host or int(port) > 65535:
        raise UserError(f"address must be HOST:PORT (e.g. 127.0.0.1:7000), got {address!r}")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_tokens(path: str | Path) -> dict[str, str]:
    """``tokens.json``: ``{"client name": "token", ...}``; warns when others may read it."""
    import json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokens file {path} does not exist; make one with `python -m splittrain token "
                                f"--tokens {path} --client NAME --out NAME.token`")
    try:
        tokens = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(tokens, dict) or not tokens or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tokens.items()):
        raise UserError(f"{path} must map client names to tokens: {{\"client0\": \"<token>\"}}")
    for name, token in tokens.items():
        _check_name(name)
        if len(token) < 16:
            raise UserError(f"the token of client {name!r} in {path} is shorter than 16 characters; make one with "
                             "`python -m splittrain token`")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        log.warning("%s can be read by other users of this machine: chmod 600 it", path)
    return tokens


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= 64 or not set(name) <= _NAME_CHARS or not name.strip("."):
        raise ProtocolError("client names are 1-64 characters of letters, digits and _.-@, not only dots (a name is "
                            "the folder of its trunk checkpoints)")
    return name


def _proof(token: str, role: bytes, client_nonce: bytes, server_nonce: bytes, name: str) -> str:
    message = b"\0".join([b"splittrain-v1", role, client_nonce, server_nonce, name.encode()])
    return hmac.new(token.encode(), message, sha256).hexdigest()


def _nonce(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * NONCE_BYTES:
        raise ProtocolError("a nonce is 64 hexadecimal characters")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ProtocolError("a nonce is 64 hexadecimal characters") from None


class SocketReader:
    """Exact reads from a socket; counts the bytes it received.

    Large reads land in a buffer whose pages are only touched as bytes arrive, so a peer that declares a big
    payload and sends nothing holds no memory.
    """

    def __init__(self, sock: socket.socket | TlsChannel) -> None:
        self.sock, self.received = sock, 0

    def read(self, n: int) -> memoryview:
        view = memoryview(numpy.empty(n, dtype=numpy.uint8)) if n > 1 << 16 else memoryview(bytearray(n))
        got = 0
        while got < n:
            count = self.sock.recv_into(view[got:], min(n - got, 1 << 22))
            if count == 0:
                raise PeerClosed(f"connection closed after {got} of {n} bytes" if got else "connection closed")
            got += count
        self.received += n
        return view


class TlsChannel:
    """A client's TLS connection over a plain socket through memory BIOs, so that one thread sends while another
    receives (an ``ssl.SSLSocket`` must not be used from two threads at once). One lock guards the TLS state, held
    only while it encrypts or decrypts; another keeps the ciphertext records in order on the socket. Has the socket
    methods this module uses."""

    CHUNK = 1 << 18
    """Plaintext encrypted per step of a send: the ciphertext buffer stays small, whatever the tensor's size."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, server_hostname: str) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname)
        self.state, self.sending = threading.Lock(), threading.Lock()
        while True:
            try:
                with self.state:
                    self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise PeerClosed("connection closed during the TLS handshake") from None
        self._flush()

    def _flush(self) -> None:
        """Send what the TLS state has written (handshake and post-handshake messages)."""
        with self.sending:
            with self.state:
                data = self.outgoing.read()
            if data:
                self.sock.sendall(data)

    def _fill(self) -> bool:
        """Feed the next bytes from the socket to the TLS state; False at the end of the stream."""
        data = self.sock.recv(self.CHUNK)
        with self.state:
            if data:
                self.incoming.write(data)
            else:
                self.incoming.write_eof()
        return bool(data)

    def sendall(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        with self.sending:
            for offset in range(0, view.nbytes, self.CHUNK):
                with self.state:
                    self.tls.write(view[offset:offset + self.CHUNK])
                    out = self.outgoing.read()
                self.sock.sendall(out)

    def recv_into(self, view: memoryview, n: int) -> int:
        """Like ``socket.recv_into``: up to ``n`` plaintext bytes into ``view``, 0 at the end of the stream. What
        decrypting makes TLS write back (a key update's answer) leaves with the next send: this thread never waits
        for the sending one, which may be blocked until the peer reads."""
        eof = False
        while True:
            with self.state:
                try:
                    return self.tls.read(n, view)
                except ssl.SSLWantReadError:
                    if eof:
                        return 0
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return 0
            eof = not self._fill()

    def settimeout(self, value: float | None) -> None:
        self.sock.settimeout(value)

    def shutdown(self, how: int) -> None:
        self.sock.shutdown(how)

    def close(self) -> None:
        self.sock.close()


def send_frame(sock: socket.socket | TlsChannel, buffers: list) -> int:
    """Send an encoded frame straight from its buffers (the tensors' own memory): one gathering ``sendmsg`` per
    kernel write on a plain socket; over TLS the small parts are joined and the tensors written one by one."""
    total = frame_bytes(buffers)
    if isinstance(sock, (ssl.SSLSocket, TlsChannel)):
        sock.sendall(b"".join(buffers[:4]))  # preamble, header, safetensors length and header
        for buffer in buffers[4:]:
            sock.sendall(buffer)
        return total
    views = [memoryview(b) for b in buffers if len(b)]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            if sent >= views[0].nbytes:
                sent -= views.pop(0).nbytes
            else:
                views[0], sent = views[0][sent:], 0
    return total


SOCKET_BUFFER = 4 << 20
"""Send and receive buffer asked of the kernel per connection (it caps them at net.core.[rw]mem_max): a whole
micro-batch of activations can be on its way while both sides compute."""


def tune(sock: socket.socket) -> None:
    """No Nagle delay (replies are small and awaited), large buffers, keepalive probes."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        if sock.getsockopt(socket.SOL_SOCKET, option) < SOCKET_BUFFER:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
    _keepalive(sock)


class FrameSender:
    """Sends one connection's frames in order from a thread of its own, so the caller computes and reads replies
    while a frame is on its way. A failed send shuts the socket down, so the reader sees the connection end."""

    def __init__(self, sock: socket.socket | TlsChannel, name: str) -> None:
        self.sock = sock
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def put(self, buffers: list) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(buffers)

    def _run(self) -> None:
        while (buffers := self.queue.get()) is not None:
            try:
                send_frame(self.sock, buffers)
            except OSError as exc:
                self.error = exc
                _cut_off(self.sock)
                return

    def stop(self) -> None:
        """No more frames (one being sent fails once the socket closes)."""
        self.queue.put(None)


def _keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def _cut_off(sock: socket.socket | TlsChannel) -> None:
    """End a connection from another thread: blocked reads return at once."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _read_small(reader: SocketReader, kinds: tuple[str, ...]) -> Frame:
    """A handshake frame: no payload, one of ``kinds``."""

    def check(header: Header, specs: list[TensorSpec]) -> None:
        if header["kind"] not in kinds:
            raise ProtocolError(f"expected a {' or '.join(kinds)} frame, got {header['kind']!r}")
        if specs:
            raise ProtocolError(f"a {header['kind']} frame carries no tensors, this one declares {len(specs)}")

    return read_frame(reader, 0, check)


# ================================================================================================ server
class TcpServer:
    """Serves a :class:`~splittrain.server.TrunkServer` on a TCP socket, one thread per connection.

    Connections that have not authenticated cannot crowd out the ones that have: a handshake must end within
    ``handshake_timeout`` seconds; at most ``max_handshakes`` run at once and ``max_handshakes_per_address`` from one
    address, and a new connection past either limit takes the place of the oldest handshake (of its own address, or
    of the address holding the most), so connections held open without a handshake make room for a real client's.
    Authenticated connections have slots of their own (``max_connections``).

    Args:
        server: the trunk server (its lock serializes trunk compute; sockets are served concurrently).
        address: ``HOST:PORT`` to bind (port 0 picks a free one; see :attr:`address`).
        tokens: client name -> token.
        tls: a server-side ``ssl.SSLContext``, or None for plain TCP (warned about off loopback).
        max_connections: authenticated connections served at once; more are answered "busy" and closed.
        idle_timeout: seconds an authenticated connection may stay silent.
        status_file: where to write the server's status (counters, sessions) every ``status_every`` s.
        handshake_timeout: seconds a connection has to authenticate (TLS included).
        max_handshakes: connections authenticating at once.
        max_handshakes_per_address: connections authenticating at once from one address.
    """

    def __init__(self, server: Any, address: str, tokens: dict[str, str], tls: ssl.SSLContext | None = None,
                 max_connections: int = 64, idle_timeout: float = 3600.0, status_file: str | Path | None = None,
                 status_every: float = 0.5, handshake_timeout: float = HANDSHAKE_TIMEOUT, max_handshakes: int = 64,
                 max_handshakes_per_address: int = 8) -> None:
        self.server, self.tokens, self.tls = server, dict(tokens), tls
        self.idle_timeout, self.status_every = idle_timeout, status_every
        self.handshake_timeout, self.max_handshakes = handshake_timeout, max_handshakes
        self.max_handshakes_per_address = max_handshakes_per_address
        self.status_file = Path(status_file) if status_file is not None else None
        host, port = parse_address(address)
        if not is_loopback(host) and tls is None:
            banner = "!" * 100
            message = (f"{banner}\nsplittrain: serving on {host}:{port} WITHOUT TLS: activations, gradients and "
                       "tensors cross the network in clear. Use --tls_cert/--tls_key off a private network.\n"
                       f"{banner}")
            print(message, file=sys.stderr, flush=True)
            log.warning("serving on %s:%d without TLS", host, port)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(128)
        self.listener.settimeout(0.25)
        self.address = f"{host}:{self.listener.getsockname()[1]}" if family == socket.AF_INET else \
            f"[{host}]:{self.listener.getsockname()[1]}"
        self.slots = threading.BoundedSemaphore(max_connections)
        self.handshakes: OrderedDict[int, tuple[str, socket.socket, float]] = OrderedDict()
        """Connections authenticating, oldest first: number -> (peer host, socket, when it was accepted)."""
        self._handshakes_lock = threading.Lock()
        self._accepted = 0
        self.stopping = threading.Event()
        self.threads: set[threading.Thread] = set()
        self._dummy_key = secrets.token_hex(32)  # unknown names cost the same HMAC as known ones

    # ------------------------------------------------------------------------------------------ lifecycle
    def serve_forever(self) -> None:
        """Accept connections until :meth:`stop`; a housekeeping thread ends late handshakes, expires sessions
        and writes status."""
        housekeeping = threading.Thread(target=self._housekeeping, name="splittrain-housekeeping", daemon=True)
        housekeeping.start()
        try:
            while not self.stopping.is_set():
                try:
                    sock, peer = self.listener.accept()
                except (socket.timeout, BlockingIOError):
                    continue
                except OSError:
                    if self.stopping.is_set():
                        break
                    raise
                number = self._admit(sock, peer[0])
                thread = threading.Thread(target=self._connection, args=(sock, peer, number), daemon=True,
                                          name=f"splittrain-conn-{peer[1]}")
                self.threads.add(thread)
                thread.start()
        finally:
            self.listener.close()
            housekeeping.join(timeout=2)

    def stop(self) -> None:
        self.stopping.set()

    def _admit(self, sock: socket.socket, host: str) -> int:
        """Register a new connection's handshake; past a limit, the oldest handshake of its address (or of the
        address holding the most) is cut off to make room."""
        with self._handshakes_lock:
            self._accepted += 1
            waiting = self.handshakes
            same = [n for n, (h, _, _) in waiting.items() if h == host]
            victim = None
            if len(same) >= self.max_handshakes_per_address:
                victim = same[0]
            elif len(waiting) >= self.max_handshakes:
                hosts = [h for h, _, _ in waiting.values()]
                heaviest = max(set(hosts), key=hosts.count)
                victim = next(n for n, (h, _, _) in waiting.items() if h == heaviest)
            if victim is not None:
                _cut_off(waiting.pop(victim)[1])
                self.server.count("handshakes_evicted")
            waiting[self._accepted] = (host, sock, time.monotonic())
            return self._accepted

    def _end_late_handshakes(self) -> None:
        """Cut off connections that have not authenticated within ``handshake_timeout`` (however slowly they
        trickle bytes)."""
        deadline = time.monotonic() - self.handshake_timeout
        with self._handshakes_lock:
            for number in [n for n, (_, _, began) in self.handshakes.items() if began < deadline]:
                _cut_off(self.handshakes.pop(number)[1])

    def _refuse_busy(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(1.0)
            send_frame(sock, encode("error", {"error": "the trunk server is at its connection limit; retry later",
                                              "fatal": True, "retry": True}))
        except OSError:
            pass

    def _housekeeping(self) -> None:
        while not self.stopping.wait(min(self.status_every, self.handshake_timeout / 4)):
            try:
                self._end_late_handshakes()
                self.server.expire()
                self.write_status()
            except Exception:  # never let housekeeping kill the server
                log.exception("housekeeping failed")
        self.write_status()

    def status(self) -> dict[str, Any]:
        """The trunk server's status with this listener's (address, connections and handshakes open)."""
        return {**self.server.status(), "address": self.address, "connections": len(self.threads),
                "handshakes": len(self.handshakes)}

    def write_status(self) -> None:
        if self.status_file is None:
            return
        import json

        status = self.status()
        tmp = self.status_file.with_name(self.status_file.name + ".tmp")
        self.status_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(status, indent=1) + "\n")
        tmp.replace(self.status_file)

    # ------------------------------------------------------------------------------------------ one connection
    def _connection(self, sock: socket.socket, peer: tuple, number: int) -> None:
        where = f"{peer[0]}:{peer[1]}"
        client = session_id = None
        try:
            try:
                tune(sock)  # keepalive: a peer that vanishes without closing is noticed in about two minutes
                sock.settimeout(self.handshake_timeout)
                if not self._same_protocol(sock, where):
                    return
                if self.tls is not None:
                    sock = self.tls.wrap_socket(sock, server_side=True)
                reader = SocketReader(sock)
                client, session_id = self._handshake(sock, reader, where)
            finally:
                with self._handshakes_lock:
                    self.handshakes.pop(number, None)
            if client is None:
                return
            sock.settimeout(self.idle_timeout)
            serve_frames(self.server, client, lambda: reader, lambda buffers: send_frame(sock, buffers),
                         session=session_id, log=log)
        except (OSError, PeerClosed, ssl.SSLError) as exc:
            log.info("connection from %s ended: %s", where, exc)
        except ServerUnavailable as exc:
            log.info("closed the connection of %s (%s) without a reply: %s", where, client, exc)
        except ProtocolError as exc:
            self.server.count("frames_refused")
            log.warning("refused a frame from %s (%s): %s", where, client or "unauthenticated", exc)
            self._send_error(sock, f"bad frame: {exc}")
        except Exception:
            log.exception("connection from %s failed", where)
            self._send_error(sock, "internal server error")
        finally:
            if client is not None:
                self.server.detach(client, session_id)
                self.slots.release()
            try:
                sock.close()
            except OSError:
                pass
            self.threads.discard(threading.current_thread())

    def _same_protocol(self, sock: socket.socket, where: str) -> bool:
        """Whether the client speaks what this server does (TLS or plain); a plain client of a TLS server is told
        in plain which option it lacks (a TLS client of a plain server recognises the plain answer itself)."""
        first = sock.recv(1, socket.MSG_PEEK)
        if not first:
            return False
        tls_client = first == TLS_HANDSHAKE
        if tls_client == (self.tls is not None):
            return True
        self.server.count("handshakes_refused")
        log.warning("refused %s: it speaks %s, this server %s", where, "TLS" if tls_client else "plain TCP",
                    "plain TCP" if tls_client else "TLS")
        if not tls_client:
            self._send_error(sock, "this trunk server speaks TLS: give the client the CA file that signed the "
                                   "server's certificate (--model.tls_ca)")
        else:
            self._send_error(sock, "this trunk server does not speak TLS")
        return False

    def _send_error(self, sock: socket.socket, message: str, seq: int | None = None, fatal: bool = True,
                    retry_after: float | None = None) -> None:
        header = {"error": message, "seq": seq, "fatal": fatal}
        if retry_after is not None:
            header.update(retry=True, retry_after=round(retry_after, 3))
        try:
            send_frame(sock, encode("error", header))
        except (OSError, ProtocolError):
            pass

    def _refuse(self, sock: socket.socket, where: str, name: Any, why: str, tell: str,
                retry_after: float | None = None) -> tuple[None, None]:
        self.server.count("handshakes_refused")
        log.warning("refused client %r from %s: %s", name, where, why)
        self._send_error(sock, tell, retry_after=retry_after)
        return None, None

    def _handshake(self, sock: socket.socket, reader: SocketReader, where: str) -> tuple[str | None, str | None]:
        hello = _read_small(reader, ("hello",)).header
        name = _check_name(hello.get("client"))
        client_nonce = _nonce(hello.get("nonce"))
        session_id = hello.get("session")
        if not isinstance(session_id, str) or not 0 < len(session_id) <= 64:
            raise ProtocolError("hello needs a session id")
        server_nonce = secrets.token_bytes(NONCE_BYTES)
        send_frame(sock, encode("challenge", {"nonce": server_nonce.hex()}))
        auth = _read_small(reader, ("auth",)).header
        proof = auth.get("proof")
        token = self.tokens.get(name)
        expected = _proof(token or self._dummy_key, b"client", client_nonce, server_nonce, name)
        if proof is None:
            return self._refuse(sock, where, name, "it presented no token",
                                f"authentication failed: client {name!r} presented no token (set SPLITTRAIN_TOKEN or "
                                "--model.token_file)")
        if not isinstance(proof, str) or not hmac.compare_digest(proof.encode(), expected.encode()) or token is None:
            return self._refuse(sock, where, name, "wrong token or unknown client name",
                                f"authentication failed for client {name!r}: wrong token or a name the server "
                                "does not know")
        claimed = hello.get("fingerprint")
        mismatch = fingerprint_mismatch(claimed if isinstance(claimed, dict) else {}, self.server.fingerprint)
        if mismatch:
            return self._refuse(sock, where, name, f"fingerprint mismatch: {mismatch}",
                                f"the trunk server serves another split: {mismatch}")
        if not self.slots.acquire(blocking=False):
            return self._refuse(sock, where, name, "at the connection limit",
                                "the trunk server is at its connection limit; retry later", retry_after=1.0)
        try:
            resume = self.server.open_session(name, session_id, hello.get("schedule"))
        except SessionBusy as exc:
            self.slots.release()
            self.server.count("sessions_refused")
            return self._refuse(sock, where, name, str(exc), str(exc), exc.retry_after)
        except ProtocolError:
            self.slots.release()
            raise
        except ValueError as exc:  # another schedule
            self.slots.release()
            return self._refuse(sock, where, name, str(exc), str(exc))
        self.server.count("handshakes")
        try:
            send_frame(sock, encode("welcome", {
                "proof": _proof(token, b"server", client_nonce, server_nonce, name),
                "fingerprint": self.server.fingerprint, **resume}))
        except OSError:  # cut off (deadline, eviction) after the session opened: give back its slot and connection
            self.server.detach(name, session_id)
            self.slots.release()
            raise
        log.info("client %r connected from %s (session %s, %s)", name, where, session_id[:8],
                 "resumed" if resume["known"] else "new")
        return name, session_id


# ================================================================================================ client
class _Request:
    """A request of a :class:`TcpTransport` in flight; ``result()`` reads replies until its own is there."""

    def __init__(self, transport: "TcpTransport", kind: str, header: Header, tensors: Tensors,
                 entry: tuple | None) -> None:
        self.transport, self.kind, self.header, self.tensors, self.entry = transport, kind, header, tensors, entry
        self.frame: Frame | None = None

    def result(self) -> tuple[Header, Tensors]:
        return self.transport._wait(self)

    def reply(self) -> tuple[Header, Tensors]:
        if self.frame.kind == "error":
            raise RemoteError(f"trunk server: {self.frame.header.get('error')}")
        return {k: v for k, v in self.frame.header.items() if k not in ("kind", "tensors", "seq")}, self.frame.tensors


class TcpTransport:
    """Client side of the TCP transport: authenticated, optionally TLS, reconnecting with backoff.

    Args:
        address: ``HOST:PORT`` of the server.
        client_name: this client's name in the server's tokens file.
        token: this client's token (None: the server refuses us with a clear message).
        fingerprint: this client's :func:`~splittrain.transport.fingerprint`.
        tls_ca: CA file that signed the server's certificate; enables TLS.
        timeout: seconds to wait for a connection or a reply.
        reconnect_timeout: seconds to keep reconnecting before giving up.
        schedule: the trunk schedule this client trains with (:meth:`~splittrain.optim.OptimSettings.resolved`);
            the server makes this client's adapter with it, or refuses one that differs from its federation's.
    """

    def __init__(self, address: str, client_name: str, token: str | None, fingerprint: dict[str, Any],
                 tls_ca: str | None = None, timeout: float = 600.0, reconnect_timeout: float = 300.0,
                 schedule: dict[str, Any] | None = None) -> None:
        self.sock: socket.socket | TlsChannel | None = None
        self.sender: FrameSender | None = None
        self.host, self.port = parse_address(address)
        self.address = address
        self.client_name = _check_name(client_name)
        self._token = token
        self.fingerprint, self.schedule = fingerprint, schedule
        self.timeout, self.reconnect_timeout = timeout, reconnect_timeout
        self.tls = ssl.create_default_context(cafile=tls_ca) if tls_ca else None
        self.session = secrets.token_hex(16)
        self.wire_bytes = 0
        self.seq = 0
        self.reader: SocketReader | None = None
        self.server_step = 0
        self.replay_from = 0
        """The replay log covers every step after this one (the server's last durable step)."""
        self.replay: list[tuple[int, str, Header, Tensors]] = []
        self.outstanding: deque[_Request] = deque()
        """Requests sent whose replies have not been read yet, oldest first."""
        self.acked = 0
        """The last seq whose reply this client has (the server may forget the replies up to it)."""
        self.joined: Header | None = None
        """The ``join`` this session sent to take part in a federation: a restarted server is sent it again."""
        self.closed = False
        self._connect_with_retry(None)

    def __repr__(self) -> str:  # the token stays out of reprs and logs
        return f"TcpTransport({self.address!r}, client_name={self.client_name!r})"

    # ------------------------------------------------------------------------------------------ connection
    def _open(self) -> dict[str, Any]:
        sock = socket.create_connection((self.host, self.port), timeout=min(self.timeout, 30.0))
        try:
            tune(sock)
            if self.tls is not None:
                sock = TlsChannel(sock, self.tls, self.host)
            sock.settimeout(self.timeout)
            reader = SocketReader(sock)
            client_nonce = secrets.token_bytes(NONCE_BYTES)
            hello = {"client": self.client_name, "nonce": client_nonce.hex(), "session": self.session,
                     "fingerprint": self.fingerprint}
            if self.schedule is not None:
                hello["schedule"] = self.schedule
            sent = send_frame(sock, encode("hello", hello))
            challenge = _read_small(reader, ("challenge", "error"))
            self._raise_refusal(challenge)
            server_nonce = _nonce(challenge.header.get("nonce"))
            proof = None if self._token is None else _proof(self._token, b"client", client_nonce, server_nonce,
                                                            self.client_name)
            sent += send_frame(sock, encode("auth", {"proof": proof}))
            welcome = _read_small(reader, ("welcome", "error"))
            self._raise_refusal(welcome)
            if self._token is None:
                raise HandshakeError(f"the server at {self.address} accepted client {self.client_name!r} without a "
                                     "token: refusing a server that does not authenticate")
            expected = _proof(self._token, b"server", client_nonce, server_nonce, self.client_name)
            if not hmac.compare_digest(str(welcome.header.get("proof")).encode(), expected.encode()):
                raise HandshakeError(f"the server at {self.address} could not prove it knows client "
                                     f"{self.client_name!r}'s token: not our server, or a tampered connection")
            self.wire_bytes += sent + reader.received
        except BaseException:
            sock.close()
            raise
        self.sock, self.reader = sock, reader
        return welcome.header

    def _raise_refusal(self, frame: Frame) -> None:
        if frame.kind == "error" and frame.header.get("retry") is True:  # busy: worth another try
            raise ConnectionRefusedError(f"{frame.header.get('error')}")
        if frame.kind == "error":
            raise HandshakeError(f"the trunk server at {self.address} refused client {self.client_name!r}: "
                                 f"{frame.header.get('error')}")

    def _connect_with_retry(self, cause: BaseException | None) -> dict[str, Any]:
        deadline = time.monotonic() + self.reconnect_timeout
        delay, announced = 0.25, False
        while True:
            try:
                welcome = self._open()
                break
            except (OSError, PeerClosed, ProtocolError) as exc:
                if isinstance(exc, ssl.SSLCertVerificationError):
                    raise HandshakeError(f"TLS: the server at {self.address} has a certificate the CA file "
                                         f"(--model.tls_ca) does not verify: {exc.verify_message}") from exc
                if isinstance(exc, ssl.SSLError):  # a plain server's answer is no TLS record: retrying cannot help
                    raise HandshakeError(f"the trunk server at {self.address} does not speak TLS ({exc.reason or exc}):"
                                         " drop --model.tls_ca, or start the server with --tls_cert and "
                                         "--tls_key") from exc
                if time.monotonic() + delay > deadline:
                    what = "lost the trunk server" if cause is not None else "cannot reach the trunk server"
                    raise ConnectionError(f"{what} at {self.address} and could not connect for "
                                          f"{self.reconnect_timeout:g} s (last error: {exc})") from (cause or exc)
                if not announced:
                    what = f"lost the trunk server ({cause})" if cause is not None else "waiting for the trunk server"
                    why = f" ({exc})" if isinstance(exc, ConnectionRefusedError) and exc.args else ""
                    print(f"splittrain: {what} at {self.address}{why}; retrying for up to {self.reconnect_timeout:g} s",
                          file=sys.stderr, flush=True)
                    announced = True
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        if cause is None:  # a new session: the server's step is where this client starts
            self.server_step = self.replay_from = int(welcome["step"])
            self.replay.clear()
            self.acked = self.seq
        elif announced:
            print(f"splittrain: reconnected to the trunk server at {self.address}", file=sys.stderr, flush=True)
        return welcome

    def _drop(self) -> None:
        if self.sender is not None:
            self.sender.stop()
            self.sender = None
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = self.reader = None

    # ------------------------------------------------------------------------------------------ requests
    def request(self, kind: str, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        return self.submit(kind, header, tensors).result()

    def submit(self, kind: str, header: Header, tensors: Tensors) -> "_Request":
        """Send a request without waiting for its reply; replies come back in the order requests were sent.

        The frame leaves from a sender thread, so the caller computes (and reads replies) while it is on its way
        (over TLS too: :class:`TlsChannel`)."""
        if self.closed:  # used again after close(): a new session
            self.closed, self.session = False, secrets.token_hex(16)
            self._connect_with_retry(None)
        header = {**header, "seq": self.seq + 1, "ack": self.acked}
        buffers = encode(kind, header, tensors)  # a frame that cannot be made raises here, before it is outstanding
        self.seq += 1
        entry = None
        if kind == "join":
            self.joined = header
        if kind in _LOGGED_KINDS and (kind != "forward" or header.get("training")):
            entry = (self.server_step, kind, header, tensors)
            self.replay.append(entry)
        request = _Request(self, kind, header, tensors, entry)
        self.outstanding.append(request)
        try:
            self._send(buffers)
        except (OSError, PeerClosed) as exc:
            self._recover(exc)
        return request

    def _send(self, buffers: list) -> None:
        if self.sock is None:
            raise ConnectionError("not connected")
        if self.sender is None:
            self.sender = FrameSender(self.sock, f"splittrain-send-{self.client_name}")
        self.sender.put(buffers)
        self.wire_bytes += frame_bytes(buffers)

    def _wait(self, request: "_Request") -> tuple[Header, Tensors]:
        self._read_until(request)
        return request.reply()

    def _read_until(self, request: "_Request") -> None:
        """Read replies, in order, until ``request`` has its own; reconnect (and resend) when the link fails. A
        refusal is kept with its request and raises when that request's ``result()`` is asked for."""
        while request.frame is None:
            head = self.outstanding[0]
            try:
                frame = self._read_reply(head.kind, head.header, head.tensors)
            except (OSError, PeerClosed) as exc:
                self._recover(exc)
                continue
            except (RemoteError, ProtocolError):  # the server refused a frame and closed: nothing more comes back
                self.outstanding.clear()
                self._drop()
                raise
            self.outstanding.popleft()
            self._answer(head, frame)

    def _answer(self, request: "_Request", frame: Frame) -> None:
        request.frame = frame
        self.acked = max(self.acked, request.header["seq"])
        if frame.kind == "reply" and request.kind in ("step", "load"):
            reply = frame.header
            self.server_step = int(reply["step"])
            durable = self.server_step if request.kind == "load" else reply.get("saved")
            self.replay_from = max(self.replay_from, durable if durable is not None else self.server_step)
            self.replay = [e for e in self.replay if e[0] >= self.replay_from]

    def _recover(self, cause: BaseException) -> None:
        """The connection failed with requests in flight: reconnect, then get every one of them answered, in
        order. A server that kept our session answers the ones it handled from its reply cache (never applying one
        twice); a restarted server gets the replay of the steps it had not saved."""
        while True:
            self._drop()
            welcome = self._connect_with_retry(cause)
            try:
                if not welcome["known"]:
                    try:
                        return self._resume_restarted(welcome)
                    except (RuntimeError, ProtocolError):
                        self.outstanding.clear()  # the new server never got them: close() must not wait for them
                        self._drop()
                        raise
                while self.outstanding:
                    head = self.outstanding[0]
                    frame = self._exchange(head.kind, head.header, head.tensors)
                    self.outstanding.popleft()
                    self._answer(head, frame)
                return
            except (OSError, PeerClosed) as exc:  # lost again while catching up
                cause = exc

    def _exchange(self, kind: str, header: Header, tensors: Tensors) -> Frame:
        """One request and its reply, nothing else in flight."""
        self._send(encode(kind, header, tensors))
        return self._read_reply(kind, header, tensors)

    def _read_reply(self, kind: str, header: Header, tensors: Tensors) -> Frame:
        if self.reader is None:
            raise ConnectionError("not connected")
        frame = read_frame(self.reader, reply_limit(tensors), check_reply(kind, tensors))
        self.wire_bytes += frame.nbytes
        if frame.header.get("seq") not in (header["seq"], None):
            raise ProtocolError(f"reply to request {frame.header.get('seq')} while waiting for {header['seq']}")
        if frame.kind == "error" and frame.header.get("seq") is None:
            raise RemoteError(f"trunk server: {frame.header.get('error')}")
        return frame

    def _resume_restarted(self, welcome: Header) -> None:
        """The server lost this session (it restarted): replay the steps it had not saved, and answer every
        request in flight (from the replay, or sent again when it is not part of it)."""
        restarted_at = int(welcome["step"])
        in_flight = list(self.outstanding)
        steps_in_flight = sum(1 for r in in_flight if r.kind == "step")
        if restarted_at < self.replay_from or restarted_at > self.server_step + steps_in_flight:
            what = ("restarted without this client's trunk checkpoints (serve without --resume, or another run "
                    "folder)" if restarted_at == 0 else f"came back at step {restarted_at}")
            raise RemoteError(
                f"the trunk server at {self.address} {what}, but this client is at step {self.server_step} and can "
                f"replay only the steps after {self.replay_from}: restart the server with --resume in its run folder "
                f"(from a checkpoint at step >= {self.replay_from}), or resume this client from the server's step "
                f"(--ckpt_path)")
        print(f"splittrain: the trunk server restarted at step {restarted_at}; replaying "
              f"{sum(1 for e in self.replay if e[0] >= restarted_at)} requests of the steps it had not saved",
              file=sys.stderr, flush=True)
        if self.joined is not None and not any(r.kind == "join" for r in in_flight):
            # a federation's member takes its index again, at the step it replays from
            self.seq += 1
            frame = self._exchange("join", {**self.joined, "step": restarted_at, "seq": self.seq,
                                            "ack": self.seq - 1}, {})
            if frame.kind == "error":
                raise RemoteError(f"trunk server (joining the federation again): {frame.header.get('error')}")
        waiting = {id(r.entry): r for r in in_flight if r.entry is not None}
        answers: dict[int, Frame] = {}
        for entry in list(self.replay):
            tag, kind, header, tensors = entry
            if tag < restarted_at:
                continue
            self.seq += 1
            frame = self._exchange(kind, {**header, "seq": self.seq, "ack": self.seq - 1}, tensors)
            if frame.kind == "error":
                raise RemoteError(f"trunk server (replaying {kind} of step {tag + 1}): {frame.header.get('error')}")
            if id(entry) in waiting:
                answers[id(waiting[id(entry)])] = frame
        self.server_step = max(self.server_step, restarted_at)
        for request in in_flight:
            frame = answers.get(id(request))
            if frame is None and request.entry is None:  # not part of the replay: send it again on the new session
                self.seq += 1
                frame = self._exchange(request.kind, {**request.header, "seq": self.seq, "ack": self.seq - 1},
                                       request.tensors)
            if frame is None and request.kind == "step" and request.entry[0] < restarted_at:
                frame = Frame({"kind": "reply", "step": restarted_at, "saved": restarted_at}, {}, 0)  # saved before
            if frame is None:
                raise RuntimeError("lost a request while the trunk server restarted")  # in flight always replays
            self.outstanding.popleft()
            self._answer(request, frame)
        self.acked = self.seq

    def close(self) -> None:
        """Say goodbye (the server frees this client's session) and close the socket."""
        if self.sock is None:
            return
        self.closed = True
        try:
            if self.outstanding:
                self._read_until(self.outstanding[-1])
            self.seq += 1
            self._exchange("bye", {"seq": self.seq, "ack": self.acked}, {})
        except (OSError, PeerClosed, ProtocolError, RemoteError):
            pass
        finally:
            self.outstanding.clear()
            self._drop()

    def __del__(self) -> None:
        self._drop()


def make_token() -> str:
    """A fresh random token (256 bits, hexadecimal)."""
    return secrets.token_hex(32)


def server_tls_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context



def connect(options: LinkOptions) -> TcpTransport:
    """The registered entry point: a client of the ``serve`` process at ``options.address``."""
    return TcpTransport(options.address, options.client, options.token, options.fingerprint, tls_ca=options.tls_ca,
                        timeout=options.timeout, reconnect_timeout=options.reconnect_timeout,
                        schedule=options.schedule)
