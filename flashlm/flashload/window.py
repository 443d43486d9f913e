"""NeuronWindow: one layer's FFN neurons held in DRAM, a row per neuron, as "LLM in a flash"
keeps the neurons of the last few tokens."""

from __future__ import annotations

import numpy as np

from ..formats.modelfile import TensorRef
from ..io import aligned_empty


class NeuronWindow:
    """One layer's neurons in DRAM: preallocated gate/up/down row matrices with a slot
    per neuron held, as in the paper. Neurons used in the last `window` tokens stay;
    older ones are deleted by moving the last rows into their slots; new ones are
    appended. window 0 keeps nothing between tokens (every token reads what it needs).
    Neurons a full window cannot take spill: the store reads them for this token only."""

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
        self.ids = np.empty(capacity, dtype=np.int64)
        self.last = np.empty(capacity, dtype=np.int64)
        self.slot_of = np.full(lb.n_ff, -1, dtype=np.int64)
        self.n = 0

    def _delete(self, slots: np.ndarray) -> None:
        """Remove `slots`, filling the holes below the new end with the last rows."""
        if not len(slots):
            return
        n_new = self.n - len(slots)
        self.slot_of[self.ids[slots]] = -1
        gone = np.zeros(self.n, dtype=bool)
        gone[slots] = True
        holes = np.flatnonzero(gone[:n_new])
        movers = n_new + np.flatnonzero(~gone[n_new:])
        for a in (self.gate, self.up, self.down, self.ids, self.last):
            a[holes] = a[movers]
        self.slot_of[self.ids[holes]] = holes
        self.n = n_new

    def make_room(self, needed: np.ndarray, t: int, window: int) -> tuple[np.ndarray, np.ndarray]:
        """Mark needed neurons used at token t, drop those out of the window, and return
        the needed neurons not held: those there is room for (to be appended), and those
        there is not (a window smaller than one token's needs; read for this token only)."""
        held = self.slot_of[needed]
        self.last[held[held >= 0]] = t
        if window <= 0:
            self._delete(np.arange(self.n))
        else:
            self._delete(np.flatnonzero(self.last[:self.n] <= t - window))
        missing = needed[self.slot_of[needed] < 0]
        over = self.n + len(missing) - self.cap
        if over > 0:  # full: the least recently used neurons that this token does not need
            spare = np.flatnonzero(self.last[:self.n] < t)
            self._delete(spare[np.argsort(self.last[spare], kind="stable")[:over]])
        room = self.cap - self.n
        return missing[:room], missing[room:]

    def clear(self) -> None:
        """Hold nothing."""
        self.slot_of[self.ids[:self.n]] = -1
        self.n = 0

    def append(self, neurons: np.ndarray, t: int) -> slice:
        s = slice(self.n, self.n + len(neurons))
        self.ids[s] = neurons
        self.last[s] = t
        self.slot_of[neurons] = np.arange(s.start, s.stop)
        self.n = s.stop
        return s

    def refs(self) -> tuple[TensorRef, TensorRef, TensorRef]:
        return row_refs(self.lb, self.gate, self.up, self.down)


def row_refs(lb, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> tuple[TensorRef, TensorRef, TensorRef]:
    """Gate, up and transposed-down refs over layer lb's neuron rows (any row stride)."""
    gt, ut, dt = lb.types
    n = gate.shape[0]
    return (TensorRef(f"blk.{lb.layer}.ffn_gate.weight", gt, (n, lb.n_embd), gate, -1),
            TensorRef(f"blk.{lb.layer}.ffn_up.weight", ut, (n, lb.n_embd), up, -1),
            TensorRef(f"blk.{lb.layer}.ffn_down_t", dt, (n, lb.n_embd), down, -1))
