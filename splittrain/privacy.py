"""Defenses at the cuts, applied on the client before anything crosses (``model.privacy``).

Threat model: an honest-but-curious server that knows the public base model, sees every frame (the hidden states
after the bottom, the gradients coming back from the top) and may train anything it likes on public text to
invert them. The client's raw text and labels never cross; what crosses can still leak them, and these defenses
trade some of that leak for utility:

- **cut 1, activations** (client -> server, forward): each example's hidden states (its whole ``T x H`` block) are
  clipped to L2 norm ``activation_clip`` (C), then Gaussian noise of standard deviation ``activation_noise x C`` is
  added to every element. The clip is part of the client's autograd graph, so its bottom trains through it.
- **cut 2, gradients** (client -> server, backward): each example's dL/dh at the top's input, which carries label
  information, is clipped to ``gradient_clip`` and noised with ``gradient_noise x gradient_clip`` the same way;
  the server back-propagates the defended gradient, and the client's bottom receives what the server computes.

Noise is drawn on the client from its own generators, seeded by ``seed`` (training frames, gradients, and
evaluation frames each have one), checkpointed with the client, and never sent. With every defense off (the default) nothing is touched and training is exactly as without this module.

What the server of this threat model recovers, with and without these defenses, is measured by
:mod:`splittrain.audit`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrivacySettings:
    """``model.privacy``: clipping norms (None: no clipping) and noise multipliers of the client's defenses."""

    activation_clip: float | None = None
    """Per-example L2 norm bound of the hidden states sent at cut 1."""
    activation_noise: float = 0.0
    """Gaussian noise std at cut 1, in units of ``activation_clip``."""
    gradient_clip: float | None = None
    """Per-example L2 norm bound of the gradients sent back at cut 2."""
    gradient_noise: float = 0.0
    """Gaussian noise std at cut 2, in units of ``gradient_clip``."""
    seed: int = 0
    """Seed of the client's noise generators."""

    def __post_init__(self) -> None:
        for name in ("activation", "gradient"):
            clip, noise = getattr(self, f"{name}_clip"), getattr(self, f"{name}_noise")
            if clip is not None and not clip > 0:
                raise ValueError(f"model.privacy.{name}_clip must be > 0 (or null: no clipping), got {clip}")
            if noise < 0:
                raise ValueError(f"model.privacy.{name}_noise must be >= 0, got {noise}")
            if noise > 0 and clip is None:
                raise ValueError(f"model.privacy.{name}_noise is in units of {name}_clip: set {name}_clip too")

    @property
    def enabled(self) -> bool:
        return self.activation_clip is not None or self.gradient_clip is not None


def clip_per_example(x: torch.Tensor, bound: float) -> torch.Tensor:
    """Scale each example (row of the first dimension) down to L2 norm ``bound``; rows within it stay as they are."""
    norms = torch.linalg.vector_norm(x.reshape(x.shape[0], -1).float(), dim=1)
    scale = torch.clamp(bound / (norms + 1e-12), max=1.0).to(x.dtype)
    return x * scale.view(-1, *([1] * (x.dim() - 1)))


class Defense:
    """The client's defenses with their noise generators (one per stream, seeded independently)."""

    def __init__(self, settings: PrivacySettings) -> None:
        self.settings = settings
        self._generators: dict[str, torch.Generator] = {}

    STREAMS = ("activations", "gradients", "eval_activations")
    """One generator each: training frames, the gradients sent back, and frames of validation and generation
    (so evaluating draws none of training's noise and a resumed run draws what an uninterrupted one would)."""

    def _noise(self, stream: str, like: torch.Tensor, std: float) -> torch.Tensor:
        generator = self._generators.get(stream)
        if generator is None:
            generator = self._generators[stream] = torch.Generator(device="cpu").manual_seed(
                self.settings.seed * len(self.STREAMS) + self.STREAMS.index(stream))
        noise = torch.randn(like.shape, generator=generator, dtype=torch.float32)
        return (noise * std).to(device=like.device, dtype=like.dtype)

    def activations(self, hidden: torch.Tensor) -> torch.Tensor:
        """The hidden states as they may cross cut 1 (differentiable: the clip stays in the graph). Noise comes from
        the training stream in grad mode, else from the evaluation stream."""
        s = self.settings
        if s.activation_clip is None:
            return hidden
        hidden = clip_per_example(hidden, s.activation_clip)
        if s.activation_noise > 0:
            stream = "activations" if torch.is_grad_enabled() else "eval_activations"
            hidden = hidden + self._noise(stream, hidden, s.activation_noise * s.activation_clip)
        return hidden

    @torch.no_grad()
    def gradients(self, grad: torch.Tensor) -> torch.Tensor:
        """dL/dh at the top's input as it may cross cut 2."""
        s = self.settings
        if s.gradient_clip is None:
            return grad
        grad = clip_per_example(grad, s.gradient_clip)
        if s.gradient_noise > 0:
            grad = grad + self._noise("gradients", grad, s.gradient_noise * s.gradient_clip)
        return grad

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The generators' states, so a resumed run draws the noise an uninterrupted one would."""
        return {stream: g.get_state() for stream, g in self._generators.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for stream, value in state.items():
            self._noise(stream, torch.empty(0), 0.0)  # create the generator, then restore it
            self._generators[stream].set_state(value)
