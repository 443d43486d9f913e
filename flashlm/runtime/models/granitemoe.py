"""Granite-MoE: Llama's blocks with four multipliers from the file (embedding, attention,
residual and logit scales, in config.py) and a mixture-of-experts FFN."""

from ..blocks import DecoderLM


class Model(DecoderLM):
    pass
