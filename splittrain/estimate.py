"""Memory per party before anything is downloaded: weights, adapters, gradients, optimizer state, activations.

Parameter counts are exact: the model is built from its config on the ``meta`` device (no memory, no weights) and
its tensors are assigned to bottom, trunk and top by layer, as :func:`splittrain.split_model` cuts them. The config
comes from a local folder's ``config.json``, from a recipe when the hub id is one of a recipe's sizes (no download
at all), or from the hub (``config.json`` only).

The other terms are models of what training keeps, per party, each party with its own settings (``quantization``
and ``gradient_checkpointing`` for the client's bottom and top, ``trunk_quantization`` and
``trunk_gradient_checkpointing`` for the server's trunk):

- ``weights``: every tensor in the weight dtype; with a quantization, the decoder layers' ``nn.Linear`` weights in
  its format instead (:func:`splittrain.quantize.quantized_bytes`: int8 one byte each and a float32 scale per output
  row, 4-bit half a byte each and a float32 absmax per block of 64), their biases, the norms, the embedding and the
  head staying in the weight dtype; with ``embedding_quantization`` (the client's ``int8``) the token embedding and an
  untied head are int8 too, with a float32 scale per row. An unquantized part's tensors are memory-mapped from the
  checkpoint and become resident when the first forward pass touches them: at the peak all of them are;
- adapters, their gradients and AdamW's two moments in float32 (peft keeps adapters in float32);
- a ``full`` client: gradients and AdamW moments of every client tensor, in the weight dtype;
- ``activations``: what autograd saves for backward, per token and decoder layer ``4 hidden + 2 q_dim + 2 kv_dim +
  4 intermediate + r`` per LoRA-adapted projection in the compute dtype and ``heads`` in float32 (counted with
  ``saved_tensors_hooks`` on a Qwen2 layer with torch's SDPA: the norms' inputs and normalized states, the
  projections' inputs, the rotated queries and keys, the values, the attention's output and log-sum-exp, the MLP's
  gate, up and product, the LoRA A outputs); in a 16-bit dtype two of the hidden-sized ones are float32 (the norms
  compute in float32). A quantized layer saves nothing more: bitsandbytes' int8 keeps its
  input (the tensor LoRA's A keeps as well; on CUDA also its few outlier columns) and 4-bit keeps only its packed
  weight. With activation checkpointing a layer keeps only its input (``hidden`` per token), and one layer's saved
  tensors exist again while it is recomputed in backward. The top adds, with whole logits, the float32 logits,
  their log-softmax and in backward the gradients of both (``4 x vocab`` per token);
- ``workspace``: what the allocator holds besides at the peak. On CPU glibc's heap grows with the forward passes
  and keeps much of what they free: measured, the peak holds about half (:data:`HEAP_RETAINED`) of the bytes that
  the forward passes of all the party's layers but one allocate, checkpointed or not (the first layer's freed
  blocks are taken again by the next ones); per token and layer that is every projection's output (four times for
  a LoRA-adapted one: base, LoRA B, scaled, sum; five over a 4-bit base, whose output peft's ``Linear4bit``
  clones) and ``8 hidden + 5.5 q_dim + 4.5 kv_dim + 2 intermediate``
  (norms, residual sums, rotary embedding, attention output, activation). Tensors above glibc's 32 MiB mmap
  threshold go back to the system when freed, so of those only one layer's count. On CUDA the caching allocator
  reuses freed blocks from layer to layer: one layer's allocations (a model, not measured here). A quantized party
  dequantizes each projection's weight into the compute dtype for its matmuls (bitsandbytes' CPU int8 training
  path and its 4-bit path, in forward and backward, one weight live at a time): one layer's projections on CPU,
  twice with checkpointing (the recomputation dequantizes them again), the largest at a time on CUDA. With the
  chunked loss (``loss_chunk`` positions at a time, fewer than the batch's tokens; :mod:`splittrain.loss`) the
  top keeps no logits: the workspace holds one chunk's float32 logits, softmax taken in place, and for a bfloat16
  or softcapped head a second copy (``benchmarks/chunked_loss.py`` measured 1.1 and 1.6 such chunks for fp32 with a
  frozen and a trained head, the latter with the head's gradient, which ``gradients`` counts). An int8 head adds
  the float32 rows it dequantizes at a time and their block of each chunk's logits
  (:data:`splittrain.quantize.HEAD_BLOCK` rows). On
  CPU, where a chunk's logits reach :data:`splittrain.segments.TRIM_LOGITS_BYTES`, the top gives the heap's free
  pages back before and after its chunks (``release_freed_memory``), so the loss's workspace takes the place of what
  the layers' left resident, and the larger of the two counts (measured with ``benchmarks/client_memory.py``);
- ``runtime``: the process itself (interpreter, torch, Lightning, peft, tokenizer and data for the client; measured
  on CPU as each process's RSS before its first step with a tiny model over tcp) and for a quantized party
  bitsandbytes' CPU kernels and the loader's probe, or the CUDA context on a GPU.

``benchmarks/estimate_check.py`` compares the estimate with measured peak RSS per party, for every combination of
quantization, chunked loss and checkpointing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .loss import LOSS_CHUNK
from .quantize import HEAD_BLOCK, check_embedding_name, check_name, quantized_bytes
from .segments import TRIM_LOGITS_BYTES

GiB = 2**30
MiB = 2**20
RUNTIME_BYTES = {"client": int(0.63 * GiB), "server": int(0.515 * GiB)}
"""Resident memory of a party's process before any model tensor (CPU, measured with a tiny model over tcp: the
quickstart's peak RSS less its estimated tensors). It includes bitsandbytes, which peft imports whenever it is
installed (about 50 MB)."""
BITSANDBYTES_BYTES = 8 * MiB
"""What a quantized party's process adds: bitsandbytes' CPU kernels and the loader's probe of the format."""
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
MMAP_THRESHOLD = 32 * MiB
"""glibc's largest dynamic mmap threshold: a freed block above it goes back to the system at once."""
HEAP_RETAINED = 0.5
"""The share of its layers' forward allocations (below the mmap threshold; all layers but one) that glibc's heap
still holds at a party's peak, measured on CPU (``benchmarks/estimate_check.py``)."""


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

    from .quickstart import resolve_model

    if not Path(model).exists() and not model.startswith(("quickstart", "tiny-")):
        from recipes import NAMES, get_recipe

        for name in NAMES:
            for size in get_recipe(name).sizes.values():
                if model in (size.hub_id, size.instruct_id):
                    return size.config()
    config = AutoConfig.from_pretrained(resolve_model(model))
    return config.get_text_config(decoder=True)


def _projections(layer: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The decoder layer's ``nn.Linear`` projections (what quantization replaces), by short name."""
    return [(name.rsplit(".", 1)[-1], m) for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]


@dataclass
class _Layer:
    """Per token, the bytes one decoder layer's training forward saves for backward and the elements it allocates
    in all, and its projections' weight elements (one entry each)."""

    saved: int
    allocated: list[int]
    """Sizes of the forward pass's tensors, per token: each is ``tokens x size`` elements."""
    projections: list[int]


def _layer(config: Any, layer: torch.nn.Module, adapted: list[str], r: int, width: int,
           quantized: str | None = None) -> _Layer:
    """What one decoder layer keeps and allocates in a compute dtype of ``width`` bytes, as counted for a Qwen2
    layer on CPU with torch's SDPA (see the module docstring), its projections' base weights in ``quantized``'s
    format."""
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_dim, kv_dim = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    projections = _projections(layer)
    lora = [m for name, m in projections if name in adapted]
    saved = (4 * hidden + 2 * q_dim + 2 * kv_dim + 4 * inter + r * len(lora)) * width
    saved += 4 * config.num_attention_heads + 2 * hidden * (4 - width)  # float32 log-sum-exp and norm states
    # an adapted projection allocates its output four times (base, LoRA B, scaled, sum), a plain one once; over a
    # 4-bit base peft's Linear4bit clones the base's output first ("defensively", for backward through a view)
    copies = 5 if quantized not in (None, "int8") else 4
    allocated = [m.out_features for _, m in projections for _ in range(copies if m in lora else 1)]
    allocated += [hidden] * 8 + [q_dim] * 5 + [q_dim // 2] + [kv_dim] * 4 + [kv_dim // 2] + [inter] * 2
    return _Layer(saved, allocated, [m.weight.numel() for _, m in projections])


@dataclass
class _Model:
    """A model built from its config on the ``meta`` device: its config, decoder layers, the parameters outside
    them, the weight dtype's width in bytes and the projections LoRA adapts by default."""

    config: Any
    layers: torch.nn.ModuleList
    outside: int
    width: int
    targets: list[str]


def _meta_model(config: Any, dtype: str | None, lora_targets: list[str] | None) -> _Model:
    """The model of ``config`` (no weights, no memory), weights in ``dtype`` (default: the config's)."""
    from transformers import AutoModelForCausalLM

    from .families import get_family

    family = get_family(config.model_type)
    weight_dtype = getattr(torch, dtype) if dtype else (getattr(config, "dtype", None) or torch.float32)
    if isinstance(weight_dtype, str):
        weight_dtype = getattr(torch, weight_dtype)
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config)
    outside = sum(p.numel() for n, p in full.named_parameters() if f"{family.layer_path}." not in n)
    return _Model(config, getattr(getattr(full, family.stack), family.layers), outside,
                  torch.empty(0, dtype=weight_dtype).element_size(), lora_targets or list(family.lora_targets))


def _check_settings(cuts: tuple[int, int], layers_n: int, client: str, quantization: str | None,
                    trunk_quantization: str | None) -> dict[str, str | None]:
    """The parties' quantization formats, once the cuts and the client's mode are checked (``ValueError``)."""
    c1, c2 = cuts
    if not 0 < c1 < c2 < layers_n:
        raise ValueError(f"cuts {list(cuts)} must satisfy 0 < c1 < c2 < {layers_n} (the model's layers)")
    if client not in ("frozen", "lora", "full"):
        raise ValueError(f"client must be 'frozen', 'lora' or 'full', got {client!r}")
    quantizations = {"client": check_name(quantization), "server": check_name(trunk_quantization)}
    if quantizations["client"] and client == "full":
        raise ValueError(f"quantization {quantization} freezes the client's base weights: client 'full' trains them")
    return quantizations


def _add_weights(party: PartyMemory, model: _Model, quantized: str | None, with_outside: bool,
                 embedding_quantized: str | None = None) -> None:
    """The party's parameters and their bytes: its layers (their projections in ``quantized``'s format), and with
    ``with_outside`` the embedding, final norm and head (the embedding and an untied head in
    ``embedding_quantized``'s format)."""
    layers, width = model.layers, model.width
    party.parameters = sum(sum(p.numel() for p in layers[i].parameters()) for i in party.layers)
    party.parameters += model.outside if with_outside else 0
    party.weights = party.parameters * width
    if quantized:
        linears = [m for i in party.layers for _, m in _projections(layers[i])]
        dense = sum(m.weight.numel() for m in linears)
        rows = sum(m.out_features for m in linears)
        party.weights += quantized_bytes(dense, quantized, rows, width) - dense * width
    if with_outside and embedding_quantized:
        config = model.config
        matrices = 1 if getattr(config, "tie_word_embeddings", False) else 2
        rows = matrices * config.vocab_size
        dense = rows * config.hidden_size
        party.weights += quantized_bytes(dense, embedding_quantized, rows, width) - dense * width


def _add_training_state(party: PartyMemory, model: _Model, adapted: list[str], r: int, full: bool) -> None:
    """What training adds to the weights: LoRA adapters (float32) with their gradients and AdamW moments, or with
    ``full`` gradients and moments of every tensor in the weight dtype."""
    lora = sum(r * (m.in_features + m.out_features) for i in party.layers for n, m in _projections(model.layers[i])
               if n in adapted)
    if adapted:
        party.trainable = lora
        party.adapters = party.gradients = lora * 4
        party.optimizer = 2 * lora * 4
    elif full:
        party.trainable = party.parameters
        party.gradients = party.parameters * model.width
        party.optimizer = 2 * party.parameters * model.width


def _add_activations(party: PartyMemory, shapes: list[_Layer], tokens: int, hidden: int, width: int,
                     checkpointing: bool, quantized: str | None, cpu: bool) -> None:
    """What the party's layers save for backward and what the allocator holds besides (see the module docstring)."""
    biggest = max(shapes, key=lambda s: s.saved)
    if checkpointing:  # each layer's input, and one layer's saved tensors while it runs again
        party.activations = tokens * (hidden * len(shapes) * width + biggest.saved)
    else:
        party.activations = tokens * sum(s.saved for s in shapes)
    # what the allocator holds besides: on CPU glibc's heap keeps about HEAP_RETAINED of the layers' forward
    # allocations but one layer's (those above its mmap threshold go back to the system: one layer's at a time);
    # CUDA's caching allocator reuses them from layer to layer (one layer's)
    sizes = [size * tokens * width for size in biggest.allocated]
    kept = sum(x for x in sizes if x <= MMAP_THRESHOLD) if cpu else 0
    party.workspace = int(HEAP_RETAINED * (len(shapes) - 1) * kept) + sum(sizes) - kept
    if quantized:  # each projection's weight dequantized into the compute dtype for its matmuls
        weights = [n * width for n in biggest.projections]
        small = sum(x for x in weights if x <= MMAP_THRESHOLD) if cpu else 0
        small *= 2 if checkpointing else 1  # and again for the recomputation
        party.workspace += small + max((x for x in weights if not cpu or x > MMAP_THRESHOLD), default=0)


def _add_loss(top: PartyMemory, config: Any, tokens: int, width: int, loss_chunk: int, int8_head: bool,
              cpu: bool) -> None:
    """The top's logits: one chunk's in the workspace with the chunked loss, else whole ones kept for backward; an
    int8 head's dequantized rows and their block of logits. On CPU the top gives the heap's free pages back before
    chunks of :data:`~splittrain.segments.TRIM_LOGITS_BYTES` or more, so what the layers' workspace held is not
    resident beside them: the larger of the two counts."""
    chunked = 0 < loss_chunk < tokens  # a batch of at most loss_chunk tokens takes the plain path
    workspace = 0
    if chunked:  # one chunk's float32 logits, a second copy for a bfloat16 or softcapped head
        copies = 1 if width == 4 and getattr(config, "final_logit_softcapping", None) is None else 2
        workspace += copies * loss_chunk * config.vocab_size * 4
    else:  # float32 logits, their log-softmax and, in backward, the gradients of both
        top.activations += 4 * tokens * config.vocab_size * 4
    if int8_head:
        block = min(HEAD_BLOCK, config.vocab_size)
        workspace += block * (config.hidden_size + (loss_chunk if chunked else tokens)) * width
    trimmed = chunked and cpu and min(loss_chunk, tokens) * config.vocab_size * 4 >= TRIM_LOGITS_BYTES
    top.workspace = max(top.workspace, workspace) if trimmed else top.workspace + workspace


def estimate_memory(model: str, cuts: tuple[int, int], batch_size: int, seq_len: int, dtype: str | None = None,
                    client: str = "lora", client_lora_r: int = 8, trunk_lora_r: int = 8,
                    lora_targets: list[str] | None = None, device: str = "cpu", loss_chunk: int = LOSS_CHUNK,
                    quantization: str | None = None, trunk_quantization: str | None = None,
                    gradient_checkpointing: bool = False, trunk_gradient_checkpointing: bool = False,
                    embedding_quantization: str | None = None) -> dict[str, PartyMemory]:
    """Peak bytes of the client (bottom + top) and of the server (trunk) when training ``model`` cut at ``cuts``
    on batches of ``batch_size`` x ``seq_len`` tokens, weights in ``dtype`` (default: the config's), the loss
    computed ``loss_chunk`` positions at a time (0: whole logits; default: the client's); ``quantization`` and
    ``gradient_checkpointing`` are the client's base weights' format (``int8``, ``nf4``, ``fp4``; None: ``dtype``)
    and activation checkpointing, ``trunk_quantization`` and ``trunk_gradient_checkpointing`` the server's;
    ``embedding_quantization`` (``int8``) the format of the client's embedding and head."""
    config = model_config(model)
    layers_n = config.num_hidden_layers
    quantizations = _check_settings(cuts, layers_n, client, quantization, trunk_quantization)
    embedding_quantization = check_embedding_name(embedding_quantization)
    if embedding_quantization and client == "full":
        raise ValueError(f"embedding quantization {embedding_quantization} freezes the client's embedding and head: "
                         "client 'full' trains them")
    meta = _meta_model(config, dtype, lora_targets)
    checkpointing = {"client": gradient_checkpointing, "server": trunk_gradient_checkpointing}
    tokens, cpu = batch_size * seq_len, not device.startswith("cuda")
    c1, c2 = cuts
    parties = {"client": PartyMemory(layers=list(range(c1)) + list(range(c2, layers_n))),
               "server": PartyMemory(layers=list(range(c1, c2)))}
    for name, party in parties.items():
        quantized, r = quantizations[name], trunk_lora_r if name == "server" else client_lora_r
        adapted = meta.targets if name == "server" or client == "lora" else []
        _add_weights(party, meta, quantized, name == "client", embedding_quantization)
        _add_training_state(party, meta, adapted, r, full=client == "full" and name == "client")
        bnb = quantized or (name == "client" and embedding_quantization)
        party.runtime = RUNTIME_BYTES[name] + (BITSANDBYTES_BYTES if bnb else 0) if cpu else CUDA_CONTEXT_BYTES
        if party.layers:
            shapes = [_layer(config, meta.layers[i], adapted, r, meta.width, quantized) for i in party.layers]
            _add_activations(party, shapes, tokens, config.hidden_size, meta.width, checkpointing[name], quantized,
                             cpu)
    _add_loss(parties["client"], config, tokens, meta.width, loss_chunk, embedding_quantization is not None, cpu)
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
