"""A transformer layer's math, defined once, on T rows (tokens) at a time.

Prefill (T tokens, runtime/blocks.py) and the compiled decode step (T = 1, decode.py)
run these same functions; only the projections differ (GEMM for T > 1, matvec for one
token). A layer, with x the residual stream (T, n_embd):

    h = norm_rows(x, attn_norm)                    the attention's input
    q, k, v = h @ Wq, Wk, Wv                       projections
    scale = qkv_rows(...)                          biases, q/k norms, RoPE; k, v into the cache
    o = attention over the cache                   attention.py: attend_queries (T rows), attend_rows (decode)
    o = o @ Wo
    attn_residual(...)                             bias, post-norm, x += o; h = the FFN's input
    d = the layer's FFN strategy (runtime/ffn.py)
    ffn_residual(...)                              post-norm, x += d
    after the last layer: norm_rows(x, output_norm), the output projection, logits_rows(...)

`ARCH` names the settings (the architecture's facts and the config's numbers); `VECS`
orders a layer's norm weights and biases in one (n_layer + 1, len(VECS), width) array
(row n_layer holds the output norm). The numpy reference twin of each op is in
tests/reference.py; the tests hold the two together.
"""

import numpy as np
from numba import njit

from .attention import F16, _hadamard, _put_row, attend_queries, rotation  # noqa: F401  (attend_queries: prefill's)
from .qdot import f16_bits
from .quants import GELU_AT

ROPE_NORM = "norm"  # rotate pairs (2i, 2i+1): llama.cpp's LLAMA_ROPE_TYPE_NORM
ROPE_NEOX = "neox"  # rotate pairs (i, i + d/2): GPT-NeoX / HF rotate_half

VECS = ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm", "post_attention_norm", "post_ffw_norm",
        "attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias")
(V_ATTN_NORM, V_FFN_NORM, V_Q_NORM, V_K_NORM, V_POST_ATTN, V_POST_FFN, V_BQ, V_BK, V_BV, V_BO) = range(len(VECS))

_FIELDS = [
    ("n_layer", np.int64), ("n_embd", np.int64), ("n_head", np.int64), ("n_head_kv", np.int64),
    ("head_dim", np.int64), ("v_head_dim", np.int64), ("rope_dim", np.int64),  # shapes
    ("neox", np.bool_),  # RoPE pairs (i, i + d/2), else (2i, 2i+1)
    ("window", np.int64),  # the sliding window of the layers that have one (0: none)
    ("qk_norm", np.bool_),  # RMSNorm on each q and k head
    ("qk_norm_full", np.bool_),  # RMSNorm over the whole q and k projections
    ("post_norms", np.bool_),  # RMSNorm on the attention and FFN outputs
    ("gelu", np.bool_),  # GeGLU, else SwiGLU
    ("scale_q", np.bool_),  # q times the attention scale before q.k
    ("bias", np.bool_),  # biases on q, k, v, o
    ("eps", np.float64), ("rope_base", np.float64), ("rope_base_swa", np.float64), ("rope_scale", np.float64),
    ("attn_scale", np.float64), ("embed_scale", np.float64),
    ("softcap", np.float64),  # of the logits (0: none)
    ("residual", np.float64),  # attention and FFN outputs times this before the residual add
    ("logit_scale", np.float64),  # logits divided by this
    ("k_type", np.int64), ("v_type", np.int64),  # the KV cache's row types (attention.py: f16, q8_0, q4_0)
    ("k_rot", np.int64), ("v_rot", np.int64),  # Hadamard rotations of q and k, of v, before caching (0: none)
]
ARCH = np.dtype(_FIELDS, align=True)  # a model's settings, by name, as the kernels read them


def arch_array(**fields) -> np.ndarray:
    """An ARCH record (a one-element structured array: the kernels take it at the cost of
    any array, where a namedtuple costs a microsecond a call to unbox)."""
    fields = {"k_type": F16, "v_type": F16, "k_rot": 0, "v_rot": 0, **fields}  # the cache: f16 unless given
    missing = set(ARCH.names) - set(fields)
    if missing:
        raise TypeError(f"arch_array: missing {', '.join(sorted(missing))}")
    a = np.zeros(1, dtype=ARCH)
    for k, v in fields.items():
        a[k] = v
    return a


def make_arch(cfg, lm, bias: bool, k_type: int = F16, v_type: int = F16) -> np.ndarray:
    """The ARCH record of config cfg and architecture class lm (runtime/blocks.DecoderLM),
    with a KV cache of k_type and v_type rows."""
    return arch_array(
        n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, n_head_kv=cfg.n_head_kv, head_dim=cfg.head_dim,
        v_head_dim=cfg.v_head_dim, rope_dim=cfg.rope_dim or cfg.head_dim, neox=cfg.rope_type == ROPE_NEOX,
        window=cfg.sliding_window, qk_norm=lm.qk_norm, qk_norm_full=lm.qk_norm_full, post_norms=lm.post_norms,
        gelu=lm.activation == "gelu", scale_q=lm.scale_q, bias=bias, eps=cfg.rms_eps, rope_base=cfg.rope_base,
        rope_base_swa=cfg.rope_base_swa, rope_scale=cfg.rope_scale, attn_scale=cfg.attn_scale,
        embed_scale=cfg.embed_scale, softcap=cfg.final_softcap, residual=cfg.residual_scale,
        logit_scale=cfg.logit_scale, k_type=k_type, v_type=v_type, k_rot=rotation(k_type, cfg.head_dim),
        v_rot=rotation(v_type, cfg.v_head_dim, values=True))


# -- the ops on one row ---------------------------------------------------------------


@njit(nogil=True, cache=True)
def _rmsnorm(x, w, eps, out):
    s = 0.0
    for i in range(x.shape[0]):
        s += np.float64(x[i]) * np.float64(x[i])
    scale = np.float32(1.0) / np.sqrt(np.float32(s / x.shape[0]) + np.float32(eps))
    for i in range(x.shape[0]):
        out[i] = x[i] * scale * w[i]


@njit(nogil=True, cache=True)
def _rope(x, n_heads, hd, pos, n_rot, base, scale, neox):
    half = n_rot // 2
    ts = np.float32(base) ** np.float32(-2.0 / n_rot)
    theta = np.float32(pos)
    for i in range(half):
        t = theta * np.float32(scale)
        c = np.float32(np.cos(t))
        s = np.float32(np.sin(t))
        for h in range(n_heads):
            o = h * hd
            if neox:
                a = x[o + i]; b = x[o + i + half]
                x[o + i] = a * c - b * s
                x[o + i + half] = a * s + b * c
            else:
                a = x[o + 2 * i]; b = x[o + 2 * i + 1]
                x[o + 2 * i] = a * c - b * s
                x[o + 2 * i + 1] = a * s + b * c
        theta = theta * ts


@njit(inline="always")
def _gelu(x, lut):
    # As ggml: 0 below -10, x above 10, else its table (in lut, quants.F16_TABLE) at x rounded to f16.
    if x <= -10.0:
        return np.float32(0.0)
    if x >= 10.0:
        return x
    return lut[GELU_AT + f16_bits(x)]


@njit(inline="always")
def _act(g, gelu, lut):
    """The gated FFN's activation of g: GELU (ggml's f16 table) or SiLU."""
    return _gelu(g, lut) if gelu else g / (np.float32(1.0) + np.float32(np.exp(-g)))


@njit(nogil=True, cache=True)
def act_rows(g, gelu, lut, out):
    """out = act(g) for (T, n) arrays."""
    for r in range(g.shape[0]):
        for j in range(g.shape[1]):
            out[r, j] = _act(g[r, j], gelu, lut)


@njit(nogil=True, cache=True)
def glu_rows(g, u, gelu, lut, out, r0, r1):
    """out = act(g) * u for rows r0..r1-1 of (T, n) arrays."""
    for r in range(r0, r1):
        for j in range(g.shape[1]):
            out[r, j] = _act(g[r, j], gelu, lut) * u[r, j]


# -- a layer's steps on T rows (inline, for the decode step; wrapped below for prefill) --


@njit(inline="always")
def _norm_rows(x, w, eps, out):
    for t in range(x.shape[0]):
        _rmsnorm(x[t], w, eps, out[t])


@njit(inline="always")
def _qkv_rows(l, pos0, q, k, v, vl, is_swa, kc, vc, a):
    """Rows t of q, k, v at positions pos0 + t: biases, q/k norms, RoPE, the rotations of a
    quantized cache, then k and v into the cache (rows of the cache types, attention.py); q times the attention scale where the architecture says. Returns the scale
    attention still applies."""
    hd, hd_v, n_head, n_kv, eps = a.head_dim, a.v_head_dim, a.n_head, a.n_head_kv, a.eps
    rb = a.rope_base_swa if is_swa else a.rope_base
    rs = 1.0 if is_swa else a.rope_scale
    sc = a.attn_scale
    for t in range(q.shape[0]):
        qt, kt, vt = q[t], k[t], v[t]
        if a.bias:
            for i in range(qt.shape[0]):
                qt[i] += vl[V_BQ, i]
            for i in range(kt.shape[0]):
                kt[i] += vl[V_BK, i]
            for i in range(vt.shape[0]):
                vt[i] += vl[V_BV, i]
        if a.qk_norm:
            for hh in range(n_head):
                _rmsnorm(qt[hh * hd:(hh + 1) * hd], vl[V_Q_NORM, :hd], eps, qt[hh * hd:(hh + 1) * hd])
            for hh in range(n_kv):
                _rmsnorm(kt[hh * hd:(hh + 1) * hd], vl[V_K_NORM, :hd], eps, kt[hh * hd:(hh + 1) * hd])
        if a.qk_norm_full:
            _rmsnorm(qt, vl[V_Q_NORM, :qt.shape[0]], eps, qt)
            _rmsnorm(kt, vl[V_K_NORM, :kt.shape[0]], eps, kt)
        pos = pos0 + t
        _rope(qt, n_head, hd, pos, a.rope_dim, rb, rs, a.neox)
        _rope(kt, n_kv, hd, pos, a.rope_dim, rb, rs, a.neox)
        if a.k_rot:  # (blocks of k_rot divide hd: none spans two heads)
            _hadamard(qt, 0, n_head * hd, a.k_rot)
            _hadamard(kt, 0, n_kv * hd, a.k_rot)
        if a.v_rot:
            _hadamard(vt, 0, n_kv * hd_v, a.v_rot)
        for hh in range(n_kv):
            _put_row(a.k_type, kt, hh * hd, hd, kc[l, hh, pos])
            _put_row(a.v_type, vt, hh * hd_v, hd_v, vc[l, hh, pos])
        if a.scale_q:
            for i in range(qt.shape[0]):
                qt[i] *= np.float32(sc)
    return 1.0 if a.scale_q else sc


@njit(inline="always")
def _attn_residual(o, x, h, vl, a):
    """x += the attention's output o (its bias and post-norm where the model has them,
    times the residual scale); then h = x through the FFN norm."""
    rs = np.float32(a.residual)
    for t in range(x.shape[0]):
        ot = o[t]
        if a.bias:
            for i in range(ot.shape[0]):
                ot[i] += vl[V_BO, i]
        if a.post_norms:
            _rmsnorm(ot, vl[V_POST_ATTN], a.eps, ot)
        xt = x[t]
        for i in range(xt.shape[0]):
            xt[i] += ot[i] * rs
        _rmsnorm(xt, vl[V_FFN_NORM], a.eps, h[t])


@njit(inline="always")
def _ffn_residual(o, x, vl, a):
    """x += the FFN's output o (after its post-norm where the model has one, times the
    residual scale)."""
    rs = np.float32(a.residual)
    for t in range(x.shape[0]):
        ot = o[t]
        if a.post_norms:
            _rmsnorm(ot, vl[V_POST_FFN], a.eps, ot)
        xt = x[t]
        for i in range(xt.shape[0]):
            xt[i] += ot[i] * rs


@njit(inline="always")
def _logits_rows(logits, a):
    """The output projection's rows as the model finishes them: divided by the logit
    scale (as llama.cpp: times its reciprocal), soft-capped."""
    if a.logit_scale != 1.0:
        inv = np.float32(1.0 / a.logit_scale)
        for t in range(logits.shape[0]):
            for i in range(logits.shape[1]):
                logits[t, i] = logits[t, i] * inv
    if a.softcap != 0.0:
        c = np.float32(a.softcap)
        for t in range(logits.shape[0]):
            for i in range(logits.shape[1]):
                logits[t, i] = np.float32(np.tanh(logits[t, i] / c)) * c


@njit(nogil=True, cache=True)
def norm_rows(x, w, eps, out):
    """out[t] = RMSNorm(x[t]) * w."""
    _norm_rows(x, w, eps, out)


@njit(nogil=True, cache=True)
def qkv_rows(l, pos0, q, k, v, vl, is_swa, kc, vc, arch):
    return _qkv_rows(l, pos0, q, k, v, vl, is_swa, kc, vc, arch[0])


@njit(nogil=True, cache=True)
def attn_residual(o, x, h, vl, arch):
    _attn_residual(o, x, h, vl, arch[0])


@njit(nogil=True, cache=True)
def ffn_residual(o, x, vl, arch):
    _ffn_residual(o, x, vl, arch[0])


@njit(nogil=True, cache=True)
def logits_rows(logits, arch):
    _logits_rows(logits, arch[0])


@njit(nogil=True, cache=True)
def scale_rows(x, s):
    """x *= s (the embeddings' scale)."""
    f = np.float32(s)
    for t in range(x.shape[0]):
        for i in range(x.shape[1]):
            x[t, i] *= f
