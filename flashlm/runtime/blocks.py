"""A decoder-only transformer: the KV cache, the model's layers over T tokens (prefill),
and the drivers of the compiled decode step (one token).

Tensor names are GGUF's (`blk.{i}.attn_q.weight`). Attention, norms and embeddings come
from the weight store (resident: the mapped file); each layer's FFN is a strategy the
loader chose (ffn.py), which the model calls without asking whether it streams. The
layer's math is kernels_cpu/layer.py's, the same functions for both paths.
"""

from __future__ import annotations

import threading

import numba
import numpy as np

from .. import kernels_cpu as K
from ..errors import ContextLengthError, FlashLMError, InvalidArgumentError
from ..kernels_cpu import F16_TABLE
from ..kernels_cpu import attention as A
from ..kernels_cpu import decode as D
from ..kernels_cpu import layer as L
from ..formats.modelfile import readonly
from ..kernels_cpu.layer import ROPE_NEOX
from .config import ModelConfig


class Cancelled(FlashLMError):
    """Raised inside a forward pass when the caller asked to stop (Model turns it into
    the finish_reason "cancelled")."""


def cache_types(k: str = "f16", v: str = "f16", cfg: ModelConfig | None = None) -> tuple[int, int]:
    """The KV cache's row types (attention.py's codes) for the names k and v ("f16", "q8_0",
    "q4_0", llama.cpp's --cache-type-k/-v); InvalidArgumentError for another name, or a
    block type on a model whose head size is not a multiple of its 32-element blocks."""
    out = []
    for what, name in (("cache_type_k", k), ("cache_type_v", v)):
        code = A.CACHE_TYPES.get(name.lower()) if isinstance(name, str) else None
        if code is None:
            raise InvalidArgumentError(f"{what} must be one of {', '.join(A.CACHE_TYPES)}, got {name!r}")
        out.append(code)
    if cfg is not None:
        for what, code, dim in (("cache_type_k", out[0], cfg.head_dim), ("cache_type_v", out[1], cfg.v_head_dim)):
            if code != A.F16 and dim % 32:
                raise InvalidArgumentError(f"{what} {A.TYPE_NAMES[code]} needs a head size that is a multiple of 32; "
                                           f"this model's is {dim}: use f16")
    return out[0], out[1]


def kv_bytes_per_position(cfg: ModelConfig, types: tuple[int, int] = (A.F16, A.F16)) -> int:
    """Bytes one position takes in a KV cache of these row types, all layers and KV heads."""
    words = A.row_words(types[0], cfg.head_dim) + A.row_words(types[1], cfg.v_head_dim)
    return 2 * cfg.n_layer * cfg.n_head_kv * words


def cache_label(types: tuple[int, int]) -> str:
    """The cache types' names: "q8_0", or "K q8_0, V f16" when they differ."""
    k, v = (A.TYPE_NAMES[t] for t in types)
    return k if k == v else f"K {k}, V {v}"


class KVCache:
    """Keys and values of every position so far, up to n_ctx.

    k: (n_layer, n_head_kv, capacity, words) in the cache type `types[0]`, v likewise in
    `types[1]` (kernels_cpu/attention.py): float16 (llama.cpp's default cache type, and
    half the memory of float32; words = head_dim), or Q8_0 / Q4_0 blocks held as uint16
    words (17 / 9 a block of 32: about 1/2 and 1/4 of float16's bytes). The kernels take
    them as uint16 words, `k16`/`v16`.
    The capacity grows (doubling, up to n_ctx) as positions are used: memory follows
    the conversation, not the context size. (A lazily mapped n_ctx-sized array does
    not: transparent huge pages make the first touch of each 2 MiB resident.)
    """

    START = 256  # positions

    def __init__(self, cfg: ModelConfig, n_ctx: int, types: tuple[int, int] = (A.F16, A.F16)):
        self.n_ctx = n_ctx
        self._init(cfg, (cfg.n_layer, cfg.n_head_kv), types)
        self.pos = 0  # positions filled

    def _init(self, cfg: ModelConfig, lead: tuple, types: tuple[int, int]):
        self.types = tuple(types)
        self._shape = lead, A.row_words(types[0], cfg.head_dim), A.row_words(types[1], cfg.v_head_dim)
        self._dtypes = [np.float16 if t == A.F16 else np.uint16 for t in types]  # f16 rows as float16, blocks as words
        self.k = self.v = None
        self._grow(min(self.n_ctx, self.START))

    def _grow(self, cap: int):
        (lead, wk, wv), old = self._shape, (0 if self.k is None else self.k.shape[-2])
        k = np.empty(lead + (cap, wk), dtype=self._dtypes[0])
        v = np.empty(lead + (cap, wv), dtype=self._dtypes[1])
        if old:
            k[..., :old, :] = self.k
            v[..., :old, :] = self.v
        self.k, self.v = k, v

    def reserve(self, n: int):
        """Make room for positions 0..n-1; ContextLengthError past n_ctx (the compiled
        kernels write positions unchecked: this is what keeps them inside the cache)."""
        cap = self.k.shape[-2]
        if n > cap:
            if n > self.n_ctx:
                raise ContextLengthError(f"position {n - 1} is past the context of {self.n_ctx}; pass a larger n_ctx")
            while cap < n:
                cap *= 2
            self._grow(min(cap, self.n_ctx))

    @property
    def k16(self) -> np.ndarray:
        return self.k.view(np.uint16)

    @property
    def v16(self) -> np.ndarray:
        return self.v.view(np.uint16)

    @property
    def nbytes_used(self) -> int:
        return int(self.k[..., : self.pos, :].nbytes + self.v[..., : self.pos, :].nbytes)


class Context:
    """A KV cache and the tokens whose keys and values it holds, in order; exact: how
    many leading positions a fresh prefill would reproduce bit for bit (Model._prefill)."""

    def __init__(self, kv):
        self.kv = kv
        self.tokens: list[int] = []
        self.exact = 0

    def truncate(self, n: int) -> None:
        del self.tokens[n:]
        self.exact = min(self.exact, n)


class SlotPool(KVCache):
    """The KV caches of a batch's sequences in one array per k and v, (n_slots, n_layer,
    n_head_kv, capacity, words) of the cache types (as KVCache's), so that one compiled step reaches them all.
    The capacity grows (doubling, up to n_ctx) for all slots together; slot(i) is slot
    i's KVCache-like view for the single-sequence passes (prefill)."""

    def __init__(self, cfg: ModelConfig, n_slots: int, n_ctx: int, types: tuple[int, int] = (A.F16, A.F16)):
        self.n_slots, self.n_ctx = n_slots, n_ctx
        self._init(cfg, (n_slots, cfg.n_layer, cfg.n_head_kv), types)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def bytes_per_position(self) -> int:
        """One slot's bytes for one position."""
        return (self.k.nbytes + self.v.nbytes) // (self.n_slots * self.k.shape[-2])

    def slot(self, i: int) -> SlotKV:
        return SlotKV(self, i)


class SlotKV:
    """Slot i of a SlotPool as a KVCache (what DecoderLM.forward and the decode step use)."""

    def __init__(self, pool: SlotPool, i: int):
        self.pool, self.i, self.n_ctx, self.pos = pool, i, pool.n_ctx, 0
        self.types = pool.types

    def reserve(self, n: int):
        self.pool.reserve(n)

    @property
    def k16(self) -> np.ndarray:
        return self.pool.k16[self.i]

    @property
    def v16(self) -> np.ndarray:
        return self.pool.v16[self.i]


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
        """ModelConfig fields this architecture reads from its own GGUF keys (get: a
        formats.validate.Metadata; its integer, number and text check a key's type and range)."""
        return {}

    def __init__(self, cfg: ModelConfig, store, ffn: list, cache_types: tuple[int, int] = (A.F16, A.F16)):
        self.cfg = cfg
        self.cache_types = tuple(cache_types)  # the KV cache's row types (cache_types())
        self.store = store
        self.ffn = ffn  # one FFN strategy per layer (ffn.py)
        self.rows_independent = all(f.rows_independent for f in ffn)  # prefill rows: alike in any batch
        self.cancel_event = threading.Event()
        self.tok_embd = store.get("token_embd.weight")
        self.output = store.get("output.weight") if store.has("output.weight") else self.tok_embd
        self.output_norm = store.vector("output_norm.weight")
        self.vecs, bias = self._vectors()
        self.arch = L.make_arch(cfg, self, bias, *self.cache_types)

        # every FFN's weights addressable: the whole token in one compiled call; else the
        # compiled attention around FFNs that run in Python (streamed, or routed per token)
        whole = all(f.weights() is not None for f in ffn)
        self.fused = None
        if fusable(weight_refs(self, ffn=whole)):
            self.fused = FusedDecoder(self) if whole else LayerDecoder(self)

    def kv_cache(self, n_ctx: int) -> KVCache:
        """A KV cache for this model (its cache types), up to n_ctx positions."""
        return KVCache(self.cfg, n_ctx, self.cache_types)

    def slot_pool(self, n_slots: int, n_ctx: int) -> SlotPool:
        """n_slots KV caches in one pool (the batch engine's), up to n_ctx positions each."""
        return SlotPool(self.cfg, n_slots, n_ctx, self.cache_types)

    def _check_kv(self, kv) -> None:
        """The compiled kernels read kv's rows in this model's cache types, unchecked: a
        cache of other types is refused here."""
        if kv.types != self.cache_types:
            raise InvalidArgumentError(f"a KV cache of {cache_label(kv.types)} given to a model whose cache is "
                                       f"{cache_label(self.cache_types)}")

    @property
    def on_route(self):
        """None, or a function called with each MoE routing decision (traces, tests)."""
        return self.ffn[0].on_route if self.ffn else None

    @on_route.setter
    def on_route(self, fn):
        for f in self.ffn:
            f.on_route = fn

    def _vectors(self) -> tuple[np.ndarray, bool]:
        """Every layer's norm weights and biases in one (n_layer + 1, len(VECS), width)
        float32 array, zeros where the model has none (row n_layer: the output norm);
        and whether the model has attention biases."""
        cfg, s = self.cfg, self.store
        width = max(cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.v_head_dim)
        vecs = np.zeros((cfg.n_layer + 1, len(L.VECS), width), dtype=np.float32)
        bias = False
        for i in range(cfg.n_layer):
            for j, name in enumerate(L.VECS):
                v = s.vector(f"blk.{i}.{name}" + ("" if name.endswith(".bias") else ".weight"))
                if v is not None:
                    vecs[i, j, :v.shape[0]] = v
                    bias |= name.endswith(".bias")
        vecs[cfg.n_layer, L.V_ATTN_NORM, :cfg.n_embd] = self.output_norm
        return vecs, bias

    # -- one layer, T tokens: kernels_cpu/layer.py's steps around the products ------------

    def _attention(self, i: int, x: np.ndarray, h: np.ndarray, pos0: int, kv: KVCache) -> None:
        """x += layer i's attention on the tokens x (T, n_embd) at positions pos0..; their
        keys and values into kv; then h = x through the FFN norm."""
        cfg, a, s, vl = self.cfg, self.arch, self.store, self.vecs[i]
        T = x.shape[0]
        L.norm_rows(x, vl[L.V_ATTN_NORM], cfg.rms_eps, h)
        q, k, v = K.linear_many(h, [s.get(f"blk.{i}.{n}.weight") for n in ("attn_q", "attn_k", "attn_v")])
        swa = cfg.swa_layers[i]
        scale = L.qkv_rows(i, pos0, q, k, v, vl, swa, kv.k16, kv.v16, a)
        o = K.attend(q.reshape(T, cfg.n_head, cfg.head_dim), kv.k16, kv.v16, i, pos0, scale,
                     cfg.sliding_window if swa else 0, *self.cache_types, int(a["v_rot"][0]))
        o = K.linear(o.reshape(T, -1), s.get(f"blk.{i}.attn_output.weight"))
        L.attn_residual(o, x, h, vl, a)

    # -- the whole model -----------------------------------------------------------

    def forward(self, tokens: np.ndarray, pos0: int, kv: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run tokens (T,) at positions pos0.. through the model, filling the KV cache.

        Returns logits (T, n_vocab) if all_logits else (1, n_vocab) for the last token.
        Raises Cancelled between layers once cancel_event is set. One token goes
        through the compiled decode step (kernels_cpu.decode) when the weights allow.
        """
        self._check_kv(kv)
        if len(tokens) == 1 and self.fused is not None:
            if self.cancel_event.is_set():
                raise Cancelled()
            logits = self.fused.step(int(tokens[0]), pos0, kv)
            kv.pos = pos0 + 1
            return logits.reshape(1, -1)
        with K.blas_one_thread():
            return self._forward(tokens, pos0, kv, all_logits)

    def verify(self, tokens: list[int], pos0: int, kv) -> np.ndarray:
        """Logits (T, n_vocab) of tokens run one after another from pos0, each row what a
        one-token forward gives, in one pass where the decoder allows (FusedDecoder.verify)."""
        if self.cancel_event.is_set():
            raise Cancelled()
        self._check_kv(kv)
        if self.fused is None:
            return np.concatenate([self.forward(np.array([t]), pos0 + j, kv) for j, t in enumerate(tokens)])
        logits = self.fused.verify(tokens, pos0, kv)
        kv.pos = pos0 + len(tokens)
        return logits

    def _forward(self, tokens: np.ndarray, pos0: int, kv: KVCache, all_logits: bool) -> np.ndarray:
        cfg, a = self.cfg, self.arch
        x = K.embed(self.tok_embd, tokens)  # (T, n_embd), the residual stream
        if cfg.embed_scale != 1.0:
            L.scale_rows(x, cfg.embed_scale)
        h = np.empty_like(x)
        kv.reserve(pos0 + len(tokens))
        for i in range(cfg.n_layer):
            if self.cancel_event.is_set():
                raise Cancelled()
            self._attention(i, x, h, pos0, kv)
            d = np.ascontiguousarray(self.ffn[i](h), dtype=np.float32)
            L.ffn_residual(d, x, self.vecs[i], a)
        kv.pos = pos0 + len(tokens)
        if not all_logits:
            x = x[-1:]
        h = np.empty_like(x)
        L.norm_rows(x, self.vecs[cfg.n_layer, L.V_ATTN_NORM], cfg.rms_eps, h)
        logits = K.linear(h, self.output)
        L.logits_rows(logits, a)
        return logits


# -- the compiled decode step's drivers -------------------------------------------------


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
    arena = readonly(root.reshape(-1).view(np.uint8).view(np.ndarray))  # as every weight (TensorRef)
    base = arena.ctypes.data
    mats = np.array([(r.data.ctypes.data - base, r.data.shape[0], r.data.shape[1]) if r is not None else (0, 0, 0)
                     for r in refs], dtype=np.int64)
    return arena, mats


class FusedDecoder:
    """One-token forward passes of `model` through kernels_cpu.decode.decode_step."""

    ffn = True  # the FFN weights are in the arena

    def __init__(self, model):
        self.cfg = model.cfg
        refs = weight_refs(model, self.ffn)
        self.arena, self.mats = _arena(refs)
        self.qt = np.array([int(r.qtype) if r is not None else -1 for r in refs], dtype=np.int64)
        self.all_rows = np.arange(max(r.data.shape[0] for r in refs if r is not None), dtype=np.int64)
        self.vecs, self.arch = model.vecs, model.arch
        self.swa = np.array(self.cfg.swa_layers, dtype=np.bool_)
        kt, vt = model.cache_types
        self.words = A.row_words(kt, self.cfg.head_dim), A.row_words(vt, self.cfg.v_head_dim)  # of a cached row

    def step(self, tok: int, pos: int, kv) -> np.ndarray:
        """Logits (n_vocab,) float32 of token tok at position pos; fills kv at pos."""
        logits = np.empty(self.cfg.n_vocab, dtype=np.float32)
        kv.reserve(pos + 1)
        D.decode_step(tok, pos, self.arena, self.mats, self.qt, self.vecs, self.swa, kv.k16, kv.v16, self.arch,
                      numba.get_num_threads(), F16_TABLE, self.all_rows, logits)
        return logits

    def step_batch(self, toks, pos, slots, kv_pool_k16: np.ndarray, kv_pool_v16: np.ndarray) -> np.ndarray:
        """Logits (B, n_vocab) float32 of B sequences' next tokens toks (B,) at positions
        pos (B,), row b's keys and values in slot slots[b] of the KV pools (n_slots,
        n_layer, n_kv, capacity, words) uint16 (rows of the model's cache types, as
        KVCache.k16): each
        weight read once for all B, each row's logits and KV those `step` gives that
        sequence alone, bit for bit."""
        args = self._batch_args(toks, pos, slots, kv_pool_k16, kv_pool_v16)
        return self._rows(*args, kv_pool_k16, kv_pool_v16)

    def verify(self, toks, pos0: int, kv) -> np.ndarray:
        """Logits (T, n_vocab) float32 of one sequence's tokens toks (T,) at positions
        pos0, pos0 + 1, ... in one pass (a speculative verification of drafted tokens):
        each weight read once for all T, row t and the keys and values at pos0 + t what
        `step` gives token t after the ones before it, bit for bit (inside each layer
        the rows run in order, each attending to what the rows before it wrote)."""
        kv.reserve(pos0 + len(toks))
        pk, pv = kv.k16[None], kv.v16[None]
        pos = pos0 + np.arange(len(toks), dtype=np.int64)
        args = self._batch_args(toks, pos, np.zeros(len(toks), dtype=np.int64), pk, pv, chain=True)
        return self._rows(*args, pk, pv)

    def _rows(self, toks, pos, slots, pk, pv) -> np.ndarray:
        logits = np.empty((len(toks), self.cfg.n_vocab), dtype=np.float32)
        D.decode_batch(toks, pos, slots, self.arena, self.mats, self.qt, self.vecs, self.swa, pk, pv, self.arch,
                       numba.get_num_threads(), F16_TABLE, self.all_rows, logits)
        return logits

    def _batch_args(self, toks, pos, slots, pk: np.ndarray, pv: np.ndarray, chain: bool = False) -> tuple:
        """toks, pos, slots as int64 arrays, checked against the pools (the compiled kernels
        index them unchecked: this is what keeps their writes inside). chain: rows may
        share a slot, in the order of their positions (one sequence's consecutive tokens)."""
        cfg = self.cfg
        toks, pos, slots = (np.ascontiguousarray(a, dtype=np.int64).reshape(-1) for a in (toks, pos, slots))
        lead = (cfg.n_layer, cfg.n_head_kv)
        for p, hd in zip((pk, pv), self.words):
            if p.dtype != np.uint16 or p.ndim != 5 or p.shape[1:3] != lead or p.shape[4] != hd or \
                    not p.flags.c_contiguous or not p.flags.writeable:
                raise InvalidArgumentError(f"a KV pool must be writable C-contiguous uint16 (n_slots, {lead[0]}, "
                                           f"{lead[1]}, capacity, {hd}), got {p.dtype} {p.shape}")
        if pk.shape[:4] != pv.shape[:4]:
            raise InvalidArgumentError(f"the K and V pools differ in shape: {pk.shape} and {pv.shape}")
        if not 0 < len(toks) == len(pos) == len(slots):
            raise InvalidArgumentError(f"toks, pos and slots need one entry per row, got {len(toks)}, {len(pos)}, "
                                       f"{len(slots)}")
        if toks.min() < 0 or toks.max() >= cfg.n_vocab:
            raise InvalidArgumentError(f"token ids must be in [0, {cfg.n_vocab})")
        if pos.min() < 0 or pos.max() >= pk.shape[3]:
            raise ContextLengthError(f"positions must be in [0, {pk.shape[3]}) (the pool's capacity)")
        if chain and (len(np.unique(slots)) != 1 or (np.diff(pos) != 1).any()):
            raise InvalidArgumentError("a chain of rows is one slot's consecutive positions")
        if slots.min() < 0 or slots.max() >= pk.shape[0] or (not chain and len(np.unique(slots)) != len(slots)):
            raise InvalidArgumentError(f"slots must be distinct, in [0, {pk.shape[0]})")
        return toks, pos, slots


class LayerDecoder(FusedDecoder):
    """decode_step in pieces around an FFN that runs in Python: a flash-layout model's
    (the store predicts, loads and multiplies the neurons a token needs) or a mixture
    of experts' (the router picks them). One compiled call per layer for the attention,
    the layer's FFN strategy between, the same math as decode_step."""

    ffn = False

    def __init__(self, model):
        super().__init__(model)
        self.layer_ffn = model.ffn

    def step(self, tok: int, pos: int, kv) -> np.ndarray:
        nt = numba.get_num_threads()
        d = self.cfg.n_embd
        x, h = np.empty((1, d), dtype=np.float32), np.empty((1, d), dtype=np.float32)
        logits = np.empty(self.cfg.n_vocab, dtype=np.float32)
        kv.reserve(pos + 1)
        ar, m, qt, vecs, a, rows = self.arena, self.mats, self.qt, self.vecs, self.arch, self.all_rows
        D.decode_embed(tok, ar, m, qt, a, F16_TABLE, x[0])
        for i in range(self.cfg.n_layer):
            D.decode_attn(i, pos, x, h, ar, m, qt, vecs, self.swa, kv.k16, kv.v16, a, nt, F16_TABLE, rows)
            o = self.layer_ffn[i](h)
            D.decode_add_ffn(i, o, x, vecs, a)
        D.decode_head(x, ar, m, qt, vecs, a, nt, F16_TABLE, rows, logits)
        return logits

    def _rows(self, toks, pos, slots, pk, pv) -> np.ndarray:
        """FusedDecoder's rows around FFNs that run in Python: the attention of all rows in
        one compiled call per layer; the FFN strategy's `rows` (each row its token's alone,
        what streams read once for all)."""
        nt = numba.get_num_threads()
        x = np.empty((len(toks), self.cfg.n_embd), dtype=np.float32)
        h = np.empty_like(x)
        logits = np.empty((len(toks), self.cfg.n_vocab), dtype=np.float32)
        ar, m, qt, vecs, a, rows = self.arena, self.mats, self.qt, self.vecs, self.arch, self.all_rows
        D.decode_embed_batch(toks, ar, m, qt, a, F16_TABLE, x)
        for i in range(self.cfg.n_layer):
            D.decode_attn_batch(i, pos, slots, x, h, ar, m, qt, vecs, self.swa, pk, pv, a, nt, F16_TABLE, rows)
            o = np.ascontiguousarray(self.layer_ffn[i].rows(h), dtype=np.float32)
            D.decode_add_ffn(i, o, x, vecs, a)
        D.decode_head_batch(x, ar, m, qt, vecs, a, nt, F16_TABLE, rows, logits)
        return logits
