"""Qwen3: Llama with RMSNorm on each q and k head (no biases), NeoX RoPE ordering."""

from ..blocks import DecoderLM


class Model(DecoderLM):
    qk_norm = True
