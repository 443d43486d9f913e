"""What checking streamed records costs: decode ms/token with verification on and off,
alternating every two tokens (ABBA) in one process, on SmolLM2's flash file at 50% and 20%
of the FFN held (2 threads). Prints the CPU flags beside the figures.

    python benchmarks/bench_verify.py
"""

import statistics

import numpy as np

import flashlm
from flashlm.runtime.convert import cached

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni")


def main():
    with open("/proc/cpuinfo") as f:
        flags = [x for x in f.read().split("flags")[1].split("\n")[0].split() if x in FLAGS]
    flash = cached("smollm2-135m")
    for frac in (0.5, 0.2):
        with flashlm.load(flash, n_ctx=512, n_threads=2, memory_budget=1 << 40) as m:
            budget = int(m.plan.fixed + (m.plan.full - m.plan.fixed) * frac)
        with flashlm.load(flash, n_ctx=512, n_threads=2, memory_budget=budget) as m:
            logits = m.eval(m.tokenize("Once upon a time"))
            on, off, hashing, records = [], [], [], []
            for i in range(400):
                m.store.settings.verify = (i // 2) % 2 == 0
                logits = m.eval([int(np.argmax(logits))])
                st = m.take_stats()[-1]
                if i < 40:  # warm-up
                    continue
                (on if m.store.settings.verify else off).append(st.seconds)
                if m.store.settings.verify:
                    hashing.append(st.verify_s)
                    records.append(st.bytes_requested / m.store.plans[0].bundle_bytes)
            a, b = (1e3 * statistics.median(x) for x in (on, off))
            print(f"FFN {frac:.0%} held: checked {a:.2f} ms/token, unchecked {b:.2f}, ratio {b / a:.3f}; hashing "
                  f"{1e3 * statistics.median(hashing):.2f} ms/token over {statistics.median(records):.0f} records; "
                  f"CPU {' '.join(flags)}")


if __name__ == "__main__":
    main()
