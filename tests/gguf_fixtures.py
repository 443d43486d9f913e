"""Small random-weight GGUFs for architectures with no small real model here.

Written with gguf.GGUFWriter; llama.cpp runs them too, so they serve as parity
fixtures. The vocabulary is copied from the default model (llama.cpp needs a real
tokenizer to load a file), everything else is random.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from flashlm.formats.modelfile import GGUFModelFile

# Per architecture: dims, the features that define it, and a mix of quant types.
SPECS = {
    "llama": dict(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, rope_base=10000.0,
                  types={"attn": Q.Q4_0, "ffn": Q.Q8_0, "embd": Q.F16, "output": Q.Q8_0}),
    "qwen2": dict(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, rope_base=1000000.0, qkv_bias=True,
                  types={"attn": Q.Q5_0, "ffn": Q.Q5_1, "embd": Q.Q8_0, "output": Q.F16}),
    "qwen3": dict(n_layer=2, n_embd=128, n_head=4, n_head_kv=2, n_ff=256, head_dim=64, rope_base=1000000.0,
                  qk_norm=True, types={"attn": Q.Q4_1, "ffn": Q.BF16, "embd": Q.Q8_0, "output": None}),
    "gemma3": dict(n_layer=6, n_embd=128, n_head=4, n_head_kv=1, n_ff=256, head_dim=64, rope_base=1000000.0,
                   qk_norm=True, post_norms=True, sliding_window=16,
                   types={"attn": Q.Q8_0, "ffn": Q.Q4_0, "embd": Q.Q8_0, "output": None}),
}


def _quant(x: np.ndarray, qtype):
    if qtype == Q.F32:
        return x.astype(np.float32), None
    return gguf.quants.quantize(x.astype(np.float32), qtype), qtype


def add_vocab(w: gguf.GGUFWriter, src: GGUFModelFile) -> None:
    """Copy src's tokenizer into writer w (llama.cpp needs a real one to load a file)."""
    w.add_tokenizer_model(src.metadata["tokenizer.ggml.model"])
    w.add_tokenizer_pre(src.metadata.get("tokenizer.ggml.pre", "default"))
    w.add_token_list(src.array("tokenizer.ggml.tokens"))
    w.add_token_types(src.array("tokenizer.ggml.token_type").tolist())
    merges = src.array("tokenizer.ggml.merges")
    if merges:
        w.add_token_merges(merges)
    w.add_bos_token_id(int(src.metadata["tokenizer.ggml.bos_token_id"]))
    w.add_eos_token_id(int(src.metadata["tokenizer.ggml.eos_token_id"]))
    w.add_add_bos_token(True)


def random_writers(w: gguf.GGUFWriter, rng, quant):
    """tensor(name, shape, qtype, scale): random values of that scale, quantized by
    quant(x, qtype); norm(name, n): a norm weight near 1. Both added to writer w."""
    def tensor(name, shape, qtype, scale):
        x = rng.standard_normal(shape).astype(np.float32) * scale
        data, raw = quant(x, qtype)
        w.add_tensor(name, data, raw_dtype=raw)

    def norm(name, n):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    return tensor, norm


def new_writer(path: Path, arch: str, name: str, spec: dict, hd: int) -> gguf.GGUFWriter:
    """A GGUFWriter with the shape keys every fixture has, from spec's n_layer, n_embd,
    n_ff, n_head, n_head_kv, rope_base (head size hd)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(spec["n_layer"])
    w.add_context_length(2048)
    w.add_embedding_length(spec["n_embd"])
    w.add_feed_forward_length(spec["n_ff"])
    w.add_head_count(spec["n_head"])
    w.add_head_count_kv(spec["n_head_kv"])
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(spec["rope_base"])
    return w


def write_random_gguf(path: Path, arch: str, vocab_source: Path, seed: int = 0) -> Path:
    spec = SPECS[arch]
    rng = np.random.default_rng(seed)
    src = GGUFModelFile(vocab_source)
    tokens = src.array("tokenizer.ggml.tokens")
    n_vocab = len(tokens)
    d, n_head, n_kv, ff = spec["n_embd"], spec["n_head"], spec["n_head_kv"], spec["n_ff"]
    hd = spec.get("head_dim", d // n_head)
    types = spec["types"]

    w = new_writer(path, arch, f"random-{arch}", spec, hd)
    w.add_layer_norm_rms_eps(1e-6)
    if "sliding_window" in spec:
        w.add_sliding_window(spec["sliding_window"])
        w.add_rope_freq_base_swa(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    add_vocab(w, src)

    tensor, norm = random_writers(w, rng, _quant)

    tensor("token_embd.weight", (n_vocab, d), types["embd"], 1.0)
    norm("output_norm.weight", d)
    if types["output"] is not None:
        tensor("output.weight", (n_vocab, d), types["output"], 1.0)
    for i in range(spec["n_layer"]):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight", d)
        norm(p + "ffn_norm.weight", d)
        tensor(p + "attn_q.weight", (n_head * hd, d), types["attn"], d ** -0.5)
        tensor(p + "attn_k.weight", (n_kv * hd, d), types["attn"], d ** -0.5)
        tensor(p + "attn_v.weight", (n_kv * hd, d), types["attn"], d ** -0.5)
        tensor(p + "attn_output.weight", (d, n_head * hd), types["attn"], (n_head * hd) ** -0.5)
        tensor(p + "ffn_gate.weight", (ff, d), types["ffn"], d ** -0.5)
        tensor(p + "ffn_up.weight", (ff, d), types["ffn"], d ** -0.5)
        tensor(p + "ffn_down.weight", (d, ff), types["ffn"], ff ** -0.5)
        if spec.get("qkv_bias"):
            for n, rows in (("attn_q", n_head * hd), ("attn_k", n_kv * hd), ("attn_v", n_kv * hd)):
                w.add_tensor(p + n + ".bias", (0.1 * rng.standard_normal(rows)).astype(np.float32))
        if spec.get("qk_norm"):
            norm(p + "attn_q_norm.weight", hd)
            norm(p + "attn_k_norm.weight", hd)
        if spec.get("post_norms"):
            norm(p + "post_attention_norm.weight", d)
            norm(p + "post_ffw_norm.weight", d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
