"""Peak RSS while decoding: flashlm beside llama.cpp (llama-cpp-python), each in a
fresh process, same GGUF, context size, threads, prompt and greedy 128 tokens.

    python benchmarks/bench_memory.py [-m MODEL] [-c 4096] [-n 128] [-r 3]

Peak RSS is the child's ru_maxrss (os.wait4), so it includes the interpreter, imports,
mapped weight pages that were touched, the KV cache and compute buffers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

PROMPT = "Once upon a time, in a small village by the sea,"

FLASHLM = """
import sys, flashlm
m = flashlm.load(sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=2)
out = m.generate(sys.argv[4], max_tokens=int(sys.argv[3]), temperature=0.0)
print(len(m.tokenize(out, add_special=False)))
"""

LLAMA_CPP = """
import sys, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=2, n_threads_batch=2, verbose=False)
out = llm(sys.argv[4], max_tokens=int(sys.argv[3]), temperature=0.0)
print(out["usage"]["completion_tokens"])
"""


def peak_rss_mib(code: str, path: str, n_ctx: int, n_gen: int) -> tuple[float, int]:
    """(peak RSS MiB, tokens generated) of one engine run in a fresh process."""
    p = subprocess.Popen([sys.executable, "-c", code, path, str(n_ctx), str(n_gen), PROMPT],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"engine process failed (exit {os.waitstatus_to_exitcode(status)})")
    return usage.ru_maxrss / 1024, int(out.split()[-1])  # ru_maxrss: KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="GGUF path or registry name (default model)")
    ap.add_argument("-c", "--ctx-size", type=int, default=4096)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    a = ap.parse_args()
    from flashlm.formats.registry import resolve

    path = str(resolve(a.model))
    runs = {"flashlm": [], "llama.cpp": []}
    made = {"flashlm": set(), "llama.cpp": set()}
    for _ in range(a.reps):  # interleaved, so drift hits both alike
        for name, code in (("flashlm", FLASHLM), ("llama.cpp", LLAMA_CPP)):
            rss, n = peak_rss_mib(code, path, a.ctx_size, a.n_gen)
            runs[name].append(rss)
            made[name].add(n)
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"| engine | peak RSS MiB (median of {a.reps}) | runs | tokens generated |\n|---|---:|---|---|")
    for k, v in runs.items():
        print(f"| {k} | {med[k]:.0f} | {' '.join(f'{x:.0f}' for x in v)} | {'/'.join(map(str, sorted(made[k])))} |")
    print(f"\nflashlm / llama.cpp: {med['flashlm'] / med['llama.cpp']:.2f}x  "
          f"(model {os.path.basename(path)}, n_ctx {a.ctx_size}, {a.n_gen} tokens)")


if __name__ == "__main__":
    main()
