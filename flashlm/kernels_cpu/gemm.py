"""Prefill products on 8-bit activations: an integer GEMM on GGML's block formats.

Several tokens times a quantized weight. Each weight element is `a * code + c`: an
unsigned code and, per scale block of 32 elements (16 for Q6_K), a float scale `a` and
offset `c`. Each activation is `dx * xq`, int8 codes with a scale per block, as
llama.cpp quantizes them. So a block's product is

    a * dx * (codes . xq)  +  c * (dx * sum(xq))

and the inner `codes . xq` is integer work: `vpdpbusd` (u8 x i8, four products summed
into an int32 lane) where the host has VNNI; on AVX2, `vpmaddubsw` and `vpmaddwd`
(simd.dpbusd7: exact for codes below 128, every type's but Q8_0's, which takes the
exact emulation of vpdpbusd).

Rows are taken 16 at a time: their codes are unpacked from the file's blocks into an
interleaved tile (per 4 elements, 8 rows side by side, so one 32-byte load feeds 8
rows) with their `a` and `c`, and the tile meets the tokens 4 at a time: 8 int32
accumulators per 4-byte step, 16 float ones per block. The unpacking is paid once per
16 rows and shared by all tokens; the file's blocks stay as they are (benchmarks/README.md:
several times the speed of dequantized tiles through BLAS).
"""

import numpy as np
from numba import njit

from .quants import _Q4_0, _Q4_1, _Q4_K, _Q5_0, _Q5_1, _Q5_K, _Q6_K, _Q8_0, _f16, _qh, _scale_min_k4
from .simd import bcast4, dpbusd, dpbusd7, load32, load8f, scale2, store8f, zeros_f, zeros_i

TYPES = (_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0, _Q4_K, _Q5_K, _Q6_K)
ROWS = 16  # weight rows per tile: the GEMM takes row ranges in multiples of this
TOKENS = 4  # tokens per step: activations come padded to a multiple of this


def scale_block(qtype: int) -> int:
    """Elements per (a, c) scale block of a weight type."""
    return 16 if qtype == _Q6_K else 32


@njit(nogil=True, cache=True)
def _codes_row(qtype, row, codes, a, c, lut):
    """Decode one row of blocks: codes (unsigned) and per scale block a, c, such that
    element i is a[i // blk] * codes[i] + c[i // blk]."""
    n = codes.shape[0]
    if qtype == _Q6_K:
        _codes_q6_k(row, n, codes, a, c, lut)
    elif qtype == _Q4_K or qtype == _Q5_K:
        _codes_q45_k(qtype == _Q5_K, row, n, codes, a, c, lut)
    else:
        _codes_32(qtype, row, n, codes, a, c, lut)


@njit(inline="always")
def _codes_q6_k(row, n, codes, a, c, lut):
    for b in range(n // 256):
        o = b * 210
        d = _f16(lut, row, o + 208)
        for k in range(16):
            s = np.int32(row[o + 192 + k])
            s = s - 256 if s > 127 else s
            a[b * 16 + k] = d * np.float32(s)
            c[b * 16 + k] = np.float32(-32.0) * a[b * 16 + k]
        for half in range(2):
            ql = o + half * 64
            qh = o + 128 + half * 32
            y = b * 256 + half * 128
            for l in range(32):
                h = row[qh + l]
                codes[y + l] = (row[ql + l] & 0xF) | ((h & 3) << 4)
                codes[y + l + 32] = (row[ql + l + 32] & 0xF) | (((h >> 2) & 3) << 4)
                codes[y + l + 64] = (row[ql + l] >> 4) | (((h >> 4) & 3) << 4)
                codes[y + l + 96] = (row[ql + l + 32] >> 4) | (((h >> 6) & 3) << 4)


@njit(inline="always")
def _codes_q45_k(five, row, n, codes, a, c, lut):
    for b in range(n // 256):
        o = b * (176 if five else 144)
        d = _f16(lut, row, o)
        dmin = _f16(lut, row, o + 2)
        qs = o + (48 if five else 16)
        for j in range(8):
            sc, m = _scale_min_k4(j, row, o + 4)
            a[b * 8 + j] = d * np.float32(sc)
            c[b * 8 + j] = -dmin * np.float32(m)
        for j in range(4):
            y = b * 256 + j * 64
            for l in range(32):
                q = row[qs + j * 32 + l]
                lo = q & 0xF
                hi = q >> 4
                if five:
                    h = row[o + 16 + l]
                    lo |= ((h >> (2 * j)) & 1) << 4
                    hi |= ((h >> (2 * j + 1)) & 1) << 4
                codes[y + l] = lo
                codes[y + l + 32] = hi


@njit(inline="always")
def _codes_32(qtype, row, n, codes, a, c, lut):
    """Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: blocks of 32."""
    for b in range(n // 32):
        y = b * 32
        if qtype == _Q8_0:
            o = b * 34
            d = _f16(lut, row, o)
            a[b] = d
            c[b] = np.float32(-128.0) * d
            for j in range(32):
                codes[y + j] = row[o + 2 + j] ^ 0x80  # int8 + 128
        else:  # Q4_0, Q4_1, Q5_0, Q5_1
            has_min = qtype == _Q4_1 or qtype == _Q5_1
            five = qtype == _Q5_0 or qtype == _Q5_1
            o = b * (18 + 2 * has_min + 4 * five)
            d = _f16(lut, row, o)
            a[b] = d
            c[b] = _f16(lut, row, o + 2) if has_min else np.float32(-16.0 if five else -8.0) * d
            p = o + (4 if has_min else 2)
            qh = _qh(row, p) if five else np.uint32(0)
            p += 4 * five
            for j in range(16):
                q = row[p + j]
                codes[y + j] = (q & 0xF) | (((qh >> j) & 1) << 4)
                codes[y + j + 16] = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)


@njit(nogil=True, cache=True)
def _unpack_tile(qtype, w, r, codes, ra, rc, q, a, c, lut):
    """Rows r .. r+15 of w into the interleaved tile q (codes) and a, c (scales)."""
    nb = ra.shape[0]
    n4 = codes.shape[0] // 4
    c32 = codes.view(np.uint32)
    q32 = q.view(np.uint32)
    for i in range(ROWS):
        _codes_row(qtype, w[r + i], codes, ra, rc, lut)
        h, lane = i // 8, i % 8
        for k in range(n4):
            q32[(h * n4 + k) * 8 + lane] = c32[k]
        for b in range(nb):
            a[(h * nb + b) * 8 + lane] = ra[b]
            c[(h * nb + b) * 8 + lane] = rc[b]


@njit(nogil=True, cache=True)
def gemm_rows(qtype, w, r0, r1, xq, dx, sx, out, lut):
    """out[t, r] = x_t . W[r] for rows r0 <= r < r1, all tokens t.

    w: (rows, row_bytes) uint8 blocks of `qtype`; r0, r1 multiples of ROWS.
    xq: (T, n_in) int8, T a multiple of TOKENS; dx, sx: (T, n_in // blk) float32, the
    activations' scale and scale * sum(xq) per scale block. out: (T, n_out) float32,
    C-contiguous. Runs on the calling thread.
    """
    T, n_in = xq.shape
    blk = 16 if qtype == _Q6_K else 32
    nb = n_in // blk
    ng = blk // 4
    n_out = out.shape[1]
    wide = qtype == _Q8_0  # codes up to 255: dpbusd; the others' fit dpbusd7
    codes = np.empty(n_in, np.uint8)
    ra = np.empty(nb, np.float32)
    rc = np.empty(nb, np.float32)
    q = np.empty(ROWS * n_in, np.uint8)
    a = np.empty(ROWS * nb, np.float32)
    c = np.empty(ROWS * nb, np.float32)
    xf = xq.reshape(-1)
    of = out.reshape(-1)
    half = n_in * 8  # bytes of one 8-row group in the tile
    for r in range(r0, r1, ROWS):
        _unpack_tile(qtype, w, r, codes, ra, rc, q, a, c, lut)
        for t in range(0, T, TOKENS):
            f0 = zeros_f(); f1 = zeros_f(); f2 = zeros_f(); f3 = zeros_f()  # noqa: E702
            h0 = zeros_f(); h1 = zeros_f(); h2 = zeros_f(); h3 = zeros_f()  # noqa: E702
            x0 = t * n_in
            for b in range(nb):
                i0 = zeros_i(); i1 = zeros_i(); i2 = zeros_i(); i3 = zeros_i()  # noqa: E702
                j0 = zeros_i(); j1 = zeros_i(); j2 = zeros_i(); j3 = zeros_i()  # noqa: E702
                wo = b * blk * 8
                xo = x0 + b * blk
                for g in range(ng):
                    u = load32(q, wo + g * 32)
                    v = load32(q, half + wo + g * 32)
                    y0 = bcast4(xf, xo + 4 * g)
                    y1 = bcast4(xf, xo + n_in + 4 * g)
                    y2 = bcast4(xf, xo + 2 * n_in + 4 * g)
                    y3 = bcast4(xf, xo + 3 * n_in + 4 * g)
                    if wide:
                        i0 = dpbusd(i0, u, y0); i1 = dpbusd(i1, u, y1)  # noqa: E702
                        i2 = dpbusd(i2, u, y2); i3 = dpbusd(i3, u, y3)  # noqa: E702
                        j0 = dpbusd(j0, v, y0); j1 = dpbusd(j1, v, y1)  # noqa: E702
                        j2 = dpbusd(j2, v, y2); j3 = dpbusd(j3, v, y3)  # noqa: E702
                    else:
                        i0 = dpbusd7(i0, u, y0); i1 = dpbusd7(i1, u, y1)  # noqa: E702
                        i2 = dpbusd7(i2, u, y2); i3 = dpbusd7(i3, u, y3)  # noqa: E702
                        j0 = dpbusd7(j0, v, y0); j1 = dpbusd7(j1, v, y1)  # noqa: E702
                        j2 = dpbusd7(j2, v, y2); j3 = dpbusd7(j3, v, y3)  # noqa: E702
                sa = load8f(a, b * 8)
                sc = load8f(c, b * 8)
                f0 = scale2(i0, sa, dx[t, b], sc, sx[t, b], f0)
                f1 = scale2(i1, sa, dx[t + 1, b], sc, sx[t + 1, b], f1)
                f2 = scale2(i2, sa, dx[t + 2, b], sc, sx[t + 2, b], f2)
                f3 = scale2(i3, sa, dx[t + 3, b], sc, sx[t + 3, b], f3)
                sa = load8f(a, (nb + b) * 8)
                sc = load8f(c, (nb + b) * 8)
                h0 = scale2(j0, sa, dx[t, b], sc, sx[t, b], h0)
                h1 = scale2(j1, sa, dx[t + 1, b], sc, sx[t + 1, b], h1)
                h2 = scale2(j2, sa, dx[t + 2, b], sc, sx[t + 2, b], h2)
                h3 = scale2(j3, sa, dx[t + 3, b], sc, sx[t + 3, b], h3)
            o = t * n_out + r
            store8f(of, o, f0); store8f(of, o + 8, h0)  # noqa: E702
            store8f(of, o + n_out, f1); store8f(of, o + n_out + 8, h1)  # noqa: E702
            store8f(of, o + 2 * n_out, f2); store8f(of, o + 2 * n_out + 8, h2)  # noqa: E702
            store8f(of, o + 3 * n_out, f3); store8f(of, o + 3 * n_out + 8, h3)  # noqa: E702
