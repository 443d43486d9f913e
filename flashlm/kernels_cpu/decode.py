"""One whole decode step (one token through every layer) in one compiled call.

At 100+ tokens/s a token has under 10 ms; hundreds of small Python calls per token
would eat that. `decode_step` runs embedding, every layer and the output projection
without returning to Python. Its math is the layer-by-layer path's (runtime/blocks.py,
ops.py), op for op, and the tests hold the two to the same logits.

Inputs are packed by runtime/fused.py:
    mats: typed List of weight matrices (rows, row_bytes) uint8, per layer in the
          order of SLOTS, then token embedding and output.
    qt:   int64 GGML type of each matrix.
    vecs: float32 (n_layer, N_VEC, vmax) norm weights and biases (unused ones zero).
    ip / fp: int and float settings (see the I_* and F_* indices).
"""

import numpy as np
from numba import njit, prange

from .qdot import _quantize_q8_token, dot16, f16_bits, matvec_rows, quantize_q8_serial, round_f16, rows4
from .quants import _BF16, _F16, _F32, _Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0, _Q4_K, _Q5_K, _Q6_K, dequant_row, h2f

SLOTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
N_SLOTS = len(SLOTS)
VECS = ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm",
        "attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias")
(V_ATTN_NORM, V_FFN_NORM, V_Q_NORM, V_K_NORM, V_POST_ATTN, V_POST_FFN, V_BQ, V_BK, V_BV, V_BO) = range(len(VECS))

(I_LAYERS, I_EMBD, I_HEAD, I_HEAD_KV, I_HD, I_HD_V, I_ROPE_DIM, I_NEOX, I_WINDOW, I_QK_NORM, I_POST_NORMS,
 I_GELU, I_SCALE_Q, I_BIAS, I_THREADS) = range(15)
(F_EPS, F_BASE, F_BASE_SWA, F_ROPE_SCALE, F_ATTN_SCALE, F_EMBED_SCALE, F_SOFTCAP, F_RESIDUAL, F_LOGIT_SCALE) = range(9)


@njit(nogil=True, cache=True)
def _act_block(qtype):
    if qtype == _Q4_K or qtype == _Q5_K or qtype == _Q6_K:
        return 256
    if qtype == _Q4_0 or qtype == _Q4_1 or qtype == _Q5_0 or qtype == _Q5_1 or qtype == _Q8_0:
        return 32
    return 0


@njit(nogil=True, cache=True)
def _mv(qtype, w, x, out, lut, n_threads, all_rows):
    """out = W @ x with llama.cpp's activation handling for W's type.
    all_rows: 0, 1, 2, ... (at least W's row count), made once by the caller."""
    n = w.shape[0]
    rows = all_rows[:n]
    n_chunks = max(1, min((n + 3) // 4, 4 * n_threads))
    block = _act_block(qtype)
    x2 = x.reshape(1, x.shape[0])
    if block:
        nb = x.shape[0] // block
        xq = np.empty((1, x.shape[0]), dtype=np.int8)
        xd = np.empty((1, nb), dtype=np.float32)
        xs = np.empty((1, nb), dtype=np.float32)
        isum = np.empty((1, x.shape[0] // 16 if block == 256 else nb), dtype=np.int32)
        quantize_q8_serial(x2, block, xq, xd, xs, isum)
        matvec_rows(qtype, w, rows, x, xq[0], xd[0], xs[0], isum[0], out, lut, n_chunks, False)
    else:
        xr = np.empty_like(x)
        for i in range(x.shape[0]):
            if qtype == _F16:
                xr[i] = round_f16(x[i])
            elif qtype == _BF16:
                b = np.array([x[i]]).view(np.uint32)
                b[0] = (b[0] + np.uint32(0x7FFF) + ((b[0] >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
                xr[i] = b.view(np.float32)[0]
            else:
                xr[i] = x[i]
        e8 = np.empty(0, dtype=np.int8)
        ef = np.empty(0, dtype=np.float32)
        matvec_rows(qtype, w, rows, xr, e8, ef, ef, np.empty(0, dtype=np.int32), out, lut, n_chunks, True)


@njit(nogil=True, cache=True)
def _rmsnorm(x, w, eps, out):
    s = 0.0
    for i in range(x.shape[0]):
        s += np.float64(x[i]) * np.float64(x[i])
    scale = np.float32(1.0) / np.sqrt(np.float32(s / x.shape[0]) + np.float32(eps))
    for i in range(x.shape[0]):
        out[i] = x[i] * scale * w[i]


@njit(nogil=True, cache=True)
def _rope(x, n_heads, hd, pos, n_rot, base, scale, neox):
    half = n_rot // 2
    ts = np.float32(base) ** np.float32(-2.0 / n_rot)
    theta = np.float32(pos)
    for i in range(half):
        t = theta * np.float32(scale)
        c = np.float32(np.cos(t))
        s = np.float32(np.sin(t))
        for h in range(n_heads):
            o = h * hd
            if neox:
                a = x[o + i]; b = x[o + i + half]
                x[o + i] = a * c - b * s
                x[o + i + half] = a * s + b * c
            else:
                a = x[o + 2 * i]; b = x[o + 2 * i + 1]
                x[o + 2 * i] = a * c - b * s
                x[o + 2 * i + 1] = a * s + b * c
        theta = theta * ts


def _gelu_table() -> np.ndarray:
    # ggml's GELU table: the tanh form in float32 at every f16 input, rounded to f16.
    x = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    c = np.float32(0.7978845608028654)
    with np.errstate(all="ignore"):
        y = np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * x * (np.float32(1.0) + np.float32(0.044715) * x * x)))
        return y.astype(np.float16).astype(np.float32)


GELU_TABLE = _gelu_table()


@njit(nogil=True, cache=True)
def _gelu(x):
    # As ggml: 0 below -10, x above 10, else the table at x rounded to f16.
    if x <= -10.0:
        return np.float32(0.0)
    if x >= 10.0:
        return x
    return GELU_TABLE[f16_bits(x)]


@njit(nogil=True, cache=True)
def glu_rows(g, u, gelu, out, r0, r1):
    """out = act(g) * u for rows r0..r1-1 of (T, n) arrays: act GELU (ggml's f16
    rounding) if gelu else SiLU, the same formulas as the decode step."""
    for r in range(r0, r1):
        for j in range(g.shape[1]):
            gi = g[r, j]
            a = _gelu(gi) if gelu else gi / (np.float32(1.0) + np.float32(np.exp(-gi)))
            out[r, j] = a * u[r, j]


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _attend_head(q, qo, kc, vc, layer, kvh, pos, window, hd, hd_v, scale, s, qh, out, oo):
    """One head of one query at position `pos` over cached positions 0..pos (the last
    `window` of them if window > 0): out[oo:oo+hd_v]. q and the attention weights are
    rounded to f16 as llama.cpp does. s, qh: scratch of n_ctx and hd floats."""
    start = 0
    if window > 0 and pos - window + 1 > 0:
        start = pos - window + 1
    L = pos + 1
    for i in range(hd):
        qh[i] = round_f16(q[qo + i])
    k = kc[layer, kvh]
    v = vc[layer, kvh]
    m = np.float32(-np.inf)
    for t in range(start, L):
        kt = k[t]
        acc = np.float32(0.0)
        for i in range(hd):
            acc += qh[i] * h2f(kt[i])
        acc *= np.float32(scale)
        s[t] = acc
        if acc > m:
            m = acc
    tot = np.float32(0.0)
    for t in range(start, L):
        e = np.float32(np.exp(s[t] - m))
        s[t] = e
        tot += e
    o = out[oo:oo + hd_v]
    o[:] = 0.0
    for t in range(start, L):
        p = round_f16(s[t] / tot)
        vt = v[t]
        for i in range(hd_v):
            o[i] += p * h2f(vt[i])


@njit(nogil=True, cache=True)
def _attend(q, kc, vc, layer, pos, n_head, n_kv, hd, hd_v, scale, window, out):
    """Decode attention of one query (all heads) over cached positions 0..pos."""
    g = n_head // n_kv
    s = np.empty(pos + 1, dtype=np.float32)
    qh = np.empty(hd, dtype=np.float32)
    for h in range(n_head):
        _attend_head(q, h * hd, kc, vc, layer, h // g, pos, window, hd, hd_v, scale, s, qh, out, h * hd_v)


@njit(nogil=True, cache=True)
def attend_queries(q, kc, vc, layer, pos0, n_head, n_kv, hd, hd_v, scale, window, out, h0, h1):
    """Prefill attention, causal: queries q (T, n_head * hd) at positions pos0.. over
    the cache (already holding them), heads h0..h1-1 only (a thread's share).
    kc, vc: float16 bits as uint16. out: (T, n_head * hd_v)."""
    g = n_head // n_kv
    T = q.shape[0]
    s = np.empty(pos0 + T, dtype=np.float32)
    qh = np.empty(hd, dtype=np.float32)
    for h in range(h0, h1):
        for t in range(T):
            _attend_head(q[t], h * hd, kc, vc, layer, h // g, pos0 + t, window, hd, hd_v, scale, s, qh,
                         out[t], h * hd_v)


@njit(inline="always")
def _mat(arena, mats, i):
    o = mats[i, 0]
    return arena[o:o + mats[i, 1] * mats[i, 2]].reshape((mats[i, 1], mats[i, 2]))


@njit(nogil=True, cache=True)
def decode_step(tok, pos, arena, mats, qt, vecs, swa, kc, vc, ip, fp, lut, all_rows, logits):
    """Run token `tok` at position `pos`: fill the KV caches kc/vc (float16 bits as
    uint16, (n_layer, n_kv, n_ctx, hd)) and write the logits.

    Weight matrix i is _mat(arena, mats, i) = (offset, rows, row_bytes) in the byte buffer `arena`
    (the mapped model file), in SLOTS order per layer, then token_embd and output."""
    n_layer = ip[I_LAYERS]; d = ip[I_EMBD]
    gelu = ip[I_GELU] != 0; post_norms = ip[I_POST_NORMS] != 0; nt = ip[I_THREADS]
    x = np.empty(d, dtype=np.float32)
    h = np.empty(d, dtype=np.float32)
    o = np.empty(d, dtype=np.float32)
    _embed(tok, arena, mats, qt, ip, fp, lut, x)
    for l in range(n_layer):
        _layer_attn(l, pos, x, h, arena, mats, qt, vecs, swa, kc, vc, ip, fp, lut, all_rows)
        base = l * N_SLOTS
        n_ff = _mat(arena, mats, base + 5).shape[0]
        g = np.empty(n_ff, dtype=np.float32)
        u = np.empty(n_ff, dtype=np.float32)
        _mv(qt[base + 4], _mat(arena, mats, base + 4), h, g, lut, nt, all_rows)
        _mv(qt[base + 5], _mat(arena, mats, base + 5), h, u, lut, nt, all_rows)
        for i in range(n_ff):
            gi = g[i]
            a = _gelu(gi) if gelu else gi / (np.float32(1.0) + np.float32(np.exp(-gi)))
            g[i] = a * u[i]
        _mv(qt[base + 6], _mat(arena, mats, base + 6), g, o, lut, nt, all_rows)
        _add_ffn(l, o, x, vecs, post_norms, fp[F_EPS], fp[F_RESIDUAL])
    _head(x, arena, mats, qt, vecs, ip, fp, lut, all_rows, logits)


# -- the same step in pieces, for a model whose FFN weights are not all in memory
# (flashload): Python calls decode_embed, then per layer decode_attn, the store's FFN
# and decode_add_ffn, then decode_head. The math is decode_step's, the same inlined code.


@njit(nogil=True, cache=True)
def decode_embed(tok, arena, mats, qt, ip, fp, lut, x):
    """x = token tok's embedding (scaled as the model says)."""
    _embed(tok, arena, mats, qt, ip, fp, lut, x)


@njit(nogil=True, cache=True)
def decode_attn(l, pos, x, h, arena, mats, qt, vecs, swa, kc, vc, ip, fp, lut, all_rows):
    """Layer l's attention on the residual stream x (in place, KV written at pos); then
    h = the FFN's input (x through the FFN norm)."""
    _layer_attn(l, pos, x, h, arena, mats, qt, vecs, swa, kc, vc, ip, fp, lut, all_rows)


@njit(nogil=True, cache=True)
def decode_add_ffn(l, o, x, vecs, ip, fp):
    """x += layer l's FFN output o (after its post-norm, where the model has one)."""
    _add_ffn(l, o, x, vecs, ip[I_POST_NORMS] != 0, fp[F_EPS], fp[F_RESIDUAL])


@njit(nogil=True, cache=True)
def decode_head(x, arena, mats, qt, vecs, ip, fp, lut, all_rows, logits):
    """logits = the output projection of the final-normed x (soft-capped where the model says)."""
    _head(x, arena, mats, qt, vecs, ip, fp, lut, all_rows, logits)



@njit(inline="always")
def _embed(tok, arena, mats, qt, ip, fp, lut, x):
    n_layer = ip[I_LAYERS]
    dequant_row(qt[n_layer * N_SLOTS], _mat(arena, mats, n_layer * N_SLOTS)[tok], x, lut)
    if fp[F_EMBED_SCALE] != 1.0:
        for i in range(x.shape[0]):
            x[i] *= np.float32(fp[F_EMBED_SCALE])


@njit(inline="always")
def _layer_attn(l, pos, x, h, arena, mats, qt, vecs, swa, kc, vc, ip, fp, lut, all_rows):
    d = ip[I_EMBD]; n_head = ip[I_HEAD]; n_kv = ip[I_HEAD_KV]
    hd = ip[I_HD]; hd_v = ip[I_HD_V]; n_rot = ip[I_ROPE_DIM]; neox = ip[I_NEOX] != 0
    window = ip[I_WINDOW]; qk_norm = ip[I_QK_NORM] == 1; post_norms = ip[I_POST_NORMS] != 0
    qk_norm_full = ip[I_QK_NORM] == 2  # over the whole projections (olmoe), not per head
    scale_q = ip[I_SCALE_Q] != 0; bias = ip[I_BIAS] != 0; nt = ip[I_THREADS]
    eps = fp[F_EPS]
    q = np.empty(n_head * hd, dtype=np.float32)
    k = np.empty(n_kv * hd, dtype=np.float32)
    v = np.empty(n_kv * hd_v, dtype=np.float32)
    att = np.empty(n_head * hd_v, dtype=np.float32)
    o = np.empty(d, dtype=np.float32)
    base = l * N_SLOTS
    vl = vecs[l]
    _rmsnorm(x, vl[V_ATTN_NORM], eps, h)
    _mv(qt[base], _mat(arena, mats, base), h, q, lut, nt, all_rows)
    _mv(qt[base + 1], _mat(arena, mats, base + 1), h, k, lut, nt, all_rows)
    _mv(qt[base + 2], _mat(arena, mats, base + 2), h, v, lut, nt, all_rows)
    if bias:
        for i in range(q.shape[0]):
            q[i] += vl[V_BQ, i]
        for i in range(k.shape[0]):
            k[i] += vl[V_BK, i]
        for i in range(v.shape[0]):
            v[i] += vl[V_BV, i]
    if qk_norm:
        for hh in range(n_head):
            _rmsnorm(q[hh * hd:(hh + 1) * hd], vl[V_Q_NORM, :hd], eps, q[hh * hd:(hh + 1) * hd])
        for hh in range(n_kv):
            _rmsnorm(k[hh * hd:(hh + 1) * hd], vl[V_K_NORM, :hd], eps, k[hh * hd:(hh + 1) * hd])
    if qk_norm_full:
        _rmsnorm(q, vl[V_Q_NORM, :q.shape[0]], eps, q)
        _rmsnorm(k, vl[V_K_NORM, :k.shape[0]], eps, k)
    is_swa = swa[l]
    rb = fp[F_BASE_SWA] if is_swa else fp[F_BASE]
    rs = 1.0 if is_swa else fp[F_ROPE_SCALE]
    _rope(q, n_head, hd, pos, n_rot, rb, rs, neox)
    _rope(k, n_kv, hd, pos, n_rot, rb, rs, neox)
    for hh in range(n_kv):
        for i in range(hd):
            kc[l, hh, pos, i] = np.uint16(f16_bits(k[hh * hd + i]))
        for i in range(hd_v):
            vc[l, hh, pos, i] = np.uint16(f16_bits(v[hh * hd_v + i]))
    sc = fp[F_ATTN_SCALE]
    if scale_q:
        for i in range(q.shape[0]):
            q[i] *= np.float32(sc)
        sc = 1.0
    _attend(q, kc, vc, l, pos, n_head, n_kv, hd, hd_v, sc, window if is_swa else 0, att)
    _mv(qt[base + 3], _mat(arena, mats, base + 3), att, o, lut, nt, all_rows)
    if bias:
        for i in range(d):
            o[i] += vl[V_BO, i]
    if post_norms:
        _rmsnorm(o, vl[V_POST_ATTN], eps, o)
    rs = np.float32(fp[F_RESIDUAL])
    for i in range(d):
        x[i] += o[i] * rs
    _rmsnorm(x, vl[V_FFN_NORM], eps, h)


@njit(inline="always")
def _add_ffn(l, o, x, vecs, post_norms, eps, residual_scale):
    if post_norms:
        _rmsnorm(o, vecs[l, V_POST_FFN], eps, o)
    rs = np.float32(residual_scale)
    for i in range(x.shape[0]):
        x[i] += o[i] * rs


@njit(inline="always")
def _head(x, arena, mats, qt, vecs, ip, fp, lut, all_rows, logits):
    n_layer = ip[I_LAYERS]
    h = np.empty(x.shape[0], dtype=np.float32)
    _rmsnorm(x, vecs[n_layer, V_ATTN_NORM], fp[F_EPS], h)
    _mv(qt[n_layer * N_SLOTS + 1], _mat(arena, mats, n_layer * N_SLOTS + 1), h, logits, lut, ip[I_THREADS], all_rows)
    if fp[F_LOGIT_SCALE] != 1.0:
        inv = np.float32(1.0 / fp[F_LOGIT_SCALE])  # as llama.cpp: times the reciprocal
        for i in range(logits.shape[0]):
            logits[i] = logits[i] * inv
    if fp[F_SOFTCAP] != 0.0:
        c = np.float32(fp[F_SOFTCAP])
        for i in range(logits.shape[0]):
            logits[i] = np.float32(np.tanh(logits[i] / c)) * c


@njit(inline="always")
def _prep(qtype, x, t, xr, xq, xd, xs, isum):
    """Row t of x (T, n) in the form a matvec on qtype's weights reads: quantized to 8
    bits with the format's activation block (xq, xd, xs, isum), or for float formats
    rounded as llama.cpp rounds it (xr)."""
    block = _act_block(qtype)
    if block:
        _quantize_q8_token(x, t, block, xq, xd, xs, isum)
        return
    for i in range(x.shape[1]):
        if qtype == _F16:
            xr[t, i] = round_f16(x[t, i])
        elif qtype == _BF16:
            b = np.array([x[t, i]]).view(np.uint32)
            b[0] = (b[0] + np.uint32(0x7FFF) + ((b[0] >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
            xr[t, i] = b.view(np.float32)[0]
        else:
            xr[t, i] = x[t, i]


@njit(inline="always")
def _n_blocks(qtype, n):
    block = _act_block(qtype)
    return n // block if block else 0


@njit(inline="always")
def _n_sums(qtype, n):
    block = _act_block(qtype)
    return n // 16 if block == 256 else (n // block if block else 0)


@njit(nogil=True, cache=True)
def moe_route(w, qtype, x, sigmoid, norm, scale, lut, all_rows, ids, wts, p):
    """One token's routing, as experts/moe.route: p = softmax (or sigmoid) of the router
    W (n_expert, row_bytes) times x; ids (k,) the k most probable experts, best first
    (ties: the lower id); wts their probabilities, / their sum if norm, * scale if set."""
    n = w.shape[0]
    if qtype == _F32:  # a float32 router (the usual): rows straight from the mapping
        _f32_rows(w, x, p)
    else:
        _mv(qtype, w, x, p, lut, 1, all_rows)
    if sigmoid:
        for i in range(n):
            p[i] = np.float32(1.0) / (np.float32(1.0) + np.float32(np.exp(-p[i])))
    else:
        m = p[0]
        for i in range(1, n):
            m = max(m, p[i])
        tot = np.float32(0.0)
        for i in range(n):
            p[i] = np.float32(np.exp(p[i] - m))
            tot += p[i]
        for i in range(n):
            p[i] = p[i] / tot
    taken = np.zeros(n, dtype=np.bool_)
    tot = np.float32(0.0)
    for j in range(ids.shape[0]):  # the k largest in turn, ties to the lower id (a stable sort's order; NaN last)
        b = -1
        for i in range(n):
            if not taken[i] and (b < 0 or p[i] > p[b] or (p[b] != p[b] and p[i] == p[i])):
                b = i
        taken[b] = True
        ids[j] = b
        wts[j] = p[b]
        tot += wts[j]
    if norm:
        d = max(tot, np.float32(6.103515625e-5))  # llama.cpp's clamp
        for j in range(ids.shape[0]):
            wts[j] = wts[j] / d
    if scale != 0.0:
        for j in range(ids.shape[0]):
            wts[j] = wts[j] * np.float32(scale)


@njit(inline="always")
def _f32_rows(w, x, out):
    """out = W @ x for a float32 W (rows of bytes) read in place, each row as _float_row
    sums it (dot16: the same float32 result), with no copy of the row."""
    acc = np.empty(16, dtype=np.float32)
    for r in range(w.shape[0]):
        out[r] = dot16(w[r].view(np.float32), x, acc)


@njit(nogil=True, cache=True)
def moe_route_ahead(w, qtype, x, sigmoid, norm, scale, lut, all_rows, ids, wts, p, w2, qtype2, all_rows2, ids2,
                    wts2, p2):
    """moe_route for this layer's router w, and the next layer's router w2 on the same x
    (ids2: its k most probable experts, to prefetch): one call instead of two."""
    moe_route(w, qtype, x, sigmoid, norm, scale, lut, all_rows, ids, wts, p)
    moe_route(w2, qtype2, x, sigmoid, norm, scale, lut, all_rows2, ids2, wts2, p2)


@njit(inline="always")
def _act_bufs(t, n):
    """Room for t activation vectors of n in every form _prep writes: (xr, xq, xd, xs, isum)."""
    return (np.empty((t, n), dtype=np.float32), np.empty((t, n), dtype=np.int8),
            np.empty((t, n // 32 + 1), dtype=np.float32), np.empty((t, n // 32 + 1), dtype=np.float32),
            np.empty((t, n // 16 + 1), dtype=np.int32))


@njit(inline="always")
def _row_bufs(n):
    """One thread's rows4 arguments: (rows, next rows, results, float scratch of n)."""
    return (np.empty(4, dtype=np.int64), np.empty(4, dtype=np.int64), np.empty(4, dtype=np.float32),
            np.empty(n, dtype=np.float32))


@njit(inline="always")
def _group4(i0, n, r4, p4):
    """Rows i0..i0+3 and the 4 after them (to prefetch), clamped to n rows."""
    for q in range(4):
        r4[q] = min(i0 + q, n - 1)
        p4[q] = min(i0 + 4 + q, n - 1)


@njit(nogil=True, cache=True)
def moe_decode(buf, offs, shapes, qts, x, w, gelu, lut, nt, all_rows, out):
    """out += sum_j w[j] * down_j(act(gate_j x) * up_j x): one token's routed experts.
    Expert j's gate, up and down matrices start at byte offsets offs[j] of buf;
    shapes[p] = (rows, row_bytes) and qts[p] = GGML type of part p (gate, up, down)."""
    k = offs.shape[0]
    y = np.empty((k, shapes[2, 0]), dtype=np.float32)
    moe_experts(buf, offs, np.arange(k), shapes, qts, x, gelu, lut, nt, all_rows, y)
    moe_combine(y, w, out)


@njit(nogil=True, cache=True)
def moe_combine(y, w, out):
    """out += sum_j w[j] * y[j], each output summed over the experts in order (as
    adding each expert's down product to out would)."""
    for i in range(out.shape[0]):
        acc = out[i]
        for j in range(y.shape[0]):
            acc += w[j] * y[j, i]
        out[i] = acc


@njit(nogil=True, cache=True, parallel=True)
def moe_experts(buf, offs, sel, shapes, qts, x, gelu, lut, nt, all_rows, y):
    """y[j] = down_j(act(gate_j x) * up_j x) for the experts j in sel (offsets offs[j] of
    buf, as moe_decode): a token's experts in parts, so the cached ones compute while
    the others are read; moe_combine then sums them in order, as one call would.

    Three parallel loops, not three per expert: every expert's gate and up rows, then
    each expert's activation (quantized for down's type), then each output row's down
    products for every expert."""
    k = sel.shape[0]
    n_in = x.shape[0]
    n_ff = shapes[0, 0]
    n_out = shapes[2, 0]
    # x as gate (0) and up (1) read it
    xx = np.empty((2, n_in), dtype=np.float32)
    xx[0] = x
    xx[1] = x
    xr, xq, xd, xs, xi = _act_bufs(2, n_in)
    for p in range(2):
        _prep(qts[p], xx, p, xr, xq, xd, xs, xi)
    nb0, nb1 = _n_blocks(qts[0], n_in), _n_blocks(qts[1], n_in)
    ns0, ns1 = _n_sums(qts[0], n_in), _n_sums(qts[1], n_in)
    gu = np.empty((2, k, n_ff), dtype=np.float32)
    groups = (n_ff + 3) // 4
    tasks = 2 * k * groups
    n_chunks = max(1, min(tasks, 4 * nt))
    step = (tasks + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        r4, p4, o4, scratch = _row_bufs(n_in)
        for t in range(c * step, min(tasks, (c + 1) * step)):
            p = t // (k * groups)
            j = t // groups % k
            i0 = 4 * (t % groups)
            _group4(i0, n_ff, r4, p4)
            qt = qts[p]
            nb = nb0 if p == 0 else nb1
            ns = ns0 if p == 0 else ns1
            rows4(qt, _part(buf, offs[sel[j], p], shapes[p]), r4, p4, xr[p], xq[p], xd[p, :nb], xs[p, :nb],
                  xi[p, :ns], o4, scratch, lut, _act_block(qt) == 0)
            for q in range(min(4, n_ff - i0)):
                gu[p, j, i0 + q] = o4[q]
    # each expert's activation, as down reads it
    qd = qts[2]
    a = np.empty((k, n_ff), dtype=np.float32)
    ar, aq, ad, as_, ai = _act_bufs(k, n_ff)
    for j in prange(k):
        for i in range(n_ff):
            gi = gu[0, j, i]
            act = _gelu(gi) if gelu else gi / (np.float32(1.0) + np.float32(np.exp(-gi)))
            a[j, i] = act * gu[1, j, i]
        _prep(qd, a, j, ar, aq, ad, as_, ai)
    nbd, nsd = _n_blocks(qd, n_ff), _n_sums(qd, n_ff)
    groups = (n_out + 3) // 4
    n_chunks = max(1, min(groups, 4 * nt))
    step = (groups + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        r4, p4, o4, scratch = _row_bufs(n_ff)
        for g in range(c * step, min(groups, (c + 1) * step)):
            i0 = 4 * g
            _group4(i0, n_out, r4, p4)
            for j in range(k):
                rows4(qd, _part(buf, offs[sel[j], 2], shapes[2]), r4, p4, ar[j], aq[j], ad[j, :nbd], as_[j, :nbd],
                      ai[j, :nsd], o4, scratch, lut, nbd == 0)
                for q in range(min(4, n_out - i0)):
                    y[sel[j], i0 + q] = o4[q]


@njit(inline="always")
def _part(buf, o, shape):
    return buf[o:o + shape[0] * shape[1]].reshape((shape[0], shape[1]))
