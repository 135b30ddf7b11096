"""Token-level metrics for causal LM training: perplexity and next-token accuracy (torchmetrics).

Both compare position t's logits with the label at t+1 (the causal shift) and skip labels of -100, so they
measure exactly the tokens the loss trains.
"""

from __future__ import annotations

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
