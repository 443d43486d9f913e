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
    """Layer `layer`'s MoE FFN of h (T, n_embd). on_route(layer, ids, weights, probs of
    the router): called with each routing decision (traces, cache scores)."""
    router = store.get(f"blk.{layer}.ffn_gate_inp.weight")
    ids, w, p = route(K.linear(h, router), cfg)
    if on_route is not None:
        on_route(layer, ids, w)
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
