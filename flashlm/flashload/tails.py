"""Reading the records past a hot window: each layer's window holds its first (most often
needed) neurons for good, and a token reads the ones it needs past them straight from
the file into a tail buffer, page-aligned spans of them, the next layer's start (with
prefetch) while this one computes. A mixin of FlashStore (store.py), whose state it uses:
plans, windows, _records, engine, tail_bufs, _have, _free, _current, _pending,
last_pages, current (the pass's TokenStats)."""

from __future__ import annotations

import time
from concurrent.futures import wait

import numpy as np

from ..io import ALIGN
from ..stats import TokenStats
from .layout import split_records
from .window import row_refs


class HotTails:
    def _read_tail(self, i: int, cold: np.ndarray) -> tuple:
        """Gate, up and down refs over layer i's records past its hot window (row k:
        neuron cap + k), with the records of `cold` (sorted ids, all >= cap) read in:
        spans of them closer than the engine's merge gap, widened to whole pages, each
        read straight into its place in a tail buffer. With prefetch, the reads of the
        next PREFETCH_LAYERS layers' tails start now, each into a buffer of its own: the
        pages their last token needed, which (a layer's needs changing little from token
        to token) are mostly the ones the next token needs; what they miss is read when
        it is known."""
        st, lb, cap = self.current, self.plans[i], self.windows[i].cap
        t0 = time.perf_counter()
        stride, n_tail = lb.bundle_bytes, lb.n_ff - cap
        if self.resident:
            recs = self._records[i].data[cap:]
        else:
            page0 = self._tail_page0(i)
            if self._current is not None:  # the last layer's buffer: its products are done
                self._free.append(self._current)
                self._current = None
            k, pf = self._pending.pop(i, (None, []))
            if k is None:
                k = self._free.pop()
                self._have[k][:] = False
            self._current = k
            buf = self.tail_bufs[k]
            start = self._tail_start(i)
            recs = buf[start - page0:start - page0 + n_tail * stride].reshape(n_tail, stride)
            e = self.engine
            want = np.zeros(len(self._have[k]) + 1, dtype=np.int32)
            if len(cold):
                cuts = np.flatnonzero((np.diff(cold) - 1) * stride > e.max_gap) + 1
                pa = (start + (cold[np.r_[0, cuts]] - cap) * stride) // ALIGN - page0 // ALIGN  # spans, in pages
                pb = -(-(start + (cold[np.r_[cuts - 1, len(cold) - 1]] - cap + 1) * stride) // ALIGN) - page0 // ALIGN
                np.add.at(want, pa, 1)
                np.add.at(want, pb, -1)
            want = np.cumsum(want[:-1]) > 0
            self.last_pages[i] = want
            futs = self._submit(i, want & ~self._have[k], k, st)  # what a prefetch did not bring
            for d in range(1, len(self.tail_bufs)):  # the next layers' reads, into the free buffers
                j = (i + d) % len(self.plans)
                if j != i and j not in self._pending and self._free and self.windows[j].cap < self.plans[j].n_ff:
                    kk = self._free.pop()
                    self._have[kk][:] = False
                    try:
                        self._pending[j] = (kk, self._submit(j, self.last_pages[j], kk, st))
                    except BaseException:
                        self._free.append(kk)
                        raise
            st.bookkeeping_s += time.perf_counter() - t0
            try:
                self._wait(futs + pf, st)
            except BaseException:  # every read into buffer k has ended (see _wait); none can be trusted
                self._have[k][:] = False
                raise
            st.bytes_requested += len(cold) * stride
            if len(cold):
                self._verify(i, cold, recs, st, rows=cold - cap)
        return row_refs(lb, *split_records(lb, recs))

    def _tail_start(self, i: int) -> int:
        """The file offset of layer i's first record past its window."""
        return self._records[i].offset + self.windows[i].cap * self.plans[i].bundle_bytes

    def _tail_page0(self, i: int) -> int:
        """The file offset of the page where layer i's tail begins (its buffer's byte 0)."""
        return self._tail_start(i) // ALIGN * ALIGN

    def _submit(self, i: int, pages: np.ndarray, k: int, st: TokenStats) -> list:
        """Start reading the pages marked in `pages` of layer i's tail into tail buffer k,
        a range per run of pages (the engine reads large ones in pieces); their futures."""
        if not pages.any():
            return []
        e, page0, buf = self.engine, self._tail_page0(i), self.tail_bufs[k]
        edges = np.flatnonzero(np.diff(np.r_[0, pages.view(np.int8), 0]))
        ranges, outs = [], []
        for a, b in zip(edges[::2].tolist(), edges[1::2].tolist()):
            s0, s1 = page0 + a * ALIGN, min(page0 + b * ALIGN, e.size)
            ranges.append((s0, s1 - s0))
            outs.append(buf[a * ALIGN:a * ALIGN + s1 - s0])
        self._have[k] |= pages
        before = e.stats.bytes_read, e.stats.reads
        futs = e.submit(ranges, outs)
        st.bytes_read += e.stats.bytes_read - before[0]
        st.reads += e.stats.reads - before[1]
        return futs

    def _wait(self, futs: list, st: TokenStats) -> None:
        """Wait for every one of futs (so no read still lands in a buffer), then raise the
        first error, if any."""
        t0 = time.perf_counter()
        futs = set(futs)
        wait(futs)
        st.io_wait_s += time.perf_counter() - t0
        for f in futs:
            f.result()

    def _drain(self) -> None:
        """Wait for the prefetches in flight (before their buffers are dropped or the engine closed)."""
        pending, self._pending = getattr(self, "_pending", {}), {}
        wait({f for _, futs in pending.values() for f in futs})
