"""HF checkpoint tensor names -> GGUF tensor names (Llama / Mistral / Qwen2 / Qwen3 layout)."""

from __future__ import annotations

import re

_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def gguf_name(hf_name: str) -> str | None:
    """The GGUF name of an HF tensor, or None for tensors flashlm does not use."""
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def hf_name(gguf: str) -> str:
    """Inverse of gguf_name (for writing HF folders in tests and converters)."""
    for k, v in _GLOBAL.items():
        if v == gguf:
            return k
    _, i, part, kind = gguf.split(".")
    inv = {v: k for k, v in _LAYER.items()}
    return f"model.layers.{i}.{inv[part]}.{kind}"
