"""The optimizer both parties build: AdamW and a warm-up schedule, with the same settings on either side, so
split training equals monolithic training step for step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from .transport.wire import ProtocolError


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

    def resolved(self, total_steps: int | None) -> dict[str, Any]:
        """What fixes the trunk's updates, with the steps a linear/cosine schedule spans resolved (sent at the
        handshake)."""
        spans = None if self.schedule == "constant_with_warmup" else self.total_steps or total_steps
        return {"lr": float(self.lr), "weight_decay": float(self.weight_decay), "betas": [float(b) for b in self.betas],
                "eps": float(self.eps), "schedule": self.schedule, "warmup_steps": int(self.warmup_steps),
                "total_steps": spans}

    @classmethod
    def from_schedule(cls, schedule: Any) -> "OptimSettings":
        """The settings a client sent (:meth:`resolved`), checked field by field."""
        fields = {"lr", "weight_decay", "betas", "eps", "schedule", "warmup_steps", "total_steps"}
        number = (int, float)
        if not (isinstance(schedule, dict) and set(schedule) == fields
                and all(isinstance(schedule[k], number) and not isinstance(schedule[k], bool) and 0 <= schedule[k] < 1e6
                        for k in ("lr", "weight_decay", "eps"))
                and isinstance(schedule["betas"], list) and len(schedule["betas"]) == 2
                and all(isinstance(b, number) and 0 <= b < 1 for b in schedule["betas"])
                and schedule["schedule"] in ("constant_with_warmup", "linear", "cosine")
                and type(schedule["warmup_steps"]) is int and 0 <= schedule["warmup_steps"] < 2**31
                and (schedule["total_steps"] is None
                     or type(schedule["total_steps"]) is int and 0 < schedule["total_steps"] < 2**31)):
            raise ProtocolError("'schedule' must hold lr, weight_decay, betas, eps, schedule, warmup_steps and "
                                "total_steps of valid types and ranges")
        return cls(lr=schedule["lr"], weight_decay=schedule["weight_decay"], betas=tuple(schedule["betas"]),
                   eps=schedule["eps"], schedule=schedule["schedule"], warmup_steps=schedule["warmup_steps"],
                   total_steps=schedule["total_steps"])


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
