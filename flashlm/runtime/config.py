"""ModelConfig: the hyper-parameters of a model, read once from the file's metadata."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ModelFormatError, UnsupportedModelError
from ..kernels_cpu.layer import ROPE_NEOX



@dataclass(frozen=True)
class ModelConfig:
    """A model's shape and settings, read from GGUF metadata or an HF config.json
    (`Model.config`)."""

    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int  # key/query head size
    v_head_dim: int
    n_ff: int
    n_ctx_train: int
    rms_eps: float
    rope_type: str
    rope_base: float
    rope_scale: float = 1.0  # position multiplier (1 / linear scaling factor)
    rope_dim: int = 0  # rotated dims per head; 0 = head_dim
    rope_base_swa: float = 10000.0
    sliding_window: int = 0  # 0 = no sliding-window layers
    swa_layers: tuple[bool, ...] = ()  # per layer: uses the sliding window
    attn_scale: float = 0.0  # 0 = 1/sqrt(head_dim)
    embed_scale: float = 1.0
    final_softcap: float = 0.0
    tied_output: bool = False
    # Mixture of experts (0 experts: a dense FFN). llama.cpp's build_moe_ffn: router
    # probabilities (softmax or sigmoid), the top n_expert_used, renormalised to sum 1
    # if expert_weights_norm, times expert_weights_scale if it is not 0.
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0  # an expert's FFN width
    n_ff_shexp: int = 0  # the shared expert's (qwen2moe); 0 = none
    expert_weights_norm: bool = False
    expert_weights_scale: float = 0.0
    expert_gating: str = "softmax"
    residual_scale: float = 1.0  # granite: attention and FFN outputs scaled before the residual add
    logit_scale: float = 1.0  # granite: logits divided by it
    name: str = ""

    def __post_init__(self):
        if self.rope_dim == 0:
            object.__setattr__(self, "rope_dim", self.head_dim)
        if self.attn_scale == 0.0:
            object.__setattr__(self, "attn_scale", 1.0 / math.sqrt(self.head_dim))
        if not self.swa_layers:
            object.__setattr__(self, "swa_layers", (False,) * self.n_layer)

    @property
    def kv_bytes_per_token(self) -> int:
        """float32 K and V bytes one position takes in the KV cache, all layers."""
        return self.n_layer * self.n_head_kv * (self.head_dim + self.v_head_dim) * 4


def config_from_gguf(mf, facts) -> ModelConfig:
    """The config in a GGUF's metadata, read as llama.cpp reads it for its architecture,
    whose facts (from RoPE order to MoE gating) are the class attributes of `facts`
    (runtime/models/<arch>.py's Model: models.model_class)."""
    md = mf.metadata
    arch = mf.arch

    def get(key, default=None, required=False):
        v = md.get(f"{arch}.{key}", default)
        if required and v is None:
            raise ModelFormatError(f"{mf.path}: metadata key {arch}.{key} is missing")
        return v

    n_embd = int(get("embedding_length", required=True))
    n_head = int(get("attention.head_count", required=True))
    n_layer = int(get("block_count", required=True))
    head_dim = int(get("attention.key_length", n_embd // n_head))
    emb = mf.tensors.get("token_embd.weight")
    if emb is None:
        raise ModelFormatError(f"{mf.path}: tensor token_embd.weight is missing")
    n_vocab = int(get("vocab_size", emb.shape[0]))
    scale = get("rope.scaling.factor") or get("rope.scale_linear") or 0.0
    rope_scaling = get("rope.scaling.type", "linear")
    if rope_scaling not in ("linear", "none") and float(scale or 1.0) != 1.0:
        raise UnsupportedModelError(f"{mf.path}: RoPE scaling '{rope_scaling}' is not supported yet")
    moe = _moe_config(mf.path, facts, get)
    return ModelConfig(
        arch=arch,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=int(get("attention.head_count_kv", n_head)),
        head_dim=head_dim,
        v_head_dim=int(get("attention.value_length", head_dim)),
        n_ff=int(get("feed_forward_length", 0) or 0) if moe else int(get("feed_forward_length", required=True)),
        n_ctx_train=int(get("context_length", 2048)),
        rms_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_type=facts.rope,
        rope_base=float(get("rope.freq_base", 10000.0)),
        rope_scale=1.0 / float(scale) if scale else 1.0,
        rope_dim=int(get("rope.dimension_count", head_dim)),
        rope_base_swa=float(get("rope.freq_base_swa", 10000.0)),
        final_softcap=float(get("final_logit_softcapping", 0.0) or 0.0),
        tied_output="output.weight" not in mf.tensors,
        name=str(md.get("general.name", mf.path.stem)),
        **moe,
        **facts.gguf_config(get, n_layer, n_embd),
    )


def _moe_config(path, facts, get) -> dict:
    """A mixture of experts' settings (empty for a dense model): llama.cpp's build_moe_ffn
    takes router probabilities (softmax), the top n_expert_used, renormalised to sum 1 where
    the architecture says so."""
    n_expert = int(get("expert_count", 0) or 0)
    if not n_expert:
        return {}
    used = int(get("expert_used_count", required=True))
    if not 0 < used <= n_expert:
        raise ModelFormatError(f"{path}: {used} experts used of {n_expert}")
    n_ff = int(get("feed_forward_length", 0) or 0)
    # some architectures name the expert width; without the key llama.cpp takes n_ff / used
    n_ff_exp = int(get("expert_feed_forward_length", 0) or 0) if facts.expert_width_key else n_ff
    n_ff_shexp = int(get("expert_shared_feed_forward_length", 0) or 0)
    return dict(n_expert=n_expert, n_expert_used=used, n_ff_exp=n_ff_exp or n_ff // used,
                n_ff_shexp=n_ff_shexp or (n_ff if facts.always_shared_expert else 0),
                expert_weights_norm=facts.moe_weights_norm)


# HF model_type -> flashlm architecture. HF checkpoints keep q/k unpermuted and use
# rotate_half, so every HF model runs with NeoX-ordered RoPE.
_HF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def config_from_hf(mf) -> ModelConfig:
    c = mf.config
    arch = _HF_ARCH.get(c.get("model_type"))
    if arch is None:
        raise UnsupportedModelError(
            f"{mf.path}: HF model_type '{c.get('model_type')}' is not supported; flashlm reads {', '.join(sorted(_HF_ARCH))}")
    n_embd = c["hidden_size"]
    n_head = c["num_attention_heads"]
    head_dim = c.get("head_dim") or n_embd // n_head
    scaling = c.get("rope_scaling") or {}
    if scaling and scaling.get("type", scaling.get("rope_type")) not in ("linear", None):
        raise UnsupportedModelError(f"{mf.path}: RoPE scaling {scaling} is not supported yet")
    return ModelConfig(
        arch=arch,
        n_vocab=c["vocab_size"],
        n_embd=n_embd,
        n_layer=c["num_hidden_layers"],
        n_head=n_head,
        n_head_kv=c.get("num_key_value_heads", n_head),
        head_dim=head_dim,
        v_head_dim=head_dim,
        n_ff=c["intermediate_size"],
        n_ctx_train=c.get("max_position_embeddings", 2048),
        rms_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_type=ROPE_NEOX,
        rope_base=float(c.get("rope_theta", 10000.0)),
        rope_scale=1.0 / float(scaling.get("factor", 1.0)) if scaling else 1.0,
        tied_output="output.weight" not in mf.tensors,
        name=mf.path.name,
    )
