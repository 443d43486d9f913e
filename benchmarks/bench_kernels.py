"""The kernel micro-benchmark: matvec (decode) GB/s of weight bytes and matmul
(prefill) GFLOP/s, per GGML type and shape, on random weights. Same as
`flashlm bench --kernels`.

    python benchmarks/bench_kernels.py [-t THREADS]
"""

import argparse

from flashlm.apps.bench import format_kernel_table, run_kernel_bench

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    print(format_kernel_table(run_kernel_bench(threads=args.threads), args.threads))
