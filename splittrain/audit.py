"""The privacy audit: the honest-but-curious server of :mod:`splittrain.privacy`'s threat model played against a run.

The server's side (:class:`ServerAttacker`) holds public things only: the base model's bottom and top as published,
its own trunk, public rows and the defense settings (assumed published). It trains its attacks on public text, then
guesses the client's tokens from the cut-1 hidden states and its labels from the cut-2 gradients it receives. The
frames are recorded on their way to the server by a :class:`RecordingTransport` wrapped around the client's own,
so the attacker sees exactly what the server receives; the client's rows stay on the client's side to score the
guesses (:func:`audit`, ``python -m splittrain audit``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .crossing import Crossing
from .cut import TrunkLink
from .privacy import Defense, PrivacySettings
from .segments import Activations
from .transport import Header, Pending, Tensors, Transport
from .transport.codec import unpack


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
        h = trunk_out.detach().requires_grad_(True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        loss = self.top(Activations(h, mask, positions), labels=labels).loss
        (grad,) = torch.autograd.grad(loss, h)
        return self.defense.gradients(grad)

    def learn(self, batches: list[dict[str, torch.Tensor]], trunk: Any) -> None:
        """Train the attacks on public ``batches`` (``input_ids``, ``attention_mask``, ``labels``); ``trunk``
        is the server's own trunk (it runs public text through bottom, trunk and top itself)."""
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
            target = _next_labels(labels)
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


class RecordingTransport:
    """A transport that keeps the tensor of every ``forward`` (hidden states) and ``backward`` (dL/dh) request, as
    the server receives it, and passes every request on to ``inner``."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.frames: dict[str, list[torch.Tensor]] = {"forward": [], "backward": []}

    @property
    def wire_bytes(self) -> int:
        return self.inner.wire_bytes

    def _record(self, kind: str, tensors: Tensors) -> None:
        if kind in self.frames:
            self.frames[kind].append(unpack(tensors, "hidden_states" if kind == "forward" else "grad").detach().clone())

    def request(self, kind: str, header: Header, tensors: Tensors) -> tuple[Header, Tensors]:
        self._record(kind, tensors)
        return self.inner.request(kind, header, tensors)

    def submit(self, kind: str, header: Header, tensors: Tensors) -> Pending:
        self._record(kind, tensors)
        return self.inner.submit(kind, header, tensors)

    def close(self) -> None:
        self.inner.close()


def audit(module: Any, datamodule: Any, settings: AuditSettings, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Play the server of the threat model against a run, and score what it recovers.

    The server's side is a :class:`ServerAttacker` built from public things only: the base model's bottom and top
    as published (loaded fresh from the checkpoint the run started from), the run's trunk (the server's own),
    public rows and the defense settings. The client's side runs its own training rows through its trained parts
    and defenses, hands the attacker nothing but the frames that cross, and keeps the rows to score the guesses.
    Writes ``audit.json`` and ``audit.md`` in ``run_dir`` (when given) and returns the report.
    """
    if module.server is None:
        raise ValueError("the audit plays the server in this process: run it with model.transport local")
    attacker = _public_attacker(module, datamodule, settings)
    # ---- the client's side: its own rows through its trained parts and defenses; only frames go to the attacker
    recorder = RecordingTransport(module.crossing.link.transport)
    crossing = Crossing(module.bottom, module.top, TrunkLink(recorder, module.wire_dtype), module.defense)
    truth: dict[str, list[torch.Tensor]] = {"tokens": [], "rows": [], "labels": []}
    guesses: dict[str, list[torch.Tensor]] = {"nearest": [], "decoder": [], "labels": []}
    module.train()
    rows = datamodule.ordered_loader(datamodule.train_dataset, settings.client_rows, settings.seed)
    for number, batch in enumerate(rows):
        # a training pass at the server's step (it keeps the graph for the backward; nothing steps)
        crossing.forward(batch, ("audit", number, 0), module.server.steps).loss.backward()
        module.zero_grad(set_to_none=True)
        sent, grads = recorder.frames["forward"].pop(), recorder.frames["backward"].pop()
        mask = batch["attention_mask"].bool()
        found = attacker.invert(sent[mask].float())
        guesses["nearest"].append(found["nearest"])
        guesses["decoder"].append(found["decoder"])
        target = _next_labels(batch["labels"])
        keep = target != -100
        guesses["labels"].append(attacker.infer_labels(grads[keep].float()))
        # scoring data, kept on the client's side
        truth["tokens"].append(batch["input_ids"][mask])
        truth["rows"].append(mask.sum(1))
        truth["labels"].append(target[keep])
    report = _score({k: torch.cat(v) for k, v in truth.items()}, guesses, run_dir)
    report["privacy"] = dict(module.privacy.__dict__)
    report["cuts"] = list(module.cuts)
    if run_dir is not None:
        _write(report, Path(run_dir))
    return report


def _public_attacker(module: Any, datamodule: Any, settings: AuditSettings) -> ServerAttacker:
    """The server's side, from public knowledge only, its attacks trained on the public rows."""
    from .loading import split_model
    from .quickstart import resolve_model

    base = split_model(resolve_model(module.model_name), cuts=module.cuts, parts=("bottom", "top"),
                       dtype=module.dtype_name)
    attacker = ServerAttacker(base["bottom"].eval(), base["top"].eval(), module.privacy, settings.seed)
    public = datamodule.val_dataset if settings.public is None else settings.public
    attacker.learn(list(datamodule.ordered_loader(public, settings.public_rows, settings.seed)), module.server.trunk)
    return attacker


def _next_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label each position's loss predicts (the gradient at t carries the loss of predicting labels[t + 1])."""
    target = torch.full_like(labels, -100)
    target[:, :-1] = labels[:, 1:]
    return target


def _score(truth: dict[str, torch.Tensor], guesses: dict[str, list[torch.Tensor]],
           run_dir: str | Path | None) -> dict[str, Any]:
    """Token recovery (per guess kind, and the share of rows half recovered), label inference, the run's val loss."""
    tokens, lengths, labels = truth["tokens"], truth["rows"], truth["labels"]
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
    return report


def _write(report: dict[str, Any], run_dir: Path) -> None:
    """``audit.json`` and ``audit.md`` in ``run_dir``."""
    (run_dir / "audit.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Privacy audit", "", f"The server of the threat model attacked the cut-1 frames and cut-2 gradients "
             f"of {report['rows']} of the client's training rows (cuts {report['cuts']}, defenses "
             f"{report['privacy']}).", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in report.items() if isinstance(v, float)]
    (run_dir / "audit.md").write_text("\n".join(lines) + "\n")
