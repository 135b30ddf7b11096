"""The client half of a federation: the clients one process holds, their optimizer steps and their averaging.

In one process every client is simulated: they share the frozen weights and the bottom and top modules, each has its
own trainable tensors (swapped into the modules by :meth:`FederatedClients.use`), optimizer, schedule, shard and
session on the trunk server. Under torchrun each client rank holds one, over tcp each ``fit`` process. Their
client-side average (FedSGD gradients each step, FedAvg weights each round; :mod:`.settings`) is computed where
:mod:`.averaging` says: in process, in the torchrun clients' group, or by secure aggregation over tcp. A tcp client
that dropped and runs ``fit`` again rejoins the run in progress (:mod:`.trunk` says how).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Any, Callable, Sequence

import torch

from ..loading import release_freed_memory
from ..optim import OptimSettings, build_optimizer
from .averaging import Averager, LocalAverager, flatten, unflatten_into
from .settings import FederatedSettings

Batch = dict[str, torch.Tensor]


class FederatedClient:
    """One client of a federation as this process holds it: trainable tensors, optimizer, trunk session, figures."""

    def __init__(self, index: int, link: Any, params: list[torch.nn.Parameter], optimizer: Any, scheduler: Any,
                 samples: int) -> None:
        self.index, self.link, self.params = index, link, params
        self.optimizer, self.scheduler, self.samples = optimizer, scheduler, samples
        self.tokens = 0
        self.losses: list[float] = []

    def record(self, batch: Batch, loss: float) -> None:
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        self.losses.append(loss)

    def state_dict(self) -> dict[str, Any]:
        """Its own tensors, optimizer, schedule and figures (a checkpoint's share of this client)."""
        return {"params": [p.detach().clone() for p in self.params], "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "tokens": self.tokens, "losses": list(self.losses),
                "wire_feedback": self.link.feedback.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["params"]) != len(self.params):
            raise ValueError(f"the checkpoint holds no matching state for client {self.index}")
        for param, tensor in zip(self.params, state["params"]):
            param.copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.link.feedback.load_state_dict(state.get("wire_feedback", {}))
        self.tokens, self.losses = int(state["tokens"]), list(state["losses"])


class FederatedClients:
    """The clients of a federation this process holds (see the module's docstring), each talking to the trunk as
    itself through the ``crossing`` (:class:`~splittrain.crossing.Crossing`) they share.

    Args:
        settings: the federation (``model.federated``).
        transport: ``local`` (all clients simulated here), ``tcp`` or ``dist`` (one client here).
    """

    def __init__(self, settings: FederatedSettings, transport: str) -> None:
        self.settings, self.transport = settings, transport
        self.clients: dict[int, FederatedClient] = {}
        self.averager: Averager | None = None
        self.crossing: Any = None
        self.trunk_lr: float | None = None
        """The trunk's learning rate after the last step, from the server's step reply (in a ``sync`` federation the
        reply to the member whose request completed the step; the others' say it is pending)."""
        self._slots: list[list[tuple[torch.nn.Module, str]]] = []
        self._resume: dict[str, Any] | None = None
        self._resumed_step = 0
        """The optimizer steps of the checkpoint this run resumes from (0: a fresh fit)."""
        self._rejoined: tuple[int, int] | None = None
        """After a rejoin: the federation's step this process goes on from, and its client's data position."""

    def held(self) -> list[int]:
        """The federation's clients this process holds: all of them in one process, one under torchrun/tcp."""
        if not self.settings.enabled:
            return [0]
        if self.transport == "dist":
            rank = int(os.environ.get("RANK", "1"))
            if not 1 <= rank <= self.settings.clients:
                raise ValueError(f"rank {rank} has no client: run {self.settings.clients + 1} processes for "
                                 f"{self.settings.clients} clients (rank 0 serves the trunk)")
            return [rank - 1]
        if self.transport == "tcp":
            return [self.settings.client_index]
        return list(range(self.settings.clients))

    def links(self, crossing: Any) -> list[Any]:
        """Every held client's link to the trunk server; before :meth:`build` (or without a federation) the
        ``crossing``'s (none without one)."""
        return [client.link for client in self.clients.values()] or ([crossing.link] if crossing is not None else [])

    @property
    def tokens(self) -> int:
        """Tokens the held clients trained on so far."""
        return sum(c.tokens for c in self.clients.values())

    def build(self, crossing: Any, connect: Callable[[int], Any], datamodule: Any, optim: OptimSettings,
              total_steps: int | None) -> None:
        """One :class:`FederatedClient` per held client: its own trainable tensors of the crossing's bottom and top
        (the first held client uses the modules' own), optimizer, schedule (``optim``, ``total_steps``) and session
        on the trunk server (the first held client the crossing's link, the others ``connect(index)``). Sample-weighted
        averages weigh clients by their shard sizes in ``datamodule`` (equal when the loaders are not ours). A client
        the server finds behind a federation in progress rejoins it (:meth:`_catch_up`)."""
        self.crossing = crossing
        slots: dict[int, list[tuple[torch.nn.Module, str]]] = {}
        originals: dict[int, torch.nn.Parameter] = {}
        for module in (crossing.bottom, crossing.top):
            for sub in module.modules():
                for name, param in sub._parameters.items():
                    if param is not None and param.requires_grad:
                        slots.setdefault(id(param), []).append((sub, name))
                        originals[id(param)] = param
        self._slots = list(slots.values())
        held, rejoining = self.held(), []
        for n, index in enumerate(held):
            params = list(originals.values()) if n == 0 else [
                torch.nn.Parameter(p.detach().clone()) for p in originals.values()]
            link = crossing.link if n == 0 else connect(index)
            rows = len(datamodule.client_dataset(index, "train")) if hasattr(datamodule, "client_dataset") else 1
            optimizer, scheduler = build_optimizer(params or [torch.nn.Parameter(torch.zeros(0))], optim, total_steps)
            self.clients[index] = FederatedClient(index, link, params, optimizer, scheduler, rows)
            joined = link.request_plain("join", {"index": index, "samples": rows, "step": self._resumed_step,
                                                 "settings": self.settings.common()})
            if joined.get("rejoin"):  # behind a federation in progress
                rejoining.append(index)
        self.averager = self._averager(held[0])
        self._restore()
        for index in rejoining:
            self._catch_up(self.clients[index])
        self.use(self.clients[held[0]])

    def _averager(self, first: int) -> Averager:
        """Where the client-side average is computed: the torchrun clients' group, secure aggregation over tcp, or
        here."""
        if self.transport == "dist":
            from ..transport.dist import client_group
            from .averaging import DistAverager

            return DistAverager(client_group())
        if self.transport == "tcp":
            from .secagg import SecureAverager

            client = self.clients[first]
            share = (lambda step: self._state_of(client, step)) if self.settings.average == "gradients" else None
            return SecureAverager(client.link, first, self.settings, client.samples, share)
        return LocalAverager()

    def use(self, client: FederatedClient) -> None:
        """Put ``client``'s trainable tensors into the bottom and top and talk to the trunk as it."""
        for slots, param in zip(self._slots, client.params):
            for module, name in slots:
                module._parameters[name] = param
        self.crossing.link = client.link

    def step(self, step: int, batches: dict[int, Batch], train: Callable[[int, Batch], torch.Tensor]
             ) -> list[torch.Tensor]:
        """Optimizer step ``step`` of every held client (see :mod:`splittrain.federated`): ``train(index, batch)``
        backs a taking-part client's loss on its batch and returns the loss, detached. The losses of those clients;
        the first held client is in use afterwards."""
        fed = self.settings
        participants = set(fed.participants(fed.round_of(step)))
        losses = []
        for index, client in sorted(self.clients.items()):
            taking_part = index in participants
            self.use(client)
            if taking_part:
                loss = train(index, batches[index])  # this client's graph is gone before the next one's forward
                losses.append(loss)
                client.record(batches[index], loss.item())
                if len(self.clients) > 1:
                    release_freed_memory()
            if fed.average == "weights":
                self._step_alone(client, step, taking_part)
        if fed.average == "gradients":
            self._step_averaged(step, participants)
        if fed.average == "weights" and fed.ends_round(step):
            self._average_weights(step, participants)
        self.use(self.clients[min(self.clients)])
        return losses

    def _step_alone(self, client: FederatedClient, step: int, taking_part: bool) -> None:
        """FedAvg: ``client`` steps on its own gradients (when it took part); the schedules move on either way."""
        if taking_part:
            client.optimizer.step()
            client.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a client drawn out of round 0 schedules before its first step
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)`")
            client.scheduler.step()
        self._trunk_step(client, step + 1, taking_part)

    def _weights(self, participants: set[int]) -> dict[int, float]:
        return {i: self.settings.weight(i in participants, c.samples) for i, c in self.clients.items()}

    def _step_averaged(self, step: int, participants: set[int]) -> None:
        """FedSGD: every client steps on the weighted average of the clients' gradients."""
        vectors = {i: flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in c.params])
                   for i, c in self.clients.items()}
        average = self.averager.average(vectors, self._weights(participants), f"gradients {step}", step)
        for index, client in sorted(self.clients.items()):
            for p in client.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            unflatten_into(average, [p.grad for p in client.params])
            client.optimizer.step()
            client.optimizer.zero_grad(set_to_none=True)
            client.scheduler.step()
            self._trunk_step(client, step + 1, index in participants)

    def _trunk_step(self, client: FederatedClient, step: int, participant: bool) -> None:
        """Ask the server for ``client``'s trunk step ``step``; keep the learning rate its reply gives."""
        reply = client.link.step(step, None, participant)
        if "lr" in reply:
            self.trunk_lr = float(reply["lr"])

    def _average_weights(self, step: int, participants: set[int]) -> None:
        """FedAvg's round end: every client takes the weighted average of the clients' trainable tensors."""
        vectors = {i: flatten(c.params) for i, c in self.clients.items()}
        average = self.averager.average(vectors, self._weights(participants),
                                        f"weights {self.settings.round_of(step)}", step)
        for client in self.clients.values():
            unflatten_into(average, client.params)

    # ---------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Every held client's own tensors, optimizer, schedule and figures, by index."""
        return {str(index): client.state_dict() for index, client in self.clients.items()}

    def resume(self, checkpoint: dict[str, Any]) -> None:
        """Take the clients' states of ``checkpoint``; they are restored when the clients are built."""
        if "federated" not in checkpoint:
            raise ValueError("this checkpoint was written by a run with one client; a federated run resumes "
                             "only from its own checkpoints")
        self._resume = checkpoint["federated"]
        self._resumed_step = int(checkpoint.get("global_step", 0))

    def _restore(self) -> None:
        saved = self._resume
        if not saved:
            return
        for index, client in self.clients.items():
            state = saved.get(str(index))
            if state is None:
                raise ValueError(f"the checkpoint holds no matching state for client {index}")
            client.load_state_dict(state)
        self._resume = None

    # ---------------------------------------------------------------------------------------- rejoins
    @torch.no_grad()
    def _catch_up(self, client: FederatedClient) -> None:
        """Rejoin a federation in progress (tcp; see :mod:`splittrain.federated.trunk`): take the state the server
        answers ``catch_up`` with (FedSGD: the members' weights and AdamW moments; FedAvg: the last weight average,
        AdamW afresh) and the schedule at the federation's step; :meth:`position` puts the training loop there."""
        if self.transport != "tcp":
            raise RuntimeError(f"a client rejoins a federation in progress over tcp, not {self.transport}")
        gradients = self.settings.average == "gradients"
        size = sum(p.numel() for p in client.params)
        room = torch.zeros((3 if gradients else 1, size), dtype=torch.int64)
        header, tensors = client.link.request_tensors("catch_up", {}, {"room": room})
        step, position, state = int(header["step"]), int(header["position"]), tensors.get("state")
        if gradients:
            if state is None:
                raise RuntimeError("the trunk server answered catch_up without the federation's client-side state")
            weights, exp_avg, exp_avg_sq = state.view(torch.float64)  # float64 values cross as their int64 bits
            unflatten_into(weights, client.params)
            steps, offset = torch.tensor(float(header["optimizer_steps"])), 0
            for p in client.params:
                n = p.numel()
                client.optimizer.state[p] = {
                    "step": steps.clone(),
                    "exp_avg": exp_avg[offset:offset + n].view_as(p).to(p.device, p.dtype, copy=True),
                    "exp_avg_sq": exp_avg_sq[offset:offset + n].view_as(p).to(p.device, p.dtype, copy=True)}
                offset += n
        elif state is not None:
            unflatten_into(self.averager.decoded(state[0], float(header["total_weight"])), client.params)
        with warnings.catch_warnings():  # the schedule goes to the federation's step without optimizer steps
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)`")
            for _ in range(step):
                client.scheduler.step()
        self._rejoined = (step, position)
        print(f"splittrain: client {client.index} rejoins the federation at step {step}; its data goes on from batch "
              f"{position}", file=sys.stderr, flush=True)

    def _state_of(self, client: FederatedClient, step: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """FedSGD: the client-side state ``client`` holds before its optimizer step ``step + 1``, alike on every
        member (a ``share`` request): weights and AdamW moments as float64 (3, n), crossing as their int64 bits, and
        the optimizer steps taken."""
        states = [client.optimizer.state.get(p, {}) for p in client.params]
        taken = {int(s["step"]) for s in states if "step" in s}
        if any(set(s) != {"step", "exp_avg", "exp_avg_sq"} for s in states) or len(taken) > 1:
            raise RuntimeError(f"client {client.index} cannot share its optimizer's state: it is not AdamW's after the "
                               "same steps on every tensor")
        state = torch.stack([flatten(client.params), flatten([s["exp_avg"] for s in states]),
                             flatten([s["exp_avg_sq"] for s in states])]).view(torch.int64)
        return {"step": step, "optimizer_steps": taken.pop() if taken else 0}, {"state": state}

    def position(self, trainer: Any) -> None:
        """After a rejoin, as training starts: Lightning's loop at the federation's step, the client's loader at the
        first batch of its own data it has not trained on (that batch's epoch and place in it)."""
        if self._rejoined is None:
            return
        (step, position), self._rejoined = self._rejoined, None
        loop = trainer.fit_loop
        loop.epoch_loop.manual_optimization.optim_step_progress.increment_by(step)
        loop.epoch_loop._batches_that_stepped = step
        ((index, loader),) = ((i, trainer.train_dataloader[i]) for i in self.clients)
        if not (hasattr(loader, "load_state_dict") and hasattr(loader, "batch_sampler")):
            raise RuntimeError(f"client {index} rejoined but its training loader cannot start mid-epoch: use "
                               "InstructionDataModule's loaders")
        epoch, batch = divmod(position, len(loader))
        loader.load_state_dict({"epoch": epoch, "consumed": batch})
        loop.epoch_progress.increment_by(epoch)

    # ---------------------------------------------------------------------------------------- figures
    def summaries(self, module: Any, trainer: Any, datamodule: Any) -> dict[str, dict[str, Any]]:
        """Per client: tokens trained, first/last train loss, its loss curve and validation loss on its own
        validation shard (``trainer`` validates ``module`` on the shard's loader of ``datamodule`` with the client's
        tensors in use). Under torchrun the figures of every client rank are gathered in the clients' group."""
        rows: dict[int, list[float]] = {}
        for index, client in sorted(self.clients.items()):
            val = math.nan
            if hasattr(datamodule, "client_loader") and trainer.limit_val_batches != 0:
                self.use(client)
                loader = datamodule.client_loader(index, "val", shuffle=False)
                with module.validating_client(index):  # logged as val_loss/client{index}
                    val = trainer.validate(module, dataloaders=loader, verbose=False)[0]
                val = val.get(f"val_loss/client{index}", math.nan)
            rows[index] = [client.tokens, val, *client.losses]
        self.use(self.clients[min(self.clients)])
        if self.transport == "dist":
            rows = self._gathered(rows, module.global_step)
        out = {}
        for index, (tokens, val, *losses) in sorted(rows.items()):
            out[f"client{index}"] = {
                "tokens": int(tokens), "train_loss_first": losses[0] if losses else math.nan,
                "train_loss_last": losses[-1] if losses else math.nan, "val_loss_own_shard": val,
                "steps_taken": len(losses), "train_losses": losses}
        return out

    def _gathered(self, rows: dict[int, Sequence[float]], steps: int) -> dict[int, list[float]]:
        """Every client rank's rows (tokens, validation loss, losses), summed over the torchrun clients' group."""
        import torch.distributed as dist

        from ..transport.dist import client_group

        width = 2 + max(steps, max(len(r) - 2 for r in rows.values()))
        table = torch.zeros(self.settings.clients, width + 1, dtype=torch.float64)
        for index, row in rows.items():
            table[index, 0] = len(row) - 2
            table[index, 1:len(row) + 1] = torch.tensor(row, dtype=torch.float64)
        dist.all_reduce(table, group=client_group())
        return {i: table[i, 1:3 + int(table[i, 0])].tolist() for i in range(self.settings.clients)}
