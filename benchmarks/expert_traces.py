"""Record a mixture-of-experts model's routing on text, then simulate the expert cache's
policies on it: hit rate against cache size (a multiple of top-k per layer).

    python benchmarks/expert_traces.py -m MOE.gguf [-n 256] [--sizes 1,1.5,2,3,4,6] [--save t.npz]
    python benchmarks/expert_traces.py --trace t.npz

Decoding is fed tests/data/eval_text.txt token by token (teacher forcing); the first
--warmup tokens fill the cache and are not counted. The simulator replays the trace
through the runtime's own SlotCache (flashlm/cache), so the policy it picks is the one
the expert store runs. Used to choose the default policy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flashlm.cache import POLICIES  # noqa: E402
from flashlm.experts import trace as tr  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "eval_text.txt"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", help="a MoE GGUF to record")
    ap.add_argument("--trace", help="instead: a saved trace (.npz)")
    ap.add_argument("-n", "--n-tokens", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--sizes", default="1,1.5,2,3,4,6", help="cache sizes in multiples of top-k per layer")
    ap.add_argument("--save", help="write the recorded trace here (.npz)")
    args = ap.parse_args(argv)
    if args.trace:
        trace, name = tr.load(args.trace), Path(args.trace).name
    elif args.model:
        import flashlm

        with flashlm.load(args.model, n_ctx=args.n_tokens + 16, n_threads=2) as m:
            tokens = m.tokenize(TEXT.read_text())[:args.n_tokens + 1]
            trace = tr.record(m, tokens)
        name = Path(args.model).name
        if args.save:
            tr.save(trace, args.save)
    else:
        ap.error("give -m MODEL or --trace FILE")
    T, L, k = trace.ids.shape
    E = trace.probs.shape[2]
    sizes = [float(s) for s in args.sizes.split(",")]
    print(f"\n{name}: {T} decoded tokens, {L} layers, top {k} of {E} experts (first {args.warmup} tokens uncounted)\n")
    print("| policy | " + " | ".join(f"{s:g}k/layer ({min(1.0, s * k / E):.0%})" for s in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    best = {}
    for policy in POLICIES:
        rates = [tr.simulate(trace, max(k, int(s * k * L)), policy, args.warmup) for s in sizes]
        best[policy] = sum(rates)
        print(f"| {policy} | " + " | ".join(f"{r:.1%}" for r in rates) + " |")
    rates = [tr.belady(trace, max(k, int(s * k * L)), args.warmup) for s in sizes]
    print("| oracle (Belady, offline: no policy does better) | " + " | ".join(f"{r:.1%}" for r in rates) + " |")
    print(f"\nhighest mean hit rate over these sizes: {max(best, key=best.get)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
