"""Generation on the trunk server: each generation's KV cache of the trunk's layers, kept per client."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..segments import Segment
from ..transport import Header, Tensors
from .sessions import Session
from .settings import ServerLimits

log = logging.getLogger("splittrain.server")


@dataclass
class Generation:
    """One generation's trunk-side state: the KV cache of the trunk's layers and the mask of the cached positions."""

    cache: Any
    mask: torch.Tensor
    used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for layer in self.cache.layers for t in (getattr(layer, "keys", None),
                                                                     getattr(layer, "values", None))
                   if isinstance(t, torch.Tensor))


class Generations:
    """Runs the trunk for generations: the next positions of each through its cache, within the client's limits
    (``max_generations``, ``max_generation_bytes``, ``max_seq``); the server's lock is held."""

    def __init__(self, trunk: Segment, limits: ServerLimits, max_seq: int, count: Callable[[str], None],
                 use: Callable[[str], None]) -> None:
        self.trunk, self.limits, self.max_seq, self.count = trunk, limits, max_seq, count
        self.use = use
        """Makes the trunk run a named adapter."""

    def forward(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """The next positions of a generation through the trunk with that generation's KV cache."""
        gid, limits = header["generation"], self.limits
        received = tensors["hidden_states"]
        device = self.trunk.device
        x = received.to(device=device, dtype=self.trunk.dtype)
        batch, seq = x.shape[:2]
        new_mask = tensors.get("attention_mask")
        new_mask = (torch.ones(batch, seq, dtype=torch.long, device=device) if new_mask is None
                    else new_mask.to(device=device, dtype=torch.long))
        if header["start"]:
            generation = self._start(session, gid, new_mask)
        else:
            generation = self._extend(session, gid, new_mask, batch)
        positions = tensors["position_ids"].to(device=device, dtype=torch.long)
        self.use(session.adapter.name)
        self.trunk.switch_mode(False)
        with torch.no_grad():
            y = self.trunk(x, attention_mask=generation.mask, position_ids=positions,
                           cache=generation.cache).hidden_states
        generation.used = time.monotonic()
        if sum(g.nbytes for g in session.generations.values()) + generation.nbytes > limits.max_generation_bytes:
            raise ValueError(f"generation {gid} was freed: client {session.client!r}'s KV caches would hold more "
                             f"than {limits.max_generation_bytes} bytes")
        session.generations[gid] = generation
        self.count("generation_forward")
        return {}, {"hidden_states": y.detach().to(received.dtype)}

    def end(self, session: Session, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """The client finished (or gave up) a generation: free its KV cache."""
        return {"freed": session.generations.pop(header["generation"], None) is not None}, {}

    def _start(self, session: Session, gid: Any, mask: torch.Tensor) -> Generation:
        """A new generation ``gid`` (replacing one of that id), the least recently used going beyond
        ``max_generations``."""
        from transformers import DynamicCache

        session.generations.pop(gid, None)
        while len(session.generations) >= self.limits.max_generations:
            old, _ = session.generations.popitem(last=False)
            self.count("generations_evicted")
            log.warning("client %r: freed generation %s (more than %d generations)", session.client, old,
                        self.limits.max_generations)
        return Generation(DynamicCache(config=self.trunk.config), mask)

    def _extend(self, session: Session, gid: Any, mask: torch.Tensor, batch: int) -> Generation:
        """Generation ``gid`` (``batch`` rows), taken out of the session while it runs, with ``mask``'s new
        positions."""
        generation = session.generations.pop(gid, None)
        if generation is None:
            raise RuntimeError(f"generation {gid} is unknown to the trunk server: it ended, was idle for more "
                               f"than {self.limits.generation_timeout:g} s, was evicted, or the server restarted")
        if generation.mask.shape[0] != batch:
            raise ValueError(f"generation {gid} has {generation.mask.shape[0]} rows, this step {batch}")
        generation.mask = torch.cat([generation.mask, mask], dim=1)
        if generation.mask.shape[1] > self.max_seq:
            raise ValueError(f"generation {gid} is longer than {self.max_seq} positions")
        return generation
