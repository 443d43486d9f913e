"""Packs a DecoderLM's weights and settings for the compiled decode step."""

from __future__ import annotations

import numba
import numpy as np
from gguf import GGMLQuantizationType

from ..cache import SlotCache
from ..kernels_cpu import F16_TABLE
from ..kernels_cpu import decode as D
from ..kernels_cpu.ops import ROPE_NEOX


def root_buffer(a: np.ndarray) -> np.ndarray:
    """The array at the bottom of a's chain of views (for a weight: the mapped file)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def weight_refs(model, ffn: bool = True) -> list:
    """The model's matrices in decode_step's order: SLOTS per layer, then embeddings
    and output. ffn=False: None in the FFN slots (FFNs that run in Python)."""
    refs = []
    for i, f in enumerate(model.ffn):
        refs += [model.store.get(f"blk.{i}.{slot}.weight") for slot in D.SLOTS[:4]]
        refs += list(f.weights()) if ffn else [None] * 3
    return refs + [model.tok_embd, model.output]


def fusable(refs) -> bool:
    """Whether these weights lie in one mapped buffer, as decode_step needs (a model
    split over several files is run layer by layer instead)."""
    refs = [r for r in refs if r is not None]
    return len({id(root_buffer(r.data)) for r in refs}) == 1 and all(r.data.flags.c_contiguous for r in refs)


def _arena(refs) -> tuple[np.ndarray, np.ndarray]:
    """The one buffer holding all the weights, and (offset, rows, row_bytes) of each
    (0, 0, 0 for a None). A table of offsets, not a numba typed List of arrays: that
    List costs ~70 MB of compiler memory and 0.4 s at start, measured."""
    root = root_buffer(next(r for r in refs if r is not None).data)
    arena = root.reshape(-1).view(np.uint8).view(np.ndarray)
    base = arena.ctypes.data
    mats = np.array([(r.data.ctypes.data - base, r.data.shape[0], r.data.shape[1]) if r is not None else (0, 0, 0)
                     for r in refs], dtype=np.int64)
    return arena, mats


class FusedDecoder:
    """One-token forward passes of `model` through kernels_cpu.decode.decode_step."""

    ffn = True  # the FFN weights are in the arena

    def __init__(self, model):
        cfg = model.cfg
        self.cfg = cfg
        refs = weight_refs(model, self.ffn)
        self.arena, self.mats = _arena(refs)
        self.qt = np.array([int(r.qtype) if r is not None else -1 for r in refs], dtype=np.int64)
        self.all_rows = np.arange(max(r.data.shape[0] for r in refs if r is not None), dtype=np.int64)
        width = max(cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.v_head_dim)
        self.vecs = np.zeros((cfg.n_layer + 1, len(D.VECS), width), dtype=np.float32)
        has_bias = False
        for i, vec in enumerate(model.layers):
            for j, name in enumerate(D.VECS):
                v = vec.get(name)
                if v is not None:
                    self.vecs[i, j, : v.shape[0]] = v
                    has_bias |= name.endswith(".bias")
        self.vecs[cfg.n_layer, D.V_ATTN_NORM, : cfg.n_embd] = model.output_norm
        self.swa = np.array(cfg.swa_layers, dtype=np.bool_)
        ip = np.zeros(15, dtype=np.int64)
        ip[D.I_LAYERS], ip[D.I_EMBD], ip[D.I_HEAD], ip[D.I_HEAD_KV] = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_head_kv
        ip[D.I_HD], ip[D.I_HD_V], ip[D.I_ROPE_DIM] = cfg.head_dim, cfg.v_head_dim, cfg.rope_dim or cfg.head_dim
        ip[D.I_NEOX] = cfg.rope_type == ROPE_NEOX
        ip[D.I_WINDOW] = cfg.sliding_window
        ip[D.I_QK_NORM], ip[D.I_POST_NORMS] = model.qk_norm + 2 * model.qk_norm_full, model.post_norms
        ip[D.I_GELU], ip[D.I_SCALE_Q], ip[D.I_BIAS] = model.activation == "gelu", model.scale_q, has_bias
        self.ip = ip
        self.fp = np.array([cfg.rms_eps, cfg.rope_base, cfg.rope_base_swa, cfg.rope_scale, cfg.attn_scale,
                            cfg.embed_scale, cfg.final_softcap, cfg.residual_scale, cfg.logit_scale],
                           dtype=np.float64)

    def step(self, tok: int, pos: int, kv) -> np.ndarray:
        """Logits (n_vocab,) float32 of token tok at position pos; fills kv at pos."""
        self.ip[D.I_THREADS] = numba.get_num_threads()
        logits = np.empty(self.cfg.n_vocab, dtype=np.float32)
        kv.reserve(pos + 1)
        D.decode_step(tok, pos, self.arena, self.mats, self.qt, self.vecs, self.swa, kv.k16, kv.v16, self.ip, self.fp,
                      F16_TABLE, self.all_rows, logits)
        return logits


class LayerDecoder(FusedDecoder):
    """decode_step in pieces around an FFN that runs in Python: a flash-layout model's
    (the store predicts, loads and multiplies the neurons a token needs) or a mixture
    of experts' (the router picks them). One compiled call per layer for the attention,
    the model's ffn_core between, the same math as decode_step."""

    ffn = False

    def __init__(self, model):
        super().__init__(model)
        self.layer_ffn = model.ffn

    def step(self, tok: int, pos: int, kv) -> np.ndarray:
        self.ip[D.I_THREADS] = numba.get_num_threads()
        d = self.cfg.n_embd
        x, h = np.empty(d, dtype=np.float32), np.empty(d, dtype=np.float32)
        logits = np.empty(self.cfg.n_vocab, dtype=np.float32)
        kv.reserve(pos + 1)
        a, m, qt, vecs, ip, fp = self.arena, self.mats, self.qt, self.vecs, self.ip, self.fp
        D.decode_embed(tok, a, m, qt, ip, fp, F16_TABLE, x)
        for i in range(self.cfg.n_layer):
            D.decode_attn(i, pos, x, h, a, m, qt, vecs, self.swa, kv.k16, kv.v16, ip, fp, F16_TABLE, self.all_rows)
            o = self.layer_ffn[i](h.reshape(1, -1))
            D.decode_add_ffn(i, o.reshape(-1), x, vecs, ip, fp)
        D.decode_head(x, a, m, qt, vecs, ip, fp, F16_TABLE, self.all_rows, logits)
        return logits


def warm_decode_kernels() -> None:
    """Run the compiled decode step, its per-layer pieces, the experts' decode and routing
    and the expert cache's bookkeeping once on a tiny all-zero model (one layer, width 32,
    Q8_0), with the argument types real models pass: their machine code is then loaded
    (from numba's cache) as part of an idle process, like every other kernel, not at a
    model's first token."""
    d, n = 32, 2 * D.N_SLOTS + 2
    arena = np.zeros(n * d * 34, dtype=np.uint8)
    arena.setflags(write=False)  # as a read-only mapped file
    mats = np.array([(i * d * 34, d, 34) for i in range(n)], dtype=np.int64)
    qt = np.full(n, int(GGMLQuantizationType.Q8_0), dtype=np.int64)
    ip = np.zeros(15, dtype=np.int64)
    ip[D.I_LAYERS], ip[D.I_EMBD], ip[D.I_HEAD], ip[D.I_HEAD_KV] = 1, d, 1, 1
    ip[D.I_HD], ip[D.I_HD_V], ip[D.I_ROPE_DIM], ip[D.I_THREADS] = d, d, d, numba.get_num_threads()
    fp = np.array([1e-6, 10000.0, 10000.0, 1.0, d ** -0.5, 1.0, 0.0, 1.0, 1.0], dtype=np.float64)
    vecs = np.ones((2, len(D.VECS), d), dtype=np.float32)
    swa = np.zeros(1, dtype=np.bool_)
    kc, vc = np.zeros((1, 1, 4, d), dtype=np.uint16), np.zeros((1, 1, 4, d), dtype=np.uint16)
    rows = np.arange(d, dtype=np.int64)
    x, h, logits = (np.zeros(d, dtype=np.float32) for _ in range(3))
    D.decode_step(0, 0, arena, mats, qt, vecs, swa, kc, vc, ip, fp, F16_TABLE, rows, logits)
    D.decode_embed(0, arena, mats, qt, ip, fp, F16_TABLE, x)
    D.decode_attn(0, 1, x, h, arena, mats, qt, vecs, swa, kc, vc, ip, fp, F16_TABLE, rows)
    D.decode_add_ffn(0, np.zeros((1, d), dtype=np.float32).reshape(-1), x, vecs, ip, fp)
    D.decode_head(x, arena, mats, qt, vecs, ip, fp, F16_TABLE, rows, logits)
    # a token's experts: from the mapped file (read-only) or the expert cache's pool
    shapes = np.array([(d, 34)] * 3, dtype=np.int64)
    offs = np.zeros((1, 3), dtype=np.int64)
    for buf in (arena, np.zeros_like(arena)):
        D.moe_decode(buf, offs, shapes, qt[:3].copy(), x, np.ones(1, dtype=np.float32), False, F16_TABLE,
                     numba.get_num_threads(), rows, np.zeros((1, d), dtype=np.float32)[0])
    # and in parts, as a streamed token computes its cached experts while the others are read
    y = np.zeros((1, d), dtype=np.float32)
    D.moe_experts(np.zeros_like(arena), offs, np.zeros(1, dtype=np.int64), shapes, qt[:3].copy(), x, False,
                  F16_TABLE, numba.get_num_threads(), rows, y)
    D.moe_combine(y, np.ones(1, dtype=np.float32), np.zeros(d, dtype=np.float32))
    # a token's routing (a mapped float32 router of 2 experts; with the next layer's, to
    # prefetch) and the expert cache's bookkeeping
    router = np.zeros((2, 4 * d), dtype=np.uint8)
    router.setflags(write=False)
    f32 = int(GGMLQuantizationType.F32)
    ids, wts, p = np.empty(1, dtype=np.int64), np.empty(1, dtype=np.float32), np.empty(2, dtype=np.float32)
    D.moe_route(router, f32, x, False, True, 0.0, F16_TABLE, rows, ids, wts, p)
    D.moe_route_ahead(router, f32, x, False, True, 0.0, F16_TABLE, rows, ids, wts, p, router, f32, rows,
                      ids.copy(), wts.copy(), p.copy())
    cache = SlotCache(2, 64, "score", n_keys=2)
    cache.observe(0, p)
    cache.observe_used(0, 2, ids[None])
    cache.assign(ids, pin=True)
