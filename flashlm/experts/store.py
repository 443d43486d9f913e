"""Experts streamed from the file into a byte-budgeted cache, with prefetch.

Expert e of layer N is one contiguous byte range in each of blk.N.ffn_{gate,up,down}_exps;
a miss reads the three through the shared I/O engine (direct I/O, parallel preads) into
one cache slot. `prefetch(layer, ids)` issues a layer's reads on a background thread
while the current layer computes; `get` waits for a read still in flight.

Statistics per layer: hits, misses, bytes read; for prefetch, the experts predicted and
how many the router then chose (precision and recall), and the read time the main
thread did not wait for (the I/O hidden behind compute).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..cache import SlotCache
from ..flashload.io import ReadEngine
from ..runtime.modelfile import TensorRef
from .moe import PARTS


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    predicted: int = 0  # experts prefetched for this layer
    predicted_used: int = 0  # of those, chosen by the router
    chosen: int = 0  # experts the router chose (with a prediction made)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 0.0


class StreamedExperts:
    """An ExpertSource (see moe.py) that reads experts on demand into a SlotCache."""

    def __init__(self, model_file, cfg, n_slots: int, policy: str = "lru", prefetch: bool = True,
                 io_threads: int = 8, direct: bool = True):
        self.cfg = cfg
        self.stacks = [[model_file.tensors[f"blk.{i}.{p}.weight"] for p in PARTS] for i in range(cfg.n_layer)]
        sizes = [t.data.shape[0] // cfg.n_expert * t.data.shape[1] for t in self.stacks[0]]
        self.part_bytes = sizes
        self.cache = SlotCache(n_slots, sum(sizes), policy)
        self.engine = ReadEngine(model_file.path, n_threads=io_threads, direct=direct)
        self.prefetching = prefetch
        self._bg = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashlm-prefetch") if prefetch else None
        self.pending: dict = {}  # key -> Future of its read
        self._pins: set[int] = set()  # slots of the current layer's chosen experts
        self.predicted: dict[int, set] = {}
        self.stats = [LayerStats() for _ in range(cfg.n_layer)]
        self.io_s = 0.0  # seconds reads took, prefetched or not
        self.wait_s = 0.0  # seconds the caller waited for reads

    # -- ExpertSource -----------------------------------------------------------------

    def get(self, layer: int, e: int) -> tuple[TensorRef, TensorRef, TensorRef]:
        return self._refs(layer, e, self._slot(layer, e))

    def locate(self, layer: int, ids) -> tuple[np.ndarray, np.ndarray]:
        """(the cache's pool, (k, 3) byte offsets of experts ids' gate, up and down in it),
        loading the ones not cached; they stay pinned until end_layer."""
        item, (g, u, _) = self.cache.item_bytes, self.part_bytes
        offs = np.empty((len(ids), 3), dtype=np.int64)
        for j, e in enumerate(ids):
            s = self._slot(layer, int(e))
            self._pins.add(s)
            self.cache.pinned.add(s)
            offs[j] = (s * item, s * item + g, s * item + g + u)
        return self.cache.pool.reshape(-1), offs

    def _slot(self, layer: int, e: int) -> int:
        """The slot holding expert e of layer (read now if it is not cached)."""
        key = (layer, e)
        st = self.stats[layer]
        fut = self.pending.pop(key, None)
        if fut is not None:  # prefetched: wait for the read if it is still in flight
            t0 = time.perf_counter()
            fut.result()
            self.wait_s += time.perf_counter() - t0
            self.cache.pinned.discard(self.cache.slot_of[key])
        s = self.cache.lookup(key)
        if s is None:
            st.misses += 1
            s = self.cache.insert(key)
            t0 = time.perf_counter()
            self._read(layer, e, s)
            self.wait_s += time.perf_counter() - t0
        else:
            st.hits += 1
        return s

    def begin_layer(self, layer: int, chosen: np.ndarray, probs: np.ndarray, pin: bool = True) -> None:
        """The router chose `chosen` (T, k) for this layer; probs (T, n_expert) feed the
        scores. pin: keep the chosen experts already cached from eviction (by the next
        layer's prefetch) until end_layer."""
        ids = set(np.unique(chosen).tolist())
        if pin:
            self._pins = {self.cache.slot_of[(layer, e)] for e in ids if (layer, e) in self.cache}
            self.cache.pinned |= self._pins
        pred = self.predicted.pop(layer, None)
        if pred is not None:
            st = self.stats[layer]
            st.predicted += len(pred)
            st.predicted_used += len(pred & ids)
            st.chosen += len(ids)
        if self.cache.policy == "score":
            self.cache.observe([(layer, e) for e in range(probs.shape[1])], probs.mean(axis=0))

    def prefetch(self, layer: int, ids) -> None:
        """Start reading layer's experts `ids` (those not cached or in flight)."""
        if self._bg is None:
            return
        ids = set(int(e) for e in ids)
        self.predicted[layer] = ids
        for e in sorted(ids):
            key = (layer, e)
            if key in self.cache or key in self.pending:
                continue
            s = self.cache.insert(key)
            self.cache.pinned.add(s)  # not evicted before the layer uses (or drops) it
            self.pending[key] = self._bg.submit(self._read, layer, e, s)

    def end_layer(self, layer: int) -> None:
        """Unpin this layer's experts, and the prefetched ones its router did not choose."""
        self.cache.pinned -= self._pins
        self._pins = set()
        for key in [k for k in self.pending if k[0] == layer]:
            self.pending.pop(key).result()
            self.cache.pinned.discard(self.cache.slot_of[key])

    # -- internals ----------------------------------------------------------------------

    def _read(self, layer: int, e: int, s: int) -> None:
        slot = self.cache.pool[s]
        ranges, outs, o = [], [], 0
        for t, n in zip(self.stacks[layer], self.part_bytes):
            ranges.append((t.offset + e * n, n))
            outs.append(slot[o:o + n])
            o += n
        t0 = time.perf_counter()
        self.engine.read_ranges(ranges, outs)
        self.io_s += time.perf_counter() - t0
        self.stats[layer].bytes_read += sum(self.part_bytes)

    def _refs(self, layer: int, e: int, s: int) -> tuple[TensorRef, TensorRef, TensorRef]:
        slot, o, out = self.cache.pool[s], 0, []
        for t, n in zip(self.stacks[layer], self.part_bytes):
            rows = t.shape[1]
            out.append(TensorRef(f"{t.name}[{e}]", t.qtype, t.shape[1:], slot[o:o + n].reshape(rows, -1), -1))
            o += n
        return tuple(out)

    def take_stats(self) -> dict:
        """Per-layer figures and the prefetch totals since the last call; starts afresh."""
        layers, self.stats = self.stats, [LayerStats() for _ in range(self.cfg.n_layer)]
        io, wait = self.io_s, self.wait_s
        self.io_s = self.wait_s = 0.0
        pred = sum(s.predicted for s in layers)
        used = sum(s.predicted_used for s in layers)
        chosen = sum(s.chosen for s in layers)
        return dict(layers=layers, hits=sum(s.hits for s in layers), misses=sum(s.misses for s in layers),
                    bytes_read=sum(s.bytes_read for s in layers), io_s=io, wait_s=wait,
                    hidden=1.0 - wait / io if io > 0 else 0.0,
                    precision=used / pred if pred else None, recall=used / chosen if chosen else None)

    def close(self) -> None:
        if self._bg is not None:
            self._bg.shutdown(wait=True)
        self.engine.close()


@dataclass
class ExpertPlan:
    """How a budget is divided for a mixture-of-experts model whose experts stream:
    everything but the experts resident, the KV cache, buffers, and the expert cache."""

    budget: int
    resident: int
    kv: int
    buffers: int
    expert_bytes: int  # one expert's gate, up and down slices
    n_slots: int  # experts the cache holds
    n_experts: int  # experts in the model (all layers)
    minimum: int

    @property
    def fixed(self) -> int:
        return self.resident + self.kv + self.buffers

    def table(self) -> str:
        from ..units import format_size

        rows = [("resident weights", self.resident), ("KV cache", self.kv), ("buffers, tokenizer", self.buffers),
                ("expert cache", self.n_slots * self.expert_bytes)]
        out = [f"memory plan for a budget of {format_size(self.budget)} (minimum {format_size(self.minimum)}):"]
        out += [f"  {name:<17} {format_size(n):>10}" for name, n in rows]
        out.append(f"  the cache holds {self.n_slots:,} of {self.n_experts:,} experts "
                   f"({self.n_slots / self.n_experts:.0%}), {format_size(self.expert_bytes)} each")
        return "\n".join(out)


SLACK = 4 << 20  # allocator slack and pages faulted in around mapped weights (as flashload's plan)


def plan_experts(model_file, cfg, budget: int, n_ctx: int, tokenizer: int, prefetch: bool,
                 io_threads: int = 8, max_read: int = 1 << 20) -> ExpertPlan:
    """Divide `budget`; FlashLMError naming the minimum (one token's experts in a layer,
    twice that with prefetch) when it is below."""
    from ..errors import FlashLMError
    from ..units import format_size

    stacked = {f"blk.{i}.{p}.weight" for i in range(cfg.n_layer) for p in PARTS}
    resident = sum(t.nbytes for t in model_file.tensors.values() if t.name not in stacked)
    expert = sum(model_file.tensors[f"blk.0.{p}.weight"].nbytes for p in PARTS) // cfg.n_expert
    kv = n_ctx * cfg.kv_bytes_per_token // 2
    buffers = tokenizer + io_threads * max_read + 8 * cfg.n_vocab + SLACK + resident // 100
    fixed = resident + kv + buffers
    least = cfg.n_expert_used * (2 if prefetch else 1)
    minimum = fixed + least * expert
    if budget < minimum:
        raise FlashLMError(f"memory budget {format_size(budget)} is below the minimum {format_size(minimum)} for this "
                           f"model at n_ctx={n_ctx} (resident weights {format_size(resident)}, KV cache {format_size(kv)},"
                           f" {least} experts of {format_size(expert)}); raise the budget or lower n_ctx")
    total = cfg.n_layer * cfg.n_expert
    return ExpertPlan(budget, resident, kv, buffers, expert, min(total, (budget - fixed) // expert), total, minimum)
