"""Batched decoding: aggregate tokens/s with 1, 2, 4 and 8 sequences decoded together,
flashlm beside llama.cpp's batched llama_decode (what llama-server runs with -np N), in
the same run, on SmolLM2; flashlm resident and with its FFN streamed from the flash
layout under a memory budget.

Two figures for flashlm:
- step: the batched decode step alone (Model._forward_batch, greedy, no end of
  generation), as llama.cpp's figure is measured: N sequences after a short prompt each,
  N tokens a step;
- engine: Model.batch()'s generate over N prompts, end to end (prefill, sampling, text),
  tokens generated over the wall time.
Streamed runs read with direct I/O; their disk reads are /proc/self/io's read_bytes.
llama_cpp.server (llama-cpp-python's OpenAI server) decodes one request at a time, so
its aggregate at any N is its single-sequence rate: the llama.cpp column is the C++
batched decode instead. Each engine runs in its own process; medians of --reps.

    python benchmarks/bench_serve.py [--reps 3] [-n 64] [--parallel 1 2 4 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench_load import cpu_flags

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,", "def fib(n):",
           "The three primary colors are", "List the planets of the solar system:", "Water boils at",
           "The best way to learn a language is", "import numpy as np\n"]

FLASHLM = r"""
import json, statistics, sys, time
import numpy as np
import flashlm
from flashlm.io import device_read_bytes
from flashlm.runtime import convert
from flashlm.formats import registry
mode, n, reps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
parallel = [int(p) for p in sys.argv[5].split(",")]
prompts = json.loads(sys.argv[6])
src = registry.pull("smollm2-135m", quiet=True)
path, budget = (src, None) if mode == "resident" else (convert.cached(src), "125MiB")
kw = dict(n_ctx=256, n_threads=threads)
out = {}
for N in parallel:
    if budget is not None:  # the single sequence's budget, plus N - 1 more KV caches
        with flashlm.load(path, **kw, memory_budget=budget) as m:
            b = m.plan.budget + (N - 1) * m.plan.kv
    with flashlm.load(path, **kw, memory_budget=None if budget is None else b, parallel=N) as m:
        step, engine, read = [], [], []
        for r in range(reps):
            with m.batch() as e:
                slots = list(range(N))
                ctxs = [e.slots[i] for i in slots]
                toks = []
                for c, p in zip(ctxs, prompts):
                    logits, _ = m._prefill(c, m.tokenize(p))
                    toks.append(int(np.argmax(logits)))
                r0, t0 = device_read_bytes(), time.perf_counter()
                for _ in range(n):
                    logits, _ = m._forward_batch(ctxs, toks, e.pool, slots)
                    toks = [int(np.argmax(row)) for row in logits]
                dt = time.perf_counter() - t0
                step.append(N * n / dt)
                read.append((device_read_bytes() - r0) / (N * n))
            with m.batch() as e:
                t0 = time.perf_counter()
                jobs = [e.submit(p, max_tokens=n, temperature=0) for p in prompts[:N]]
                for j in jobs:
                    j.text()
                engine.append(sum(len(j.generated) for j in jobs) / (time.perf_counter() - t0))
        out[N] = dict(step=statistics.median(step), engine=statistics.median(engine),
                      read_per_token=statistics.median(read))
print(json.dumps(out))
"""

LLAMA = r"""
import ctypes, json, statistics, sys, time
import numpy as np
import llama_cpp
n, reps, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
parallel = [int(p) for p in sys.argv[4].split(",")]
prompts, path = json.loads(sys.argv[5]), sys.argv[6]
llama_cpp.llama_backend_init()
model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
vocab = llama_cpp.llama_model_get_vocab(model)
n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

def tokenize(text):
    buf = (llama_cpp.llama_token * 512)()
    k = llama_cpp.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 512, True, False)
    return list(buf[:k])

out = {}
for N in parallel:
    rates = []
    for r in range(reps):
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_seq_max = 256 * N, 512, N
        cp.n_threads = cp.n_threads_batch = threads
        ctx = llama_cpp.llama_init_from_model(model, cp)
        batch = llama_cpp.llama_batch_init(512, 0, N)

        def run(items):  # [(token, pos, seq)]: decode, logits of each
            batch.n_tokens = len(items)
            for i, (t, p, s) in enumerate(items):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, p, 1
                batch.seq_id[i][0], batch.logits[i] = s, 1
            assert llama_cpp.llama_decode(ctx, batch) == 0
            return [int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), (n_vocab,))))
                    for i in range(len(items))]

        toks, pos = [], []
        for s, p in enumerate(prompts[:N]):
            ids = tokenize(p)
            toks.append(run([(t, i, s) for i, t in enumerate(ids)])[-1])
            pos.append(len(ids))
        t0 = time.perf_counter()
        for k in range(n):
            toks = run([(t, pos[s] + k, s) for s, t in enumerate(toks)])
        rates.append(N * n / (time.perf_counter() - t0))
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    out[N] = statistics.median(rates)
print(json.dumps(out))
"""


def child(code: str, *args) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"bench_serve: a child failed:\n{r.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-n", type=int, default=64, help="decode steps per run (default 64)")
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if max(args.parallel) > len(PROMPTS):
        sys.exit(f"bench_serve: at most {len(PROMPTS)} sequences")
    from flashlm.formats import registry

    path = registry.pull("smollm2-135m", quiet=True)
    par = ",".join(map(str, args.parallel))
    prompts = json.dumps(PROMPTS)
    print(f"CPU flags: {cpu_flags()}; {args.threads} threads; SmolLM2-135M Q4_1; {args.n} steps, median of {args.reps}")
    llama = child(LLAMA, args.n, args.reps, args.threads, par, prompts, path)
    res = {mode: child(FLASHLM, mode, args.n, args.reps, args.threads, par, prompts)
           for mode in ("resident", "streamed")}
    print(f"{'N':>3} | {'llama.cpp':>9} | {'resident step':>13} {'engine':>7} {'vs N=1':>6} | "
          f"{'streamed step':>13} {'engine':>7} {'vs N=1':>6} {'MB read/tok':>11}")
    r1, s1 = res["resident"][args.parallel[0]]["step"], res["streamed"][args.parallel[0]]["step"]
    for N in args.parallel:
        r, s = res["resident"][N], res["streamed"][N]
        print(f"{N:>3} | {llama[N]:>9.1f} | {r['step']:>13.1f} {r['engine']:>7.1f} {r['step'] / r1:>5.2f}x | "
              f"{s['step']:>13.1f} {s['engine']:>7.1f} {s['step'] / s1:>5.2f}x {s['read_per_token'] / 1e6:>11.2f}")
    print("tok/s, all sequences together. step: the batched decode step alone (as llama.cpp's); engine: "
          "Model.batch() end to end (prefill, sampling, text; stops at end of generation).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
