"""Human sizes: "800MB", "2GiB", "1.5G", "123456" (bytes)."""

from __future__ import annotations

import re

from .errors import InvalidArgumentError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes in a size string; decimal units (MB = 10^6) and binary ones (MiB = 2^20)."""
    if isinstance(text, int):
        if text <= 0:
            raise InvalidArgumentError(f"size must be positive, got {text}")
        return text
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise InvalidArgumentError(f"bad size '{text}': use a number with a unit, like 800MB or 2GiB")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise InvalidArgumentError(f"size must be positive, got '{text}'")
    return n


def format_size(n: int) -> str:
    for unit, div in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"
