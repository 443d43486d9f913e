"""WeightStore: where model code gets its weights, without knowing where they live.

The resident store hands out zero-copy views into the mapped model file. A streaming
store (flashload, experts) implements the same `get` / `vector` / `has` interface.
"""

from __future__ import annotations

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
            v = kernels_cpu.dequantize(self.file.tensors[name]).reshape(-1)
            self._vectors[name] = v
        return v

    @property
    def resident_bytes(self) -> int:
        """Bytes of weights this store keeps addressable in memory (mapped file)."""
        return sum(t.nbytes for t in self.file.tensors.values())

    def close(self):
        self._vectors.clear()
        self.file.close()
