"""What every benchmark's JSON says about where it ran."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path


def machine() -> dict[str, object]:
    """CPU count, torch and Python versions, platform and the UTC date of the run."""
    import torch

    return {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}


def write_result(path: Path, data: dict) -> None:
    """``data`` and the machine it was measured on, as JSON at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    print(f"wrote {path}")
