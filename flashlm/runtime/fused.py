"""Packs a DecoderLM's weights and settings for the compiled decode step."""

from __future__ import annotations

import numba
import numpy as np
from numba.typed import List

from ..kernels_cpu import F16_TABLE
from ..kernels_cpu import decode as D
from ..runtime.config import ROPE_NEOX


class FusedDecoder:
    """One-token forward passes of `model` through kernels_cpu.decode.decode_step."""

    def __init__(self, model):
        cfg, s = model.cfg, model.store
        self.cfg = cfg
        names = [f"blk.{i}.{slot}.weight" for i in range(cfg.n_layer) for slot in D.SLOTS]
        refs = [s.get(n) for n in names] + [model.tok_embd, model.output]
        self.mats = List()
        for r in refs:
            self.mats.append(np.asarray(r.data).view(np.ndarray))
        self.qt = np.array([int(r.qtype) for r in refs], dtype=np.int64)
        self.all_rows = np.arange(max(r.data.shape[0] for r in refs), dtype=np.int64)
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
        ip[D.I_QK_NORM], ip[D.I_POST_NORMS] = model.qk_norm, model.post_norms
        ip[D.I_GELU], ip[D.I_SCALE_Q], ip[D.I_BIAS] = model.activation == "gelu", model.scale_q, has_bias
        self.ip = ip
        self.fp = np.array([cfg.rms_eps, cfg.rope_base, cfg.rope_base_swa, cfg.rope_scale, cfg.attn_scale,
                            cfg.embed_scale, cfg.final_softcap], dtype=np.float64)

    def step(self, tok: int, pos: int, kv) -> np.ndarray:
        """Logits (n_vocab,) float32 of token tok at position pos; fills kv at pos."""
        self.ip[D.I_THREADS] = numba.get_num_threads()
        logits = np.empty(self.cfg.n_vocab, dtype=np.float32)
        D.decode_step(tok, pos, self.mats, self.qt, self.vecs, self.swa, kv.k, kv.v, self.ip, self.fp,
                      F16_TABLE, self.all_rows, logits)
        return logits
