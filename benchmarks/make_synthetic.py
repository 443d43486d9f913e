"""Write a synthetic Llama-shaped GGUF of about 1 GiB of Q4_0 weights (1.9B parameters), random
(labelled "synthetic" in its name): the flash benchmarks' large model, since no real
1B+ model can be fetched here. Random weights say nothing about quality or about
which neurons a real model uses; they exercise the I/O and compute paths at size.

    python benchmarks/make_synthetic.py [OUT] [--layers 30]

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

from flashlm.runtime.modelfile import GGUFModelFile  # noqa: E402
from flashlm.runtime.registry import home, resolve  # noqa: E402

D, FF, HEADS, KV_HEADS = 2048, 8192, 16, 4


def default_path() -> Path:
    return home() / "synthetic" / "synthetic-llama-1gb-q4_0.gguf"


def q4_0_rows(rng, rows: int, cols: int, std: float) -> np.ndarray:
    """Random Q4_0 blocks whose values have about the given standard deviation."""
    raw = rng.integers(0, 256, size=(rows, cols // 32, 18), dtype=np.uint8)
    d = np.float16(std / 4.6)  # codes uniform in 0..15, minus 8: std 4.6
    raw[:, :, 0:2] = np.frombuffer(d.tobytes(), dtype=np.uint8)
    return raw.reshape(rows, -1)


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
    w.add_tokenizer_model(src.metadata["tokenizer.ggml.model"])
    w.add_tokenizer_pre(src.metadata.get("tokenizer.ggml.pre", "default"))
    w.add_token_list(tokens)
    w.add_token_types(src.array("tokenizer.ggml.token_type").tolist())
    w.add_token_merges(src.array("tokenizer.ggml.merges"))
    w.add_bos_token_id(int(src.metadata["tokenizer.ggml.bos_token_id"]))
    w.add_eos_token_id(int(src.metadata["tokenizer.ggml.eos_token_id"]))
    w.add_add_bos_token(True)
    hd = D // HEADS
    mats = [("token_embd.weight", len(tokens), D, 1.0)]
    for i in range(n_layer):
        p = f"blk.{i}."
        mats += [(p + "attn_q.weight", D, D, D ** -0.5), (p + "attn_k.weight", KV_HEADS * hd, D, D ** -0.5),
                 (p + "attn_v.weight", KV_HEADS * hd, D, D ** -0.5), (p + "attn_output.weight", D, D, D ** -0.5),
                 (p + "ffn_gate.weight", FF, D, D ** -0.5), (p + "ffn_up.weight", FF, D, D ** -0.5),
                 (p + "ffn_down.weight", D, FF, FF ** -0.5)]
    norms = ["output_norm.weight"] + [f"blk.{i}.{n}.weight" for i in range(n_layer) for n in ("attn_norm", "ffn_norm")]
    for name, rows, cols, _ in mats:
        w.add_tensor_info(name, (rows, cols // 32 * 18), np.dtype(np.uint8), rows * cols // 32 * 18, raw_dtype=Q.Q4_0)
    for name in norms:
        w.add_tensor_info(name, (D,), np.dtype(np.float32), D * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for k, (name, rows, cols, std) in enumerate(mats):
        w.write_tensor_data(q4_0_rows(rng, rows, cols, std))
        print(f"\r  {k + 1}/{len(mats)} matrices", end="", file=sys.stderr, flush=True)
    for name in norms:
        w.write_tensor_data(np.ones(D, dtype=np.float32))
    w.close()
    print(file=sys.stderr)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=None, help=f"output path (default {default_path()})")
    ap.add_argument("--layers", type=int, default=30)
    args = ap.parse_args(argv)
    out = write(Path(args.out) if args.out else default_path(), args.layers)
    print(f"wrote {out} ({out.stat().st_size / 2**30:.2f} GiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
