"""OLMoE: RMSNorm over the whole q and k projections (not per head), NeoX RoPE, and a
mixture-of-experts FFN with softmax top-k weights used as they are (experts/moe.py)."""

from ..blocks import DecoderLM


class Model(DecoderLM):
    qk_norm_full = True
