"""A change's effect on decode speed, measured in pairs within one process.

Whole runs on this machine move by up to 1.5x from one minute to the next, more than most
changes are worth. This loads the code at an earlier git revision (as a package of its
own, `flashlm_base`) beside the working tree's, both on the same model, budget and
options, and decodes the same tokens with each in turn (alternating which goes first), so
both see the same machine. It prints each side's median tok/s, read wait and hits, and
the per-token difference.

    python benchmarks/ab_pairs.py --base 372ada2 -m ~/.cache/flashlm/moe/smollm2-moe-24x64-top6.gguf \
        --fraction 0.5 --experts '{"policy": "score", "prefetch": true}'

--fraction 0 (the default) runs with every weight resident (no budget).

Two configurations of the working tree instead of two revisions: --vs gives the first
side's expert options, --experts the second's.

A dense model streamed by flashload: --flash names a row of bench_flash.py (gate
predictor, keep 0.8, window 16), with a budget that holds --fraction of the FFN records.

    python benchmarks/ab_pairs.py --base HEAD -m smollm2-135m --flash "+ prefetch (all)" --fraction 0.5

    python benchmarks/ab_pairs.py --vs '{"policy": "score"}' --experts '{"policy": "freq"}' -m MOE.gguf --fraction 0.5
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def snapshot(rev: str, into: Path) -> None:
    """The flashlm package at git revision rev, as into/flashlm_base (its imports are relative)."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "flashlm"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=tar, check=True)
    (into / "flashlm").rename(into / "flashlm_base")


def tokenizer_bytes(lib) -> dict:
    """The table where revision lib keeps each model file's measured tokenizer memory."""
    for name in ("runtime.loader", "runtime.model"):
        try:
            mod = importlib.import_module(f"{lib.__name__}.{name}")
        except ImportError:
            continue
        if hasattr(mod, "_TOKENIZER_BYTES"):
            return mod._TOKENIZER_BYTES
    raise SystemExit(f"{lib.__name__}: no tokenizer memory table")


def flash_setup(name: str, fraction: float, row: str) -> tuple[str, int, dict]:
    """(the flash GGUF, one budget for both sides holding `fraction` of the FFN records,
    bench_flash's streaming settings for row `row`)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_flash

    settings = dict(bench_flash.rows("gate", 0.8, 16)).get(row)
    if not settings or settings.get("resident"):
        raise SystemExit(f"--flash: {row!r} is not a streamed row of bench_flash.py")
    path = bench_flash.cached(name)  # (the working tree's converter, for both sides)
    budget, _ = bench_flash.budget_for(path, fraction, "gate", 0.8, 16)
    return str(path), budget, settings


def load(lib, path: str, fraction: float, experts: dict | None):
    """lib's model with a budget that holds `fraction` of the experts (the same number of
    slots on both sides: the plan's fixed part is measured, so it is checked)."""
    if not fraction:
        return lib.load(path, n_ctx=512, n_threads=2, experts=experts)
    with lib.load(path, n_ctx=512, memory_budget=1 << 45) as m0:
        want = int(fraction * m0.plan.n_experts)
        budget = m0.plan.fixed + want * m0.plan.expert_bytes
    for _ in range(3):
        m = lib.load(path, n_ctx=512, n_threads=2, memory_budget=budget, experts=experts)
        if m.plan.n_slots == want:
            return m
        budget += (want - m.plan.n_slots) * m.plan.expert_bytes
        m.close()
    raise SystemExit(f"could not plan {want} expert slots on both sides")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--base", help="the git revision to compare against (e.g. HEAD~1)")
    g.add_argument("--vs", help="instead: the working tree with these expert options (JSON) against --experts")
    ap.add_argument("-m", "--model", required=True, help="a GGUF path (with --flash, also a registry name)")
    ap.add_argument("--fraction", type=float, default=0.0, help="the share of experts the cache holds (0: resident)")
    ap.add_argument("--experts", default="{}", help='expert options as JSON, e.g. {"policy": "score"}')
    ap.add_argument("--flash", metavar="ROW", help="instead: a dense model streamed as this row of bench_flash.py")
    ap.add_argument("-n", type=int, default=200, help="tokens to decode (each side)")
    ap.add_argument("--skip", type=int, default=32, help="first tokens left out (warm-up)")
    a = ap.parse_args()
    if a.flash and a.vs:
        ap.error("--flash compares two revisions (--base), not expert options (--vs)")
    with tempfile.TemporaryDirectory() as tmp:
        if a.base:
            snapshot(a.base, Path(tmp))
            sys.path.insert(0, tmp)
        import flashlm

        base = importlib.import_module("flashlm_base") if a.base else flashlm
        opts = json.loads(a.experts) or None
        if a.flash:
            import llama_cpp  # noqa: F401  (loaded before either side: each plan measures its tokenizer's memory)

            path, budget, settings = flash_setup(a.model, a.fraction or 0.5, a.flash)
            ms = {}
            for k, lib in (("before", base), ("after", flashlm)):
                if ms:  # the tokenizer's memory as the first side measured it (a second load looks cheaper)
                    tokenizer_bytes(lib).update(tokenizer_bytes(base))
                ms[k] = lib.load(path, n_ctx=256, n_threads=2, memory_budget=budget, streaming=dict(settings))
            if ms["before"].plan.capacities != ms["after"].plan.capacities:
                raise SystemExit("the two sides planned different windows for one budget: not comparable")
        else:
            ms = {"before": load(base, a.model, a.fraction, json.loads(a.vs) or None if a.vs else opts),
                  "after": load(flashlm, a.model, a.fraction, opts)}
        tokens = ms["after"].tokenize((ROOT / "tests/data/eval_text.txt").read_text())
        for m in ms.values():
            m._prefill(tokens[:8])
        times = {k: [] for k in ms}
        agg = {k: dict(wait_s=0.0, hits=0, misses=0) for k in ms}
        names = list(ms)
        for i, tok in enumerate(tokens[8:8 + a.n]):
            pos = 8 + i
            for k in names if i % 2 == 0 else names[::-1]:
                m = ms[k]
                t0 = time.perf_counter()
                m._forward(np.array([tok]), pos, m._ctx.kv)
                times[k].append(time.perf_counter() - t0)
                ex = m.experts if hasattr(m, "experts") else getattr(m.model, "experts", None)  # (older revisions)
                st = getattr(ex, "take_stats", lambda: None)()
                if st and i >= a.skip:
                    for f in agg[k]:
                        agg[k][f] += st[f]
        for k in names:
            t, s = times[k][a.skip:], agg[k]
            hit = s["hits"] / max(1, s["hits"] + s["misses"])
            name = (a.base or a.vs) if k == "before" else ("working tree" if a.base else a.experts)
            experts = "" if a.flash else f"  read wait {s['wait_s'] / len(t) * 1e3:.2f} ms/token  hits {hit:.3f}"
            print(f"{k:6s} {name:>12}: {1 / statistics.median(t):7.1f} tok/s{experts}")
        d = [b - x for x, b in zip(times["before"][a.skip:], times["after"][a.skip:])]
        print(f"after - before, per token: median {statistics.median(d) * 1e3:+.3f} ms; tok/s ratio "
              f"{statistics.median(times['before'][a.skip:]) / statistics.median(times['after'][a.skip:]):.3f}")
        for m in ms.values():
            m.close()


if __name__ == "__main__":
    main()
