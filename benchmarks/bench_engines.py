"""flashlm beside llama.cpp on the registry models: the same table as `flashlm bench`.

    python benchmarks/bench_engines.py [-t THREADS] [-r REPS]
"""

import argparse

from flashlm.apps.bench import format_table, run_bench

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for model in ("smollm2-135m", "gemma3-270m"):
        rows += run_bench(model, threads=args.threads, reps=args.reps)
    print(format_table(rows))
