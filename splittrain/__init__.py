"""splittrain: split-learning fine-tuning of decoder LLMs.

Cut a transformers causal LM into bottom / trunk / top segments that compute exactly what the whole model
computes, each party loading only its own weights::

    import splittrain
    bottom, trunk, top = splittrain.split_model("Qwen/Qwen2-0.5B", cuts=(6, 18))
    out = top(trunk(bottom(input_ids, attention_mask=mask)))
    out.logits
"""

import logging
import os

# Idle OpenMP threads (GNU libgomp, as in PyTorch's pip wheels) spin for about 300,000 iterations before they sleep.
# When client and server processes share cores, the waiting side's spinning threads slow the computing side: about
# 10% per step over loopback, and pipelining gains nothing. A short spin costs a lone process nothing measurable.
# Read once, when torch loads its OpenMP runtime: import splittrain first. A value the user set is kept.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")
# peft imports bitsandbytes whenever it is installed, and bitsandbytes' CPU backend then warns that an optional
# kernels package is missing before it uses its own 4-bit kernels: nothing for a user to act on.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .families import FAMILIES, Family, get_family  # noqa: E402
from .loading import (  # noqa: E402
    PartReport,
    SplitParts,
    load_segment,
    load_segments,
    split_model,
)
from .segments import Activations, Segment, save_segments  # noqa: E402
from .splitlearn import ModelFactory, SplitModel  # noqa: E402  (SplitLearn's API)

# Training classes pull in Lightning and peft (seconds to import): loaded on first use only.
_LAZY = {"ClientModule": "modules", "TrunkServer": "server", "load_trunk": "server", "estimate_memory": "estimate"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "FAMILIES",
    "Activations",
    "ClientModule",
    "Family",
    "ModelFactory",
    "PartReport",
    "Segment",
    "SplitModel",
    "SplitParts",
    "TrunkServer",
    "estimate_memory",
    "get_family",
    "load_trunk",
    "load_segment",
    "load_segments",
    "save_segments",
    "split_model",
]
