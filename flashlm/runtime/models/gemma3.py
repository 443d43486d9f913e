"""Gemma 3: q/k norm, post-attention and post-FFN norms, GeGLU, sqrt(d)-scaled embeddings,
tied output, and sliding-window attention on 5 of every 6 layers (their RoPE base is
rope.freq_base_swa). GGUF stores Gemma's norm weights with the +1 already added.
"""

from ..blocks import DecoderLM


class Model(DecoderLM):
    qk_norm = True
    post_norms = True
    activation = "gelu"
    scale_q = True
