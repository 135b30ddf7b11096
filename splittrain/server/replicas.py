"""Several server processes for one trunk: R replicas of the trunk in a ``torch.distributed`` group (gloo).

``serve`` under torchrun (or R ``serve`` processes given ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT``) makes each process a replica: it holds the whole trunk, listens on ``--address``'s port plus its
rank (port 0: any free port) and serves the federation's clients whose index ``c`` has ``c % R == rank``. A
replica refuses a client of another replica's, naming the right address.

What one server combines across its clients is combined across the replicas with collectives, inside each
synchronisation point once the replica's own clients have arrived, so R replicas of k clients compute what one
server of R x k clients computes (``trunk_update: sync``, DDP semantics):

* a step's trunk gradients: ``sum_c w_c g_c`` and ``sum_c w_c`` of each replica's clients are all-reduced, then
  every replica applies the same mean with its own (identical) AdamW;
* secure aggregation: the public keys and weights of every client (a table all-reduced, each replica filling its
  clients' rows), and each average's masked sum, added modulo 2**64 across replicas (as two 32-bit halves, so no
  sum overflows), with the round's participants and a redo decided alike on every replica.

Each synchronisation point's collectives start with an all-gather of its name, so replicas that disagree on
where the run is stop with both names rather than add up unrelated tensors. At start the replicas compare their
configs (trunk fingerprint, cuts, LoRA settings and initial values, trunk schedule, federation): a replica started
with another one is refused on every side with the differences.

Liveness: every replica exchanges a heartbeat with every other one each second (point-to-point in a group of its
own); a replica that dies or stops answering for ``timeout`` seconds is named by every survivor, which closes its
clients' connections, refuses them for a moment with why (they retry) and stops: the run cannot go on without that
replica's clients. Under ``torchrun --max-restarts`` with ``serve --resume`` the replicas are restarted and
resume at the last step all of them saved (:meth:`splittrain.server.TrunkServer.replicate`), and the clients
replay the steps since. A stop asked of one replica (SIGTERM, as torchrun sends to all) travels with the next
heartbeat, so all replicas stop at the same round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("splittrain.server")

NAME_BYTES = 96
"""Bytes of a synchronisation point's name compared across replicas (longer names are cut)."""
BEAT_SECONDS = 1.0


class ReplicaError(RuntimeError):
    """The replicas of a trunk disagree, or one of them is gone."""


class Replicas:
    """This process's place among the trunk's replicas and the collectives that combine their clients.

    Args:
        rank: this replica's rank (0..size-1).
        size: the number of replicas.
        group: the process group of the synchronisation points' collectives.
        health: the process group of the heartbeats.
        timeout: seconds a replica waits for another's heartbeat.
    """

    def __init__(self, rank: int, size: int, group: Any, health: Any, timeout: float) -> None:
        self.rank, self.size, self.group, self.health, self.timeout = rank, size, group, health, timeout
        self.addresses: list[str] = [f"replica {r}" for r in range(size)]
        self.failure: str | None = None
        """Why the replicas cannot go on (a replica died or stopped answering); None while they can."""
        self._stop = threading.Event()
        self._failed = threading.Event()

    @classmethod
    def from_environment(cls, round_timeout: float, timeout: float) -> Replicas | None:
        """Join the replicas' group when ``WORLD_SIZE`` (torchrun's, or set by hand with ``RANK``, ``MASTER_ADDR``
        and ``MASTER_PORT``) says there are several; None for a lone server. The collectives of a synchronisation
        point may wait ``round_timeout`` for a slow client of another replica."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return None
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ReplicaError(f"WORLD_SIZE {size} asks for trunk replicas but {', '.join(missing)} is not set: run "
                               "serve under torchrun, or set RANK, MASTER_ADDR and MASTER_PORT in every replica")
        if torch.cuda.is_available():  # a GPU per replica (model.device_map's "cuda" is this one)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        wait = round_timeout + 2 * timeout
        rank = int(os.environ["RANK"])
        try:
            # torchrun --max-restarts keeps its store across restarts: each life's keys go under a prefix of their
            # own, or restarted replicas read the addresses of the life before. Without torchrun rank 0 hosts it.
            agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size,
                                  is_master=not agent and rank == 0, timeout=timedelta(seconds=wait))
            life = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group("gloo", store=dist.PrefixStore(f"splittrain-replicas-{life}", store), rank=rank,
                                    world_size=size, timeout=timedelta(seconds=wait))
            health = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as error:  # DistStoreError, DistNetworkError: RuntimeErrors
            raise ReplicaError(f"the {size} trunk replicas did not all meet within {wait:g} s at "
                               f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} (did one fail to start? see "
                               f"its output): {_one_line(error)}") from error
        return cls(dist.get_rank(), dist.get_world_size(), dist.group.WORLD, health, timeout)

    # ------------------------------------------------------------------------------------------ who serves whom
    def owner(self, index: int) -> int:
        """The replica serving client ``index``."""
        return index % self.size

    def own(self, clients: int) -> set[int]:
        """The client indices of a federation of ``clients`` this replica serves."""
        return {c for c in range(clients) if self.owner(c) == self.rank}

    def listen_port(self, port: int) -> int:
        """The port this replica listens on: ``port`` plus its rank (0: any free port)."""
        return port + self.rank if port else 0

    def name(self, rank: int) -> str:
        return f"trunk replica {rank} ({self.addresses[rank]})"

    # ------------------------------------------------------------------------------------------ at start
    def agree(self, description: dict[str, Any], address: str, instance: str) -> str:
        """Compare every replica's ``description`` (its config) and learn their addresses; raises
        :class:`ReplicaError` on every replica, naming the differences, when one was started with another. Returns
        replica 0's ``instance`` id, which every replica takes: secure aggregation binds the clients' pairwise keys to
        it, so clients of different replicas must see the same."""
        try:
            texts = self._gather_text(json.dumps({"config": description, "address": address, "instance": instance},
                                                 sort_keys=True))
        except RuntimeError as error:
            raise ReplicaError(f"a trunk replica left while the replicas compared their configs (see its output): "
                               f"{_one_line(error)}") from error
        seen = [json.loads(t) for t in texts]
        self.addresses = [s["address"] for s in seen]
        ours = _flat(seen[0]["config"])
        for rank, other in enumerate(seen[1:], start=1):
            theirs = _flat(other["config"])
            diffs = [f"{k} {theirs.get(k)!r} (replica 0: {ours.get(k)!r})" for k in sorted(set(ours) | set(theirs))
                     if ours.get(k) != theirs.get(k)]
            if diffs:
                raise ReplicaError(f"trunk replica {rank} was started with another config than replica 0: "
                                   f"{'; '.join(diffs)}; start every replica with the same config and overrides")
        return seen[0]["instance"]

    def _gather_text(self, text: str) -> list[str]:
        """Every replica's ``text`` (UTF-8 bytes in uint8 tensors; nothing is unpickled)."""
        data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(lengths, torch.tensor([data.numel()]), group=self.group)
        width = int(max(n.item() for n in lengths))
        padded = torch.zeros(width, dtype=torch.uint8)
        padded[:data.numel()] = data
        parts = [torch.zeros(width, dtype=torch.uint8) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        return [bytes(p[:int(n.item())].tolist()).decode() for p, n in zip(parts, lengths)]

    # ------------------------------------------------------------------------------------------ synchronisation points
    def meet(self, name: str) -> None:
        """Every replica is at synchronisation point ``name``, or :class:`ReplicaError` naming where each one is."""
        raw = name.encode()[:NAME_BYTES]
        mine = torch.zeros(NAME_BYTES, dtype=torch.uint8)
        mine[:len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        names = [torch.zeros(NAME_BYTES, dtype=torch.uint8) for _ in range(self.size)]
        self._collective(dist.all_gather, names, mine)
        texts = [bytes(n.tolist()).rstrip(b"\0").decode(errors="replace") for n in names]
        if len(set(texts)) > 1:
            self.failure = "the trunk replicas are out of step: " + ", ".join(
                f"replica {r} at {t!r}" for r, t in enumerate(texts))
            raise ReplicaError(self.failure)

    def bounds(self, value: int) -> tuple[int, int]:
        """The least and the greatest of every replica's ``value`` (at start: the steps each one can resume at)."""
        low, high = torch.tensor([value], dtype=torch.int64), torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.group)
        return int(low), int(high)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the replicas (in place, on the CPU)."""
        self._collective(dist.all_reduce, tensor)
        return tensor

    def keyring(self, name: str, clients: int, local: dict[int, tuple[str, float]]) -> dict[int, tuple[str, float]]:
        """Secure aggregation's key agreement: every replica's clients' (public key hex, weight), by index."""
        self.meet(name)
        table = torch.zeros(clients, 33, dtype=torch.int64)
        weights = torch.zeros(clients, dtype=torch.float64)
        for index, (public, weight) in local.items():
            table[index, 0] = 1
            table[index, 1:] = torch.tensor(list(bytes.fromhex(public)), dtype=torch.int64)
            weights[index] = weight
        self.sum(table)
        self.sum(weights)
        return {i: (bytes(table[i, 1:].tolist()).hex(), float(weights[i])) for i in range(clients) if table[i, 0]}

    def arrivals(self, name: str, clients: int, local: dict[int, tuple[int, Sequence[int], bool]]
                 ) -> tuple[set[int], set[int], bool]:
        """Secure aggregation: who sent an update to ``name`` across the replicas, given this replica's clients'
        (update size, the participants each masked for, whether it masked with stale keys). Returns the clients
        arrived, the update sizes, and whether every arrived client masked for exactly the arrived ones with the
        latest keys (else the round is redone)."""
        self.meet(name)
        counts = torch.zeros(clients * (clients + 2) + 1, dtype=torch.int64)
        arrived, sizes, lists = counts[:clients], counts[clients:2 * clients], counts[2 * clients:-1].view(clients,
                                                                                                          clients)
        for index, (size, participants, stale) in local.items():
            arrived[index], sizes[index] = 1, size
            known = [p for p in participants if 0 <= p < clients]
            lists[index, known] = 1
            counts[-1] += int(stale or len(set(known)) != len(participants))  # a list naming no client: a redo
        self.sum(counts)
        who = {i for i in range(clients) if arrived[i]}
        agreed = counts[-1] == 0 and all(bool((lists[i] == arrived).all()) for i in who)
        return who, {int(sizes[i]) for i in who}, agreed

    def masked_sum(self, total: torch.Tensor) -> torch.Tensor:
        """The replicas' masked int64 sums added modulo 2**64 (each split into two 32-bit halves that cannot
        overflow a sum over replicas)."""
        words = total.detach().cpu().contiguous().numpy().view(np.uint64).reshape(-1)
        halves = torch.from_numpy(np.stack([words & 0xFFFFFFFF, words >> np.uint64(32)]).astype(np.int64))
        self.sum(halves)
        low, high = halves.numpy().astype(np.uint64)
        return torch.from_numpy((low + (high << np.uint64(32))).view(np.int64)).reshape(total.shape)

    def mean_gradients(self, name: str, params: Sequence[tuple[str, torch.Tensor]],
                       contributions: Sequence[tuple[dict[str, torch.Tensor], float]]) -> dict[str, torch.Tensor]:
        """A ``sync`` step's ``sum_c w_c g_c / sum_c w_c`` over every replica's clients, per parameter of
        ``params`` (name, parameter); a parameter no client has a gradient for is left out (as one server does)."""
        self.meet(name)
        sizes = [p.numel() for _, p in params]
        flat = torch.zeros(sum(sizes) + len(params) + 1, dtype=torch.float64)
        values, present = flat[:sum(sizes)].split(sizes), flat[sum(sizes):-1]
        for grads, weight in contributions:
            for k, (pname, _) in enumerate(params):
                g = grads.get(pname)
                if g is not None:
                    values[k].add_(g.detach().reshape(-1).to("cpu", torch.float64) * weight)
                    present[k] = 1
            flat[-1] += weight
        self.sum(flat)
        total = float(flat[-1])
        return {pname: (values[k] / total).view_as(p).to(p.device, p.dtype)
                for k, (pname, p) in enumerate(params) if present[k] and total}

    def _collective(self, op: Callable[..., Any], *args: Any) -> None:
        """Run a collective of the synchronisation points; a replica lost meanwhile is named."""
        if self.failure is not None:
            raise ReplicaError(self.failure)
        try:
            op(*args, group=self.group)
        except RuntimeError as error:
            # the heartbeats name the replica that is gone (soon after the collective notices it)
            self._failed.wait(self.timeout + 2 * BEAT_SECONDS)
            self.failure = self.failure or f"the trunk replicas lost each other: {_one_line(error)}"
            raise ReplicaError(self.failure) from error

    # ------------------------------------------------------------------------------------------ liveness
    def watch(self, failed: Callable[[str], None], stop: Callable[[], None]) -> None:
        """Exchange heartbeats with every other replica until a stop is asked of any of them (then ``stop()``
        on every replica, at the same round) or one is lost (then ``failed(why)``)."""
        threading.Thread(target=self._beat, args=(failed, stop), name="splittrain-replicas", daemon=True).start()

    def request_stop(self) -> None:
        """Stop every replica at the next heartbeat (a SIGTERM or SIGINT of this one)."""
        self._stop.set()

    def _beat(self, failed: Callable[[str], None], stop: Callable[[], None]) -> None:
        peers = [r for r in range(self.size) if r != self.rank]
        while True:
            mine = torch.tensor([int(self._stop.is_set())], dtype=torch.int64)
            received = {p: torch.zeros(1, dtype=torch.int64) for p in peers}
            lost = peers[0]
            try:
                works = []
                for lost in peers:
                    works.append((lost, dist.irecv(received[lost], src=lost, group=self.health)))
                for lost in peers:
                    works.append((lost, dist.isend(mine, dst=lost, group=self.health)))
                for lost, work in works:
                    work.wait(timedelta(seconds=self.timeout))
            except RuntimeError as error:
                how = ("its connection closed" if "closed" in str(error).lower() else
                       f"no heartbeat for {self.timeout:g} s" if "timed out" in str(error).lower() else
                       _one_line(error))
                self.failure = (f"{self.name(lost)} died or stopped answering ({how}): the trunk replicas stop, "
                                "since that replica's clients cannot go on without it")
                self._failed.set()
                failed(self.failure)
                return
            if mine.item() or any(r.item() for r in received.values()):
                stop()
                return
            self._stop.wait(BEAT_SECONDS)

    def close(self) -> None:
        """Leave the group (once; also after a failure): a process that exits still in it may be aborted by the
        group's threads as the interpreter tears down."""
        if dist.is_initialized():
            dist.destroy_process_group()


def describe(server: Any) -> dict[str, Any]:
    """What every replica of a trunk must hold alike: the trunk's fingerprint (model, cuts, dtype), its LoRA
    settings, the names, shapes and initial values of its trainable tensors, its schedule and the federation."""
    trainable = [(n, p) for n, p in server.trunk.named_parameters() if p.requires_grad]
    digest = hashlib.sha256()
    for name, p in trainable:
        digest.update(name.encode())
        digest.update(p.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    lora = getattr(server.trunk, "peft_config", {}).get("default")
    fed = server.federation
    return {"fingerprint": server.fingerprint,
            "lora": {"r": lora.r, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout,
                     "targets": str(lora.target_modules)} if lora is not None else None,
            "trainable": {"tensors": len(trainable), "values": sum(p.numel() for _, p in trainable),
                          "initial (sha256 prefix)": digest.hexdigest()[:16]},
            "trunk schedule": server.schedule,
            "federation": fed.common() if fed is not None else None}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200]
