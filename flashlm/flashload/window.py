"""NeuronWindow: one layer's FFN neurons held in DRAM, a row per neuron, as "LLM in a flash"
keeps the neurons of the last few tokens. Which neuron sits in which row is the slot
cache's bookkeeping (cache/slots.py, LRU); the rows are arrays of the window's own, so
the kernels read gate, up and down rows of one type each, contiguous."""

from __future__ import annotations

import numba
import numpy as np

from ..cache import SlotCache
from ..formats.modelfile import TensorRef
from ..io import aligned_empty


class NeuronWindow:
    """One layer's neurons in DRAM: preallocated gate/up/down row matrices with a slot
    per neuron held, as in the paper. Neurons used in the last `window` tokens stay;
    older ones are dropped, and a full window evicts the least recently used neurons the
    token does not need. Neurons a full window cannot take spill: the store reads them
    for this token only."""

    def __init__(self, lb, capacity: int, pool: np.ndarray | None = None, with_gate: bool = True):
        self.lb, self.cap = lb, capacity
        gb = lb.gate_bytes if with_gate else 0  # no gate rows where the predictor holds the gate
        sizes = [capacity * gb, capacity * lb.up_bytes, capacity * lb.down_bytes]
        if pool is None:  # rows of its own; else views of a pool that layers take turns to use
            pool = aligned_empty(sum(sizes))
        a, b, c = sizes
        self.gate = pool[:a].reshape(capacity, gb)
        self.up = pool[a:a + b].reshape(capacity, lb.up_bytes)
        self.down = pool[a + b:a + b + c].reshape(capacity, lb.down_bytes)
        self.cache = SlotCache(capacity, 0, "lru", n_keys=lb.n_ff)
        self._began: dict[int, int] = {}  # token -> the cache's clock at the token's first use
        self._widest = 0  # the widest window asked for: the marks kept go back that far

    @property
    def n(self) -> int:
        """Neurons held."""
        return self.cache.n_held

    @property
    def slot_of(self) -> np.ndarray:
        """Each neuron's row, or -1."""
        return self.cache.slot_of

    def place(self, needed: np.ndarray, t: int, window: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows for the neurons token t needs: (slots, missed). Held ones are marked used;
        missing ones take free rows, then rows of the least recently used neurons this
        token does not need, in order; slot -1 where no row is left (read for this token
        only). Then neurons not used in the last `window` tokens (0: this one either)
        leave. The caller fills the missed rows before the next call."""
        c = self.cache
        c.release()
        if window <= 0:
            c.clear()
        self._began[t] = c.tick + 1
        slots, missed = c.assign(needed, pin=True, spill=True)
        if window > 0:  # drop what was last used before the window's oldest token (or the first since)
            c.expire(self._began[min(u for u in self._began if u > t - window)])
            self._widest = max(self._widest, window)
            self._began = {u: v for u, v in self._began.items() if u > t - self._widest}
        return slots, missed

    def hold(self, neurons: np.ndarray, clear: bool = False) -> np.ndarray:
        """Rows for neurons not held (free rows first, in order), for the caller to fill;
        clear: empty the window first (a spill buffer takes one token's neurons)."""
        if clear:
            self.cache.clear()
        return self.cache.assign(neurons, pin=False)[0]

    def put(self, slots: np.ndarray, rec: np.ndarray) -> None:
        """Write neurons' records rec (n, bundle_bytes; C-contiguous) into rows `slots`
        (the gate part only where the window keeps gate rows)."""
        lb, g = self.lb, self.lb.gate_bytes
        for dst, col in ((self.gate, 0), (self.up, g), (self.down, g + lb.up_bytes)):
            if dst.shape[1]:
                _put_rows(dst, slots, rec, col)

    def refs(self) -> tuple[TensorRef, TensorRef, TensorRef]:
        return row_refs(self.lb, self.gate, self.up, self.down)


@numba.njit(cache=True, nogil=True)
def _put_rows(dst, slots, rec, col):
    """dst[slots[k]] = rec[k, col:col + width], contiguous rows copied as such (numpy's
    fancy-index assignment, or numba's on strided views, cost a decode step 3%: measured)."""
    w = dst.shape[1]
    for k in range(len(slots)):
        d, s = dst[slots[k]], rec[k, col:col + w]
        for b in range(w):
            d[b] = s[b]


def row_refs(lb, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> tuple[TensorRef, TensorRef, TensorRef]:
    """Gate, up and transposed-down refs over layer lb's neuron rows (any row stride)."""
    gt, ut, _ = lb.types
    n = gate.shape[0]
    return (TensorRef(f"blk.{lb.layer}.ffn_gate.weight", gt, (n, lb.n_embd), gate, -1),
            TensorRef(f"blk.{lb.layer}.ffn_up.weight", ut, (n, lb.n_embd), up, -1),
            down_ref(lb, down))


def down_ref(lb, down: np.ndarray) -> TensorRef:
    """A transposed-down ref over layer lb's down rows (a row per neuron)."""
    return TensorRef(f"blk.{lb.layer}.ffn_down_t", lb.types[2], (down.shape[0], lb.n_embd), down, -1)
