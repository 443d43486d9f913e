"""Loading the compiled kernels' machine code before a model needs it."""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType

from ..cache import SlotCache
from ..kernels_cpu import F16_TABLE
from ..kernels_cpu import decode as D
from ..kernels_cpu import layer as L
from ..kernels_cpu import moe as M


def warm_decode_kernels() -> None:
    """Run the compiled decode step, its per-layer pieces, the layer steps prefill runs,
    the experts' decode and routing and the expert cache's bookkeeping once on a tiny
    all-zero model (one layer, width 32, Q8_0), with the argument types real models
    pass: their machine code is then loaded (from numba's cache) as part of an idle
    process, like every other kernel, not at a model's first token."""
    d, n, nt = 32, 2 * D.N_SLOTS + 2, numba.get_num_threads()
    arena = np.zeros(n * d * 34, dtype=np.uint8)
    arena.setflags(write=False)  # as a read-only mapped file
    mats = np.array([(i * d * 34, d, 34) for i in range(n)], dtype=np.int64)
    qt = np.full(n, int(GGMLQuantizationType.Q8_0), dtype=np.int64)
    a = L.arch_array(n_layer=1, n_embd=d, n_head=1, n_head_kv=1, head_dim=d, v_head_dim=d, rope_dim=d, neox=True,
                     window=0, qk_norm=False, qk_norm_full=False, post_norms=False, gelu=False, scale_q=False,
                     bias=False, eps=1e-6, rope_base=10000.0, rope_base_swa=10000.0, rope_scale=1.0,
                     attn_scale=d ** -0.5, embed_scale=1.0, softcap=0.0, residual=1.0, logit_scale=1.0)
    vecs = np.ones((2, len(L.VECS), d), dtype=np.float32)
    swa = np.zeros(1, dtype=np.bool_)
    kc, vc = np.zeros((1, 1, 4, d), dtype=np.uint16), np.zeros((1, 1, 4, d), dtype=np.uint16)
    rows = np.arange(d, dtype=np.int64)
    x, h, o = (np.zeros((1, d), dtype=np.float32) for _ in range(3))
    logits = np.zeros(d, dtype=np.float32)
    D.decode_step(0, 0, arena, mats, qt, vecs, swa, kc, vc, a, nt, F16_TABLE, rows, logits)
    D.decode_embed(0, arena, mats, qt, a, F16_TABLE, x[0])
    D.decode_attn(0, 1, x, h, arena, mats, qt, vecs, swa, kc, vc, a, nt, F16_TABLE, rows)
    D.decode_add_ffn(0, o, x, vecs, a)
    D.decode_head(x, arena, mats, qt, vecs, a, nt, F16_TABLE, rows, logits)
    # a prompt's layer steps (two tokens)
    x2, h2, q2, k2, v2 = (np.zeros((2, d), dtype=np.float32) for _ in range(5))
    L.scale_rows(x2, 1.0)
    L.norm_rows(x2, vecs[0, 0], 1e-6, h2)
    L.qkv_rows(0, 0, q2, k2, v2, vecs[0], False, kc, vc, a)
    L.attn_residual(q2, x2, h2, vecs[0], a)
    L.ffn_residual(q2, x2, vecs[0], a)
    L.logits_rows(q2, a)
    x = x[0]
    # a token's experts: from the mapped file (read-only) or the expert cache's pool
    shapes = np.array([(d, 34)] * 3, dtype=np.int64)
    offs = np.zeros((1, 3), dtype=np.int64)
    for buf in (arena, np.zeros_like(arena)):
        M.moe_decode(buf, offs, shapes, qt[:3].copy(), x, np.ones(1, dtype=np.float32), False, F16_TABLE,
                     nt, rows, np.zeros((1, d), dtype=np.float32)[0])
    # and in parts, as a streamed token computes its cached experts while the others are read
    y = np.zeros((1, d), dtype=np.float32)
    M.moe_experts(np.zeros_like(arena), offs, np.zeros(1, dtype=np.int64), shapes, qt[:3].copy(), x, False,
                  F16_TABLE, nt, rows, y)
    M.moe_combine(y, np.ones(1, dtype=np.float32), np.zeros(d, dtype=np.float32))
    # a token's routing (a mapped float32 router of 2 experts; with the next layer's, to
    # prefetch), a prompt's, and the expert cache's bookkeeping
    router = np.zeros((2, 4 * d), dtype=np.uint8)
    router.setflags(write=False)
    f32 = int(GGMLQuantizationType.F32)
    ids, wts, p = np.empty(1, dtype=np.int64), np.empty(1, dtype=np.float32), np.empty(2, dtype=np.float32)
    M.moe_route(router, f32, x, False, True, 0.0, F16_TABLE, rows, ids, wts, p)
    M.moe_route_ahead(router, f32, x, False, True, 0.0, F16_TABLE, rows, ids, wts, p, router, f32, rows,
                      ids.copy(), wts.copy(), p.copy())
    M.moe_route_rows(router, f32, x2, False, True, 0.0, F16_TABLE, rows, ids.reshape(1, 1).repeat(2, 0),
                     wts.reshape(1, 1).repeat(2, 0), p.reshape(1, 2).repeat(2, 0))
    cache = SlotCache(2, 64, "score", n_keys=2)
    cache.observe(0, p)
    cache.observe_used(0, 2, ids[None])
    cache.assign(ids, pin=True)
