"""Quality of the sparsity predictors: what keeping a fraction of FFN neurons does to a
model, against the same flash-layout model with every neuron (dense).

    python benchmarks/flash_quality.py [-m smollm2-135m] [--tokens 512] [--configs gate:0.5,lowrank:0.7]

Teacher-forced over tests/data/eval_text.txt (cut into segments of --segment tokens
spread over the text, each run from an empty cache), token by token through the
decode path, where the predictors act. For each configuration: perplexity, top-1
agreement and mean KL(dense || sparse) of the next-token distributions, the
predictor's recall of the neurons that matter (the top `keep` fraction by
|act(gate) * up| * |down row|), and its cost (resident bytes; ms per token).
Records are taken from the mapped file (no disk reads): quality only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flashlm  # noqa: E402
from flashlm import kernels_cpu as K  # noqa: E402
from flashlm.runtime import convert  # noqa: E402
from flashlm.flashload.layout import split_records  # noqa: E402
from flashlm.flashload.predictor import act, top_fraction  # noqa: E402
from flashlm.runtime.blocks import KVCache  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "eval_text.txt"
DEFAULT_CONFIGS = "gate:0.3,gate:0.5,gate:0.7,gate:0.85,lowrank:0.5,lowrank:0.7,lowrank:0.85"


class RecallMeter:
    """Wraps a store's predictor: per layer and token, the share of the neurons that
    matter (top keep by |act(g) * u| * |down row|) that the predictor chose."""

    def __init__(self, store, gelu):
        self.store, self.gelu, self.hits, self.total, self.oracle_s = store, gelu, 0, 0, 0.0
        self.inner = store.predictor
        self.layers = []  # per layer: gate and up rows (contiguous, made once), |down row|
        for lb, rec in zip(store.plans, store._records):
            gate, up, down = (layout_ref(lb, np.ascontiguousarray(a), k)
                              for k, a in enumerate(split_records(lb, rec.data)))
            self.layers.append((gate, up, np.linalg.norm(K.dequantize(down), axis=1)))
        self.nbytes = self.inner.nbytes
        self.reads_gate = self.inner.reads_gate
        store.predictor = self

    def select(self, i, x, keep, gelu):
        idx, g = self.inner.select(i, x, keep, gelu)
        t0 = time.perf_counter()
        gate, up, down_norm = self.layers[i]
        contrib = np.abs(act(K.matvec(x, gate), gelu) * K.matvec(x, up)) * down_norm
        oracle = top_fraction(contrib, keep)
        self.hits += np.intersect1d(oracle, idx, assume_unique=True).size
        self.total += oracle.size
        self.oracle_s += time.perf_counter() - t0  # not the predictor's cost: taken out of ms/token
        return idx, g


def layout_ref(lb, data, part):
    from flashlm.formats.modelfile import TensorRef

    return TensorRef("x", lb.types[part], (lb.n_ff, lb.n_embd), data, -1)


def log_softmax(z):
    z = z.astype(np.float64)
    m = z.max()
    return z - m - np.log(np.exp(z - m).sum())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=512, help="tokens scored in all (default 512)")
    ap.add_argument("--segment", type=int, default=128, help="tokens per segment (default 128)")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"predictor:keep,... (default {DEFAULT_CONFIGS})")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args(argv)
    path = convert.cached(args.model)
    configs = [(None, 1.0)] + [(p, float(k)) for p, k in (c.split(":") for c in args.configs.split(","))]
    models, meters = [], []
    for pred, keep in configs:
        m = flashlm.load(path, n_ctx=args.segment + 8, n_threads=args.threads,
                          streaming=dict(predictor=pred, keep=keep, window=0))
        m.store.resident = True
        models.append(m)
        meters.append(RecallMeter(m.store, m.model.activation == "gelu") if pred else None)
    ids = models[0].tokenize(TEXT.read_text(), add_special=False)
    n_seg = max(1, args.tokens // args.segment)
    starts = np.linspace(0, len(ids) - args.segment - 1, n_seg).astype(int)
    nll = np.zeros(len(configs))
    agree = np.zeros(len(configs))
    kl = np.zeros(len(configs))
    secs = np.zeros(len(configs))
    n = 0
    for s in starts:
        seg = [models[0].tokenizer.bos_id] + ids[s:s + args.segment] if models[0].tokenizer.add_bos else ids[s:s + args.segment + 1]
        kvs = [KVCache(m.config, len(seg)) for m in models]
        for pos in range(len(seg) - 1):
            lps = []
            for c, (m, kv) in enumerate(zip(models, kvs)):
                t0 = time.perf_counter()
                logits = m._forward(np.array([seg[pos]]), pos, kv)[0]
                secs[c] += time.perf_counter() - t0
                lps.append(log_softmax(logits))
            nxt = seg[pos + 1]
            for c, lp in enumerate(lps):
                nll[c] -= lp[nxt]
                agree[c] += lp.argmax() == lps[0].argmax()
                kl[c] += float((np.exp(lps[0]) * (lps[0] - lp)).sum())
            n += 1
        print(f"  segment at token {s}: {n} tokens scored", file=sys.stderr, flush=True)
    ppl0 = np.exp(nll[0] / n)
    print(f"\n{models[0].name} ({path.name}), {n} tokens of tests/data/eval_text.txt in {n_seg} segments, "
          f"{args.threads} threads\n")
    print("| predictor | keep | perplexity | vs dense | top-1 agreement | KL (nats) | recall | predictor MiB | ms/token |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c, (pred, keep) in enumerate(configs):
        if meters[c]:
            secs[c] -= meters[c].oracle_s
        ppl = np.exp(nll[c] / n)
        rec = f"{meters[c].hits / meters[c].total:.3f}" if meters[c] else "-"
        mib = f"{models[c].store.predictor_bytes / 2**20:.1f}" if pred else "-"
        print(f"| {pred or 'dense'} | {keep:.2f} | {ppl:.3f} | {100 * (ppl / ppl0 - 1):+.1f}% | {agree[c] / n:.3f} | "
              f"{kl[c] / n:.4f} | {rec} | {mib} | {1e3 * secs[c] / n:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
