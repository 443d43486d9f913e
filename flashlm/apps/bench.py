"""`flashlm bench`: flashlm beside llama.cpp (llama-cpp-python) on the same GGUF, with
the same thread count, in one run; a llama-bench-style table of medians.

pp N: prefill of N tokens (tok/s over the whole prompt); tg N: N decode steps, one
token at a time, after a one-token prompt. Tokens are fixed pseudo-random ids, as in
llama-bench, so both engines do identical work.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class BenchRow:
    model: str
    size_mib: float
    engine: str
    test: str
    tok_s: float  # median
    runs: list[float]


def _tokens(n: int, n_vocab: int, seed: int = 1234) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(100, min(n_vocab, 30000), n)]


class _Flashlm:
    name = "flashlm"

    def __init__(self, path, threads, n_ctx):
        import flashlm

        self.m = flashlm.load(path, n_ctx=n_ctx, n_threads=threads)
        self.n_vocab = self.m.config.n_vocab

    def warm(self):
        self.m._kv_tokens = []
        self.m._prefill(_tokens(8, self.n_vocab, 7))

    def prefill(self, toks):
        self.m._kv_tokens = []  # a fresh cache: nothing reused
        t = time.perf_counter()
        self.m._prefill(toks)
        return time.perf_counter() - t

    def decode(self, first, toks):
        m = self.m
        m._kv_tokens = []
        m._prefill([first])
        t = time.perf_counter()
        for i, tok in enumerate(toks):
            m.model.forward(np.asarray([tok]), 1 + i, m._kv)
        return time.perf_counter() - t

    def close(self):
        self.m.close()


class _LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path, threads, n_ctx):
        import llama_cpp

        from ..runtime.tokenizer import quiet_stderr

        with quiet_stderr():
            self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                                       n_threads_batch=threads, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def warm(self):
        self.llm.reset()
        self.llm.eval(_tokens(8, self.n_vocab, 7))

    def prefill(self, toks):
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(toks)
        return time.perf_counter() - t

    def decode(self, first, toks):
        self.llm.reset()
        self.llm.eval([first])
        t = time.perf_counter()
        for tok in toks:
            self.llm.eval([tok])
        return time.perf_counter() - t

    def close(self):
        self.llm.close()


def run_bench(model=None, threads: int = 2, pp: int = 128, tg: int = 128, reps: int = 3,
              engines=("flashlm", "llama.cpp"), progress=None) -> list[BenchRow]:
    """Measure each engine on each test, reps times, engines interleaved per repetition
    so that machine noise hits both alike. Returns one BenchRow per (engine, test)."""
    from ..runtime.registry import resolve

    path = resolve(model)
    size_mib = path.stat().st_size / 2**20
    n_ctx = max(512, pp + tg + 16)
    label = path.name
    makers = {"flashlm": _Flashlm, "llama.cpp": _LlamaCpp}
    runners = [makers[e](path, threads, n_ctx) for e in engines]
    try:
        for r in runners:
            r.warm()
        n_vocab = runners[0].n_vocab
        pp_toks = _tokens(pp, n_vocab)
        tg_toks = _tokens(tg, n_vocab, 99)
        times = {(r.name, t): [] for r in runners for t, n in ((f"pp{pp}", pp), (f"tg{tg}", tg)) if n}
        for rep in range(reps):
            for r in runners:
                if progress:
                    progress(f"rep {rep + 1}/{reps}: {r.name}")
                if pp:
                    times[(r.name, f"pp{pp}")].append(pp / r.prefill(pp_toks))
                if tg:
                    times[(r.name, f"tg{tg}")].append(tg / r.decode(tg_toks[0], tg_toks))
    finally:
        for r in runners:
            r.close()
    rows = []
    for (eng, test), runs in times.items():
        if runs:
            rows.append(BenchRow(label, size_mib, eng, test, statistics.median(runs), runs))
    return rows


def format_table(rows: list[BenchRow]) -> str:
    """A llama-bench-style markdown table, with flashlm / llama.cpp ratios."""
    base = {(r.model, r.test): r.tok_s for r in rows if r.engine == "llama.cpp"}
    lines = ["| model | size | engine | test | t/s (median) | runs | vs llama.cpp |",
             "|---|---:|---|---|---:|---|---:|"]
    for r in sorted(rows, key=lambda r: (r.model, r.test, r.engine != "flashlm")):
        ratio = ""
        if r.engine != "llama.cpp" and (r.model, r.test) in base:
            ratio = f"{r.tok_s / base[(r.model, r.test)]:.2f}x"
        runs = " ".join(f"{x:.1f}" for x in r.runs)
        lines.append(f"| {r.model} | {r.size_mib:.1f} MiB | {r.engine} | {r.test} | {r.tok_s:.1f} | {runs} | {ratio} |")
    return "\n".join(lines)
