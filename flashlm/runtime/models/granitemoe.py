"""Granite-MoE: Llama's blocks with four multipliers from the file (embedding, attention,
residual and logit scales) and a mixture-of-experts FFN with renormalised top-k weights."""

from ...kernels_cpu.layer import ROPE_NORM
from ..blocks import DecoderLM


class Model(DecoderLM):
    rope = ROPE_NORM
    moe_weights_norm = True

    @staticmethod
    def gguf_config(get, n_layer: int, n_embd: int) -> dict:
        # 0 means absent, except logit_scale, which llama.cpp requires
        return dict(residual_scale=float(get("residual_scale", 0.0) or 1.0),
                    logit_scale=float(get("logit_scale", required=True)),
                    embed_scale=float(get("embedding_scale", 0.0) or 1.0),
                    attn_scale=float(get("attention.scale", 0.0) or 0.0))
