"""Qwen2: Llama with biases on q, k and v, and NeoX RoPE ordering."""

from ..blocks import DecoderLM


class Model(DecoderLM):
    # Biases are read wherever blk.N.attn_{q,k,v}.bias exist; nothing else differs.
    pass
