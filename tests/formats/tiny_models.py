"""Tiny model files for fuzzing: a few tens of KiB each, so a load and two tokens take
milliseconds.

    write_tiny_gguf(path, "bpe")   llama, a byte-level BPE vocabulary (gpt2 tokenizer, as SmolLM2)
    write_tiny_gguf(path, "spm")   gemma3, a SentencePiece vocabulary with byte tokens (as Gemma)

Each vocabulary is made here (llama.cpp loads it), not copied from a real model: a
real one is most of a small file's bytes and most of its load time. Weights are random.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from gguf_fixtures import random_writers

CORPUS = ("Hi there! The quick brown fox jumps over the lazy dog. Hello, how are you? "
          "I am fine, thank you. What is the capital of France? It is Paris.")
N_MERGES = 40
SPECS = {
    "bpe": dict(arch="llama", n_layer=2, n_embd=32, n_head=2, n_head_kv=1, head_dim=16, n_ff=64,
                types={"attn": Q.Q4_0, "ffn": Q.Q8_0, "embd": Q.Q8_0, "output": Q.F16}),
    "spm": dict(arch="gemma3", n_layer=2, n_embd=32, n_head=2, n_head_kv=1, head_dim=16, n_ff=64,
                types={"attn": Q.Q8_0, "ffn": Q.Q4_1, "embd": Q.Q8_0, "output": None}),
}


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character map (its byte-level BPE alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def bpe_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): 3 control tokens, the 256 byte characters, and
    N_MERGES merges learnt from CORPUS."""
    chars = _byte_chars()
    words = [[chars[b] for b in ((" " if i else "") + w).encode()] for i, w in enumerate(CORPUS.split(" "))]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + chars
    merges = []
    for _ in range(N_MERGES):
        pairs = Counter(p for w in words for p in zip(w, w[1:]))
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == (a, b):
                    w[i:i + 2] = [a + b]
                i += 1
    return tokens, [3, 3, 3] + [1] * (len(tokens) - 3), merges


def spm_vocab() -> tuple[list[str], list[int], list[float]]:
    """(tokens, token types, scores): Gemma's special ids (pad 0, eos 1, bos 2, unk 3), the
    256 byte tokens <0xXX>, then pieces."""
    pieces = sorted({"▁" + w.strip(".,!?") for w in CORPUS.split(" ")} | set(CORPUS.replace(" ", "")) | {"▁"})
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [3, 3, 3, 2] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 260 + [-float(i) for i in range(len(pieces))]
    return tokens, types, scores


def _add_vocab(w: gguf.GGUFWriter, kind: str) -> int:
    if kind == "bpe":
        tokens, types, merges = bpe_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(False)
    else:
        tokens, types, scores = spm_vocab()
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_pad_token_id(0)
        w.add_add_bos_token(True)
    return len(tokens)


def _quant(x: np.ndarray, qtype):
    if qtype == Q.F32:
        return x.astype(np.float32), None
    return gguf.quants.quantize(x.astype(np.float32), qtype), qtype


def _layer(s: dict) -> tuple[list, list]:
    """One block's (matrices: (name, shape, type key), norms: (name, width)) for spec s."""
    d, q, kv, ff = s["n_embd"], s["n_head"] * s["head_dim"], s["n_head_kv"] * s["head_dim"], s["n_ff"]
    mats = [("attn_q", (q, d), "attn"), ("attn_k", (kv, d), "attn"), ("attn_v", (kv, d), "attn"),
            ("attn_output", (d, q), "attn"), ("ffn_gate", (ff, d), "ffn"), ("ffn_up", (ff, d), "ffn"),
            ("ffn_down", (d, ff), "ffn")]
    norms = [("attn_norm", d), ("ffn_norm", d)]
    if s["arch"] == "gemma3":
        norms += [("attn_q_norm", s["head_dim"]), ("attn_k_norm", s["head_dim"]), ("post_attention_norm", d),
                  ("post_ffw_norm", d)]
    return mats, norms


def write_tiny_gguf(path: Path, kind: str = "bpe", seed: int = 0) -> Path:
    """A tiny random-weight model of vocabulary `kind` ("bpe" or "spm") at path."""
    s = SPECS[kind]
    d, hd = s["n_embd"], s["head_dim"]
    w = gguf.GGUFWriter(str(path), s["arch"])
    w.add_name(f"tiny-{kind}")
    for add, v in ((w.add_block_count, s["n_layer"]), (w.add_context_length, 256), (w.add_embedding_length, d),
                   (w.add_feed_forward_length, s["n_ff"]), (w.add_head_count, s["n_head"]),
                   (w.add_head_count_kv, s["n_head_kv"]), (w.add_key_length, hd), (w.add_value_length, hd),
                   (w.add_rope_dimension_count, hd), (w.add_rope_freq_base, 10000.0), (w.add_layer_norm_rms_eps, 1e-6)):
        add(v)
    if s["arch"] == "gemma3":
        w.add_sliding_window(8)
        w.add_rope_freq_base_swa(10000.0)
    n_vocab = _add_vocab(w, kind)
    types = s["types"]
    tensor, norm = random_writers(w, np.random.default_rng(seed), _quant)
    tensor("token_embd.weight", (n_vocab, d), types["embd"], 1.0)
    norm("output_norm.weight", d)
    if types["output"] is not None:
        tensor("output.weight", (n_vocab, d), types["output"], 1.0)
    mats, norms = _layer(s)
    for i in range(s["n_layer"]):
        for name, n in norms:
            norm(f"blk.{i}.{name}.weight", n)
        for name, shape, key in mats:
            tensor(f"blk.{i}.{name}.weight", shape, types[key], shape[1] ** -0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def fuzz_seeds(folder: Path) -> dict:
    """The valid files the fuzzers mutate, written under folder: {name: (files, target)},
    files {file name: bytes}, target the file to load ("." for the folder):
    bpe and spm (tiny GGUFs), flash (the bpe model's flash layout), hf (an HF folder of it)."""
    from flashlm.runtime.convert import convert
    from hf_fixture import gguf_to_hf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seeds = {}
    for kind in ("bpe", "spm"):
        p = write_tiny_gguf(folder / f"tiny-{kind}.gguf", kind)
        seeds[kind] = ({"model.gguf": p.read_bytes()}, "model.gguf")
    flash = convert(folder / "tiny-bpe.gguf", folder / "tiny-bpe.flash.gguf", force=True, calibration_tokens=0)
    seeds["flash"] = ({"model.gguf": flash.read_bytes()}, "model.gguf")
    hf = gguf_to_hf(folder / "tiny-bpe.gguf", folder / "tiny-hf")
    seeds["hf"] = ({p.name: p.read_bytes() for p in sorted(hf.iterdir())}, ".")
    return seeds
