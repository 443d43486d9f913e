"""The MoE FFN of one layer, as llama.cpp's build_moe_ffn computes it.

    p       = softmax(router . x)   (sigmoid for expert_gating_func 2)
    chosen  = the n_expert_used largest p
    w       = p[chosen], / sum(w) if expert_weights_norm, * expert_weights_scale if set
    out     = sum over chosen e of w_e * down_e(silu(gate_e x) * up_e x)
            + sigmoid(shexp_gate . x) * shared_expert(x)   (qwen2moe; granite's shared expert has no gate)

Experts come from an `ExpertSource`: `get(layer, e)` returns expert e's (gate, up,
down) TensorRefs, `locate(layer, ids, wait)` where a token's experts lie for the
compiled kernels, and begin_layer / end_layer / prefetch / finish_misses /
abort_misses let a streamed source read while the layer computes. `ResidentExperts`
slices them from the mapped stacked tensors blk.N.ffn_{gate,up,down}_exps (expert e is
one contiguous byte range in each); store.StreamedExperts reads them into a cache.
"""

from __future__ import annotations

import weakref

import numba
import numpy as np

from .. import kernels_cpu as K
from ..kernels_cpu import F16_TABLE, _all_rows
from ..kernels_cpu import moe as M
from ..formats.modelfile import TensorRef, readonly

PARTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def expert_slice(t: TensorRef, e: int) -> TensorRef:
    """Expert e of a stacked (n_expert, rows, cols) tensor: its rows, one byte range."""
    n_expert, rows, cols = t.shape
    return TensorRef(f"{t.name}[{e}]", t.qtype, (rows, cols), t.data[e * rows:(e + 1) * rows],
                     t.offset + e * rows * t.data.shape[1], t.source)


class ResidentExperts:
    """Every expert read from the mapped file (the page cache holds what was touched).
    Nothing is ever read ahead or waited for: the streaming hooks do nothing."""

    prefetching = False

    def __init__(self, store):
        self.store = store
        self._tables: dict = {}  # layer -> (the mapped buffer, (n_expert, 3) byte offsets)
        self._layouts: dict = {}

    def begin_layer(self, layer: int, chosen: np.ndarray, probs: np.ndarray) -> None:
        pass

    def end_layer(self, layer: int) -> None:
        pass

    def prefetch(self, layer: int, ids) -> None:
        pass

    def finish_misses(self) -> None:
        pass

    def abort_misses(self) -> None:
        pass

    def close(self) -> None:
        pass

    def prefetch_state(self) -> str:
        return "off (every expert resident)"

    def get(self, layer: int, e: int) -> tuple[TensorRef, TensorRef, TensorRef]:
        return tuple(expert_slice(self.store.get(f"blk.{layer}.{p}.weight"), e) for p in PARTS)

    def locate(self, layer: int, ids, wait: bool = True) -> tuple:
        """(buffer, (k, 3) byte offsets of experts ids' gate, up and down in it): the
        mapped file, for the compiled decode of one token's experts; wait=False adds
        None: no expert is being read."""
        t = self._tables.get(layer)
        if t is None:
            stacks = [self.store.get(f"blk.{layer}.{p}.weight") for p in PARTS]
            buf = _root(stacks[0].data)
            base = buf.ctypes.data
            n = stacks[0].shape[0]
            offs = np.array([[t.data.ctypes.data - base + e * t.data.shape[0] // n * t.data.shape[1]
                              for t in stacks] for e in range(n)], dtype=np.int64)
            t = self._tables[layer] = (buf, offs)
        return (t[0], t[1][np.asarray(ids, dtype=np.int64)]) + (() if wait else (None,))

    def layout(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        if layer not in self._layouts:
            self._layouts[layer] = part_layout([self.store.get(f"blk.{layer}.{p}.weight") for p in PARTS])
        return self._layouts[layer]


def part_layout(stacks) -> tuple[np.ndarray, np.ndarray]:
    """((3, 2) rows and row bytes of one expert's gate, up, down; (3,) their GGML types)."""
    shapes = np.array([(t.shape[1], t.data.shape[1]) for t in stacks], dtype=np.int64)
    return shapes, np.array([int(t.qtype) for t in stacks], dtype=np.int64)


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return readonly(a.reshape(-1).view(np.uint8).view(np.ndarray))  # as every weight (TensorRef)


def expert_ffn(x: np.ndarray, gate: TensorRef, up: TensorRef, down: TensorRef, gelu: bool = False) -> np.ndarray:
    """down(act(gate x) * up x) for rows x (T, n_embd)."""
    g, u = K.linear_many(x, [gate, up])
    return K.linear(K.glu(g, u, gelu), down)


_ROUTERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # store -> {layer: (weights, type, rows)}


def _router(store, layer: int) -> tuple:
    """Layer's router as moe_route takes it: (weights, GGML type, 0..n_expert-1), looked
    up once per store (a token's routing is tens of calls; their lookups cost as much as
    the routing)."""
    per = _ROUTERS.get(store)
    if per is None:
        per = _ROUTERS[store] = {}
    r = per.get(layer)
    if r is None:
        t = store.get(f"blk.{layer}.ffn_gate_inp.weight")
        r = per[layer] = (t.data, int(t.qtype), _all_rows(t.data.shape[0]))
    return r


def _gating(cfg) -> tuple:
    return cfg.expert_gating == "sigmoid", bool(cfg.expert_weights_norm), float(cfg.expert_weights_scale or 0.0)


def route_rows(store, cfg, layer: int, h: np.ndarray):
    """The routing of tokens h (T, n_embd), as llama.cpp's build_moe_ffn: (T, k) chosen
    experts, best first (ties to the lower id), their (T, k) weights, every expert's
    (T, n_expert) probability; in one compiled call (the same routing as one token's)."""
    w, qt, rows = _router(store, layer)
    T, k, n = h.shape[0], cfg.n_expert_used, len(rows)
    ids, wts, p = np.empty((T, k), dtype=np.int64), np.empty((T, k), dtype=np.float32), np.empty((T, n), dtype=np.float32)
    M.moe_route_rows(w, qt, np.ascontiguousarray(h, dtype=np.float32), *_gating(cfg), F16_TABLE, rows, ids, wts, p)
    return ids, wts, p


def route_one(store, cfg, layer: int, x: np.ndarray, ahead: bool = False):
    """route_rows for one token x (n_embd,) float32: (k,) ids, (k,) weights, (n_expert,)
    probabilities. ahead: also the next layer's router on x, its
    (k,) most probable experts as a fourth item (what to prefetch), in the same call."""
    w, qt, rows = _router(store, layer)
    sig, norm, scale = _gating(cfg)
    k, n, lut = cfg.n_expert_used, len(rows), F16_TABLE
    ids, wts, p = np.empty(k, dtype=np.int64), np.empty(k, dtype=np.float32), np.empty(n, dtype=np.float32)
    if not ahead:
        M.moe_route(w, qt, x, sig, norm, scale, lut, rows, ids, wts, p)
        return ids, wts, p
    w2, qt2, rows2 = _router(store, layer + 1)
    ids2 = np.empty(k, dtype=np.int64)
    M.moe_route_ahead(w, qt, x, sig, norm, scale, lut, rows, ids, wts, p, w2, qt2, rows2, ids2,
                      np.empty(k, dtype=np.float32), np.empty(len(rows2), dtype=np.float32))
    return ids, wts, p, ids2


class MoEFFN:
    """Layer `layer`'s mixture-of-experts FFN (runtime/ffn.py's interface): the router
    picks each token's experts from `experts`, an ExpertSource (ResidentExperts, or
    store.StreamedExperts reading them into a cache). on_route(layer, ids, weights,
    probs), if set, sees each routing decision (the chosen experts, their weights,
    every expert's router probability; for traces)."""

    on_route = None
    rows_independent = False  # an expert a prefill gives one token runs as a matvec, several as a GEMM

    def __init__(self, store, experts, cfg, layer: int, gelu: bool):
        self.store, self.experts, self.cfg, self.layer, self.gelu = store, experts, cfg, layer, gelu

    def weights(self) -> None:
        return None

    def __call__(self, h: np.ndarray) -> np.ndarray:
        if h.shape[0] == 1 and getattr(self.experts, "memory_only", False):
            out, shared = self._cached_only(h), _shared_expert(self.store, self.cfg, self.layer, h, self.gelu)
        elif h.shape[0] == 1:
            out, shared = self._decode(h)
        else:
            out = self._prefill(h)
            shared = _shared_expert(self.store, self.cfg, self.layer, h, self.gelu)
        if shared is not None:
            out += shared
        return out

    def _cached_only(self, h: np.ndarray) -> np.ndarray:
        """A self-draft's routed experts for one token (speculate.py): the chosen ones the
        cache holds, and for each one it lacks, the most probable cached expert not
        chosen, with the missing one's weight (else skipped). Nothing is read, and the
        cache does not learn from it."""
        store, experts, cfg, layer = self.store, self.experts, self.cfg, self.layer
        x = np.ascontiguousarray(h[0], dtype=np.float32)
        ids, w, p = route_one(store, cfg, layer, x)
        _, _, ok = experts.cached(layer, ids)
        if not ok.all():
            others = np.argsort(-p, kind="stable")
            others = others[~np.isin(others, ids)]
            _, _, held = experts.cached(layer, others)
            subs = others[held][:int((~ok).sum())]
            ids = np.concatenate([ids[ok], subs])
            w = np.concatenate([w[ok], w[~ok][:len(subs)]]).astype(np.float32)
        buf, offs, ok = experts.cached(layer, ids)
        out = np.zeros((1, cfg.n_embd), dtype=np.float32)
        if len(ids):
            shapes, qts = experts.layout(layer)
            M.moe_decode(buf, np.ascontiguousarray(offs), shapes, qts, x, np.ascontiguousarray(w), self.gelu,
                         F16_TABLE, numba.get_num_threads(), _all_rows(max(shapes[0, 0], cfg.n_embd)), out[0])
        return out

    def rows(self, h: np.ndarray) -> np.ndarray:
        """Tokens h (T, n_embd) decoded in one pass (a speculative verification): row t
        is what a decode step gives token t alone (its routing, its experts' products
        in the same compiled call), the union of their experts located, so read, once.
        A union larger than the expert cache runs token by token."""
        store, experts, cfg, layer, gelu = self.store, self.experts, self.cfg, self.layer, self.gelu
        xs = np.ascontiguousarray(h, dtype=np.float32)
        ids, w, p = route_rows(store, cfg, layer, xs)
        union, inv = np.unique(ids, return_inverse=True)
        cache = getattr(experts, "cache", None)
        if h.shape[0] == 1 or (cache is not None and len(union) > len(cache.key_in)):
            return np.concatenate([self(h[t:t + 1]) for t in range(h.shape[0])])
        if self.on_route is not None:
            self.on_route(layer, ids, w, p)
        experts.begin_layer(layer, ids, p)
        shapes, qts = experts.layout(layer)
        out = np.zeros((h.shape[0], cfg.n_embd), dtype=np.float32)
        rows = _all_rows(max(shapes[0, 0], cfg.n_embd))
        try:
            buf, offs = experts.locate(layer, union)
            inv = inv.reshape(ids.shape)
            for t in range(h.shape[0]):
                M.moe_decode(buf, offs[inv[t]], shapes, qts, xs[t], w[t], gelu, F16_TABLE, numba.get_num_threads(),
                             rows, out[t])
        finally:
            experts.end_layer(layer)
        for t in range(h.shape[0]):
            shared = _shared_expert(store, cfg, layer, h[t:t + 1], gelu)
            if shared is not None:
                out[t] += shared[0]
        return out

    def _prefill(self, h: np.ndarray) -> np.ndarray:
        """Several tokens: each chosen expert once, over the tokens that chose it."""
        store, experts, layer = self.store, self.experts, self.layer
        ids, w, p = route_rows(store, self.cfg, layer, h)
        if self.on_route is not None:
            self.on_route(layer, ids, w, p)
        experts.begin_layer(layer, ids, p)
        out = np.zeros((h.shape[0], self.cfg.n_embd), dtype=np.float32)
        for e in np.unique(ids).tolist():
            tok, slot = np.nonzero(ids == e)
            y = expert_ffn(np.ascontiguousarray(h[tok]), *experts.get(layer, e), gelu=self.gelu)
            out[tok] += w[tok, slot][:, None] * y
        experts.end_layer(layer)
        return out

    def _decode(self, h: np.ndarray):
        """One token's routed experts, routing and the experts' FFNs in two compiled calls,
        and its shared expert's output (None without one): (routed (1, n_embd), shared).
        A token whose experts are being read computes its cached experts and the shared
        expert meanwhile."""
        store, experts, cfg, layer, gelu = self.store, self.experts, self.cfg, self.layer, self.gelu
        x = np.ascontiguousarray(h[0], dtype=np.float32)
        # with prefetch, the next layer's router on this layer's input too (mixtral-offloading's
        # speculative loading): its reads start once this layer's misses are in (at once if
        # there are none), and run while the rest of this layer and the next one's attention compute
        ahead = experts.prefetching and layer + 1 < cfg.n_layer
        ids, w, p, *nxt = route_one(store, cfg, layer, x, ahead)
        if self.on_route is not None:
            self.on_route(layer, ids[None], w[None], p[None])
        experts.begin_layer(layer, ids[None], p[None])
        shapes, qts = experts.layout(layer)
        out = np.zeros((1, cfg.n_embd), dtype=np.float32)
        args = (shapes, qts, x, gelu, F16_TABLE, numba.get_num_threads(), _all_rows(max(shapes[0, 0], cfg.n_embd)))
        buf, offs, missed = experts.locate(layer, ids, wait=False)  # missed: None where nothing is read
        reading = missed is not None and missed.any()
        shared = None
        try:
            if ahead:  # after locate, which pinned this layer's experts: the prefetch evicts none of them
                experts.prefetch(layer + 1, nxt[0])
            if reading:  # the cached and shared experts compute while the misses are read
                y = np.empty((len(ids), shapes[2, 0]), dtype=np.float32)
                if not missed.all():
                    M.moe_experts(buf, offs, np.flatnonzero(~missed), *args, y)
                shared = _shared_expert(store, cfg, layer, h, gelu)
                experts.finish_misses()
        except BaseException:  # interrupted: the reads end before their slots can be reused
            experts.abort_misses()
            raise
        if not reading:
            M.moe_decode(buf, offs, *args[:3], w, *args[3:], out[0])
        else:  # then the misses (the same sums as one call)
            M.moe_experts(buf, offs, np.flatnonzero(missed), *args, y)
            M.moe_combine(y, w, out[0])
        experts.end_layer(layer)
        if shared is None:
            shared = _shared_expert(store, cfg, layer, h, gelu)
        return out, shared


def _shared_expert(store, cfg, layer: int, h: np.ndarray, gelu: bool):
    """The shared expert's output for rows h (every token; qwen2moe's scaled by a sigmoid
    gate), or None where the model has none."""
    if not cfg.n_ff_shexp:
        return None
    s = store.get
    y = expert_ffn(h, s(f"blk.{layer}.ffn_gate_shexp.weight"), s(f"blk.{layer}.ffn_up_shexp.weight"),
                   s(f"blk.{layer}.ffn_down_shexp.weight"), gelu)
    gate = store.vector(f"blk.{layer}.ffn_gate_inp_shexp.weight")
    if gate is not None:
        y *= np.float32(1.0) / (np.float32(1.0) + np.exp(-(h @ gate)))[:, None]
    return y
