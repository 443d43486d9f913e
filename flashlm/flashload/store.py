"""FlashStore: a WeightStore over a flash-layout file, with the FFN neurons streamed.

Everything but the FFNs is used from the mapped file, as in the resident store. A
layer's FFN runs in `ffn_forward`:

- prefill (several tokens): every neuron's record is read and the FFN runs dense;
- decode (one token): a predictor (predictor.py) picks the neurons the token needs,
  the layer's `NeuronWindow` reads the records it does not hold yet, and the kernels
  multiply only the chosen rows: gate and up rows, then the down rows weighted by
  act(gate) * up.

`resident=True` takes the records from the mapped file instead of reading them: the
same computation with nothing streamed, the reference the streamed runs must equal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .. import kernels_cpu as K
from ..errors import FlashLMError, InvalidArgumentError
from ..runtime.modelfile import TensorRef
from ..runtime.weights import WeightStore
from .io import ReadEngine
from .layout import FFN, read_plans
from .predictor import PREDICTORS, act, make_predictor


@dataclass
class TokenStats:
    """One forward pass's FFN streaming, summed over layers."""

    tokens: int = 0  # tokens in the pass (1 when decoding)
    needed: int = 0  # neurons the predictor chose
    hits: int = 0  # of those, already in the window
    bytes_requested: int = 0  # bytes of the records' parts asked for
    bytes_read: int = 0  # bytes the engine read (aligned, gaps of coalesced reads included)
    reads: int = 0
    io_s: float = 0.0
    bookkeeping_s: float = 0.0  # window updates, range lists, copies into the cache
    compute_s: float = 0.0  # predictor and the FFN products

    @property
    def hit_rate(self) -> float:
        return self.hits / self.needed if self.needed else 0.0

    @property
    def mean_read(self) -> float:
        return self.bytes_read / self.reads if self.reads else 0.0


class NeuronWindow:
    """One layer's neurons in DRAM: preallocated gate/up/down row matrices with a slot
    per neuron held, as in the paper. Neurons used in the last `window` tokens stay;
    older ones are deleted by moving the last rows into their slots; new ones are
    appended. window 0 keeps nothing between tokens (every token reads what it needs)."""

    def __init__(self, lb, capacity: int):
        self.lb, self.cap = lb, capacity
        self.gate = np.empty((capacity, lb.gate_bytes), dtype=np.uint8)
        self.up = np.empty((capacity, lb.up_bytes), dtype=np.uint8)
        self.down = np.empty((capacity, lb.down_bytes), dtype=np.uint8)
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

    def make_room(self, needed: np.ndarray, t: int, window: int) -> np.ndarray:
        """Mark needed neurons used at token t, drop those out of the window, and
        return the needed neurons not held (to be appended)."""
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
            if len(spare) < over:
                raise FlashLMError(f"layer {self.lb.layer}'s neuron window ({self.cap}) cannot hold the "
                                   f"{len(needed)} neurons one token needs; raise the memory budget")
            self._delete(spare[np.argsort(self.last[spare], kind="stable")[:over]])
        return missing

    def append(self, neurons: np.ndarray, t: int) -> slice:
        s = slice(self.n, self.n + len(neurons))
        self.ids[s] = neurons
        self.last[s] = t
        self.slot_of[neurons] = np.arange(s.start, s.stop)
        self.n = s.stop
        return s

    def refs(self) -> tuple[TensorRef, TensorRef, TensorRef]:
        lb = self.lb
        gt, ut, dt = lb.types
        return (TensorRef(f"blk.{lb.layer}.ffn_gate.weight", gt, (self.cap, lb.n_embd), self.gate, -1),
                TensorRef(f"blk.{lb.layer}.ffn_up.weight", ut, (self.cap, lb.n_embd), self.up, -1),
                TensorRef(f"blk.{lb.layer}.ffn_down_t", dt, (self.cap, lb.n_embd), self.down, -1))


@dataclass
class StreamSettings:
    """How a FlashStore streams (the ablation's switches).

    predictor: None (every neuron), "gate" or "lowrank" (predictor.py)
    keep:      fraction of each layer's neurons a token keeps (with a predictor)
    window:    tokens whose neurons stay in DRAM (0: none)
    bundled:   one read per neuron record; False reads gate, up and down rows
               separately (the paper's "no bundling" step)
    capacity:  neurons per layer the window may hold (None: all)
    """

    predictor: str | None = "gate"
    keep: float = 0.5
    window: int = 4
    bundled: bool = True
    capacity: int | None = None

    def __post_init__(self):
        if self.predictor not in (None, *PREDICTORS):
            raise InvalidArgumentError(f"unknown predictor {self.predictor!r}; choose from {', '.join(PREDICTORS)}")
        if not 0.0 < self.keep <= 1.0:
            raise InvalidArgumentError(f"keep must be in (0, 1], got {self.keep}")
        if self.window < 0:
            raise InvalidArgumentError(f"window must be >= 0, got {self.window}")


class FlashStore(WeightStore):
    """Non-FFN weights resident (mapped); FFN neuron records streamed on demand."""

    fusable = False  # the FFN weights are not all addressable: run layer by layer

    def __init__(self, model_file, settings: StreamSettings | None = None, resident: bool = False,
                 io_threads: int = 8, direct: bool = True):
        super().__init__(model_file)
        self.settings = settings or StreamSettings()
        self.resident = resident
        self.plans = read_plans(model_file)
        self._records = [model_file.tensors[f"blk.{lb.layer}.ffn_bundles"] for lb in self.plans]
        s = self.settings
        self.engine = None if resident else ReadEngine(model_file.path, n_threads=io_threads, direct=direct,
                                                       max_gap=64 * 1024 if s.bundled else -1)
        self.windows = [NeuronWindow(lb, min(lb.n_ff, s.capacity or lb.n_ff)) for lb in self.plans]
        self.predictor = make_predictor(s.predictor, self) if s.predictor else None
        self.t = 0  # decode tokens so far
        self.current = TokenStats()
        self.history: list[TokenStats] = []  # one entry per forward pass

    # -- WeightStore interface ----------------------------------------------------------

    def has(self, name: str) -> bool:
        return super().has(name) or _ffn_layer(name) is not None

    def get(self, name: str):
        if _ffn_layer(name) is not None and name not in self.file.tensors:
            raise FlashLMError(f"{name} is streamed in the flash layout; use FlashStore.ffn_forward")
        return super().get(name)

    @property
    def resident_bytes(self) -> int:
        """Bytes of weights kept addressable: everything but the neuron records (and the
        predictor tensors a run does not use)."""
        skip = {t.name for t in self._records}
        for lb in self.plans:
            if self.settings.predictor != "gate":
                skip.add(f"blk.{lb.layer}.ffn_gate.weight")
            if self.settings.predictor != "lowrank":
                skip |= {f"blk.{lb.layer}.ffn_gate_lr_a", f"blk.{lb.layer}.ffn_gate_lr_b"}
        return sum(t.nbytes for t in self.file.tensors.values() if t.name not in skip)

    # -- the FFN ------------------------------------------------------------------------

    def ffn_forward(self, i: int, h: np.ndarray, gelu: bool) -> np.ndarray:
        """Layer i's FFN of h (T, n_embd) -> (T, n_embd)."""
        if i == 0:
            self._begin_pass(h.shape[0])
        st = self.current
        if h.shape[0] > 1:
            return self._dense(i, h, gelu, st)
        t0 = time.perf_counter()
        x = np.ascontiguousarray(h[0], dtype=np.float32)
        lb, win = self.plans[i], self.windows[i]
        if self.predictor is None or self.settings.keep >= 1.0:
            needed, g = np.arange(lb.n_ff), None
        else:
            needed, g = self.predictor.select(i, x, self.settings.keep, gelu)  # sorted ids; exact gate or None
        t1 = time.perf_counter()
        st.compute_s += t1 - t0
        missing = win.make_room(needed, self.t, self.settings.window)
        st.needed += len(needed)
        st.hits += len(needed) - len(missing)
        self._load(i, missing, read_gate=g is None)
        rows = win.slot_of[needed]
        t2 = time.perf_counter()
        gate, up, down = win.refs()
        if g is None:
            g = K.matvec(x, gate, rows)
        coef = act(g, gelu) * K.matvec(x, up, rows)
        out = np.zeros(lb.n_embd, dtype=np.float32)
        K.matvec_t(coef, down, rows, out)
        st.compute_s += time.perf_counter() - t2
        return out.reshape(1, -1)

    def _load(self, i: int, neurons: np.ndarray, read_gate: bool) -> None:
        """Append `neurons` to layer i's window, reading their records."""
        st, win, lb = self.current, self.windows[i], self.plans[i]
        t0 = time.perf_counter()
        s = win.append(neurons, self.t)
        gb, ub, db = lb.gate_bytes, lb.up_bytes, lb.down_bytes
        if self.resident:
            rec = self._records[i].data[neurons]
            if read_gate:
                win.gate[s] = rec[:, :gb]
            win.up[s] = rec[:, gb:gb + ub]
            win.down[s] = rec[:, gb + ub:]
            st.bookkeeping_s += time.perf_counter() - t0
            return
        base, stride = self._records[i].offset, lb.bundle_bytes
        ranges, outs = [], []
        for k, j in enumerate(neurons.tolist()):
            off = base + j * stride
            if read_gate:
                ranges.append((off, gb))
                outs.append(win.gate[s.start + k])
            ranges += [(off + gb, ub), (off + gb + ub, db)]
            outs += [win.up[s.start + k], win.down[s.start + k]]
        t1 = time.perf_counter()
        e = self.engine.stats
        before = e.bytes_read, e.reads
        if ranges:
            self.engine.read_ranges(ranges, outs)
        t2 = time.perf_counter()
        st.bytes_requested += sum(n for _, n in ranges)
        st.bytes_read += e.bytes_read - before[0]
        st.reads += e.reads - before[1]
        st.io_s += t2 - t1
        st.bookkeeping_s += t1 - t0

    def _dense(self, i: int, h: np.ndarray, gelu: bool, st: TokenStats) -> np.ndarray:
        """Every neuron, for several tokens (prefill): records read whole, FFN dense."""
        lb = self.plans[i]
        t0 = time.perf_counter()
        if self.resident:
            rec = self._records[i].data
        else:
            rec = np.empty((lb.n_ff, lb.bundle_bytes), dtype=np.uint8)
            e = self.engine.stats
            before = e.bytes_read, e.reads
            self.engine.read_ranges([(self._records[i].offset, rec.nbytes)], [rec.reshape(-1)])
            st.bytes_requested += rec.nbytes
            st.bytes_read += e.bytes_read - before[0]
            st.reads += e.reads - before[1]
        t1 = time.perf_counter()
        st.io_s += t1 - t0
        gb, ub = lb.gate_bytes, lb.up_bytes
        gt, ut, dt = lb.types
        gate = TensorRef("gate", gt, (lb.n_ff, lb.n_embd), np.ascontiguousarray(rec[:, :gb]), -1)
        up = TensorRef("up", ut, (lb.n_ff, lb.n_embd), np.ascontiguousarray(rec[:, gb:gb + ub]), -1)
        down_t = K.dequantize(TensorRef("down_t", dt, (lb.n_ff, lb.n_embd), np.ascontiguousarray(rec[:, gb + ub:]), -1))
        t2 = time.perf_counter()
        st.bookkeeping_s += t2 - t1
        st.needed += lb.n_ff * h.shape[0]
        g, u = K.linear_many(h, [gate, up])
        out = K.glu(g, u, gelu) @ down_t
        st.compute_s += time.perf_counter() - t2
        return out

    def _begin_pass(self, n_tokens: int) -> None:
        if self.current.tokens:
            self.history.append(self.current)
        if n_tokens == 1:
            self.t += 1
        self.current = TokenStats(tokens=n_tokens)

    def take_stats(self) -> list[TokenStats]:
        """The finished passes' statistics (and the current one), and start afresh."""
        out = self.history + ([self.current] if self.current.tokens else [])
        self.history, self.current = [], TokenStats()
        return out

    def close(self):
        if self.engine is not None:
            self.engine.close()
        super().close()


def _ffn_layer(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in FFN and parts[3] == "weight":
        return int(parts[1])
    return None
