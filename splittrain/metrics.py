"""Metrics (torchmetrics): perplexity and next-token accuracy while training; exact match, ROUGE-L and BLEU of
generated answers.

The token metrics compare position t's logits with the label at t+1 (the causal shift) and skip labels of -100, so
they measure exactly the tokens the loss trains.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

IGNORE = -100


class TokenMetrics(nn.Module):
    """Perplexity and token accuracy over the trained (label != -100) tokens, accumulated across batches."""

    def __init__(self, vocab_size: int, sync: bool = True) -> None:
        """``sync=False`` keeps torchmetrics from gathering over a process group this client does not own
        (under torchrun the trunk server is rank 0 of the same group)."""
        super().__init__()
        from torchmetrics.classification import MulticlassAccuracy
        from torchmetrics.text import Perplexity

        self.perplexity = Perplexity(ignore_index=IGNORE, sync_on_compute=sync)
        self.token_accuracy = MulticlassAccuracy(num_classes=vocab_size, ignore_index=IGNORE, average="micro",
                                                 sync_on_compute=sync)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits[:, :-1].float()
        targets = labels[:, 1:].to(logits.device)
        self.perplexity.update(logits, targets)
        self.token_accuracy.update(logits.argmax(-1).flatten(), targets.flatten())

    def compute(self) -> dict[str, torch.Tensor]:
        return {"perplexity": self.perplexity.compute(), "token_accuracy": self.token_accuracy.compute()}

    def reset(self) -> None:
        self.perplexity.reset()
        self.token_accuracy.reset()


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
