"""The small ops of a transformer layer, in numpy: norms, RoPE, activations, attention.

These follow llama.cpp's definitions (ggml.c) so that outputs match it.
"""

from __future__ import annotations

import numpy as np

ROPE_NORM = "norm"  # rotate pairs (2i, 2i+1): llama.cpp's LLAMA_ROPE_TYPE_NORM
ROPE_NEOX = "neox"  # rotate pairs (i, i + d/2): GPT-NeoX / HF rotate_half


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
