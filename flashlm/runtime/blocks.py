"""Shared blocks of decoder-only transformers; each architecture file picks its options.

Tensor names are GGUF's (`blk.{i}.attn_q.weight`). Attention, norms and embeddings come
from the weight store (resident: the mapped file); each layer's FFN is a strategy the
loader chose (ffn.py), which the model calls without asking whether it streams.
"""

from __future__ import annotations

import threading

import numpy as np

from .. import kernels_cpu as K
from ..errors import ContextLengthError
from ..kernels_cpu.ops import ROPE_NEOX
from .config import ModelConfig


class Cancelled(Exception):
    """Raised inside a forward pass when the caller asked to stop."""


class KVCache:
    """Keys and values of every position so far, up to n_ctx.

    k: (n_layer, n_head_kv, capacity, head_dim) float16, v likewise with v_head_dim:
    llama.cpp's default cache type, and half the memory of float32. (The kernels take
    them as uint16 bits, `k16`/`v16`, and convert as they read.)
    The capacity grows (doubling, up to n_ctx) as positions are used: memory follows
    the conversation, not the context size. (A lazily mapped n_ctx-sized array does
    not: transparent huge pages make the first touch of each 2 MiB resident.)
    """

    START = 256  # positions

    def __init__(self, cfg: ModelConfig, n_ctx: int):
        self.n_ctx = n_ctx
        self._shape = (cfg.n_layer, cfg.n_head_kv), cfg.head_dim, cfg.v_head_dim
        self.k = self.v = None
        self._grow(min(n_ctx, self.START))
        self.pos = 0  # positions filled

    def _grow(self, cap: int):
        (lead, hd, hd_v), old = self._shape, (0 if self.k is None else self.k.shape[2])
        k = np.empty(lead + (cap, hd), dtype=np.float16)
        v = np.empty(lead + (cap, hd_v), dtype=np.float16)
        if old:
            k[:, :, :old] = self.k
            v[:, :, :old] = self.v
        self.k, self.v = k, v

    def reserve(self, n: int):
        """Make room for positions 0..n-1; ContextLengthError past n_ctx (the compiled
        kernels write positions unchecked: this is what keeps them inside the cache)."""
        cap = self.k.shape[2]
        if n > cap:
            if n > self.n_ctx:
                raise ContextLengthError(f"position {n - 1} is past the context of {self.n_ctx}; pass a larger n_ctx")
            while cap < n:
                cap *= 2
            self._grow(min(cap, self.n_ctx))

    def store(self, layer: int, pos0: int, k: np.ndarray, v: np.ndarray):
        """Write k (T, n_kv, hd), v (T, n_kv, hd_v) at positions pos0 .. pos0+T-1."""
        T = k.shape[0]
        self.reserve(pos0 + T)
        self.k[layer, :, pos0:pos0 + T] = k.transpose(1, 0, 2).astype(np.float16)
        self.v[layer, :, pos0:pos0 + T] = v.transpose(1, 0, 2).astype(np.float16)

    @property
    def k16(self) -> np.ndarray:
        return self.k.view(np.uint16)

    @property
    def v16(self) -> np.ndarray:
        return self.v.view(np.uint16)

    @property
    def nbytes_used(self) -> int:
        return int((self.k[:, :, : self.pos].nbytes + self.v[:, :, : self.pos].nbytes))


class DecoderLM:
    """A decoder-only LM; each architecture file subclasses it and sets its facts.

    The layer's math:
    qk_norm:      RMSNorm on each q and k head before RoPE (qwen3, gemma3)
    qk_norm_full: RMSNorm over the whole q and k projections (olmoe)
    post_norms:   RMSNorm on the attention and FFN outputs before the residual (gemma3)
    activation:   gate activation of the gated FFN, "silu" (SwiGLU) or "gelu" (GeGLU)
    scale_q:      multiply q by the attention scale before q.k (gemma3) rather than after
    Biases on q/k/v/o (qwen2) are used wherever the file has them.

    How llama.cpp reads the architecture's GGUF (runtime/config.py):
    rope:                 the RoPE pair order: ROPE_NORM (2i, 2i+1) or ROPE_NEOX (i, i + d/2)
    moe_weights_norm:     a mixture's top-k weights renormalised to sum 1
    expert_width_key:     the expert width is expert_feed_forward_length (else n_ff / k)
    always_shared_expert: a shared expert as wide as feed_forward_length when the file
                          names none (qwen2moe)
    gguf_config(get, n_layer, n_embd): settings from architecture-specific keys
    """

    qk_norm = False
    qk_norm_full = False
    post_norms = False
    activation = "silu"
    scale_q = False
    rope = ROPE_NEOX
    moe_weights_norm = False
    expert_width_key = False
    always_shared_expert = False

    @staticmethod
    def gguf_config(get, n_layer: int, n_embd: int) -> dict:
        """ModelConfig fields this architecture reads from its own GGUF keys (get(key, default))."""
        return {}

    def __init__(self, cfg: ModelConfig, store, ffn: list):
        self.cfg = cfg
        self.store = store
        self.ffn = ffn  # one FFN strategy per layer (ffn.py)
        self.cancel_event = threading.Event()
        self.tok_embd = store.get("token_embd.weight")
        self.output = store.get("output.weight") if store.has("output.weight") else self.tok_embd
        self.output_norm = store.vector("output_norm.weight")
        self.layers = [self._layer_vectors(i) for i in range(cfg.n_layer)]
        from .fused import FusedDecoder, LayerDecoder, fusable, weight_refs

        # every FFN's weights addressable: the whole token in one compiled call; else the
        # compiled attention around FFNs that run in Python (streamed, or routed per token)
        whole = all(f.weights() is not None for f in ffn)
        self.fused = None
        if fusable(weight_refs(self, ffn=whole)):
            self.fused = FusedDecoder(self) if whole else LayerDecoder(self)

    @property
    def on_route(self):
        """None, or a function called with each MoE routing decision (traces, tests)."""
        return self.ffn[0].on_route if self.ffn else None

    @on_route.setter
    def on_route(self, fn):
        for f in self.ffn:
            f.on_route = fn

    def _layer_vectors(self, i: int) -> dict:
        s = self.store
        names = ["attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm",
                 "post_ffw_norm"]
        vec = {n: s.vector(f"blk.{i}.{n}.weight") for n in names}
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            vec[n + ".bias"] = s.vector(f"blk.{i}.{n}.bias")
        return vec

    # -- one layer ---------------------------------------------------------------

    def _attention(self, i: int, h: np.ndarray, pos0: int, kv: KVCache) -> np.ndarray:
        cfg, vec = self.cfg, self.layers[i]
        T = h.shape[0]
        q, k, v = self._proj(h, i, ("attn_q", "attn_k", "attn_v"))
        q = q.reshape(T, cfg.n_head, cfg.head_dim)
        k = k.reshape(T, cfg.n_head_kv, cfg.head_dim)
        v = v.reshape(T, cfg.n_head_kv, cfg.v_head_dim)
        if self.qk_norm:
            q = K.rmsnorm(q, vec["attn_q_norm"], cfg.rms_eps)
            k = K.rmsnorm(k, vec["attn_k_norm"], cfg.rms_eps)
        if self.qk_norm_full:
            q = K.rmsnorm(q.reshape(T, -1), vec["attn_q_norm"], cfg.rms_eps).reshape(q.shape)
            k = K.rmsnorm(k.reshape(T, -1), vec["attn_k_norm"], cfg.rms_eps).reshape(k.shape)
        swa = cfg.swa_layers[i]
        base = cfg.rope_base_swa if swa else cfg.rope_base
        scale = 1.0 if swa else cfg.rope_scale
        pos = np.arange(pos0, pos0 + T)
        K.rope(q, pos, cfg.rope_dim, base, scale, cfg.rope_type)
        K.rope(k, pos, cfg.rope_dim, base, scale, cfg.rope_type)
        kv.store(i, pos0, k, v)
        scale = cfg.attn_scale
        if self.scale_q:
            q *= np.float32(scale)
            scale = 1.0
        o = K.attend(q, kv.k16, kv.v16, i, pos0, scale, cfg.sliding_window if swa else 0)
        (o,) = self._proj(o.reshape(T, -1), i, ("attn_output",))
        if self.post_norms:
            o = K.rmsnorm(o, vec["post_attention_norm"], cfg.rms_eps)
        return o

    def _ffn(self, i: int, h: np.ndarray) -> np.ndarray:
        d = self.ffn[i](h)
        if self.post_norms:
            d = K.rmsnorm(d, self.layers[i]["post_ffw_norm"], self.cfg.rms_eps)
        return d

    def _proj(self, x: np.ndarray, i: int, names: tuple[str, ...]) -> list[np.ndarray]:
        """x through layer i's projections `names` (one pass), biases added."""
        ys = K.linear_many(x, [self.store.get(f"blk.{i}.{n}.weight") for n in names])
        bs = [self.layers[i][n + ".bias"] for n in names]
        return [y + b if b is not None else y for y, b in zip(ys, bs)]

    # -- the whole model -----------------------------------------------------------

    def forward(self, tokens: np.ndarray, pos0: int, kv: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run tokens (T,) at positions pos0.. through the model, filling the KV cache.

        Returns logits (T, n_vocab) if all_logits else (1, n_vocab) for the last token.
        Raises Cancelled between layers once cancel_event is set. One token goes
        through the compiled decode step (kernels_cpu.decode) when the weights allow.
        """
        if len(tokens) == 1 and self.fused is not None:
            if self.cancel_event.is_set():
                raise Cancelled()
            logits = self.fused.step(int(tokens[0]), pos0, kv)
            kv.pos = pos0 + 1
            return logits.reshape(1, -1)
        with K.blas_one_thread():
            return self._forward(tokens, pos0, kv, all_logits)

    def _forward(self, tokens: np.ndarray, pos0: int, kv: KVCache, all_logits: bool) -> np.ndarray:
        cfg = self.cfg
        x = K.embed(self.tok_embd, tokens)  # (T, n_embd)
        if cfg.embed_scale != 1.0:
            x *= np.float32(cfg.embed_scale)
        for i in range(cfg.n_layer):
            if self.cancel_event.is_set():
                raise Cancelled()
            vec = self.layers[i]
            rs = np.float32(cfg.residual_scale)
            x = x + self._attention(i, K.rmsnorm(x, vec["attn_norm"], cfg.rms_eps), pos0, kv) * rs
            x = x + self._ffn(i, K.rmsnorm(x, vec["ffn_norm"], cfg.rms_eps)) * rs
        kv.pos = pos0 + len(tokens)
        if not all_logits:
            x = x[-1:]
        logits = K.linear(K.rmsnorm(x, self.output_norm, cfg.rms_eps), self.output)
        if cfg.logit_scale != 1.0:
            logits = logits * np.float32(1.0 / cfg.logit_scale)  # as llama.cpp: times the reciprocal
        if cfg.final_softcap:
            logits = np.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        return logits
