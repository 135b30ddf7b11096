"""What the trunk server is configured with: how it trains the trunk, what each client may hold, and the trunk."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..lora import LoraSettings, prepare
from ..optim import OptimSettings
from ..segments import Segment


@dataclass
class TrunkSettings:
    """How the server trains the trunk: LoRA on its projections, with its own AdamW."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    quantization: str | None = None
    """The frozen trunk weights' format: ``int8``, ``nf4`` or ``fp4`` (bitsandbytes; :mod:`splittrain.quantize`),
    null for the weight dtype."""
    gradient_checkpointing: bool = False
    """Recompute each trunk layer's activations in the backward pass instead of keeping them while a client's
    forward pass waits for its gradient (the same gradients; about one more trunk forward pass per step)."""


@dataclass
class ServerLimits:
    """What one client may hold on the server, and how long a silent client's session lives."""

    max_graphs: int = 64
    """Forward passes waiting for their backward pass, per client."""
    max_graph_bytes: int = 8 * 2**30
    """Bytes the waiting graphs may keep for backward, per client."""
    max_graph_age: float = 3600.0
    """Seconds a forward pass may wait for its backward pass."""
    max_batch: int = 4096
    """Rows per forward pass."""
    max_seq: int | None = None
    """Tokens per row (default: the model's ``max_position_embeddings``)."""
    max_frame_bytes: int = 4 * 2**30
    """Largest payload an authenticated client may send."""
    session_timeout: float = 120.0
    """Seconds a disconnected client's session (graphs, unapplied gradients) waits for it to reconnect."""
    max_unacknowledged: int = 64
    """Replies kept for a client until it acknowledges them (the micro-batches a pipelining client has in flight)."""
    max_generations: int = 8
    """Generations whose KV cache the server keeps, per client (the least recently used goes first)."""
    max_generation_bytes: int = 2 * 2**30
    """Bytes the KV caches of a client's generations may hold."""
    generation_timeout: float = 600.0
    """Seconds an idle generation's KV cache is kept."""


def load_trunk(model: str, cuts: tuple[int, int], lora: LoraSettings, seed: int = 0, dtype: str | None = None,
               device_map: dict[str, str] | str | None = None, quantization: str | None = None,
               gradient_checkpointing: bool = False) -> Segment:
    """The trunk of ``model`` cut at ``cuts`` (only its tensors are read, quantized as they are read if asked), with
    LoRA on its projections."""
    from ..loading import split_model

    parts = split_model(model, cuts=tuple(cuts), parts=("trunk",), dtype=dtype, device_map=device_map,
                        quantization=quantization)
    trunk = prepare(parts["trunk"], "lora", lora, seed)
    return trunk.set_gradient_checkpointing(gradient_checkpointing)
