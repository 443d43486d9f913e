"""Gemma 3: q/k norm, post-attention and post-FFN norms, GeGLU, sqrt(d)-scaled embeddings,
tied output, and sliding-window attention on 5 of every 6 layers (their RoPE base is
rope.freq_base_swa). GGUF stores Gemma's norm weights with the +1 already added.
"""

import math

from ..blocks import DecoderLM


class Model(DecoderLM):
    qk_norm = True
    post_norms = True
    activation = "gelu"
    scale_q = True

    @staticmethod
    def gguf_config(get, n_layer: int, n_embd: int) -> dict:
        out = dict(embed_scale=math.sqrt(n_embd))
        window = get.integer("attention.sliding_window", 0)
        if window > 0:  # llama.cpp's set_swa_pattern: every n-th layer is global (full attention)
            n = get.integer("attention.sliding_window_pattern", 6)
            out.update(sliding_window=window, swa_layers=tuple(n == 0 or i % n < n - 1 for i in range(n_layer)))
        return out
