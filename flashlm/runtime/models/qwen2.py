"""Qwen2: Llama with biases on q, k and v (read wherever blk.N.attn_{q,k,v}.bias exist),
and NeoX RoPE ordering."""

from ..blocks import DecoderLM


class Model(DecoderLM):
    pass
