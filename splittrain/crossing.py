"""The client's way through the split model: bottom -> cut-1 defense -> trunk (across the cut) -> top.

A :class:`Crossing` holds the client's bottom and top segments, its defenses (:mod:`splittrain.privacy`) and its
link to the trunk (:mod:`splittrain.cut`). Training and evaluation passes, whole or pipelined as micro-batches
(:class:`~splittrain.cut.Pipeline`), and generation (:mod:`splittrain.generate`) all leave the bottom through
:meth:`Crossing.leave`, so the defended hidden states are what crosses wherever the trunk runs, and the top's
input is the trunk's output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from .cut import Pipeline, TrunkLink, cross, micro_batches
from .segments import Activations, Segment
from .transport.codec import unpack

if TYPE_CHECKING:
    from .privacy import Defense

Batch = dict[str, torch.Tensor]


class Crossing:
    """The client's bottom, defenses, link and top, composed once.

    ``link`` reaches the trunk on its server; generation over bare segments may give a trunk :class:`Segment`
    instead (it runs in this process). ``defense`` (None: no defenses) transforms the hidden states before they
    cross cut 1 and dL/dh before it goes back at cut 2.
    """

    def __init__(self, bottom: Segment, top: Segment, link: TrunkLink | Segment | None,
                 defense: Defense | None = None) -> None:
        self.bottom, self.top, self.link, self.defense = bottom, top, link, defense

    @property
    def defend_gradient(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The cut-2 defense of dL/dh before it is sent back (None: it goes as it is)."""
        return self.defense.gradients if self.defense is not None else None

    def leave(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, cache: Any = None) -> Activations:
        """The bottom's output as it crosses cut 1: its hidden states defended when the client has defenses
        (clipped and noised in the client's graph). ``cache``: the bottom's KV cache (generation)."""
        state = self.bottom(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
        if self.defense is None:
            return state
        return Activations(self.defense.activations(state.hidden_states), state.attention_mask, state.position_ids)

    def forward(self, batch: Batch, key: tuple, step: int | None = None) -> Any:
        """bottom -> trunk -> top on ``batch``; the top's output (``logits``, ``loss``). In grad mode the server keeps
        the trunk's graph under ``key`` for the client's optimizer ``step`` until the backward pass."""
        state = self._leave_batch(batch)
        return self.top(cross(self.link, state, key, step, self.defend_gradient), labels=batch.get("labels"))

    def loss(self, batch: Batch, count: int, key: tuple, step: int,
             each: Callable[[Any, Batch], None]) -> tuple[torch.Tensor, Pipeline | None]:
        """The training loss of ``batch`` in one pass, or pipelined as ``count`` > 1 micro-batches (see
        :meth:`pipelined_loss`; then also the :class:`Pipeline` to ``finish()`` after the loss's backward pass).
        ``each(output, micro_batch)`` sees every top output (metrics)."""
        if count > 1:
            return self.pipelined_loss(batch, count, key, step, each)
        out = self.forward(batch, key, step)
        each(out, batch)
        return out.loss, None

    def evaluate(self, batch: Batch, count: int, key: tuple, each: Callable[[Any, Batch], None]) -> torch.Tensor:
        """The loss of ``batch`` without gradients, in one pass or as ``count`` > 1 micro-batches in flight at once
        (their losses summed, see :meth:`pipelined_outputs`); ``each(output, micro_batch)`` sees every top output."""
        if count <= 1:
            out = self.forward(batch, key)
            each(out, batch)
            return out.loss
        loss = torch.zeros(())
        for out, chunk in self.pipelined_outputs(batch, count, key):
            each(out, chunk)
            loss = loss + out.loss
        return loss

    def pipelined_loss(self, batch: Batch, count: int, key: tuple, step: int,
                       each: Callable[[Any, Batch], None] | None = None) -> tuple[torch.Tensor, Pipeline]:
        """The whole batch's training loss, computed as ``count`` pipelined micro-batches (see :class:`Pipeline`).

        Each micro-batch's loss is its tokens' summed loss over the batch's number of trained tokens, so the sum is
        the batch's mean loss and its gradients are the batch's. ``each(output, micro_batch)`` sees every
        micro-batch's top output (metrics). Backward the loss, then call ``finish()`` on the pipeline.
        """
        chunks = micro_batches(batch, count)
        trained = _trained_tokens(batch["labels"])
        pipe = Pipeline(self.link, key, step, self.defend_gradient)
        for chunk in chunks:  # every micro-batch leaves before the first comes back
            pipe.send(self._leave_batch(chunk))
        loss = None
        for i, chunk in enumerate(chunks):
            out = self.top(pipe.receive(i), labels=chunk["labels"], num_items_in_batch=trained)
            if each is not None:
                each(out, chunk)
            loss = out.loss if loss is None else loss + out.loss
        return loss, pipe

    def pipelined_outputs(self, batch: Batch, count: int, key: tuple) -> list[tuple[Any, Batch]]:
        """Evaluation without gradients: ``batch`` crosses the cut as ``count`` micro-batches in flight at once (the
        server keeps nothing). Each micro-batch's top output with the micro-batch; its loss is weighted as in
        :meth:`pipelined_loss`, so the losses sum to the batch's."""
        chunks = micro_batches(batch, count)
        trained = _trained_tokens(batch["labels"])
        sent = []
        for i, chunk in enumerate(chunks):
            state = self._leave_batch(chunk)
            sent.append((state, self.link.send_forward(state, (*key, i), False, False)))
        outputs = []
        for (state, pending), chunk in zip(sent, chunks):
            hidden = unpack(pending.result()[1], "hidden_states").to(device=state.hidden_states.device,
                                                                      dtype=state.hidden_states.dtype)
            out = self.top(Activations(hidden, state.attention_mask, state.position_ids), labels=chunk["labels"],
                           num_items_in_batch=trained)
            outputs.append((out, chunk))
        return outputs

    def clip_gradients(self, params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
        """Global-norm clipping across both parties: scale the client's gradients of ``params`` so that their norm
        together with the trunk's (its squared norm asked over the link) is at most ``max_norm``. Returns the scale,
        for the trunk's gradients at its step."""
        grads = [p.grad for p in params if p.requires_grad and p.grad is not None]
        own = torch.stack([torch.linalg.vector_norm(g) for g in grads]).pow(2).sum() if grads else torch.zeros(())
        total = torch.sqrt(own.float().cpu() + self.link.grad_sq_norm())
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(scale.to(g.device, g.dtype))
        return float(scale)

    def _leave_batch(self, batch: Batch) -> Activations:
        return self.leave(batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids"))


def _trained_tokens(labels: torch.Tensor) -> torch.Tensor:
    """What transformers' causal-LM loss averages over (labels shifted by one)."""
    return (labels[..., 1:] != -100).sum()
