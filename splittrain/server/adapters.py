"""The trunk's LoRA adapters: one per owner (an independent client, or a federation) over the one frozen trunk."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..optim import OptimSettings, build_optimizer
from ..segments import Segment
from ..transport import Header

FEDERATION = "federation"
"""The owner of a federation's shared trunk adapter."""


@dataclass
class TrunkAdapter:
    """One trunk LoRA adapter and what trains it: an independent client's, or its federation's."""

    owner: str
    """The client name it belongs to, or :data:`FEDERATION`."""
    name: str
    """Its peft adapter name in the trunk's LoRA layers."""
    trainable: list[tuple[str, torch.nn.Parameter]]
    """Its parameters, under the names of peft's ``default`` adapter (checkpoints look the same whoever owns them)."""
    settings: OptimSettings
    total_steps: int | None
    optimizer: Any
    scheduler: Any
    folder: Path | None
    """Where its checkpoints go (``trunk/<client>/``, the federation's ``trunk/``); None: nowhere."""
    steps: int = 0
    saved_step: int | None = None

    @property
    def schedule(self) -> dict[str, Any]:
        return self.settings.resolved(self.total_steps)

    @property
    def nbytes(self) -> int:
        """Its parameters' and optimizer state's bytes."""
        state = [t for s in self.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return sum(p.nbytes for _, p in self.trainable) + sum(t.nbytes for t in state)

    def step_reply(self) -> Header:
        """What a ``step`` request is answered with: the steps made, the last durable one, the learning rate."""
        return {"step": self.steps, "saved": self.saved_step, "lr": self.optimizer.param_groups[0]["lr"]}


class TrunkAdapters(dict[str, TrunkAdapter]):
    """Owner (client name, or :data:`FEDERATION`) -> its trunk adapter, and which one the trunk runs.

    The first adapter is peft's ``default`` (the trunk's trainable tensors as loaded); each further owner gets an
    adapter injected beside it, starting from the ``default`` adapter's initial tensors.
    """

    def __init__(self, trunk: Segment, optim: OptimSettings, total_steps: int | None, run_dir: Path | None) -> None:
        super().__init__()
        self.trunk, self.optim, self.total_steps, self.run_dir = trunk, optim, total_steps, run_dir
        self._initial = [(n, p.detach().clone()) for n, p in trunk.named_parameters() if p.requires_grad]
        """The ``default`` adapter's initial tensors: every adapter starts from them."""
        self._lora_config = getattr(trunk, "peft_config", {}).get("default")
        self._lora_layers = [m for m in trunk.modules() if hasattr(m, "lora_A") and hasattr(m, "set_adapter")]
        self._active = "default"
        self.param_storages = {p.untyped_storage().data_ptr() for p in trunk.parameters()}
        """The storages of the trunk's parameters (a graph's saved tensors that are not among them cost memory)."""

    def make(self, owner: str, schedule: OptimSettings | None = None) -> TrunkAdapter:
        """A new adapter of ``owner`` from the initial tensors, trained with ``schedule`` (default: the server's
        optimizer settings over its ``total_steps``)."""
        name = "default" if not self else f"adapter{len(self)}"
        if name != "default":
            self._add_lora(name)
        params = dict(self.trunk.named_parameters())
        trainable = [(n, params[n.replace(".default.", f".{name}.")]) for n, _ in self._initial]
        if name != "default":
            with torch.no_grad():
                for (_, p), (_, initial) in zip(trainable, self._initial):
                    p.copy_(initial)
            self.param_storages |= {p.untyped_storage().data_ptr() for _, p in trainable}
        settings = schedule or self.optim
        total = self.total_steps if schedule is None else None
        optimizer, scheduler = build_optimizer([p for _, p in trainable], settings, total)
        folder = None
        if self.run_dir is not None:
            folder = self.run_dir / "trunk" if owner == FEDERATION else self.run_dir / "trunk" / owner
        adapter = self[owner] = TrunkAdapter(owner, name, trainable, settings, total, optimizer, scheduler, folder)
        self._keep_trainable()
        return adapter

    def use(self, name: str) -> None:
        """Run the trunk with adapter ``name``."""
        if name == self._active:
            return
        for layer in self._lora_layers:
            layer.set_adapter(name)
        self._active = name
        self._keep_trainable()

    def _add_lora(self, name: str) -> None:
        """One more LoRA adapter ``name`` in the trunk's layers (peft), every adapter's tensors kept trainable."""
        from peft import inject_adapter_in_model

        if self._lora_config is None or not all(".default." in n for n, _ in self._initial):
            raise RuntimeError("this trunk's trainable tensors are not one peft LoRA adapter 'default': it cannot "
                               "give each client an adapter of its own")
        with warnings.catch_warnings():  # several adapters in one model are what we want
            warnings.filterwarnings("ignore", "Already found a `peft_config` attribute")
            inject_adapter_in_model(self._lora_config, self.trunk, adapter_name=name)
        self.trunk.train(self.trunk.training)  # the new LoRA modules start in training mode
        # peft may leave the layers on the new adapter: make them run the one they ran before
        active, self._active = self._active, name
        self.use(active)

    def _keep_trainable(self) -> None:
        # peft marks only the active adapter trainable; a graph waiting for its backward pass must keep its
        # tensors' requires_grad (autograd skips a leaf that lost it), so every adapter stays trainable.
        for adapter in self.values():
            for _, p in adapter.trainable:
                p.requires_grad_(True)
