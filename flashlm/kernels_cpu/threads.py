"""The prefill threads: our own pool, each thread taking a share of a product's rows
(numba kernels release the GIL), BLAS held to one thread meanwhile, and the float
tiles that dequantized weights go through BLAS in."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

from . import quants
from .quants import F16_TABLE


# Dequantized tile of a weight for prefill, in float32 elements (1 MiB: this L2).
_TILE_ELEMS = 1 << 18


def _share_rows(pieces, quantum: int) -> None:
    """Run pieces (fn, input, w, r0, r1, out) -- fn(input, w, r0, r1, out) fills rows
    r0..r1 of out -- with the rows cut into about one equal share per prefill thread.
    A piece is cut only a multiple of `quantum` rows from its first row: with a quantum
    at which fn's results do not depend on the cuts (a GEMM's row block, a BLAS tile),
    no result depends on the thread count."""
    total = sum(p[4] - p[3] for p in pieces)
    n_workers = min(numba.get_num_threads(), max(1, total // 64))
    if n_workers == 1:
        for fn, *args in pieces:
            fn(*args)
        return
    shares = [[] for _ in range(n_workers)]
    per = -(-total // n_workers)
    k, room = 0, per
    for fn, xw, w, start, r1, out in pieces:
        r0 = start
        while r0 < r1:
            n = r1 - r0
            if k < n_workers - 1 and room < n:  # a cut, at a multiple of quantum from the piece's start
                n = min(n, -(-(r0 - start + room) // quantum) * quantum - (r0 - start))
            shares[k].append((fn, xw, w, r0, r0 + n, out))
            r0 += n
            room -= n
            if room <= 0 and k < n_workers - 1:
                k, room = k + 1, per
    _on_threads(_run_share, [(sh,) for sh in shares])


def _run_share(share) -> None:
    for fn, *args in share:
        fn(*args)


def _spans(n: int) -> list[tuple[int, int]]:
    """[0, n) cut into one nearly equal span per prefill thread (fewer if n is small)."""
    k = min(numba.get_num_threads(), n)
    return [(n * i // k, n * (i + 1) // k) for i in range(k)]


def _on_threads(fn, arg_lists) -> None:
    """fn(*args) for each entry, at once on the prefill threads (the first on this one).
    Every job has finished when this returns, also when one of them raised."""
    if len(arg_lists) == 1:
        fn(*arg_lists[0])
        return
    pool = _pool(len(arg_lists))
    jobs = [pool.submit(fn, *a) for a in arg_lists[1:]]
    try:
        fn(*arg_lists[0])
    finally:
        for j in jobs:  # never leave a worker writing into buffers the caller drops
            j.exception()
    for j in jobs:
        j.result()


# Prefill threads: our own pool, each thread decoding a tile of weight rows (numba,
# GIL released) and multiplying it with single-threaded BLAS. Letting numba and
# OpenBLAS each run a pool of their own makes both spin-wait on the same two cores:
# 4-5x slower, measured.
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_TILES = threading.local()
_BLAS_LOCK = threading.Lock()
_BLAS_HOLDERS = 0  # blas_one_thread blocks open, in any thread
_BLAS_SAVED = None  # the limits to restore when the last one closes


def _pool(n: int) -> ThreadPoolExecutor:
    """Threads beside the calling one, which takes the first share itself. A pool too
    small is replaced; the old one finishes its queued jobs and then its threads exit."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < n - 1:
            old, _POOL = _POOL, ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="flashlm-prefill")
            if old is not None:
                old.shutdown(wait=False)
        return _POOL


@contextlib.contextmanager
def blas_one_thread():
    """BLAS on the calling thread only, for the duration. Hold it over a whole prefill:
    a multi-threaded BLAS call in between (attention) leaves OpenBLAS's threads
    spinning into the next product, 1.5x slower, measured.

    BLAS's thread count is process-wide, so overlapping blocks (prefills in two
    threads) share one limit: set by the first to open, restored by the last to close.
    """
    global _BLAS_HOLDERS, _BLAS_SAVED
    with _BLAS_LOCK:
        if _BLAS_HOLDERS == 0:
            from threadpoolctl import ThreadpoolController

            # A fresh scan each time (~0.5 ms): a BLAS loaded since (scipy's, by a
            # later import) is held at one thread too.
            _BLAS_SAVED = ThreadpoolController().limit(limits=1, user_api="blas")
        _BLAS_HOLDERS += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_HOLDERS -= 1
            if _BLAS_HOLDERS == 0:
                _BLAS_SAVED.restore_original_limits()
                _BLAS_SAVED = None


def tile_rows(n_in: int) -> int:
    """Rows of a float tile of a weight with n_in columns (about 1 MiB). _tiled_product's
    tiles start at multiples of it, so a share cut at one gives the same BLAS calls."""
    return max(16, _TILE_ELEMS // n_in)


def _tiled_product(x: np.ndarray, w, r0: int, r1: int, out: np.ndarray) -> None:
    """out[:, r0:r1] = x @ W[r0:r1].T, one L2-sized float tile of W at a time (r0 a
    multiple of tile_rows, or the start of the weight)."""
    n_in = w.shape[-1]
    step = tile_rows(n_in)
    tile = getattr(_TILES, "buf", None)
    if tile is None or tile.size < step * n_in:
        tile = _TILES.buf = np.empty(step * n_in, dtype=np.float32)
    qtype = int(w.qtype)
    for a in range(r0, r1, step):
        n = min(step, r1 - a)
        t = tile[:n * n_in].reshape(n, n_in)
        quants.dequant_rows_serial(qtype, w.data, a, t, F16_TABLE)
        np.matmul(x, t.T, out=out[:, a:a + n])
