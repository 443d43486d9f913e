"""FlashStore: a WeightStore over a flash-layout file whose FFN neurons are streamed.

Everything but the FFNs is used from the mapped file as in the resident store. A
layer's FFN comes from `ffn(i, groups)`: the bundles of the chosen neuron groups are
read with the I/O engine (direct I/O, coalesced, parallel), and their gate rows, up
rows and down columns assembled into three small matrices in the file's own quant
format, which the usual kernels multiply. With every group chosen the matrices are
byte for byte the model's, so the results are the resident model's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import FlashLMError
from ..runtime.modelfile import TensorRef
from ..runtime.weights import WeightStore
from .io import ReadEngine
from .layout import FFN, read_plans


@dataclass
class StreamStats:
    """What the FFN streaming did since the last reset."""

    bytes_read: int = 0  # bytes the engine read (aligned, coalesced)
    reads: int = 0
    groups: int = 0  # neuron groups fetched
    io_seconds: float = 0.0
    assemble_seconds: float = 0.0  # copying bundles into matrices (bookkeeping)


class FlashStore(WeightStore):
    """Non-FFN weights resident (mapped); FFN neuron bundles read on demand."""

    fusable = False  # the FFN weights are not all addressable: run layer by layer

    def __init__(self, model_file, io_threads: int = 8, direct: bool = True):
        super().__init__(model_file)
        self.plans = read_plans(model_file)
        self._bundles = [model_file.tensors[f"blk.{lb.layer}.ffn_bundles"] for lb in self.plans]
        self.engine = ReadEngine(model_file.path, n_threads=io_threads, direct=direct)
        self.stats = StreamStats()

    def has(self, name: str) -> bool:
        return super().has(name) or self._ffn_layer(name) is not None

    def get(self, name: str):
        if self._ffn_layer(name) is not None:
            raise FlashLMError(f"{name} is streamed in the flash layout; use FlashStore.ffn")
        return super().get(name)

    @staticmethod
    def _ffn_layer(name: str) -> int | None:
        parts = name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in FFN and parts[3] == "weight":
            return int(parts[1])
        return None

    def ffn(self, i: int, groups: np.ndarray | None = None) -> tuple[TensorRef, TensorRef, TensorRef]:
        """Layer i's gate, up and down weights restricted to the neurons of `groups`
        (bundle indices, ascending; all if None): gate/up (n_sel, n_embd) and down
        (n_embd, n_sel) in the file's quant types."""
        lb, t = self.plans[i], self._bundles[i]
        if groups is None:
            groups = np.arange(lb.n_groups)
        n = len(groups)
        a, b, c = lb.parts
        gate = np.empty((n * lb.group, lb.gate_bytes), dtype=np.uint8)
        up = np.empty((n * lb.group, lb.up_bytes), dtype=np.uint8)
        down = np.empty((n, lb.n_embd * lb.down_bytes), dtype=np.uint8)
        gflat, uflat = gate.reshape(n, a), up.reshape(n, b)
        ranges, outs = [], []
        for k, g in enumerate(groups):
            off = t.offset + int(g) * lb.stride
            ranges += [(off, a), (off + a, b), (off + a + b, c)]
            outs += [gflat[k], uflat[k], down[k]]
        t0 = time.perf_counter()
        before = self.engine.stats.bytes_read, self.engine.stats.reads
        self.engine.read_ranges(ranges, outs)
        t1 = time.perf_counter()
        down = down.reshape(n, lb.n_embd, lb.down_bytes).transpose(1, 0, 2).reshape(lb.n_embd, n * lb.down_bytes)
        t2 = time.perf_counter()
        st = self.stats
        st.bytes_read += self.engine.stats.bytes_read - before[0]
        st.reads += self.engine.stats.reads - before[1]
        st.groups += n
        st.io_seconds += t1 - t0
        st.assemble_seconds += t2 - t1
        n_sel = n * lb.group
        gt, ut, dt = lb.types
        return (TensorRef(f"blk.{i}.ffn_gate.weight", gt, (n_sel, lb.n_embd), gate, -1),
                TensorRef(f"blk.{i}.ffn_up.weight", ut, (n_sel, lb.n_embd), up, -1),
                TensorRef(f"blk.{i}.ffn_down.weight", dt, (lb.n_embd, n_sel), down, -1))

    def reset_stats(self) -> StreamStats:
        old, self.stats = self.stats, StreamStats()
        return old

    @property
    def resident_bytes(self) -> int:
        """Bytes of weights kept addressable: everything but the FFN bundles."""
        bundles = {t.name for t in self._bundles}
        return sum(t.nbytes for t in self.file.tensors.values() if t.name not in bundles)

    def close(self):
        self.engine.close()
        super().close()
