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
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# ================================================================================ the audit
@dataclass
class AuditSettings:
    """``python -m splittrain audit``: what the simulated server learns from, and how many client rows it attacks."""

    public: str | None = None
    """Public rows the server trains its attacks on (forms as ``data.train``); default: the validation rows, which
    the client does not train on."""
    public_rows: int = 600
    client_rows: int = 200
    """Rows of the client's training data whose frames are attacked (and then scored)."""
    decoder_epochs: int = 4
    seed: int = 0


class ServerAttacker:
    """The honest-but-curious server of the threat model. It holds the public base model's bottom and top (the
    client's own weights are not public), public text, the defense settings (assumed published), and the frames
    it receives. It never holds the client's rows: :func:`audit` scores its guesses on the client's side.

    Inversion of cut-1 frames: nearest neighbour among the frames of public tokens produced through the public
    bottom with the same defense, and a learned decoder (an MLP from one position's frame to its token). Label
    inference from cut-2 gradients: an MLP from the gradient at a position to the label the loss there predicts,
    trained on gradients the server computes itself through the public top on public text.
    """

    def __init__(self, bottom: Any, top: Any, settings: PrivacySettings, seed: int = 0) -> None:
        self.bottom, self.top = bottom, top
        self.defense = Defense(PrivacySettings(**{**settings.__dict__, "seed": settings.seed + 10_007}))
        self.seed = seed
        self.bank: torch.Tensor | None = None
        self.bank_tokens: torch.Tensor | None = None
        self.token_decoder: torch.nn.Module | None = None
        self.label_decoder: torch.nn.Module | None = None

    @torch.no_grad()
    def _frames(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():  # the training stream of noise, as the client's training frames use
            hidden = self.bottom(ids, attention_mask=mask).hidden_states.detach()
            return self.defense.activations(hidden).detach()

    def _gradients(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                   trunk_out: torch.Tensor) -> torch.Tensor:
        """dL/dh at the public top's input for public rows, defended as the client would send them."""
        from .segments import Activations

        h = trunk_out.detach().requires_grad_(True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        loss = self.top(Activations(h, mask, positions), labels=labels).loss
        (grad,) = torch.autograd.grad(loss, h)
        return self.defense.gradients(grad)

    def learn(self, batches: list[dict[str, torch.Tensor]], trunk: Any) -> None:
        """Train the attacks on public ``batches`` (``input_ids``, ``attention_mask``, ``labels``); ``trunk``
        is the server's own trunk (it runs public text through bottom, trunk and top itself)."""
        from .segments import Activations

        frames, tokens, grads, grad_labels = [], [], [], []
        for batch in batches:
            ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
            sent = self._frames(ids, mask)
            real = mask.bool()
            frames.append(sent[real])
            tokens.append(ids[real])
            with torch.no_grad():
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                out = trunk(Activations(sent, mask, positions)).hidden_states
            g = self._gradients(ids, mask, labels, out)
            target = torch.full_like(labels, -100)
            target[:, :-1] = labels[:, 1:]  # the gradient at t carries the loss of predicting labels[t + 1]
            keep = target != -100
            grads.append(g[keep])
            grad_labels.append(target[keep])
        self.bank, self.bank_tokens = torch.cat(frames).float(), torch.cat(tokens)
        vocab = self.top.config.vocab_size
        self.token_decoder = _train_decoder(self.bank, self.bank_tokens, vocab, self.seed)
        self.label_decoder = _train_decoder(torch.cat(grads).float(), torch.cat(grad_labels), vocab, self.seed + 1)

    @torch.no_grad()
    def invert(self, frames: torch.Tensor) -> dict[str, torch.Tensor]:
        """Token guesses for frames (N x H): ``nearest`` (nearest public frame's token) and ``decoder``."""
        frames = frames.float()
        nearest = []
        for chunk in frames.split(1024):
            nearest.append(self.bank_tokens[torch.cdist(chunk, self.bank).argmin(dim=1)])
        return {"nearest": torch.cat(nearest), "decoder": self.token_decoder(frames).argmax(-1)}

    @torch.no_grad()
    def infer_labels(self, grads: torch.Tensor) -> torch.Tensor:
        return self.label_decoder(grads.float()).argmax(-1)


def _train_decoder(x: torch.Tensor, y: torch.Tensor, vocab: int, seed: int, epochs: int = 4) -> torch.nn.Module:
    """An MLP classifier from vectors to tokens, trained with AdamW on standardised inputs."""
    g = torch.Generator().manual_seed(seed)
    mean, std = x.mean(0), x.std(0) + 1e-6
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 512), torch.nn.GELU(), torch.nn.Linear(512, vocab))
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for index in torch.randperm(len(x), generator=g).split(256):
            loss = torch.nn.functional.cross_entropy(net((x[index] - mean) / std), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    return _Standardised(net, mean, std)


class _Standardised(torch.nn.Module):
    def __init__(self, net: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.net, self.mean, self.std = net, mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def audit(module: Any, datamodule: Any, settings: AuditSettings, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Play the server of the threat model against a run, and score what it recovers.

    The server's side is a :class:`ServerAttacker` built from public things only: the base model's bottom and top
    as published (loaded fresh from the checkpoint the run started from), the run's trunk (the server's own),
    public rows and the defense settings. The client's side runs its own training rows through its trained parts
    and defenses, hands the attacker nothing but the frames that would cross, and keeps the rows to score the
    guesses. Writes ``audit.json`` and ``audit.md`` in ``run_dir`` (when given) and returns the report.
    """
    import json
    import math

    from .loading import split_model
    from .quickstart import resolve_model

    if module.server is None:
        raise ValueError("the audit plays the server in this process: run it with model.transport local")
    # ---- the server's side: public knowledge only
    base = split_model(resolve_model(module.model_name), cuts=module.cuts, parts=("bottom", "top"),
                       dtype=module.dtype_name)
    attacker = ServerAttacker(base["bottom"].eval(), base["top"].eval(), module.privacy, settings.seed)
    public = datamodule.val_dataset if settings.public is None else datamodule._tokenize(datamodule._load(settings.public))
    public = public.select(range(min(settings.public_rows, len(public))))
    attacker.learn(list(datamodule._loader(public, shuffle=False, seed=settings.seed)), module.server.trunk)
    # ---- the client's side: its own rows through its trained parts and defenses; only frames go to the attacker
    rows = datamodule.train_dataset.select(range(min(settings.client_rows, len(datamodule.train_dataset))))
    frames: dict[str, list[torch.Tensor]] = {"forward": [], "backward": []}
    handle = module.server.handle

    def wire(client: str, kind: str, header: dict, tensors: dict, *args: Any, **kwargs: Any):
        if kind in frames:  # what the server receives
            frames[kind].append(next(iter(tensors.values())).detach().clone())
        return handle(client, kind, header, tensors, *args, **kwargs)

    module.server.handle = wire
    truth_tokens, truth_rows, truth_labels = [], [], []
    guesses = {"nearest": [], "decoder": [], "labels": []}
    try:
        module.train()
        for number, batch in enumerate(datamodule._loader(rows, shuffle=False, seed=settings.seed)):
            # a training pass at the server's step (it keeps the graph for the backward; nothing steps)
            module(batch, key=("audit", number, 0), step=module.server.steps).loss.backward()
            module.zero_grad(set_to_none=True)
            sent, grads = frames["forward"].pop(), frames["backward"].pop()
            mask = batch["attention_mask"].bool()
            found = attacker.invert(sent[mask].float())
            guesses["nearest"].append(found["nearest"])
            guesses["decoder"].append(found["decoder"])
            target = torch.full_like(batch["labels"], -100)
            target[:, :-1] = batch["labels"][:, 1:]
            keep = target != -100
            guesses["labels"].append(attacker.infer_labels(grads[keep].float()))
            # scoring data, kept on the client's side
            truth_tokens.append(batch["input_ids"][mask])
            truth_rows.append(mask.sum(1))
            truth_labels.append(target[keep])
    finally:
        module.server.handle = handle
    tokens, lengths, labels = torch.cat(truth_tokens), torch.cat(truth_rows), torch.cat(truth_labels)
    report: dict[str, Any] = {"rows": int(len(lengths)), "tokens": int(len(tokens)), "labels": int(len(labels))}
    for name in ("nearest", "decoder"):
        hit = torch.cat(guesses[name]) == tokens
        per_row = torch.stack([h.float().mean() for h in hit.split(lengths.tolist())])
        report[f"token_recovery_{name}"] = float(hit.float().mean())
        report[f"rows_half_recovered_{name}"] = float((per_row >= 0.5).float().mean())
    report["token_recovery"] = max(report["token_recovery_nearest"], report["token_recovery_decoder"])
    report["label_inference"] = float((torch.cat(guesses["labels"]) == labels).float().mean())
    summary = Path(run_dir) / "summary.json" if run_dir is not None else None
    report["val_loss"] = (json.loads(summary.read_text()).get("val_loss", math.nan)
                          if summary is not None and summary.is_file() else math.nan)
    report["privacy"] = dict(module.privacy.__dict__)
    report["cuts"] = list(module.cuts)
    if run_dir is not None:
        run_dir = Path(run_dir)
        (run_dir / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
        lines = ["# Privacy audit", "", f"The server of the threat model attacked the cut-1 frames and cut-2 gradients "
                 f"of {report['rows']} of the client's training rows (cuts {report['cuts']}, defenses "
                 f"{report['privacy']}).", "", "| measure | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in report.items() if isinstance(v, float)]
        (run_dir / "audit.md").write_text("\n".join(lines) + "\n")
    return report
