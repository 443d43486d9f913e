"""Make an HF folder (config.json, model.safetensors, tokenizer.json) from a llama GGUF.

Weights are dequantized; q/k rows are un-permuted back to HF's layout (GGUF permutes
them for llama.cpp's NORM RoPE; HF checkpoints use rotate_half). The tokenizer.json is
built from the GGUF vocabulary and merges with `tokenizers`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from flashlm import kernels_cpu
from flashlm.formats.hf import hf_name
from flashlm.formats.modelfile import GGUFModelFile


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # inverse of convert_hf_to_gguf's permute: (n_head, 2, hd/2, d) <- (n_head, hd/2, 2, d)
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_hf(gguf_path: Path, out: Path, dtype=np.float16) -> Path:
    mf = GGUFModelFile(gguf_path)
    md, arch = mf.metadata, mf.arch
    assert arch == "llama", "this helper writes llama-family folders"
    n_head = md["llama.attention.head_count"]
    n_kv = md["llama.attention.head_count_kv"]
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in mf.tensors.items():
        w = kernels_cpu.dequantize(t)
        if name.endswith("attn_q.weight"):
            w = _unpermute(w, n_head)
        elif name.endswith("attn_k.weight"):
            w = _unpermute(w, n_kv)
        tensors[hf_name(name)] = np.ascontiguousarray(w.astype(dtype if w.ndim == 2 else np.float32))
    save_file(tensors, str(out / "model.safetensors"))
    tokens = mf.array("tokenizer.ggml.tokens")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": md["llama.embedding_length"], "intermediate_size": md["llama.feed_forward_length"],
        "num_hidden_layers": md["llama.block_count"], "num_attention_heads": n_head,
        "num_key_value_heads": n_kv, "rms_norm_eps": md["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": md["llama.rope.freq_base"], "max_position_embeddings": md["llama.context_length"],
        "vocab_size": len(tokens), "tie_word_embeddings": "output.weight" not in mf.tensors,
        "bos_token_id": md["tokenizer.ggml.bos_token_id"], "eos_token_id": md["tokenizer.ggml.eos_token_id"],
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    merges = [tuple(m.split(" ", 1)) for m in mf.array("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    types = mf.array("tokenizer.ggml.token_type")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tokens[config["bos_token_id"]], "eos_token": tokens[config["eos_token_id"]],
        "add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token", False)),
        "chat_template": md.get("tokenizer.chat_template"),
    }, indent=2))
    return out
