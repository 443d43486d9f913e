"""Experts streamed from the file into a byte-budgeted cache, with prefetch.

Expert e of layer N is one contiguous byte range in each of blk.N.ffn_{gate,up,down}_exps.
The first streamed run writes the experts' bundle (bundle.py: each expert's three slices
in one 4 KiB-aligned record), and a miss is then one direct read of its record straight
into its cache slot, all of a layer's misses in parallel. (Where the bundle cannot be
written, a miss reads the three ranges from the GGUF through the shared I/O engine.)

Reads from the bundle are Linux native asynchronous direct reads (flashlm/io/aio.py,
NativeAIO). A layer's misses are one submission, and `locate(..., wait=False)` returns
at once so the caller computes the cached experts while they are read (`finish_misses`
waits). `prefetch(layer, ids)` queues the next layer's predicted experts; their reads
start once the current layer's misses are in (sharing the disk with them made the misses
slower), and the kernel fills their slots with no thread of ours to wake; a slot stays
pinned until its read is done, and `locate` waits only for the ones it needs.
Where native AIO is unavailable, prefetch is posix_fadvise(WILLNEED) hints copied into
the slots when needed, or reads on the engine's threads. Whichever reads it, a bundle
record is checked against its checksum before its expert is used (reads.py; `verify =
False` turns that off, to measure what it costs).

Statistics per layer: hits, misses, bytes read; for prefetch, the experts predicted and
how many the router then chose (precision and recall); the seconds the decode waited for
expert reads, and (thread prefetch) the read time it did not wait for; how often cached
experts computed while misses were read.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from ..cache import SlotCache
from ..io import NativeAIO, ReadEngine
from ..formats.modelfile import TensorRef, readonly
from ..stats import TokenStats
from .autoprefetch import AutoPrefetch
from .bundle import ensure_bundle, map_resident_only, part_sizes, read_checksums, record_bytes
from .moe import PARTS, part_layout
from .reads import ExpertReads


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    predicted: int = 0  # experts prefetched for this layer
    predicted_used: int = 0  # of those, chosen by the router
    chosen: int = 0  # experts the router chose (with a prediction made)
    overlapped: int = 0  # locates whose misses were read while the cached experts computed

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


class StreamedExperts(ExpertReads):
    """An ExpertSource (see moe.py) that reads experts on demand into a SlotCache."""

    def __init__(self, model_file, cfg, n_slots: int, policy: str = "lru", prefetch: bool | str = True,
                 io_threads: int = 8, direct: bool = True, bundle: bool = True):
        """prefetch: True, False, or "auto" (on or off, whichever decodes faster here, as
        measured while decoding: autoprefetch.py)."""
        self.cfg = cfg
        self.stacks = [[model_file.tensors[f"blk.{i}.{p}.weight"] for p in PARTS] for i in range(cfg.n_layer)]
        self.part_bytes = part_sizes(model_file, cfg)
        self._layout = part_layout(self.stacks[0])  # every layer's experts are alike (as the cache's slots)
        self.bundle = None  # the bundle file (bundle.py): one aligned read per expert, straight into its slot
        if bundle:
            try:
                self.bundle = ensure_bundle(model_file, cfg)
            except OSError as e:
                print(f"flashlm: warning: experts stream from the GGUF's stacked tensors (3 reads each): could not "
                      f"write their bundle ({e})", file=sys.stderr)
        self._sums = read_checksums(self.bundle) if self.bundle is not None else None  # each record's xxh3_64
        self.verify = self._sums is not None  # each record read checked against it (the GGUF's slices have none)
        map_resident_only(model_file, self.stacks)
        self.cache = SlotCache(n_slots, record_bytes(self.part_bytes), policy, n_keys=cfg.n_layer * cfg.n_expert)
        self._flat = readonly(self.cache.pool.reshape(-1))  # the pool as one buffer, for the kernels (read-only)
        self._pool_addr = self.cache.pool.ctypes.data
        g, u, _ = self.part_bytes
        # each slot's gate, up and down: byte offsets in the pool
        self._slot_offs = np.arange(n_slots, dtype=np.int64)[:, None] * self.cache.item_bytes + [0, g, g + u]
        self._hint_fd = -1  # the bundle opened through the page cache, for prefetch hints
        self.aio = None  # asynchronous direct reads of bundle records into their slots
        if self.bundle is not None:
            self.engine = ReadEngine(self.bundle, n_threads=io_threads, direct=direct, max_gap=0)
            self.aio = NativeAIO.open(self.bundle) if direct else None
            if self.aio is None and prefetch and hasattr(os, "posix_fadvise"):
                self._hint_fd = os.open(self.bundle, os.O_RDONLY)
        else:
            self.engine = ReadEngine(model_file.path, n_threads=io_threads, direct=direct)
        self.prefetching = bool(prefetch)
        self.auto = None  # prefetch "auto": the measurement that turns it on and off
        self._why_off = None  # why "auto" was turned off from the start
        if prefetch == "auto":
            if cfg.n_layer < 2:
                self._why_off = "one layer: no next layer to read ahead"
            elif n_slots < 2 * cfg.n_expert_used:
                self._why_off = "the cache holds fewer than two layers' experts"
            else:
                self.auto = AutoPrefetch()
            self.prefetching = self.auto is not None
        self._token_t0 = None  # when the decode token being timed (for auto) entered layer 0
        self.pending: dict = {}  # key (layer * n_expert + e) -> futures of its reads (its offset, hinted; None, asynchronous)
        self._batches: list = []  # (submit time, futures) of prefetches not yet accounted
        self._pins: list[np.ndarray] = []  # slots of the current layer's chosen experts
        self._queued = None  # (keys, slots) of prefetches not yet issued
        self._missing = None  # keys of misses being read for locate(wait=False)
        self.predicted: dict[int, set] = {}
        self.stats = [LayerStats() for _ in range(cfg.n_layer)]
        self.totals = TokenStats()  # the same, all layers, since the last take_pass
        self.io_s = 0.0  # seconds reads took (thread reads; under native AIO, the submissions and waits)
        self.wait_s = 0.0  # seconds the caller waited for reads

    # -- ExpertSource -----------------------------------------------------------------

    def get(self, layer: int, e: int) -> tuple[TensorRef, TensorRef, TensorRef]:
        s = int(self._load(layer, [e])[0][0])
        return self._refs(layer, e, s)

    def locate(self, layer: int, ids, wait: bool = True):
        """(the cache's pool, (k, 3) byte offsets of experts ids' gate, up and down in it),
        loading the ones not cached (all their reads at once); they stay pinned until
        end_layer. wait=False: return at once, with a third item, the (k,) mask of the
        experts still being read; the caller computes the others meanwhile, then calls
        finish_misses() before it touches these."""
        slots, missed = self._load(layer, ids, pin=True, wait=wait)
        offs = self._slot_offs[slots]
        return (self._flat, offs) + (() if wait else (missed,))

    def finish_misses(self) -> None:
        """Wait for the reads a locate(wait=False) started; then start the queued prefetch
        (after the misses in the disk's queue: it shares its bandwidth among the reads it holds)."""
        keys, self._missing = self._missing, None
        if keys is not None:
            t0 = time.perf_counter()
            try:
                self._wait_misses()
                self._verify(keys, self.cache.slot_of[keys])
            except BaseException:  # their slots hold no expert: forgotten, read again when needed
                self._drop_misses(keys)
                raise
            finally:
                self._waited(t0)
        if self._queued is not None:
            try:
                self._issue()
            except BaseException:
                self._unpin_layer()
                raise

    def abort_misses(self) -> None:
        """After an error between locate(wait=False) and finish_misses: the misses' reads
        end, their experts and the queued prefetch's are forgotten and the layer's pins
        released."""
        keys, self._missing = self._missing, None
        self._drop_misses(keys if keys is not None else ())

    def _drop_misses(self, keys) -> None:
        self._drain_misses()
        queued, self._queued = self._queued, None  # not started: their slots hold nothing
        for k in list(keys) + ([] if queued is None else queued[0].tolist()):
            self.cache.forget(int(k))
        self._unpin_layer()

    def _waited(self, t0: float) -> None:
        """The caller read (and waited) since t0: to io_s and wait_s."""
        dt = time.perf_counter() - t0
        self.io_s += dt
        self.wait_s += dt
        self.totals.io_wait_s += dt

    def _unpin_layer(self) -> None:
        for s in self._pins:
            self.cache.pinned[s] = False
        self._pins = []

    def layout(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """((3, 2) rows and row bytes of one expert's gate, up, down; (3,) their types)."""
        return self._layout

    def _load(self, layer: int, ids, pin: bool = False, wait: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(The slots holding layer's experts ids, the mask of those missed): prefetched ones
        waited for, missing ones read now, in one batch of parallel reads (wait=False,
        native AIO: started, for finish_misses). pin: keep them until end_layer."""
        if self._missing is not None:  # a locate(wait=False) not finished
            self.finish_misses()
        n_expert = self.cfg.n_expert
        keys = np.asarray(ids, dtype=np.int64) + layer * n_expert
        if self._queued is not None and self._queued[0][0] // n_expert == layer:
            self._issue()  # this layer's own prefetch: its reads start before they are waited for
        if self.pending:
            for k in keys.tolist():
                if k in self.pending:  # prefetched: wait for its read if still in flight (it stays pinned)
                    self._reap(k, unpin=False)
        try:
            slots, missed = self.cache.assign(keys, pin=True)  # a slot being filled is pinned too
        except RuntimeError:  # slots pinned by prefetches still in flight: wait for them, then again
            for k in list(self.pending):
                self._reap(k)
            slots, missed = self.cache.assign(keys, pin=True)
        wait = wait or self.aio is None  # only native AIO reads while the caller computes
        st = self.stats[layer]
        n_miss = int(np.count_nonzero(missed))
        st.misses += n_miss
        st.hits += len(keys) - n_miss
        tot = self.totals
        tot.experts_needed += len(keys)
        tot.expert_hits += len(keys) - n_miss
        try:
            if n_miss:
                t0 = time.perf_counter()
                self._issue((keys[missed], slots[missed]), wait)
                self._waited(t0)
                st.overlapped += not wait and n_miss < len(keys)
            elif self._queued is not None:
                self._issue()
        except BaseException:
            self.cache.pinned[slots] = False
            raise
        if pin:
            self._pins.append(slots)
        else:
            self.cache.pinned[slots] = False
        return slots, (missed if not wait else np.zeros(len(keys), dtype=bool))

    def begin_layer(self, layer: int, chosen: np.ndarray, probs: np.ndarray) -> None:
        """The router chose `chosen` (T, k) for this layer; probs (T, n_expert) feed the
        scores (policy score; policy freq counts the choices, each token in turn)."""
        base = layer * self.cfg.n_expert
        if layer == 0 and self.auto is not None:
            self._token_t0 = time.perf_counter() if chosen.shape[0] == 1 else None
        self.cache.observe_step(base, chosen, probs)
        pred = self.predicted.pop(layer, None)
        if pred is not None:
            ids = set(chosen.ravel().tolist())
            st = self.stats[layer]
            used = len(pred & ids)
            st.predicted += len(pred)
            st.predicted_used += used
            st.chosen += len(ids)
            tot = self.totals
            tot.prefetched += len(pred)
            tot.prefetch_used += used
            tot.prefetch_chosen += len(ids)

    def prefetch(self, layer: int, ids) -> None:
        """Read layer's experts `ids` (those not cached or in flight) ahead, in parallel,
        while the caller computes. Called after the current layer's `locate` (which pins
        its experts): the reads start once that layer's misses are in (at once if it has
        none)."""
        if not self.prefetching:
            return
        ids = set(np.asarray(ids).tolist())
        self.predicted[layer] = ids
        base, pending = layer * self.cfg.n_expert, self.pending
        keys = np.array(sorted(base + e for e in ids if base + e not in pending), dtype=np.int64)
        # a slot for each expert not cached, pinned: not evicted before the layer uses (or drops) it
        try:
            slots, missed = self.cache.assign(keys, pin=True, only_absent=True)
        except RuntimeError:  # every slot pinned (reads in flight at a small budget): best effort
            if self._missing is not None:  # misses in flight: settling would take their tag's end (and error)
                return
            self._settle()
            try:
                slots, missed = self.cache.assign(keys, pin=True, only_absent=True)
            except RuntimeError:
                return
        if missed.any():
            if self._queued is not None:  # two prefetches before a locate: the first starts now
                self._issue()
            self._queued = (keys[missed], slots[missed])
            if self._missing is None:  # no misses being read: the reads start now
                self._issue()

    def end_layer(self, layer: int) -> None:
        """Unpin this layer's experts, and the prefetched ones its router did not choose
        (asynchronous reads: once they are done; nothing waits for them)."""
        if self._missing is not None:
            self.finish_misses()
        self._unpin_layer()
        if self._queued is not None:
            self._issue()
        if self.aio is not None:
            self._settle()
        elif self.pending:
            lo, hi = layer * self.cfg.n_expert, (layer + 1) * self.cfg.n_expert
            for key in [k for k in self.pending if lo <= k < hi]:
                self._reap(key)
        self._account()
        if self._token_t0 is not None and layer == self.cfg.n_layer - 1:  # a decode token's layers done
            self.prefetching = self.auto.record(time.perf_counter() - self._token_t0)
            self._token_t0 = None

    def _refs(self, layer: int, e: int, s: int) -> tuple[TensorRef, TensorRef, TensorRef]:
        slot, o, out = self.cache.pool[s], 0, []
        for t, n in zip(self.stacks[layer], self.part_bytes):
            rows = t.shape[1]
            out.append(TensorRef(f"{t.name}[{e}]", t.qtype, t.shape[1:], slot[o:o + n].reshape(rows, -1), -1))
            o += n
        return tuple(out)

    def describe(self) -> str:
        """What streams, and how (for `flashlm info`)."""
        return (f"experts streamed into a cache of {self.cache.n_slots:,} ({self.cache.policy}; prefetch "
                f"{self.prefetch_state()}; {'bundled' if self.bundle is not None else 'from the GGUF'})")

    memory_only = False  # a self-draft's passes: the cached experts only, nothing read (speculate.py)

    def cached(self, layer: int, ids) -> tuple:
        """(the pool, (k, 3) byte offsets, (k,) mask) of experts ids that the cache holds
        now, read in full (none in flight); reads, pins and evicts nothing."""
        keys = np.asarray(ids, dtype=np.int64) + layer * self.cfg.n_expert
        slots = self.cache.slot_of[keys]
        ok = (slots >= 0) & np.array([k not in self.pending for k in keys.tolist()], dtype=bool)
        if self._missing is not None:
            ok &= ~np.isin(keys, self._missing)
        return self._flat, self._slot_offs[np.where(ok, slots, 0)], ok

    def take_pass(self) -> TokenStats:
        """What the cache read and held since the last call (the model's last pass)."""
        out, self.totals = self.totals, TokenStats()
        return out

    def prefetch_state(self) -> str:
        """Whether prefetch is on, and for "auto" what it measured (or why it is off)."""
        if self.auto is not None:
            return self.auto.describe()
        return f"auto: off ({self._why_off})" if self._why_off else "on" if self.prefetching else "off"

    def take_stats(self) -> dict:
        """Per-layer figures and the prefetch totals since the last call; starts afresh."""
        layers, self.stats = self.stats, [LayerStats() for _ in range(self.cfg.n_layer)]
        io, wait = self.io_s, self.wait_s
        self.io_s = self.wait_s = 0.0
        pred = sum(s.predicted for s in layers)
        used = sum(s.predicted_used for s in layers)
        chosen = sum(s.chosen for s in layers)
        return dict(layers=layers, prefetch=self.prefetch_state(), hits=sum(s.hits for s in layers), misses=sum(s.misses for s in layers),
                    bytes_read=sum(s.bytes_read for s in layers), io_s=io, wait_s=wait,
                    overlapped=sum(s.overlapped for s in layers),
                    hidden=1.0 - wait / io if io > 0 and self._hint_fd < 0 and self.aio is None else None,
                    precision=used / pred if pred else None, recall=used / chosen if chosen else None)

    def close(self) -> None:
        if self.aio is not None:
            self.aio.close()
        self.engine.close()
        if self._hint_fd >= 0:
            os.close(self._hint_fd)
            self._hint_fd = -1
