"""Checkpoint -> segments, reading only what each part needs.

``split_model`` reads ``config.json`` and ``model.safetensors.index.json`` (or the one ``model.safetensors``),
builds the model's modules on the meta device (no allocation, no random init), and for each requested part
opens only the shards holding its tensors and reads only those tensors with ``safetensors.safe_open``. The
tensors stay memory-mapped (zero-copy) when no dtype or device change is asked for, so a part costs memory
only for the pages its forward pass touches. A model owner can then ``save`` each party's segments into its
own folder, so no party ever holds another's weights.
"""

from __future__ import annotations

import copy
import json
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .families import Family, get_family
from .segments import SPLIT_FILE, Segment, release_freed_memory

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
"""safetensors' names of the float dtypes."""


# ----------------------------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """Current resident set size of this process."""
    import psutil

    return psutil.Process().memory_info().rss


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the process started or since :func:`reset_peak_rss`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class PartReport:
    """What loading one part cost: shards opened, tensors read, bytes read, peak RSS growth, seconds."""

    name: str
    layers: tuple[int, int]
    shards: list[str] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)
    bytes_read: int = 0
    peak_rss_delta: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        return (f"{self.name}: layers [{self.layers[0]}, {self.layers[1]}), {len(self.shards)} shard(s), "
                f"{len(self.tensors)} tensors, {self.bytes_read / 2**20:.1f} MiB read, "
                f"peak RSS +{self.peak_rss_delta / 2**20:.1f} MiB, {self.seconds:.2f} s")


class SplitParts(tuple):
    """The segments ``split_model`` built, in model order; unpack them or index by part name.

    ``bottom, trunk, top = split_model(...)``; ``split_model(..., parts=("trunk",))["trunk"]``.
    """

    names: tuple[str, ...]
    reports: dict[str, PartReport]

    def __new__(cls, segments: Mapping[str, Segment], reports: Mapping[str, PartReport]) -> "SplitParts":
        parts = super().__new__(cls, segments.values())
        parts.names = tuple(segments)
        parts.reports = dict(reports)
        return parts

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            if key not in self.names:
                raise KeyError(f"no part {key!r} here; parts: {', '.join(self.names)}")
            key = self.names.index(key)
        return super().__getitem__(key)

    def items(self) -> Iterable[tuple[str, Segment]]:
        return zip(self.names, self)


# ------------------------------------------------------------------------------------------ cuts & devices
def part_names(num_parts: int) -> list[str]:
    """``bottom``, ``trunk`` (or ``trunk1``, ``trunk2``, ... when there are several), ``top``."""
    middle = ["trunk"] if num_parts == 3 else [f"trunk{i}" for i in range(1, num_parts - 1)]
    return ["bottom", *middle, "top"]


def part_ranges(num_layers: int, cuts: Sequence[int]) -> dict[str, tuple[int, int]]:
    """Layer range ``[start, stop)`` of every part for ``cuts`` on a ``num_layers``-layer model."""
    if isinstance(cuts, int):
        cuts = (cuts,)
    cuts = tuple(cuts)
    if not cuts:
        raise ValueError("give at least one cut layer, e.g. cuts=(6, 12)")
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in cuts):
        raise TypeError(f"cuts must be integers, got {cuts!r}")
    if any(b <= a for a, b in zip(cuts, cuts[1:])):
        raise ValueError(f"cuts must be strictly increasing, got {cuts}")
    bad = [c for c in cuts if not 1 <= c <= num_layers - 1]
    if bad:
        raise ValueError(f"cut(s) {bad} outside 1..{num_layers - 1}: the model has {num_layers} layers and "
                         "every part needs at least one")
    bounds = (0, *cuts, num_layers)
    return dict(zip(part_names(len(bounds) - 1), zip(bounds, bounds[1:])))


def resolve_device_map(
    names: Sequence[str],
    device: str | torch.device = "cpu",
    device_map: str | Mapping[str, str | torch.device] | None = None,
    gpu_count: int | None = None,
) -> dict[str, torch.device]:
    """Device of every part: ``device`` for all, a dict per part, or ``"auto"``.

    ``"auto"`` with 0 GPUs puts everything on the CPU; with fewer GPUs than parts the bottom stays on the
    CPU and the other parts spread over the GPUs in order (1 GPU: trunk+top on cuda:0; 2 GPUs: trunk
    cuda:0, top cuda:1); with a GPU for every part, one GPU each.
    """
    names = list(names)
    if device_map is None:
        return {name: torch.device(device) for name in names}
    if device_map == "auto":
        gpus = torch.cuda.device_count() if gpu_count is None else gpu_count
        if gpus == 0:
            return {name: torch.device("cpu") for name in names}
        if gpus >= len(names):
            return {name: torch.device(f"cuda:{i}") for i, name in enumerate(names)}
        rest = names[1:]
        placed = {name: torch.device(f"cuda:{i * gpus // len(rest)}") for i, name in enumerate(rest)}
        return {names[0]: torch.device("cpu"), **placed}
    if isinstance(device_map, Mapping):
        unknown = sorted(set(device_map) - set(names))
        if unknown:
            raise ValueError(f"device_map names unknown part(s) {unknown}; parts: {', '.join(names)}")
        return {name: torch.device(device_map.get(name, device)) for name in names}
    raise ValueError(f"device_map must be None, 'auto' or a dict per part, got {device_map!r}")


# ------------------------------------------------------------------------------------------ checkpoints
def _hub_error(repo: str, exc: Exception) -> Exception:
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    login = ("log in with `hf auth login` (or set HF_TOKEN), or download the model once and pass its "
             "local folder instead")
    if isinstance(exc, GatedRepoError):
        return PermissionError(f"{repo!r} is a gated repository: accept its licence on its hub page, then {login}")
    if isinstance(exc, RepositoryNotFoundError):
        return FileNotFoundError(f"{repo!r} is neither a local folder nor a hub repository you can access "
                                 f"(private or misspelt?): {login}")
    if isinstance(exc, LocalEntryNotFoundError):
        return ConnectionError(f"could not reach the hub for {repo!r} and no cached copy exists: check the "
                               f"network, or {login}")
    return exc


class Checkpoint:
    """A safetensors checkpoint, local folder or hub repository: config, weight map, shard files.

    Hub shards are fetched one at a time as a part asks for them, so a party downloads only its shards.
    """

    def __init__(self, source: str | os.PathLike, revision: str | None = None,
                 token: str | bool | None = None) -> None:
        self.source = str(source)
        self.revision, self.token = revision, token
        self.local = Path(self.source).is_dir()
        if not self.local and (os.path.isabs(self.source) or self.source.startswith(".")
                               or self.source.count("/") > 1 or Path(self.source).exists()):
            raise FileNotFoundError(f"no model folder at {self.source!r}")
        from transformers import AutoConfig

        try:
            self.config = AutoConfig.from_pretrained(self.source, revision=revision, token=token)
        except OSError as exc:
            cause = exc.__cause__ or exc.__context__
            if self.local or cause is None:
                raise
            raise _hub_error(self.source, cause) from exc
        self.text_config = _text_config(self.config)  # the decoder's config (Gemma-3 nests it in a multimodal one)
        self.weight_map = self._weight_map()

    def file(self, filename: str) -> str:
        """Local path of ``filename`` (downloaded from the hub if needed); a clear error if it is missing."""
        if self.local:
            path = Path(self.source, filename)
            if not path.is_file():
                raise FileNotFoundError(f"shard {filename!r} is missing from {self.source!r}")
            return str(path)
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

        try:
            return hf_hub_download(self.source, filename, revision=self.revision, token=self.token)
        except EntryNotFoundError as exc:
            if isinstance(exc, LocalEntryNotFoundError):
                raise _hub_error(self.source, exc) from exc
            raise FileNotFoundError(f"shard {filename!r} is missing from hub repository {self.source!r}") from exc
        except HfHubHTTPError as exc:
            raise _hub_error(self.source, exc) from exc

    def _weight_map(self) -> dict[str, str]:
        try:
            index_path = self.file(INDEX_FILE)
        except FileNotFoundError:
            index_path = None
        if index_path is not None:
            with open(index_path) as f:
                return dict(json.load(f)["weight_map"])
        try:
            single = self.file(SINGLE_FILE)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{self.source!r} has neither {INDEX_FILE} nor {SINGLE_FILE}: splittrain loads safetensors "
                "checkpoints only (convert .bin weights with transformers' save_pretrained)") from None
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return {key: SINGLE_FILE for key in f.keys()}

    def prefixes(self, family: Family) -> tuple[str, str]:
        """The (text model, head) key prefixes this checkpoint uses, among those the family allows."""
        for text_prefix, head_prefix in family.checkpoint_prefixes:
            probe = f"{text_prefix}{family.layers}."
            if any(key.startswith(probe) for key in self.weight_map):
                return text_prefix, head_prefix
        raise ValueError(f"{self.source!r} holds no decoder layer weights under any of the prefixes "
                         f"{[p for p, _ in family.checkpoint_prefixes]} known for family {family.name!r}")


def _checkpoint_key(key: str, family: Family, prefixes: tuple[str, str]) -> str:
    """Causal-LM key (``model.layers.3...``, ``lm_head.weight``) -> the checkpoint's own key."""
    text_prefix, head_prefix = prefixes
    stack = family.stack + "."
    if key.startswith(stack):
        return text_prefix + key[len(stack):]
    return head_prefix + key


# ------------------------------------------------------------------------------------------ skeleton
def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _decoder_stack(model: nn.Module, family: Family, what: str) -> nn.Module:
    """The text model (``model.model``, ``model.transformer``) after checking it has the family's shape."""
    inner = getattr(model, family.stack, None)
    names = (family.layers, *family.input_modules, family.embedding, family.norm, *family.shared_modules)
    if inner is None or not all(hasattr(inner, name) for name in names) \
            or not isinstance(getattr(inner, family.layers), nn.ModuleList):
        beside = ", ".join(f"{family.stack}.{name}" for name in dict.fromkeys(names[1:]))
        raise ValueError(
            f"{what} ({type(model).__name__}) has no decoder-layer stack at {family.layer_path} with {beside} "
            f"beside it, the shape of family {family.name!r}; splittrain cuts decoder-only causal LMs of a "
            "supported family's shape")
    return inner


def _skeleton(config: Any, dtype: torch.dtype, attn_implementation: str | None) -> nn.Module:
    """The whole causal LM on the meta device: module structure without any weight memory."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)


def _materialize_buffers(segment: Segment, skeleton: nn.Module, device: torch.device) -> None:
    """Give non-persistent buffers (rotary inv_freq, Gemma's embed_scale) real values, the way
    transformers does after loading: allocate, then run the model's own ``_init_weights`` on that module,
    which skips tensors flagged as already loaded."""
    from transformers import initialization

    for module in segment.modules():
        meta = [name for name, buf in module.named_buffers(recurse=False) if buf is not None and buf.is_meta]
        if not meta:
            continue
        for name in meta:
            setattr(module, name, torch.empty_like(getattr(module, name), device=device))
        for param in module.parameters(recurse=False):
            param._is_hf_initialized = True
        with initialization.guard_torch_init_functions():
            skeleton._init_weights(module)
    left = [name for name, t in segment.state_dict(keep_vars=True).items() if t.is_meta]
    left += [name for name, t in segment.named_buffers() if t.is_meta]
    if left:
        raise RuntimeError(f"segment {segment.name!r} has tensors that were never loaded: {left[:5]}")


def _segment_from(model: nn.Module, family: Family, config: Any, name: str, start: int, stop: int,
                  tied: bool, embedding: nn.Module | None = None) -> Segment:
    """A segment over ``model``'s own modules; each segment gets its own copy of the weightless shared modules
    (rotary) so segments can live on different devices. ``embedding`` replaces the tied head's embedding."""
    inner = getattr(model, family.stack)
    layers = getattr(inner, family.layers)
    last = stop == config.num_hidden_layers
    modules = {key: getattr(inner, key) for key in family.input_modules} if start == 0 else {}
    if last:
        if tied:
            modules[family.embedding] = embedding or getattr(inner, family.embedding)
        modules[family.norm] = getattr(inner, family.norm)
    modules.update({key: copy.deepcopy(getattr(inner, key)) for key in family.shared_modules})
    return Segment(family, config, start, stop, layers={i: layers[i] for i in range(start, stop)}, modules=modules,
                   lm_head=model.lm_head if last and not tied else None, name=name)


# ------------------------------------------------------------------------------------------ public API
def split_model(
    model_name_or_path: str | os.PathLike | nn.Module,
    cuts: Sequence[int] | int | None = None,
    parts: Sequence[str] | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    device_map: str | Mapping[str, str | torch.device] | None = None,
    verbose: bool = False,
    *,
    family: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    attn_implementation: str | None = None,
    split_point_1: int | None = None,
    split_point_2: int | None = None,
    quantization: str | None = None,
    embedding_quantization: str | None = None,
) -> SplitParts:
    """Cut a decoder LLM at ``cuts`` and load the requested ``parts``, each reading only its own tensors.

    Args:
        model_name_or_path: hub id, local folder of a safetensors checkpoint, or a loaded
            ``PreTrainedModel`` (split in place: segments share its modules, nothing is copied).
        cuts: layer indices where the model is cut, strictly increasing in ``1..num_layers-1``;
            ``(c1,)`` gives bottom+top, ``(c1, c2)`` bottom+trunk+top. ``split_point_1/2`` are accepted too.
        parts: names of the parts to load (default all), e.g. ``("trunk",)`` for the server,
            ``("bottom", "top")`` for a client.
        dtype: weight dtype; default keeps the checkpoint's (zero-copy, memory-mapped).
        device, device_map: one device for all parts, or a dict per part name, or ``"auto"``.
        verbose: show a progress bar per part and print bytes read and peak RSS per part.
        family: family name for a model whose ``model_type`` is not registered but has the same shape.
        revision, token: passed to the hub for hub ids.
        attn_implementation: transformers attention backend (default: transformers' choice).
        quantization: ``int8``, ``nf4`` or ``fp4``: the decoder layers' projections are quantized with
            bitsandbytes tensor by tensor as they are read (see :mod:`splittrain.quantize`); the embedding, norms
            and head keep ``dtype``.
        embedding_quantization: ``int8``: the token embedding and an untied LM head are stored in int8 too (rows
            with a float32 scale each, quantized block by block as they are read; a tied head shares the
            embedding's); see :mod:`splittrain.quantize`.

    Returns:
        :class:`SplitParts`: the segments in model order (unpackable), indexable by part name,
        with a :class:`PartReport` per part in ``.reports``. Loaded parts are in eval mode, as
        ``from_pretrained`` returns a model (call ``.train()`` to train with dropout); a loaded model's
        segments keep its mode.
    """
    if cuts is None:
        cuts = tuple(c for c in (split_point_1, split_point_2) if c is not None)
    elif split_point_1 is not None or split_point_2 is not None:
        raise ValueError("give either cuts or split_point_1/split_point_2, not both")
    if isinstance(model_name_or_path, nn.Module):
        if quantization not in (None, "none") or embedding_quantization not in (None, "none"):
            raise ValueError("quantization happens while a part loads from its checkpoint: split the model's folder "
                             "or hub id, not a loaded model")
        return _split_loaded(model_name_or_path, cuts, parts, as_dtype(dtype), device, device_map, family)
    checkpoint = Checkpoint(model_name_or_path, revision=revision, token=token)
    config = checkpoint.text_config
    ranges = part_ranges(config.num_hidden_layers, cuts)
    return load_parts(checkpoint, ranges, parts, dtype, device, device_map, verbose, family, attn_implementation,
                      quantization, embedding_quantization)


def _select(ranges: Mapping[str, tuple[int, int]], parts: Sequence[str] | None) -> dict[str, tuple[int, int]]:
    if parts is None:
        return dict(ranges)
    if isinstance(parts, str):
        parts = (parts,)
    unknown = [p for p in parts if p not in ranges]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; this split has parts: {', '.join(ranges)}")
    return {name: r for name, r in ranges.items() if name in parts}


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``"torch.bfloat16"`` / a dtype / None -> a dtype or None."""
    if not isinstance(dtype, str):
        return dtype
    value = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; e.g. float32, bfloat16, float16")
    return value


def load_parts(
    checkpoint: Checkpoint,
    ranges: Mapping[str, tuple[int, int]],
    parts: Sequence[str] | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    device_map: str | Mapping[str, str | torch.device] | None = None,
    verbose: bool = False,
    family: str | None = None,
    attn_implementation: str | None = None,
    quantization: str | None = None,
    embedding_quantization: str | None = None,
) -> SplitParts:
    """Load the parts named in ``ranges`` (name -> layer range) from ``checkpoint``; see :func:`split_model`."""
    from . import quantize

    config = checkpoint.text_config
    fam = get_family(family or config.model_type)
    dtype = as_dtype(dtype)
    wanted = _select(ranges, parts)
    devices = resolve_device_map(list(ranges), device, device_map)
    stored_dtype = as_dtype(getattr(config, "dtype", None)) or torch.float32
    build_dtype = dtype or stored_dtype
    skeleton = _skeleton(config, build_dtype, attn_implementation)
    _decoder_stack(skeleton, fam, f"{config.model_type!r} model")
    prefixes = checkpoint.prefixes(fam)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    quantization = quantize.check_name(quantization)
    embedding_quantization = quantize.check_embedding_name(embedding_quantization)
    for fmt in dict.fromkeys(f for f in (quantization, embedding_quantization) if f):
        for target in {devices[name] for name in wanted}:
            quantize.probe(fmt, target, build_dtype)
    ends = _quantized_ends(skeleton, fam, tied, build_dtype) if embedding_quantization else []

    segments: dict[str, Segment] = {}
    reports: dict[str, PartReport] = {}
    for name, (start, stop) in wanted.items():
        began, rss0 = time.perf_counter(), rss_bytes()
        reset_peak_rss()
        target = devices[name]
        own_embedding = None
        if stop == config.num_hidden_layers and tied and "bottom" in segments and segments["bottom"].device != target:
            own_embedding = _fresh_embedding(config, fam, build_dtype, attn_implementation)
            if embedding_quantization:
                own_embedding = quantize.quantized_embedding(own_embedding, build_dtype)
                ends.append(own_embedding)
        segment = _segment_from(skeleton, fam, config, name, start, stop, tied, own_embedding)
        report = PartReport(name, (start, stop))
        needed = {key: t for key, t in segment.state_dict(keep_vars=True).items() if t.is_meta}
        by_shard = _keys_by_shard(checkpoint, needed, fam, prefixes, name)
        quantized = _quantized_layers(segment, quantization, build_dtype)
        quantized.update({f"{key}.weight": m for key, m in segment.named_modules() if any(m is e for e in ends)})
        loaded = _read_part(checkpoint, by_shard, {key: tuple(t.shape) for key, t in needed.items()}, quantized,
                            report, target, dtype, verbose)
        segment.load_state_dict(loaded, strict=False, assign=True)
        _materialize_buffers(segment, skeleton, target)
        segment.eval()  # as from_pretrained returns a model: dropout off until training calls .train()
        report.seconds = time.perf_counter() - began
        report.peak_rss_delta = max(0, peak_rss_bytes() - rss0)
        if verbose:
            print(report)
        segments[name], reports[name] = segment, report
    return SplitParts(segments, reports)


def _fresh_embedding(config: Any, family: Family, dtype: torch.dtype, attn_implementation: str | None) -> nn.Module:
    """An embedding of its own for a tied top on another device than the bottom: storage cannot be shared across
    devices, so the top reads its own copy (the two stay equal unless the client trains them in full)."""
    return getattr(getattr(_skeleton(config, dtype, attn_implementation), family.stack), family.embedding)


def _quantized_ends(skeleton: nn.Module, family: Family, tied: bool, dtype: torch.dtype) -> list[nn.Module]:
    """Put int8 layers in place of the ``skeleton``'s token embedding and untied LM head (meta, unloaded; a tied head
    is the embedding); returns them. Their weights are quantized block by block as they are read, as the decoder
    layers' are."""
    from . import quantize

    inner = getattr(skeleton, family.stack)
    ends = [quantize.quantized_embedding(getattr(inner, family.embedding), dtype)]
    setattr(inner, family.embedding, ends[0])
    if not tied:
        ends.append(quantize.quantized_linear(skeleton.lm_head, "int8", dtype))
        skeleton.lm_head = ends[1]
    return ends


def _quantized_layers(segment: Segment, quantization: str | None, dtype: torch.dtype) -> dict[str, nn.Module]:
    """Segment key -> the ``quantization`` layer that replaced its projection (none without quantization). Each
    weight is quantized as it is read, so no float copy of the part is ever whole; the segment is marked as a
    quantized model is, which peft reads to wrap these layers in its bitsandbytes LoRA layers."""
    from . import quantize

    if not quantization:
        return {}
    quantized = quantize.replace_linears(segment, quantization, dtype)
    segment.is_loaded_in_8bit, segment.is_loaded_in_4bit = quantization == "int8", quantization != "int8"
    return quantized


def _keys_by_shard(checkpoint: Checkpoint, needed: Iterable[str], family: Family, prefixes: tuple[str, str],
                   part: str) -> dict[str, list[tuple[str, str]]]:
    """Shard -> (segment key, checkpoint key) of the ``needed`` segment keys; a key the checkpoint lacks raises."""
    by_shard: dict[str, list[tuple[str, str]]] = {}
    for key in needed:
        ckpt_key = _checkpoint_key(key, family, prefixes)
        if ckpt_key not in checkpoint.weight_map:
            raise KeyError(f"tensor {ckpt_key!r} (for part {part!r}) is not in {checkpoint.source!r}")
        by_shard.setdefault(checkpoint.weight_map[ckpt_key], []).append((key, ckpt_key))
    return by_shard


def _read_part(checkpoint: Checkpoint, by_shard: Mapping[str, Sequence[tuple[str, str]]],
               shapes: Mapping[str, tuple[int, ...]], quantized: Mapping[str, nn.Module], report: PartReport,
               device: torch.device, dtype: torch.dtype | None, verbose: bool) -> dict[str, torch.Tensor]:
    """The part's float tensors by segment key, read shard by shard onto ``device`` (in ``dtype``, else as stored);
    the ``quantized`` layers' weights are quantized into them as they are read instead. Each read is recorded in
    ``report``; a tensor missing from its shard or of another shape than ``shapes`` says raises."""
    from safetensors import safe_open
    from tqdm.auto import tqdm

    loaded: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(shapes), desc=f"loading {report.name}", unit="tensor", disable=not verbose)
    for shard, keys in sorted(by_shard.items()):
        report.shards.append(shard)
        path = checkpoint.file(shard)
        with safe_open(path, "pt") as f:
            stored = set(f.keys())
            for key, ckpt_key in keys:
                if ckpt_key not in stored:
                    raise KeyError(f"tensor {ckpt_key!r} (for part {report.name!r}) is missing from shard {shard}, "
                                   "although the index lists it there")
                report.tensors.append(ckpt_key)
                shape = shapes[key]
                if key in quantized:  # checks the stored shape itself
                    report.bytes_read += _quantize_from(path, ckpt_key, quantized[key], shape, device, dtype)
                else:
                    tensor = f.get_tensor(ckpt_key)
                    if tuple(tensor.shape) != shape:
                        raise ValueError(f"tensor {ckpt_key!r} in {shard} has shape {tuple(tensor.shape)}, the "
                                         f"config implies {shape}")
                    report.bytes_read += tensor.nbytes
                    loaded[key] = tensor.to(device=device, dtype=dtype or tensor.dtype)
                bar.update()
    bar.close()
    return loaded


def _quantize_from(path: str, key: str, layer: nn.Module, shape: tuple[int, ...], device: torch.device,
                   dtype: torch.dtype | None) -> int:
    """Quantize tensor ``key`` of the safetensors file ``path`` into ``layer``, reading it a block of rows at a time
    with ``pread`` (not through a memory map, whose touched pages would stay resident until the file closes);
    returns the bytes read."""
    import struct

    from . import quantize

    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        entry = json.loads(f.read(size))[key]
        stored = FLOAT_DTYPES.get(entry["dtype"])
        if stored is None:
            raise ValueError(f"tensor {key!r} in {path} is {entry['dtype']}: only float weights can be quantized")
        begin, end = entry["data_offsets"]
        row = math.prod(shape[1:]) * torch.empty(0, dtype=stored).element_size()
        if tuple(entry["shape"]) != shape:
            raise ValueError(f"tensor {key!r} in {path} has shape {tuple(entry['shape'])}, the config implies {shape}")
        if end - begin != shape[0] * row:
            raise ValueError(f"tensor {key!r} in {path} has a header whose offsets do not match its shape {shape}")
        base = 8 + size + begin

        def rows(start: int, stop: int) -> torch.Tensor:
            buffer = bytearray((stop - start) * row)
            if os.preadv(f.fileno(), [buffer], base + start * row) != len(buffer):
                raise ValueError(f"{path} ends inside tensor {key!r}: the file is truncated")
            return torch.frombuffer(buffer, dtype=stored).view(stop - start, *shape[1:])

        quantize.quantize_weight(layer, rows, shape, device, dtype or stored)
    release_freed_memory()
    return end - begin


def _split_loaded(model: nn.Module, cuts: Sequence[int] | int, parts: Sequence[str] | None,
                  dtype: torch.dtype | None, device: str | torch.device,
                  device_map: str | Mapping[str, Any] | None, family: str | None) -> SplitParts:
    """Segments over an already-loaded causal LM's own modules (moved to their devices, not copied)."""
    config = _text_config(model.config)
    fam = get_family(family or config.model_type)
    inner = _decoder_stack(model, fam, "the model")
    ranges = part_ranges(config.num_hidden_layers, cuts)
    wanted = _select(ranges, parts)
    devices = resolve_device_map(list(ranges), device, device_map)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is getattr(inner, fam.embedding).weight
    names = list(ranges)
    if tied and devices[names[0]] != devices[names[-1]] and {names[0], names[-1]} <= set(wanted):
        raise ValueError("this model's head is tied to its embedding: an in-memory split keeps them shared, so "
                         "bottom and top need one device (split from a checkpoint folder to place them apart)")
    segments, reports = {}, {}
    for name, (start, stop) in wanted.items():
        segment = _segment_from(model, fam, config, name, start, stop, tied)
        segment.train(model.training)  # the model's own modules: they keep its mode
        segments[name] = segment.to(device=devices[name], dtype=dtype) if dtype else segment.to(devices[name])
        reports[name] = PartReport(name, (start, stop))
    return SplitParts(segments, reports)


# ------------------------------------------------------------------------------------ saved segment folders
def _read_split(directory: Path) -> dict[str, Any]:
    path = Path(directory) / SPLIT_FILE
    if not path.is_file():
        hint = (" (splittrain never unpickles .pt files: save segments with segment.save(dir))"
                if str(directory).endswith((".pt", ".pth", ".bin")) else "")
        raise FileNotFoundError(f"{str(directory)!r} is not a saved segment folder: no {SPLIT_FILE}{hint}")
    return json.loads(path.read_text())


def load_segments(directory: str | os.PathLike, parts: Sequence[str] | None = None,
                  dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                  device_map: str | Mapping[str, Any] | None = None, verbose: bool = False,
                  quantization: str | None = None, embedding_quantization: str | None = None) -> SplitParts:
    """Load the segments saved in ``directory`` (all, or the named ``parts``), optionally ``quantization``-ed (and
    the embedding and head ``embedding_quantization``-ed)."""
    directory = Path(directory)
    meta = _read_split(directory)
    ranges = {name: (int(a), int(b)) for name, (a, b) in meta["parts"].items()}
    return load_parts(Checkpoint(directory), ranges, parts, dtype, device, device_map, verbose, meta["family"],
                      quantization=quantization, embedding_quantization=embedding_quantization)


def load_segment(directory: str | os.PathLike, part: str | None = None, **kwargs: Any) -> Segment:
    """Load one saved segment; ``part`` names it when the folder holds several."""
    meta = _read_split(Path(directory))
    names = list(meta["parts"])
    if part is None:
        if len(names) != 1:
            raise ValueError(f"{str(directory)!r} holds parts {names}: name one with part=...")
        part = names[0]
    return load_segments(directory, parts=(part,), **kwargs)[part]


def party_parts(names: Sequence[str]) -> dict[str, list[str]]:
    """Which parts each party holds: the client the ends, the server everything between."""
    if len(names) == 2:
        return {"client": [names[0]], "server": [names[1]]}
    return {"client": [names[0], names[-1]], "server": list(names[1:-1])}

