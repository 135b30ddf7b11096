"""What every benchmark's JSON says about where it ran."""

from __future__ import annotations

import datetime
import os
import platform


def machine() -> dict[str, object]:
    """CPU count, torch and Python versions, platform and the UTC date of the run."""
    import torch

    return {"cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
