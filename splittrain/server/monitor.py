"""``serve --http HOST:PORT``: the trunk server watched as servers are watched.

* ``/metrics``: Prometheus' text format (``prometheus_client``): steps applied, requests by kind, bytes in and
  out, training tokens and last-seen time per client, busy seconds, clients connected, graphs and generations held
  (and their bytes) per client, and every status counter (handshakes and frames refused, sessions expired, ...);
* ``/status``: what ``server_status.json`` holds, as JSON, plus ``history``: the last minutes sampled every second
  (time, steps applied, steps/s, busy share, each client's tokens/s);
* ``/``: one small HTML page, data-free itself, whose script polls ``/status`` every two seconds: the clients with
  their step, last seen, bytes and tokens/s, the server's busy share and memory, and steps/s over the last minutes.

Off loopback a bearer token is required (``--http_token_file``): ``/metrics`` and ``/status`` answer 401 to a request
without ``Authorization: Bearer <token>`` and say nothing else; the page takes the token from the address's fragment
(``http://host:port/#token=...``, never sent to the server) and sends it with its requests. Nothing served holds a
client's token, data or tensors.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

from ..transport.tcp import is_loopback, parse_address

Status = Callable[[], dict[str, Any]]
HISTORY_SECONDS = 600
"""How far back ``/status``'s history (and the page's plot) goes."""


class Monitor:
    """The HTTP view of a running trunk server; :meth:`start` serves it from daemon threads.

    Args:
        status: returns the server's status (what ``server_status.json`` holds).
        address: ``HOST:PORT`` to bind (port 0 picks a free one; see :attr:`address`).
        token: the bearer token ``/metrics`` and ``/status`` require (required off loopback).
        every: seconds between history samples.
    """

    def __init__(self, status: Status, address: str, token: str | None = None, every: float = 1.0) -> None:
        host, port = parse_address(address)
        if token is None and not is_loopback(host):
            raise ValueError(f"serve --http {address} binds beyond loopback: the status and metrics would be open to "
                             "the network, so give a bearer token with --http_token_file (or bind 127.0.0.1)")
        self.status, self.token, self.every = status, token, every
        self.history: deque[dict[str, Any]] = deque(maxlen=int(HISTORY_SECONDS / every) + 1)
        self._last: tuple[float, dict[str, Any]] | None = None
        self.stopping = threading.Event()
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        bound = self.httpd.server_address[1]
        self.address = f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"

    def start(self) -> None:
        threading.Thread(target=self.httpd.serve_forever, name="splittrain-http", daemon=True).start()
        threading.Thread(target=self._sample, name="splittrain-http-history", daemon=True).start()

    def stop(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        given = (header or "").removeprefix("Bearer ").strip()
        return bool(header) and header.startswith("Bearer ") and hmac.compare_digest(given.encode(),
                                                                                      self.token.encode())

    # ------------------------------------------------------------------------------------------ history
    def _sample(self) -> None:
        while not self.stopping.is_set():
            try:
                self.sample()
            except Exception:  # a status that cannot be read now is tried again
                pass
            self.stopping.wait(self.every)

    def sample(self, now: float | None = None) -> None:
        """Add one point to the history: rates since the previous sample."""
        now = time.time() if now is None else now
        status = self.status()
        point: dict[str, Any] = {"time": now, "steps_applied": status["counters"]["steps_applied"],
                                 "steps_per_s": None, "busy_share": None, "tokens_per_s": {}}
        if self._last is not None:
            then, before = self._last
            dt = max(now - then, 1e-9)
            point["steps_per_s"] = (point["steps_applied"] - before["counters"]["steps_applied"]) / dt
            point["busy_share"] = min(1.0, (status["busy_seconds"] - before["busy_seconds"]) / dt)
            earlier = before.get("clients", {})
            point["tokens_per_s"] = {name: (c["tokens"] - earlier.get(name, {}).get("tokens", 0)) / dt
                                     for name, c in status.get("clients", {}).items()}
        self._last = (now, status)
        self.history.append(point)

    def view(self) -> dict[str, Any]:
        """``/status``: the server's status and its history."""
        return {**self.status(), "history": list(self.history)}

    # ------------------------------------------------------------------------------------------ metrics
    def metrics(self) -> bytes:
        """``/metrics`` in Prometheus' text exposition format."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self.status()))
        return generate_latest(registry)


class _Collector:
    """One scrape's metrics, from one status snapshot."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.status = status

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.status
        for name, value in s["counters"].items():
            yield CounterMetricFamily(f"splittrain_{name}", f"trunk server counter {name}", value=value)
        yield CounterMetricFamily("splittrain_busy_seconds", "seconds spent computing the trunk",
                                  value=s["busy_seconds"])
        yield GaugeMetricFamily("splittrain_rss_bytes", "resident memory of the server process", value=s["rss_bytes"])
        sessions = s.get("sessions", {})
        yield GaugeMetricFamily("splittrain_clients_connected", "clients with a connection open",
                                value=sum(1 for x in sessions.values() if x["connections"]))
        yield GaugeMetricFamily("splittrain_connections", "authenticated connections open",
                                value=s.get("connections", 0))
        requests = CounterMetricFamily("splittrain_requests", "requests answered", labels=["client", "kind"])
        per_client = {key: CounterMetricFamily(f"splittrain_{key}", what, labels=["client"]) for key, what in (
            ("bytes_in", "bytes received from the client"), ("bytes_out", "bytes sent to the client"),
            ("tokens", "positions of the client's training forward passes"))}
        last_seen = GaugeMetricFamily("splittrain_client_last_seen_seconds", "unix time of the client's last request",
                                      labels=["client"])
        for client, c in sorted(s.get("clients", {}).items()):
            for kind, n in sorted(c["requests"].items()):
                requests.add_metric([client, kind], n)
            for key, family in per_client.items():
                family.add_metric([client], c[key])
            last_seen.add_metric([client], c["last_seen"])
        yield requests
        yield from per_client.values()
        yield last_seen
        held = {key: GaugeMetricFamily(f"splittrain_{key}", what, labels=["client"]) for key, what in (
            ("graphs", "forward passes waiting for their backward pass"), ("graph_bytes", "bytes those graphs hold"),
            ("generations", "generations' KV caches held"), ("generation_bytes", "bytes those caches hold"))}
        for client, x in sorted(sessions.items()):
            for key, family in held.items():
                family.add_metric([client], x[key])
        yield from held.values()
        step = GaugeMetricFamily("splittrain_adapter_step", "optimizer steps of a trunk adapter (a client's own, or "
                                 "its federation's)", labels=["owner"])
        for owner, adapter in sorted(s.get("adapters", {}).items()):
            step.add_metric([owner], adapter["step"])
        yield step


def _handler(monitor: Monitor) -> type[BaseHTTPRequestHandler]:
    page = resources.files("splittrain.server").joinpath("monitor.html").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        server_version = "splittrain"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            path = self.path.split("?", 1)[0]
            if path == "/":
                return self._send(200, "text/html; charset=utf-8", page)
            if path not in ("/metrics", "/status"):
                return self._send(404, "text/plain; charset=utf-8", b"not found\n")
            if not monitor.authorized(self.headers.get("Authorization")):
                return self._send(401, "text/plain; charset=utf-8", b"unauthorized\n",
                                  {"WWW-Authenticate": 'Bearer realm="splittrain"'})
            if path == "/metrics":
                from prometheus_client import CONTENT_TYPE_LATEST

                return self._send(200, CONTENT_TYPE_LATEST, monitor.metrics())
            self._send(200, "application/json", json.dumps(monitor.view()).encode())

        def _send(self, code: int, kind: str, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # requests are not logged (a scrape every few s)
            pass

    return Handler


def status_table(status: dict[str, Any], now: float | None = None) -> str:
    """The page's view as text (``python -m splittrain status``): the server's figures, then one row per client."""
    now = time.time() if now is None else now
    history = status.get("history") or []
    last = history[-1] if history else {}
    busy = "-" if last.get("busy_share") is None else f"{last['busy_share']:.0%}"
    lines = [f"trunk server {status.get('address', '')}: {status['counters']['steps_applied']} steps applied, busy "
             f"{busy}, memory {_size(status['rss_bytes'])}, {status.get('connections', 0)} connection(s)"]
    clients, sessions = status.get("clients", {}), status.get("sessions", {})
    header = ("client", "step", "last seen", "tokens/s", "bytes in", "bytes out", "graphs", "connected")
    rows = []
    for name in sorted(set(clients) | set(sessions)):
        c, s = clients.get(name, {}), sessions.get(name)
        rate = last.get("tokens_per_s", {}).get(name)
        seen = f"{now - c['last_seen']:.0f} s ago" if c.get("last_seen") else "-"
        step = s.get("step") if s is not None else status.get("adapters", {}).get(name, {}).get("step")
        rows.append((name, "-" if step is None else str(step), seen,
                     "-" if rate is None else f"{rate:.0f}", _size(c.get("bytes_in", 0)), _size(c.get("bytes_out", 0)),
                     "-" if s is None else str(s["graphs"]), "yes" if s and s["connections"] else "no"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in [header, *rows]]
    if not rows:
        lines.append("(no client has connected yet)")
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fetch_status(address: str, token: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """``/status`` of a ``serve --http`` monitor at ``HOST:PORT``."""
    import urllib.error
    import urllib.request

    host, port = parse_address(address)
    url = f"http://[{host}]:{port}/status" if ":" in host else f"http://{host}:{port}/status"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return json.loads(reply.read())
    except urllib.error.HTTPError as error:
        hint = " (give --token_file)" if error.code == 401 else ""
        raise ConnectionError(f"the monitor at {address} answered {error.code} {error.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConnectionError(f"cannot reach the monitor at {address}: {reason}") from None
