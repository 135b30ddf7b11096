"""TrunkServer: runs the trunk for its clients and steps its optimizer when they say so.

On ``forward`` the server detaches the received hidden states, runs the trunk and keeps ``(x, y)`` under
the key ``(client, step, micro)``; on ``backward`` it back-propagates the received dL/dy, returns dL/dx and
drops the graph. ``step`` applies the client's clipping scale, then the optimizer and scheduler, so the trunk
steps on exactly the client's boundaries (gradient accumulation included). Its checkpoints hold only what
the server owns (trainable trunk tensors, optimizer and scheduler state) as safetensors.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from .segments import Activations
from .state import load_state, save_state
from .transport import Header, Tensors

if TYPE_CHECKING:
    from .modules import TrunkModule


class TrunkServer:
    """Serves one trunk to any number of clients (graphs are kept per client and key)."""

    def __init__(self, module: "TrunkModule", run_dir: str | Path | None = None, max_graphs: int = 64) -> None:
        self.module = module
        self.trunk = module.trunk
        self.optimizer, self.scheduler = module.build_optimizer()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor, bool]] = OrderedDict()
        self.steps = 0
        self._handlers: dict[str, Callable[[str, Header, Tensors], tuple[Header, Tensors]]] = {
            "forward": self._forward, "backward": self._backward, "grad_sq_norm": self._grad_sq_norm,
            "step": self._step, "save": self._save, "load": self._load,
        }

    @property
    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.trunk.named_parameters() if p.requires_grad]

    def handle(self, client: str, kind: str, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        """Answer one message from ``client``."""
        handler = self._handlers.get(kind)
        if handler is None:
            raise ValueError(f"unknown message kind {kind!r}; expected one of {sorted(self._handlers)}")
        return handler(client, header, tensors)

    def _forward(self, client: str, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        device, dtype = self.trunk.device, self.trunk.dtype
        x = tensors["hidden_states"].to(device=device, dtype=dtype)
        mask = tensors.get("attention_mask")
        training = bool(header.get("training", False))
        self.trunk.train(training)
        if training:
            x = x.detach().requires_grad_(bool(header.get("need_input_grad", True)))
        with torch.set_grad_enabled(training):
            y = self.trunk(Activations(x, mask, tensors["position_ids"])).hidden_states
        if training:
            key = (client, *header["key"])
            self.graphs[key] = (x, y, x.requires_grad)
            while len(self.graphs) > self.max_graphs:
                dropped, _ = self.graphs.popitem(last=False)
                warnings.warn(f"trunk server dropped the unfinished graph {dropped}: more than {self.max_graphs} "
                              "forward passes are waiting for their backward pass", stacklevel=2)
        return {}, {"hidden_states": y.detach()}

    def _backward(self, client: str, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        key = (client, *header["key"])
        if key not in self.graphs:
            raise KeyError(f"no forward pass is waiting for a backward pass under key {key}")
        x, y, need_input_grad = self.graphs.pop(key)
        torch.autograd.backward(y, tensors["grad"].to(device=y.device, dtype=y.dtype))
        return {}, ({"grad": x.grad} if need_input_grad else {})

    def _grad_sq_norm(self, client: str, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        norms = [torch.linalg.vector_norm(p.grad) for _, p in self.trainable if p.grad is not None]
        sq = torch.stack(norms).pow(2).sum() if norms else torch.zeros(())
        return {}, {"sq_norm": sq.float().cpu()}

    @torch.no_grad()
    def _step(self, client: str, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        scale = header.get("scale")
        if scale is not None:
            for _, p in self.trainable:
                if p.grad is not None:
                    p.grad.mul_(scale)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return {"step": self.steps, "lr": self.optimizer.param_groups[0]["lr"]}, {}

    def checkpoint_path(self, tag: str) -> Path:
        if self.run_dir is None:
            raise RuntimeError("this trunk server has no run folder to keep checkpoints in")
        if not tag or "/" in tag or tag.startswith("."):
            raise ValueError(f"bad checkpoint tag {tag!r}")
        return self.run_dir / "trunk" / f"{tag}.safetensors"

    def state(self) -> dict[str, Any]:
        return {
            "trainable": {n: p.detach() for n, p in self.trainable},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "steps": self.steps,
        }

    def _save(self, client: str, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        path = save_state(self.state(), self.checkpoint_path(header["tag"]))
        return {"path": str(path)}, {}

    @torch.no_grad()
    def _load(self, client: str, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        path = self.checkpoint_path(header["tag"])
        if not path.is_file():
            raise FileNotFoundError(f"the trunk has no checkpoint {header['tag']!r} ({path})")
        state = load_state(path)
        params = dict(self.trainable)
        if set(params) != set(state["trainable"]):
            raise KeyError(f"trunk checkpoint {path} does not match the trunk's trainable tensors")
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.steps = state["steps"]
        return {"step": self.steps}, {}
