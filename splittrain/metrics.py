"""Metrics (torchmetrics): perplexity and next-token accuracy while training; exact match, ROUGE-L and BLEU of
generated answers.

The token metrics compare position t's logits with the label at t+1 (the causal shift) and skip labels of -100, so
they measure exactly the tokens the loss trains; they are sums (negative log-likelihood, argmax hits, tokens) that
the chunked loss (:mod:`splittrain.loss`) hands over without whole logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from torch import nn

IGNORE = -100


class TokenStats(NamedTuple):
    """What the token metrics need of a batch's trained tokens (shifted label != -100): the summed negative
    log-likelihood (float32, as the loss sums it), the argmax hits and the number of tokens."""

    nll: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor


@torch.no_grad()
def token_stats(logits: torch.Tensor, labels: torch.Tensor) -> TokenStats:
    """:class:`TokenStats` of whole logits (B, T, V): position t's logits against the label at t + 1, in float32."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device).reshape(-1)
    logits = logits.reshape(-1, logits.shape[-1])
    keep = targets != IGNORE
    nll = nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum")
    correct = (logits.argmax(-1)[keep] == targets[keep]).sum()
    return TokenStats(nll, correct, keep.sum())


def _token_sums(sync: bool) -> Any:
    """A torchmetrics metric summing :class:`TokenStats` across batches (and processes when ``sync``); torchmetrics
    is imported here, not with this module."""
    from torchmetrics import Metric

    class TokenSums(Metric):
        full_state_update = False

        def __init__(self) -> None:
            super().__init__(sync_on_compute=sync)
            self.add_state("nll", default=torch.tensor(0.0), dist_reduce_fx="sum")
            self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
            self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

        def update(self, stats: TokenStats) -> None:
            self.nll += stats.nll.to(self.nll)
            self.correct += stats.correct.to(self.correct)
            self.count += stats.count.to(self.count)

        def compute(self) -> dict[str, torch.Tensor]:
            # As torchmetrics' Perplexity and micro MulticlassAccuracy give them (nan and 0 when no token counted).
            return {"perplexity": torch.exp(self.nll / self.count).float(),
                    "token_accuracy": (self.correct / self.count.clamp(min=1)).float()}

    return TokenSums()


class TokenMetrics(nn.Module):
    """Perplexity and token accuracy over the trained (label != -100) tokens, accumulated across batches.

    Fed whole logits (:meth:`update`) or, when the top computed its loss chunk by chunk without them, the chunks'
    :class:`TokenStats` (:meth:`update_stats`); :meth:`update_output` takes the top's output either way."""

    def __init__(self, vocab_size: int, sync: bool = True) -> None:
        """``sync=False`` keeps torchmetrics from gathering over a process group this client does not own
        (under torchrun the trunk server is rank 0 of the same group)."""
        super().__init__()
        self.vocab_size = vocab_size
        self.sums = _token_sums(sync)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.sums.update(token_stats(logits, labels))

    @torch.no_grad()
    def update_stats(self, stats: TokenStats) -> None:
        self.sums.update(TokenStats(*(t.detach() for t in stats)))

    def update_output(self, out: Any, labels: torch.Tensor) -> None:
        """From the top's output: its ``token_stats`` when it has them (chunked loss), else its ``logits``."""
        stats = getattr(out, "token_stats", None)
        if stats is not None:
            self.update_stats(stats)
        else:
            self.update(out.logits.detach(), labels)

    def compute(self) -> dict[str, torch.Tensor]:
        return self.sums.compute()

    def reset(self) -> None:
        self.sums.reset()


def normalize(text: str) -> str:
    """Whitespace runs to one space, ends stripped (what exact match compares)."""
    return " ".join(text.split())


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Exact match (after :func:`normalize`), ROUGE-L F1 and corpus BLEU with add-one smoothing of the higher-order
    n-gram precisions. BLEU is of order 4, or of the longest reference's word count when that is shorter (a corpus
    of one-word answers has no 2-grams, and torchmetrics scores a corpus with an order that never matches 0)."""
    from torchmetrics.text import BLEUScore, ROUGEScore

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("no rows to score")
    predictions, references = [normalize(p) for p in predictions], [normalize(r) for r in references]
    exact = sum(p == r for p, r in zip(predictions, references)) / len(references)
    rouge = ROUGEScore(rouge_keys="rougeL")(predictions, references)["rougeL_fmeasure"]
    order = max(1, min(4, max(len(r.split()) for r in references)))
    bleu = BLEUScore(n_gram=order, smooth=True)(predictions, [[r] for r in references])
    return {"exact_match": float(exact), "rouge_l": float(rouge), "bleu": float(bleu), "bleu_order": order}


def write_eval(run_dir: str | Path, metrics: dict[str, Any], rows: Sequence[dict[str, Any]], shown: int = 20,
               ) -> tuple[Path, Path]:
    """``eval.json`` (the metrics and every row's prompt, reference and answer) and ``eval.md`` (the metrics table
    and the first ``shown`` rows) in ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = run_dir / "eval.json", run_dir / "eval.md"
    json_path.write_text(json.dumps({"metrics": metrics, "rows": list(rows)}, indent=2) + "\n")
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", "<br>")
    lines = ["# Evaluation", "", "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {value:.4f} |" if isinstance(value, float) else f"| {name} | {value} |"
              for name, value in metrics.items()]
    lines += ["", f"## The first {min(shown, len(rows))} of {len(rows)} rows", "",
              "| # | prompt | reference | generated | exact |", "|---|---|---|---|---|"]
    for i, row in enumerate(rows[:shown]):
        lines.append(f"| {i} | {cell(row['prompt'])} | {cell(row['reference'])} | {cell(row['generated'])} | "
                     f"{'yes' if row['exact'] else 'no'} |")
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path
