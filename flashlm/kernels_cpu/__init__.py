"""CPU kernels: quantized matrix products on GGML block formats, and a layer's math.

`linear` is the one entry point model code uses for a weight product; it dispatches on
the weight's GGML type (decode: fused dequantize-dot `matvec`; prefill: the integer
GEMM in `gemm.py` on VNNI CPUs, dequantized tiles fed to BLAS elsewhere). layer.py
defines a transformer layer's steps once, for prefill and for the compiled decode step
(decode.py); moe.py a mixture of experts' routing and expert products.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import os
from pathlib import Path

import sys

import numba
import numpy as np


def _load_numba_without_scipy_blas():
    """Numba probes for BLAS when its CPU target first loads (numba.np.arraymath imports
    scipy.linalg), which maps scipy's OpenBLAS and LAPACK: 17 MiB of RSS for nothing,
    since no flashlm kernel calls BLAS from compiled code. Load the target with
    scipy.linalg hidden; numba then registers its BLAS-only array functions without
    BLAS (np.dot and np.linalg still find scipy when compiled later), and scipy.linalg
    imports as usual afterwards."""
    if "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:
        return  # already paid for, or numba's target already loaded
    from numba.core.registry import cpu_target

    sys.modules["scipy.linalg"] = None  # `import scipy.linalg` raises ImportError meanwhile
    try:
        cpu_target.target_context.refresh()
    finally:
        del sys.modules["scipy.linalg"]


_load_numba_without_scipy_blas()

from ..target import TARGET  # noqa: E402
from . import simd  # noqa: E402  (imports no kernels: their cache is checked first)


@functools.lru_cache(maxsize=1)
def sources_digest() -> str:
    """The kernel sources' digest: what a cache of their compiled code is valid for (read
    once a process: the cache check on import and the seeding both ask)."""
    here = Path(__file__).parent
    sources = b"".join(p.read_bytes() for p in sorted(here.glob("*.py")))
    # (numba keys entries on its target CPU: the portable targets' caches live side by
    # side; code for the host's own name depends on the path it was compiled for)
    host = f"{simd.MODE} vnni={simd.VNNI}" if TARGET.cpu_name is None else ""
    return hashlib.sha256(sources + host.encode()).hexdigest()


def _drop_stale_numba_cache():
    """Numba's on-disk cache checks only the changed function's own file, so a kernel
    that inlines code from a sibling file would keep stale machine code after an
    upgrade. Key the whole folder's cache on all kernel sources, and, for code compiled
    for the host's own CPU name, on the SIMD path, instead. (A cache in NUMBA_CACHE_DIR
    is left alone.)"""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    digest = sources_digest()
    cache = Path(__file__).parent / "__pycache__"
    stamp = cache / "numba-sources.sha256"
    try:
        if stamp.exists() and stamp.read_text() == digest:
            return
        for f in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            f.unlink()
        cache.mkdir(exist_ok=True)
        stamp.write_text(digest)
    except OSError:  # a read-only install: numba falls back to compiling in memory
        pass


_drop_stale_numba_cache()

PREBUILT = Path(__file__).parent.parent / "_prebuilt"  # compiled kernels a wheel carries (apps/prebuild.py)


def numba_cache_path(package_dir: Path) -> Path:
    """Where numba keeps the compiled code of the functions in package_dir's files."""
    if numba.config.CACHE_DIR:
        from numba.core.caching import UserProvidedCacheLocator

        sub = UserProvidedCacheLocator.get_suitable_cache_subpath(str(package_dir / "x.py"))
        return Path(numba.config.CACHE_DIR) / sub
    return package_dir / "__pycache__"


def prebuilt_matches(manifest: dict) -> bool:
    """Whether compiled kernels described by `manifest` (apps/prebuild.py's) run here:
    this numba, this Python, these kernel sources, this target."""
    return (manifest.get("numba") == numba.__version__ and manifest.get("python") == sys.implementation.cache_tag
            and manifest.get("sources") == sources_digest() and TARGET.tag in manifest.get("targets", ()))


def _seed_prebuilt() -> int:
    """Copy the wheel's compiled kernels (PREBUILT) into numba's cache, for each function
    whose cache index is not there yet (a user's own cache is never overwritten), when
    they were built for this numba, Python, kernel sources and target. A first run then
    loads machine code instead of compiling it for a minute. Returns the indexes copied."""
    import json
    import shutil

    try:
        manifest = json.loads((PREBUILT / "manifest.json").read_text())
    except (OSError, ValueError):
        return 0
    if not prebuilt_matches(manifest):
        return 0
    copied = 0
    try:
        for sub in sorted(p for p in PREBUILT.iterdir() if p.is_dir()):
            dest = numba_cache_path(PREBUILT.parent / sub.name)
            for index in sorted(sub.glob("*.nbi")):
                if (dest / index.name).exists():
                    continue
                dest.mkdir(parents=True, exist_ok=True)
                for data in sub.glob(index.name[:-len(".nbi")] + ".*.nbc"):
                    shutil.copyfile(data, dest / data.name)
                shutil.copyfile(index, dest / index.name)  # last: the index names the data files
                copied += 1
    except OSError:  # a read-only cache: numba compiles, as without them
        pass
    return copied


_seed_prebuilt()

from . import gemm, qdot, quants  # noqa: E402
from .attention import CACHE_TYPES, F16 as KV_F16, attend_queries, row_elems  # noqa: F401
from .layer import act_rows, glu_rows  # noqa: E402
from .threads import _on_threads, _share_rows, _spans, _tiled_product, blas_one_thread, tile_rows  # noqa: E402,F401
from .quants import F16_TABLE, SUPPORTED_TYPES  # noqa: F401

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
    # a few rows (a norm vector, a bias: a model loads hundreds) on this thread: a parallel
    # region per vector cost 8 ms each on a busy machine, half a second of a load
    (quants.dequant_rows if rows >= 64 else quants.dequant_rows_serial)(int(w.qtype), w.data, 0, out, F16_TABLE)
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


def _act_block(qtype: int) -> int:
    """Block of the 8-bit activations llama.cpp pairs with a weight type (0: float)."""
    return 256 if qtype in _K_QUANTS else 32 if qtype in _LEGACY_QUANTS else 0


def quantize_q8(x: np.ndarray, block: int):
    """x (T, n) float32 -> (xq int8 (T, n), xd, xs, isum): see qdot.quantize_q8_serial.

    The tokens are shared among the prefill threads. (Not numba's own threads: its
    OpenMP workers spin for a while after a parallel loop, and would take a core from
    the product that follows, 2x slower, measured.)"""
    T, n = x.shape
    nb = n // block
    xq = np.empty((T, n), dtype=np.int8)
    xd = np.empty((T, nb), dtype=np.float32)
    xs = np.empty((T, nb), dtype=np.float32)
    isum = np.empty((T, n // 16 if block == 256 else nb), dtype=np.int32)
    _on_threads(qdot.quantize_q8_serial, [(x[a:b], block, xq[a:b], xd[a:b], xs[a:b], isum[a:b]) for a, b in _spans(T)])
    return xq, xd, xs, isum


def quantize_activations(x: np.ndarray, qtype: int) -> np.ndarray:
    """x as llama.cpp feeds it to a product with a `qtype` weight (its vec_dot_type).

    Q8_K (256-blocks) for K-quants, Q8_0 (32-blocks) for legacy quants, f16 for F16
    weights, unchanged for F32.
    """
    block = _act_block(qtype)
    if block:
        xq, xd, _, _ = quantize_q8(np.ascontiguousarray(x, dtype=np.float32), block)
        T, n = x.shape
        return (xq.reshape(T, n // block, block) * xd[:, :, None]).reshape(T, n)
    if qtype == int(quants.T.F16):
        return x.astype(np.float16).astype(np.float32)
    if qtype == int(quants.T.BF16):
        bits = (x.view(np.uint32) + np.uint32(0x7FFF) + ((x.view(np.uint32) >> 16) & 1)) & np.uint32(0xFFFF0000)
        return bits.view(np.float32)
    return x


_ALL_ROWS: dict[int, np.ndarray] = {}


def _all_rows(n: int) -> np.ndarray:
    r = _ALL_ROWS.get(n)
    if r is None:
        r = _ALL_ROWS[n] = np.arange(n, dtype=np.int64)
    return r


def _n_chunks(n_rows: int) -> int:
    return max(1, min((n_rows + 3) // 4, 4 * numba.get_num_threads()))


def matvec(x: np.ndarray, w, rows: np.ndarray | None = None) -> np.ndarray:
    """W[rows] @ x for one activation vector x (n_in,) float32 -> (len(rows),) float32.

    Quantized weights multiply 8-bit activations with integer dot products (llama.cpp's
    scheme); float weights use float32 activations. rows: a subset of output rows
    (int64 ids), all of them if None.
    """
    qtype = int(w.qtype)
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(1, -1)
    rows = _all_rows(w.data.shape[0]) if rows is None else np.ascontiguousarray(rows, dtype=np.int64)
    out = np.empty(rows.shape[0], dtype=np.float32)
    block = _act_block(qtype) if _QUANTIZE_ACTIVATIONS else 0
    if block:
        xq, xd, xs, isum = quantize_q8(x, block)
        qdot.matvec_rows(qtype, w.data, rows, x[0], xq[0], xd[0], xs[0], isum[0], out, F16_TABLE,
                         _n_chunks(rows.shape[0]), False)
    else:
        if _QUANTIZE_ACTIVATIONS:
            x = quantize_activations(x, qtype)
        xq, xd, xs, isum = _EMPTY_Q8
        qdot.matvec_rows(qtype, w.data, rows, x[0], xq, xd, xs, isum, out, F16_TABLE, _n_chunks(rows.shape[0]), True)
    return out


_EMPTY_Q8 = (np.empty(0, np.int8), np.empty(0, np.float32), np.empty(0, np.float32), np.empty(0, np.int32))


def matvec_t(coef: np.ndarray, w, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out += sum_i coef[i] * W[rows[i]] (in place, returned): the transposed product,
    for a down projection stored one row per FFN neuron. out: (n_cols,) float32."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    coef = np.ascontiguousarray(coef, dtype=np.float32)
    return matvec_t_split(coef, w.data, w.data, w.data.shape[0], int(w.qtype), rows, out)


def matvec_t_split(coef: np.ndarray, low: np.ndarray, high: np.ndarray, cap: int, qtype: int, rows: np.ndarray,
                   out: np.ndarray) -> np.ndarray:
    """matvec_t over a matrix held in two pieces: row r is low[r] for r < cap, else
    high[r - cap] (a flash layer's window and tail buffer, (rows, row_bytes) uint8 each).
    One sum over the rows in order, bit for bit matvec_t's over one matrix: a flash
    FFN's output must not depend on where its window ends (the plan sizes it)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    coef = np.ascontiguousarray(coef, dtype=np.float32)
    # Partial sums per chunk of 64 rows (32 chunks at most), added in order: a split that
    # depends on the rows alone, so the sum is the same bit for bit on any thread count.
    qdot.matvec_t_rows(int(qtype), low, high, int(cap), rows, coef, out, F16_TABLE,
                       max(1, min(32, -(-len(rows) // 64))))
    return out


def linear(x: np.ndarray, w) -> np.ndarray:
    """x @ W.T for a GGML-typed weight W of shape (n_out, n_in).

    x: (T, n_in) float32 -> (T, n_out) float32. One token: integer dot products
    (`matvec`); several: dequantized tiles of W through BLAS (faster here than
    integer products per token, measured), see `linear_many`.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[0] == 1:
        return matvec(x[0], w).reshape(1, w.data.shape[0])
    return linear_many(x, [w])[0]


def linear_many(x: np.ndarray, ws: list) -> list[np.ndarray]:
    """[x @ W.T for W in ws], weights sharing one input (q/k/v, gate/up), in one pass
    of the prefill threads: each thread takes an equal share of all the rows.

    Quantized weights multiply 8-bit activations in the integer GEMM (`gemm`) where the
    host has VNNI; otherwise, and for float weights, dequantized tiles go through BLAS.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    T = x.shape[0]
    if T == 1:
        return [matvec(x[0], w).reshape(1, -1) for w in ws]
    if _QUANTIZE_ACTIVATIONS and INT8_GEMM and all(_gemm_ok(w) for w in ws):
        prepare, key, product, quantum = gemm_activations, _gemm_key, _gemm_product, gemm.ROWS
        rows_out = -(-T // gemm.TOKENS) * gemm.TOKENS  # the GEMM's tokens come padded
        limit = contextlib.nullcontext()
    else:
        prepare = quantize_activations if _QUANTIZE_ACTIVATIONS else (lambda x, qtype: x)
        key = (lambda qtype: _act_block(qtype) or -qtype) if _QUANTIZE_ACTIVATIONS else (lambda qtype: 0)
        product, quantum, rows_out, limit = _tiled_product, tile_rows(x.shape[1]), T, blas_one_thread()
    acts = {}  # each weight type sees x as llama.cpp quantizes it for it, quantized once per kind
    for w in ws:
        if key(int(w.qtype)) not in acts:
            acts[key(int(w.qtype))] = prepare(x, int(w.qtype))
    outs = [np.empty((rows_out, w.data.shape[0]), dtype=np.float32) for w in ws]
    pieces = [(product, acts[key(int(w.qtype))], w, 0, w.data.shape[0], out) for w, out in zip(ws, outs)]
    with limit:
        _share_rows(pieces, quantum)
    return [o[:T] for o in outs]


# The integer prefill GEMM, on every path by default: vpdpbusd with VNNI; on AVX2
# vpmaddubsw/vpmaddwd (simd.dpbusd7: pp128 1.7x BLAS on dequantized tiles on SmolLM2 and
# 1.3-1.4x on Gemma 3, FLASHLM_SIMD=avx2 on this project's machine); on the portable path
# simd's plain LLVM vector IR. It makes a prefill's rows the decode step's math (8-bit
# activations), each row alike in any batch: so a reused prefix and a fresh prefill agree
# on every path. BLAS on dequantized tiles (FLASHLM_PREFILL=blas; float weights always)
# sums a row differently with the batch's size. (FLASHLM_PREFILL=blas or =int8 overrides;
# the tests use both.)
INT8_GEMM = {"blas": False, "int8": True}.get(os.environ.get("FLASHLM_PREFILL", "").strip().lower(), True)
_WITH_MIN = (int(quants.T.Q4_1), int(quants.T.Q5_1))


def prefill_rows_independent() -> bool:
    """Whether a prefill computes each token's row alike in any batch: so in the integer
    GEMM, not through BLAS, whose sums for a row change with the batch's size (with
    FLASHLM_SIMD=avx2, a prefix reused from a longer prompt gave other logits)."""
    return INT8_GEMM and _QUANTIZE_ACTIVATIONS


def _gemm_ok(w) -> bool:
    return int(w.qtype) in gemm.TYPES and w.data.shape[0] % gemm.ROWS == 0


def _gemm_key(qtype: int):
    return _act_block(qtype), gemm.scale_block(qtype), qtype in _WITH_MIN


def gemm_activations(x: np.ndarray, qtype: int):
    """x (T, n) float32 as the integer GEMM takes it for a `qtype` weight: (xq, dx, sx),
    llama.cpp's 8-bit activations for that type with T padded to a multiple of
    gemm.TOKENS (zero tokens). dx: the scale of each of the weight's scale blocks,
    sx: dx * sum(xq) over the block (Q8_1's rounded s for Q4_1 and Q5_1, as llama.cpp)."""
    T, n = x.shape
    t_pad = -(-T // gemm.TOKENS) * gemm.TOKENS
    if t_pad != T:
        x = np.concatenate([x, np.zeros((t_pad - T, n), dtype=np.float32)])
    block, blk = _act_block(qtype), gemm.scale_block(qtype)
    xq, xd, xs, isum = quantize_q8(x, block)
    if block == 32:
        return xq, xd, xs if qtype in _WITH_MIN else isum.astype(np.float32) * xd
    dx = np.repeat(xd, 256 // blk, axis=1)
    s = isum if blk == 16 else isum[:, 0::2] + isum[:, 1::2]
    return xq, dx, s.astype(np.float32) * dx


def _gemm_product(act, w, r0: int, r1: int, out: np.ndarray) -> None:
    xq, dx, sx = act
    gemm.gemm_rows(int(w.qtype), w.data, r0, r1, xq, dx, sx, out, F16_TABLE)


def attend(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, layer: int, pos0: int, scale: float,
           window: int = 0, k_type: int = KV_F16, v_type: int = KV_F16, v_rot: int = 0) -> np.ndarray:
    """Causal attention of queries q (T, n_head, hd) at positions pos0.. over a layer
    of the KV cache, which already holds their own keys and values.

    k_cache: (n_layer, n_kv, n_ctx, words) uint16 rows of k_type (attention.py: f16, q8_0,
    q4_0), v_cache likewise of v_type (rotated in blocks of v_rot, attention.rotation: the
    output is rotated back). window > 0 limits each query to its last `window`
    positions (sliding-window layers). Returns (T, n_head, hd_v). The (token, KV head)
    pairs are shared among the prefill threads.
    """
    T, n_head, hd = q.shape
    n_kv, hd_v = k_cache.shape[1], row_elems(v_type, v_cache.shape[-1])
    q2 = np.ascontiguousarray(q.reshape(T, n_head * hd), dtype=np.float32)
    out = np.empty((T, n_head * hd_v), dtype=np.float32)
    _on_threads(attend_queries, [(q2, k_cache, v_cache, layer, pos0, n_head, n_kv, hd, hd_v, np.float32(scale),
                                  window, k_type, v_type, v_rot, out, a, b)
                                 for a, b in _attend_spans(T, n_kv, pos0, window)])
    return out.reshape(T, n_head, hd_v)


def _attend_spans(T: int, n_kv: int, pos0: int, window: int) -> list[tuple[int, int]]:
    """attend_queries' T * n_kv units (token-major) cut into one span per prefill thread
    of about equal work (a token's: the positions it attends to)."""
    pos = pos0 + np.arange(T)
    work = np.repeat(np.minimum(pos + 1, window) if window > 0 else pos + 1, n_kv)
    ends = np.cumsum(work)
    k = min(numba.get_num_threads(), T * n_kv)
    cuts = [0] + [int(np.searchsorted(ends, ends[-1] * i / k)) for i in range(1, k)] + [T * n_kv]
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def glu(g: np.ndarray, u: np.ndarray, gelu: bool) -> np.ndarray:
    """act(g) * u for a gated FFN, act GELU (GeGLU) or SiLU (SwiGLU); (T, n) float32.
    Rows are shared among the prefill threads."""
    g = np.ascontiguousarray(g, dtype=np.float32)
    u = np.ascontiguousarray(u, dtype=np.float32)
    out = np.empty_like(g)
    _on_threads(glu_rows, [(g, u, gelu, F16_TABLE, out, a, b) for a, b in _spans(g.shape[0])])
    return out


def act(g: np.ndarray, gelu: bool) -> np.ndarray:
    """The gated FFN's activation of g (n,) float32, GELU or SiLU, as glu applies it."""
    out = np.empty((1, g.shape[0]), dtype=np.float32)
    act_rows(np.ascontiguousarray(g, dtype=np.float32).reshape(1, -1), gelu, F16_TABLE, out)
    return out[0]

