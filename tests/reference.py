"""The numpy reference twin of the compiled layer math (flashlm/kernels_cpu/layer.py and
decode.py): the ops as llama.cpp defines them (ggml.c), a transformer's forward pass
built from them, and MoE routing. Tests hold the compiled code to these."""

from __future__ import annotations

import numpy as np

from flashlm import kernels_cpu as K

ROPE_NORM = "norm"
ROPE_NEOX = "neox"


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / rms(x) * weight over the last axis. x: (..., d) float32."""
    ms = np.mean(np.square(x, dtype=np.float32), axis=-1, keepdims=True, dtype=np.float32)
    return (x * (1.0 / np.sqrt(ms + np.float32(eps)))) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def gelu(x: np.ndarray) -> np.ndarray:
    """ggml's GELU: the tanh approximation, read from an f16 table (input and output
    rounded to f16) for |x| < 10; 0 below -10 and x above 10."""
    c = np.float32(0.7978845608028654)  # sqrt(2/pi)
    xh = x.astype(np.float16).astype(np.float32)
    y = np.float32(0.5) * xh * (np.float32(1.0) + np.tanh(c * xh * (np.float32(1.0) + np.float32(0.044715) * xh * xh)))
    y = y.astype(np.float16).astype(np.float32)
    return np.where(x <= -10.0, np.float32(0.0), np.where(x >= 10.0, x, y))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def rope(x: np.ndarray, pos: np.ndarray, n_rot: int, base: float, scale: float, style: str) -> np.ndarray:
    """Rotary position embedding, in place and returned.

    x: (T, n_heads, head_dim) float32; pos: (T,) positions. The first n_rot dims of
    each head rotate; NORM pairs (2i, 2i+1), NEOX pairs (i, i + n_rot/2).
    """
    half = n_rot // 2
    # As ggml computes it: theta_i = pos * scale * base^(-2i/n_rot), built by repeated
    # float32 multiplication, then float32 cos/sin.
    theta_scale = np.float32(base) ** np.float32(-2.0 / n_rot)
    steps = np.full((len(pos), half), theta_scale, dtype=np.float32)
    steps[:, 0] = pos.astype(np.float32)
    theta = np.cumprod(steps, axis=1, dtype=np.float32) * np.float32(scale)  # (T, half)
    cos = np.cos(theta)[:, None, :]
    sin = np.sin(theta)[:, None, :]
    if style == ROPE_NEOX:
        a = x[..., :half].copy()
        b = x[..., half:n_rot].copy()
        x[..., :half] = a * cos - b * sin
        x[..., half:n_rot] = a * sin + b * cos
    else:
        a = x[..., 0:n_rot:2].copy()
        b = x[..., 1:n_rot:2].copy()
        x[..., 0:n_rot:2] = a * cos - b * sin
        x[..., 1:n_rot:2] = a * sin + b * cos
    return x


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int, scale: float, window: int = 0) -> np.ndarray:
    """Causal grouped-query attention of T new queries over L = pos0 + T cached keys.

    q: (T, n_head, hd) float32; k: (n_kv, L, hd) float16; v: (n_kv, L, hd_v) float16.
    window > 0 masks keys at distance >= window (sliding-window layers).
    Returns (T, n_head, hd_v) float32. As in llama.cpp, q and the attention weights are
    rounded to f16 before their products with the f16 cache.
    """
    q = q.astype(np.float16).astype(np.float32)
    k = k.astype(np.float32)
    v = v.astype(np.float32)
    T, n_head, hd = q.shape
    n_kv, L, _ = k.shape
    g = n_head // n_kv
    qg = q.reshape(T, n_kv, g, hd).transpose(1, 2, 0, 3).reshape(n_kv, g * T, hd)  # (n_kv, g*T, hd)
    s = np.matmul(qg, k.transpose(0, 2, 1)) * np.float32(scale)  # (n_kv, g*T, L)
    qpos = pos0 + np.arange(T)
    kpos = np.arange(L)
    masked = kpos[None, :] > qpos[:, None]  # (T, L)
    if window > 0:
        masked |= (qpos[:, None] - kpos[None, :]) >= window
    s = s.reshape(n_kv, g, T, L)
    s[:, :, masked] = -np.inf
    p = softmax(s.reshape(n_kv, g * T, L)).astype(np.float16).astype(np.float32)
    o = np.matmul(p, v)  # (n_kv, g*T, hd_v)
    return o.reshape(n_kv, g, T, -1).transpose(2, 0, 1, 3).reshape(T, n_head, -1)


def route(logits: np.ndarray, cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Router logits (T, n_expert) -> the chosen experts (T, k) int64, best first, their
    weights (T, k) float32, and every expert's probability (T, n_expert)."""
    logits = logits.astype(np.float32, copy=False)
    if cfg.expert_gating == "sigmoid":
        p = np.float32(1.0) / (np.float32(1.0) + np.exp(-logits))
    else:
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
    k = cfg.n_expert_used
    ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, ids, axis=1)
    if cfg.expert_weights_norm:
        w = w / np.maximum(w.sum(axis=1, keepdims=True), np.float32(6.103515625e-5))  # llama.cpp's clamp
    if cfg.expert_weights_scale:
        w = w * np.float32(cfg.expert_weights_scale)
    return ids, w.astype(np.float32), p


def forward(lm, tokens) -> np.ndarray:
    """Logits (T, n_vocab) of tokens from position 0, by the numpy ops, the model's own
    weights (products through kernels_cpu.linear, as the model's) and its FFN strategies
    (a dense FFN's products, an MoE's routing: the FFN is not what this twin checks)."""
    cfg, s = lm.cfg, lm.store
    T = len(tokens)
    kc = np.zeros((cfg.n_layer, cfg.n_head_kv, T, cfg.head_dim), dtype=np.float16)
    vc = np.zeros((cfg.n_layer, cfg.n_head_kv, T, cfg.v_head_dim), dtype=np.float16)
    x = K.embed(lm.tok_embd, np.asarray(tokens)) * np.float32(cfg.embed_scale)
    rs = np.float32(cfg.residual_scale)

    def vec(i, name):
        return s.vector(f"blk.{i}.{name}")

    def proj(h, i, names):
        ys = K.linear_many(h, [s.get(f"blk.{i}.{n}.weight") for n in names])
        return [y + b if (b := vec(i, n + ".bias")) is not None else y for y, n in zip(ys, names)]

    for i in range(cfg.n_layer):
        h = rmsnorm(x, vec(i, "attn_norm.weight"), cfg.rms_eps)
        q, k, v = proj(h, i, ("attn_q", "attn_k", "attn_v"))
        q = q.reshape(T, cfg.n_head, cfg.head_dim)
        k = k.reshape(T, cfg.n_head_kv, cfg.head_dim)
        v = v.reshape(T, cfg.n_head_kv, cfg.v_head_dim)
        if lm.qk_norm:
            q = rmsnorm(q, vec(i, "attn_q_norm.weight"), cfg.rms_eps)
            k = rmsnorm(k, vec(i, "attn_k_norm.weight"), cfg.rms_eps)
        if lm.qk_norm_full:
            q = rmsnorm(q.reshape(T, -1), vec(i, "attn_q_norm.weight"), cfg.rms_eps).reshape(q.shape)
            k = rmsnorm(k.reshape(T, -1), vec(i, "attn_k_norm.weight"), cfg.rms_eps).reshape(k.shape)
        swa = cfg.swa_layers[i]
        base, scale = (cfg.rope_base_swa, 1.0) if swa else (cfg.rope_base, cfg.rope_scale)
        pos = np.arange(T)
        rope(q, pos, cfg.rope_dim, base, scale, cfg.rope_type)
        rope(k, pos, cfg.rope_dim, base, scale, cfg.rope_type)
        kc[i] = k.transpose(1, 0, 2)
        vc[i] = v.transpose(1, 0, 2)
        a_scale = cfg.attn_scale
        if lm.scale_q:
            q *= np.float32(a_scale)
            a_scale = 1.0
        o = attention(q, kc[i], vc[i], 0, a_scale, cfg.sliding_window if swa else 0)
        (o,) = proj(o.reshape(T, -1), i, ("attn_output",))
        if lm.post_norms:
            o = rmsnorm(o, vec(i, "post_attention_norm.weight"), cfg.rms_eps)
        x = x + o * rs
        d = lm.ffn[i](rmsnorm(x, vec(i, "ffn_norm.weight"), cfg.rms_eps))
        if lm.post_norms:
            d = rmsnorm(d, vec(i, "post_ffw_norm.weight"), cfg.rms_eps)
        x = x + d * rs
    logits = K.linear(rmsnorm(x, lm.output_norm, cfg.rms_eps), lm.output)
    if cfg.logit_scale != 1.0:
        logits = logits * np.float32(1.0 / cfg.logit_scale)
    if cfg.final_softcap:
        logits = np.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits
