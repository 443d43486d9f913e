"""One whole decode step (one token through every layer) in one compiled call.

At 100+ tokens/s a token has under 10 ms; hundreds of small Python calls per token
would eat that. `decode_step` drives layer.py's functions (the same ones prefill runs,
on T = 1 rows) with one-vector products: embedding, every layer, the output head,
without returning to Python. A model whose FFN runs in Python (streamed, or a mixture
of experts) calls the same step in pieces: decode_embed, per layer decode_attn, its FFN
and decode_add_ffn, then decode_head.

Inputs (packed by runtime/blocks.py's FusedDecoder):
    arena, mats: weight matrix i is _mat(arena, mats, i): (offset, rows, row_bytes) in
          the byte buffer `arena` (the mapped model file), in SLOTS order per layer, then
          token embedding and output.
    qt:   int64 GGML type of each matrix.
    vecs: float32 (n_layer + 1, len(VECS), width) norm weights and biases (layer.py).
    arch: the model's layer.ARCH record (a one-element array); nt: threads for the products.
"""

import numpy as np
from numba import njit

from .acts import _mv
from .layer import (V_ATTN_NORM, _act, _attend_head, _attn_residual, _ffn_residual, _logits_rows, _norm_rows,
                    _qkv_rows)
from .quants import dequant_row

SLOTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
N_SLOTS = len(SLOTS)


@njit(inline="always")
def _mat(arena, mats, i):
    o = mats[i, 0]
    return arena[o:o + mats[i, 1] * mats[i, 2]].reshape((mats[i, 1], mats[i, 2]))


@njit(nogil=True, cache=True)
def decode_step(tok, pos, arena, mats, qt, vecs, swa, kc, vc, arch, nt, lut, all_rows, logits):
    """Run token `tok` at position `pos`: fill the KV caches kc/vc (float16 bits as
    uint16, (n_layer, n_kv, n_ctx, hd)) and write the logits (n_vocab,)."""
    a = arch[0]
    d = a.n_embd
    x = np.empty((1, d), dtype=np.float32)
    h = np.empty((1, d), dtype=np.float32)
    o = np.empty((1, d), dtype=np.float32)
    _embed(tok, arena, mats, qt, a, lut, x[0])
    for l in range(a.n_layer):
        _layer_attn(l, pos, x, h, arena, mats, qt, vecs, swa, kc, vc, a, nt, lut, all_rows)
        base = l * N_SLOTS
        n_ff = _mat(arena, mats, base + 5).shape[0]
        g = np.empty(n_ff, dtype=np.float32)
        u = np.empty(n_ff, dtype=np.float32)
        _mv(qt[base + 4], _mat(arena, mats, base + 4), h[0], g, lut, nt, all_rows)
        _mv(qt[base + 5], _mat(arena, mats, base + 5), h[0], u, lut, nt, all_rows)
        for i in range(n_ff):
            g[i] = _act(g[i], a.gelu, lut) * u[i]
        _mv(qt[base + 6], _mat(arena, mats, base + 6), g, o[0], lut, nt, all_rows)
        _ffn_residual(o, x, vecs[l], a)
    _head(x, arena, mats, qt, vecs, a, nt, lut, all_rows, logits)


@njit(nogil=True, cache=True)
def decode_embed(tok, arena, mats, qt, arch, lut, x):
    """x = token tok's embedding (scaled as the model says)."""
    a = arch[0]
    _embed(tok, arena, mats, qt, a, lut, x)


@njit(nogil=True, cache=True)
def decode_attn(l, pos, x, h, arena, mats, qt, vecs, swa, kc, vc, arch, nt, lut, all_rows):
    """Layer l's attention on the residual stream x (1, n_embd) (in place, KV written at
    pos); then h = the FFN's input (x through the FFN norm)."""
    a = arch[0]
    _layer_attn(l, pos, x, h, arena, mats, qt, vecs, swa, kc, vc, a, nt, lut, all_rows)


@njit(nogil=True, cache=True)
def decode_add_ffn(l, o, x, vecs, arch):
    """x += layer l's FFN output o, both (1, n_embd) (after its post-norm, where the model has one)."""
    a = arch[0]
    _ffn_residual(o, x, vecs[l], a)


@njit(nogil=True, cache=True)
def decode_head(x, arena, mats, qt, vecs, arch, nt, lut, all_rows, logits):
    """logits (n_vocab,) = the output projection of the final-normed x (1, n_embd), finished
    as the model says."""
    a = arch[0]
    _head(x, arena, mats, qt, vecs, a, nt, lut, all_rows, logits)


@njit(inline="always")
def _embed(tok, arena, mats, qt, a, lut, x):
    i = a.n_layer * N_SLOTS
    dequant_row(qt[i], _mat(arena, mats, i)[tok], x, lut)
    if a.embed_scale != 1.0:
        for j in range(x.shape[0]):
            x[j] *= np.float32(a.embed_scale)


@njit(inline="always")
def _layer_attn(l, pos, x, h, arena, mats, qt, vecs, swa, kc, vc, a, nt, lut, all_rows):
    """Layer l's attention for one token, x and h (1, n_embd): layer.py's steps around
    one-vector products."""
    n_head, hd, hd_v = a.n_head, a.head_dim, a.v_head_dim
    q = np.empty((1, n_head * hd), dtype=np.float32)
    k = np.empty((1, a.n_head_kv * hd), dtype=np.float32)
    v = np.empty((1, a.n_head_kv * hd_v), dtype=np.float32)
    att = np.empty(n_head * hd_v, dtype=np.float32)
    o = np.empty((1, a.n_embd), dtype=np.float32)
    base = l * N_SLOTS
    vl = vecs[l]
    _norm_rows(x, vl[V_ATTN_NORM], a.eps, h)
    _mv(qt[base], _mat(arena, mats, base), h[0], q[0], lut, nt, all_rows)
    _mv(qt[base + 1], _mat(arena, mats, base + 1), h[0], k[0], lut, nt, all_rows)
    _mv(qt[base + 2], _mat(arena, mats, base + 2), h[0], v[0], lut, nt, all_rows)
    is_swa = swa[l]
    sc = _qkv_rows(l, pos, q, k, v, vl, is_swa, kc, vc, a)
    window = a.window if is_swa else 0
    s = np.empty(pos + 1, dtype=np.float32)
    qh = np.empty(hd, dtype=np.float32)
    g = n_head // a.n_head_kv
    for hh in range(n_head):
        _attend_head(q[0], hh * hd, kc, vc, l, hh // g, pos, window, hd, hd_v, sc, s, qh, att, hh * hd_v)
    _mv(qt[base + 3], _mat(arena, mats, base + 3), att, o[0], lut, nt, all_rows)
    _attn_residual(o, x, h, vl, a)


@njit(inline="always")
def _head(x, arena, mats, qt, vecs, a, nt, lut, all_rows, logits):
    i = a.n_layer * N_SLOTS + 1
    h = np.empty(x.shape, dtype=np.float32)
    _norm_rows(x, vecs[a.n_layer, V_ATTN_NORM], a.eps, h)
    _mv(qt[i], _mat(arena, mats, i), h[0], logits, lut, nt, all_rows)
    _logits_rows(logits.reshape((1, logits.shape[0])), a)
