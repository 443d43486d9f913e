"""Small random-weight Mixture-of-Experts GGUFs, laid out as llama.cpp loads them.

The MoE counterpart of gguf_fixtures.py: one spec per architecture, written with
gguf.GGUFWriter, the vocabulary copied from the default model (llama.cpp needs a real
tokenizer to load a file), every weight random. llama.cpp runs these files, so they serve
as parity fixtures for the MoE paths.

Layout (llama.cpp's names; shapes here in numpy order, i.e. ggml's reversed):
  blk.N.ffn_gate_inp.weight         (n_expert, n_embd)          router, F32 as llama-quantize leaves it
  blk.N.ffn_gate_exps.weight        (n_expert, n_ff_exp, n_embd) experts stacked on the first axis
  blk.N.ffn_up_exps.weight          (n_expert, n_ff_exp, n_embd)
  blk.N.ffn_down_exps.weight        (n_expert, n_embd, n_ff_exp)
  blk.N.ffn_{gate,up,down}_shexp    (n_ff_shexp, n_embd) / (n_embd, n_ff_shexp)   qwen2moe, granite shared
  blk.N.ffn_gate_inp_shexp.weight   (n_embd,)                   qwen2moe's shared-expert gate (1-D)
Quantized blocks run along the last axis (a row), so a K-quant (256-element blocks) only
goes on a tensor whose rows are a multiple of 256: down_exps with n_ff_exp = 256, the
shared expert's down with n_ff_shexp = 256, qwen3moe's attn_output (n_head*head_dim = 256).
gguf-py has no K-quant quantizer; _quantize_q4_k / _quantize_q6_k below write valid
blocks (checked against gguf's dequantizer and against llama.cpp).

The router weights get a larger scale than the rest (logit std about 2 over 8 experts) so
that the top-k choice changes from token to token and from layer to layer. That also
means near-ties: where the k-th and (k+1)-th router logits differ by less than the
rounding noise (~0.01-0.05 here), llama.cpp and an exact implementation can pick different
experts, and that one position's logits move (cosine down to ~0.96, the next positions
slightly through attention). Over the 5 parity prompts (418 positions) a float64
reference that rounds activations as ggml does has 0-3 such positions per file, while a
wrong detail (renormalisation, RoPE style, shared-expert gate, q/k norm, multipliers) moves
10-99% of positions below cosine 0.999 and the median below 0.9997; so compare MoE logits
by quantiles (median, 2nd percentile of per-position cosine), not by the minimum. Granite's
logit_scale is a uniform factor: only a magnitude check (max |diff|) sees it.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from flashlm.formats.modelfile import GGUFModelFile

from gguf_fixtures import add_vocab, new_writer, random_writers

# Per architecture: the GGUF architecture name, dims, routing, the features that define
# it, and the quant types. "types" keys: attn (q/k/v/o), attn_out (o only, overrides
# attn), router, gate_up (gate_exps and up_exps), down (down_exps), shexp_gate_up,
# shexp_down, embd, output (None: tied to token_embd, no output.weight written).
MOE_SPECS = {
    # Mixtral: GGUF arch "llama" with expert_count; the expert FFN width is llama's plain
    # feed_forward_length. Routing: softmax over all experts, top-k, renormalised.
    "mixtral": dict(
        gguf_arch="llama", n_layer=2, n_embd=128, n_head=4, n_head_kv=2,
        n_expert=8, n_expert_used=2, n_ff=256, n_ff_exp=256,
        rope_base=1000000.0, rms_eps=1e-5,
        types={"attn": Q.Q8_0, "router": Q.F32, "gate_up": Q.Q4_0, "down": Q.Q4_K,
               "embd": Q.Q8_0, "output": Q.F16}),
    # Qwen1.5/Qwen2-MoE: 4 of 8 routed experts, top-k weights NOT renormalised, plus a
    # shared expert scaled by sigmoid(ffn_gate_inp_shexp . x); q/k/v biases.
    "qwen2moe": dict(
        gguf_arch="qwen2moe", n_layer=2, n_embd=128, n_head=4, n_head_kv=2,
        n_expert=8, n_expert_used=4, n_ff=256, n_ff_exp=64, n_ff_shexp=256,
        shexp_gate=True, qkv_bias=True, rope_base=1000000.0, rms_eps=1e-6,
        types={"attn": Q.Q5_0, "router": Q.F32, "gate_up": Q.Q8_0, "down": Q.Q4_0,
               "shexp_gate_up": Q.Q8_0, "shexp_down": Q.Q6_K, "embd": Q.Q8_0, "output": Q.Q8_0}),
    # Qwen3-MoE: per-head q/k RMS norms, head_dim 64 (q is 256 wide: attn_output can take a
    # K-quant), top-k weights renormalised, tied output.
    "qwen3moe": dict(
        gguf_arch="qwen3moe", n_layer=2, n_embd=128, n_head=4, n_head_kv=2, head_dim=64,
        n_expert=8, n_expert_used=2, n_ff=512, n_ff_exp=128, qk_norm="head",
        rope_base=1000000.0, rms_eps=1e-6,
        types={"attn": Q.Q8_0, "attn_out": Q.Q4_K, "router": Q.F32, "gate_up": Q.F16,
               "down": Q.Q8_0, "embd": Q.Q8_0, "output": None}),
    # OLMoE: q/k RMS norms over the whole projection (weights of n_embd). llama.cpp
    # creates attn_k_norm as {n_embd}, so the file must be MHA (n_head_kv == n_head): with
    # 2 kv heads the load fails ("attn_k_norm.weight has wrong shape; expected 128").
    # Top-k weights NOT renormalised; the expert width is feed_forward_length.
    "olmoe": dict(
        gguf_arch="olmoe", n_layer=2, n_embd=128, n_head=4, n_head_kv=4,
        n_expert=8, n_expert_used=2, n_ff=128, n_ff_exp=128, qk_norm="full",
        rope_base=10000.0, rms_eps=1e-5,
        types={"attn": Q.Q8_0, "router": Q.F16, "gate_up": Q.Q4_1, "down": Q.Q5_1,
               "embd": Q.Q8_0, "output": Q.Q8_0}),
    # Granite MoE (granite-3.x-*-a*m): the four multipliers as metadata, top-k renormalised,
    # tied output. Multipliers as in granite-3.0-1b-a400m, attention_scale being 1/head_dim
    # there as here; q/k weights 3x larger so that attention (and RoPE) is not near-uniform
    # under that small scale.
    "granitemoe": dict(
        gguf_arch="granitemoe", n_layer=2, n_embd=128, n_head=4, n_head_kv=2,
        n_expert=8, n_expert_used=2, n_ff=128, n_ff_exp=128,
        granite=dict(embedding_scale=12.0, residual_scale=0.22, attention_scale=1.0 / 32, logit_scale=6.0),
        embd_scale=0.1, qk_scale=3.0, rope_base=10000.0, rms_eps=1e-6,
        types={"attn": Q.Q8_0, "router": Q.F32, "gate_up": Q.Q8_0, "down": Q.F16,
               "embd": Q.Q8_0, "output": None}),
    # GraniteMoeShared: the same arch plus an ungated shared expert
    # (expert_shared_feed_forward_length), added to the routed output as is.
    "granitemoe_shared": dict(
        gguf_arch="granitemoe", n_layer=2, n_embd=128, n_head=4, n_head_kv=2,
        n_expert=8, n_expert_used=2, n_ff=128, n_ff_exp=128, n_ff_shexp=256,
        granite=dict(embedding_scale=12.0, residual_scale=0.22, attention_scale=1.0 / 32, logit_scale=6.0),
        embd_scale=0.1, qk_scale=3.0, rope_base=10000.0, rms_eps=1e-6,
        types={"attn": Q.Q4_0, "router": Q.F32, "gate_up": Q.Q8_0, "down": Q.Q8_0,
               "shexp_gate_up": Q.Q8_0, "shexp_down": Q.Q4_K, "embd": Q.Q8_0, "output": None}),
}


# --- K-quant writers (gguf-py only dequantizes these) -----------------------------------

def _quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """Q4_K blocks of rows of `x` (last axis a multiple of 256): uint8 (..., row_bytes).

    Block of 256 = 8 sub-blocks of 32, value = d*sc[j]*q - dmin*m[j], q in 0..15, sc and m
    6-bit; layout d, dmin (f16), scales[12] (ggml's get_scale_min_k4 packing), qs[128].
    A plain min/max fit, not ggml's iterative search: any valid block will do here.
    """
    shape = x.shape
    assert shape[-1] % 256 == 0, shape
    b = x.reshape(-1, 8, 32).astype(np.float32)
    nb = b.shape[0]
    lo = np.minimum(b.min(-1), 0.0)
    hi = np.maximum(b.max(-1), 0.0)
    scale = (hi - lo) / 15.0
    mins = -lo
    d = (scale.max(-1) / 63.0).astype(np.float16)
    dmin = (mins.max(-1) / 63.0).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.rint(scale / df), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dminf > 0, np.rint(mins / dminf), 0).clip(0, 63).astype(np.uint8)
        step = (df * sc)[..., None]
        q = np.where(step > 0, np.rint((b + (dminf * m)[..., None]) / step), 0).clip(0, 15).astype(np.uint8)
    scales = np.empty((nb, 12), np.uint8)
    scales[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    scales[:, 4:8] = (m[:, 0:4] & 63) | ((m[:, 4:8] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    q = q.reshape(nb, 4, 2, 32)  # 64-value chunks: low nibbles sub-block 2c, high 2c+1
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)
    out = np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), scales, qs], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // 256 * 144)


def _quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """Q6_K blocks of rows of `x` (last axis a multiple of 256): uint8 (..., row_bytes).

    Block of 256 = 16 sub-blocks of 16, value = d*sc[j]*(q - 32), q in 0..63, sc int8;
    layout ql[128] (low nibbles), qh[64] (2-bit highs), scales[16], d (f16).
    """
    shape = x.shape
    assert shape[-1] % 256 == 0, shape
    b = x.reshape(-1, 16, 16).astype(np.float32)
    nb = b.shape[0]
    s = np.abs(b).max(-1) / 31.0
    d = (s.max(-1) / 127.0).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df > 0, np.rint(s / df), 0).clip(-128, 127).astype(np.int8)
        step = (df * sc)[..., None]
        q = (np.where(step != 0, np.rint(b / step), 0).clip(-32, 31) + 32).astype(np.uint8)
    q = q.reshape(nb, 2, 4, 32)  # [half, quarter, l]: value index 128*half + 32*quarter + l
    ql = np.concatenate([(q[:, :, 0] & 15) | ((q[:, :, 2] & 15) << 4),
                         (q[:, :, 1] & 15) | ((q[:, :, 3] & 15) << 4)], axis=2).reshape(nb, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(nb, 2)], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // 256 * 210)


def _quant(x: np.ndarray, qtype):
    """(data, raw_dtype) for GGUFWriter.add_tensor; quantized along the last axis."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if qtype == Q.F32:
        return x, None
    if qtype == Q.Q4_K:
        return _quantize_q4_k(x), qtype
    if qtype == Q.Q6_K:
        return _quantize_q6_k(x), qtype
    return gguf.quants.quantize(x, qtype), qtype


# --- writer ------------------------------------------------------------------------------

def write_random_moe_gguf(path: Path, arch: str, vocab_source: Path, seed: int = 0) -> Path:
    """Write a random-weight MoE GGUF of MOE_SPECS[arch] to `path`; returns `path`."""
    spec = MOE_SPECS[arch]
    ga = spec["gguf_arch"]
    rng = np.random.default_rng(seed)
    src = GGUFModelFile(vocab_source)
    tokens = src.array("tokenizer.ggml.tokens")
    n_vocab = len(tokens)
    d, n_head, n_kv = spec["n_embd"], spec["n_head"], spec["n_head_kv"]
    hd = spec.get("head_dim", d // n_head)
    n_exp, ff_exp = spec["n_expert"], spec["n_ff_exp"]
    ff_sh = spec.get("n_ff_shexp", 0)
    types = spec["types"]

    w = new_writer(path, ga, f"random-{arch}", spec, hd)
    w.add_layer_norm_rms_eps(spec["rms_eps"])
    w.add_expert_count(n_exp)
    w.add_expert_used_count(spec["n_expert_used"])
    if ga in ("qwen2moe", "qwen3moe"):
        w.add_expert_feed_forward_length(ff_exp)  # llama/olmoe/granitemoe: feed_forward_length
    if ff_sh:
        w.add_expert_shared_feed_forward_length(ff_sh)
    if "granite" in spec:
        g = spec["granite"]
        w.add_embedding_scale(g["embedding_scale"])
        w.add_residual_scale(g["residual_scale"])
        w.add_attention_scale(g["attention_scale"])
        w.add_logit_scale(g["logit_scale"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    add_vocab(w, src)

    tensor, norm = random_writers(w, rng, _quant)

    tensor("token_embd.weight", (n_vocab, d), types["embd"], spec.get("embd_scale", 1.0))
    norm("output_norm.weight", d)
    if types["output"] is not None:
        tensor("output.weight", (n_vocab, d), types["output"], 1.0)
    q_dim, kv_dim = n_head * hd, n_kv * hd
    for i in range(spec["n_layer"]):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight", d)
        norm(p + "ffn_norm.weight", d)
        qk = spec.get("qk_scale", 1.0)
        tensor(p + "attn_q.weight", (q_dim, d), types["attn"], qk * d ** -0.5)
        tensor(p + "attn_k.weight", (kv_dim, d), types["attn"], qk * d ** -0.5)
        tensor(p + "attn_v.weight", (kv_dim, d), types["attn"], d ** -0.5)
        tensor(p + "attn_output.weight", (d, q_dim), types.get("attn_out", types["attn"]), q_dim ** -0.5)
        if spec.get("qkv_bias"):
            for n, rows in (("attn_q", q_dim), ("attn_k", kv_dim), ("attn_v", kv_dim)):
                w.add_tensor(p + n + ".bias", (0.1 * rng.standard_normal(rows)).astype(np.float32))
        if spec.get("qk_norm") == "head":
            norm(p + "attn_q_norm.weight", hd)
            norm(p + "attn_k_norm.weight", hd)
        elif spec.get("qk_norm") == "full":
            norm(p + "attn_q_norm.weight", q_dim)
            norm(p + "attn_k_norm.weight", kv_dim)
        # Router: logits of std ~router_scale so the top-k set moves between tokens.
        tensor(p + "ffn_gate_inp.weight", (n_exp, d), types["router"], spec.get("router_scale", 2.0) * d ** -0.5)
        tensor(p + "ffn_gate_exps.weight", (n_exp, ff_exp, d), types["gate_up"], d ** -0.5)
        tensor(p + "ffn_up_exps.weight", (n_exp, ff_exp, d), types["gate_up"], d ** -0.5)
        tensor(p + "ffn_down_exps.weight", (n_exp, d, ff_exp), types["down"], ff_exp ** -0.5)
        if ff_sh:
            tensor(p + "ffn_gate_shexp.weight", (ff_sh, d), types["shexp_gate_up"], d ** -0.5)
            tensor(p + "ffn_up_shexp.weight", (ff_sh, d), types["shexp_gate_up"], d ** -0.5)
            tensor(p + "ffn_down_shexp.weight", (d, ff_sh), types["shexp_down"], ff_sh ** -0.5)
        if spec.get("shexp_gate"):
            w.add_tensor(p + "ffn_gate_inp_shexp.weight", (rng.standard_normal(d) * d ** -0.5).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
