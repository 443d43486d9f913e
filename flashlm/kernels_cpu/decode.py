"""One whole decode step (one token through every layer) in one compiled call.

At 100+ tokens/s a token has under 10 ms; hundreds of small Python calls per token
would eat that. `decode_step` drives layer.py's functions (the same ones prefill runs,
on T = 1 rows) with one-vector products: embedding, every layer, the output head,
without returning to Python. A model whose FFN runs in Python (streamed, or a mixture
of experts) calls the same step in pieces: decode_embed, per layer decode_attn, its FFN
and decode_add_ffn, then decode_head.

`decode_batch` steps B sequences at once (a server's parallel requests), each with one
token at its own position in its own KV cache, a slot of a pool: each product reads
its weight once for all B rows (acts._mv_multi), the rest runs row by row. Every
row's logits and KV are decode_step's for that sequence alone, bit for bit: decode_step
is decode_batch's B = 1 case, and each row's math is the same functions on its own row.
The _batch pieces do the same for models whose FFN runs in Python.

Inputs (packed by runtime/blocks.py's FusedDecoder):
    arena, mats: weight matrix i is _mat(arena, mats, i): (offset, rows, row_bytes) in
          the byte buffer `arena` (the mapped model file), in SLOTS order per layer, then
          token embedding and output.
    qt:   int64 GGML type of each matrix.
    vecs: float32 (n_layer + 1, len(VECS), width) norm weights and biases (layer.py).
    arch: the model's layer.ARCH record (a one-element array); nt: threads for the products.
    kc, vc: a sequence's KV cache, uint16 rows of the cache types arch names (n_layer, n_kv,
          n_ctx, words; attention.py); the batch's take a pool of them (n_slots, n_layer,
          n_kv, n_ctx, words), C-contiguous.
"""

import numpy as np
from numba import njit

from .acts import _mv_multi
from .attention import attend_rows
from .layer import V_ATTN_NORM, _act, _attn_residual, _ffn_residual, _logits_rows, _norm_rows, _qkv_rows
from .quants import dequant_row

SLOTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
N_SLOTS = len(SLOTS)


@njit(inline="always")
def _mat(arena, mats, i):
    o = mats[i, 0]
    return arena[o:o + mats[i, 1] * mats[i, 2]].reshape((mats[i, 1], mats[i, 2]))


@njit(inline="always")
def _one(kc):
    """A pool of one slot: kc itself."""
    return kc.reshape((1, kc.shape[0], kc.shape[1], kc.shape[2], kc.shape[3]))


@njit(nogil=True, cache=True)
def decode_step(tok, pos, arena, mats, qt, vecs, swa, kc, vc, arch, nt, lut, all_rows, logits):
    """Run token `tok` at position `pos`: fill the KV caches kc/vc ((n_layer, n_kv, n_ctx,
    words) uint16) and write the logits (n_vocab,)."""
    decode_batch(np.full(1, tok, dtype=np.int64), np.full(1, pos, dtype=np.int64), np.zeros(1, dtype=np.int64),
                 arena, mats, qt, vecs, swa, _one(kc), _one(vc), arch, nt, lut, all_rows,
                 logits.reshape((1, logits.shape[0])))


@njit(nogil=True, cache=True)
def decode_batch(toks, pos, slots, arena, mats, qt, vecs, swa, kc, vc, arch, nt, lut, all_rows, logits):
    """Run tokens toks (B,) at positions pos (B,), row b in the KV pool's slot slots[b]
    (no two rows share one; any order): fill kc/vc (n_slots, n_layer, n_kv, n_ctx, hd)
    and write the logits (B, n_vocab)."""
    a = arch[0]
    B, d = toks.shape[0], a.n_embd
    x = np.empty((B, d), dtype=np.float32)
    h = np.empty((B, d), dtype=np.float32)
    o = np.empty((B, d), dtype=np.float32)
    _embed_rows(toks, arena, mats, qt, a, lut, x)
    for l in range(a.n_layer):
        _layer_attn(l, pos, slots, x, h, arena, mats, qt, vecs, swa, kc, vc, a, nt, lut, all_rows)
        base = l * N_SLOTS
        n_ff = _mat(arena, mats, base + 5).shape[0]
        g = np.empty((B, n_ff), dtype=np.float32)
        u = np.empty((B, n_ff), dtype=np.float32)
        _mv_multi(qt[base + 4], _mat(arena, mats, base + 4), h, g, lut, nt, all_rows)
        _mv_multi(qt[base + 5], _mat(arena, mats, base + 5), h, u, lut, nt, all_rows)
        for b in range(B):
            for i in range(n_ff):
                g[b, i] = _act(g[b, i], a.gelu, lut) * u[b, i]
        _mv_multi(qt[base + 6], _mat(arena, mats, base + 6), g, o, lut, nt, all_rows)
        _ffn_residual(o, x, vecs[l], a)
    _head(x, arena, mats, qt, vecs, a, nt, lut, all_rows, logits)


@njit(nogil=True, cache=True)
def decode_embed(tok, arena, mats, qt, arch, lut, x):
    """x = token tok's embedding (scaled as the model says)."""
    _embed(tok, arena, mats, qt, arch[0], lut, x)


@njit(nogil=True, cache=True)
def decode_embed_batch(toks, arena, mats, qt, arch, lut, x):
    """x[b] = token toks[b]'s embedding, x (B, n_embd)."""
    _embed_rows(toks, arena, mats, qt, arch[0], lut, x)


@njit(nogil=True, cache=True)
def decode_attn(l, pos, x, h, arena, mats, qt, vecs, swa, kc, vc, arch, nt, lut, all_rows):
    """Layer l's attention on the residual stream x (1, n_embd) (in place, KV written at
    pos); then h = the FFN's input (x through the FFN norm)."""
    _layer_attn(l, np.full(1, pos, dtype=np.int64), np.zeros(1, dtype=np.int64), x, h, arena, mats, qt, vecs, swa,
                _one(kc), _one(vc), arch[0], nt, lut, all_rows)


@njit(nogil=True, cache=True)
def decode_attn_batch(l, pos, slots, x, h, arena, mats, qt, vecs, swa, kc, vc, arch, nt, lut, all_rows):
    """decode_attn for B rows x, h (B, n_embd), row b at position pos[b] in the KV
    pool's slot slots[b]."""
    _layer_attn(l, pos, slots, x, h, arena, mats, qt, vecs, swa, kc, vc, arch[0], nt, lut, all_rows)


@njit(nogil=True, cache=True)
def decode_add_ffn(l, o, x, vecs, arch):
    """x += layer l's FFN output o, both (T, n_embd) (after its post-norm, where the model has one)."""
    a = arch[0]
    _ffn_residual(o, x, vecs[l], a)


@njit(nogil=True, cache=True)
def decode_head(x, arena, mats, qt, vecs, arch, nt, lut, all_rows, logits):
    """logits (n_vocab,) = the output projection of the final-normed x (1, n_embd), finished
    as the model says."""
    _head(x, arena, mats, qt, vecs, arch[0], nt, lut, all_rows, logits.reshape((1, logits.shape[0])))


@njit(nogil=True, cache=True)
def decode_head_batch(x, arena, mats, qt, vecs, arch, nt, lut, all_rows, logits):
    """decode_head for B rows: x (B, n_embd), logits (B, n_vocab)."""
    _head(x, arena, mats, qt, vecs, arch[0], nt, lut, all_rows, logits)


@njit(inline="always")
def _embed(tok, arena, mats, qt, a, lut, x):
    i = a.n_layer * N_SLOTS
    dequant_row(qt[i], _mat(arena, mats, i)[tok], x, lut)
    if a.embed_scale != 1.0:
        for j in range(x.shape[0]):
            x[j] *= np.float32(a.embed_scale)


@njit(inline="always")
def _embed_rows(toks, arena, mats, qt, a, lut, x):
    for b in range(toks.shape[0]):
        _embed(toks[b], arena, mats, qt, a, lut, x[b])


@njit(inline="always")
def _layer_attn(l, pos, slots, x, h, arena, mats, qt, vecs, swa, kc, vc, a, nt, lut, all_rows):
    """Layer l's attention for B tokens, x and h (B, n_embd), row b at position pos[b] in
    the KV pool's slot slots[b]: layer.py's steps around products over all B rows; the
    rows' keys and values go into their caches before any row attends (in a chain of
    one slot's consecutive positions, row b reads only the rows before it and its own,
    as it would one row at a time), then all rows' attention at once (attention.py)."""
    B = x.shape[0]
    q = np.empty((B, a.n_head * a.head_dim), dtype=np.float32)
    k = np.empty((B, a.n_head_kv * a.head_dim), dtype=np.float32)
    v = np.empty((B, a.n_head_kv * a.v_head_dim), dtype=np.float32)
    att = np.empty((B, a.n_head * a.v_head_dim), dtype=np.float32)
    o = np.empty((B, a.n_embd), dtype=np.float32)
    base = l * N_SLOTS
    vl = vecs[l]
    _norm_rows(x, vl[V_ATTN_NORM], a.eps, h)
    _mv_multi(qt[base], _mat(arena, mats, base), h, q, lut, nt, all_rows)
    _mv_multi(qt[base + 1], _mat(arena, mats, base + 1), h, k, lut, nt, all_rows)
    _mv_multi(qt[base + 2], _mat(arena, mats, base + 2), h, v, lut, nt, all_rows)
    for b in range(B):  # each row's key and value into its cache, then every row's attention
        _qkv_rows(l, pos[b], q[b:b + 1], k[b:b + 1], v[b:b + 1], vl, swa[l], kc[slots[b]], vc[slots[b]], a)
    attend_rows(q, kc, vc, slots, pos, l, a.window if swa[l] else 0, a.n_head_kv, a.head_dim, a.v_head_dim,
                1.0 if a.scale_q else a.attn_scale, a.k_type, a.v_type, a.v_rot, att)
    _mv_multi(qt[base + 3], _mat(arena, mats, base + 3), att, o, lut, nt, all_rows)
    _attn_residual(o, x, h, vl, a)


@njit(inline="always")
def _head(x, arena, mats, qt, vecs, a, nt, lut, all_rows, logits):
    """logits (B, n_vocab) of the rows x (B, n_embd)."""
    i = a.n_layer * N_SLOTS + 1
    h = np.empty(x.shape, dtype=np.float32)
    _norm_rows(x, vecs[a.n_layer, V_ATTN_NORM], a.eps, h)
    _mv_multi(qt[i], _mat(arena, mats, i), h, logits, lut, nt, all_rows)
    _logits_rows(logits, a)
