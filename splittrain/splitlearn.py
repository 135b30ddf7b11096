"""SplitLearn's API, translated onto splittrain's: ``ModelFactory.create_split_models`` and ``SplitModel``.

Code written for SplitLearn runs as it is::

    from splittrain import ModelFactory, SplitModel
    bottom, trunk, top = ModelFactory.create_split_models("qwen2", "Qwen/Qwen2-0.5B", 8, 16)
    hidden_1 = bottom(input_ids, attention_mask=mask)     # torch.Tensor (B, T, H)
    hidden_2 = trunk(hidden_1, attention_mask=mask)       # torch.Tensor (B, T, H)
    out = top(hidden_2, attention_mask=mask, labels=labels)  # out.logits, out.loss

Parts come back in eval mode, as ``from_pretrained`` returns a model; call ``.train()`` on a part to train it with
dropout. Cached decoding keeps one KV cache per part (a transformers ``DynamicCache`` of its own layers)::

    h, past_1 = bottom(input_ids, use_cache=True)
    h, past_2 = trunk(h, use_cache=True)
    out = top(h, use_cache=True)                           # out.logits, out.past_key_values
    token = out.logits[:, -1:].argmax(-1)
    h, past_1 = bottom(token, past_key_values=past_1, use_cache=True)   # one new position per part
    h, past_2 = trunk(h, past_key_values=past_2, use_cache=True)
    out = top(h, past_key_values=out.past_key_values, use_cache=True)

Each part is a :class:`SplitModel` over a native :class:`~splittrain.Segment` (``part.segment``), with the same
modules, parameters and checkpoint-named ``state_dict()``; only the values crossing the cuts differ: bare hidden
states here, :class:`~splittrain.Activations` (hidden states + mask + positions) in the native API. Parts are
saved as safetensors folders and never unpickled; ``SplitModel.load("S/bottom.pt")`` finds the folder
``S/bottom`` that ``auto_save`` wrote.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from .families import FAMILIES, Family, get_family
from .loading import Checkpoint, as_dtype, load_parts, load_segment, part_ranges
from .segments import SPLIT_FILE
from .segments import Activations, Segment

if TYPE_CHECKING:
    from transformers import Cache
    from transformers.modeling_outputs import CausalLMOutputWithPast

PICKLE_SUFFIXES = (".pt", ".pth", ".bin")


class SplitModel(nn.Module):
    """One part, SplitLearn-style: bottom and trunk return hidden states (B, T, H), the top a
    ``CausalLMOutputWithPast`` (``logits``, and ``loss`` with ``labels``).

    It registers the segment's own child modules, so parameters are shared with ``self.segment`` and
    ``state_dict()`` keys are the checkpoint's (``model.layers.7.mlp.up_proj.weight``). It starts in the segment's
    mode (loaded parts: eval, as ``from_pretrained``), and ``.train()`` / ``.eval()`` switch both.
    """

    segment: Segment

    def __init__(self, segment: Segment) -> None:
        super().__init__()
        for name, child in segment.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "segment", segment)  # not a submodule: its modules are registered above
        self.train(segment.training)

    @property
    def config(self) -> Any:
        return self.segment.config

    def extra_repr(self) -> str:
        return self.segment.extra_repr()

    def train(self, mode: bool = True) -> "SplitModel":
        """Switch this part and ``self.segment`` (dropout on in training, off in eval)."""
        super().train(mode)
        self.segment.train(mode)
        return self

    def forward(
        self,
        inputs: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Cache] | CausalLMOutputWithPast:
        """``input_ids`` (bottom) or hidden states (B, T, H) -> hidden states, or the top's causal-LM output.

        ``attention_mask`` (B, T) goes to every part, ``labels`` to the top. ``position_ids`` default to
        ``0..T-1``, as in the unsplit model.

        With ``use_cache=True`` (or a ``past_key_values``) the part keeps a KV cache of its own layers: the bottom
        and trunk return ``(hidden, present)``, the top's output carries it as ``past_key_values``. Pass each part
        its own ``present`` back with the next positions only; ``position_ids`` then default to continuing from
        what the cache holds, and ``attention_mask``, when given, covers the cached positions too, as in
        transformers. ``present`` is a transformers ``DynamicCache``; legacy tuples of (key, value) are refused.
        """
        if labels is not None and not self.segment.is_last:
            raise TypeError(f"part {self.segment.name!r} is not the top: pass labels to the top")
        if past_key_values is None and not use_cache:
            out = self.segment(inputs, attention_mask=attention_mask, position_ids=position_ids, labels=labels)
            return out.hidden_states if isinstance(out, Activations) else out
        if use_cache is False:
            raise ValueError(f"part {self.segment.name!r}: past_key_values with use_cache=False; pass use_cache=True "
                             "to continue from the cache, or no past_key_values to run without one")
        cache = self._own_cache(past_key_values)
        cached, length = cache.get_seq_length(self.segment.start), inputs.shape[1]
        if attention_mask is not None and attention_mask.shape[-1] != cached + length:
            raise ValueError(f"part {self.segment.name!r}: attention_mask covers {attention_mask.shape[-1]} positions; "
                             f"with {cached} cached and {length} new it must cover {cached + length}")
        if position_ids is None:
            position_ids = torch.arange(cached, cached + length, device=self.segment.device).unsqueeze(0)
        out = self.segment(inputs, attention_mask=attention_mask, position_ids=position_ids, labels=labels,
                           cache=cache)
        if isinstance(out, Activations):
            return out.hidden_states, cache
        out.cache = cache  # transformers 5's name; ``out.past_key_values`` reads it
        return out

    def _own_cache(self, past_key_values: Cache | None) -> Cache:
        """``past_key_values`` after checking it is a cache of this part's layers; a new one when None."""
        from transformers import Cache, DynamicCache

        segment = self.segment
        if past_key_values is None:
            return DynamicCache(config=segment.config)
        if not isinstance(past_key_values, Cache):
            raise TypeError(f"part {segment.name!r}: past_key_values must be the transformers cache that this part "
                            f"returned as present, not {type(past_key_values).__name__}: legacy (key, value) tuples "
                            "are not taken (transformers 5 no longer converts them)")
        foreign = [i for i in range(len(past_key_values.layers))
                   if not segment.start <= i < segment.stop and past_key_values.get_seq_length(i) > 0]
        if foreign:
            raise ValueError(f"part {segment.name!r} holds layers [{segment.start}, {segment.stop}) but was given a "
                             f"cache of layers {foreign}: pass each part the present it returned")
        return past_key_values

    def save(self, directory: str | os.PathLike) -> Path:
        """Write this part as a safetensors folder (config.json, model.safetensors, split.json)."""
        return self.segment.save(directory)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
             torch_dtype: torch.dtype | str | None = None, *, dtype: torch.dtype | str | None = None,
             part: str | None = None) -> "SplitModel":
        """Load a part saved by ``auto_save`` or :meth:`save`.

        ``path`` is the part's folder, or SplitLearn's file name for it: ``S/bottom.pt`` means the folder
        ``S/bottom`` (or the part ``bottom`` of a folder ``S`` holding several). An existing file is refused
        unread: splittrain never unpickles.
        """
        folder, name = _saved_part(Path(path))
        return cls(load_segment(folder, part=part or name, dtype=_one_dtype(torch_dtype, dtype), device=device))


def _saved_part(path: Path) -> tuple[Path, str | None]:
    """The folder (and part name) that a SplitLearn ``.pt`` path stands for."""
    if path.is_file():
        raise ValueError(
            f"{str(path)!r} is a file, probably pickled by torch.save: splittrain never unpickles files (loading "
            "a pickle runs whatever code it holds). Convert it by splitting the original checkpoint again: "
            "ModelFactory.create_split_models(model_type, model_name_or_path, split_point_1, split_point_2, "
            "storage_path=S, auto_save=True) writes S/bottom, S/trunk and S/top as safetensors folders, and "
            "SplitModel.load(f'{S}/bottom.pt') loads S/bottom.")
    if not path.exists() and path.suffix in PICKLE_SUFFIXES:
        if (path.with_suffix("") / SPLIT_FILE).is_file():
            return path.with_suffix(""), None
        if (path.parent / SPLIT_FILE).is_file():
            return path.parent, path.stem
    return path, None


def _one_dtype(torch_dtype: torch.dtype | str | None, dtype: torch.dtype | str | None) -> torch.dtype | None:
    """SplitLearn's ``torch_dtype`` or transformers' ``dtype`` (``"auto"``: the checkpoint's own)."""
    if torch_dtype is not None and dtype is not None and as_dtype(torch_dtype) != as_dtype(dtype):
        raise ValueError(f"torch_dtype={torch_dtype!r} and dtype={dtype!r} disagree: give one of them")
    chosen = torch_dtype if torch_dtype is not None else dtype
    return None if chosen == "auto" else as_dtype(chosen)


def _known_family(model_type: str) -> Family:
    """The family for ``model_type``; a ``KeyError`` listing the supported types, as SplitLearn raises."""
    try:
        return get_family(model_type)
    except ValueError:
        raise KeyError(f"model_type {model_type!r} is not supported; supported model types: "
                       f"{', '.join(sorted(FAMILIES))}") from None



def _family(model_type: str | None, checkpoint: Checkpoint) -> Family:
    """``model_type``'s family after checking it against the checkpoint's config (default: the checkpoint's own)."""
    actual = checkpoint.text_config.model_type
    family = _known_family(actual if model_type is None else model_type)
    try:
        stored = get_family(actual)
    except ValueError:  # an unregistered model type of the same shape: trust model_type
        return family
    if stored is not family:
        raise ValueError(f"model_type {model_type!r} does not match the checkpoint {checkpoint.source!r}, whose "
                         f"config says model_type {actual!r}: pass model_type={actual!r} or leave it out")
    return family


class ModelFactory:
    """SplitLearn's entry point: a thin translation onto :func:`splittrain.loading.load_parts`."""

    @staticmethod
    def create_split_models(
        model_type: str | None = None,
        model_name_or_path: str | os.PathLike | None = None,
        split_point_1: int | None = None,
        split_point_2: int | None = None,
        device: str | torch.device = "cpu",
        device_map: str | Mapping[str, Any] | None = None,
        low_memory: bool = False,
        verbose: bool = False,
        storage_path: str | os.PathLike | None = None,
        auto_save: bool = False,
        parts: Sequence[str] | None = None,
        *,
        attn_implementation: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> tuple[SplitModel | None, SplitModel | None, SplitModel | None]:
        """``(bottom, trunk, top)``: the model cut before layers ``split_point_1`` and ``split_point_2``.

        Args:
            model_type: ``"gemma"``, ``"qwen2"``, ... (default: the checkpoint's own); a ``KeyError`` lists the
                supported types, a ``ValueError`` names both types when it does not match the checkpoint.
            model_name_or_path: hub id or local folder of a safetensors checkpoint (sharded or not).
            split_point_1, split_point_2: ``0 < split_point_1 < split_point_2 < num_layers``.
            device, device_map: one device, a dict per part name, or ``"auto"``.
            low_memory: accepted and changes nothing: loading always reads only each part's shards and tensors.
            verbose: progress bar, bytes read and peak RSS per part.
            storage_path, auto_save: with both, each part is written to ``storage_path/<part>/`` (safetensors).
            parts: load only these of ``"bottom"``, ``"trunk"``, ``"top"``; the others come back as ``None``.
            attn_implementation: ``"sdpa"``, ``"eager"``, ... (default: transformers' choice for the family).
            torch_dtype, dtype: weight dtype, either spelling (default: the checkpoint's).
        """
        del low_memory  # always selective
        if model_name_or_path is None or split_point_1 is None or split_point_2 is None:
            raise TypeError("create_split_models needs model_name_or_path, split_point_1 and split_point_2")
        if auto_save and storage_path is None:
            raise ValueError("auto_save=True needs storage_path")
        checkpoint = Checkpoint(model_name_or_path)
        family = _family(model_type, checkpoint)
        ranges = part_ranges(checkpoint.text_config.num_hidden_layers, (split_point_1, split_point_2))
        loaded = load_parts(checkpoint, ranges, parts, _one_dtype(torch_dtype, dtype), device, device_map, verbose,
                            family.name, attn_implementation)
        if auto_save:
            for name, segment in loaded.items():
                segment.save(Path(storage_path) / name)
        bottom, trunk, top = (SplitModel(loaded[name]) if name in loaded.names else None for name in ranges)
        return bottom, trunk, top
