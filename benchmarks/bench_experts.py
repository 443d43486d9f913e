"""The expert-cache benchmark: decode a mixture-of-experts model whose experts stream from
disk into a cache of 25%, 50% and 75% of them, against all experts resident, no cache,
each policy, and each with prefetch, and the default (freq, prefetch "auto": on or off as
measured while decoding); llama.cpp's tok/s on the same GGUF beside.

    python benchmarks/bench_experts.py [-m MOE.gguf] [--fractions 0.25,0.5,0.75] [-n 256] [--repeat 3]

Default model: the synthetic MoE (make_synthetic.py --moe; written if missing), random
weights and a random router, so tokens spread over experts about uniformly: a worst case
for any cache. Decoding is fed the tokens of tests/data/eval_text.txt (teacher forcing).
Each row runs in a fresh process (its memory plan measured as a user's run would be),
once per round, for --repeat rounds; the run with the median tok/s is shown, with the range over runs. Expert misses and
prefetches are native asynchronous direct reads into the cache's slots (experts/store.py). Columns per decoded token (the first
--skip dropped): tok/s (median over tokens), cache hit rate, MB read, ms the decode
waited for expert reads, prefetch precision and recall, and I/O hidden: the share of
the wait that prefetch removed, 1 - wait(policy + prefetch) / wait(policy alone). The
ratios to all resident and to no cache are each round's run over the same round's
resident (no-cache) run, the median over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "eval_text.txt"
N_CTX = 512
from flashlm.cache import POLICIES  # noqa: E402

ROW = """
import json, sys, time, statistics
import numpy as np
import flashlm
path, budget, opts, n, skip = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if budget < 0:  # -N: a budget for N cache slots, from this process's own plan (its tokenizer measured once)
    with flashlm.load(path, n_ctx=512, memory_budget=1 << 45) as m0:
        budget = m0.plan.fixed + -budget * m0.plan.expert_bytes
m = flashlm.load(path, n_ctx=512, n_threads=2, memory_budget=budget or None, experts=opts or None)
tokens = m.tokenize(open(sys.argv[6]).read())
m._prefill(tokens[:8])
ex = m.experts
take = getattr(ex, "take_stats", lambda: {})
times, stats = [], []
for pos, tok in enumerate(tokens[8:8 + n], start=8):
    t0 = time.perf_counter()
    m._forward(np.array([tok]), pos, m._ctx.kv)
    times.append(time.perf_counter() - t0)
    stats.append(take())
times, stats = times[skip:], stats[skip:]
out = dict(tok_s=1 / statistics.median(times), slots=m.plan.n_slots if m.plan else None)
if stats and stats[0]:
    hits, misses = sum(s["hits"] for s in stats), sum(s["misses"] for s in stats)
    wait = sum(s["wait_s"] for s in stats)
    pred = [s["precision"] for s in stats if s["precision"] is not None]
    rec = [s["recall"] for s in stats if s["recall"] is not None]
    out.update(hit=hits / max(1, hits + misses), mb=statistics.mean(s["bytes_read"] for s in stats) / 1e6,
               precision=statistics.mean(pred) if pred else None, recall=statistics.mean(rec) if rec else None,
               wait_ms=wait / len(stats) * 1e3, prefetch=stats[-1]["prefetch"])
print("ROW " + json.dumps(out))
"""

LLAMA = """
import sys, time, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False)
toks = llm.tokenize(open(sys.argv[3]).read().encode())[:8 + int(sys.argv[2])]
llm.eval(toks[:8])
times = []
for t in toks[8:]:
    t0 = time.perf_counter(); llm.eval([t]); times.append(time.perf_counter() - t0)
times.sort()
print("ROW", 1 / times[len(times) // 2])
"""


def _row(path, budget: int, opts: dict, n: int, skip: int) -> dict:
    r = subprocess.run([sys.executable, "-c", ROW, str(path), str(budget), json.dumps(opts), str(n), str(skip),
                        str(TEXT)], capture_output=True, text=True)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("ROW ")]
    if r.returncode or not line:
        raise SystemExit(f"row failed: {r.stderr.strip().splitlines()[-3:]}")
    return json.loads(line[0][4:])


def llama_cpp_tok_s(path, n: int) -> float:
    r = subprocess.run([sys.executable, "-c", LLAMA, str(path), str(n), str(TEXT)], capture_output=True, text=True)
    return float([ln for ln in r.stdout.splitlines() if ln.startswith("ROW ")][0].split()[1])


def plan_of(path) -> tuple[int, int, int]:
    """(fixed bytes, expert bytes, experts) of the model's plan with prefetch, in a fresh process."""
    code = ("import sys, flashlm; m = flashlm.load(sys.argv[1], n_ctx=512, memory_budget=1 << 45); "
            "p = m.plan; print('ROW', p.fixed, p.expert_bytes, p.n_experts)")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return tuple(int(v) for v in [ln for ln in r.stdout.splitlines() if ln.startswith("ROW")][0].split()[1:])


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default=None, help="a MoE GGUF (default: the synthetic MoE)")
    ap.add_argument("--fractions", default="0.25,0.5,0.75", help="cache sizes as shares of all experts")
    ap.add_argument("-n", "--n-gen", type=int, default=256)
    ap.add_argument("--skip", type=int, default=32, help="first decoded tokens left out (cache warm-up)")
    ap.add_argument("--repeat", type=int, default=3, help="fresh processes per row; the median is shown")
    ap.add_argument("--honesty", action="store_true",
                    help="instead: peak RSS of a streamed run at half the experts against budget + an idle process")
    args = ap.parse_args(argv)
    if args.model:
        path = Path(args.model)
    else:
        from make_synthetic import default_moe_path, write_moe

        path = default_moe_path()
        if not path.exists():
            write_moe(path)
    fixed, expert, total = plan_of(path)
    if args.honesty:
        return honesty(path, fixed + total // 2 * expert, args.n_gen)
    import flashlm

    with flashlm.load(path, n_ctx=N_CTX) as m:
        k = m.config.n_expert_used
    print(f"\n{path.name}: {total} experts of {expert / 2**20:.2f} MiB, {k} routed per token and layer; "
          f"fixed part {fixed / 2**20:.0f} MiB; 2 threads, {args.n_gen} tokens (first {args.skip} skipped)\n")
    print(f"llama.cpp (mmap, page cache) on the same file: {llama_cpp_tok_s(path, args.n_gen):.2f} tok/s")
    n, skip = args.n_gen, args.skip
    fractions = [float(x) for x in args.fractions.split(",")]
    configs = [("resident", 0, {}), ("nocache", -k, dict(policy="lru", prefetch=False))]
    configs += [((f, p, pf), -int(f * total), dict(policy=p, prefetch=pf))
                for f in fractions for pf in (False, True) for p in POLICIES]
    configs += [((f, "default"), -int(f * total), {}) for f in fractions]  # freq, prefetch auto
    # every row once per round, --repeat rounds: each row's runs sample the same stretches
    # of this (noisy, shared) machine's time; the run with the median tok/s is shown
    runs = {name: [] for name, _, _ in configs}
    for i in range(args.repeat):
        print(f"  round {i + 1}/{args.repeat}: {len(configs)} rows", file=sys.stderr, flush=True)
        for name, budget, opts in configs:
            runs[name].append(_row(path, budget, opts, n, skip))
    med = {name: sorted(rs, key=lambda r: r["tok_s"])[len(rs) // 2] for name, rs in runs.items()}
    for name, rs in runs.items():  # the range beside the median
        med[name]["range"] = (min(r["tok_s"] for r in rs), max(r["tok_s"] for r in rs))
    # the ratios: each round's run over the same round's resident (or no-cache) run, the
    # median over rounds (the machine's speed drifts between rounds more than within one)
    for name, rs in runs.items():
        for key, ref in (("x_res", "resident"), ("x_nc", "nocache")):
            med[name][key] = statistics.median(r["tok_s"] / b["tok_s"] for r, b in zip(rs, runs[ref]))
    resident, nocache = med["resident"], med["nocache"]
    print(f"all experts resident (flashlm): {resident['tok_s']:.2f} tok/s (runs {_range(resident)})\n")
    print("| experts cached | configuration | tok/s (range) | / resident (per round) | hit rate | MB read/token | read wait ms/token | "
          "prefetch precision | prefetch recall | I/O hidden |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    _print("k slots", "no cache (every routed expert read)", nocache)
    for f in fractions:
        alone = {p: med[(f, p, False)] for p in POLICIES}
        for p in POLICIES:
            _print(f"{f:.0%}", p, alone[p])
        best = max(POLICIES, key=lambda p: alone[p]["hit"])
        for p in POLICIES:
            r = med[(f, p, True)]
            r["hidden"] = 1 - r["wait_ms"] / alone[p]["wait_ms"] if alone[p]["wait_ms"] else None
            _print(f"{f:.0%}", f"{p} + prefetch" + (" (best policy)" if p == best else ""), r)
        r = med[(f, "default")]
        _print(f"{f:.0%}", f"the default: freq, prefetch {r['prefetch']}; the tokens it measured on and off "
               "counted", r)
        for name, r in (("best + prefetch", med[(f, best, True)]), ("the default", r)):
            print(f"|  | {name}: {r['x_res']:.2f}x resident, {r['x_nc']:.2f}x no cache |  |  |  |  |  |  |  |  |",
                  flush=True)
    return 0


HONESTY = """
import resource, sys, numpy as np, psutil, flashlm
from flashlm.apps.profile import idle_rss
idle = idle_rss(psutil.Process())
m = flashlm.load(sys.argv[1], n_ctx=512, n_threads=2, memory_budget=int(sys.argv[2]))  # the default policy and prefetch
toks = m.tokenize(open(sys.argv[4]).read())[:8 + int(sys.argv[3])]
m._prefill(toks[:8])
for pos, t in enumerate(toks[8:], start=8):
    m._forward(np.array([t]), pos, m._ctx.kv)
print("ROW", idle, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def honesty(path, budget: int, n: int) -> int:
    r = subprocess.run([sys.executable, "-c", HONESTY, str(path), str(budget), str(n), str(TEXT)],
                       capture_output=True, text=True, check=True)
    idle, peak = (int(v) for v in [ln for ln in r.stdout.splitlines() if ln.startswith("ROW")][0].split()[1:])
    mib = 2 ** 20
    print(f"budget {budget / mib:.1f} MiB (half the experts), idle process {idle / mib:.1f} MiB, "
          f"peak RSS {peak / mib:.1f} MiB: {'within' if peak <= budget + idle else 'ABOVE'} budget + idle "
          f"({(budget + idle) / mib:.1f} MiB)")
    return 0


def _range(r) -> str:
    lo, hi = r["range"]
    return f"{lo:.1f}-{hi:.1f}"


def _print(cached, name, r):
    print(f"| {cached} | {name} | {r['tok_s']:.2f} ({_range(r)}) | {r['x_res']:.2f} | {fmt(r.get('hit'), '.0%')} | "
          f"{fmt(r.get('mb'), '.1f')} | {fmt(r.get('wait_ms'), '.1f')} | {fmt(r.get('precision'), '.0%')} | {fmt(r.get('recall'), '.0%')} | "
          f"{fmt(r.get('hidden'), '.0%')} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
