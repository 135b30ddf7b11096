"""Crossing the cut: an autograd Function whose far side is the trunk, wherever it runs.

Client code reads like ordinary training::

    state = bottom(input_ids, attention_mask=mask)
    state = cross(link, state, key, step)    # the trunk runs on the server
    loss = top(state, labels=labels).loss
    loss.backward()                          # dL/dh goes to the server, its dL/dh_in comes back

Forward sends the hidden states with the attention mask and position ids (each side rebuilds its own masks
and rotary tables); backward sends dL/dh and returns the server's dL/dh_in, so autograd continues into the
bottom as if the trunk were local. Hidden states and gradients cross in the link's wire dtype (float32 is
exact; bfloat16/float16 halve the bytes; int8 with a scale per row and error feedback on gradients is a little
over a quarter: :mod:`~splittrain.transport.codec`) and each side casts back to its compute dtype; the mask
crosses as bytes and the positions as int32, whatever the transport, so every transport computes the same
numbers.

:func:`make_link` builds a client's link from the transport's name; :class:`~splittrain.crossing.Crossing`
composes bottom, defenses, this cut and top into the client's passes (single, pipelined, generation).
"""

from __future__ import annotations

from typing import Any, Callable, Hashable

import torch

from .segments import Activations
from .transport import LinkOptions, Pending, Transport, connect
from .transport.codec import ErrorFeedback, check_wire_dtype, pack, unpack


class TrunkLink:
    """The client's handle on the trunk server through a :class:`Transport`."""

    def __init__(self, transport: Transport, wire_dtype: str = "float32") -> None:
        self.transport = transport
        self.wire_dtype = check_wire_dtype(wire_dtype)
        self.feedback = ErrorFeedback()
        """The error feedback of the int8 gradients this client sends (saved with its checkpoints)."""
        self.positions_sent = 0
        """Sequence positions of hidden states sent to the trunk so far (every forward pass, generation included)."""

    @property
    def wire_bytes(self) -> int:
        """Bytes the transport sent and received so far."""
        return self.transport.wire_bytes

    def _request(self, kind: str, header: dict[str, Any], tensors: dict[str, torch.Tensor]):
        return self.transport.request(kind, header, tensors)

    def send_forward(self, state: Activations, key: Hashable, training: bool, need_input_grad: bool,
                     step: int | None = None) -> Pending:
        """Start the trunk on ``state`` (the reply's ``hidden_states`` are its output); in training the server
        keeps the graph under ``key`` for ``step``."""
        tensors = {**pack("hidden_states", state.hidden_states, self.wire_dtype),
                   "position_ids": state.position_ids.to(torch.int32)}
        if state.attention_mask is not None:
            tensors["attention_mask"] = state.attention_mask.to(torch.uint8)
        header = {"key": list(key), "training": training, "need_input_grad": need_input_grad}
        self.positions_sent += state.hidden_states.shape[1]
        if training:
            if step is None:
                raise ValueError("a training forward pass needs the client's optimizer step")
            header["step"] = int(step)
        return self.transport.submit("forward", header, tensors)

    def forward(self, state: Activations, key: Hashable, training: bool, need_input_grad: bool,
                step: int | None = None) -> torch.Tensor:
        """Run the trunk on ``state``; in training the server keeps the graph under ``key`` for ``step``."""
        return unpack(self.send_forward(state, key, training, need_input_grad, step).result()[1], "hidden_states")

    def generate(self, generation: str, start: bool, hidden: torch.Tensor, new_mask: torch.Tensor,
                 positions: torch.Tensor) -> torch.Tensor:
        """Run the trunk on the next positions of generation ``generation`` with the server's KV cache for it
        (``start``: a new one). ``new_mask`` is the attention mask of these positions only; the server keeps the
        rest."""
        tensors = {**pack("hidden_states", hidden, self.wire_dtype), "position_ids": positions.to(torch.int32),
                   "attention_mask": new_mask.to(torch.uint8)}
        header = {"key": ["generate"], "training": False, "need_input_grad": False, "generation": generation,
                  "start": start}
        self.positions_sent += hidden.shape[1]
        return unpack(self._request("forward", header, tensors)[1], "hidden_states")

    def end_generation(self, generation: str) -> None:
        """Free the server's KV cache of ``generation``."""
        self._request("end_generation", {"generation": generation}, {})

    def send_backward(self, key: Hashable, grad: torch.Tensor) -> Pending:
        """Start the trunk's backward pass of ``key`` with dL/dy ``grad`` (the reply's ``grad`` is dL/dx, when the
        forward pass asked for it)."""
        return self.transport.submit("backward", {"key": list(key)}, self.feedback.pack("grad", grad, self.wire_dtype))

    def backward(self, key: Hashable, grad: torch.Tensor) -> torch.Tensor | None:
        return returned_grad(self.send_backward(key, grad))

    def grad_sq_norm(self) -> torch.Tensor:
        """Sum over trunk parameters of their squared gradient norms (for global-norm clipping)."""
        return self._request("grad_sq_norm", {}, {})[1]["sq_norm"]

    def step(self, step: int, scale: float | None = None, participant: bool | None = None) -> dict[str, Any]:
        """Make optimizer step number ``step`` on the trunk, scaling its gradients by ``scale`` (clipping); in a
        federation, say whether this client took part in the step (its gradients count)."""
        header: dict[str, Any] = {"step": int(step), "scale": scale}
        if participant is not None:
            header["participant"] = participant
        return self._request("step", header, {})[0]

    def request_plain(self, kind: str, header: dict[str, Any]) -> dict[str, Any]:
        """A request without tensors; the reply's header."""
        return self._request(kind, header, {})[0]

    def request_tensors(self, kind: str, header: dict[str, Any], tensors: dict[str, torch.Tensor]):
        """A request with tensors as given (no wire-dtype cast); the reply's header and tensors."""
        return self._request(kind, header, tensors)

    def join(self, index: int, samples: int) -> dict[str, Any]:
        """Tell the server which client of its federation this is and how many training rows it holds."""
        return self._request("join", {"index": int(index), "samples": int(samples)}, {})[0]

    def save(self, tag: str) -> dict[str, Any]:
        """Have the server save this client's trunk adapter as ``tag``; the reply names the file (``file``, under the
        server's ``trunk/`` folder)."""
        return self._request("save", {"tag": tag}, {})[0]

    def load(self, tag: str, force: bool = False) -> None:
        """Have the server restore this client's trunk adapter from ``tag``; ``force``: even when other clients of a
        federation are training it (it goes back for them too)."""
        self._request("load", {"tag": tag, **({"force": True} if force else {})}, {})

    def close(self) -> None:
        """End the session on the server (graphs freed) and release the connection."""
        self.transport.close()


def make_link(transport: str, *, wire_dtype: str = "float32", client: str = "client0", server: Any = None,
              address: str | None = None, token: str | None = None, fingerprint: dict[str, Any] | None = None,
              tls_ca: str | None = None, timeout: float = 600.0, reconnect_timeout: float = 300.0,
              schedule: dict[str, Any] | None = None) -> TrunkLink:
    """A :class:`TrunkLink` over the transport named ``transport`` (one of
    :data:`~splittrain.transport.TRANSPORTS`), the one place a client's link is built.

    ``local`` hands messages to ``server``, a :class:`~splittrain.server.TrunkServer` in this process, as
    ``client``; ``tcp`` connects to the ``serve`` process at ``address`` as ``client`` with ``token`` (TLS verified
    with ``tls_ca``; reconnecting for ``reconnect_timeout`` seconds); ``dist`` talks to rank 0 of this torchrun job.
    ``tcp`` and ``dist`` present ``fingerprint`` and ``schedule`` (the trunk schedule this client trains with; None
    when it does not train) and wait ``timeout`` seconds for the server.
    """
    options = LinkOptions(client=client, server=server, address=address, token=token, fingerprint=fingerprint,
                          tls_ca=tls_ca, timeout=timeout, reconnect_timeout=reconnect_timeout, schedule=schedule)
    return TrunkLink(connect(transport, options), wire_dtype)


def returned_grad(pending: Pending) -> torch.Tensor | None:
    """dL/dx of a backward request's reply (None when the forward pass did not ask for it)."""
    tensors = pending.result()[1]
    return unpack(tensors, "grad") if "grad" in tensors else None


class Cut(torch.autograd.Function):
    """Identity-shaped op whose forward runs the trunk remotely and whose backward returns its input grad.

    ``anchor`` is an empty tensor that requires grad when nothing before the cut does, so the output still
    joins the graph and the trunk receives its gradients.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, anchor: torch.Tensor | None, link: TrunkLink, key: Hashable,
                attention_mask: torch.Tensor | None, position_ids: torch.Tensor, training: bool,
                step: int | None, defend: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
        ctx.link, ctx.key, ctx.defend = link, key, defend
        need_input_grad = ctx.needs_input_grad[0]
        out = link.forward(Activations(hidden, attention_mask, position_ids), key, training, need_input_grad, step)
        return out.to(device=hidden.device, dtype=hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        if ctx.defend is not None:  # the gradient leaves the client defended (clip + noise, see privacy.py)
            grad = ctx.defend(grad)
        grad_in = ctx.link.backward(ctx.key, grad)
        if grad_in is not None:
            grad_in = grad_in.to(device=grad.device, dtype=grad.dtype)
        return grad_in, None, None, None, None, None, None, None, None


def cross(link: TrunkLink, state: Activations, key: Hashable, step: int | None = None,
          defend_gradient: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Activations:
    """Run the trunk on ``state`` through ``link``; differentiable when grad mode is on.

    In grad mode the trunk's graph waits on the server under ``key`` until the backward pass arrives, and
    ``step`` (the client's optimizer steps so far) must match the server's; otherwise (validation,
    generation) the server keeps nothing. ``defend_gradient`` transforms dL/dh of the trunk's output before it is
    sent back (the cut-2 defense of :mod:`splittrain.privacy`).
    """
    hidden = state.hidden_states
    training = torch.is_grad_enabled()
    anchor = torch.empty(0, requires_grad=True) if training and not hidden.requires_grad else None
    out = Cut.apply(hidden, anchor, link, key, state.attention_mask, state.position_ids, training, step,
                    defend_gradient)
    return Activations(out, state.attention_mask, state.position_ids)


class Pipeline:
    """One training batch crossing the cut as micro-batches in flight at once, so that the transfer of one
    overlaps the compute of another (the client's bottom and top and the server's trunk work on different
    micro-batches at the same time)::

        pipe = Pipeline(link, key, step)
        for chunk in chunks:
            pipe.send(bottom(chunk))                 # every micro-batch leaves before the first comes back
        loss = sum(top(pipe.receive(i), ...).loss for i in range(len(chunks)))   # weighted as its share
        loss.backward()                              # each dL/dh leaves as soon as autograd has it
        pipe.finish()                                # every dL/dh_in is back and has gone into the bottom

    Micro-batch ``i`` is the trunk's graph ``(*key, i)``; its gradients accumulate on the server until the step,
    as the client's do, so a step makes the whole batch's update. The bottom's backward waits for ``finish``:
    autograd cannot wait for a reply without holding up the micro-batches behind it.
    """

    def __init__(self, link: TrunkLink, key: tuple, step: int,
                 defend_gradient: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.link, self.key, self.step, self.defend_gradient = link, tuple(key), step, defend_gradient
        self.sent: list[tuple[Activations, Pending]] = []
        self.returning: list[tuple[int, Pending]] = []

    def send(self, state: Activations) -> None:
        """Send the next micro-batch's hidden states (the bottom's output) to the trunk."""
        need_input_grad = state.hidden_states.requires_grad
        pending = self.link.send_forward(state, (*self.key, len(self.sent)), True, need_input_grad, self.step)
        self.sent.append((state, pending))

    def receive(self, i: int) -> Activations:
        """The trunk's output for micro-batch ``i``, in the graph: its gradient goes back when autograd has it."""
        state = self.sent[i][0]
        out = _Returning.apply(torch.empty(0, requires_grad=True), self, i)
        return Activations(out.to(device=state.hidden_states.device, dtype=state.hidden_states.dtype),
                           state.attention_mask, state.position_ids)

    def _send_grad(self, i: int, grad: torch.Tensor) -> None:
        if self.defend_gradient is not None:
            grad = self.defend_gradient(grad)
        self.returning.append((i, self.link.send_backward((*self.key, i), grad)))

    def finish(self) -> None:
        """Wait for every backward reply (a refusal raises here) and run the bottom's backward on dL/dh_in."""
        if len(self.returning) != len(self.sent):
            raise RuntimeError(f"{len(self.sent)} micro-batches went to the trunk but {len(self.returning)} "
                               "gradients came back from the top: backward the sum of every micro-batch's loss")
        for i, pending in self.returning:
            grad_in = returned_grad(pending)
            hidden = self.sent[i][0].hidden_states
            if hidden.requires_grad:
                torch.autograd.backward(hidden, grad_in.to(device=hidden.device, dtype=hidden.dtype))
        self.sent, self.returning = [], []


class _Returning(torch.autograd.Function):
    """The trunk's output of one micro-batch of a :class:`Pipeline`; backward sends dL/dy without waiting."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, pipeline: Pipeline, i: int) -> torch.Tensor:
        ctx.pipeline, ctx.i = pipeline, i
        return unpack(pipeline.sent[i][1].result()[1], "hidden_states")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        ctx.pipeline._send_grad(ctx.i, grad)
        return None, None, None


def micro_batches(batch: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` split along its rows into ``count`` micro-batches (fewer when it has fewer rows)."""
    rows = next(iter(batch.values())).shape[0]
    parts = {name: torch.tensor_split(t, min(count, rows)) for name, t in batch.items()}
    return [{name: chunks[i] for name, chunks in parts.items()} for i in range(min(count, rows))]
