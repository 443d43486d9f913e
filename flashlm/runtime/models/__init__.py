"""Architectures, one file each, resolved by the file's architecture name."""

from __future__ import annotations

import importlib

from ...errors import UnsupportedModelError

# Names that run with another file's code (mlx-lm style aliases).
ALIASES = {"mistral": "llama"}


def model_class(arch: str):
    """The `Model` class of architecture `arch` (e.g. "llama", "gemma3")."""
    name = ALIASES.get(arch, arch)
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError:
        raise UnsupportedModelError(f"architecture '{arch}' is not supported") from None
    return module.Model
