"""ModelConfig: the hyper-parameters of a model, read once from the file's metadata."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ModelFormatError, UnsupportedModelError
from ..formats.validate import FIX, MAX_EXPERTS, MAX_LAYERS, Metadata, check_shapes
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
    (runtime/models/<arch>.py's Model: models.model_class). Each value is type- and
    range-checked (ModelFormatError naming the key); check_tensors then holds the
    tensors to it."""
    arch = mf.arch
    get = Metadata(mf.metadata, mf.path, f"{arch}.")
    emb = mf.tensors.get("token_embd.weight")
    if emb is None or len(emb.shape) != 2:
        raise ModelFormatError(f"{mf.path}: tensor token_embd.weight is missing; {FIX}")
    n_embd = get.integer("embedding_length", lo=1, hi=1 << 20)
    n_head = get.integer("attention.head_count", lo=1, hi=1 << 12)
    n_head_kv = get.integer("attention.head_count_kv", n_head, lo=1, hi=n_head)
    if n_head % n_head_kv:
        raise ModelFormatError(f"{mf.path}: {n_head} attention heads cannot share {n_head_kv} KV heads"
                               f" ({arch}.attention.head_count_kv); {FIX}")
    n_layer = get.integer("block_count", lo=1, hi=MAX_LAYERS)
    head_dim = get.integer("attention.key_length", max(1, n_embd // n_head), lo=1, hi=1 << 16)
    rope_dim = get.integer("rope.dimension_count", head_dim, lo=2, hi=head_dim)
    if rope_dim % 2:
        raise ModelFormatError(f"{mf.path}: {arch}.rope.dimension_count is {rope_dim}, not even; {FIX}")
    scale = get.number("rope.scaling.factor", 0.0, lo=0.0) or get.number("rope.scale_linear", 0.0, lo=0.0)
    rope_scaling = get.text("rope.scaling.type", "linear")
    if rope_scaling not in ("linear", "none") and scale not in (0.0, 1.0):
        raise UnsupportedModelError(f"{mf.path}: RoPE scaling '{rope_scaling}' is not supported yet")
    moe = _moe_config(get, facts)
    return ModelConfig(
        arch=arch,
        n_vocab=get.integer("vocab_size", emb.shape[0], lo=1),
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        v_head_dim=get.integer("attention.value_length", head_dim, lo=1, hi=1 << 16),
        n_ff=get.integer("feed_forward_length", 0 if moe else None, lo=0 if moe else 1, hi=1 << 24),
        n_ctx_train=get.integer("context_length", 2048, lo=8),
        rms_eps=get.number("attention.layer_norm_rms_epsilon", 1e-6, lo=1e-30, hi=1.0),
        rope_type=facts.rope,
        rope_base=get.number("rope.freq_base", 10000.0, lo=1e-6),
        rope_scale=1.0 / scale if scale else 1.0,
        rope_dim=rope_dim,
        rope_base_swa=get.number("rope.freq_base_swa", 10000.0, lo=1e-6),
        final_softcap=get.number("final_logit_softcapping", 0.0, lo=0.0),
        tied_output="output.weight" not in mf.tensors,
        name=str(mf.metadata.get("general.name", mf.path.stem)),
        **moe,
        **facts.gguf_config(get, n_layer, n_embd),
    )


def _moe_config(get, facts) -> dict:
    """A mixture of experts' settings (empty for a dense model): llama.cpp's build_moe_ffn
    takes router probabilities (softmax), the top n_expert_used, renormalised to sum 1 where
    the architecture says so."""
    n_expert = get.integer("expert_count", 0, hi=MAX_EXPERTS)
    if not n_expert:
        return {}
    used = get.integer("expert_used_count", lo=1, hi=n_expert)
    n_ff = get.integer("feed_forward_length", 0, hi=1 << 24)
    # some architectures name the expert width; without the key llama.cpp takes n_ff / used
    n_ff_exp = get.integer("expert_feed_forward_length", 0, hi=1 << 24) if facts.expert_width_key else n_ff
    n_ff_exp = n_ff_exp or n_ff // used
    if n_ff_exp < 1:
        raise ModelFormatError(f"{get.where}: the experts' FFN width is 0 ({get.prefix}expert_feed_forward_length,"
                               f" {get.prefix}feed_forward_length); {FIX}")
    n_ff_shexp = get.integer("expert_shared_feed_forward_length", 0, hi=1 << 24)
    return dict(n_expert=n_expert, n_expert_used=used, n_ff_exp=n_ff_exp,
                n_ff_shexp=n_ff_shexp or (n_ff if facts.always_shared_expert else 0),
                expert_weights_norm=facts.moe_weights_norm)


def check_tensors(mf, cfg: ModelConfig, facts, flash: bool = False) -> None:
    """Every tensor the model reads, present with the shape cfg implies (output.weight may
    be absent: tied to token_embd), and no block past block_count (llama.cpp refuses
    those files too); ModelFormatError naming the tensor otherwise. flash: the FFN is a
    flash layout's (validate_flash_layout checks its records)."""
    required, optional = expected_tensors(cfg, facts, flash)
    check_shapes(mf, required, optional)
    for name in mf.tensors:
        block = name.split(".")[1] if name.startswith("blk.") and name.count(".") >= 2 else ""
        if block.isdigit() and int(block) >= cfg.n_layer:
            raise ModelFormatError(f"{mf.path}: tensor {name} is past the {cfg.n_layer} blocks of"
                                   f" {cfg.arch}.block_count; {FIX}")


def expected_tensors(cfg: ModelConfig, facts, flash: bool = False) -> tuple[dict, dict]:
    """(required, optional): name -> shape (numpy order) of each tensor the model reads."""
    e, hd = cfg.n_embd, cfg.head_dim
    q, k, v = cfg.n_head * hd, cfg.n_head_kv * hd, cfg.n_head_kv * cfg.v_head_dim
    required = {"token_embd.weight": (cfg.n_vocab, e), "output_norm.weight": (e,)}
    optional = {"output.weight": (cfg.n_vocab, e)}
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        required.update({p + "attn_norm.weight": (e,), p + "ffn_norm.weight": (e,), p + "attn_q.weight": (q, e),
                         p + "attn_k.weight": (k, e), p + "attn_v.weight": (v, e),
                         p + "attn_output.weight": (e, cfg.n_head * cfg.v_head_dim)})
        optional.update({p + "attn_q.bias": (q,), p + "attn_k.bias": (k,), p + "attn_v.bias": (v,),
                         p + "attn_output.bias": (e,), p + "ffn_gate_inp_shexp.weight": (e,)})
        if facts.qk_norm or facts.qk_norm_full:
            required.update({p + "attn_q_norm.weight": (q,) if facts.qk_norm_full else (hd,),
                             p + "attn_k_norm.weight": (k,) if facts.qk_norm_full else (hd,)})
        if facts.post_norms:
            required.update({p + "post_attention_norm.weight": (e,), p + "post_ffw_norm.weight": (e,)})
        required.update(_ffn_tensors(cfg, p, flash))
    return required, optional


def _ffn_tensors(cfg: ModelConfig, p: str, flash: bool) -> dict:
    e, f, n, s = cfg.n_embd, cfg.n_ff_exp, cfg.n_expert, cfg.n_ff_shexp
    if n:
        out = {p + "ffn_gate_inp.weight": (n, e), p + "ffn_gate_exps.weight": (n, f, e),
               p + "ffn_up_exps.weight": (n, f, e), p + "ffn_down_exps.weight": (n, e, f)}
        if s:
            out.update({p + "ffn_gate_shexp.weight": (s, e), p + "ffn_up_shexp.weight": (s, e),
                        p + "ffn_down_shexp.weight": (e, s)})
        return out
    if flash:  # the up and down rows are in the records
        return {p + "ffn_gate.weight": (cfg.n_ff, e)}
    return {p + "ffn_gate.weight": (cfg.n_ff, e), p + "ffn_up.weight": (cfg.n_ff, e),
            p + "ffn_down.weight": (e, cfg.n_ff)}


# HF model_type -> flashlm architecture. HF checkpoints keep q/k unpermuted and use
# rotate_half, so every HF model runs with NeoX-ordered RoPE.
_HF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def config_from_hf(mf) -> ModelConfig:
    """The config in an HF folder's config.json, each value type- and range-checked."""
    c = mf.config
    model_type = c.get("model_type")
    arch = _HF_ARCH.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        raise UnsupportedModelError(
            f"{mf.path}: HF model_type '{model_type}' is not supported; flashlm reads {', '.join(sorted(_HF_ARCH))}")
    get = Metadata(c, mf.path / "config.json", noun="key")
    n_embd = get.integer("hidden_size", lo=1, hi=1 << 20)
    n_head = get.integer("num_attention_heads", lo=1, hi=1 << 12)
    n_head_kv = get.integer("num_key_value_heads", n_head, lo=1, hi=n_head)
    head_dim = get.integer("head_dim", max(1, n_embd // n_head), lo=2, hi=1 << 16)
    if n_head % n_head_kv or head_dim % 2:
        raise ModelFormatError(f"{mf.path}: config.json's heads ({n_head} of {head_dim}, {n_head_kv} KV heads)"
                               f" do not fit together; {FIX}")
    scaling = c.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise ModelFormatError(f"{mf.path}: config.json key rope_scaling is {scaling!r}, not an object; {FIX}")
    if scaling and scaling.get("type", scaling.get("rope_type")) not in ("linear", None):
        raise UnsupportedModelError(f"{mf.path}: RoPE scaling {scaling} is not supported yet")
    factor = Metadata(scaling, mf.path / "config.json", noun="rope_scaling key").number("factor", 1.0, lo=1e-6)
    return ModelConfig(
        arch=arch,
        n_vocab=get.integer("vocab_size", lo=1),
        n_embd=n_embd,
        n_layer=get.integer("num_hidden_layers", lo=1, hi=MAX_LAYERS),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        v_head_dim=head_dim,
        n_ff=get.integer("intermediate_size", lo=1, hi=1 << 24),
        n_ctx_train=get.integer("max_position_embeddings", 2048, lo=8),
        rms_eps=get.number("rms_norm_eps", 1e-6, lo=1e-30, hi=1.0),
        rope_type=ROPE_NEOX,
        rope_base=get.number("rope_theta", 10000.0, lo=1e-6),
        rope_scale=1.0 / factor,
        tied_output="output.weight" not in mf.tensors,
        name=mf.path.name,
    )
