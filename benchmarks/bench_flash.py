"""The flashload ablation, in the shape of "LLM in a flash"'s table: decode with the FFN
streamed from disk, each technique added in turn, at a memory budget.

    python benchmarks/bench_flash.py [-m MODEL ...] [--ffn-fraction 0.5] [-n 24] [--keep 0.9]

Rows: in-RAM (the source GGUF resident: the compiled decode step; and the flash
model with every record in memory, through the same layer-by-layer path the
streamed rows take), naive (every FFN record read each token, in large reads),
+ predictor (gate predictor; each neuron's rows read separately), + windowing
(neurons of the last --window tokens kept, as in the paper), + bundling (one read
per neuron record, nearby reads merged: the paper's "all"), + hot neurons (each
window holds its layer's most often needed neurons for good, the first records of
a calibrated flash file, and a token reads the ones it needs past them straight
into a buffer), + prefetch (the next layer's reads start while this one computes:
all techniques), all but windowing (no neuron kept between tokens).

Decoding is fed the tokens of tests/data/eval_text.txt one by one (teacher forcing),
so every model, the random synthetic one too, sees varied inputs. Columns, per
decoded token (steady state: the first window's tokens skipped):
bytes the engine read, bytes the device delivered (/proc/self/io), reads and
their mean size, I/O ms, bookkeeping ms, compute ms (the rest of the token's
time), tok/s: medians of --rounds rounds over the rows, with the range of tok/s
(rows whose tokens took over a minute run once). The budget holds the model's resident part (everything but the FFN
records), the predictor, the KV cache and buffers, plus --ffn-fraction of the FFN
records. Streamed reads use direct I/O, so the page cache neither holds nor hides
them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import flashlm  # noqa: E402
from flashlm.io import device_read_bytes  # noqa: E402
from flashlm.units import format_size  # noqa: E402
from flash_quality import TEXT  # noqa: E402
from flashlm.runtime.convert import cached  # noqa: E402

N_CTX = 256


def rows(predictor: str, keep: float, window: int):
    return [
        ("in-RAM (compiled step)", None),
        ("in-RAM (flash, layer path)", dict(predictor=None, window=1 << 30, resident=True)),
        ("naive", dict(predictor=None, window=0, bundled=True)),
        ("+ predictor", dict(predictor=predictor, keep=keep, window=0, bundled=False)),
        ("+ windowing", dict(predictor=predictor, keep=keep, window=window, hot=False, bundled=False)),
        ("+ bundling", dict(predictor=predictor, keep=keep, window=window, hot=False, bundled=True)),
        ("+ hot neurons", dict(predictor=predictor, keep=keep, window=window, hot=True, prefetch=False)),
        ("+ prefetch (all)", dict(predictor=predictor, keep=keep, window=window, hot=True, prefetch=True)),
        ("all but windowing", dict(predictor=predictor, keep=keep, window=0, bundled=True)),
    ]


def budget_for(path, fraction: float, predictor: str, keep: float, window: int) -> tuple[int, int]:
    """(budget bytes, FFN record bytes): the fixed parts plus `fraction` of the FFN
    records the windows would hold (below keep, the windows hold part of a token's
    neurons and the spill buffer reads the rest each token). Planned in a fresh
    process, as a run starts (the tokenizer's share is measured there)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", PLAN, str(path), str(N_CTX), predictor, str(keep), str(window)],
                         capture_output=True, text=True, check=True).stdout.split()
    fixed, ffn = int(out[-2]), int(out[-1])
    return int(fixed + fraction * ffn), ffn


PLAN = """
import sys, flashlm
m = flashlm.load(sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=1, memory_budget=1 << 50,
                  streaming=dict(predictor=sys.argv[3], keep=float(sys.argv[4]), window=int(sys.argv[5])))
print(m.plan.fixed, m.plan.full - m.plan.fixed)
"""


ROW = """
import json, sys
sys.path.insert(0, sys.argv[1])
import bench_flash
args = json.loads(sys.argv[2])
print("ROW " + json.dumps(bench_flash.row_here(*args)))
"""


def run_row(path, settings, budget, n_gen: int, skip: int, threads: int) -> dict:
    """One row, in a fresh process: its memory plan measures the tokenizer as a user's
    run would (in a process that loaded it before, freed memory is reused and the
    windows would get more than the budget's share), and no row inherits another's pages."""
    import json
    import subprocess

    args = json.dumps([str(path), settings, budget, n_gen, skip, threads])
    r = subprocess.run([sys.executable, "-c", ROW, str(Path(__file__).resolve().parent), args],
                       capture_output=True, text=True)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("ROW ")]
    if r.returncode or not line:
        raise SystemExit(f"row failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(line[0][4:])


def row_here(path, settings, budget, n_gen: int, skip: int, threads: int) -> dict:
    resident = settings.pop("resident", False) if settings else False
    m = flashlm.load(path, n_ctx=N_CTX, n_threads=threads, memory_budget=None if resident or settings is None
                      else budget, streaming=settings)
    try:
        return _decode(m, resident, n_gen, skip)
    finally:
        m.close()


def _decode(m, resident: bool, n_gen: int, skip: int) -> dict:
    store = m.store
    if resident:
        store.resident = True
    text = m.tokenize(TEXT.read_text())  # decode fed with real text, token by token (teacher forcing):
    tokens, feed = text[:16], text[16:16 + n_gen]  # varied inputs, also for a random model's repetitive output
    m.reset()
    m.eval(tokens)
    m.take_stats()
    times, dev = [], []
    for tok in feed:
        d0 = device_read_bytes()
        t0 = time.perf_counter()
        m.eval([tok])
        times.append(time.perf_counter() - t0)
        dev.append(device_read_bytes() - d0)
    stats = m.take_stats()[skip:]
    times, dev = times[skip:], dev[skip:]
    med = statistics.median
    out = dict(ms=1e3 * med(times), tok_s=1 / med(times), dev=med(dev))
    if any(s.neurons_needed for s in stats):  # streamed
        out.update(bytes=med(s.bytes_read for s in stats), reads=med(s.reads for s in stats),
                   mean_read=med(s.mean_read for s in stats), io=1e3 * med(s.io_wait_s for s in stats),
                   book=1e3 * med(s.bookkeeping_s for s in stats), hit=med(s.window_hit_rate for s in stats))
        out["compute"] = out["ms"] - out["io"] - out["book"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", action="append", help="registry name or GGUF path (repeatable)")
    ap.add_argument("--ffn-fraction", type=float, default=0.9,
                    help="share of the FFN records the budget holds (default 0.9)")
    ap.add_argument("--predictor", choices=["gate", "lowrank"], default="gate")
    ap.add_argument("--keep", type=float, default=0.8, help="fraction of neurons a token keeps (default 0.8)")
    ap.add_argument("--window", type=int, default=16, help="tokens whose neurons stay (default 16)")
    ap.add_argument("-n", "--n-gen", type=int, default=24, help="tokens decoded per row (default 24)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--rounds", type=int, default=3,
                    help="rounds over the rows, each row in a fresh process; medians shown (default 3)")
    ap.add_argument("--rows", help="semicolon-separated row names to run (default: all), e.g. 'naive;+ prefetch (all)'")
    ap.add_argument("--honesty", action="store_true", help="instead: peak RSS of streamed runs against the budget")
    args = ap.parse_args(argv)
    if args.honesty:
        honesty(args.model or ["smollm2-135m"], args.ffn_fraction, args.predictor, args.keep, args.window, args.n_gen)
        return 0
    for model in args.model or ["smollm2-135m"]:
        src = flashlm.formats.registry.resolve(model)
        path = cached(model)
        budget, ffn = budget_for(path, args.ffn_fraction, args.predictor, args.keep, args.window)
        print(f"\n{src.name}: budget {format_size(budget)} = {budget / src.stat().st_size:.0%} of the source file "
              f"({format_size(src.stat().st_size)}); {args.ffn_fraction:.0%} of the {format_size(ffn)} of streamed FFN "
              f"rows fit; predictor {args.predictor}, keep {args.keep}, window {args.window}, {args.threads} threads, "
              f"{args.n_gen} tokens (first {args.window + 1} skipped)\n")
        print("| configuration | MB read/token | device MB/token | reads/token | mean read KiB | I/O ms | "
              "bookkeeping ms | compute ms | tok/s | window hit |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        wanted = [(name, st) for name, st in rows(args.predictor, args.keep, args.window)
                  if not args.rows or name in args.rows.split(";")]
        runs: dict[str, list] = {name: [] for name, _ in wanted}
        for rnd in range(args.rounds):  # rounds interleave the rows: the disk's and CPU's drift hits them alike
            for name, settings in wanted:
                if rnd and runs[name][0]["ms"] * args.n_gen > 60e3:
                    continue  # a row that took over a minute runs once (the unbundled rows; no target's)
                target = src if settings is None else path
                runs[name].append(run_row(target, dict(settings) if settings else None, budget, args.n_gen,
                                          args.window + 1, args.threads))
        results = {}
        for name, rs in runs.items():
            r = results[name] = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
            spread = f" ({min(x['tok_s'] for x in rs):.2f}-{max(x['tok_s'] for x in rs):.2f})" if len(rs) > 1 else ""
            if "bytes" in r:
                print(f"| {name} | {r['bytes'] / 1e6:.2f} | {r['dev'] / 1e6:.2f} | {r['reads']:.0f} | "
                      f"{r['mean_read'] / 1024:.1f} | {r['io']:.1f} | {r['book']:.1f} | {r['compute']:.1f} | "
                      f"{r['tok_s']:.2f}{spread} | {r['hit']:.2f} |", flush=True)
            else:
                print(f"| {name} | 0 | {r['dev'] / 1e6:.2f} | 0 | - | 0 | 0 | {r['ms']:.1f} | {r['tok_s']:.2f}{spread} | - |",
                      flush=True)
        if not {"+ prefetch (all)", "naive", "in-RAM (compiled step)", "in-RAM (flash, layer path)"} <= set(results):
            continue
        allt, naive = results["+ prefetch (all)"], results["naive"]
        per_round = [a["tok_s"] / b["tok_s"] for a, b in zip(runs["+ prefetch (all)"], runs["naive"])]
        print(f"\nall techniques / naive: {allt['tok_s'] / naive['tok_s']:.2f}x tok/s (medians; per round "
              f"{', '.join(f'{x:.2f}x' for x in per_round)}); "
              f"all / in-RAM (compiled): {allt['tok_s'] / results['in-RAM (compiled step)']['tok_s']:.2f}x; "
              f"all / in-RAM (layer path): {allt['tok_s'] / results['in-RAM (flash, layer path)']['tok_s']:.2f}x")
    return 0



IDLE = """
import psutil
from flashlm.apps.profile import idle_rss
idle_rss(psutil.Process())  # llama_cpp, numba and the kernels loaded and run once on a tiny weight: no model
"""

STREAMED = """
import sys, flashlm
m = flashlm.load(sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=2, memory_budget=int(sys.argv[3]),
                 streaming=dict(predictor=sys.argv[4], keep=float(sys.argv[5]), window=int(sys.argv[6])))
m.generate("The history of the city begins in the early years of the century, when", max_tokens=int(sys.argv[7]),
           temperature=0.0)
"""


def peak_rss(code: str, *argv) -> int:
    """Peak RSS (bytes) of `code` run in a fresh interpreter: its VmHWM as it ends. (Not
    the child's ru_maxrss, which on Linux keeps the high-water mark of the process it
    was forked from: after this process converted a model, a child's peak read 1-3 GB.)"""
    import subprocess

    probe = code + "\nprint('VmHWM', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    r = subprocess.run([sys.executable, "-c", probe, *map(str, argv)], capture_output=True, text=True)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("VmHWM ")]
    if r.returncode or not line:
        raise RuntimeError(f"child failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
    return int(line[0].split()[1]) * 1024


def honesty(models, fraction: float, predictor: str, keep: float, window: int, n_gen: int) -> None:
    """Peak RSS of a streamed run against its budget plus an idle flashlm process."""
    idle = peak_rss(IDLE)
    print(f"\nbudget honesty: an idle flashlm process (numpy, numba, llama_cpp, its kernels loaded and run on a "
          f"tiny weight, no model) peaks at "
          f"{format_size(idle)}\n")
    print("| model | budget | peak RSS | budget + idle | within |")
    print("|---|---:|---:|---:|---|")
    for model in models:
        path = cached(model)
        budget, _ = budget_for(path, fraction, predictor, keep, window)
        peak = peak_rss(STREAMED, path, N_CTX, budget, predictor, keep, window, n_gen)
        print(f"| {Path(path).name} | {format_size(budget)} | {format_size(peak)} | {format_size(budget + idle)} | "
              f"{'yes' if peak <= budget + idle else 'NO'} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
