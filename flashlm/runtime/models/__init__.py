"""Architectures, one file each, resolved by the file's architecture name. Each file's
`Model` class holds its architecture's facts (blocks.DecoderLM lists them): adding an
architecture means adding a file here."""

from __future__ import annotations

import importlib
import pkgutil

from ...errors import UnsupportedModelError

# Names that run with another file's code (mlx-lm style aliases).
ALIASES = {"mistral": "llama"}

SUPPORTED = frozenset(m.name for m in pkgutil.iter_modules(__path__))  # GGUF architecture names


def model_class(arch: str, path=None):
    """The `Model` class of architecture `arch` (e.g. "llama", "gemma3"); its class
    attributes are the architecture's facts. UnsupportedModelError naming the supported
    architectures (and the file, if given) for any other."""
    name = ALIASES.get(arch, arch)
    if name not in SUPPORTED:
        where = f"{path}: " if path is not None else ""
        raise UnsupportedModelError(
            f"{where}architecture '{arch}' is not supported; flashlm runs {', '.join(sorted(SUPPORTED))}")
    return importlib.import_module(f"{__name__}.{name}").Model
