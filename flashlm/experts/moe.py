"""The MoE FFN of one layer, as llama.cpp's build_moe_ffn computes it.

    p       = softmax(router . x)   (sigmoid for expert_gating_func 2)
    chosen  = the n_expert_used largest p
    w       = p[chosen], / sum(w) if expert_weights_norm, * expert_weights_scale if set
    out     = sum over chosen e of w_e * down_e(silu(gate_e x) * up_e x)
            + sigmoid(shexp_gate . x) * shared_expert(x)   (qwen2moe; granite's shared expert has no gate)

Experts come from an `ExpertSource`: `get(layer, e)` returns expert e's (gate, up,
down) TensorRefs. `ResidentExperts` slices them from the mapped stacked tensors
blk.N.ffn_{gate,up,down}_exps (expert e is one contiguous byte range in each).
"""

from __future__ import annotations

import numba
import numpy as np

from .. import kernels_cpu as K
from ..runtime.modelfile import TensorRef

PARTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def expert_slice(t: TensorRef, e: int) -> TensorRef:
    """Expert e of a stacked (n_expert, rows, cols) tensor: its rows, one byte range."""
    n_expert, rows, cols = t.shape
    return TensorRef(f"{t.name}[{e}]", t.qtype, (rows, cols), t.data[e * rows:(e + 1) * rows],
                     t.offset + e * rows * t.data.shape[1], t.source)


class ResidentExperts:
    """Every expert read from the mapped file (the page cache holds what was touched)."""

    def __init__(self, store):
        self.store = store

    def get(self, layer: int, e: int) -> tuple[TensorRef, TensorRef, TensorRef]:
        return tuple(expert_slice(self.store.get(f"blk.{layer}.{p}.weight"), e) for p in PARTS)

    def locate(self, layer: int, ids) -> tuple[np.ndarray, np.ndarray]:
        """(buffer, (k, 3) byte offsets of experts ids' gate, up and down in it): the
        mapped file, for the compiled decode of one token's experts."""
        stacks = [self.store.get(f"blk.{layer}.{p}.weight") for p in PARTS]
        buf = _root(stacks[0].data)
        base = buf.ctypes.data
        offs = np.array([[t.data.ctypes.data - base + e * t.data.shape[0] // t.shape[0] * t.data.shape[1]
                          for t in stacks] for e in ids], dtype=np.int64)
        return buf, offs


def part_layout(stacks) -> tuple[np.ndarray, np.ndarray]:
    """((3, 2) rows and row bytes of one expert's gate, up, down; (3,) their GGML types)."""
    shapes = np.array([(t.shape[1], t.data.shape[1]) for t in stacks], dtype=np.int64)
    return shapes, np.array([int(t.qtype) for t in stacks], dtype=np.int64)


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a.reshape(-1).view(np.uint8).view(np.ndarray)


def route(logits: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Router logits (T, n_expert) -> the chosen experts (T, k) int64, best first, their
    weights (T, k) float32, and every expert's probability (T, n_expert)."""
    logits = logits.astype(np.float32, copy=False)
    if cfg.expert_gating == "sigmoid":
        p = np.float32(1.0) / (np.float32(1.0) + np.exp(-logits))
    else:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
    k = cfg.n_expert_used
    ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, ids, axis=1)
    if cfg.expert_weights_norm:
        w = w / np.maximum(w.sum(axis=1, keepdims=True), np.float32(6.103515625e-5))  # llama.cpp's clamp
    if cfg.expert_weights_scale:
        w = w * np.float32(cfg.expert_weights_scale)
    return ids, w.astype(np.float32), p


def expert_ffn(x: np.ndarray, gate: TensorRef, up: TensorRef, down: TensorRef, gelu: bool = False) -> np.ndarray:
    """down(act(gate x) * up x) for rows x (T, n_embd)."""
    g, u = K.linear_many(x, [gate, up])
    return K.linear(K.glu(g, u, gelu), down)


def moe_ffn(store, experts, cfg, layer: int, h: np.ndarray, gelu: bool = False, on_route=None) -> np.ndarray:
    """Layer `layer`'s MoE FFN of h (T, n_embd). on_route(layer, ids, weights, probs):
    called with each routing decision (the chosen experts, their weights, every
    expert's router probability; for traces)."""
    router = store.get(f"blk.{layer}.ffn_gate_inp.weight")
    ids, w, p = route(K.linear(h, router), cfg)
    if on_route is not None:
        on_route(layer, ids, w, p)
    streamed = hasattr(experts, "prefetch")
    decode = h.shape[0] == 1
    if streamed:
        experts.begin_layer(layer, ids, p, pin=decode)
        if decode and experts.prefetching and layer + 1 < cfg.n_layer:
            # the next layer's router on this layer's input (mixtral-offloading's speculative
            # loading): its reads run while this layer's experts compute
            nxt = store.get(f"blk.{layer + 1}.ffn_gate_inp.weight")
            experts.prefetch(layer + 1, route(K.linear(h, nxt), cfg)[0][0])
    out = np.zeros((h.shape[0], cfg.n_embd), dtype=np.float32)
    if decode:  # one token: its experts in one compiled call
        from ..kernels_cpu import F16_TABLE
        from ..kernels_cpu import decode as D

        buf, offs = experts.locate(layer, ids[0])
        shapes, qts = part_layout([store.get(f"blk.{layer}.{p}.weight") for p in PARTS])
        x = np.ascontiguousarray(h[0], dtype=np.float32)
        D.moe_decode(buf, offs, shapes, qts, x, w[0], gelu, F16_TABLE, numba.get_num_threads(),
                     np.arange(max(shapes[0, 0], cfg.n_embd), dtype=np.int64), out[0])
        ids = ids[:0]  # done
    for e in np.unique(ids).tolist():
        tok, slot = np.nonzero(ids == e)
        y = expert_ffn(np.ascontiguousarray(h[tok]), *experts.get(layer, e), gelu=gelu)
        out[tok] += w[tok, slot][:, None] * y
    if streamed:
        experts.end_layer(layer)
    if cfg.n_ff_shexp:  # the shared expert, every token
        s = store.get
        y = expert_ffn(h, s(f"blk.{layer}.ffn_gate_shexp.weight"), s(f"blk.{layer}.ffn_up_shexp.weight"),
                       s(f"blk.{layer}.ffn_down_shexp.weight"), gelu)
        gate = store.vector(f"blk.{layer}.ffn_gate_inp_shexp.weight")  # qwen2moe: scaled by a sigmoid gate
        if gate is not None:
            y *= np.float32(1.0) / (np.float32(1.0) + np.exp(-(h @ gate)))[:, None]
        out += y
    return out
