"""Qwen3-MoE: Qwen3's attention (RMSNorm on each q and k head) with a mixture-of-experts
FFN whose top-k weights are renormalised (experts/moe.py)."""

from ..blocks import DecoderLM


class Model(DecoderLM):
    qk_norm = True
    moe_weights_norm = True
    expert_width_key = True
