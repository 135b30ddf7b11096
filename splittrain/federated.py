"""Several clients, one trunk (SplitFed): averaging semantics, client sampling and the averaging channels.

Every client holds its own bottom and top and its own shard of the data; the server holds the one trunk.

``average: gradients`` (FedSGD) with ``trunk_update: sync`` is data-parallel training: at every step each
participating client's client-side gradients are averaged uniformly across clients, as
``DistributedDataParallel`` averages them, and the server averages the trunk gradients of the same clients;
every party then steps once. It equals one unsplit model trained on all clients' batches under DDP.

``average: weights`` (FedAvg): clients take ``average_every`` local steps with their own optimizers, then
their client-side trainable weights are averaged (weighted by their shard sizes, or uniformly). The trunk
steps on every client step, in arrival order (``sequential``, SplitFed-v2), or once per step on the averaged
trunk gradients of that step's participants (``sync``).

A *round* is the ``average_every`` steps between two averages (one step for ``gradients``); at each round a
seeded draw picks ``client_fraction`` of the clients to take part. Clients sitting out a round still receive
the average at its end.

Where the average is computed depends on the setup, never the numbers: in one process over the simulated
clients (:class:`LocalAverager`), under torchrun in a process group of the client ranks only
(:class:`DistAverager`, the server never sees client-side tensors), over TCP through the server with secure
aggregation (:class:`SecureAverager`, the server learns the sum and no single client's update).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, Sequence

import torch

AVERAGES = ("gradients", "weights")
TRUNK_UPDATES = ("sync", "sequential")
WEIGHTINGS = ("samples", "uniform")


@dataclass
class FederatedSettings:
    """How several clients train together (``model.federated`` in a config)."""

    clients: int = 1
    """Number of clients (data owners), each with its own shard of the training rows."""
    average: Literal["gradients", "weights"] = "gradients"
    """``gradients``: average client-side gradients every step (FedSGD, DDP semantics); ``weights``: average
    client-side weights every ``average_every`` steps (FedAvg)."""
    average_every: int = 1
    """Local steps between two weight averages (``average: weights``)."""
    weighting: Literal["samples", "uniform"] = "samples"
    """Weight averages by each client's number of training rows, or uniformly; ``gradients`` averages
    uniformly, as DDP does."""
    client_fraction: float = 1.0
    """Fraction of the clients drawn (seeded) to take part in each round; at least one."""
    trunk_update: Literal["sync", "sequential"] = "sync"
    """``sync``: the trunk steps once per step on the averaged gradients of the step's participants;
    ``sequential``: the trunk steps on every client's step, in arrival order."""
    round_timeout: float = 300.0
    """Seconds the server waits for a client at a synchronisation point before the round goes on without it."""
    seed: int = 0
    """Seed of the client draws."""
    client_index: int | None = None
    """Which client this process is (0-based), for ``transport: tcp``; under torchrun rank r is client r - 1."""

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ValueError(f"model.federated.clients must be at least 1, got {self.clients}")
        if self.average not in AVERAGES:
            raise ValueError(f"model.federated.average must be one of {AVERAGES}, got {self.average!r}")
        if self.trunk_update not in TRUNK_UPDATES:
            raise ValueError(f"model.federated.trunk_update must be one of {TRUNK_UPDATES}, got {self.trunk_update!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"model.federated.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.average_every < 1:
            raise ValueError(f"model.federated.average_every must be at least 1, got {self.average_every}")
        if not 0 < self.client_fraction <= 1:
            raise ValueError(f"model.federated.client_fraction must be in (0, 1], got {self.client_fraction}")
        if self.round_timeout <= 0:
            raise ValueError(f"model.federated.round_timeout must be positive, got {self.round_timeout}")
        if self.client_index is not None and not 0 <= self.client_index < self.clients:
            raise ValueError(f"model.federated.client_index must be in 0..{self.clients - 1}, got {self.client_index}")
        if self.average == "gradients" and self.average_every != 1:
            raise ValueError("average: gradients averages at every step; average_every applies to average: weights")

    @property
    def enabled(self) -> bool:
        return self.clients > 1

    @property
    def round_steps(self) -> int:
        """Steps per round: ``average_every`` for weights, one for gradients."""
        return self.average_every if self.average == "weights" else 1

    def round_of(self, step: int) -> int:
        """The round that optimizer step ``step`` (0-based) belongs to."""
        return step // self.round_steps

    def participants(self, round: int) -> list[int]:
        """Client indices drawn for ``round``: the same on every party for a seed."""
        count = max(1, round_half_up(self.client_fraction * self.clients))
        if count >= self.clients:
            return list(range(self.clients))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + round)
        return sorted(torch.randperm(self.clients, generator=generator)[:count].tolist())

    def weight(self, participant: bool, samples: int) -> float:
        """This client's weight in an average: 0 when it sits the round out."""
        if not participant:
            return 0.0
        return float(samples) if self.average == "weights" and self.weighting == "samples" else 1.0

    def ends_round(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) is the last of its round (weights are averaged after it)."""
        return (step + 1) % self.round_steps == 0


def round_half_up(x: float) -> int:
    return int(x + 0.5)


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

    def average(self, vectors: dict[int, torch.Tensor], weights: dict[int, float], tag: str) -> torch.Tensor:
        """``sum_c w_c v_c / sum_c w_c`` over every client; ``vectors``/``weights`` hold this process's clients."""


class LocalAverager:
    """All clients live in this process: the average is computed directly."""

    def average(self, vectors: dict[int, torch.Tensor], weights: dict[int, float], tag: str) -> torch.Tensor:
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

    def average(self, vectors: dict[int, torch.Tensor], weights: dict[int, float], tag: str) -> torch.Tensor:
        import torch.distributed as dist

        ((c, vector),) = vectors.items()
        weighted = torch.cat([vector * weights[c], torch.tensor([weights[c]], dtype=vector.dtype)])
        dist.all_reduce(weighted, group=self.group)
        if weighted[-1] <= 0:
            raise RuntimeError("no client took part in this average")
        return weighted[:-1] / weighted[-1]


class SecureAverager:
    """Over TCP: the average goes through the trunk server with secure aggregation (:mod:`splittrain.secagg`).

    At the start every client publishes an X25519 public key and its weight through the server (``keys``) and
    derives a mask key with every other client. Each average is then one ``aggregate`` request carrying this
    client's update, fixed-point encoded with its weight and masked pairwise, so the server can only add the
    updates up. When a client dropped out, the server answers with the survivors and the round is redone over
    them with a fresh nonce.
    """

    SCALE_BITS = 40
    """Fixed-point fraction bits: updates are scaled by weight / total weight, so |values| < 2**22 fit."""

    def __init__(self, link, index: int, settings: FederatedSettings, samples: int) -> None:
        from .secagg import Masker

        self.link, self.index, self.settings = link, index, settings
        self.masker = Masker(self.name(index))
        header = self.link.request_plain("keys", {"public": self.masker.public.hex(),
                                                  "weight": settings.weight(True, samples)})
        publics = {self.name(int(i)): bytes.fromhex(h) for i, h in header["publics"].items()}
        self.masker.agree(publics, b"splittrain secagg v1 " + str(header["federation"]).encode())
        self.alive = sorted(int(i) for i in header["publics"])
        self.scale = float(sum(header["weights"].values()))
        self.sequence = 0

    @staticmethod
    def name(index: int) -> str:
        return f"{index:06d}"  # sorts as the indices do

    def average(self, vectors: dict[int, torch.Tensor], weights: dict[int, float], tag: str) -> torch.Tensor:
        from .secagg import decode

        ((index, vector),) = vectors.items()
        self.sequence += 1
        for attempt in range(self.settings.clients):
            nonce = (self.sequence << 8) | attempt
            if self.alive == [self.index]:  # the only client left: its own update is the average
                return vector.clone()
            masked = self.masker.protect(vector, weights[index] / self.scale, [self.name(i) for i in self.alive],
                                         nonce, self.SCALE_BITS)
            header, tensors = self.link.request_tensors(
                "aggregate", {"nonce": nonce, "weight": weights[index], "participants": self.alive}, {"masked": masked})
            if "retry" in header:
                self.alive = sorted(header["retry"])
                continue
            total = float(header["total_weight"])
            if total <= 0:
                raise RuntimeError("no client took part in this average")
            return decode(tensors["sum"], total / self.scale, self.SCALE_BITS).to(vector.dtype)
        raise RuntimeError(f"secure aggregation of {tag} failed: clients kept dropping out")
