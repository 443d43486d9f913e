"""Llama (SmolLM2, Llama 2/3, Mistral): RMSNorm, SwiGLU FFN, grouped-query attention.

In GGUF, q/k rows are permuted so that llama.cpp's NORM RoPE ordering applies; the
config carries the ordering, so this file needs nothing beyond the shared blocks.
"""

from ..blocks import DecoderLM


class Model(DecoderLM):
    pass
