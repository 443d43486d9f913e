"""CPU kernels: quantized matrix products on GGML block formats, plus the small ops.

`linear` is the one entry point model code uses for a weight product; it dispatches on
the weight's GGML type (decode: fused dequantize-dot `matvec`; prefill: dequantized
tiles fed to BLAS).
"""

from __future__ import annotations

import contextlib

import numba
import numpy as np

from . import quants
from .ops import attention, gelu, rmsnorm, rope, silu, softmax  # noqa: F401
from .quants import F16_TABLE, SUPPORTED_TYPES  # noqa: F401

# Largest dequantized tile of a weight for prefill: (rows, cols) float32 elements.
_TILE_ELEMS = 1 << 22  # 16 MiB


def set_threads(n: int) -> int:
    """Set the kernel thread count (clamped to what numba has); returns it."""
    n = max(1, min(int(n), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(n)
    return n


def dequantize(w) -> np.ndarray:
    """The whole tensor `w` (a TensorRef) as float32, shape w.shape."""
    rows = w.data.shape[0]
    cols = w.shape[-1]
    out = np.empty((rows, cols), dtype=np.float32)
    quants.dequant_rows(int(w.qtype), w.data, 0, out, F16_TABLE)
    return out.reshape(w.shape)


def embed(w, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of embedding matrix w: (len(ids), n_embd) float32."""
    out = np.empty((len(ids), w.shape[-1]), dtype=np.float32)
    quants.gather_rows(int(w.qtype), w.data, np.ascontiguousarray(ids, dtype=np.int64), out, F16_TABLE)
    return out


_K_QUANTS = {int(t) for t in (quants.T.Q4_K, quants.T.Q5_K, quants.T.Q6_K)}
_LEGACY_QUANTS = {int(t) for t in (quants.T.Q4_0, quants.T.Q4_1, quants.T.Q5_0, quants.T.Q5_1, quants.T.Q8_0)}


# llama.cpp-style 8-bit activations for quantized weights (on by default; see below).
_QUANTIZE_ACTIVATIONS = True


@contextlib.contextmanager
def float_activations():
    """Within this block, products use float32 activations instead of llama.cpp's
    8-bit ones: the exact math of the dequantized model (slower later, and further
    from llama.cpp's numbers; for checks that two loaders give the same model)."""
    global _QUANTIZE_ACTIVATIONS
    saved, _QUANTIZE_ACTIVATIONS = _QUANTIZE_ACTIVATIONS, False
    try:
        yield
    finally:
        _QUANTIZE_ACTIVATIONS = saved


def quantize_activations(x: np.ndarray, qtype: int) -> np.ndarray:
    """x as llama.cpp feeds it to a product with a `qtype` weight (its vec_dot_type).

    Q8_K (256-blocks) for K-quants, Q8_0 (32-blocks) for legacy quants, f16 for F16
    weights, unchanged for F32.
    """
    if qtype in _K_QUANTS or qtype in _LEGACY_QUANTS:
        out = np.empty_like(x)
        quants.q8_roundtrip(x, out, 256 if qtype in _K_QUANTS else 32, F16_TABLE)
        return out
    if qtype == int(quants.T.F16):
        return x.astype(np.float16).astype(np.float32)
    if qtype == int(quants.T.BF16):
        bits = (x.view(np.uint32) + np.uint32(0x7FFF) + ((x.view(np.uint32) >> 16) & 1)) & np.uint32(0xFFFF0000)
        return bits.view(np.float32)
    return x


def linear(x: np.ndarray, w) -> np.ndarray:
    """x @ W.T for a GGML-typed weight W of shape (n_out, n_in).

    x: (T, n_in) float32 -> (T, n_out) float32.
    """
    n_out, n_in = w.data.shape[0], w.shape[-1]
    qtype = int(w.qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if _QUANTIZE_ACTIVATIONS:
        x = quantize_activations(x, qtype)
    if x.shape[0] == 1:
        out = np.empty((1, n_out), dtype=np.float32)
        n_chunks = max(1, min(n_out // 16, 4 * numba.get_num_threads()))
        quants.matvec(qtype, w.data, np.ascontiguousarray(x[0]), out[0], F16_TABLE, n_chunks)
        return out
    out = np.empty((x.shape[0], n_out), dtype=np.float32)
    step = max(1, _TILE_ELEMS // n_in)
    tile = np.empty((min(step, n_out), n_in), dtype=np.float32)
    for r0 in range(0, n_out, step):
        n = min(step, n_out - r0)
        quants.dequant_rows(qtype, w.data, r0, tile[:n], F16_TABLE)
        np.matmul(x, tile[:n].T, out=out[:, r0:r0 + n])
    return out
