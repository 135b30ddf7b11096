"""Generation through the split model (greedy; each step re-runs the prefix, so keep answers short)."""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def greedy_answer(client: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 48) -> str:
    """Answer one user ``prompt`` with the chat template, greedily, through bottom -> trunk -> top."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_dict=False)
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    ids = list(ids[0] if ids and isinstance(ids[0], list) else ids)
    start, stop = len(ids), {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    was_training = client.training
    client.eval()
    try:
        for _ in range(max_new_tokens):
            logits = client({"input_ids": torch.tensor([ids], device=client.device)}).logits
            token = int(logits[0, -1].argmax())
            if token in stop:
                break
            ids.append(token)
    finally:
        client.train(was_training)
    return tokenizer.decode(ids[start:], skip_special_tokens=True)
