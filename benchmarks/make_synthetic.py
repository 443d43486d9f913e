"""Write a synthetic Llama-shaped GGUF of about 1 GiB of Q4_0 weights (1.9B parameters), random
(labelled "synthetic" in its name): the flash benchmarks' large model, since no real
1B+ model can be fetched here. Random weights say nothing about quality or about
which neurons a real model uses; they exercise the I/O and compute paths at size.

    python benchmarks/make_synthetic.py [OUT] [--layers 30]
    python benchmarks/make_synthetic.py --moe [OUT]     (the expert benchmarks' synthetic MoE)

The vocabulary is copied from the default model so llama.cpp and flashlm load it.
Tensors are written one at a time (quantized bytes drawn directly), so memory stays
small.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flashlm.formats.modelfile import GGUFModelFile  # noqa: E402
from flashlm.formats.registry import home, resolve  # noqa: E402

D, FF, HEADS, KV_HEADS = 2048, 8192, 16, 4


def default_path() -> Path:
    return home() / "synthetic" / "synthetic-llama-1gb-q4_0.gguf"


def q4_0_rows(rng, rows: int, cols: int, std: float) -> np.ndarray:
    """Random Q4_0 blocks whose values have about the given standard deviation."""
    raw = rng.integers(0, 256, size=(rows, cols // 32, 18), dtype=np.uint8)
    d = np.float16(std / 4.6)  # codes uniform in 0..15, minus 8: std 4.6
    raw[:, :, 0:2] = np.frombuffer(d.tobytes(), dtype=np.uint8)
    return raw.reshape(rows, -1)


def default_moe_path() -> Path:
    return home() / "synthetic" / "synthetic-moe-1gb-q4_0.gguf"


# The MoE: OLMoE / Qwen3-30B-A3B's shape scaled to about 1 GiB of Q4_0 (64 experts of 8
# routed, 16 layers, 0.9 GB of experts), written as a Mixtral-style llama file.
MOE = dict(D=1024, HEADS=16, KV_HEADS=4, LAYERS=16, EXPERTS=64, USED=8, FF_EXP=512)


def write_moe(out: Path, seed: int = 0) -> Path:
    """The synthetic MoE, random router included. Measured over 32 tokens of text, layer 0
    routes about at random (consecutive tokens share 17% of their experts, chance is
    12.5%); deeper layers repeat more (57% at layer 7, 71% at layer 15), as random layers
    pull the tokens' states together. Neither is a trained router's use: the real-routing
    case needs a MoE made from a real model. (A first version, with full-size layer
    outputs, collapsed every state into one: the same experts for every token, 100%
    cache hits at any size.)"""
    m = MOE
    d, E, ff, hd = m["D"], m["EXPERTS"], m["FF_EXP"], m["D"] // m["HEADS"]
    rng = np.random.default_rng(seed)
    src = GGUFModelFile(resolve("smollm2-135m"))
    tokens = src.array("tokenizer.ggml.tokens")
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("synthetic-moe-1gb (random weights, 64 experts, 8 routed)")
    w.add_block_count(m["LAYERS"])
    w.add_context_length(4096)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(m["HEADS"])
    w.add_head_count_kv(m["KV_HEADS"])
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(E)
    w.add_expert_used_count(m["USED"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    _add_vocab(w, src, tokens)
    mats = [("token_embd.weight", (len(tokens),), d, 1.0)]
    routers = []
    for i in range(m["LAYERS"]):
        p = f"blk.{i}."
        kv = m["KV_HEADS"] * hd
        # outputs written into the residual stream are small, so each token's embedding stays
        # the larger part of it: random layers otherwise average the tokens' states into one
        # (attention mixes them) and the router picks the same experts for every token
        mats += [(p + "attn_q.weight", (d,), d, d ** -0.5), (p + "attn_k.weight", (kv,), d, d ** -0.5),
                 (p + "attn_v.weight", (kv,), d, d ** -0.5), (p + "attn_output.weight", (d,), d, 0.02 * d ** -0.5),
                 (p + "ffn_gate_exps.weight", (E, ff), d, d ** -0.5), (p + "ffn_up_exps.weight", (E, ff), d, d ** -0.5),
                 (p + "ffn_down_exps.weight", (E, d), ff, 0.02 * ff ** -0.5)]
        routers.append(p + "ffn_gate_inp.weight")
    norms = ["output_norm.weight"] + [f"blk.{i}.{n}.weight" for i in range(m["LAYERS"]) for n in ("attn_norm", "ffn_norm")]
    # routers: logits of std ~2, so the top 8 move from token to token
    floats = [(r, lambda: (rng.standard_normal((E, d)) * 2.0 * d ** -0.5).astype(np.float32)) for r in routers]
    floats += [(n, lambda: np.ones(d, dtype=np.float32)) for n in norms]
    _write_tensors(w, rng, mats, floats)
    return out


def _write_tensors(w, rng, mats, floats) -> None:
    """Random Q4_0 matrices mats [(name, leading dims, cols, std)], then float32 tensors
    floats [(name, make)], written one at a time (memory stays small); closes w."""
    for name, rows, cols, _ in mats:
        w.add_tensor_info(name, (*rows, cols // 32 * 18), np.dtype(np.uint8), int(np.prod(rows)) * cols // 32 * 18,
                          raw_dtype=Q.Q4_0)
    arrays = [(name, make()) for name, make in floats]
    for name, a in arrays:
        w.add_tensor_info(name, a.shape, a.dtype, a.nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for k, (name, rows, cols, std) in enumerate(mats):
        w.write_tensor_data(q4_0_rows(rng, int(np.prod(rows)), cols, std).reshape(*rows, -1))
        print(f"\r  {k + 1}/{len(mats)} matrices", end="", file=sys.stderr, flush=True)
    for _, a in arrays:
        w.write_tensor_data(a)
    w.close()
    print(file=sys.stderr)


def _add_vocab(w, src, tokens) -> None:
    w.add_tokenizer_model(src.metadata["tokenizer.ggml.model"])
    w.add_tokenizer_pre(src.metadata.get("tokenizer.ggml.pre", "default"))
    w.add_token_list(tokens)
    w.add_token_types(src.array("tokenizer.ggml.token_type").tolist())
    w.add_token_merges(src.array("tokenizer.ggml.merges"))
    w.add_bos_token_id(int(src.metadata["tokenizer.ggml.bos_token_id"]))
    w.add_eos_token_id(int(src.metadata["tokenizer.ggml.eos_token_id"]))
    w.add_add_bos_token(True)


def write(out: Path, n_layer: int = 30, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    src = GGUFModelFile(resolve("smollm2-135m"))
    tokens = src.array("tokenizer.ggml.tokens")
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("synthetic-llama-1gb (random weights, 1.9B parameters)")
    w.add_block_count(n_layer)
    w.add_context_length(4096)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(D // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    _add_vocab(w, src, tokens)
    hd = D // HEADS
    mats = [("token_embd.weight", (len(tokens),), D, 1.0)]
    for i in range(n_layer):
        p = f"blk.{i}."
        mats += [(p + "attn_q.weight", (D,), D, D ** -0.5), (p + "attn_k.weight", (KV_HEADS * hd,), D, D ** -0.5),
                 (p + "attn_v.weight", (KV_HEADS * hd,), D, D ** -0.5), (p + "attn_output.weight", (D,), D, D ** -0.5),
                 (p + "ffn_gate.weight", (FF,), D, D ** -0.5), (p + "ffn_up.weight", (FF,), D, D ** -0.5),
                 (p + "ffn_down.weight", (D,), FF, FF ** -0.5)]
    norms = ["output_norm.weight"] + [f"blk.{i}.{n}.weight" for i in range(n_layer) for n in ("attn_norm", "ffn_norm")]
    _write_tensors(w, rng, mats, [(n, lambda: np.ones(D, dtype=np.float32)) for n in norms])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=None, help=f"output path (default {default_path()})")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--moe", action="store_true", help="instead: the synthetic mixture of experts (64 experts, 8 routed)")
    args = ap.parse_args(argv)
    if args.moe:
        out = write_moe(Path(args.out) if args.out else default_moe_path())
    else:
        out = write(Path(args.out) if args.out else default_path(), args.layers)
    print(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
