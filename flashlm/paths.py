"""Where flashlm keeps its files: models, flash layouts, expert bundles, the disk probe."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The flashlm cache folder: $FLASHLM_HOME, else ~/.cache/flashlm."""
    env = os.environ.get("FLASHLM_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flashlm"
