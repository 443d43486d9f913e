"""Granite-MoE: Llama's blocks with four multipliers from the file (embedding, attention,
residual and logit scales) and a mixture-of-experts FFN with renormalised top-k weights."""

from ...errors import ModelFormatError
from ...kernels_cpu.layer import ROPE_NORM
from ..blocks import DecoderLM


class Model(DecoderLM):
    rope = ROPE_NORM
    moe_weights_norm = True

    @staticmethod
    def gguf_config(get, n_layer: int, n_embd: int) -> dict:
        # 0 means absent, except logit_scale, which llama.cpp requires (logits are divided by it)
        logit_scale = get.number("logit_scale")
        if logit_scale == 0.0:
            raise ModelFormatError(f"{get.where}: metadata key {get.prefix}logit_scale is 0; the file is corrupt")
        return dict(residual_scale=get.number("residual_scale", 0.0) or 1.0,
                    logit_scale=logit_scale,
                    embed_scale=get.number("embedding_scale", 0.0) or 1.0,
                    attn_scale=get.number("attention.scale", 0.0))
