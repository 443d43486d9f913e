"""MoEfication: split SmolLM2's FFN neurons into experts by clustering, fit a router on
calibration activations, and write the result as a Mixtral-style GGUF that llama.cpp
also runs; then measure its quality against the dense model.

    python benchmarks/moefy.py [--experts 24] [--top-k 6,12,18,24] [--calib-tokens 1536] [--out-dir DIR]

Source: the default model (SmolLM2-135M-Instruct Q4_1). tests/data/eval_text.txt is cut
in two at a blank line near its middle: the first half calibrates, the second half
(held out) evaluates. Per layer:

1. Calibration: the dense model runs over the first half through flashlm, and each
   layer's FFN input h (after ffn_norm) is recorded.
2. Experts: the 1536 neurons are clustered into --experts groups of equal size by
   co-activation: each neuron's vector of |silu(gate h) * up h| over the calibration
   tokens, normalised, goes through balanced k-means (Lloyd iterations, each assignment
   greedy under a size cap).
3. Router: W (n_expert, n_embd) fit by ridge least squares so that W h predicts each
   expert's importance on the token (the norm of its contribution to the FFN output),
   then scaled to a temperature: router logits of std --temperature across experts.
   llama.cpp renormalises the top-k softmax weights to sum 1; with logits this flat each
   weight is about 1/k, and each expert's down matrix is written times k, so the MoE
   computes about the sum of the chosen experts' contributions: the dense FFN
   restricted to the chosen neurons. (Scaling the logits keeps their ranking.) The
   temperature is small, 1e-4 (weights within about 1e-4 of 1/k): on SmolLM2's
   massive-activation tokens the experts' contributions are large and mostly cancel, so
   at 0.02 (weights within 1.6%) even the file with every expert routed loses 22% in
   perplexity, and top 12 of 24 reaches 834 against 141 at 1e-4. float32's exp still
   resolves 1e-4 logits to about 6e-4 of their spread, finer than the noise two
   implementations' FFN inputs differ by.
4. File: every other tensor and all metadata copied; gate/up experts keep the source's
   Q4_1 rows (one row per neuron), down experts are the dense down's columns times k,
   requantized to Q8_0; the router is F32. llama.expert_count / expert_used_count are
   added and feed_forward_length becomes the expert width (llama's MoE reads it so).
   One file per k: --out-dir/smollm2-moe-{E}x{width}-top{k}.gguf. Files whose k would
   overflow llama.cpp's graph get zero attention biases (see needs_padding).

Quality, on the held-out half in segments of --segment tokens (each from an empty
cache): perplexity of the dense model and of the MoE, top-1 agreement of their
next-token argmax, mean KL(dense || MoE); the router's recall (the share of the oracle
top-k experts' importance its own top-k hold) and the relative error of the MoE FFN
output, both on the dense model's held-out FFN inputs, averaged over layers. Parity: each
file (and the source, for scale) through llama.cpp and flashlm on tests/parity_prompts.py,
per-position cosine of the logits and argmax agreement (the project's bar: cosine >=
0.995, argmax >= 98%), beside llama.cpp's flash-attention path against its default path
(its own noise floor, as in tests/runtime/test_parity.py). A routed MoE with small router margins
is chaotic: a near-tie flipped by rounding in one layer changes that layer's output by a
whole expert and the difference grows through the layers, in llama.cpp against itself as
much as against flashlm. Prints a markdown table; writes nothing but the GGUFs.

Found (2 threads, 5 to 7 minutes): SmolLM2's SwiGLU neurons barely cluster (the best k
experts of these clusters lose only a little less of the FFN output than of a random
partition), so quality falls fast with k: top 18 of 24 (75% of the neurons) nearly
doubles the perplexity; every expert routed matches the dense model (ratio 1.00).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFValueType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import flashlm  # noqa: E402
from flashlm import kernels_cpu as K  # noqa: E402
from flashlm.formats import registry  # noqa: E402
from flashlm.formats.modelfile import GGUFModelFile  # noqa: E402
from parity_prompts import PROMPTS  # noqa: E402  (the parity tests' prompts)

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "eval_text.txt"
FFN = ("ffn_gate", "ffn_up", "ffn_down")


# -- calibration ------------------------------------------------------------------------

def split_text(text: str) -> tuple[str, str]:
    """The text cut at the blank line nearest its middle: (calibration, held-out)."""
    mid = len(text) // 2
    cut = min((i for i in range(len(text)) if text.startswith("\n\n", i)), key=lambda i: abs(i - mid))
    return text[:cut + 2], text[cut + 2:]


def record_ffn_inputs(m, segments: list[list[int]]):
    """Run the dense model over each segment (from an empty cache) with each layer's FFN
    input recorded: (per-layer h (T, n_embd) over all segments, the logits per segment)."""
    ffn = m.model.ffn  # each layer's FFN strategy, wrapped to record its input
    seen = [[] for _ in range(m.config.n_layer)]

    def recording(i, f):
        def run(h):
            seen[i].append(h.copy())
            return f(h)
        return run

    saved = list(ffn)
    ffn[:] = [recording(i, f) for i, f in enumerate(saved)]
    try:
        logits = [m.logits(seg) for seg in segments]
    finally:
        ffn[:] = saved
    return [np.concatenate(s) for s in seen], logits


# -- experts and router -------------------------------------------------------------------

def silu(x):
    return x / (1.0 + np.exp(-x))


def balanced_assign(d: np.ndarray, size: int) -> np.ndarray:
    """Labels (n,) for distances d (n, E), at most `size` points per cluster: points in
    order of how much they lose by missing their nearest cluster, each to the nearest
    cluster that still has room."""
    n, E = d.shape
    part = np.sort(d, axis=1)
    order = np.argsort(part[:, 0] - part[:, 1])  # largest regret first
    count = np.zeros(E, dtype=np.int64)
    labels = np.empty(n, dtype=np.int64)
    for p in order:
        e = int(np.argmin(np.where(count < size, d[p], np.inf)))
        labels[p] = e
        count[e] += 1
    return labels


def balanced_kmeans(X: np.ndarray, E: int, iters: int, rng) -> np.ndarray:
    """Labels (n,) of X's rows in E clusters of n/E points each."""
    n = X.shape[0]
    C = X[rng.choice(n, E, replace=False)]
    labels = None
    for _ in range(iters):
        d = (X * X).sum(1)[:, None] - 2 * X @ C.T + (C * C).sum(1)[None, :]
        new = balanced_assign(d, n // E)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        C = np.stack([X[labels == e].mean(0) for e in range(E)])
    return labels


def dense_ffn(mf: GGUFModelFile, i: int):
    """Layer i's gate, up (n_ff, n_embd) and down (n_embd, n_ff), float32."""
    return [K.dequantize(mf.tensors[f"blk.{i}.{n}.weight"]) for n in FFN]


def contributions(h, gate, up, down, groups):
    """Each expert's part of the FFN output: (E, T, n_embd)."""
    act = silu(h @ gate.T) * (h @ up.T)
    return np.stack([act[:, g] @ down[:, g].T for g in groups])


def build_layer(h, gate, up, down, E: int, iters: int, ridge: float, temperature: float, rng):
    """(groups: E sorted index arrays, router (E, n_embd) float32) for one layer."""
    act = np.abs(silu(h @ gate.T) * (h @ up.T))  # (T, n_ff)
    feats = act.T / np.maximum(np.linalg.norm(act.T, axis=1, keepdims=True), 1e-12)
    labels = balanced_kmeans(feats, E, iters, rng)
    groups = [np.flatnonzero(labels == e) for e in range(E)]
    target = np.linalg.norm(contributions(h, gate, up, down, groups), axis=2).T  # (T, E)
    hh = h.astype(np.float64)
    lam = ridge * np.trace(hh.T @ hh) / hh.shape[1]
    W = np.linalg.solve(hh.T @ hh + lam * np.eye(hh.shape[1]), hh.T @ target).T  # (E, n_embd)
    logits = h @ W.T
    spread = (logits - logits.mean(1, keepdims=True)).std()
    return groups, (W * (temperature / spread)).astype(np.float32)


def topk_weights(logits, k):
    """llama.cpp's routing: chosen ids (T, k) and their renormalised softmax weights (the
    softmax over all experts, renormalised over the k, is the softmax over the k)."""
    ids = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    z = np.take_along_axis(logits, ids, axis=1)
    w = np.exp(z - z.max(1, keepdims=True))
    return ids, w / w.sum(1, keepdims=True)


def router_stats(h, router, parts, k):
    """On tokens h: (router recall of the oracle's top-k importance, weight deviation
    mean |k w - 1|, relative error of the MoE output against the dense FFN)."""
    imp = np.linalg.norm(parts, axis=2).T  # (T, E)
    ids, w = topk_weights(h @ router.T, k)
    best = -np.sort(-imp, axis=1)[:, :k].sum(1)
    recall = np.take_along_axis(imp, ids, axis=1).sum(1) / np.maximum(best, 1e-12)
    moe = (k * w.T[:, :, None] * parts[ids.T, np.arange(h.shape[0])[None, :]]).sum(0)
    dense = parts.sum(0)
    err = np.linalg.norm(moe - dense, axis=1) / np.maximum(np.linalg.norm(dense, axis=1), 1e-12)
    return recall.mean(), np.abs(k * w - 1).mean(), err.mean()


# -- the GGUF -------------------------------------------------------------------------------

def needs_padding(n_tensors: int, n_layer: int, k: int) -> bool:
    """Whether llama.cpp would run out of graph nodes. It sizes a model's graph at 8 nodes
    per tensor in the file (graph_max_nodes); the MoE's weighted sum of k experts takes
    about 2 nodes per expert per layer, so at large k (18 of 24 here) the graph outgrows
    that and llama.cpp aborts ("not enough space in the context's memory pool"). Such files
    get zero q/k/v/o biases (optional llama tensors: 4 more per layer, 1 more node each),
    which changes nothing computed."""
    return n_layer * (45 + 2 * k) > 0.9 * 8 * n_tensors


def write_moe(mf: GGUFModelFile, out: Path, layers, E: int, k: int) -> Path:
    """The MoE file: layers[i] = (groups, router, down float32 (n_embd, n_ff))."""
    width, n_layer = len(layers[0][0][0]), len(layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), "llama")
    for name, field in mf.reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        if vtype == GGUFValueType.ARRAY:
            a = mf.array(name)
            w.add_key_value(name, a if isinstance(a, list) else a.tolist(), vtype, sub_type=field.types[-1])
            continue
        val = field.contents()
        if name == "llama.feed_forward_length":
            val = width
        elif name == "general.name":
            val = f"{val} MoEfied {E}x{width} top{k}"
        w.add_key_value(name, val, vtype)
    w.add_expert_count(E)
    w.add_expert_used_count(k)
    pad = needs_padding(len(mf.tensors) + n_layer, n_layer, k)
    for name, t in mf.tensors.items():
        i, part = (int(name.split(".")[1]), name.split(".")[2]) if name.startswith("blk.") else (None, None)
        if part in FFN:  # the layer's MoE tensors go where its ffn_gate was
            if part != "ffn_gate":
                continue
            groups, router, down = layers[i]
            idx = np.stack(groups)  # (E, width)
            p = f"blk.{i}."
            w.add_tensor(p + "ffn_gate_inp.weight", router)
            for n in ("ffn_gate", "ffn_up"):
                src = mf.tensors[f"{p}{n}.weight"]
                w.add_tensor(f"{p}{n}_exps.weight", src.data[idx], raw_dtype=src.qtype)
            cols = np.stack([down[:, g] for g in groups]) * np.float32(k)  # (E, n_embd, width)
            w.add_tensor(p + "ffn_down_exps.weight", gguf.quants.quantize(cols, Q.Q8_0), raw_dtype=Q.Q8_0)
            for n in ("attn_q", "attn_k", "attn_v", "attn_output") if pad else ():
                w.add_tensor(f"{p}{n}.bias", np.zeros(mf.tensors[f"{p}{n}.weight"].shape[0], dtype=np.float32))
        elif t.qtype == Q.F32:
            w.add_tensor(name, t.data.view(np.float32).reshape(t.shape))
        else:
            w.add_tensor(name, t.data, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# -- quality --------------------------------------------------------------------------------

def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def quality(dense_logits, moe_logits, segments):
    """(dense ppl, MoE ppl, top-1 agreement, mean KL(dense || MoE)) over the segments."""
    nll_d, nll_m, agree, kl, n = 0.0, 0.0, 0, 0.0, 0
    for ld, lm, seg in zip(dense_logits, moe_logits, segments):
        pd, pm = log_softmax(ld[:-1].astype(np.float64)), log_softmax(lm[:-1].astype(np.float64))
        nxt = np.asarray(seg[1:])
        rows = np.arange(len(nxt))
        nll_d -= pd[rows, nxt].sum()
        nll_m -= pm[rows, nxt].sum()
        agree += int((pd.argmax(1) == pm.argmax(1)).sum())
        kl += float((np.exp(pd) * (pd - pm)).sum())
        n += len(nxt)
    return np.exp(nll_d / n), np.exp(nll_m / n), agree / n, kl / n


def parity(path: Path, prompts: list[list[int]]):
    """flashlm against llama.cpp on each prompt, and llama.cpp's flash-attention path against
    its default path (its own noise floor, as tests/runtime/test_parity.py measures it): for each,
    per-position cosines of the logits and argmax agreement."""
    import llama_cpp

    def llama_cpp_logits(**kw):
        llm = llama_cpp.Llama(str(path), n_ctx=512, logits_all=True, verbose=False, n_threads=2, **kw)
        out = []
        for toks in prompts:
            llm.reset()
            llm.eval(toks)
            out.append(np.array(llm.scores[:len(toks)], dtype=np.float32))
        llm.close()
        return np.concatenate(out)

    ref, ref_fa = llama_cpp_logits(), llama_cpp_logits(flash_attn=True)
    with flashlm.load(path, n_ctx=512, n_threads=2) as m:
        ours = np.concatenate([m.logits(toks) for toks in prompts])

    def agreement(a, b):
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        return dict(cos_min=cos.min(), cos_med=np.median(cos), cos_ok=(cos >= 0.995).mean(),
                    argmax=(a.argmax(1) == b.argmax(1)).mean())

    return agreement(ours, ref), agreement(ref_fa, ref)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=24, help="experts per layer (default 24)")
    ap.add_argument("--top-k", default="6,12,18,24", help="experts used per token, comma list (default 6,12,18,24)")
    ap.add_argument("--calib-tokens", type=int, default=1536, help="calibration tokens (default 1536)")
    ap.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens evaluated, at most (default 2048)")
    ap.add_argument("--segment", type=int, default=512, help="tokens per evaluated segment (default 512)")
    ap.add_argument("--temperature", type=float, default=1e-4,
                    help="std of the router logits across experts (default 1e-4)")
    ap.add_argument("--ridge", type=float, default=0.01, help="router ridge penalty, relative (default 0.01)")
    ap.add_argument("--iters", type=int, default=20, help="k-means iterations (default 20)")
    ap.add_argument("--out-dir", type=Path, default=registry.home() / "moe",
                    help=f"where the GGUFs go (default {registry.home() / 'moe'})")
    ap.add_argument("--no-parity", action="store_true", help="skip the llama.cpp parity check")
    args = ap.parse_args(argv)
    ks = [int(k) for k in args.top_k.split(",")]
    t0 = time.time()
    rng = np.random.default_rng(0)

    src = registry.pull("smollm2-135m", quiet=True)
    mf = GGUFModelFile(src)
    n_ff, n_layer = int(mf.metadata["llama.feed_forward_length"]), int(mf.metadata["llama.block_count"])
    E = args.experts
    width = n_ff // E
    if n_ff % E or width % 32:
        sys.exit(f"{n_ff} neurons do not split into {E} experts of a multiple of 32 (Q8_0 blocks)")
    if not all(0 < k <= E for k in ks):
        sys.exit(f"--top-k values must be in 1..{E}")

    calib_text, eval_text = split_text(TEXT.read_text())
    dense = flashlm.load(src, n_ctx=max(2048, args.calib_tokens), n_threads=2)
    calib = dense.tokenize(calib_text)[:args.calib_tokens]
    held = dense.tokenize(eval_text)[:args.eval_tokens]
    segments = [held[s:s + args.segment] for s in range(0, len(held), args.segment)]
    segments = [s for s in segments if len(s) > 1]
    prompts = [dense.tokenize(p) for p in PROMPTS]
    print(f"calibration: {len(calib)} tokens of the first half of {TEXT.name}; evaluation: {len(held)} tokens of"
          f" the second half, in {len(segments)} segments", file=sys.stderr)
    h_cal, _ = record_ffn_inputs(dense, [calib])
    h_ev, dense_logits = record_ffn_inputs(dense, segments)
    dense.close()
    print(f"  dense passes: {time.time() - t0:.0f} s", file=sys.stderr)

    layers, stats = [], {k: [] for k in ks}
    for i in range(n_layer):
        gate, up, down = dense_ffn(mf, i)
        groups, router = build_layer(h_cal[i], gate, up, down, E, args.iters, args.ridge, args.temperature, rng)
        layers.append((groups, router, down))
        parts = contributions(h_ev[i], gate, up, down, groups)
        for k in ks:
            stats[k].append(router_stats(h_ev[i], router, parts, k))
        print(f"\r  layer {i + 1}/{n_layer} clustered, router fit", end="", file=sys.stderr, flush=True)
    print(f"\n  experts and routers: {time.time() - t0:.0f} s", file=sys.stderr)

    rows, paths = [], []
    if not args.no_parity:  # the source's own parity, for scale
        rows.append(dict(name="dense (source)", share=1.0, ppl_d=None, parity=parity(src, prompts)))
    for k in ks:
        out = write_moe(mf, args.out_dir / f"smollm2-moe-{E}x{width}-top{k}.gguf", layers, E, k)
        paths.append(out)
        with flashlm.load(out, n_ctx=max(512, args.segment), n_threads=2) as moe:
            moe_logits = [moe.logits(seg) for seg in segments]
        ppl_d, ppl_m, agree, kl = quality(dense_logits, moe_logits, segments)
        recall, dev, err = np.mean(stats[k], axis=0)
        row = dict(name=f"top {k} of {E}", share=k / E, ppl_d=ppl_d, ppl_m=ppl_m, agree=agree, kl=kl,
                   recall=recall, dev=dev, err=err)
        print(f"  top-{k}: ppl {ppl_d:.2f} -> {ppl_m:.2f}, top-1 agree {agree:.1%}, KL {kl:.3f}, router recall"
              f" {recall:.3f}, FFN rel. err {err:.3f}", file=sys.stderr)
        if not args.no_parity:
            row["parity"] = parity(out, prompts)
        rows.append(row)
        print(f"  top-{k}: {out} ({out.stat().st_size / 2**20:.1f} MiB), {time.time() - t0:.0f} s", file=sys.stderr)

    print(f"\nMoEfied {src.name}: {n_layer} layers, {E} experts of {width} neurons; router temperature"
          f" {args.temperature}; calibrated on {len(calib)} tokens (first half of {TEXT.name}); quality on"
          f" {len(held)} held-out tokens (second half) in {len(segments)} segments of <= {args.segment}.\n")
    print("| model | neurons used | ppl dense | ppl MoE | ratio | top-1 agree | KL | router recall | FFN err"
          " | k·w−1 | cos min | cos median | cos ≥ 0.995 | argmax agree | FA: cos ≥ 0.995 | FA: argmax |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        q = ("- | " * 8 if r["ppl_d"] is None else
             f"{r['ppl_d']:.2f} | {r['ppl_m']:.2f} | {r['ppl_m'] / r['ppl_d']:.3f} | {r['agree']:.1%} | {r['kl']:.3f}"
             f" | {r['recall']:.3f} | {r['err']:.3f} | {r['dev']:.1e} | ")
        if "parity" in r:
            ours, fa = r["parity"]
            par = (f"{ours['cos_min']:.4f} | {ours['cos_med']:.5f} | {ours['cos_ok']:.1%} | {ours['argmax']:.1%}"
                   f" | {fa['cos_ok']:.1%} | {fa['argmax']:.1%}")
        else:
            par = "- | - | - | - | - | -"
        print(f"| {r['name']} | {r['share']:.0%} | {q}{par} |")
    print(f"\nQuality on held-out text, through flashlm. router recall: the share of the best k experts' importance"
          f" the router's k hold; FFN err: relative error of the MoE FFN output against the dense FFN (float, on the"
          f" dense model's held-out FFN inputs); k·w−1: mean |k·w − 1| of the routing weights (0: the chosen"
          f" experts summed); all three averaged over layers. Parity: flashlm vs llama.cpp on the same file,"
          f" {sum(len(p) for p in prompts)} positions over {len(prompts)} prompts (tests/parity_prompts.py); FA:"
          f" llama.cpp's flash-attention path vs its default path, its own noise floor.")
    print("files: " + ", ".join(str(p) for p in paths))
    print(f"time: {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
