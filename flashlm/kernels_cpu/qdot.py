"""Integer dot products of quantized weights with 8-bit activations: the decode kernels.

llama.cpp's recipe: quantize the activation vector x once to int8 (Q8_0/Q8_1 blocks of
32 for the legacy formats, Q8_K blocks of 256 for K-quants), multiply integer weight
codes by integer activations, and apply the float scales once per block. We follow it,
which is also what keeps our logits within rounding of llama.cpp's.

The row kernels are written with `simd`'s vector operations (x86's vpmaddubsw and
vpmaddwd where the host has them), block for block as ggml-quants.c's AVX2 code. Rows
come in groups of four from any list of row ids, so the same kernels compute a chosen
subset of rows (the neurons a predictor picked, one expert's slice).

Weights stay in GGUF's own block layout, straight from the mapped file.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import (add_i, bits_to_16s, dot_ss, dot_us, field_shl4, fma_i, high_nibbles, hsum, load8f, load8s, load32,
                   load_nibbles, low_nibbles, store8f, sub_each, vor, zeros_f, zeros_i)
from .quants import (_Q4_0, _Q4_1, _Q4_K, _Q5_0, _Q5_1, _Q5_K, _Q6_K, _Q8_0, _bits_f32,
                     _f16, _f32_bits, _qh, _scale_min_k4, dequant_row)


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


@njit(nogil=True, cache=True)
def quantize_q8_serial(x, block, xq, xd, xs, isum):
    """Quantize activations x (T, n) as llama.cpp does for its vec_dot types, on the
    calling thread (callers bring their own threads).

    block 32 (Q8_0 / Q8_1): xd = f16(amax / 127) per block; xs = f16(d * sum(q)) (Q8_1's s).
    block 256 (Q8_K): xd = 1 / (-127 / max) in f32; isum = sums of q per 16 (bsums).
    For block 32, isum holds the sum of q per block. xq: (T, n) int8.
    """
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


# -- the row kernels ------------------------------------------------------------------
# One weight row . the 8-bit activations, as ggml-quants.c's AVX2 vec_dot functions do
# it: integer dot products of whole 32-element blocks (simd.dot_us / dot_ss), scaled in
# float lanes per block, the lanes summed once at the end of the row. prow is the row
# computed next, fetched into cache meanwhile.
#
# A kernel takes W vectors at once (W = 1, 2 or 4, a constant at each call): vectors
# b, b+1, ... of the activations xq (B vectors of n, flattened: vector b's element j at
# b * n + j), xd, xs, bsum ((B, ...) arrays); past `last`, the last vector again. A
# batch of decoded tokens so unpacks each block once for W of them, while the decode
# of one token is W = 1. Each vector's sums are the one-vector kernel's, in its order:
# its result, out[b', i] for each vector b', is the same bit for bit.


@njit(inline="always")
def _vrow_legacy(qtype, row, prow, xq, n, xd, xs, b, last, W, lut, out, i):
    # Q4_0 (18 B: d, qs[16]), Q4_1 (20 B: d, m, qs[16]), Q5_0 (22 B: d, qh u32, qs[16]),
    # Q5_1 (24 B: d, m, qh u32, qs[16]), Q8_0 (34 B: d, qs i8[32]).
    has_min = qtype == _Q4_1 or qtype == _Q5_1
    five = qtype == _Q5_0 or qtype == _Q5_1
    bb = 34 if qtype == _Q8_0 else (4 if has_min else 2) + (4 if five else 0) + 16
    qo = bb - 16
    b1, b2, b3 = min(b + 1, last), min(b + 2, last), min(b + 3, last)
    a0 = a1 = a2 = a3 = zeros_f()
    m0 = m1 = m2 = m3 = np.float32(0.0)
    for k in range(xd.shape[1]):
        o = k * bb
        _prefetch(prow, o)
        d = _f16(lut, row, o)
        if qtype == _Q8_0:
            q = load32(row, o + 2)
        else:
            q = load_nibbles(row, o + qo)
            if five:
                q = vor(q, bits_to_16s(_qh(row, o + qo - 4)))
            if not has_min:  # codes minus their offset (8 or 16), as signed bytes
                q = sub_each(q, 16 if five else 8)
        x0 = 32 * k
        a0 = fma_i(_dot_legacy(q, load32(xq, b * n + x0), has_min), d * xd[b, k], a0)
        if W > 1:
            a1 = fma_i(_dot_legacy(q, load32(xq, b1 * n + x0), has_min), d * xd[b1, k], a1)
        if W > 2:
            a2 = fma_i(_dot_legacy(q, load32(xq, b2 * n + x0), has_min), d * xd[b2, k], a2)
            a3 = fma_i(_dot_legacy(q, load32(xq, b3 * n + x0), has_min), d * xd[b3, k], a3)
        if has_min:
            dm = _f16(lut, row, o + 2)
            m0 += dm * xs[b, k]
            if W > 1:
                m1 += dm * xs[b1, k]
            if W > 2:
                m2 += dm * xs[b2, k]
                m3 += dm * xs[b3, k]
    _put(out, i, b, b1, b2, b3, W, hsum(a0) + m0, hsum(a1) + m1, hsum(a2) + m2, hsum(a3) + m3)


@njit(inline="always")
def _put(out, i, b, b1, b2, b3, W, r0, r1, r2, r3):
    out[b, i] = r0
    if W > 1:
        out[b1, i] = r1
    if W > 2:
        out[b2, i] = r2
        out[b3, i] = r3


@njit(inline="always")
def _dot_legacy(q, x, has_min):
    return dot_us(q, x, 1, 1) if has_min else dot_ss(q, x)


@njit(inline="always")
def _vrow_q45_k(qtype, row, prow, xq, n, xd, bsum, b, last, W, lut, out, i):
    # Q4_K (144 B: d, dmin, scales[12], qs[128]) or Q5_K (176 B: ... qh[32], qs[128]).
    # A 64-group's 32 bytes hold two 32-element sub-blocks: low nibbles, then high.
    five = qtype == _Q5_K
    bb = 176 if five else 144
    b1, b2, b3 = min(b + 1, last), min(b + 2, last), min(b + 3, last)
    a0 = a1 = a2 = a3 = zeros_f()
    m0 = m1 = m2 = m3 = np.float32(0.0)
    for k in range(xd.shape[1]):
        o = k * bb
        for off in range(0, bb, 64):
            _prefetch(prow, o + off)
        qs = o + (48 if five else 16)
        qh = load32(row, o + 16)
        s0 = s1 = s2 = s3 = zeros_i()
        t0 = t1 = t2 = t3 = np.int32(0)
        for j in range(4):
            sc1, mn1 = _scale_min_k4(2 * j, row, o + 4)
            sc2, mn2 = _scale_min_k4(2 * j + 1, row, o + 4)
            q = load32(row, qs + 32 * j)
            lo = low_nibbles(q)
            hi = high_nibbles(q)
            if five:
                lo = vor(lo, field_shl4(qh, 2 * j, 1))
                hi = vor(hi, field_shl4(qh, 2 * j + 1, 1))
            x0 = 256 * k + 64 * j
            g = 16 * k + 4 * j
            s0, t0 = _q45_pair(lo, hi, sc1, mn1, sc2, mn2, xq, b * n + x0, bsum, b, g, s0, t0)
            if W > 1:
                s1, t1 = _q45_pair(lo, hi, sc1, mn1, sc2, mn2, xq, b1 * n + x0, bsum, b1, g, s1, t1)
            if W > 2:
                s2, t2 = _q45_pair(lo, hi, sc1, mn1, sc2, mn2, xq, b2 * n + x0, bsum, b2, g, s2, t2)
                s3, t3 = _q45_pair(lo, hi, sc1, mn1, sc2, mn2, xq, b3 * n + x0, bsum, b3, g, s3, t3)
        d = _f16(lut, row, o)
        dmin = _f16(lut, row, o + 2)
        a0 = fma_i(s0, d * xd[b, k], a0)
        m0 -= dmin * xd[b, k] * np.float32(t0)
        if W > 1:
            a1 = fma_i(s1, d * xd[b1, k], a1)
            m1 -= dmin * xd[b1, k] * np.float32(t1)
        if W > 2:
            a2 = fma_i(s2, d * xd[b2, k], a2)
            m2 -= dmin * xd[b2, k] * np.float32(t2)
            a3 = fma_i(s3, d * xd[b3, k], a3)
            m3 -= dmin * xd[b3, k] * np.float32(t3)
    _put(out, i, b, b1, b2, b3, W, hsum(a0) + m0, hsum(a1) + m1, hsum(a2) + m2, hsum(a3) + m3)


@njit(inline="always")
def _q45_pair(lo, hi, sc1, m1, sc2, m2, xq, x0, bsum, b, g, sumi, summ):
    """A 64-group's two sub-blocks . vector b's activations from x0: the integer sums
    sumi and (minimum-weighted bsums) summ, advanced."""
    sumi = add_i(sumi, add_i(dot_us(lo, load32(xq, x0), sc1, sc1), dot_us(hi, load32(xq, x0 + 32), sc2, sc2)))
    summ += m1 * (bsum[b, g] + bsum[b, g + 1]) + m2 * (bsum[b, g + 2] + bsum[b, g + 3])
    return sumi, summ


@njit(inline="always")
def _i8(u):
    return np.int32(u) if u < 128 else np.int32(u) - 256


@njit(inline="always")
def _vrow_q6_k(row, prow, xq, n, xd, bsum, b, last, W, lut, out, i):
    # Q6_K (210 B: ql[128], qh[64], scales i8[16], d). Codes are 6-bit, offset 32;
    # each 16 elements have their own scale.
    b1, b2, b3 = min(b + 1, last), min(b + 2, last), min(b + 3, last)
    a0 = a1 = a2 = a3 = zeros_f()
    m0 = m1 = m2 = m3 = np.float32(0.0)
    for k in range(xd.shape[1]):
        o = k * 210
        for off in range(0, 210, 64):
            _prefetch(prow, o + off)
        s0 = s1 = s2 = s3 = zeros_i()
        for half in range(2):
            ql0 = load32(row, o + 64 * half)
            ql1 = load32(row, o + 64 * half + 32)
            qh = load32(row, o + 128 + 32 * half)
            sc = o + 192 + 8 * half
            x0 = 256 * k + 128 * half
            q1 = vor(low_nibbles(ql0), field_shl4(qh, 0, 3))
            q2 = vor(low_nibbles(ql1), field_shl4(qh, 2, 3))
            q3 = vor(high_nibbles(ql0), field_shl4(qh, 4, 3))
            q4 = vor(high_nibbles(ql1), field_shl4(qh, 6, 3))
            c = (_i8(row[sc]), _i8(row[sc + 1]), _i8(row[sc + 2]), _i8(row[sc + 3]), _i8(row[sc + 4]),
                 _i8(row[sc + 5]), _i8(row[sc + 6]), _i8(row[sc + 7]))
            s0 = add_i(s0, _q6_half(q1, q2, q3, q4, c, xq, b * n + x0))
            if W > 1:
                s1 = add_i(s1, _q6_half(q1, q2, q3, q4, c, xq, b1 * n + x0))
            if W > 2:
                s2 = add_i(s2, _q6_half(q1, q2, q3, q4, c, xq, b2 * n + x0))
                s3 = add_i(s3, _q6_half(q1, q2, q3, q4, c, xq, b3 * n + x0))
        d = _f16(lut, row, o + 208)
        a0, m0 = _q6_scale(row, o, bsum, b, k, d * xd[b, k], s0, a0, m0)
        if W > 1:
            a1, m1 = _q6_scale(row, o, bsum, b1, k, d * xd[b1, k], s1, a1, m1)
        if W > 2:
            a2, m2 = _q6_scale(row, o, bsum, b2, k, d * xd[b2, k], s2, a2, m2)
            a3, m3 = _q6_scale(row, o, bsum, b3, k, d * xd[b3, k], s3, a3, m3)
    _put(out, i, b, b1, b2, b3, W, hsum(a0) + m0, hsum(a1) + m1, hsum(a2) + m2, hsum(a3) + m3)


@njit(inline="always")
def _q6_half(q1, q2, q3, q4, c, xq, x0):
    """Half a Q6_K block's codes q1..q4 (their 8 scales c) . one vector's 128
    activations from x0."""
    s1 = add_i(dot_us(q1, load32(xq, x0), c[0], c[1]), dot_us(q2, load32(xq, x0 + 32), c[2], c[3]))
    s2 = add_i(dot_us(q3, load32(xq, x0 + 64), c[4], c[5]), dot_us(q4, load32(xq, x0 + 96), c[6], c[7]))
    return add_i(s1, s2)


@njit(inline="always")
def _q6_scale(row, o, bsum, b, k, d, sumi, acc, accm):
    """A Q6_K block's integer sums into vector b's float accumulators: the codes'
    offset of 32 taken off through the activation sums (bsum), all times d."""
    summ = np.int32(0)
    for i in range(16):
        summ += _i8(row[o + 192 + i]) * bsum[b, 16 * k + i]
    return fma_i(sumi, d, acc), accm - d * np.float32(32 * summ)


@njit(inline="always")
def _quantized(qtype):
    return (qtype == _Q4_K or qtype == _Q5_K or qtype == _Q6_K or qtype == _Q4_0 or qtype == _Q4_1 or qtype == _Q5_0
            or qtype == _Q5_1 or qtype == _Q8_0)


# -- drivers -------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def _float_row(qtype, row, x, scratch, lut):
    """The decoded row . x (dot16)."""
    dequant_row(qtype, row, scratch, lut)
    return dot16(scratch, x, np.empty(16, dtype=np.float32))


@njit(inline="always")
def dot16(a, x, acc):
    """a . x in 16 partial sums (one sum's chain of dependent adds made a small float
    matrix, a MoE router, latency-bound), added pairwise at the end; acc: room for them."""
    n = x.shape[0]
    acc[:] = 0.0
    m = n - n % 16
    for k in range(0, m, 16):
        for j in range(16):
            acc[j] += a[k + j] * x[k + j]
    for k in range(m, n):
        acc[k - m] += a[k] * x[k]
    w = 8
    while w:
        for j in range(w):
            acc[j] += acc[j + w]
        w //= 2
    return acc[0]


@njit(inline="always")
def rows4(qtype, w, r4, p4, x, xq, xd, xs, isum, o4, scratch, lut, use_float):
    """o4[k] = W[r4[k]] . x for 4 rows (p4: the rows computed next, fetched meanwhile);
    the arguments as matvec_rows'."""
    if use_float or not _quantized(qtype):
        for k in range(4):
            o4[k] = _float_row(qtype, w[r4[k]], x, scratch, lut)
        return
    n = xq.shape[0]
    xd2, xs2, isum2 = xd.reshape((1, xd.shape[0])), xs.reshape((1, xs.shape[0])), isum.reshape((1, isum.shape[0]))
    o = o4.reshape((1, 4))
    if qtype == _Q4_K or qtype == _Q5_K:
        for k in range(4):
            _vrow_q45_k(qtype, w[r4[k]], w[p4[k]], xq, n, xd2, isum2, 0, 0, 1, lut, o, k)
    elif qtype == _Q6_K:
        for k in range(4):
            _vrow_q6_k(w[r4[k]], w[p4[k]], xq, n, xd2, isum2, 0, 0, 1, lut, o, k)
    else:
        for k in range(4):
            _vrow_legacy(qtype, w[r4[k]], w[p4[k]], xq, n, xd2, xs2, 0, 0, 1, lut, o, k)


@njit(inline="always")
def _rows_span(qtype, w, rows, i0, i1, xq, n, xd, xs, isum, b, last, W, lut, out):
    """Rows rows[i0:i1] of W . vectors b.. (W of them), into out[.., i0:i1]."""
    m = rows.shape[0]
    for i in range(i0, i1):
        row, prow = w[rows[i]], w[rows[min(i + 4, m - 1)]]
        if qtype == _Q4_K or qtype == _Q5_K:
            _vrow_q45_k(qtype, row, prow, xq, n, xd, isum, b, last, W, lut, out, i)
        elif qtype == _Q6_K:
            _vrow_q6_k(row, prow, xq, n, xd, isum, b, last, W, lut, out, i)
        else:
            _vrow_legacy(qtype, row, prow, xq, n, xd, xs, b, last, W, lut, out, i)


@njit(nogil=True, cache=True)
def matvec_rows(qtype, w, rows, x, xq, xd, xs, isum, out, lut, n_chunks, use_float):
    """out[i] = W[rows[i]] . x for a GGML-typed weight w (n_rows, row_bytes) uint8.

    x: (cols,) float32 (used by float formats); xq/xd/xs/isum: x quantized by
    quantize_q8 with the block this format pairs with. rows: int64 ids (any subset,
    any order); out: (len(rows),) float32. use_float: dequantize each row and dot it
    with float x (float formats, or checks of the exact dequantized math).
    matvec_rows_multi's one-vector case, the same row kernel (_rows_w1) called directly:
    a weight of another array type (a flash tail's strided rows) then compiles that one
    kernel, not the 2- and 4-vector ones too (40 s -> 15 s, measured).
    """
    out2 = out.reshape((1, out.shape[0]))
    if use_float or not _quantized(qtype):
        _float_rows(qtype, w, rows, x.reshape((1, x.shape[0])), out2, lut, n_chunks)
        return
    _rows_w1(qtype, w, rows, xq, xq.shape[0], xd.reshape((1, xd.shape[0])), xs.reshape((1, xs.shape[0])),
             isum.reshape((1, isum.shape[0])), 0, lut, out2, n_chunks)


@njit(nogil=True, cache=True)
def matvec_rows_multi(qtype, w, rows, x, xq, xd, xs, isum, out, lut, n_chunks, use_float):
    """out[b, i] = W[rows[i]] . x[b] for B vectors at once (B tokens decoded together):
    matvec_rows' arguments with a leading axis B (x (B, cols), xq (B, cols), xd/xs/isum
    (B, ...), out (B, len(rows))). out[b] is matvec_rows of x[b] bit for bit (the same
    row kernels, the same sums).

    Each weight row is read and unpacked once for 4 vectors (3 left: 4, the last
    repeated), 32 rows at a time, which stay in L1 while the quads meet them; then
    once for the 1 or 2 vectors left."""
    B, m = xq.shape
    if use_float or not _quantized(qtype):
        _float_rows(qtype, w, rows, x, out, lut, n_chunks)
        return
    a = (w, rows, xq.reshape(-1), m, xd, xs, isum)
    quads = (B + 1) // 4
    if quads:
        _rows_w4(qtype, *a, quads, lut, out, n_chunks)
    if B - 4 * quads == 2:
        _rows_w2(qtype, *a, B - 2, lut, out, n_chunks)
    elif B - 4 * quads == 1:
        _rows_w1(qtype, *a, B - 1, lut, out, n_chunks)


# matvec_rows_multi's parallel loops. The row kernels run inside them: numba compiles a
# parallel loop's body with its arrays marked unaliased (the same kernels in a plain
# function ran 1.6x slower, measured); one W a loop (all in one, numba took a minute to
# compile it). The threads share the rows in groups of 4.


@njit(inline="always")
def _share(n, n_chunks, c):
    """Chunk c's rows of n: [i0, i1)."""
    step = ((n + 3) // 4 + n_chunks - 1) // n_chunks
    return min(n, 4 * c * step), min(n, 4 * (c + 1) * step)


@njit(nogil=True, cache=True, parallel=True)
def _rows_w1(qtype, w, rows, xq, m, xd, xs, isum, b, lut, out, n_chunks):
    """out[b] = W[rows] . vector b."""
    n = rows.shape[0]
    for c in prange(n_chunks):
        i0, i1 = _share(n, n_chunks, c)
        _rows_span(qtype, w, rows, i0, i1, xq, m, xd, xs, isum, b, b, 1, lut, out)


@njit(nogil=True, cache=True, parallel=True)
def _rows_w2(qtype, w, rows, xq, m, xd, xs, isum, b, lut, out, n_chunks):
    """out[b:b + 2] = W[rows] . vectors b, b + 1."""
    n = rows.shape[0]
    for c in prange(n_chunks):
        i0, i1 = _share(n, n_chunks, c)
        _rows_span(qtype, w, rows, i0, i1, xq, m, xd, xs, isum, b, b + 1, 2, lut, out)


@njit(nogil=True, cache=True, parallel=True)
def _rows_w4(qtype, w, rows, xq, m, xd, xs, isum, quads, lut, out, n_chunks):
    """out[:4 * quads] = W[rows] . vectors 0.. in quads (the last B - 1 repeated)."""
    n, last = rows.shape[0], xd.shape[0] - 1
    for c in prange(n_chunks):
        i0, i1 = _share(n, n_chunks, c)
        for g in range(i0, i1, 32):
            for q in range(quads):
                _rows_span(qtype, w, rows, g, min(g + 32, i1), xq, m, xd, xs, isum, 4 * q, last, 4, lut, out)


@njit(nogil=True, cache=True, parallel=True)
def _float_rows(qtype, w, rows, x, out, lut, n_chunks):
    """out[b, i] = the decoded W[rows[i]] . x[b] (dot16), each row decoded once."""
    n = rows.shape[0]
    for c in prange(n_chunks):
        i0, i1 = _share(n, n_chunks, c)
        scratch = np.empty(x.shape[1], dtype=np.float32)
        acc16 = np.empty(16, dtype=np.float32)
        for i in range(i0, i1):
            dequant_row(qtype, w[rows[i]], scratch, lut)
            for b in range(x.shape[0]):
                out[b, i] = dot16(scratch, x[b], acc16)


@njit(nogil=True, cache=True, parallel=True)
def matvec_t_rows(qtype, low, high, cap, rows, coef, out, lut, n_chunks):
    """out += sum_i coef[i] * W[rows[i]]: the transposed product, for weights stored
    with one row per input neuron (a down projection's columns). out: (cols,) float32.
    Row r of W is low[r] for r < cap, else high[r - cap] (a flash layer's window and
    tail buffer; one matrix: cap = its rows, high = low). Each chunk of rows sums into
    its own partial vector; the partials are then added in order."""
    cols = out.shape[0]
    n = rows.shape[0]
    parts = np.zeros((n_chunks, cols), dtype=np.float32)
    if qtype == _Q8_0:
        groups = (n + 3) // 4
        step = (groups + n_chunks - 1) // n_chunks
        for c in prange(n_chunks):
            for g in range(c * step, min(groups, (c + 1) * step)):
                _axpy4_q8_0(low, high, cap, rows, coef, 4 * g, lut, parts[c])
    else:
        for c in prange(n_chunks):
            scratch = np.empty(cols, dtype=np.float32)
            for i in range(c, n, n_chunks):
                r = rows[i]
                if r < cap:
                    dequant_row(qtype, low[r], scratch, lut)
                else:
                    dequant_row(qtype, high[r - cap], scratch, lut)
                ci = coef[i]
                for k in range(cols):
                    parts[c, k] += ci * scratch[k]
    for c in range(n_chunks):
        for k in range(cols):
            out[k] += parts[c, k]


@njit(inline="always")
def _row(low, high, cap, r):
    return low[r] if r < cap else high[r - cap]


@njit(inline="always")
def _axpy4_q8_0(low, high, cap, rows, coef, i0, lut, acc):
    """acc += coef[i] * W[rows[i]] for the 4 rows from i0 (past the end: weight 0), Q8_0:
    each block's scale times the coefficient, then its 32 codes in 4 lanes of 8."""
    n = rows.shape[0]
    r0 = _row(low, high, cap, rows[i0])
    r1 = _row(low, high, cap, rows[min(i0 + 1, n - 1)])
    r2 = _row(low, high, cap, rows[min(i0 + 2, n - 1)])
    r3 = _row(low, high, cap, rows[min(i0 + 3, n - 1)])
    c0 = coef[i0]
    c1 = coef[i0 + 1] if i0 + 1 < n else np.float32(0.0)
    c2 = coef[i0 + 2] if i0 + 2 < n else np.float32(0.0)
    c3 = coef[i0 + 3] if i0 + 3 < n else np.float32(0.0)
    for b in range(acc.shape[0] // 32):
        o = 34 * b
        s0, s1 = c0 * _f16(lut, r0, o), c1 * _f16(lut, r1, o)
        s2, s3 = c2 * _f16(lut, r2, o), c3 * _f16(lut, r3, o)
        for k in range(0, 32, 8):
            a = load8f(acc, 32 * b + k)
            a = fma_i(load8s(r0, o + 2 + k), s0, a)
            a = fma_i(load8s(r1, o + 2 + k), s1, a)
            a = fma_i(load8s(r2, o + 2 + k), s2, a)
            a = fma_i(load8s(r3, o + 2 + k), s3, a)
            store8f(acc, 32 * b + k, a)
