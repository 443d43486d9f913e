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

Faults: the weights kept in memory are read into it at load, not used from the mapping
(a file truncated under a mapping kills the process with SIGBUS when a page is touched;
a read fails cleanly). Every record read is checked against its checksum; a bad one is
read again, then refused with a ModelFormatError, and the model stays usable.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np

from .. import kernels_cpu as K
from ..errors import FlashLMError, InvalidArgumentError, ModelFormatError
from ..formats.weights import WeightStore
from ..io import ALIGN, ReadEngine, aligned_empty
from ..io.checksum import record_sums as checksums
from ..io.probe import load_probe, pick_gap, pick_read_size
from ..stats import TokenStats
from .layout import FFN, read_plans, record_sums, split_records
from .plan import PREFILL_NEURONS
from .predictor import act, make_predictor, n_keep
from .settings import StreamSettings
from .tails import HotTails
from .window import NeuronWindow, down_ref, row_refs

# layers whose reads start ahead: measured on Gemma at half its FFN rows, 2 waited less but
# its buffers came out of the windows (fewer hits, more bytes) and tok/s did not rise
PREFETCH_LAYERS = 1
BLAS_ROWS = 16  # rows per BLAS call in a dense prefill's down product (_rows_matmul)


def _rows_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b in BLAS calls of BLAS_ROWS rows each (the last padded with zeros): every row
    is then computed alike in a prefill of any length. (One call for all the rows gave
    a row other sums in a prompt of 2 tokens than in one of 35, small-matrix kernels:
    a reused prefix then differed from a fresh prefill's. Measured as fast as one call.)"""
    T = a.shape[0]
    pad = -T % BLAS_ROWS
    if pad:
        a = np.concatenate([a, np.zeros((pad, a.shape[1]), dtype=a.dtype)])
    out = np.empty((T + pad, b.shape[1]), dtype=np.result_type(a, b))
    for r in range(0, T + pad, BLAS_ROWS):
        np.matmul(a[r:r + BLAS_ROWS], b, out=out[r:r + BLAS_ROWS])
    return out[:T]


class FlashStore(HotTails, WeightStore):
    """Non-FFN weights resident (copied in); FFN neuron records streamed on demand."""

    def __init__(self, model_file, settings: StreamSettings | None = None, resident: bool = False,
                 io_threads: int = 8, direct: bool = True):
        super().__init__(model_file)
        self.engine = None
        try:
            self._setup(model_file, settings, resident, io_threads, direct)
        except BaseException:
            self.close()
            raise

    def _setup(self, model_file, settings, resident, io_threads, direct):
        self.settings = settings or StreamSettings()
        self.resident = resident
        self.plans = read_plans(model_file)
        self._records = [model_file.tensors[f"blk.{lb.layer}.ffn_bundles"] for lb in self.plans]
        self._sums = [record_sums(model_file, lb.layer) for lb in self.plans]
        if not resident:
            self._copy_resident()
        s = self.settings
        self.predictor = make_predictor(s.predictor, self) if s.predictor else None
        self.set_capacities([min(lb.n_ff, s.capacity or lb.n_ff) for lb in self.plans])
        curve = load_probe()  # this disk's read curve, if `flashlm probe-disk` saved one
        self.engine = None if resident else ReadEngine(
            model_file.path, n_threads=io_threads, direct=direct, max_gap=pick_gap(curve, io_threads),
            max_read=pick_read_size(curve) if curve else 1 << 20, merge=s.bundled)
        self.t = 0  # decode tokens so far
        self.current = TokenStats()  # this pass's reads and hits (take_pass)

    def _copy_resident(self) -> None:
        """Read every tensor but the records into one buffer in memory (one, as the compiled
        decode step wants its weights), in place of their mapped views, the page cache's
        copy dropped after: no page of the mapping is touched."""
        records = {t.name for t in self._records}
        kept = [t for t in self.file.tensors.values() if t.name not in records]
        starts = np.cumsum([0] + [-(-t.nbytes // 64) * 64 for t in kept])  # 64-byte aligned, for SIMD
        arena = aligned_empty(int(starts[-1]))
        with open(self.file.path, "rb") as f:
            fd = f.fileno()
            for t, a in zip(kept, starts.tolist()):
                buf, got = arena[a:a + t.nbytes], 0
                while got < t.nbytes:
                    k = os.preadv(fd, [buf[got:]], t.offset + got)
                    if k <= 0:
                        raise ModelFormatError(f"{self.file.path}: truncated at tensor {t.name}; convert the model again")
                    got += k
                os.posix_fadvise(fd, t.offset, t.nbytes, os.POSIX_FADV_DONTNEED)
                self.file.tensors[t.name] = replace(t, data=buf.reshape(t.data.shape))

    # -- WeightStore interface ----------------------------------------------------------

    def has(self, name: str) -> bool:
        return super().has(name) or _ffn_layer(name) is not None

    def get(self, name: str):
        if _ffn_layer(name) is not None and name not in self.file.tensors:
            raise FlashLMError(f"{name} is streamed in the flash layout; use FlashStore.ffn_forward")
        return super().get(name)

    @property
    def resident_bytes(self) -> int:
        """Bytes of weights kept addressable: everything but the neuron records and the
        predictors' tensors (see predictor_bytes)."""
        skip = {t.name for t in self._records}
        for lb in self.plans:
            skip |= {f"blk.{lb.layer}.ffn_gate.weight", f"blk.{lb.layer}.ffn_gate_lr_a", f"blk.{lb.layer}.ffn_gate_lr_b"}
        return sum(t.nbytes for t in self.file.tensors.values() if t.name not in skip)

    @property
    def predictor_bytes(self) -> int:
        """Memory the predictor takes (the resident gate, or the low-rank factors)."""
        return self.predictor.nbytes if self.predictor is not None else 0

    def set_capacities(self, capacities: list[int]) -> None:
        """Neurons each layer's window may hold (a memory plan's); empties the windows.
        What one token needs beyond a window (all of it with window 0, where nothing
        stays between tokens) is read into a spill buffer that the layers share."""
        if any(c < 0 for c in capacities):
            raise InvalidArgumentError("a neuron window cannot hold fewer than 0 neurons")
        if self.settings.window == 0:
            capacities = [0] * len(capacities)
        with_gate = self.reads_gate
        self.windows = [NeuronWindow(lb, c, None, with_gate) for lb, c in zip(self.plans, capacities)]
        self._drain()
        self.tail_bufs, self._have, self._free, self._current = [], [], [], None
        if self.hot:  # the records past each hot window, read straight from the file into tail buffers
            spill = [0] * len(capacities)
            n_bufs = self.tail_buffers
            pages = self.spill_bytes(capacities) // n_bufs // ALIGN
            self.tail_bufs = [aligned_empty(pages * ALIGN, huge=True) for _ in range(n_bufs)]
            self._have = [np.zeros(pages, dtype=bool) for _ in range(n_bufs)]  # pages a buffer holds
            self._free = list(range(n_bufs))
            self.last_pages = []  # per layer, the pages of its tail its last token needed: at first, all
            for i, (lb, c) in enumerate(zip(self.plans, capacities)):
                tail = np.zeros(pages, dtype=bool)
                tail[:-(-(self._tail_start(i) % ALIGN + (lb.n_ff - c) * lb.bundle_bytes) // ALIGN)] = True
                self.last_pages.append(tail)
        else:
            spill = self.spill_capacities(capacities)
        pool = aligned_empty(max(c * self.held_bytes(lb) for lb, c in zip(self.plans, spill)))
        self.spills = [NeuronWindow(lb, c, pool, with_gate) for lb, c in zip(self.plans, spill)]

    def needs(self) -> list[int]:
        """Neurons one token takes in each layer."""
        s = self.settings
        return [n_keep(s.keep, lb.n_ff) if self.predictor is not None else lb.n_ff for lb in self.plans]

    def spill_capacities(self, capacities: list[int]) -> list[int]:
        """Neurons the spill buffer must take in each layer, for sliding windows of these
        capacities."""
        return [max(0, n - c) for n, c in zip(self.needs(), capacities)]

    @property
    def hot(self) -> bool:
        """Whether the windows hold hot neurons (StreamSettings.hot, with a window)."""
        return bool(self.settings.hot and self.settings.window)

    @property
    def tail_buffers(self) -> int:
        """Tail buffers of hot windows: the layer computing, and one per layer read ahead."""
        return 1 + (PREFETCH_LAYERS if self.settings.prefetch else 0)

    def spill_bytes(self, capacities: list[int]) -> int:
        """Bytes of the buffer for what one token reads beyond windows of these capacities
        (the layers take turns with it). Hot windows: a layer's whole tail of records,
        page-aligned at both ends, which reads land in straight from the file (one more
        for each layer prefetch reads ahead); sliding
        windows: the neurons a token needs beyond its window, in window rows."""
        if self.hot:  # with prefetch, one more per layer read ahead
            one = max(-(-((lb.n_ff - c) * lb.bundle_bytes) // ALIGN) * ALIGN + 2 * ALIGN if c < lb.n_ff else 0
                      for lb, c in zip(self.plans, capacities))
            return one * self.tail_buffers
        return max(c * self.held_bytes(lb) for lb, c in zip(self.plans, self.spill_capacities(capacities)))

    @property
    def reads_gate(self) -> bool:
        """Whether records' gate rows are streamed (not with the gate predictor, which
        holds the whole gate)."""
        return self.predictor is None or self.predictor.reads_gate

    def held_bytes(self, lb) -> int:
        """Bytes one neuron takes in layer lb's window."""
        return (lb.gate_bytes if self.reads_gate else 0) + lb.up_bytes + lb.down_bytes

    # -- the FFN ------------------------------------------------------------------------

    memory_only = False  # a self-draft's passes: the neurons held in memory only, nothing read (speculate.py)

    def ffn_forward(self, i: int, h: np.ndarray, gelu: bool) -> np.ndarray:
        """Layer i's FFN of h (T, n_embd) -> (T, n_embd)."""
        if self.memory_only and h.shape[0] == 1:
            return self._ffn_in_memory(i, np.ascontiguousarray(h[0], dtype=np.float32), gelu)
        if i == 0:
            self._begin_pass(h.shape[0])
        st = self.current
        if h.shape[0] > 1:
            return self._dense(i, h, gelu, st)
        x = np.ascontiguousarray(h[0], dtype=np.float32)
        lb, win = self.plans[i], self.windows[i]
        needed, g = self._select(i, x, gelu)
        t1 = time.perf_counter()
        if self.hot:
            return self._ffn_hot(i, x[None], [(needed, g)], gelu, t1)
        slots, missed = win.place(needed, self.t, self.settings.window)
        kept = slots >= 0
        st.neurons_needed += len(needed)
        st.neuron_hits += len(needed) - int(missed.sum())
        st.bookkeeping_s += time.perf_counter() - t1
        load = missed & kept
        self._load(win, needed[load], slots[load])
        out = np.zeros(lb.n_embd, dtype=np.float32)
        if not kept.all():  # beyond the window: read for this token only
            t3 = time.perf_counter()
            sp, spill = self.spills[i], needed[~kept]
            rows = sp.hold(spill, clear=True)
            st.bookkeeping_s += time.perf_counter() - t3
            self._load(sp, spill, rows)
            coef = np.empty(len(needed), dtype=np.float32)
            coef[~kept] = self._coef(sp.refs(), x, rows, None if g is None else g[~kept], gelu)
            coef[kept] = self._coef(win.refs(), x, slots[kept], None if g is None else g[kept], gelu)
            # the down products in one call over the needed rows in order, as with no spill: the
            # sum must not depend on what the window held (a reused model computes as a fresh one)
            down = np.empty((len(needed), lb.down_bytes), dtype=np.uint8)
            down[~kept], down[kept] = sp.down[rows], win.down[slots[kept]]
            K.matvec_t(coef, down_ref(lb, down), np.arange(len(needed)), out)
            return out.reshape(1, -1)
        self._ffn_rows(win.refs(), x, slots, g, gelu, out, st)
        return out.reshape(1, -1)

    def ffn_rows(self, i: int, h: np.ndarray, gelu: bool) -> np.ndarray:
        """Layer i's FFN of T tokens decoded in one pass (a speculative verification's):
        row t is what ffn_forward gives token t alone, from its own predicted neurons,
        and the union of their records is read once. Sliding windows (hot=False), whose
        spill buffer takes one token's neurons, run the rows one by one."""
        if h.shape[0] == 1 or not self.hot:
            return np.concatenate([self.ffn_forward(i, h[t:t + 1], gelu) for t in range(h.shape[0])])
        if i == 0:
            self.t += h.shape[0]
        xs = np.ascontiguousarray(h, dtype=np.float32)
        sel = [self._select(i, x, gelu) for x in xs]
        return self._ffn_hot(i, xs, sel, gelu, time.perf_counter())

    def _ffn_in_memory(self, i: int, x: np.ndarray, gelu: bool) -> np.ndarray:
        """A self-draft's FFN of one token: its predicted neurons that layer i's window
        holds (a hot window's first neurons, or a sliding window's rows), the others
        skipped. Nothing is read, and the window does not change."""
        win = self.windows[i]
        needed, g = self._select(i, x, gelu)
        if self.hot:
            rows = needed[:int(np.searchsorted(needed, win.n))]  # hot windows fill in order: row = neuron
            keep = slice(0, len(rows))
        else:
            slots = win.slot_of[needed]
            keep = slots >= 0
            rows = slots[keep]
        out = np.zeros((1, self.plans[i].n_embd), dtype=np.float32)
        if len(rows):
            self._ffn_rows(win.refs(), x, rows, None if g is None else g[keep], gelu, out[0], self.current)
        return out

    def _select(self, i: int, x: np.ndarray, gelu: bool) -> tuple:
        """The neurons token x needs in layer i (sorted ids), and their exact gate values
        where the predictor computed them (else None)."""
        if self.predictor is None:
            return np.arange(self.plans[i].n_ff), None
        return self.predictor.select(i, x, self.settings.keep, gelu)

    def _ffn_hot(self, i: int, xs: np.ndarray, sel: list, gelu: bool, t1: float) -> np.ndarray:
        """The FFN of tokens xs (T, n_embd), token t needing sel[t] = (neurons, gate values
        or None), with a hot window: the neurons below its capacity are held (the first
        use reads them, in one large read, for good); the rest, the union of the
        tokens', are read straight from the file into the tail buffer once and
        multiplied where they landed. Each token's down products are one sum over its
        needed rows in neuron order, held or not (kernels_cpu.matvec_t_split): its row
        depends neither on the capacity (so neither on the budget nor on the plan's
        measurements) nor on the tokens beside it."""
        st, lb, win = self.current, self.plans[i], self.windows[i]
        first = win.cap and win.cache.key_in[-1] < 0  # not full (hot windows fill in order)
        if first:  # first use (or one that failed): read now, in prefill-sized chunks (bounded buffers)
            for c0 in range(win.n, win.cap, PREFILL_NEURONS):
                ids = np.arange(c0, min(win.cap, c0 + PREFILL_NEURONS))
                self._load(win, ids, win.hold(ids))
        union = sel[0][0] if len(sel) == 1 else np.unique(np.concatenate([n for n, _ in sel]))
        cut = int(np.searchsorted(union, win.cap))
        st.neurons_needed += len(union)
        st.neuron_hits += 0 if first else cut
        st.bookkeeping_s += time.perf_counter() - t1
        out = np.zeros((len(sel), lb.n_embd), dtype=np.float32)
        held = win.refs()
        if win.cap == lb.n_ff:  # every neuron held: row = neuron
            for x, (needed, g), o in zip(xs, sel, out):
                self._ffn_rows(held, x, needed, g, gelu, o, st)
            return out
        tail = self._read_tail(i, union[cut:])  # also with none needed: it starts the next layer's reads
        for x, (needed, g), o in zip(xs, sel, out):
            c = int(np.searchsorted(needed, win.cap))
            coef = np.empty(len(needed), dtype=np.float32)
            if c:
                coef[:c] = self._coef(held, x, needed[:c], None if g is None else g[:c], gelu)
            if c < len(needed):
                coef[c:] = self._coef(tail, x, needed[c:] - win.cap, None if g is None else g[c:], gelu)
            K.matvec_t_split(coef, held[2].data, tail[2].data, win.cap, int(lb.types[2]), needed, o)
        return out

    def _ffn_rows(self, refs, x, rows, g, gelu: bool, out: np.ndarray, st: TokenStats) -> None:
        """out += the FFN's part from rows `rows` of refs (gate, up, down_t), given their
        gate values g (None: computed here from the gate rows)."""
        K.matvec_t(self._coef(refs, x, rows, g, gelu), refs[2], rows, out)

    @staticmethod
    def _coef(refs, x, rows, g, gelu: bool) -> np.ndarray:
        """act(gate x) * (up x) of rows `rows` of refs, given their gate values g (None:
        computed here from the gate rows)."""
        gate, up, _ = refs
        if g is None:  # the predictor gave no gate values: compute them from the streamed rows
            g = K.matvec(x, gate, rows)
        return act(g, gelu) * K.matvec(x, up, rows)

    def _load(self, win: NeuronWindow, neurons: np.ndarray, s: np.ndarray) -> None:
        """Read `neurons`' records into rows s of window win (a layer's window or spill
        buffer). If the read fails, the window forgets them (no row is trusted half-read)."""
        try:
            self._fill(win, neurons, s)
        except BaseException:
            for j in neurons.tolist():
                win.cache.forget(j)
            raise

    def _fill(self, win: NeuronWindow, neurons: np.ndarray, s: np.ndarray) -> None:
        st, lb, read_gate = self.current, win.lb, self.reads_gate
        i = lb.layer
        t0, io0, v0 = time.perf_counter(), st.io_wait_s, st.verify_s
        base, stride = self._records[i].offset, lb.bundle_bytes
        rec = None
        if self.resident:
            rec = np.ascontiguousarray(self._records[i].data[neurons])
        elif not self.settings.bundled:  # each neuron's rows read on their own (the ablation's "no bundling")
            gb, ub, db = lb.gate_bytes, lb.up_bytes, lb.down_bytes
            ranges, outs = [], []
            for k, j in enumerate(neurons.tolist()):
                off = base + j * stride
                if read_gate:
                    ranges.append((off, gb))
                    outs.append(win.gate[s[k]])
                ranges += [(off + gb, ub), (off + gb + ub, db)]
                outs += [win.up[s[k]], win.down[s[k]]]
            self._read(ranges, outs, st)
        elif len(neurons):  # whole records, one range per run of consecutive neurons
            cuts = np.flatnonzero(np.diff(neurons) != 1) + 1
            starts, ends = np.r_[0, cuts], np.r_[cuts, len(neurons)]
            rec = np.empty((len(neurons), stride), dtype=np.uint8)
            self._read([(base + int(neurons[a]) * stride, int(b - a) * stride) for a, b in zip(starts, ends)],
                       [rec[a:b].reshape(-1) for a, b in zip(starts, ends)], st)
            self._verify(i, neurons, rec, st)
        if rec is not None:
            win.put(s, rec)
        st.bookkeeping_s += time.perf_counter() - t0 - (st.io_wait_s - io0) - (st.verify_s - v0)  # the rest

    def _verify(self, i: int, neurons: np.ndarray, recs: np.ndarray, st: TokenStats, rows=None) -> None:
        """Check layer i's records of `neurons`, rows `rows` (all if None) of recs, against
        their checksums; read the bad ones again, and if still bad, ModelFormatError.
        (StreamSettings.verify False: skipped.)"""
        if not self.settings.verify:
            return
        t0 = time.perf_counter()
        bad = np.flatnonzero(checksums(recs, rows) != self._sums[i][neurons])
        st.verify_s += time.perf_counter() - t0
        if not len(bad):
            return
        lb, base = self.plans[i], self._records[i].offset
        at = bad if rows is None else np.asarray(rows)[bad]
        self._read([(base + int(neurons[k]) * lb.bundle_bytes, lb.bundle_bytes) for k in bad],
                   [recs[r] for r in at], st)
        still = np.flatnonzero(checksums(recs, at) != self._sums[i][neurons[bad]])
        if len(still):
            j = int(neurons[bad[still[0]]])
            raise ModelFormatError(f"{self.file.path}: layer {i}'s record of neuron {j} fails its checksum, also when "
                                   f"read again ({len(still)} bad); the file is damaged or changed: convert the model again")

    def _read(self, ranges: list, outs: list, st: TokenStats) -> None:
        """Read ranges into outs with the engine, adding to st's I/O figures."""
        if not ranges:
            return
        e = self.engine.stats
        before = e.bytes_read, e.reads
        t0 = time.perf_counter()
        self.engine.read_ranges(ranges, outs)
        st.io_wait_s += time.perf_counter() - t0
        st.bytes_requested += sum(n for _, n in ranges)
        st.bytes_read += e.bytes_read - before[0]
        st.reads += e.reads - before[1]

    def _dense(self, i: int, h: np.ndarray, gelu: bool, st: TokenStats) -> np.ndarray:
        """Every neuron, for several tokens (prefill): the records are read in chunks of
        PREFILL_NEURONS and each chunk's FFN part added up (bounded buffers)."""
        lb = self.plans[i]
        out = np.zeros((h.shape[0], lb.n_embd), dtype=np.float32)
        for c0 in range(0, lb.n_ff, PREFILL_NEURONS):
            n = min(PREFILL_NEURONS, lb.n_ff - c0)
            if self.resident:
                rec = self._records[i].data[c0:c0 + n]
            else:
                rec = np.empty((n, lb.bundle_bytes), dtype=np.uint8)
                self._read([(self._records[i].offset + c0 * lb.bundle_bytes, rec.nbytes)], [rec.reshape(-1)], st)
                self._verify(i, np.arange(c0, c0 + n), rec, st)
            t1 = time.perf_counter()
            gate, up, down = (np.ascontiguousarray(a) for a in split_records(lb, rec))
            gate, up, down_t = row_refs(lb, gate, up, down)
            down_t = K.dequantize(down_t)
            st.bookkeeping_s += time.perf_counter() - t1
            g, u = K.linear_many(h, [gate, up])
            out += _rows_matmul(K.glu(g, u, gelu), down_t)
        st.neurons_needed += lb.n_ff * h.shape[0]
        return out

    def _begin_pass(self, n_tokens: int) -> None:
        if n_tokens == 1:
            self.t += 1

    def describe(self) -> str:
        """What streams, and how (for `flashlm info`)."""
        s = self.settings
        return (f"flash; FFN neurons streamed ({sum(lb.n_ff for lb in self.plans):,} records), predictor "
                f"{s.predictor or 'none'}, keep {s.keep if s.predictor else 1.0}, window {s.window}")

    def take_pass(self) -> TokenStats:
        """What the store read and held since the last call (the model's last pass)."""
        out, self.current = self.current, TokenStats()
        return out

    def close(self):
        self._drain()
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        super().close()


def _ffn_layer(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in FFN and parts[3] == "weight":
        return int(parts[1])
    return None
