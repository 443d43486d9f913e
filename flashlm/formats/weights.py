"""WeightStore: the model file's tensors as model code asks for them by name.

It hands out zero-copy views into the mapped file (`get`) and small vectors as float32
copies (`vector`). flashload's FlashStore extends it for a flash layout, whose FFN
tensors are not in the file as such.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import kernels_cpu
from ..errors import ModelFormatError


class WeightStore:
    """Every tensor resident: views into the mmapped file (the page cache holds them)."""

    def __init__(self, model_file):
        self.file = model_file
        self._vectors: dict[str, np.ndarray] = {}

    def has(self, name: str) -> bool:
        return name in self.file.tensors

    def get(self, name: str):
        """The TensorRef `name`, for kernels_cpu.linear / embed."""
        try:
            return self.file.tensors[name]
        except KeyError:
            raise ModelFormatError(f"{self.file.path}: tensor {name} is missing") from None

    def vector(self, name: str) -> np.ndarray | None:
        """A small 1-D tensor (norm weight, bias) as float32, or None if absent."""
        if name not in self.file.tensors:
            return None
        v = self._vectors.get(name)
        if v is None:
            v = kernels_cpu.dequantize(self._read_copy(self.file.tensors[name])).reshape(-1)
            self._vectors[name] = v
        return v

    def _read_copy(self, t):
        # A private copy read with pread: touching the mapping instead would fault in
        # whole large folios (~1 MiB each) around every small norm vector.
        with open(self.file.path if self.file.kind == "gguf" else t.source, "rb") as f:
            raw = os.pread(f.fileno(), t.nbytes, t.offset)
        return replace(t, data=np.frombuffer(raw, dtype=np.uint8).reshape(t.data.shape))

    @property
    def resident_bytes(self) -> int:
        """Bytes of weights this store keeps addressable in memory (mapped file)."""
        return sum(t.nbytes for t in self.file.tensors.values())

    def file_resident_bytes(self) -> int:
        """Bytes of this store's mappings of the model file that are resident now
        (from /proc/self/smaps; 0 where that file does not exist)."""
        ranges = [(t.data.ctypes.data, t.data.ctypes.data + t.nbytes) for t in self.file.tensors.values()]
        if self.file.kind == "gguf":
            return mapped_resident_bytes(self.file.path, ranges)
        return sum(mapped_resident_bytes(p, ranges) for p in {t.source for t in self.file.tensors.values()})

    def close(self):
        self._vectors.clear()
        self.file.close()


def mapped_resident_bytes(path, within: list[tuple[int, int]] | None = None) -> int:
    """Resident bytes of this process's mappings of file `path` (Linux smaps); only the
    mappings that overlap an address range in `within`, if given (another mapping of
    the same file, llama.cpp's say, is not ours)."""
    target = str(Path(path).resolve())
    total, inside = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                    inside = line.rstrip("\n").endswith(target)
                    if inside and within is not None:
                        lo, hi = (int(a, 16) for a in line.split(" ", 1)[0].split("-"))
                        inside = any(a < hi and b > lo for a, b in within)
                elif inside and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total
