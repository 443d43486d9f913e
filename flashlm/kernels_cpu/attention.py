"""Attention over the KV cache, and the cache's row formats: float16 (llama.cpp's default
cache type), or GGML's Q8_0 and Q4_0 blocks (llama.cpp's `-ctk`/`-ctv q8_0|q4_0`).

A cache is (n_layer, n_kv, positions, words) uint16 per k and v (a pool of them has a
leading slot axis): one row per (layer, KV head, position), in the cache type's layout:

    f16   hd words                       the float16 bits of each element
    q8_0  hd / 32 blocks of 17 words     GGML's block_q8_0 (34 bytes): d f16 | qs int8[32]
    q4_0  hd / 32 blocks of 9 words      GGML's block_q4_0 (18 bytes): d f16 | qs[16]

(Both blocks are an even number of bytes, so a row of blocks is a row of uint16 words,
and every cache type is one array type to numba: one compiled variant of each kernel.)
As llama.cpp does (its attn_rot, on by default), keys and queries are rotated by a
Walsh-Hadamard matrix before a quantized K cache stores them (q . k is unchanged, the
outliers of a few channels spread over the block), values before a quantized V cache
stores them and the attention's output rotated back (`rotation`: where and in what
blocks; layer.py's `_qkv_rows` rotates, the attention rotates the output back).
Rows are written as llama.cpp's reference quantize_row_q8_0 / q4_0 write them (and
gguf-py's numpy `quantize`, the tests' oracle), one per token and KV head, when the
token's keys and values are computed (layer.py's `_qkv_rows`).

Attention reads the rows where they lie; nothing dequantizes the cache. A query's
attention is three steps, each on all the query heads of a KV head's group at once (GQA:
each cached row is read once for the group):

    _scores    q . k for every position: quantized keys in integer dot products with
               the query quantized to Q8_0 blocks (llama.cpp's vec_dot for K q8_0/q4_0),
               float16 keys in float products with the query rounded to float16
    _softmax   as ggml's: exp in its vectorized form (ggml_v_expf), the sum in float64,
               the weights times its reciprocal; for a float16 V cache each weight
               rounded to float16, as llama.cpp's default path rounds them for its f16
               product with V
    _values    the weighted sum of the value rows, each converted to float32 once (a
               quantized row block by block), summed in position order within chunks
               of CHUNK positions (aligned to multiples of CHUNK), then chunk by chunk

Prefill (`attend_queries`) runs them one (token, KV head) after another on a prefill
thread's share; a decoded token (`attend_rows`, on numba's threads) shares each step
among the threads by what it is made of: the scores and the values by chunks, the
softmax by query heads. Every element is computed the same way in all of them, so a
row's attention is the same bit for bit in prefill, a decode step, a batch and a
speculative verification, on any thread count.
"""

import os

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .qdot import _round_half_away, f16_bits, round_f16
from .quants import _F16, _Q4_0, _Q8_0, _bits_f32, h2f
from .simd import (
    _LI,
    _ptr,
    dot_ss,
    fma_i,
    hsum,
    load8s,
    load32,
    load_nibbles,
    store8f,
    sub_each,
    v8i,
    zeros_f,
)

F16, Q8_0, Q4_0 = _F16, _Q8_0, _Q4_0  # GGML's type ids, the cache types' codes
CACHE_TYPES = {"f16": F16, "q8_0": Q8_0, "q4_0": Q4_0}
TYPE_NAMES = {v: k for k, v in CACHE_TYPES.items()}
_BLOCK_WORDS = {F16: 0, Q8_0: 17, Q4_0: 9}  # uint16 words of a 32-element block (f16: not blocked)
CHUNK = 256  # positions per chunk: a decoded token's unit of work (attend_rows), a partial sum of values


def row_words(cache_type: int, n: int) -> int:
    """uint16 words of one cached row of n elements in cache_type (n a multiple of 32
    for the block types)."""
    return n if cache_type == F16 else n // 32 * _BLOCK_WORDS[cache_type]


@intrinsic
def _load8_nibbles(typingctx, arr, off, high):
    """The low (high: the high) nibbles of the 8 bytes arr[off:off + 8], less 8, as int32
    lanes: 8 elements of a Q4_0 block."""
    def codegen(context, builder, sig, args):
        p = _ptr(context, builder, sig.args[0], args[0], args[1])
        b = builder.zext(builder.load(builder.bitcast(p, ir.VectorType(ir.IntType(8), 8).as_pointer()), align=1), _LI)
        shift = builder.mul(context.cast(builder, args[2], sig.args[2], types.int32), ir.Constant(ir.IntType(32), 4))
        b = builder.lshr(b, builder.shuffle_vector(builder.insert_element(ir.Constant(_LI, ir.Undefined), shift,
                                                                         ir.Constant(ir.IntType(32), 0)),
                                                   ir.Constant(_LI, ir.Undefined), ir.Constant(_LI, [0] * 8)))
        return builder.sub(builder.and_(b, ir.Constant(_LI, [15] * 8)), ir.Constant(_LI, [8] * 8))

    return v8i(arr, off, high), codegen


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


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c rounded once (llvm.fma: vfmadd where a loop of it vectorizes)."""
    if not all(t == types.float32 for t in (a, b, c)):
        return None

    def codegen(context, builder, sig, args):
        f = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f, [f, f, f]), "llvm.fma.f32")
        return builder.call(fn, args)

    return types.float32(a, b, c), codegen


@njit(inline="always")
def _exp(x):
    """exp(x) for x <= 0 in float32 (a softmax's weights) as ggml's vectorized softmax
    computes it (ggml_v_expf: ARM's optimized routine, within 1.5 ulp), for x >= -87.3:
    below, a number under 1.2e-38 (ggml's is as negligible in a softmax's sum).
    Branch-free, so that a loop of it vectorizes (np.exp calls libm's expf per element)."""
    x = max(x, np.float32(-87.3))
    z = _fma(x, np.float32(1.4426950216293335), np.float32(12582912.0))
    n = z - np.float32(12582912.0)
    b = _fma(-n, np.float32(1.428606765330187e-06), _fma(-n, np.float32(0.693145751953125), x))
    u = b * b
    j = _fma(_fma(_fma(np.float32(0.008247390389442444), b, np.float32(0.04189976677298546)), u,
                  _fma(np.float32(0.16668395698070526), b, np.float32(0.4999912679195404))), u,
             _fma(np.float32(0.9999994039535522), b, np.float32(1.0)))
    return j * _bits_f32((np.int32(n) + np.int32(127)) << 23)


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _softmax(s, n, round_p):
    """s[:n] = the softmax of the scores s[:n]: each weight rounded to float16 where
    round_p (float16 values: llama.cpp multiplies them with weights it converted to f16)."""
    m = np.float32(-np.inf)
    for t in range(n):
        m = max(m, s[t])
    tot = 0.0  # (float64, as ggml sums a softmax)
    for t in range(n):
        e = _exp(s[t] - m)
        s[t] = e
        tot += e
    inv = np.float32(1.0 / tot)
    if round_p:
        for t in range(n):
            s[t] = round_f16(s[t] * inv)
    else:
        for t in range(n):
            s[t] = s[t] * inv


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _values(v, v_type, t0, t1, g, p, po, acc):
    """acc[h] = the sum over t in t0..t1-1 of p[h, po + t - t0] * value row t, for the g
    query heads of one KV head's rows v (positions, words); acc (g, hd_v)."""
    hd_v = acc.shape[1]
    vf = np.empty(hd_v, dtype=np.float32)
    acc[:, :] = 0.0
    v8 = v.view(np.uint8)  # (load8s reads its bytes as int8)
    for t in range(t0, t1):
        if v_type == F16:
            for i in range(hd_v):
                vf[i] = h2f(v[t, i])
        elif v_type == Q8_0:  # code * d, 8 at a time (numba leaves the scalar loop unvectorized: 8x slower)
            r8 = v8[t]
            for b in range(hd_v // 32):
                d = h2f(v[t, 17 * b])
                for k in range(4):
                    store8f(vf, 32 * b + 8 * k, fma_i(load8s(r8, 34 * b + 2 + 8 * k), d, zeros_f()))
        else:
            r8 = v8[t]
            for b in range(hd_v // 32):
                d = h2f(v[t, 9 * b])
                for k in range(4):
                    store8f(vf, 32 * b + 8 * k, fma_i(_load8_nibbles(r8, 18 * b + 2 + 8 * (k % 2), k // 2), d,
                                                      zeros_f()))
        for h in range(g):
            ph = p[h, po + t - t0]
            for i in range(hd_v):
                acc[h, i] += ph * vf[i]


@njit(inline="always")
def _add_chunk(first, acc, out, oo):
    """out[oo + h * hd_v + i] (=, the first chunk, else +=) acc[h, i]: a query's value
    sums added up chunk by chunk, in order."""
    g, hd_v = acc.shape
    for h in range(g):
        for i in range(hd_v):
            if first:
                out[oo + h * hd_v + i] = acc[h, i]
            else:
                out[oo + h * hd_v + i] += acc[h, i]


@njit(inline="always")
def _span(pos, window):
    """The positions a query at pos attends to: [start, pos + 1)."""
    start = 0
    if window > 0 and pos - window + 1 > 0:
        start = pos - window + 1
    return start


def rotation(cache_type: int, n: int, values: bool = False) -> int:
    """The Walsh-Hadamard rotation (its size; 0: none) that rows of n elements get before
    they are cached as cache_type, as llama.cpp rotates a quantized cache's (its attn_rot:
    a quantized type and a head size that is a multiple of 64; keys in blocks of the
    largest power of two dividing it, values in blocks of 64). FLASHLM_KV_ROTATE=0 turns
    it off (llama.cpp's LLAMA_ATTN_ROT_DISABLE=1)."""
    if cache_type == F16 or n % 64 or os.environ.get("FLASHLM_KV_ROTATE", "1").strip() == "0":
        return 0
    size = 64
    while not values and n % (2 * size) == 0:
        size *= 2
    return size


@njit(inline="always")
def _hadamard(x, o, n, size):
    """x[o:o + n] = each block of `size` elements (a power of two) times the orthonormal
    Walsh-Hadamard matrix of that size (Sylvester's order, as ggml_gen_hadamard makes it):
    symmetric and its own inverse."""
    norm = np.float32(1.0 / np.sqrt(size))
    for b0 in range(o, o + n, size):
        h = 1
        while h < size:
            for i in range(b0, b0 + size, 2 * h):
                for j in range(i, i + h):
                    a, c = x[j], x[j + h]
                    x[j] = a + c
                    x[j + h] = a - c
            h *= 2
        for j in range(b0, b0 + size):
            x[j] *= norm


@njit(nogil=True, cache=True)
def hadamard_rows(x, size):
    """x (R, n) rotated in place, each row in blocks of `size` (_hadamard; for tests)."""
    for r in range(x.shape[0]):
        _hadamard(x[r], 0, x.shape[1], size)


def row_elems(cache_type: int, words: int) -> int:
    """Elements of a cached row of `words` uint16 words in cache_type."""
    return words if cache_type == F16 else words // _BLOCK_WORDS[cache_type] * 32


@njit(nogil=True, cache=True)
def attend_queries(q, kc, vc, layer, pos0, n_head, n_kv, hd, hd_v, scale, window, k_type, v_type, v_rot, out, u0,
                   u1):
    """Causal attention of queries q (T, n_head * hd) at positions pos0.. over a cache
    that already holds them: units u0..u1-1 (a thread's share) of the T * n_kv units
    (token t = u // n_kv, KV head u % n_kv with its query heads). kc, vc: (n_layer, n_kv,
    positions, words) uint16 rows of k_type, v_type; out: (T, n_head * hd_v), rotated
    back where the values were cached rotated (v_rot: rotation())."""
    g = n_head // n_kv
    qf, qq, qd = _query_scratch(g, hd)
    s = np.empty((g, pos0 + q.shape[0]), dtype=np.float32)
    acc = np.empty((g, hd_v), dtype=np.float32)
    for u in range(u0, u1):
        t, kvh = u // n_kv, u % n_kv
        pos = pos0 + t
        start = _span(pos, window)
        _query(q[t], kvh * g * hd, g, hd, k_type, qf, qq, qd)
        _scores(kc[layer, kvh], k_type, start, pos + 1, g, hd, qf, qq, qd, scale, s, 0)
        for h in range(g):
            _softmax(s[h], pos + 1 - start, v_type == F16)
        for c in range(start // CHUNK, pos // CHUNK + 1):
            t0, t1 = max(start, c * CHUNK), min(pos + 1, (c + 1) * CHUNK)
            _values(vc[layer, kvh], v_type, t0, t1, g, s, t0 - start, acc)
            _add_chunk(c == start // CHUNK, acc, out[t], kvh * g * hd_v)
        if v_rot:
            _hadamard(out[t], kvh * g * hd_v, g * hd_v, v_rot)


@njit(inline="always")
def _query_scratch(g, hd):
    return (np.empty((g, hd), dtype=np.float32), np.empty((g, hd), dtype=np.int8),
            np.empty((g, hd // 32), dtype=np.float32))


@njit(nogil=True, cache=True, parallel=True)
def attend_rows(q, kc, vc, slots, pos, layer, window, n_kv, hd, hd_v, scale, k_type, v_type, v_rot, out):
    """Attention of B decoded tokens, q (B, n_head * hd), row b at position pos[b] in the
    cache pool's slot slots[b] (kc, vc: (n_slots, n_layer, n_kv, positions, words)),
    which already holds its key and value: out (B, n_head * hd_v), each row what
    attend_queries gives it, bit for bit. The threads share the scores and the values by
    (row, KV head, CHUNK positions), the softmax by (row, head)."""
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
    acc = np.empty((n_a, g, hd_v), dtype=np.float32)
    for u in prange(n_a):
        b, kvh, c = units[u, 0], units[u, 1], units[u, 2]
        start = _span(pos[b], window)
        t0, t1 = max(start, c * CHUNK), min(pos[b] + 1, (c + 1) * CHUNK)
        _values(vc[slots[b], layer, kvh], v_type, t0, t1, g, s[b, kvh * g:(kvh + 1) * g], t0 - start, acc[u])
    for u in range(n_a):
        b, kvh, c = units[u, 0], units[u, 1], units[u, 2]
        _add_chunk(c == _span(pos[b], window) // CHUNK, acc[u], out[b], kvh * g * hd_v)
        if v_rot and c == pos[b] // CHUNK:  # its last chunk
            _hadamard(out[b], kvh * g * hd_v, g * hd_v, v_rot)
