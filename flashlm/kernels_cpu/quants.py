"""Numba kernels that decode GGML's block formats, and the matrix ops built on them.

A quantized matrix is a 2-D uint8 array `(rows, row_bytes)` straight from the mmapped
file: each row is `cols / block_size` blocks laid end to end. The kernels decode one
row at a time into a float32 scratch row, so every format needs only one small
`_dequant_row_*` function; `dequant_rows` and `gather_rows` are shared by all of them.

Block layouts follow ggml-quants.c (and gguf-py's quants.py, our test oracle):

    Q4_0  (18 B / 32):  d f16 | qs[16]            x = (nibble - 8) * d
    Q4_1  (20 B / 32):  d f16 | m f16 | qs[16]    x = nibble * d + m
    Q5_0  (22 B / 32):  d f16 | qh u32 | qs[16]   x = (nibble | hbit << 4) - 16) * d
    Q5_1  (24 B / 32):  d f16 | m f16 | qh u32 | qs[16]
    Q8_0  (34 B / 32):  d f16 | qs i8[32]         x = q * d
    Q4_K (144 B / 256): d f16 | dmin f16 | scales[12] (6-bit sc, m) | qs[128]
    Q5_K (176 B / 256): d f16 | dmin f16 | scales[12] | qh[32] | qs[128]
    Q6_K (210 B / 256): ql[128] | qh[64] | scales i8[16] | d f16

In nibble formats, element j of a 32-group is the low nibble of qs[j] and element
j + 16 (j + 32 in K-quants' 64-groups) is its high nibble.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic
from gguf import GGMLQuantizationType as T
from gguf import GGML_QUANT_SIZES


def _gelu_table(x: np.ndarray) -> np.ndarray:
    # ggml's GELU table: the tanh form in float32 at every f16 input, rounded to f16.
    c = np.float32(0.7978845608028654)
    with np.errstate(all="ignore"):
        y = np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * x * (np.float32(1.0) + np.float32(0.044715) * x * x)))
        return y.astype(np.float16).astype(np.float32)


# The kernels' lookup table (`lut`), passed to them as an argument (a global array would be
# compiled into every function that reads it, 256 KiB of machine code each):
# [0, 65536): every f16 bit pattern decoded, so kernels look scales up instead of converting;
# [GELU_AT, GELU_AT + 65536): ggml's GELU at every f16 input.
_F16 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
GELU_AT = 65536
F16_TABLE = np.concatenate([_F16, _gelu_table(_F16)])

SUPPORTED_TYPES = (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K)

# Integer codes the kernels branch on (GGML's own type ids).
_F32, _F16, _BF16 = int(T.F32), int(T.F16), int(T.BF16)
_Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0 = int(T.Q4_0), int(T.Q4_1), int(T.Q5_0), int(T.Q5_1), int(T.Q8_0)
_Q4_K, _Q5_K, _Q6_K = int(T.Q4_K), int(T.Q5_K), int(T.Q6_K)


def block_size(qtype) -> int:
    """Elements per block of `qtype`."""
    return GGML_QUANT_SIZES[T(qtype)][0]


def row_bytes(qtype, cols: int) -> int:
    """Bytes of one row of `cols` elements in `qtype`."""
    bs, ts = GGML_QUANT_SIZES[T(qtype)]
    return cols // bs * ts


@njit(inline="always")
def _f16(lut, b, i):
    return lut[np.int64(b[i]) | (np.int64(b[i + 1]) << 8)]


@intrinsic
def _f32_bits(typingctx, v):
    """The bits of a float32 as a uint32 (a register move, no memory)."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def h2f(typingctx, b):
    """The float16 whose bits are b (a uint16), as float32 (vcvtph2ps when vectorized)."""
    if b != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(b), codegen


@intrinsic
def _bits_f32(typingctx, b):
    """The float32 whose bits are the low 32 bits of the integer b."""
    if not isinstance(b, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        if b.bitwidth > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif b.bitwidth < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(b), codegen


@njit(inline="always")
def _scale_min_k4(j, sc, o):
    # 6-bit scale and min of sub-block j, packed in the 12 scale bytes at sc[o:o+12].
    if j < 4:
        return np.int32(sc[o + j] & 63), np.int32(sc[o + j + 4] & 63)
    d = (sc[o + j + 4] & 0xF) | ((sc[o + j - 4] >> 6) << 4)
    m = (sc[o + j + 4] >> 4) | ((sc[o + j] >> 6) << 4)
    return np.int32(d), np.int32(m)


@njit(inline="always")
def _qh(row, o):
    # The 32 fifth bits of a Q5_0/Q5_1 block, a little-endian u32 at row[o:o+4].
    return (np.uint32(row[o]) | (np.uint32(row[o + 1]) << 8) | (np.uint32(row[o + 2]) << 16)
            | (np.uint32(row[o + 3]) << 24))


@njit(nogil=True, cache=True)
def _dequant_row_legacy(qtype, row, out, lut):
    # Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: 32-element blocks.
    n_blocks = out.shape[0] // 32
    for b in range(n_blocks):
        y = b * 32
        if qtype == _Q8_0:
            o = b * 34
            d = _f16(lut, row, o)
            for j in range(32):
                v = np.int32(row[o + 2 + j])
                if v > 127:
                    v -= 256
                out[y + j] = d * np.float32(v)
        elif qtype == _Q4_0:
            o = b * 18
            d = _f16(lut, row, o)
            for j in range(16):
                q = row[o + 2 + j]
                out[y + j] = d * np.float32(np.int32(q & 0xF) - 8)
                out[y + j + 16] = d * np.float32(np.int32(q >> 4) - 8)
        elif qtype == _Q4_1:
            o = b * 20
            d = _f16(lut, row, o)
            m = _f16(lut, row, o + 2)
            for j in range(16):
                q = row[o + 4 + j]
                out[y + j] = d * np.float32(q & 0xF) + m
                out[y + j + 16] = d * np.float32(q >> 4) + m
        else:  # Q5_0, Q5_1
            has_min = qtype == _Q5_1
            o = b * (24 if has_min else 22)
            d = _f16(lut, row, o)
            m = _f16(lut, row, o + 2) if has_min else np.float32(0.0)
            p = o + (4 if has_min else 2)
            qh = _qh(row, p)
            off = 0 if has_min else 16
            for j in range(16):
                q = row[p + 4 + j]
                h0 = ((qh >> j) & 1) << 4
                h1 = ((qh >> (j + 16)) & 1) << 4
                out[y + j] = d * np.float32(np.int32((q & 0xF) | h0) - off) + m
                out[y + j + 16] = d * np.float32(np.int32((q >> 4) | h1) - off) + m


@njit(nogil=True, cache=True)
def _dequant_row_k(qtype, row, out, lut):
    # Q4_K, Q5_K, Q6_K: 256-element super-blocks.
    n_blocks = out.shape[0] // 256
    for b in range(n_blocks):
        y0 = b * 256
        if qtype == _Q6_K:
            o = b * 210
            d = _f16(lut, row, o + 208)
            for half in range(2):
                ql = o + half * 64
                qh = o + 128 + half * 32
                sc = o + 192 + half * 8
                y = y0 + half * 128
                for l in range(32):
                    s = l // 16
                    h = row[qh + l]
                    q1 = np.int32((row[ql + l] & 0xF) | ((h & 3) << 4)) - 32
                    q2 = np.int32((row[ql + l + 32] & 0xF) | (((h >> 2) & 3) << 4)) - 32
                    q3 = np.int32((row[ql + l] >> 4) | (((h >> 4) & 3) << 4)) - 32
                    q4 = np.int32((row[ql + l + 32] >> 4) | (((h >> 6) & 3) << 4)) - 32
                    s0 = np.int32(row[sc + s]); s2 = np.int32(row[sc + s + 2])
                    s4 = np.int32(row[sc + s + 4]); s6 = np.int32(row[sc + s + 6])
                    s0 = s0 - 256 if s0 > 127 else s0
                    s2 = s2 - 256 if s2 > 127 else s2
                    s4 = s4 - 256 if s4 > 127 else s4
                    s6 = s6 - 256 if s6 > 127 else s6
                    out[y + l] = d * np.float32(s0 * q1)
                    out[y + l + 32] = d * np.float32(s2 * q2)
                    out[y + l + 64] = d * np.float32(s4 * q3)
                    out[y + l + 96] = d * np.float32(s6 * q4)
        else:
            five = qtype == _Q5_K
            o = b * (176 if five else 144)
            d = _f16(lut, row, o)
            dmin = _f16(lut, row, o + 2)
            sc = o + 4
            qh = o + 16
            qs = o + (48 if five else 16)
            for j in range(4):
                sc1, m1 = _scale_min_k4(2 * j, row, sc)
                sc2, m2 = _scale_min_k4(2 * j + 1, row, sc)
                d1 = d * np.float32(sc1); dm1 = dmin * np.float32(m1)
                d2 = d * np.float32(sc2); dm2 = dmin * np.float32(m2)
                y = y0 + j * 64
                for l in range(32):
                    q = row[qs + j * 32 + l]
                    lo = np.int32(q & 0xF)
                    hi = np.int32(q >> 4)
                    if five:
                        h = row[qh + l]
                        lo += ((h >> (2 * j)) & 1) << 4
                        hi += ((h >> (2 * j + 1)) & 1) << 4
                    out[y + l] = d1 * np.float32(lo) - dm1
                    out[y + l + 32] = d2 * np.float32(hi) - dm2


@njit(nogil=True, cache=True)
def _dequant_row_float(qtype, row, out, lut):
    # F32, F16, BF16 stored as little-endian bytes.
    n = out.shape[0]
    if qtype == _F32:
        f = row[:4 * n].view(np.float32)
        for i in range(n):
            out[i] = f[i]
    elif qtype == _F16:
        h = row[:2 * n].view(np.uint16)
        for i in range(n):
            out[i] = lut[h[i]]
    else:
        h = row[:2 * n].view(np.uint16)
        for i in range(n):
            out[i] = _bits_f32(np.uint32(h[i]) << np.uint32(16))


@njit(nogil=True, cache=True)
def dequant_row(qtype, row, out, lut):
    """Decode one row of bytes `row` into `out` (float32, the row's length)."""
    if qtype == _Q4_K or qtype == _Q5_K or qtype == _Q6_K:
        _dequant_row_k(qtype, row, out, lut)
    elif qtype == _F32 or qtype == _F16 or qtype == _BF16:
        _dequant_row_float(qtype, row, out, lut)
    else:
        _dequant_row_legacy(qtype, row, out, lut)


@njit(nogil=True, cache=True, parallel=True)
def dequant_rows(qtype, w, r0, out, lut):
    """out[i] = decoded row r0 + i of w. w: (rows, row_bytes) uint8; out: (n, cols) float32."""
    for i in prange(out.shape[0]):
        dequant_row(qtype, w[r0 + i], out[i], lut)


@njit(nogil=True, cache=True)
def dequant_rows_serial(qtype, w, r0, out, lut):
    """dequant_rows on the calling thread only (for callers that bring their own threads)."""
    for i in range(out.shape[0]):
        dequant_row(qtype, w[r0 + i], out[i], lut)


@njit(nogil=True, cache=True, parallel=True)
def gather_rows(qtype, w, ids, out, lut):
    """out[i] = decoded row ids[i] of w (embedding lookup)."""
    for i in prange(ids.shape[0]):
        dequant_row(qtype, w[ids[i]], out[i], lut)
