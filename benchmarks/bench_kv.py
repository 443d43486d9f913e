"""The quantized KV cache: quality, memory and decode speed at depth for each cache type
(f16, q8_0, q4_0), flashlm beside llama.cpp (llama-cpp-python) on the same GGUF.

    python benchmarks/bench_kv.py [-m smollm2-135m] [-m gemma3-270m] [--depths 0,1024,4096]
                                  [--tokens 32] [--reps 3] [-t 2] [--types f16,q8_0,q4_0]
                                  [--no-ppl] [--no-speed] [--no-llama-ppl]

- perplexity over tests/data/eval_text.txt (flash_quality.py's text) in segments of
  --segment tokens (default 512, each from an empty cache, every position scored), for
  each cache type, and the change against f16; llama.cpp's on the same tokens;
- KV cache bytes at n_ctx 4096 (flashlm's arrays; llama.cpp's blocks are the same);
- decode tok/s at each depth: the context is prefilled to the deepest depth once (fixed
  pseudo-random token ids, as `flashlm bench`), then for each depth cut back to it and
  --tokens tokens decoded; the median of --reps, engines interleaved within each
  repetition so that machine noise hits all alike; --threads threads for both.

llama.cpp runs a quantized cache with flash attention (it needs it for a quantized V
cache) and rotates it as its default does (attn_rot; flashlm rotates the same way, see
kernels_cpu/attention.py); its f16 cache is shown in its default path (no flash
attention) and with flash attention. The CPU's SIMD flags are printed beside the figures:
the speeds depend on them. Set FLASHLM_KV_ROTATE=0 and LLAMA_ATTN_ROT_DISABLE=1 to
measure both without the rotation.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flashlm  # noqa: E402
from flashlm.apps.bench import _tokens, llama_cache_types  # noqa: E402
from flashlm.formats.registry import resolve  # noqa: E402
from flashlm.runtime.tokenizer import quiet_stderr  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "eval_text.txt"
MAX_CTX = 4096


def cpu_flags() -> str:
    """The SIMD flags of /proc/cpuinfo that decide the kernels' speed."""
    try:
        flags = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown (no /proc/cpuinfo)"
    want = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "f16c")
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in want)


def segments(ids: list[int], seg: int, bos: int | None) -> list[list[int]]:
    step = seg - (1 if bos is not None else 0)
    return [([bos] if bos is not None else []) + ids[s:s + step] for s in range(0, len(ids) - step + 1, step)]


def nll(logits: np.ndarray, toks: list[int]) -> tuple[float, int]:
    """Summed negative log-likelihood of toks[1:] under logits[:-1], and its count."""
    x = logits[:-1].astype(np.float64)
    x -= x.max(1, keepdims=True)
    lp = x[np.arange(len(x)), toks[1:]] - np.log(np.exp(x).sum(1))
    return float(-lp.sum()), len(x)


def kv_kw(t: str) -> dict:
    return {"cache_type_k": t, "cache_type_v": t}


def llama(path, n_ctx: int, threads: int, cache: str, fa: bool | None = None, logits_all: bool = False):
    import llama_cpp

    kw = llama_cache_types(**kv_kw(cache))
    if fa is not None:
        kw["flash_attn"] = fa
    with quiet_stderr():
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                               verbose=False, logits_all=logits_all, **kw)


def perplexities(path, types, seg: int, threads: int, with_llama: bool) -> dict:
    """{(engine, type): (perplexity, tokens)} over TEXT."""
    out = {}
    with flashlm.load(path, n_ctx=seg, n_threads=threads) as m:
        tok = m.tokenizer
        segs = segments(m.tokenize(TEXT.read_text(), add_special=False), seg, tok.bos_id if tok.add_bos else None)
    for t in types:
        total, n = 0.0, 0
        with flashlm.load(path, n_ctx=seg, n_threads=threads, **kv_kw(t)) as m:
            for s in segs:
                a, b = nll(m.logits(s), s)
                total, n = total + a, n + b
        out[("flashlm", t)] = (float(np.exp(total / n)), n)
        print(f"  perplexity flashlm {t}: {out[('flashlm', t)][0]:.3f}", file=sys.stderr, flush=True)
        if with_llama:
            llm = llama(path, seg, threads, t, fa=True, logits_all=True)
            total = 0.0
            for s in segs:
                llm.reset()
                llm.eval(s)
                total += nll(np.array(llm.scores[:len(s)], dtype=np.float32), s)[0]
            llm.close()
            out[("llama.cpp", t)] = (float(np.exp(total / n)), n)
            print(f"  perplexity llama.cpp {t}: {out[('llama.cpp', t)][0]:.3f}", file=sys.stderr, flush=True)
    return out


class _Flash:
    def __init__(self, path, threads, cache, lib=flashlm):
        kw = kv_kw(cache) if lib is flashlm else {}  # (an earlier revision: f16 only)
        self.m = lib.load(path, n_ctx=MAX_CTX + 64, n_threads=threads, **kw)

    def fill(self, toks):
        self.m.reset()
        self.m.eval(toks)
        self.filled = list(toks)

    def decode(self, depth, toks) -> float:
        ctx = self.m._ctx  # the context cut back to `depth` (positions past it are overwritten as they decode)
        ctx.tokens, ctx.exact = self.filled[:depth], 0
        t = time.perf_counter()
        for tok in toks:
            self.m.eval([tok])
        return time.perf_counter() - t

    def close(self):
        self.m.close()


class _Llama:
    def __init__(self, path, threads, cache, fa):
        self.llm = llama(path, MAX_CTX + 64, threads, cache, fa)

    def fill(self, toks):
        self.llm.reset()
        self.llm.eval(toks)
        self.state = self.llm.save_state()  # (eval() drops the cache past n_tokens: restored before each depth)

    def decode(self, depth, toks) -> float:
        self.llm.load_state(self.state)
        self.llm.n_tokens = depth
        t = time.perf_counter()
        for tok in toks:
            self.llm.eval([tok])
        return time.perf_counter() - t

    def close(self):
        self.llm.close()


def speeds(path, types, depths, n_tokens: int, reps: int, threads: int, base=None) -> dict:
    """{(engine, type): {depth: median tok/s}}, the engines interleaved in each repetition.
    base: (revision, its flashlm package): its f16 decode beside."""
    runners = {}
    for t in types:
        runners[("flashlm", t)] = _Flash(path, threads, t)
        if base is not None and t == "f16":
            runners[(f"flashlm {base[0]}", t)] = _Flash(path, threads, t, base[1])
        runners[("llama.cpp", t)] = _Llama(path, threads, t, None if t == "f16" else True)
        if t == "f16":
            runners[("llama.cpp FA", t)] = _Llama(path, threads, t, True)
    n_vocab = runners[("flashlm", types[0])].m.config.n_vocab
    deepest = max(depths)
    fill = _tokens(deepest, n_vocab, 1234)
    decode = _tokens(n_tokens, n_vocab, 99)
    times = {k: {d: [] for d in depths} for k in runners}
    try:
        for key, r in runners.items():
            t0 = time.perf_counter()
            r.fill(fill)
            r.decode(deepest, decode[:2])  # warm
            print(f"  prefilled {deepest} tokens: {key[0]} {key[1]} in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
        for rep in range(reps):
            for d in sorted(depths, reverse=True):  # (flashlm: a depth overwrites only positions past it)
                for key, r in runners.items():
                    times[key][d].append(n_tokens / r.decode(d, decode))
            print(f"  rep {rep + 1}/{reps} done (load average {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    finally:
        for r in runners.values():
            r.close()
    return {k: {d: statistics.median(v) for d, v in per.items()} for k, per in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", action="append", help="registry name or GGUF (repeatable; default smollm2-135m)")
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--depths", default="0,1024,4096")
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens timed per depth (default 32)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--segment", type=int, default=512, help="perplexity segment in tokens (default 512)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument("--no-llama-ppl", action="store_true")
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--base", metavar="REV", help="also the f16 decode of flashlm at this git revision, in the same "
                                                  "run (as ab_pairs.py loads it): the speed before a change")
    args = ap.parse_args(argv)
    types = args.types.split(",")
    depths = [int(d) for d in args.depths.split(",")]
    if max(depths) > MAX_CTX:
        ap.error(f"depths up to {MAX_CTX}")
    base = None
    if args.base:
        import importlib
        import tempfile

        from ab_pairs import snapshot

        tmp = tempfile.mkdtemp(prefix="bench-kv-")
        snapshot(args.base, Path(tmp))
        sys.path.insert(0, tmp)
        base = (args.base, importlib.import_module("flashlm_base"))
    load0 = os.getloadavg()[0]
    print(f"CPU: {cpu_flags()}; {args.threads} threads; load average {load0:.1f} at the start\n")
    for name in args.model or ["smollm2-135m"]:
        path = resolve(name)
        print(f"## {path.name}\n", flush=True)
        with flashlm.load(path, n_ctx=MAX_CTX, n_threads=args.threads) as m:
            f16_bytes = m.kv_bytes_per_position
        ppl = {} if args.no_ppl else perplexities(path, types, args.segment, args.threads, not args.no_llama_ppl)
        print("| cache | KV MiB at 4096 | vs f16 | perplexity | vs f16 | llama.cpp perplexity | vs f16 |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for t in types:
            with flashlm.load(path, n_ctx=MAX_CTX, n_threads=args.threads, **kv_kw(t)) as m:
                b = m.kv_bytes_per_position
            cells = [f"{MAX_CTX * b / 2**20:.1f}", f"{b / f16_bytes:.2f}x"]
            for eng in ("flashlm", "llama.cpp"):
                if (eng, t) in ppl and (eng, "f16") in ppl:
                    p, p0 = ppl[(eng, t)][0], ppl[(eng, "f16")][0]
                    cells += [f"{p:.3f}", f"{100 * (p / p0 - 1):+.2f}%"]
                else:
                    cells += ["-", "-"]
            print(f"| {t} | " + " | ".join(cells) + " |")
        if ppl:
            print(f"\n(perplexity: {next(iter(ppl.values()))[1]} tokens of tests/data/eval_text.txt in segments of "
                  f"{args.segment})\n")
        if args.no_speed:
            continue
        sp = speeds(path, types, depths, args.tokens, args.reps, args.threads, base)
        print(f"decode tok/s after a context of d tokens ({args.tokens} tokens, median of {args.reps}):\n")
        print("| cache | engine | " + " | ".join(f"d={d}" for d in depths) + f" | flashlm / llama.cpp at d={depths[-1]} |")
        print("|---|---|" + "---:|" * (len(depths) + 1))
        for t in types:
            for eng in ("flashlm", f"flashlm {args.base}", "llama.cpp", "llama.cpp FA"):
                if (eng, t) not in sp:
                    continue
                row = sp[(eng, t)]
                ratio = ""
                if eng.startswith("flashlm"):
                    ratio = f"{row[depths[-1]] / sp[('llama.cpp', t)][depths[-1]]:.2f}x"
                    if ("llama.cpp FA", t) in sp:
                        ratio += f" ({row[depths[-1]] / sp[('llama.cpp FA', t)][depths[-1]]:.2f}x FA)"
                label = "llama.cpp (flash attn)" if eng == "llama.cpp FA" or (eng == "llama.cpp" and t != "f16") \
                    else eng
                print(f"| {t} | {label} | " + " | ".join(f"{row[d]:.1f}" for d in depths) + f" | {ratio} |")
        print(flush=True)
    print(f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (2 cores: above ~0.5 other "
          "programs were running)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
