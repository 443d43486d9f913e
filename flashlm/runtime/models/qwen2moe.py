"""Qwen2-MoE: Qwen2's attention (q/k/v biases, NeoX RoPE) with a mixture-of-experts FFN
plus a shared expert scaled by a sigmoid gate (experts/moe.py); the top-k weights are
used as they are."""

from ..blocks import DecoderLM


class Model(DecoderLM):
    expert_width_key = True
    always_shared_expert = True
