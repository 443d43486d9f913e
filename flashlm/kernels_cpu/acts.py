"""Activations as llama.cpp feeds them to a weight type, and the one-vector product the
compiled decode step and the expert kernels use.

Quantized weights meet 8-bit activations (Q8_K blocks of 256 for K-quants, Q8_0 blocks
of 32 for legacy quants) in integer dot products; float weights meet float activations
rounded as llama.cpp rounds them (f16, bf16)."""

import numpy as np
from numba import njit

from .qdot import _quantize_q8_token, matvec_rows, quantize_q8_serial, round_f16
from .quants import _BF16, _F16, _Q4_0, _Q4_1, _Q5_0, _Q5_1, _Q8_0, _Q4_K, _Q5_K, _Q6_K


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
