"""Attention over the KV cache, and the cache's row formats: float16 (llama.cpp's default
cache type), or GGML's Q8_0 and Q4_0 blocks (llama.cpp's `-ctk`/`-ctv q8_0|q4_0`).

A cache is (n_layer, n_kv, positions, words) uint16 per k and v (a pool of them has a
leading slot axis): one row per (layer, KV head, position), in the cache type's layout:

    f16   hd words                       the float16 bits of each element
    q8_0  hd / 32 blocks of 17 words     GGML's block_q8_0 (34 bytes): d f16 | qs int8[32]
    q4_0  hd / 32 blocks of 9 words      GGML's block_q4_0 (18 bytes): d f16 | qs[16]

(Both blocks are an even number of bytes, so a row of blocks is a row of uint16 words,
and every cache type is one array type to numba: one compiled variant of each kernel.)
Rows are written as llama.cpp's reference quantize_row_q8_0 / q4_0 write them (and
gguf-py's numpy `quantize`, the tests' oracle), one per token and KV head, when the
token's keys and values are computed (layer.py's `_qkv_rows`).

Attention reads the rows where they lie; nothing dequantizes the cache. A query's
attention is three steps, each on all the query heads of a KV head's group at once (GQA:
each cached row is read once for the group):

    _scores    q . k for every position: quantized keys in integer dot products with
               the query quantized to Q8_0 blocks (llama.cpp's vec_dot for K q8_0/q4_0),
               float16 keys in float products with the query rounded to float16
    _softmax   in float32; for a float16 V cache each weight rounded to float16, as
               llama.cpp's default path rounds them for its f16 product with V
    _values    the weighted sum of the value rows, each converted to float32 once (a
               quantized row block by block), in position order for each element

Prefill (`attend_queries`) runs them one (token, KV head) after another on a prefill
thread's share; a decoded token (`attend_rows`, on numba's threads) shares each step
among the threads by what it is made of: the scores by chunks of CHUNK positions, the
softmax by query heads, the values by 32-element blocks of the output. Every element is
computed the same way in all of them, so a row's attention is the same bit for bit in
prefill, a decode step, a batch and a speculative verification, on any thread count.
"""

import numpy as np
from numba import njit, prange

from .qdot import _round_half_away, f16_bits, round_f16
from .quants import _F16, _Q4_0, _Q8_0, h2f
from .simd import dot_ss, fma_i, hsum, load32, load_nibbles, sub_each, zeros_f

F16, Q8_0, Q4_0 = _F16, _Q8_0, _Q4_0  # GGML's type ids, the cache types' codes
CACHE_TYPES = {"f16": F16, "q8_0": Q8_0, "q4_0": Q4_0}
TYPE_NAMES = {v: k for k, v in CACHE_TYPES.items()}
_BLOCK_WORDS = {F16: 0, Q8_0: 17, Q4_0: 9}  # uint16 words of a 32-element block (f16: not blocked)
CHUNK = 256  # positions per unit of a decoded token's scores (attend_rows)


def row_words(cache_type: int, n: int) -> int:
    """uint16 words of one cached row of n elements in cache_type (n a multiple of 32
    for the block types)."""
    return n if cache_type == F16 else n // 32 * _BLOCK_WORDS[cache_type]


# -- writing rows -----------------------------------------------------------------------


@njit(inline="always")
def _roundf(v):
    """C's roundf (halves away from zero), exactly: gguf-py's np_roundf."""
    a = abs(v)
    f = np.float32(np.floor(a))
    r = f + np.float32(np.floor(np.float32(2.0) * (a - f)))
    return -r if v < 0 else r


@njit(inline="always")
def _put_row(cache_type, x, xo, n, row):
    """row (uint16 words) = x[xo:xo + n] in cache_type's layout."""
    if cache_type == F16:
        for i in range(n):
            row[i] = np.uint16(f16_bits(x[xo + i]))
    elif cache_type == Q8_0:  # quantize_row_q8_0_ref: d = amax / 127, q = roundf(x / d)
        r8 = row.view(np.int8)
        for b in range(n // 32):
            o = xo + 32 * b
            amax = np.float32(0.0)
            for j in range(32):
                amax = max(amax, abs(x[o + j]))
            d = amax / np.float32(127.0)
            idv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            row[17 * b] = np.uint16(f16_bits(d))
            for j in range(32):
                r8[34 * b + 2 + j] = np.int8(_roundf(x[o + j] * idv))
    else:  # Q4_0, quantize_row_q4_0_ref: d = max / -8 (the signed max), q = min(15, x / d + 8.5)
        r8 = row.view(np.uint8)
        for b in range(n // 32):
            o = xo + 32 * b
            amax = np.float32(0.0)
            vmax = np.float32(0.0)
            for j in range(32):
                if abs(x[o + j]) > amax:
                    amax = abs(x[o + j])
                    vmax = x[o + j]
            d = vmax / np.float32(-8.0)
            idv = np.float64(np.float32(1.0) / d if d != 0 else np.float32(0.0))
            row[9 * b] = np.uint16(f16_bits(d))
            for j in range(16):
                # x * id + 8.5 as ggml's C computes it (fused: gguf-py's float64 product),
                # rounded to float32, truncated
                c0 = min(15, np.int64(np.float32(np.float64(x[o + j]) * idv + 8.5)))
                c1 = min(15, np.int64(np.float32(np.float64(x[o + 16 + j]) * idv + 8.5)))
                r8[18 * b + 2 + j] = np.uint8(c0 | (c1 << 4))


@njit(nogil=True, cache=True)
def quantize_rows(cache_type, x, out):
    """out[r] = x[r] (R, n) float32 as cached rows of cache_type (R, row_words) uint16."""
    for r in range(x.shape[0]):
        _put_row(cache_type, x[r], 0, x.shape[1], out[r])


@njit(inline="always")
def _row_f32(cache_type, rows, t, n, out):
    """out[:n] = cached row t of rows (positions, words) as float32."""
    if cache_type == F16:
        for i in range(n):
            out[i] = h2f(rows[t, i])
    elif cache_type == Q8_0:
        r8 = rows.view(np.int8)
        for b in range(n // 32):
            d = h2f(rows[t, 17 * b])
            for j in range(32):
                out[32 * b + j] = np.float32(r8[t, 34 * b + 2 + j]) * d
    else:
        r8 = rows.view(np.uint8)
        for b in range(n // 32):
            d = h2f(rows[t, 9 * b])
            for j in range(16):
                c = r8[t, 18 * b + 2 + j]
                out[32 * b + j] = np.float32(np.int32(c & 15) - 8) * d
                out[32 * b + 16 + j] = np.float32(np.int32(c >> 4) - 8) * d


@njit(nogil=True, cache=True)
def dequantize_rows(cache_type, rows, out):
    """out (R, n) float32 = the cached rows (R, row_words) of cache_type."""
    for r in range(rows.shape[0]):
        _row_f32(cache_type, rows, r, out.shape[1], out[r])


# -- attention --------------------------------------------------------------------------


@njit(inline="always")
def _query(q, qo, g, hd, k_type, qf, qq, qd):
    """The g query heads at q[qo:] as k_type's dot product reads them: float16 keys,
    rounded to float16 (qf); quantized keys, quantized to Q8_0 blocks (qq, scales qd),
    as llama.cpp quantizes the activations of a q8_0 or q4_0 product."""
    for h in range(g):
        o = qo + h * hd
        if k_type == F16:
            for i in range(hd):
                qf[h, i] = round_f16(q[o + i])
            continue
        for b in range(hd // 32):
            amax = np.float32(0.0)
            for j in range(32):
                amax = max(amax, abs(q[o + 32 * b + j]))
            d = amax / np.float32(127.0)
            idv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            for j in range(32):
                qq[h, 32 * b + j] = np.int8(_round_half_away(q[o + 32 * b + j] * idv))
            qd[h, b] = round_f16(d)


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _scores(k, k_type, t0, t1, g, hd, qf, qq, qd, scale, s, so):
    """s[h, so + t - t0] = the attention score of query head h (of g, prepared by _query)
    and the cached key t, for t in t0..t1-1 of one KV head's rows k (positions, words)."""
    if k_type == F16:
        for t in range(t0, t1):
            kr = k[t]
            for h in range(g):
                acc = np.float32(0.0)
                for i in range(hd):
                    acc += qf[h, i] * h2f(kr[i])
                acc *= np.float32(scale)
                s[h, so + t - t0] = acc
    elif k_type == Q8_0:
        k8 = k.view(np.int8)
        for t in range(t0, t1):
            kr = k8[t]
            for h in range(g):
                acc = zeros_f()
                for b in range(hd // 32):
                    acc = fma_i(dot_ss(load32(kr, 34 * b + 2), load32(qq[h], 32 * b)), h2f(k[t, 17 * b]) * qd[h, b],
                                acc)
                s[h, so + t - t0] = hsum(acc) * np.float32(scale)
    else:
        k8 = k.view(np.uint8)
        for t in range(t0, t1):
            kr = k8[t]
            for h in range(g):
                acc = zeros_f()
                for b in range(hd // 32):
                    acc = fma_i(dot_ss(sub_each(load_nibbles(kr, 18 * b + 2), 8), load32(qq[h], 32 * b)),
                                h2f(k[t, 9 * b]) * qd[h, b], acc)
                s[h, so + t - t0] = hsum(acc) * np.float32(scale)


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _softmax(s, n, round_p):
    """s[:n] = the softmax of the scores s[:n]: each weight rounded to float16 where
    round_p (float16 values: llama.cpp multiplies them with weights it converted to f16)."""
    m = np.float32(-np.inf)
    for t in range(n):
        if s[t] > m:
            m = s[t]
    tot = np.float32(0.0)
    for t in range(n):
        e = np.float32(np.exp(s[t] - m))
        s[t] = e
        tot += e
    if round_p:
        for t in range(n):
            s[t] = round_f16(s[t] / tot)
    else:
        for t in range(n):
            s[t] = s[t] / tot


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _values(v, v_type, t0, t1, g, p, out, oo, hd_v, i0, i1):
    """out[oo + h * hd_v + i] = the sum over t in t0..t1-1 of p[h, t - t0] * value t's
    element i, for i in i0..i1-1 (a whole row, or a 32-element block of it) and each of
    the g query heads, from one KV head's rows v (positions, words)."""
    n = i1 - i0
    vf = np.empty(n, dtype=np.float32)
    for h in range(g):
        for i in range(n):
            out[oo + h * hd_v + i0 + i] = 0.0
    for t in range(t0, t1):
        if v_type == F16:
            for i in range(n):
                vf[i] = h2f(v[t, i0 + i])
        elif v_type == Q8_0:
            v8 = v.view(np.int8)
            for b in range(n // 32):
                w = (i0 // 32 + b) * 17
                d = h2f(v[t, w])
                for j in range(32):
                    vf[32 * b + j] = np.float32(v8[t, 2 * w + 2 + j]) * d
        else:
            v8 = v.view(np.uint8)
            for b in range(n // 32):
                w = (i0 // 32 + b) * 9
                d = h2f(v[t, w])
                for j in range(16):
                    c = v8[t, 2 * w + 2 + j]
                    vf[32 * b + j] = np.float32(np.int32(c & 15) - 8) * d
                    vf[32 * b + 16 + j] = np.float32(np.int32(c >> 4) - 8) * d
        for h in range(g):
            ph = p[h, t - t0]
            o = out[oo + h * hd_v + i0:oo + h * hd_v + i1]
            for i in range(n):
                o[i] += ph * vf[i]


@njit(inline="always")
def _span(pos, window):
    """The positions a query at pos attends to: [start, pos + 1)."""
    start = 0
    if window > 0 and pos - window + 1 > 0:
        start = pos - window + 1
    return start


def row_elems(cache_type: int, words: int) -> int:
    """Elements of a cached row of `words` uint16 words in cache_type."""
    return words if cache_type == F16 else words // _BLOCK_WORDS[cache_type] * 32


@njit(nogil=True, cache=True)
def attend_queries(q, kc, vc, layer, pos0, n_head, n_kv, hd, hd_v, scale, window, k_type, v_type, out, u0, u1):
    """Causal attention of queries q (T, n_head * hd) at positions pos0.. over a cache
    that already holds them: units u0..u1-1 (a thread's share) of the T * n_kv units
    (token t = u // n_kv, KV head u % n_kv with its query heads). kc, vc: (n_layer, n_kv,
    positions, words) uint16 rows of k_type, v_type; out: (T, n_head * hd_v)."""
    g = n_head // n_kv
    qf, qq, qd = _query_scratch(g, hd)
    s = np.empty((g, pos0 + q.shape[0]), dtype=np.float32)
    for u in range(u0, u1):
        t, kvh = u // n_kv, u % n_kv
        pos = pos0 + t
        start = _span(pos, window)
        _query(q[t], kvh * g * hd, g, hd, k_type, qf, qq, qd)
        _scores(kc[layer, kvh], k_type, start, pos + 1, g, hd, qf, qq, qd, scale, s, 0)
        for h in range(g):
            _softmax(s[h], pos + 1 - start, v_type == F16)
        _values(vc[layer, kvh], v_type, start, pos + 1, g, s, out[t], kvh * g * hd_v, hd_v, 0, hd_v)


@njit(inline="always")
def _query_scratch(g, hd):
    return (np.empty((g, hd), dtype=np.float32), np.empty((g, hd), dtype=np.int8),
            np.empty((g, hd // 32), dtype=np.float32))


@njit(nogil=True, cache=True, parallel=True)
def attend_rows(q, kc, vc, slots, pos, layer, window, n_kv, hd, hd_v, scale, k_type, v_type, out):
    """Attention of B decoded tokens, q (B, n_head * hd), row b at position pos[b] in the
    cache pool's slot slots[b] (kc, vc: (n_slots, n_layer, n_kv, positions, words)),
    which already holds its key and value: out (B, n_head * hd_v), each row what
    attend_queries gives it, bit for bit. The threads share the scores by (row, KV head,
    CHUNK positions), the softmax by (row, head) and the values by (row, KV head, 32
    elements of the row)."""
    B = q.shape[0]
    n_head = q.shape[1] // hd
    g = n_head // n_kv
    span = 0
    n_a = 0
    for b in range(B):
        start = _span(pos[b], window)
        span = max(span, pos[b] + 1 - start)
        n_a += n_kv * (pos[b] // CHUNK - start // CHUNK + 1)
    s = np.empty((B, n_head, span), dtype=np.float32)
    units = np.empty((n_a, 3), dtype=np.int64)  # (row, KV head, chunk)
    u = 0
    for b in range(B):
        c0 = _span(pos[b], window) // CHUNK
        for kvh in range(n_kv):
            for c in range(c0, pos[b] // CHUNK + 1):
                units[u, 0], units[u, 1], units[u, 2] = b, kvh, c
                u += 1
    for u in prange(n_a):
        b, kvh, c = units[u, 0], units[u, 1], units[u, 2]
        start = _span(pos[b], window)
        t0, t1 = max(start, c * CHUNK), min(pos[b] + 1, (c + 1) * CHUNK)
        qf, qq, qd = _query_scratch(g, hd)
        _query(q[b], kvh * g * hd, g, hd, k_type, qf, qq, qd)
        _scores(kc[slots[b], layer, kvh], k_type, t0, t1, g, hd, qf, qq, qd, scale, s[b, kvh * g:(kvh + 1) * g],
                t0 - start)
    for u in prange(B * n_head):
        b, h = u // n_head, u % n_head
        _softmax(s[b, h], pos[b] + 1 - _span(pos[b], window), v_type == F16)
    n_blocks = (hd_v + 31) // 32
    for u in prange(B * n_kv * n_blocks):
        b, kvh, i = u // (n_kv * n_blocks), u // n_blocks % n_kv, u % n_blocks
        start = _span(pos[b], window)
        _values(vc[slots[b], layer, kvh], v_type, start, pos[b] + 1, g, s[b, kvh * g:(kvh + 1) * g], out[b],
                kvh * g * hd_v, hd_v, 32 * i, min(hd_v, 32 * i + 32))
