"""peft LoRA on segments, per-party adapter state, and export to one standard peft adapter.

Adapters are injected with peft into a segment whose module names are the full model's
(``model.layers.7.self_attn.q_proj``, ``transformer.h.7.attn.c_attn``), so adapter keys keep the original
layer indices and the adapters of all parties together form one adapter for the whole model. The family says
which projections are adapted by default and whether they store weights (in, out) (peft's
``fan_in_fan_out``). LoRA ``A`` matrices are initialised from a generator seeded by (seed, module name): the
same seed gives the same adapters however the model is cut, and the same as the unsplit model given
:func:`init_lora`.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import torch
from torch import nn

from .families import Family, get_family

TrainMode = Literal["frozen", "lora", "full"]
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoraSettings:
    """LoRA hyper-parameters of one party."""

    r: int = 8
    """Rank of the update."""
    alpha: float = 16
    """Scale numerator: the update is multiplied by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    targets: list[str] | None = None
    """Projection names to adapt; default: the family's attention and MLP projections."""

    def targets_for(self, family: Family) -> list[str]:
        """The projection names adapted in a model of ``family``."""
        return list(self.targets) if self.targets else list(family.lora_targets)


def target_regex(family: Family, layers: Iterable[int], targets: Iterable[str]) -> str:
    """peft ``target_modules`` regex (``re.fullmatch``) selecting ``targets`` in exactly these layers."""
    layer_alt = "|".join(str(i) for i in sorted(layers))
    target_alt = "|".join(re.escape(t) for t in targets)
    return rf"(?:.*\.)?{re.escape(family.layer_path)}\.({layer_alt})\.(?:.*\.)?({target_alt})"


def lora_config(family: Family, layers: Iterable[int], settings: LoraSettings) -> Any:
    """The peft ``LoraConfig`` adapting ``settings``' projections in ``layers`` of a ``family`` model."""
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=target_regex(family, layers, settings.targets_for(family)), bias="none",
                      fan_in_fan_out=family.lora_fan_in_fan_out)


def model_family(module: nn.Module) -> Family:
    """A segment's family, or the family of a transformers model (or PeftModel) from its ``config.model_type``."""
    family = getattr(module, "family", None)
    return family if isinstance(family, Family) else get_family(module.config.model_type)


def _canonical(name: str, family: Family) -> str:
    """Module name from the decoder layers on (``model.layers.3...``), whatever wraps it (PeftModel, a segment,
    a causal LM)."""
    at = name.find(family.layer_path + ".")
    return name[at:] if at >= 0 else name


@torch.no_grad()
def init_lora(module: nn.Module, seed: int = 0, adapter: str = "default") -> None:
    """peft's default init (A: kaiming-uniform, B: zeros), with A drawn from a per-module seeded generator."""
    from peft.tuners.lora import LoraLayer

    family = model_family(module)
    for name, layer in module.named_modules():
        if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
            weight = layer.lora_A[adapter].weight
            key = _canonical(name, family)
            g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
            fresh = torch.empty(weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=g)
            weight.copy_(fresh)
            layer.lora_B[adapter].weight.zero_()


def add_lora(segment: nn.Module, layers: Iterable[int], settings: LoraSettings, seed: int = 0) -> nn.Module:
    """Inject LoRA adapters into ``layers`` of ``segment`` in place; only the adapters stay trainable."""
    from peft import inject_adapter_in_model

    for param in segment.parameters():
        param.requires_grad_(False)
    inject_adapter_in_model(lora_config(segment.family, layers, settings), segment)
    segment.train(segment.training)  # peft makes its layers in training mode: they take the segment's
    init_lora(segment, seed)
    return segment


def prepare(segment: nn.Module, mode: TrainMode, settings: LoraSettings | None = None, seed: int = 0) -> nn.Module:
    """Make a segment trainable as ``frozen`` (nothing), ``lora`` (adapters on its layers) or ``full``."""
    if mode == "lora":
        return add_lora(segment, range(segment.start, segment.stop), settings or LoraSettings(), seed)
    if mode not in ("frozen", "full"):
        raise ValueError(f"training mode must be 'frozen', 'lora' or 'full', got {mode!r}")
    for param in segment.parameters():
        param.requires_grad_(mode == "full")
    return segment


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's LoRA tensors under peft's saved names (``model.layers.3.mlp.up_proj.lora_A.weight``)."""
    suffix = ".default"
    return {
        name.replace(suffix, ""): param.detach()
        for name, param in module.named_parameters()
        if ".lora_A." in name or ".lora_B." in name
    }


@torch.no_grad()
def load_adapter_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter tensors (names as from :func:`adapter_state_dict`) into ``module``'s adapters."""
    params = dict(module.named_parameters())
    expected = {name.replace(".default", ""): p for name, p in params.items() if ".lora_" in name}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"adapter mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        expected[name].copy_(tensor)


def export_adapter(out: str | Path, base_model: str, family: Family,
                   parts: Mapping[str, tuple[list[int], LoraSettings]], tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write one standard peft adapter for the whole model (of ``family``) from the parties' adapters.

    ``parts`` maps a party's part name to (its adapted layers, its settings); ``tensors`` holds all adapter
    tensors under :func:`adapter_state_dict` names. Different ranks or alphas per party are expressed with
    peft's ``rank_pattern`` / ``alpha_pattern``, so ``PeftModel.from_pretrained`` needs nothing else.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    if not parts:
        raise ValueError("no LoRA-trained part to export")
    settings = list(parts.values())
    targets = sorted({t for _, s in settings for t in s.targets_for(family)})
    if any(set(s.targets_for(family)) != set(targets) for _, s in settings):
        raise ValueError("parties adapt different projection names: export needs the same targets everywhere")
    _, main = max(settings, key=lambda s: len(s[0]))
    all_layers = sorted({i for layers, _ in settings for i in layers})
    rank_pattern, alpha_pattern = {}, {}
    for layers, s in settings:
        if (s.r, s.alpha) != (main.r, main.alpha):
            key = rf"{re.escape(family.layer_path)}\.({'|'.join(map(str, layers))})\..*"
            rank_pattern[key], alpha_pattern[key] = s.r, s.alpha
    config = LoraConfig(r=main.r, lora_alpha=main.alpha, lora_dropout=main.dropout, bias="none",
                        target_modules=target_regex(family, all_layers, targets), rank_pattern=rank_pattern,
                        alpha_pattern=alpha_pattern, fan_in_fan_out=family.lora_fan_in_fan_out,
                        task_type="CAUSAL_LM", base_model_name_or_path=base_model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in tensors.items()}, out / ADAPTER_WEIGHTS,
              metadata={"format": "pt"})
    return out


def _peft_name(name: str) -> str:
    """A module parameter name -> peft's saved name (no owner prefix, no adapter name)."""
    for owner in ("bottom.", "top."):
        if name.startswith(owner):
            name = name[len(owner):]
    return name.replace(".default.", ".")


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Export a split run as ONE artefact for the whole model, loadable without splittrain.

    LoRA-trained clients give a standard peft adapter (``adapter_config.json`` +
    ``adapter_model.safetensors``) for ``PeftModel.from_pretrained(base, out)``. A client trained ``full``
    owns changed base weights, so the export is a merged transformers checkpoint (trunk adapters merged in).
    """
    import json

    from transformers import AutoConfig

    from .state import load_state

    run_dir = Path(run_dir)
    manifest_path = run_dir / "run.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a splittrain run folder (no run.json)")
    manifest = json.loads(manifest_path.read_text())
    checkpoint = Path(checkpoint) if checkpoint else run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no client checkpoint at {checkpoint}")
    client_state = load_state(checkpoint)
    # where the trunk server saved this client's adapter: trunk/<client>/step-N, or a federation's trunk/step-N
    trunk_file = run_dir / "trunk" / client_state.get("trunk_file", f"{client_state['trunk_checkpoint']}.safetensors")
    if not trunk_file.is_file():
        raise FileNotFoundError(f"the trunk checkpoint {trunk_file} that {checkpoint.name} refers to is missing")
    trunk = {_peft_name(k): v for k, v in load_state(trunk_file)["trainable"].items()}
    client = {_peft_name(k): v for k, v in client_state["state_dict"].items()}
    config = AutoConfig.from_pretrained(manifest["model"])
    family = get_family(config.get_text_config().model_type)
    c1, c2 = manifest["cuts"]
    trunk_part = (list(range(c1, c2)), LoraSettings(**manifest["trunk_lora"]))
    if manifest["client"] != "full":
        parts = {"trunk": trunk_part}
        if manifest["client"] == "lora":
            client_layers = [*range(c1), *range(c2, manifest["num_layers"])]
            parts["client"] = (client_layers, LoraSettings(**manifest["client_lora"]))
        return export_adapter(out, manifest["model"], family, parts, {**client, **trunk})
    return _export_merged(out, manifest["model"], family, trunk_part, trunk, client)


def _export_merged(out: str | Path, base: str, family: Family, trunk_part: tuple[list[int], LoraSettings],
                   trunk: Mapping[str, torch.Tensor], client: Mapping[str, torch.Tensor]) -> Path:
    from peft import inject_adapter_in_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, tensor in client.items():
            if name not in params:
                raise KeyError(f"client tensor {name!r} is not a parameter of {base}")
            params[name].copy_(tensor)
    layers, settings = trunk_part
    inject_adapter_in_model(lora_config(family, layers, settings), model)
    load_adapter_state_dict(model, trunk)
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    out = Path(out)
    model.save_pretrained(out)
    try:
        AutoTokenizer.from_pretrained(base).save_pretrained(out)
    except (OSError, ValueError):
        pass  # a checkpoint without a tokenizer exports without one
    return out
