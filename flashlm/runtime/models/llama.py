"""Llama (SmolLM2, Llama 2/3, Mistral, Mixtral): RMSNorm, SwiGLU FFN, grouped-query
attention. In GGUF, q/k rows are permuted so that llama.cpp's NORM RoPE ordering
applies. Mixtral-style experts renormalise their top-k weights."""

from ...kernels_cpu.layer import ROPE_NORM
from ..blocks import DecoderLM


class Model(DecoderLM):
    rope = ROPE_NORM
    moe_weights_norm = True
