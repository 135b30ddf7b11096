"""Trunk checkpoints: only what the server owns (an adapter's tensors, optimizer and scheduler state, step counter)
as safetensors, written atomically, in each adapter's folder (``trunk/<client>/``, a federation's ``trunk/``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..federated.trunk import TrunkFederation
from ..state import load_state, save_state
from ..transport.protocol import TAG
from .adapters import FEDERATION, TrunkAdapter

LATEST = "latest"
PREVIOUS = "previous"
"""With trunk replicas, the ``latest`` checkpoint before the last: the replicas restart from a step every one of
them saved, which may be the one before this replica's last."""


class Checkpoints:
    """Writes and reads adapters' checkpoints; the server's lock is held.

    Args:
        fingerprint: the trunk's (a checkpoint of another model is refused).
        federation: the server's federation, whose step the checkpoints carry.
        run_dir: the folder holding ``trunk/`` (None: no checkpoints).
    """

    def __init__(self, fingerprint: dict[str, Any], federation: TrunkFederation, run_dir: Path | None) -> None:
        self.fingerprint, self.federation, self.run_dir = fingerprint, federation, run_dir
        self.keep_previous = False
        """Keep the ``latest`` checkpoint of another step a save replaces as ``previous`` (trunk replicas)."""
        self._latest: dict[Path, int] = {}
        """The steps of each ``latest`` checkpoint this process wrote."""

    def path(self, tag: str, adapter: TrunkAdapter) -> Path:
        """``<adapter's folder>/<tag>.safetensors``."""
        if adapter.folder is None:
            raise RuntimeError("this trunk server has no run folder to keep checkpoints in")
        if not TAG.fullmatch(tag):
            raise ValueError(f"bad checkpoint tag {tag!r}")
        return adapter.folder / f"{tag}.safetensors"

    def state(self, adapter: TrunkAdapter, feedback: dict[str, Any] | None = None) -> dict[str, Any]:
        """``adapter``'s state; ``feedback``: client -> the error feedback of the int8 gradients sent to it."""
        return {
            "trainable": {n: p.detach() for n, p in adapter.trainable},
            "optimizer": adapter.optimizer.state_dict(),
            "scheduler": None if adapter.scheduler is None else adapter.scheduler.state_dict(),
            "steps": adapter.steps,
            "federated_step": self.federation.federated_step,
            "fingerprint": self.fingerprint,
            "wire_feedback": feedback or {},
            **({"federation": self.federation.persisted()} if adapter.owner == FEDERATION else {}),
        }

    def save(self, tag: str, adapter: TrunkAdapter, feedback: dict[str, Any] | None = None) -> Path:
        """Write ``adapter``'s state (and ``feedback``: :meth:`state`) to its folder's ``<tag>.safetensors``
        atomically (write, then rename)."""
        target = self.path(tag, adapter)
        if tag == LATEST and self.keep_previous and target.is_file():
            held = self._latest.get(target)
            if (held if held is not None else int(load_state(target)["steps"])) != adapter.steps:
                target.replace(target.with_name(f"{PREVIOUS}.safetensors"))
        path = save_state(self.state(adapter, feedback), target)
        if tag == LATEST:
            self._latest[target] = adapter.steps
        if tag == LATEST or adapter.saved_step is None or adapter.steps >= adapter.saved_step:
            adapter.saved_step = adapter.steps
        return path

    @torch.no_grad()
    def restore(self, path: Path, adapter: TrunkAdapter) -> tuple[int, dict[str, Any]]:
        """Load a checkpoint written by :meth:`save` into ``adapter``; returns its step and the error feedback it
        saved (client -> state)."""
        state = load_state(path)
        params = dict(adapter.trainable)
        if set(params) != set(state["trainable"]):
            raise KeyError(f"trunk checkpoint {path} does not match the trunk's trainable tensors")
        saved_print = state.get("fingerprint")
        if saved_print is not None and saved_print["config"] != self.fingerprint["config"]:
            raise ValueError(f"trunk checkpoint {path} was written for another model")
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
        adapter.optimizer.load_state_dict(state["optimizer"])
        if adapter.scheduler is not None and state["scheduler"] is not None:
            adapter.scheduler.load_state_dict(state["scheduler"])
        adapter.optimizer.zero_grad(set_to_none=True)
        adapter.steps = adapter.saved_step = int(state["steps"])
        if adapter.owner == FEDERATION:
            self.federation.restored(path.name, adapter.steps, int(state.get("federated_step", 0)),
                                     state.get("federation"))
        return adapter.steps, state.get("wire_feedback", {})

    def resume_points(self, federated: bool) -> dict[str, int]:
        """Owner -> the step of the checkpoint written last in its folder (a federation's ``trunk/``, else every
        ``trunk/<client>/``)."""
        if self.run_dir is None:
            return {}
        folder = self.run_dir / "trunk"
        if federated:
            found = {FEDERATION: last_checkpoint(folder)}
        else:
            owners = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
            found = {p.name: last_checkpoint(p) for p in owners}
        return {owner: int(load_state(path)["steps"]) for owner, path in found.items() if path is not None}


def checkpoint_at(folder: Path, steps: int) -> Path | None:
    """The checkpoint written last in ``folder`` whose adapter had made ``steps`` steps (None: there is none)."""
    for path in sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns, reverse=True):
        if int(load_state(path)["steps"]) == steps:
            return path
    return None


def last_checkpoint(folder: Path | None) -> Path | None:
    """The checkpoint written last in ``folder``: the last written, not the highest step (after a client went back to
    an older checkpoint, files of the abandoned steps may remain)."""
    if folder is None or not folder.is_dir():
        return None
    found = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
    return found[-1] if found else None
