"""Several clients, one trunk (SplitFed): averaging semantics, client sampling and the averaging channels.

Every client holds its own bottom and top and its own shard of the data; the server holds the one trunk.

``average: gradients`` (FedSGD) with ``trunk_update: sync`` is data-parallel training: at every step each
participating client's client-side gradients are averaged uniformly across clients, as
``DistributedDataParallel`` averages them, and the server averages the trunk gradients of the same clients,
uniformly too; every party then steps once. It equals one unsplit model trained on all clients' batches under
DDP. ``weighting`` does not apply to FedSGD.

``average: weights`` (FedAvg): clients take ``average_every`` local steps with their own optimizers, then
their client-side trainable weights are averaged over the round's participants, weighted by ``weighting``: by
their shard sizes (``samples``, the number of training examples in each client's shard) or equally
(``uniform``). The trunk steps on every client step, in arrival order, each on that client's own trunk gradient
with nothing weighted (``sequential``, SplitFed-v2), or once per step on the mean of that step's participants'
trunk gradients (``sync``), weighted as the client-side weights are: ``sum_c n_c g_c / sum_c n_c`` with
``weighting: samples``, the plain mean with ``uniform``.

Every weight comes from :meth:`FederatedSettings.weight`: 0 for a client that sits the round out, its shard size
for FedAvg with ``weighting: samples``, else 1.

A *round* is the ``average_every`` steps between two averages (one step for ``gradients``); at each round a
seeded draw picks ``client_fraction`` of the clients to take part. Clients sitting out a round still receive
the average at its end.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

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
    """How ``average: weights`` (FedAvg) weighs the clients: by each one's number of training examples (its shard
    size) or equally. It weights the client-side weight averages and, with ``trunk_update: sync``, the mean of each
    step's trunk gradients. ``average: gradients`` (FedSGD) averages uniformly whatever it says, on both sides, as
    DDP does; with ``trunk_update: sequential`` each client's trunk gradient is a trunk step of its own, unweighted."""
    client_fraction: float = 1.0
    """Fraction of the clients drawn (seeded) to take part in each round; at least one."""
    trunk_update: Literal["sync", "sequential"] = "sync"
    """``sync``: the trunk steps once per step on the mean of the step's participants' trunk gradients (uniform for
    ``gradients``, weighted by ``weighting`` for ``weights``); ``sequential``: the trunk steps on every client's
    step, in arrival order, on that client's gradient alone."""
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
        """This client's weight in an average (the client-side one and the ``sync`` trunk's gradient mean): 0 when it
        sits the round out, ``samples`` (its shard size) for FedAvg with ``weighting: samples``, else 1."""
        if not participant:
            return 0.0
        return float(samples) if self.average == "weights" and self.weighting == "samples" else 1.0

    def ends_round(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) is the last of its round (weights are averaged after it)."""
        return (step + 1) % self.round_steps == 0

    def common(self) -> dict[str, Any]:
        """The settings every party of one federation holds alike (a client that joins with others is refused);
        ``round_timeout`` is the server's and ``client_index`` each client's own."""
        return {k: v for k, v in asdict(self).items() if k not in ("round_timeout", "client_index")}


def round_half_up(x: float) -> int:
    return int(x + 0.5)
