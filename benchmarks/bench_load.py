"""Decode speed on a busy laptop: flashlm's default threads beside fixed counts and
llama.cpp, on an idle CPU and with one core kept busy by a spinning process.

Each figure is one fresh process decoding N tokens (fixed pseudo-random ids after a
short prompt, as llama-bench's tg) and timing them all, the first included: what a user
waits for. The rows run in turn, idle and loaded alternating, REPS times; the table
shows medians, and each row's loaded/idle ratio. Prints the CPU flags beside the figures.

    python benchmarks/bench_load.py [--reps 3] [-n 128] [--extra]

--extra adds flashlm under other OpenMP wait policies than libgomp's default (spin a
while, then sleep) and numba's workqueue layer: the settings tried before the default
was chosen. The llama.cpp rows run in processes that never import flashlm.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")

CHILD = r"""
import json, sys, time
import numpy as np
engine, threads, n, path = sys.argv[1], (int(sys.argv[2]) or None), int(sys.argv[3]), sys.argv[4]
rng = np.random.default_rng(1234)
toks = [int(t) for t in rng.integers(100, 30000, n + 8)]
if engine == "flashlm":
    import flashlm
    m = flashlm.load(path, n_ctx=512, n_threads=threads)
    m.eval(toks[:8])
    t0 = time.perf_counter()
    for t in toks[8:]:
        m.eval([t])
    dt = time.perf_counter() - t0
    print(json.dumps({"tok_s": n / dt, "threads": m.threads}))
else:
    import llama_cpp  # alone: flashlm's import would set its OpenMP wait policy for llama.cpp too
    llm = llama_cpp.Llama(path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False)
    llm.eval(toks[:8])
    t0 = time.perf_counter()
    for t in toks[8:]:
        llm.eval([t])
    dt = time.perf_counter() - t0
    print(json.dumps({"tok_s": n / dt, "threads": threads}))
"""

SPIN = "while True: pass"


def cpu_flags() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return " ".join(x for x in line.split(":", 1)[1].split() if x in FLAGS) or "none of " + ",".join(FLAGS)
    return "unknown"


def rows(cores: int, extra: bool):
    out = [("flashlm default (auto)", "flashlm", 0, {}),
           (f"flashlm -t {cores} (the old default)", "flashlm", cores, {}),
           ("flashlm -t 1", "flashlm", 1, {}),
           (f"llama.cpp -t {cores} (its default: physical cores)", "llama.cpp", cores, {}),
           ("llama.cpp -t 1", "llama.cpp", 1, {})]
    if extra:
        out += [(f"flashlm -t {cores}, OMP_WAIT_POLICY=passive", "flashlm", cores, {"OMP_WAIT_POLICY": "passive"}),
                (f"flashlm -t {cores}, OMP_WAIT_POLICY=active", "flashlm", cores, {"OMP_WAIT_POLICY": "active"}),
                (f"flashlm -t {cores}, numba workqueue layer", "flashlm", cores, {"NUMBA_THREADING_LAYER": "workqueue"}),
                ("flashlm default, OMP_WAIT_POLICY=passive", "flashlm", 0, {"OMP_WAIT_POLICY": "passive"})]
    return out


def measure(engine, threads, n, env, path) -> float:
    e = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    r = subprocess.run([sys.executable, "-c", CHILD, engine, str(threads), str(n), str(path)], capture_output=True,
                       text=True, env=dict(e, **env), timeout=1800)
    if r.returncode:
        raise SystemExit(f"{engine} -t {threads} failed: {r.stderr[-1000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])["tok_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-n", type=int, default=128, help="tokens decoded per figure")
    ap.add_argument("--extra", action="store_true", help="also other wait policies and threading layers")
    args = ap.parse_args()
    import psutil

    from flashlm.formats.registry import resolve

    path = resolve(None)  # the default model, SmolLM2-135M Q4_1
    cores = psutil.cpu_count(logical=False) or os.cpu_count()
    table = rows(cores, args.extra)
    got = {(label, cond): [] for label, *_ in table for cond in ("idle", "loaded")}
    for rep in range(args.reps):
        for cond in ("idle", "loaded") if rep % 2 == 0 else ("loaded", "idle"):
            spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if cond == "loaded" else None
            try:
                time.sleep(0.5)
                for label, engine, threads, env in table:
                    got[label, cond].append(measure(engine, threads, args.n, env, path))
                    print(f"  rep {rep + 1} {cond:6} {label}: {got[label, cond][-1]:.1f} tok/s", file=sys.stderr, flush=True)
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
    med = {k: statistics.median(v) for k, v in got.items()}
    print(f"decode tok/s, {args.n} tokens from a fresh process, median of {args.reps}; {cores} cores; "
          f"CPU flags: {cpu_flags()}")
    print(f"{'':52} {'idle':>8} {'1 core busy':>12} {'busy/idle':>10}")
    for label, *_ in table:
        i, b = med[label, "idle"], med[label, "loaded"]
        print(f"{label:52} {i:8.1f} {b:12.1f} {b / i:10.2f}")
    ours = med["flashlm default (auto)", "loaded"]
    llama_default = med[table[3][0], "loaded"]
    best_llama = max(med[label, "loaded"] for label, engine, *_ in table if engine == "llama.cpp")
    print(f"flashlm default with a core busy: {ours / med['flashlm default (auto)', 'idle']:.2f}x its idle speed, "
          f"{ours / llama_default:.2f}x llama.cpp's default ({cores} threads) and {ours / best_llama:.2f}x "
          f"llama.cpp's best thread count under the same load")


if __name__ == "__main__":
    main()
