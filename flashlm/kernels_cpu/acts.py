"""Activations as llama.cpp feeds them to a weight type, and the products of one vector
(or B, a batch of decoded tokens) that the compiled decode step and the expert kernels use.

Quantized weights meet 8-bit activations (Q8_K blocks of 256 for K-quants, Q8_0 blocks
of 32 for legacy quants) in integer dot products; float weights meet float activations
rounded as llama.cpp rounds them (f16, bf16)."""

import numpy as np
from numba import njit

from .qdot import _quantize_q8_token, matvec_rows_multi, round_f16
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
    """out = W @ x with llama.cpp's activation handling for W's type: _mv_multi's
    one-vector case. all_rows: 0, 1, 2, ... (at least W's row count), made once by the caller."""
    _mv_multi(qtype, w, x.reshape((1, x.shape[0])), out.reshape((1, out.shape[0])), lut, n_threads, all_rows)


@njit(nogil=True, cache=True)
def _mv_multi(qtype, w, x, out, lut, n_threads, all_rows):
    """out[b] = W @ x[b] for B vectors x (B, n), out (B, W's rows): each row of x prepared
    as _prep does, then one pass over W for all of them (matvec_rows_multi)."""
    n = w.shape[0]
    rows = all_rows[:n]
    n_chunks = max(1, min((n + 3) // 4, 4 * n_threads))
    B, m = x.shape
    block = _act_block(qtype)
    xr = np.empty((B, 0 if block else m), dtype=np.float32)
    xq = np.empty((B, m if block else 0), dtype=np.int8)
    xd = np.empty((B, _n_blocks(qtype, m)), dtype=np.float32)
    xs = np.empty_like(xd)
    isum = np.empty((B, _n_sums(qtype, m)), dtype=np.int32)
    for t in range(B):
        _prep(qtype, x, t, xr, xq, xd, xs, isum)
    # one call, use_float not a literal: one compiled matvec_rows_multi for every caller
    matvec_rows_multi(qtype, w, rows, x if block else xr, xq, xd, xs, isum, out, lut, n_chunks, block == 0)


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
