"""What each client has asked of the trunk server: requests by kind, bytes in and out, training tokens, when it was
last seen. Kept past the client's session (an operator's view of who used the server), never any tensor or token."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ClientTraffic:
    requests: Counter = field(default_factory=Counter)
    """Request kind -> how many were answered (refusals included)."""
    bytes_in: int = 0
    bytes_out: int = 0
    tokens: int = 0
    """Positions of training forward passes (padding excluded)."""
    last_seen: float = 0.0
    """Wall-clock time (seconds since the epoch) of its last request."""


class Traffic:
    """Client name -> :class:`ClientTraffic`; thread-safe (connections record concurrently)."""

    def __init__(self) -> None:
        self.clients: dict[str, ClientTraffic] = {}
        self._lock = threading.Lock()

    def _of(self, client: str) -> ClientTraffic:
        return self.clients.setdefault(client, ClientTraffic())

    def record(self, client: str, kind: str, received: int, sent: int) -> None:
        """One request of ``kind`` from ``client``: ``received`` bytes in, ``sent`` bytes of reply out."""
        with self._lock:
            seen = self._of(client)
            seen.requests[kind] += 1
            seen.bytes_in += received
            seen.bytes_out += sent
            seen.last_seen = time.time()

    def add_tokens(self, client: str, tokens: int) -> None:
        with self._lock:
            self._of(client).tokens += tokens

    def status(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {name: {"requests": dict(c.requests), "bytes_in": c.bytes_in, "bytes_out": c.bytes_out,
                           "tokens": c.tokens, "last_seen": c.last_seen} for name, c in self.clients.items()}
