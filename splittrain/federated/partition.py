"""Federated clients' shards of the rows: :func:`partition` draws them (iid, label skew from a Dirichlet, or one
client per value of a column); :meth:`splittrain.data.InstructionDataModule.shard` applies them."""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np
import torch

from ..errors import UserError

PartitionMethod = Literal["iid", "dirichlet", "column"]
"""How the rows are split among clients (``data.partition``)."""
PARTITIONS: tuple[str, ...] = get_args(PartitionMethod)


def partition(rows: Any, clients: int, method: PartitionMethod = "iid", alpha: float = 0.5,
              column: str | None = None, seed: int = 0) -> list[list[int]]:
    """``clients`` disjoint lists of row indices, each ascending, that together cover every row; the same for the
    same arguments.

    ``rows`` needs ``len`` and column access (``rows[column]``, e.g. a ``datasets.Dataset``).

    - ``iid``: a seeded permutation cut into near-equal parts.
    - ``dirichlet``: label skew. The rows of each value of ``column`` (values in sorted order) are shuffled and
      split by proportions drawn from Dirichlet(``alpha``) over the clients: the smaller ``alpha``, the more each
      value concentrates on few clients. The proportions depend only on the sorted values, ``clients``, ``alpha``
      and ``seed``, so two splits with the same values (train, validation) get the same skew. A client left empty
      takes one row from the largest shard.
    - ``column``: each value of ``column`` goes wholly to one client: the k-th value in sorted order to client
      ``k % clients``.

    Raises ``ValueError`` for a bad option, or when the rows (or the values, for ``column``) are fewer than the
    clients: every client gets at least one row.
    """
    check_clients(clients)
    check_partition(method, alpha, column)
    if method == "iid":
        if len(rows) < clients:
            raise UserError(f"{len(rows)} rows cannot be split among {clients} clients (model.federated.clients): "
                            "every client needs a row")
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
        return [sorted(part.tolist()) for part in torch.tensor_split(order, clients)]

    try:
        labels = list(rows[column])
    except (KeyError, ValueError) as error:  # a datasets.Dataset raises ValueError, mappings and frames KeyError
        raise UserError(f"data.partition_column {column!r} is not a column of the rows") from error
    rows_of: dict[Any, list[int]] = {}
    for index, label in enumerate(labels):
        rows_of.setdefault(label, []).append(index)
    values = sorted(rows_of)
    if method == "column":
        if len(values) < clients:
            raise UserError(f"column {column!r} (data.partition_column) has {len(values)} distinct values, fewer "
                            f"than the {clients} clients (model.federated.clients): each client needs a value")
        return [sorted(i for k in range(client, len(values), clients) for i in rows_of[values[k]])
                for client in range(clients)]

    if len(labels) < clients:
        raise UserError(f"{len(labels)} rows cannot be split among {clients} clients (model.federated.clients): "
                        "every client needs a row")
    rng = np.random.Generator(np.random.PCG64(seed))
    proportions = rng.dirichlet([alpha] * clients, size=len(values))  # drawn first: independent of the row counts
    shards: list[list[int]] = [[] for _ in range(clients)]
    for value, shares in zip(values, proportions):
        indices = rng.permutation(rows_of[value])
        cuts = (np.cumsum(shares)[:-1] * len(indices)).astype(int)
        for shard, part in zip(shards, np.split(indices, cuts)):
            shard.extend(part.tolist())
    for shard in shards:
        if not shard:  # the largest shard has at least 2 rows here, since there are at least as many rows as clients
            shard.append(max(shards, key=len).pop())
    return [sorted(shard) for shard in shards]


def check_clients(clients: int) -> None:
    """Refuse a client count that is not an integer >= 1."""
    if not (isinstance(clients, int) and clients >= 1):
        raise UserError(f"model.federated.clients must be an integer >= 1, got {clients!r}")


def check_partition(method: str, alpha: float, column: str | None) -> None:
    """Refuse partition options that :func:`partition` cannot use: an unknown method, a non-positive ``alpha``, a
    column method without a column."""
    if method not in PARTITIONS:
        raise UserError(f"unknown data.partition {method!r}: expected one of {', '.join(PARTITIONS)}")
    if not alpha > 0:
        raise UserError(f"data.partition_alpha must be > 0, got {alpha!r}")
    if method != "iid" and column is None:
        raise UserError(f"data.partition {method!r} splits by a column: set data.partition_column (e.g. a label or "
                        "task column of the rows)")
