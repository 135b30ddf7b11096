"""LightningModules for the two sides of the cut.

``ClientModule`` holds the bottom and top segments, the data-facing loss and metrics and the client
optimizer; Lightning's automatic optimization, gradient accumulation, precision and checkpointing work as
usual. The trunk lives in a ``TrunkModule`` behind a transport (in-process for ``transport="local"``): it
steps whenever the client's optimizer steps, and global-norm clipping spans both sides by exchanging squared
gradient norms, so split training gives the numbers monolithic training gives.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO

from .cut import TrunkLink, cross
from .lora import LoraSettings, TrainMode, adapter_state_dict, prepare
from .metrics import TokenMetrics
from .segments import Activations, Segment
from .state import load_state, save_state


RUN_FILE = "run.json"


@dataclass
class OptimSettings:
    """AdamW and its learning-rate schedule (transformers' ``get_scheduler`` names)."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: Literal["constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    warmup_steps: int = 0
    total_steps: int | None = None
    """Steps the schedule spans (linear/cosine); default: the trainer's max_steps."""


@dataclass
class TrunkSettings:
    """How the server trains the trunk: LoRA on its projections, with its own AdamW."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)


def build_optimizer(params: list[torch.nn.Parameter], settings: OptimSettings, total_steps: int | None):
    """AdamW + a warm-up schedule, identical for both parties so split equals monolithic training."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps,
                                  weight_decay=settings.weight_decay)
    steps = settings.total_steps or total_steps
    if settings.schedule != "constant_with_warmup" and not steps:
        raise ValueError(f"the {settings.schedule!r} schedule needs total_steps (or trainer.max_steps)")
    scheduler = get_scheduler(settings.schedule, optimizer, num_warmup_steps=settings.warmup_steps,
                              num_training_steps=steps)
    return optimizer, scheduler


def resolve_model(model: str) -> str:
    """``"quickstart"`` names the embedded tiny model (built on first use); anything else is a hub id/folder."""
    if model == "quickstart":
        from .quickstart import model_dir

        return str(model_dir())
    return model


class TrunkModule(L.LightningModule):
    """The server's side: the trunk segment with LoRA on its projections, and its optimizer settings."""

    def __init__(self, model: str = "quickstart", cuts: list[int] | tuple[int, int] = (2, 4),
                 trunk: TrunkSettings | None = None, seed: int = 0, dtype: str | None = None,
                 total_steps: int | None = None, device_map: dict[str, str] | str | None = None) -> None:
        super().__init__()
        from .loading import split_model

        self.settings = trunk or TrunkSettings()
        self.total_steps = total_steps
        parts = split_model(resolve_model(model), cuts=tuple(cuts), parts=("trunk",), dtype=dtype,
                            device_map=device_map)
        self.trunk: Segment = prepare(parts["trunk"], "lora", self.settings.lora, seed)

    def build_optimizer(self):
        """The trunk's AdamW and schedule, stepped by the server on the client's boundaries."""
        params = [p for p in self.trunk.parameters() if p.requires_grad]
        return build_optimizer(params, self.settings.optim, self.total_steps)


class ClientModule(L.LightningModule):
    """The client's side: bottom + top segments, loss on its own labels, metrics and the client optimizer.

    Args:
        model: hub id or local folder of the base checkpoint, or ``"quickstart"`` for the embedded tiny model.
        cuts: the two cut layers (bottom = layers before the first, top = layers from the second).
        client: how the client's segments train: ``frozen``, ``lora`` or ``full``.
        client_lora: LoRA settings for the client's layers when ``client="lora"``.
        optim: the client's AdamW and schedule.
        trunk: the trunk's LoRA and optimizer (used by the in-process server; a remote server has its own).
        transport: ``local`` runs the trunk in this process.
        seed: seeds the LoRA initialisation (the same seed gives the same adapters however the model is cut).
        dtype: weight dtype (default: the checkpoint's).
        sample_prompt: a user message answered greedily after fitting, to show what the model learnt.
        device_map: device per part (``bottom``, ``trunk``, ``top``) or ``"auto"``, as for ``split_model``;
            in one process this places the trunk (Lightning places the client's parts on its accelerator).
    """

    def __init__(self, model: str = "quickstart", cuts: list[int] | tuple[int, int] = (2, 4),
                 client: TrainMode = "lora", client_lora: LoraSettings = LoraSettings(),
                 optim: OptimSettings = OptimSettings(), trunk: TrunkSettings = TrunkSettings(),
                 transport: Literal["local"] = "local", seed: int = 0, dtype: str | None = None,
                 sample_prompt: str | None = None, device_map: dict[str, str] | str | None = None) -> None:
        super().__init__()
        if len(cuts) != 2:
            raise ValueError(f"the client holds bottom and top of a three-part split: give two cuts, got {cuts}")
        if client not in ("frozen", "lora", "full"):
            raise ValueError(f"client must be 'frozen', 'lora' or 'full', got {client!r}")
        if transport != "local":
            raise ValueError(f"unknown transport {transport!r}; available: local")
        self.model_name, self.cuts, self.client_mode = model, tuple(cuts), client
        self.client_lora, self.optim, self.trunk_settings = client_lora, optim, trunk
        self.seed, self.dtype_name = seed, dtype
        self.sample_prompt, self.device_map = sample_prompt, device_map
        self.strict_loading = False  # checkpoints hold only the trainable tensors
        self.bottom: Segment | None = None
        self.top: Segment | None = None
        self.link: TrunkLink | None = None
        self.server = None
        self._trunk_scale: float | None = None
        self._stats = {"tokens": 0, "losses": [], "began": None}

    # ---------------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        if self.bottom is not None:
            return
        from .loading import split_model

        path = resolve_model(self.model_name)
        bottom, top = split_model(path, cuts=self.cuts, parts=("bottom", "top"), dtype=self.dtype_name,
                                  device_map=self.device_map)
        self.bottom = prepare(bottom, self.client_mode, self.client_lora, self.seed)
        self.top = prepare(top, self.client_mode, self.client_lora, self.seed)
        self.train_metrics = TokenMetrics(self.top.config.vocab_size)
        self.val_metrics = TokenMetrics(self.top.config.vocab_size)
        if self.link is None:
            self.connect(self._local_server(path))

    def _local_server(self, path: str):
        from .server import TrunkServer

        total = self.trainer.max_steps if self._trainer is not None and self.trainer.max_steps > 0 else None
        trunk = TrunkModule(path, self.cuts, self.trunk_settings, self.seed, self.dtype_name, total, self.device_map)
        run_dir = self.run_dir if self._trainer is not None else None
        return TrunkServer(trunk, run_dir=run_dir)

    def connect(self, server) -> None:
        """Use ``server`` (an in-process :class:`TrunkServer`) as the far side of the cut."""
        from .transport.local import LocalTransport

        self.server = server
        self.link = TrunkLink(LocalTransport(server))

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, batch: dict[str, torch.Tensor], key: tuple = ("eval", 0)) -> Any:
        """bottom -> trunk (across the cut) -> top; returns the top's output (``logits``, ``loss``)."""
        state: Activations = self.bottom(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                                         position_ids=batch.get("position_ids"))
        state = cross(self.link, state, key)
        return self.top(state, labels=batch.get("labels"))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch, key=("train", self.global_step, batch_idx))
        self.train_metrics.update(out.logits.detach(), batch["labels"])
        self.log("train_loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self._stats["tokens"] += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        self._stats["losses"].append(out.loss.item())
        return out.loss

    def on_train_epoch_end(self) -> None:
        self.log_dict({f"train_{k}": v for k, v in self.train_metrics.compute().items()})
        self.train_metrics.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch, key=("val", self.global_step, batch_idx))
        self.val_metrics.update(out.logits, batch["labels"])
        self.log("val_loss", out.loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return out.loss

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val_{k}": v for k, v in self.val_metrics.compute().items()}, prog_bar=True)
        self.val_metrics.reset()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self(batch, key=("test", self.global_step, batch_idx))
        self.log("test_loss", out.loss, batch_size=batch["input_ids"].shape[0])
        return out.loss

    # ---------------------------------------------------------------------------------------- optimization
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            # A frozen client still needs Lightning to reach optimizer_step, where the trunk steps.
            params = [torch.nn.Parameter(torch.zeros(0))]
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else None
        optimizer, scheduler = build_optimizer(params, self.optim, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Global-norm clipping across both parties: the total norm includes the trunk's gradients."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError("split training clips by global norm only (gradient_clip_algorithm='norm')")
        grads = [p.grad for p in self.parameters() if p.requires_grad and p.grad is not None]
        own = torch.stack([torch.linalg.vector_norm(g) for g in grads]).pow(2).sum() if grads else torch.zeros(())
        total = torch.sqrt(own.float().cpu() + self.link.grad_sq_norm())
        scale = torch.clamp(gradient_clip_val / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(scale.to(g.device, g.dtype))
        self._trunk_scale = float(scale)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        self._trunk_scale = None
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.link.step(self._trunk_scale)

    # ---------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the client's trainable tensors and have the trunk save its own state beside."""
        trainable = {n for n, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        tag = f"step-{self.global_step}"
        self.link.save(tag)
        checkpoint["trunk_checkpoint"] = tag

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        self.link.load(checkpoint["trunk_checkpoint"])

    def client_adapters(self) -> dict[str, torch.Tensor]:
        """The client's LoRA tensors (empty unless ``client="lora"``)."""
        return {**adapter_state_dict(self.bottom), **adapter_state_dict(self.top)}

    # ---------------------------------------------------------------------------------------- summary
    @property
    def run_dir(self) -> Path:
        """The run folder: checkpoints, trunk state, run.json, summary.json."""
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def on_fit_start(self) -> None:
        self._stats["began"] = time.perf_counter()
        if self.trainer.is_global_zero:
            manifest = {
                "model": resolve_model(self.model_name),
                "cuts": list(self.cuts),
                "num_layers": self.top.config.num_hidden_layers,
                "client": self.client_mode,
                "client_lora": asdict(self.client_lora),
                "trunk_lora": asdict(self.trunk_settings.lora),
            }
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / RUN_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

    def fit_summary(self) -> dict[str, Any]:
        """Figures of the last fit: first/last train loss, steps, time, throughput, bytes over the cut."""
        seconds = time.perf_counter() - self._stats["began"] if self._stats["began"] else 0.0
        losses = self._stats["losses"]
        return {
            "train_loss_first": losses[0] if losses else math.nan,
            "train_loss_last": losses[-1] if losses else math.nan,
            "steps": self.global_step,
            "seconds": seconds,
            "tokens_per_second": self._stats["tokens"] / seconds if seconds else 0.0,
            "wire_bytes": self.link.wire_bytes if self.link is not None else 0,
        }


class SafetensorsCheckpointIO(CheckpointIO):
    """Lightning checkpoints as one safetensors file (tensors + JSON structure): nothing is pickled.

    The file keeps Lightning's name (``last.ckpt``, ``epoch=0-step=50.ckpt``) so ``--ckpt_path last`` works.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        save_state(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_state(path)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)
