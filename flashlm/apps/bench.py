"""`flashlm bench`: flashlm beside llama.cpp (llama-cpp-python) on the same GGUF, with
the same thread count, in one run; a llama-bench-style table of medians.

pp N: prefill of N tokens (tok/s over the whole prompt); tg N: N decode steps, one
token at a time, after a one-token prompt. Tokens are fixed pseudo-random ids, as in
llama-bench, so both engines do identical work.

With a draft source (--draft), "copy N": N greedy tokens generated after a prompt that
asks to copy a paragraph (speculation's best case, and the one prompt lookup is for):
decode tok/s (tokens after the first over the time since it), flashlm without and with
speculation, llama.cpp without and (for ngram) with its prompt-lookup decoding
(llama-cpp-python's LlamaPromptLookupDecoding).
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


COPY = ("Copy the text below exactly.\n\nText: The river rises in the northern hills, runs south through the old "
        "market town, and turns east below the mill before it reaches the sea. Its water once drove the looms of "
        "the town, and the mill still stands beside the weir.\n\nCopy: The river rises")


def _tokens(n: int, n_vocab: int, seed: int = 1234) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(100, min(n_vocab, 30000), n)]


class _Flashlm:
    name = "flashlm"

    def __init__(self, path, threads, n_ctx, kv):
        import flashlm

        self.m = flashlm.load(path, n_ctx=n_ctx, n_threads=threads, **kv)
        self.n_vocab = self.m.config.n_vocab

    def warm(self):
        self.m.reset()
        self.m.eval(_tokens(8, self.n_vocab, 7))

    def prefill(self, toks):
        self.m.reset()  # a fresh cache: nothing reused
        t = time.perf_counter()
        self.m.eval(toks)
        return time.perf_counter() - t

    def decode(self, first, toks):
        m = self.m
        m.reset()
        m.eval([first])
        t = time.perf_counter()
        for tok in toks:
            m.eval([tok])
        return time.perf_counter() - t

    def copy(self, n: int, draft) -> float:
        """Decode tok/s of n greedy tokens after COPY (speculating with draft, if given)."""
        self.m.reset()
        last = list(self.m.stream(COPY, max_tokens=n, temperature=0, speculative=draft or False))[-1]
        return last.tokens_per_second

    def close(self):
        self.m.close()


class _LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path, threads, n_ctx, kv):
        import llama_cpp

        from ..runtime.tokenizer import quiet_stderr

        with quiet_stderr():
            self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                                       n_threads_batch=threads, verbose=False, **llama_cache_types(**kv))
        self.path, self.n_ctx, self.threads, self._lookup, self.kv = path, n_ctx, threads, None, kv
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

    def copy(self, n: int, draft) -> float:
        """Decode tok/s of n greedy tokens after COPY (with prompt lookup for an ngram draft:
        a Llama of its own, made once, with logits_all, which llama-cpp-python's drafts need)."""
        llm = self.llm
        if draft == "ngram":
            if self._lookup is None:
                import llama_cpp
                from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

                from ..runtime.tokenizer import quiet_stderr

                with quiet_stderr():
                    self._lookup = llama_cpp.Llama(str(self.path), n_ctx=self.n_ctx, n_threads=self.threads,
                                                   n_threads_batch=self.threads, logits_all=True, verbose=False,
                                                   draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10),
                                                   **llama_cache_types(**self.kv))
            llm = self._lookup
        llm.reset()
        t, first, k = time.perf_counter(), None, 0
        for _ in llm.create_completion(COPY, max_tokens=n, temperature=0.0, stream=True):
            k += 1
            if first is None:
                first = time.perf_counter()
        return (k - 1) / max(time.perf_counter() - (first or t), 1e-9)

    def close(self):
        self.llm.close()
        if self._lookup is not None:
            self._lookup.close()


def llama_cache_types(cache_type_k: str = "f16", cache_type_v: str = "f16") -> dict:
    """llama-cpp-python's Llama arguments for a KV cache of these types (a quantized V
    cache needs llama.cpp's flash attention)."""
    from ..kernels_cpu.attention import CACHE_TYPES

    kw = {"type_k": CACHE_TYPES[cache_type_k], "type_v": CACHE_TYPES[cache_type_v]}
    if cache_type_v != "f16":
        kw["flash_attn"] = True
    return kw


def run_bench(model=None, threads: int = 2, pp: int = 128, tg: int = 128, reps: int = 3,
              engines=("flashlm", "llama.cpp"), progress=None, draft: str | None = None, cache_type_k: str = "f16",
              cache_type_v: str = "f16") -> list[BenchRow]:
    """Measure each engine on each test, reps times, engines interleaved per repetition
    so that machine noise hits both alike. Returns one BenchRow per (engine, test).
    draft: also the "copy" test, with and without that draft source. cache_type_k,
    cache_type_v: both engines' KV cache types."""
    from ..formats.registry import resolve

    path = resolve(model)
    size_mib = path.stat().st_size / 2**20
    n_ctx = max(512, pp + tg + 16)
    label = path.name
    makers = {"flashlm": _Flashlm, "llama.cpp": _LlamaCpp}
    kv = {"cache_type_k": cache_type_k, "cache_type_v": cache_type_v}
    if kv != {"cache_type_k": "f16", "cache_type_v": "f16"}:
        label += f" KV {cache_type_k}/{cache_type_v}"
    runners = [makers[e](path, threads, n_ctx, kv) for e in engines]
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
                if tg and draft:
                    with_draft = f"flashlm --draft {draft}" if r.name == "flashlm" else "llama.cpp prompt lookup"
                    times.setdefault((r.name, f"copy{tg}"), []).append(r.copy(tg, None))
                    times.setdefault((with_draft, f"copy{tg}"), []).append(r.copy(tg, draft))
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


# -- kernel micro-benchmark ----------------------------------------------------------

KERNEL_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
KERNEL_SHAPES = ((2048, 2048), (8192, 1024), (1024, 8192))  # (rows, cols) = (n_out, n_in)


@dataclass
class KernelRow:
    qtype: str
    rows: int
    cols: int
    mib: float  # weight bytes
    matvec_us: float  # median
    matmul_ms: float  # median, T tokens
    T: int

    @property
    def matvec_gbs(self) -> float:
        return self.mib * 2**20 / (self.matvec_us * 1e-6) / 1e9

    @property
    def matmul_gflops(self) -> float:
        return 2 * self.rows * self.cols * self.T / (self.matmul_ms * 1e-3) / 1e9


def random_weight(qtype_name: str, rows: int, cols: int, rng):
    """A TensorRef of random blocks of the given GGML type, with sane f16 scales."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    from ..formats.modelfile import TensorRef

    qt = T[qtype_name]
    bs, ts = GGML_QUANT_SIZES[qt]
    if qt in (T.F32, T.F16, T.BF16):
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        raw = {T.F32: x, T.F16: x.astype(np.float16), T.BF16: (x.view(np.uint32) >> 16).astype(np.uint16)}[qt]
        raw = raw.view(np.uint8).reshape(rows, -1)
    else:
        raw = rng.integers(0, 256, size=(rows, cols // bs, ts), dtype=np.uint8)
        scales = rng.uniform(0.001, 0.05, size=(rows, cols // bs, 2)).astype(np.float16).view(np.uint8)
        at = 208 if qt == T.Q6_K else 0
        raw[:, :, at:at + (2 if qt in (T.Q6_K, T.Q8_0, T.Q4_0, T.Q5_0) else 4)] = \
            scales[:, :, :2 if qt in (T.Q6_K, T.Q8_0, T.Q4_0, T.Q5_0) else 4]
        raw = raw.reshape(rows, -1)
    return TensorRef(f"bench.{qtype_name}", qt, (rows, cols), np.ascontiguousarray(raw), 0)


def _median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def run_kernel_bench(threads: int = 2, types=KERNEL_TYPES, shapes=KERNEL_SHAPES, T: int = 128,
                     reps: int = 20, progress=None) -> list[KernelRow]:
    """matvec (decode) and matmul of T tokens (prefill) on random weights of each type
    and shape; medians of `reps` runs. Weights are read from memory, not cache: each
    is larger than the L2, and most larger than the L3."""
    from .. import kernels_cpu as K

    K.set_threads(threads)
    rng = np.random.default_rng(0)
    rows_out = []
    for name in types:
        for rows, cols in shapes:
            if progress:
                progress(f"{name} {rows}x{cols}")
            w = random_weight(name, rows, cols, rng)
            x = rng.standard_normal((T, cols)).astype(np.float32)
            mv = _median_time(lambda: K.matvec(x[0], w), reps)
            mm = _median_time(lambda: K.linear(x, w), max(3, reps // 5))
            rows_out.append(KernelRow(name, rows, cols, w.data.nbytes / 2**20, mv * 1e6, mm * 1e3, T))
    return rows_out


def format_kernel_table(rows: list[KernelRow], threads: int) -> str:
    lines = [f"kernels at {threads} threads: matvec = decode (GB/s of weight bytes), "
             f"matmul = prefill of {rows[0].T if rows else 0} tokens",
             "| type | rows x cols | MiB | matvec us | matvec GB/s | matmul ms | matmul GFLOP/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.qtype} | {r.rows}x{r.cols} | {r.mib:.1f} | {r.matvec_us:.0f} | {r.matvec_gbs:.1f} "
                     f"| {r.matmul_ms:.2f} | {r.matmul_gflops:.0f} |")
    return "\n".join(lines)
