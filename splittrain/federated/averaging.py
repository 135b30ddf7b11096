"""The averaging channels: one weighted average of a vector per client, wherever the clients live.

Where the average is computed depends on the setup, never the numbers: in one process over the simulated
clients (:class:`LocalAverager`), under torchrun in a process group of the client ranks only
(:class:`DistAverager`, the server never sees client-side tensors), over TCP through the server with secure
aggregation (:class:`SecureAverager`, the server learns the sum and no single client's update).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One float64 vector of ``tensors`` (averages are computed in float64)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


@torch.no_grad()
def unflatten_into(vector: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    """Copy ``vector`` back into ``tensors`` (each keeps its dtype and device)."""
    offset = 0
    for tensor in tensors:
        n = tensor.numel()
        tensor.copy_(vector[offset:offset + n].view_as(tensor).to(tensor.dtype))
        offset += n
    if offset != vector.numel():
        raise ValueError(f"an average of {vector.numel()} values for {offset} parameter values")


class Averager(Protocol):
    """Computes a weighted average of one vector per client across all clients."""

    def average(self, vectors: dict[int, torch.Tensor], weights: dict[int, float], tag: str, step: int
                ) -> torch.Tensor:
        """``sum_c w_c v_c / sum_c w_c`` over every client; ``vectors``/``weights`` hold this process's clients;
        ``step`` is the federation's optimizer step (0-based) the average ends."""


class LocalAverager:
    """All clients live in this process: the average is computed directly."""

    def average(self, vectors: dict[int, torch.Tensor], weights: dict[int, float], tag: str, step: int
                ) -> torch.Tensor:
        total = sum(weights.values())
        if total <= 0:
            raise RuntimeError("no client took part in this average")
        acc = torch.zeros_like(next(iter(vectors.values())))
        for c in sorted(vectors):
            if weights[c]:
                acc += vectors[c] * weights[c]
        return acc / total


class DistAverager:
    """Under torchrun: an all-reduce in a process group of the client ranks; rank 0 (the server) is not in it."""

    def __init__(self, group) -> None:
        self.group = group

    def average(self, vectors: dict[int, torch.Tensor], weights: dict[int, float], tag: str, step: int
                ) -> torch.Tensor:
        import torch.distributed as dist

        ((c, vector),) = vectors.items()
        weighted = torch.cat([vector * weights[c], torch.tensor([weights[c]], dtype=vector.dtype)])
        dist.all_reduce(weighted, group=self.group)
        if weighted[-1] <= 0:
            raise RuntimeError("no client took part in this average")
        return weighted[:-1] / weighted[-1]
