"""The hostile-input campaign: mutated model files, each loaded in a forked child with
flashlm.load(path, n_ctx=64, n_threads=1) and asked for 2 tokens, under RLIMIT_AS, with
a timeout per case; prints the counts by outcome and the CPU it ran on.

    python benchmarks/fuzz_models.py [-n 10000] [--jobs 2] [--timeout 60] [--seed 0] [--save DIR]

The contract (issue 29): every case ends in a FlashLMError or loads and generates; never
another exception, a signal, a hang, or an address space grown by more than 2 GiB.
The files mutated are tiny (tests/formats/tiny_models.py: a llama with a BPE vocabulary,
a gemma3 with a SentencePiece one, the first's flash layout and an HF folder of it), so
a case takes milliseconds; the mutations (tests/formats/mutations.py) hit the GGUF
header, metadata and tensor infos, and the safetensors header and config.json.
--save DIR keeps each case that broke the contract (its files and ops) for
tests/formats/regressions. Exits 1 if any case broke it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# numba's OpenMP threading layer kills a forked child (GNU OpenMP is not fork-safe); the
# workqueue layer lets children run the kernels the parent compiled
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "formats")]

from fuzz_runner import OUTCOMES, run_cases, warm_up  # noqa: E402
from mutations import GGUF_OPS, HF_OPS, gguf_layout, mutate_gguf, mutate_hf  # noqa: E402
from tiny_models import fuzz_seeds  # noqa: E402

MIX = {"bpe": 4, "spm": 2, "flash": 2, "hf": 2}  # share of the cases mutating each seed
SIMD = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
        "avx_vnni", "amx_tile", "amx_int8")


def cpu() -> str:
    name, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine()):
                name = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                break
    except OSError:
        pass
    return f"{name}; SIMD flags: {' '.join(f for f in SIMD if f in flags) or 'none found'}"


def random_ops(rng: random.Random, kinds) -> list:
    return [(rng.choice(kinds), rng.getrandbits(32), rng.getrandbits(64)) for _ in range(rng.choice((1, 1, 1, 2, 3)))]


def cases(seeds: dict, n: int, seed: int):
    rng = random.Random(seed)
    layouts = {k: gguf_layout(files["model.gguf"]) for k, (files, _) in seeds.items() if k != "hf"}
    names = [k for k, w in MIX.items() for _ in range(w)]
    for i in range(n):
        name = rng.choice(names)
        files, target = seeds[name]
        if name == "hf":
            ops = random_ops(rng, HF_OPS)
            files = mutate_hf(files, ops)
        else:
            ops = random_ops(rng, GGUF_OPS)
            files = {"model.gguf": mutate_gguf(files["model.gguf"], layouts[name], ops)}
        yield (i, name, ops, files), files, target


def _save(save: Path, case, result) -> None:
    i, name, ops, files = case
    d = save / f"{result.outcome}-{name}-{i:05d}"
    d.mkdir(parents=True, exist_ok=True)
    for fname, data in files.items():
        (d / fname).write_bytes(data)
    (d / "case.json").write_text(json.dumps({"seed_file": name, "ops": ops, "outcome": result.outcome,
                                             "detail": result.detail}, indent=1))


def report(counts, by_seed, details, n: int, seconds: float) -> None:
    print(f"\n{n} cases in {seconds:.0f} s ({seconds / max(n, 1) * 1000:.1f} ms each); CPU: {cpu()}")
    print(f"\n| outcome | cases | {' | '.join(MIX)} |\n|---|---|{'---|' * len(MIX)}")
    for o in OUTCOMES:
        print(f"| {o} | {counts[o]} | {' | '.join(str(by_seed[s][o]) for s in MIX)} |")
    for o in OUTCOMES:
        if details[o]:
            print(f"\n{o}, most common:")
            for d, k in details[o].most_common(12):
                print(f"  {k:5d}  {d[:160]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10000, help="cases (default 10000)")
    ap.add_argument("--jobs", type=int, default=2, help="children at a time (default 2)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds a case may take (default 60)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", type=Path, help="keep each case that broke the contract here")
    a = ap.parse_args(argv)
    counts, details = collections.Counter(), collections.defaultdict(collections.Counter)
    by_seed = collections.defaultdict(collections.Counter)
    with tempfile.TemporaryDirectory(prefix="flashlm-fuzz-") as tmp:
        seeds = fuzz_seeds(Path(tmp) / "seeds")
        warm_up([Path(tmp) / "seeds" / f for f in ("tiny-bpe.gguf", "tiny-spm.gguf", "tiny-bpe.flash.gguf", "tiny-hf")])
        t0, done = time.perf_counter(), 0
        for case, result in run_cases(cases(seeds, a.n, a.seed), Path(tmp) / "work", a.jobs, a.timeout):
            done += 1
            counts[result.outcome] += 1
            by_seed[case[1]][result.outcome] += 1
            details[result.outcome][result.detail.split(":")[0] if result.outcome == "error" else result.detail] += 1
            if not result.allowed and a.save:
                _save(a.save, case, result)
            if done % 500 == 0:
                print(f"{done} cases, {time.perf_counter() - t0:.0f} s: {dict(counts)}", flush=True)
        report(counts, by_seed, details, done, time.perf_counter() - t0)
    return 0 if all(counts[o] == 0 for o in OUTCOMES if o not in ("error", "ok")) else 1


if __name__ == "__main__":
    sys.exit(main())
