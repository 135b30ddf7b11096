"""Memory per party before anything is downloaded: weights, adapters, gradients, optimizer state, activations.

Parameter counts are exact: the model is built from its config on the ``meta`` device (no memory, no weights) and
its tensors are assigned to bottom, trunk and top by layer, as :func:`splittrain.split_model` cuts them. The config
comes from a local folder's ``config.json``, from a recipe when the hub id is one of a recipe's sizes (no download
at all), or from the hub (``config.json`` only).

The other terms are models of what training keeps, per party:

- adapters, their gradients and AdamW's two moments in float32 (peft keeps adapters in float32);
- a ``full`` client: gradients and AdamW moments of every client tensor, in the weight dtype;
- activations saved for backward, per token and decoder layer ``12 hidden + 2 kv_dim + 4 intermediate`` elements
  in the compute dtype (what autograd keeps for a Qwen2 layer with LoRA on its projections, counted with
  ``saved_tensors_hooks``: norm inputs and outputs, projection inputs, rotated queries and keys, attention inputs
  with keys and values repeated to every head, its output, the MLP's gate, up and product), plus at the top the
  logits, their log-softmax and their gradient in float32 (``3 x vocab`` per token); and half as much again as
  ``workspace`` (the forward pass's freed temporaries that the allocator still holds at the peak). With the chunked
  loss (``loss_chunk`` positions at a time, fewer than the batch's tokens; :mod:`splittrain.loss`) the top keeps no
  logits: the workspace holds one chunk's float32 logits, softmax taken in place, and for a bfloat16 or softcapped
  head a second copy (``2 x loss_chunk x vocab`` float32 at most; ``benchmarks/chunked_loss.py`` measured 1.1 and
  1.6 such chunks for fp32 with a frozen and a trained head, the latter with the head's gradient) instead;
- ``runtime``: the process itself (interpreter, torch, Lightning, tokenizer and data for the client; measured on
  CPU with the 0.9M-parameter quickstart model over tcp), or the CUDA context on a GPU.

``benchmarks/estimate_check.py`` compares the estimate with measured peak RSS per party.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .loss import LOSS_CHUNK

GiB = 2**30
RUNTIME_BYTES = {"client": int(0.52 * GiB), "server": int(0.40 * GiB)}
"""Resident memory of a party's process before any model tensor (CPU, measured on the quickstart runs)."""
CUDA_CONTEXT_BYTES = int(0.5 * GiB)


@dataclass
class PartyMemory:
    """Bytes one party holds at its peak, by kind."""

    weights: int = 0
    adapters: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    workspace: int = 0
    runtime: int = 0
    parameters: int = 0
    trainable: int = 0
    layers: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (self.weights + self.adapters + self.gradients + self.optimizer + self.activations + self.workspace
                + self.runtime)

    def as_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "adapters": self.adapters, "gradients": self.gradients,
                "optimizer": self.optimizer, "activations": self.activations, "workspace": self.workspace,
                "runtime": self.runtime,
                "total": self.total, "parameters": self.parameters, "trainable": self.trainable,
                "layers": self.layers}


def model_config(model: str) -> Any:
    """The text config of ``model``: a local folder, ``quickstart``/``tiny-<recipe>``, a recipe size's hub id (no
    download), or any hub id (its config.json only)."""
    from transformers import AutoConfig

    from .modules import resolve_model

    if not Path(model).exists() and not model.startswith(("quickstart", "tiny-")):
        from recipes import NAMES, get_recipe

        for name in NAMES:
            for size in get_recipe(name).sizes.values():
                if model in (size.hub_id, size.instruct_id):
                    return size.config()
    config = AutoConfig.from_pretrained(resolve_model(model))
    return config.get_text_config(decoder=True)


def _lora_params(layer: torch.nn.Module, targets: list[str], r: int) -> int:
    total = 0
    for name, module in layer.named_modules():
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
            total += r * (module.in_features + module.out_features)
    return total


def estimate_memory(model: str, cuts: tuple[int, int], batch_size: int, seq_len: int, dtype: str | None = None,
                    client: str = "lora", client_lora_r: int = 8, trunk_lora_r: int = 8,
                    lora_targets: list[str] | None = None, device: str = "cpu", loss_chunk: int = LOSS_CHUNK,
                    ) -> dict[str, PartyMemory]:
    """Peak bytes of the client (bottom + top) and of the server (trunk) when training ``model`` cut at ``cuts``
    on batches of ``batch_size`` x ``seq_len`` tokens, weights in ``dtype`` (default: the config's), the loss
    computed ``loss_chunk`` positions at a time (0: whole logits; default: the client's)."""
    from transformers import AutoModelForCausalLM

    from .families import get_family

    config = model_config(model)
    family = get_family(config.model_type)
    layers_n = config.num_hidden_layers
    c1, c2 = cuts
    if not 0 < c1 < c2 < layers_n:
        raise ValueError(f"cuts {list(cuts)} must satisfy 0 < c1 < c2 < {layers_n} (the model's layers)")
    if client not in ("frozen", "lora", "full"):
        raise ValueError(f"client must be 'frozen', 'lora' or 'full', got {client!r}")
    weight_dtype = getattr(torch, dtype) if dtype else (getattr(config, "dtype", None) or torch.float32)
    if isinstance(weight_dtype, str):
        weight_dtype = getattr(torch, weight_dtype)
    width = torch.empty(0, dtype=weight_dtype).element_size()
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config)
    text = getattr(full, family.stack)
    layers = getattr(text, family.layers)
    targets = lora_targets or list(family.lora_targets)
    per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    outside = sum(p.numel() for n, p in full.named_parameters() if f"{family.layer_path}." not in n)

    parties = {"client": PartyMemory(layers=list(range(c1)) + list(range(c2, layers_n))),
               "server": PartyMemory(layers=list(range(c1, c2)))}
    for name, party in parties.items():
        party.parameters = sum(per_layer[i] for i in party.layers) + (outside if name == "client" else 0)
        party.weights = party.parameters * width
        lora = sum(_lora_params(layers[i], targets, trunk_lora_r if name == "server" else client_lora_r)
                   for i in party.layers)
        if name == "server" or client == "lora":
            party.trainable = lora
            party.adapters = lora * 4
            party.gradients = lora * 4
            party.optimizer = 2 * lora * 4
        elif client == "full":
            party.trainable = party.parameters
            party.gradients = party.parameters * width
            party.optimizer = 2 * party.parameters * width
        party.runtime = CUDA_CONTEXT_BYTES if device.startswith("cuda") else RUNTIME_BYTES[name]

    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv_dim = config.num_key_value_heads * head_dim
    q_dim = config.num_attention_heads * head_dim
    tokens = batch_size * seq_len
    per_token_layer = 6 * hidden + 6 * q_dim + 2 * kv_dim + 4 * config.intermediate_size
    for party in parties.values():
        party.activations = tokens * per_token_layer * width * len(party.layers)
    chunked = 0 < loss_chunk < tokens  # a batch of at most loss_chunk tokens takes the plain path
    if not chunked:
        parties["client"].activations += 3 * tokens * config.vocab_size * 4
    for party in parties.values():
        party.workspace = party.activations // 2
    if chunked:
        parties["client"].workspace += 2 * loss_chunk * config.vocab_size * 4
    return parties


def format_estimate(parties: dict[str, PartyMemory], title: str) -> str:
    """A table of the estimate in GiB."""
    kinds = ("weights", "adapters", "gradients", "optimizer", "activations", "workspace", "runtime", "total")
    lines = [title, f"{'party':<8}" + "".join(f"{k:>12}" for k in kinds) + f"{'layers':>10}"]
    for name, party in parties.items():
        row = party.as_dict()
        lines.append(f"{name:<8}" + "".join(f"{row[k] / GiB:>11.2f}G" for k in kinds)
                     + f"{len(party.layers):>10}")
    return "\n".join(lines)


def estimate_json(parties: dict[str, PartyMemory]) -> str:
    return json.dumps({name: party.as_dict() for name, party in parties.items()}, indent=2)
