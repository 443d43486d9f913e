"""Integer dot products of quantized weights with 8-bit activations: the decode kernels.

llama.cpp's recipe: quantize the activation vector x once to int8 (Q8_0/Q8_1 blocks of
32 for the legacy formats, Q8_K blocks of 256 for K-quants), multiply integer weight
codes by integer activations, and apply the float scales once per block. We follow it,
which is also what keeps our logits within rounding of llama.cpp's.

Two things make Numba emit SIMD here:
- products in int16 (`np.multiply` of int16 scalars keeps int16; Python operators
  would promote to int64, which has no fast vector multiply);
- four weight rows per loop, sharing each activation load (`_rows`: any four row
  ids, so the same kernels compute a chosen subset of rows).

Weights stay in GGUF's own block layout, straight from the mapped file.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .quants import (_BF16, _F16, _F32, _Q4_0, _Q4_1, _Q4_K, _Q5_0, _Q5_1, _Q5_K, _Q6_K, _Q8_0, _bits_f32,
                     _f32_bits, dequant_row)

_U15 = np.uint8(15)
_U4 = np.uint8(4)


@njit(inline="always")
def _f16(lut, b, i):
    return lut[np.int64(b[i]) | (np.int64(b[i + 1]) << 8)]


@njit(inline="always")
def _p(q, x):
    # int16 product of a small weight code and an int8 activation.
    return np.multiply(np.int16(q), np.int16(x))


@njit(inline="always")
def _acc(acc, v):
    return np.add(acc, np.int32(v))


@njit(nogil=True, cache=True)
def round_f16(v):
    """v rounded to the nearest float16 value (ties to even), returned as float32."""
    a = abs(v)
    if a >= np.float32(65520.0):
        return np.float32(np.inf) if v > 0 else np.float32(-np.inf)
    if a < np.float32(6.103515625e-05):  # f16 subnormals: multiples of 2^-24
        return np.float32(np.rint(v * np.float32(16777216.0)) / np.float32(16777216.0))
    b = _f32_bits(np.float32(v))
    b = (b + np.uint32(0xFFF) + ((b >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    return _bits_f32(np.uint32(b))


@njit(nogil=True, cache=True)
def f16_bits(v):
    """The float16 bit pattern nearest to float32 v (ties to even), as an int64."""
    b = _f32_bits(np.float32(v))
    sign = np.int64((b >> np.uint32(16)) & np.uint32(0x8000))
    a = b & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x477FF000):  # rounds to 65536 or more, or is inf/nan
        return sign | (0x7E00 if a > np.uint32(0x7F800000) else 0x7C00)
    if a < np.uint32(0x38800000):  # below 2^-14: f16 subnormals, multiples of 2^-24
        return sign | np.int64(np.rint(abs(v) * np.float32(16777216.0)))
    a = a + np.uint32(0xFFF) + ((a >> np.uint32(13)) & np.uint32(1))
    return sign | (np.int64(a >> np.uint32(13)) - (112 << 10))


@njit(nogil=True, cache=True)
def _round_half_away(v):
    return np.float32(np.floor(v + np.float32(0.5))) if v >= 0 else np.float32(-np.floor(-v + np.float32(0.5)))


@njit(inline="always")
def _quantize_q8_token(x, t, block, xq, xd, xs, isum):
    n = x.shape[1]
    nb = n // block
    for b in range(nb):
        o = b * block
        amax = np.float32(0.0)
        vmax = np.float32(0.0)
        for j in range(block):
            a = abs(x[t, o + j])
            if a > amax:
                amax = a
                vmax = x[t, o + j]
        if amax == 0.0:
            for j in range(block):
                xq[t, o + j] = 0
            xd[t, b] = 0.0
            if block == 32:
                xs[t, b] = 0.0
                isum[t, b] = 0
            else:
                for g in range(16):
                    isum[t, b * 16 + g] = 0
            continue
        if block == 256:
            iscale = np.float32(-127.0) / vmax
            for j in range(block):
                xq[t, o + j] = np.int8(min(np.float32(127.0), _round_half_away(iscale * x[t, o + j])))
            xd[t, b] = np.float32(1.0) / iscale
            for g in range(16):
                s = 0
                for j in range(16):
                    s += xq[t, o + g * 16 + j]
                isum[t, b * 16 + g] = s
        else:
            d = amax / np.float32(127.0)
            idv = np.float32(1.0) / d
            s = 0
            for j in range(block):
                q = np.int8(_round_half_away(x[t, o + j] * idv))
                xq[t, o + j] = q
                s += q
            xd[t, b] = round_f16(d)
            xs[t, b] = round_f16(np.float32(s) * d)
            isum[t, b] = s


@njit(nogil=True, cache=True, parallel=True)
def quantize_q8(x, block, xq, xd, xs, isum):
    """Quantize activations x (T, n) as llama.cpp does for its vec_dot types.

    block 32 (Q8_0 / Q8_1): xd = f16(amax / 127) per block; xs = f16(d * sum(q)) (Q8_1's s).
    block 256 (Q8_K): xd = 1 / (-127 / max) in f32; isum = sums of q per 16 (bsums).
    For block 32, isum holds the sum of q per block. xq: (T, n) int8.
    """
    for t in prange(x.shape[0]):
        _quantize_q8_token(x, t, block, xq, xd, xs, isum)


@njit(nogil=True, cache=True)
def quantize_q8_serial(x, block, xq, xd, xs, isum):
    """quantize_q8 on the calling thread only (inside other compiled or threaded work)."""
    for t in range(x.shape[0]):
        _quantize_q8_token(x, t, block, xq, xd, xs, isum)


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the CPU to fetch arr[idx]'s cache line (llvm.prefetch; read, keep)."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0i8")
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


# -- legacy formats: blocks of 32 ----------------------------------------------------


@njit(inline="always")
def _legacy_scale(row, o, isum, xd_b, xs_b, zero_sum, has_min, lut):
    # One 32-block's contribution: d * xd * isum, plus the min term (Q4_1/Q5_1: m * s)
    # or minus the code offset (Q4_0/Q5_0: zero_sum = offset * sum of the x codes).
    if has_min:
        return _f16(lut, row, o) * xd_b * np.float32(isum) + _f16(lut, row, o + 2) * xs_b
    return _f16(lut, row, o) * xd_b * np.float32(isum - zero_sum)


@njit(nogil=True, cache=True)
def _rows_q4(qtype, w, r, p, xq, xd, xs, xsum, lut, out, o_out):
    # Q4_0 (18 B: d, qs[16]) and Q4_1 (20 B: d, m, qs[16]).
    has_min = qtype == _Q4_1
    bb = 20 if has_min else 18
    qo = 4 if has_min else 2
    w0 = w[r[0]]; w1 = w[r[1]]; w2 = w[r[2]]; w3 = w[r[3]]
    p0 = w[p[0]]; p1 = w[p[1]]; p2 = w[p[2]]; p3 = w[p[3]]
    a0 = np.float32(0.0); a1 = np.float32(0.0); a2 = np.float32(0.0); a3 = np.float32(0.0)
    for b in range(xd.shape[0]):
        o = b * bb + qo
        _prefetch(p0, o); _prefetch(p1, o); _prefetch(p2, o); _prefetch(p3, o)
        x0 = 32 * b
        i0 = np.int32(0); i1 = np.int32(0); i2 = np.int32(0); i3 = np.int32(0)
        for j in range(16):
            xl = xq[x0 + j]; xh = xq[x0 + 16 + j]
            q = w0[o + j]; i0 = _acc(i0, np.add(_p(np.bitwise_and(q, _U15), xl), _p(np.right_shift(q, _U4), xh)))
            q = w1[o + j]; i1 = _acc(i1, np.add(_p(np.bitwise_and(q, _U15), xl), _p(np.right_shift(q, _U4), xh)))
            q = w2[o + j]; i2 = _acc(i2, np.add(_p(np.bitwise_and(q, _U15), xl), _p(np.right_shift(q, _U4), xh)))
            q = w3[o + j]; i3 = _acc(i3, np.add(_p(np.bitwise_and(q, _U15), xl), _p(np.right_shift(q, _U4), xh)))
        o -= qo
        z = 8 * xsum[b]
        a0 += _legacy_scale(w0, o, i0, xd[b], xs[b], z, has_min, lut)
        a1 += _legacy_scale(w1, o, i1, xd[b], xs[b], z, has_min, lut)
        a2 += _legacy_scale(w2, o, i2, xd[b], xs[b], z, has_min, lut)
        a3 += _legacy_scale(w3, o, i3, xd[b], xs[b], z, has_min, lut)
    out[o_out] = a0; out[o_out + 1] = a1; out[o_out + 2] = a2; out[o_out + 3] = a3


@njit(inline="always")
def _q5(qs, h, j, k):
    # 5-bit code: a nibble of qs plus bit j + k of the 32-bit high-bit word h.
    nib = np.bitwise_and(qs, _U15) if k == 0 else np.right_shift(qs, _U4)
    return np.bitwise_or(nib, np.uint8(np.bitwise_and(np.right_shift(h, np.uint32(j + k)), np.uint32(1)) << 4))


@njit(nogil=True, cache=True)
def _qh(row, o):
    return (np.uint32(row[o]) | (np.uint32(row[o + 1]) << 8) | (np.uint32(row[o + 2]) << 16)
            | (np.uint32(row[o + 3]) << 24))


@njit(nogil=True, cache=True)
def _rows_q5(qtype, w, r, p, xq, xd, xs, xsum, lut, out, o_out):
    # Q5_0 (22 B: d, qh u32, qs[16]) and Q5_1 (24 B: d, m, qh u32, qs[16]).
    has_min = qtype == _Q5_1
    bb = 24 if has_min else 22
    ho = 4 if has_min else 2
    w0 = w[r[0]]; w1 = w[r[1]]; w2 = w[r[2]]; w3 = w[r[3]]
    p0 = w[p[0]]; p1 = w[p[1]]; p2 = w[p[2]]; p3 = w[p[3]]
    a0 = np.float32(0.0); a1 = np.float32(0.0); a2 = np.float32(0.0); a3 = np.float32(0.0)
    for b in range(xd.shape[0]):
        o = b * bb
        _prefetch(p0, o); _prefetch(p1, o); _prefetch(p2, o); _prefetch(p3, o)
        h0 = _qh(w0, o + ho); h1 = _qh(w1, o + ho); h2 = _qh(w2, o + ho); h3 = _qh(w3, o + ho)
        qo = o + ho + 4
        x0 = 32 * b
        i0 = np.int32(0); i1 = np.int32(0); i2 = np.int32(0); i3 = np.int32(0)
        for j in range(16):
            xl = xq[x0 + j]; xh = xq[x0 + 16 + j]
            q = w0[qo + j]; i0 = _acc(i0, np.add(_p(_q5(q, h0, j, 0), xl), _p(_q5(q, h0, j, 16), xh)))
            q = w1[qo + j]; i1 = _acc(i1, np.add(_p(_q5(q, h1, j, 0), xl), _p(_q5(q, h1, j, 16), xh)))
            q = w2[qo + j]; i2 = _acc(i2, np.add(_p(_q5(q, h2, j, 0), xl), _p(_q5(q, h2, j, 16), xh)))
            q = w3[qo + j]; i3 = _acc(i3, np.add(_p(_q5(q, h3, j, 0), xl), _p(_q5(q, h3, j, 16), xh)))
        z = 16 * xsum[b]
        a0 += _legacy_scale(w0, o, i0, xd[b], xs[b], z, has_min, lut)
        a1 += _legacy_scale(w1, o, i1, xd[b], xs[b], z, has_min, lut)
        a2 += _legacy_scale(w2, o, i2, xd[b], xs[b], z, has_min, lut)
        a3 += _legacy_scale(w3, o, i3, xd[b], xs[b], z, has_min, lut)
    out[o_out] = a0; out[o_out + 1] = a1; out[o_out + 2] = a2; out[o_out + 3] = a3


@njit(inline="always")
def _i8(u):
    return np.int8(u) if u < 128 else np.int8(np.int16(u) - 256)


@njit(nogil=True, cache=True)
def _rows_q8_0(w, r, p, xq, xd, lut, out, o_out):
    # Q8_0 (34 B: d, qs i8[32]).
    w0 = w[r[0]].view(np.int8); w1 = w[r[1]].view(np.int8); w2 = w[r[2]].view(np.int8); w3 = w[r[3]].view(np.int8)
    u0 = w[r[0]]; u1 = w[r[1]]; u2 = w[r[2]]; u3 = w[r[3]]
    p0 = w[p[0]]; p1 = w[p[1]]; p2 = w[p[2]]; p3 = w[p[3]]
    a0 = np.float32(0.0); a1 = np.float32(0.0); a2 = np.float32(0.0); a3 = np.float32(0.0)
    for b in range(xd.shape[0]):
        o = b * 34
        _prefetch(p0, o); _prefetch(p1, o); _prefetch(p2, o); _prefetch(p3, o)
        qo = o + 2
        x0 = 32 * b
        i0 = np.int32(0); i1 = np.int32(0); i2 = np.int32(0); i3 = np.int32(0)
        for j in range(16):
            xl = xq[x0 + j]; xh = xq[x0 + 16 + j]
            i0 = _acc(i0, np.add(_p(w0[qo + j], xl), _p(w0[qo + 16 + j], xh)))
            i1 = _acc(i1, np.add(_p(w1[qo + j], xl), _p(w1[qo + 16 + j], xh)))
            i2 = _acc(i2, np.add(_p(w2[qo + j], xl), _p(w2[qo + 16 + j], xh)))
            i3 = _acc(i3, np.add(_p(w3[qo + j], xl), _p(w3[qo + 16 + j], xh)))
        a0 += _f16(lut, u0, o) * xd[b] * np.float32(i0)
        a1 += _f16(lut, u1, o) * xd[b] * np.float32(i1)
        a2 += _f16(lut, u2, o) * xd[b] * np.float32(i2)
        a3 += _f16(lut, u3, o) * xd[b] * np.float32(i3)
    out[o_out] = a0; out[o_out + 1] = a1; out[o_out + 2] = a2; out[o_out + 3] = a3


# -- K-quants: super-blocks of 256 ---------------------------------------------------


@njit(inline="always")
def _scale_min_k4(j, row, o):
    if j < 4:
        return np.int32(row[o + j] & 63), np.int32(row[o + j + 4] & 63)
    d = (row[o + j + 4] & 0xF) | ((row[o + j - 4] >> 6) << 4)
    m = (row[o + j + 4] >> 4) | ((row[o + j] >> 6) << 4)
    return np.int32(d), np.int32(m)


@njit(nogil=True, cache=True)
def _row_q45_k(qtype, row, prow, xq, xd, bsum, lut):
    # One row of Q4_K (144 B: d, dmin, scales[12], qs[128]) or Q5_K (176 B: ... qh[32], qs[128]).
    five = qtype == _Q5_K
    bb = 176 if five else 144
    acc = np.float32(0.0)
    for b in range(xd.shape[0]):
        o = b * bb
        for off in range(0, bb, 64):
            _prefetch(prow, o + off)
        qs = o + (48 if five else 16)
        qh = o + 16
        x0 = 256 * b
        sumi = np.int32(0)
        summ = np.int32(0)
        for j in range(4):
            sc1, m1 = _scale_min_k4(2 * j, row, o + 4)
            sc2, m2 = _scale_min_k4(2 * j + 1, row, o + 4)
            ia = np.int32(0)
            ib = np.int32(0)
            xa = x0 + 64 * j
            if five:
                sa = np.uint8(2 * j)
                sb = np.uint8(2 * j + 1)
                for l in range(16):
                    q = row[qs + 32 * j + l]; q2 = row[qs + 32 * j + 16 + l]
                    h = row[qh + l]; h2 = row[qh + 16 + l]
                    la = np.bitwise_or(np.bitwise_and(q, _U15), np.left_shift(np.bitwise_and(np.right_shift(h, sa), np.uint8(1)), _U4))
                    la2 = np.bitwise_or(np.bitwise_and(q2, _U15), np.left_shift(np.bitwise_and(np.right_shift(h2, sa), np.uint8(1)), _U4))
                    lb = np.bitwise_or(np.right_shift(q, _U4), np.left_shift(np.bitwise_and(np.right_shift(h, sb), np.uint8(1)), _U4))
                    lb2 = np.bitwise_or(np.right_shift(q2, _U4), np.left_shift(np.bitwise_and(np.right_shift(h2, sb), np.uint8(1)), _U4))
                    ia = _acc(ia, np.add(_p(la, xq[xa + l]), _p(la2, xq[xa + 16 + l])))
                    ib = _acc(ib, np.add(_p(lb, xq[xa + 32 + l]), _p(lb2, xq[xa + 48 + l])))
            else:
                for l in range(16):
                    q = row[qs + 32 * j + l]; q2 = row[qs + 32 * j + 16 + l]
                    ia = _acc(ia, np.add(_p(np.bitwise_and(q, _U15), xq[xa + l]), _p(np.bitwise_and(q2, _U15), xq[xa + 16 + l])))
                    ib = _acc(ib, np.add(_p(np.right_shift(q, _U4), xq[xa + 32 + l]), _p(np.right_shift(q2, _U4), xq[xa + 48 + l])))
            sumi += sc1 * ia + sc2 * ib
            g = b * 16 + 4 * j
            summ += m1 * (bsum[g] + bsum[g + 1]) + m2 * (bsum[g + 2] + bsum[g + 3])
        acc += _f16(lut, row, o) * xd[b] * np.float32(sumi) - _f16(lut, row, o + 2) * xd[b] * np.float32(summ)
    return acc


@njit(nogil=True, cache=True)
def _row_q6_k(row, prow, xq, xd, lut):
    # One row of Q6_K (210 B: ql[128], qh[64], scales i8[16], d).
    acc = np.float32(0.0)
    for b in range(xd.shape[0]):
        o = b * 210
        for off in range(0, 210, 64):
            _prefetch(prow, o + off)
        sumi = np.int32(0)
        for half in range(2):
            ql = o + 64 * half
            qh = o + 128 + 32 * half
            sc = o + 192 + 8 * half
            xa = 256 * b + 128 * half
            for s in range(2):
                i1 = np.int32(0); i2 = np.int32(0); i3 = np.int32(0); i4 = np.int32(0)
                for l in range(16 * s, 16 * s + 16):
                    a = row[ql + l]; c = row[ql + l + 32]; h = row[qh + l]
                    q1 = np.int16(np.bitwise_or(np.bitwise_and(a, _U15), np.left_shift(np.bitwise_and(h, np.uint8(3)), _U4))) - np.int16(32)
                    q2 = np.int16(np.bitwise_or(np.bitwise_and(c, _U15), np.left_shift(np.bitwise_and(np.right_shift(h, np.uint8(2)), np.uint8(3)), _U4))) - np.int16(32)
                    q3 = np.int16(np.bitwise_or(np.right_shift(a, _U4), np.left_shift(np.bitwise_and(np.right_shift(h, _U4), np.uint8(3)), _U4))) - np.int16(32)
                    q4 = np.int16(np.bitwise_or(np.right_shift(c, _U4), np.left_shift(np.right_shift(h, np.uint8(6)), _U4))) - np.int16(32)
                    i1 = _acc(i1, _p(q1, xq[xa + l]))
                    i2 = _acc(i2, _p(q2, xq[xa + 32 + l]))
                    i3 = _acc(i3, _p(q3, xq[xa + 64 + l]))
                    i4 = _acc(i4, _p(q4, xq[xa + 96 + l]))
                sumi += (np.int32(_i8(row[sc + s])) * i1 + np.int32(_i8(row[sc + s + 2])) * i2
                         + np.int32(_i8(row[sc + s + 4])) * i3 + np.int32(_i8(row[sc + s + 6])) * i4)
        acc += _f16(lut, row, o + 208) * xd[b] * np.float32(sumi)
    return acc


# -- drivers -------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def _float_row(qtype, row, x, scratch, lut):
    dequant_row(qtype, row, scratch, lut)
    acc = np.float32(0.0)
    for k in range(x.shape[0]):
        acc += scratch[k] * x[k]
    return acc


@njit(nogil=True, cache=True, parallel=True)
def matvec_rows(qtype, w, rows, x, xq, xd, xs, isum, out, lut, n_chunks, use_float):
    """out[i] = W[rows[i]] . x for a GGML-typed weight w (n_rows, row_bytes) uint8.

    x: (cols,) float32 (used by float formats); xq/xd/xs/isum: x quantized by
    quantize_q8 with the block this format pairs with. rows: int64 ids (any subset,
    any order); out: (len(rows),) float32. use_float: dequantize each row and dot it
    with float x (float formats, or checks of the exact dequantized math).
    """
    n = rows.shape[0]
    groups = (n + 3) // 4
    step = (groups + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        r4 = np.empty(4, dtype=np.int64)
        p4 = np.empty(4, dtype=np.int64)
        o4 = np.empty(4, dtype=np.float32)
        scratch = np.empty(x.shape[0], dtype=np.float32)
        for g in range(c * step, min(groups, (c + 1) * step)):
            i0 = 4 * g
            for k in range(4):  # the last group repeats its last row
                r4[k] = rows[min(i0 + k, n - 1)]
                p4[k] = rows[min(i0 + 4 + k, n - 1)]  # the next group's rows, to prefetch
            if use_float:
                for k in range(4):
                    o4[k] = _float_row(qtype, w[r4[k]], x, scratch, lut)
            elif qtype == _Q4_0 or qtype == _Q4_1:
                _rows_q4(qtype, w, r4, p4, xq, xd, xs, isum, lut, o4, 0)
            elif qtype == _Q5_0 or qtype == _Q5_1:
                _rows_q5(qtype, w, r4, p4, xq, xd, xs, isum, lut, o4, 0)
            elif qtype == _Q8_0:
                _rows_q8_0(w, r4, p4, xq, xd, lut, o4, 0)
            elif qtype == _Q4_K or qtype == _Q5_K:
                for k in range(4):
                    o4[k] = _row_q45_k(qtype, w[r4[k]], w[p4[k]], xq, xd, isum, lut)
            elif qtype == _Q6_K:
                for k in range(4):
                    o4[k] = _row_q6_k(w[r4[k]], w[p4[k]], xq, xd, lut)
            else:
                for k in range(4):
                    o4[k] = _float_row(qtype, w[r4[k]], x, scratch, lut)
            for k in range(min(4, n - i0)):
                out[i0 + k] = o4[k]


@njit(nogil=True, cache=True, parallel=True)
def matvec_t_rows(qtype, w, rows, coef, out, lut, n_chunks):
    """out += sum_i coef[i] * W[rows[i]]: the transposed product, for weights stored
    with one row per input neuron (a down projection's columns). out: (cols,) float32.
    Each chunk of rows sums into its own partial vector; the partials are then added."""
    cols = out.shape[0]
    n = rows.shape[0]
    parts = np.zeros((n_chunks, cols), dtype=np.float32)
    for c in prange(n_chunks):
        scratch = np.empty(cols, dtype=np.float32)
        for i in range(c, n, n_chunks):
            dequant_row(qtype, w[rows[i]], scratch, lut)
            ci = coef[i]
            for k in range(cols):
                parts[c, k] += ci * scratch[k]
    for c in range(n_chunks):
        for k in range(cols):
            out[k] += parts[c, k]
