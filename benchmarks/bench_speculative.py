"""Speculative decoding against plain decoding, in the same run: decode tok/s (the last
chunk's: tokens after the first over the time since it), acceptance, tokens per
verification pass, and the bytes read from the disk per generated token
(/proc/self/io's read_bytes; streamed weights are read with direct I/O).

Cases (each a fresh process per run; rounds interleave plain and speculative runs; the
ratio is the median over rounds of each round's speculative over plain tok/s):
- ram-repeat:  SmolLM2 in RAM, `ngram`, a chat reply that copies a given paragraph and
               code (prompt lookup's case); llama.cpp's LlamaPromptLookupDecoding beside
- ram-chat:    SmolLM2 in RAM, `ngram` with adaptive drafting, a free-form chat reply
- flash-*:     SmolLM2 / Gemma 3 in the flash layout, half of the FFN rows in the
               budget (bench_flash.budget_for), `self` and `ngram` drafts
- moe-*:       a mixture of experts with half of its experts in the cache, `self`
Greedy decoding throughout; each speculative run's text is checked against the plain
run's (it must be identical).

    python benchmarks/bench_speculative.py [--reps 3] [-n 128] [--cases ram-repeat,ram-chat,...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_load import cpu_flags

HERE = Path(__file__).resolve().parent

PARAGRAPH = ("The river rises in the northern hills, runs south through the old market town, and turns east "
             "below the mill before it reaches the sea. Its water was once used to drive the looms of the "
             "town, and the mill still stands beside the weir.")
CODE = ("def moving_average(values, window):\n    out = []\n    total = 0.0\n    for i, v in enumerate(values):\n"
        "        total += v\n        if i >= window:\n            total -= values[i - window]\n"
        "        out.append(total / min(i + 1, window))\n    return out\n")
REPEAT = [{"role": "user", "content": "Copy this paragraph and this code exactly, then stop.\n\n" + PARAGRAPH +
           "\n\n```python\n" + CODE + "```"}]
CHAT = [{"role": "user", "content": "Give me three tips for staying focused while studying."}]

CHILD = r"""
import hashlib, json, sys, time
import flashlm
from flashlm.io import device_read_bytes
path, kw, spec, messages, n = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
with flashlm.load(path, n_ctx=1024, n_threads=2, **kw) as m:
    toks = m.chat_tokens(messages)
    m.generate(toks[:16], max_tokens=8, temperature=0, speculative=spec)  # warm: kernels, windows, cache
    r0 = device_read_bytes()
    chunks = list(m.stream(toks, max_tokens=n, temperature=0, speculative=spec))
    read = device_read_bytes() - r0
    last, text = chunks[-1], "".join(c.text for c in chunks)
    sp = last.speculation
    print("ROW " + json.dumps(dict(
        tok_s=last.tokens_per_second, n=last.n_generated, mb_per_token=read / 1e6 / max(1, last.n_generated),
        acceptance=sp.acceptance if sp else None, per_pass=sp.tokens_per_pass if sp else None,
        passes=sp.passes if sp else 0, text=hashlib.md5(text.encode()).hexdigest()[:10],
        sample=text[:60])))
"""

LLAMA = r"""
import json, sys, time
import llama_cpp
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
path, messages, n, lookup = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
kw = dict(draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10), logits_all=True) if lookup else {}
llm = llama_cpp.Llama(path, n_ctx=1024, n_threads=2, verbose=False, **kw)
llm.create_chat_completion(messages, max_tokens=4, temperature=0)  # warm
t0 = time.perf_counter()
llm.create_chat_completion(messages, max_tokens=1, temperature=0)
t_first = time.perf_counter() - t0
t0 = time.perf_counter()
r = llm.create_chat_completion(messages, max_tokens=n, temperature=0)
dt = time.perf_counter() - t0
k = r["usage"]["completion_tokens"]
print("ROW " + json.dumps(dict(tok_s=(k - 1) / max(dt - t_first, 1e-9), n=k)))
"""


def child(code: str, *args) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=HERE,
                         check=False)
    for line in out.stdout.splitlines():
        if line.startswith("ROW "):
            return json.loads(line[4:])
    raise RuntimeError(f"child failed:\n{out.stderr[-3000:]}")


def flash_file(name: str, folder: Path) -> tuple[str, dict]:
    """The flash layout of a registry model (converted once into folder), and a budget
    for half of its FFN rows."""
    from bench_flash import budget_for

    from flashlm.formats import registry
    from flashlm.runtime import convert

    out = folder / f"{name}.flash.gguf"
    if not out.exists():
        convert.convert(registry.pull(name, quiet=True), out)
    budget, _ = budget_for(out, 0.5, "gate", 0.8, 16)
    return str(out), dict(memory_budget=budget)


def moe_file(kind: str, folder: Path) -> tuple[str, dict]:
    """A mixture of experts (the synthetic one, or MoEfied SmolLM2, written if missing)
    and a budget for half of its experts."""
    from flashlm.formats import registry

    if kind == "synthetic":
        path = folder / "synthetic-moe.gguf"
        if not path.exists():
            subprocess.run([sys.executable, str(HERE / "make_synthetic.py"), "--moe", str(path)], check=True)
    else:  # moefy.py's file in the user cache (written there once: calibration takes minutes)
        path = registry.home() / "moe" / "smollm2-moe-24x64-top6.gguf"
        if not path.exists():
            subprocess.run([sys.executable, str(HERE / "moefy.py"), "--top-k", "6", "--no-parity"], check=True)
    plan = child(r"""
import json, sys, flashlm
with flashlm.load(sys.argv[1], n_ctx=1024, memory_budget=1 << 45) as m:
    print("ROW " + json.dumps(dict(fixed=m.plan.fixed, expert=m.plan.expert_bytes, n=m.plan.n_experts)))
""", path)
    return str(path), dict(memory_budget=plan["fixed"] + plan["n"] // 2 * plan["expert"])


def run_case(name, path, kw, messages, drafts, n, reps, llama=False) -> list[str]:
    rows = {"plain": []} | {d: [] for d in drafts}
    for _ in range(reps):
        for label in rows:
            spec = None if label == "plain" else json.loads(label) if label.startswith("{") else label
            rows[label].append(child(CHILD, path, json.dumps(kw), json.dumps(spec), json.dumps(messages), n))
    lines = []
    base = rows["plain"]
    for label, runs in rows.items():
        med = statistics.median(r["tok_s"] for r in runs)
        ratio = statistics.median(r["tok_s"] / b["tok_s"] for r, b in zip(runs, base))
        same = all(r["text"] == b["text"] for r, b in zip(runs, base))
        acc = "-" if runs[0]["acceptance"] is None else f"{statistics.median(r['acceptance'] for r in runs):.0%}"
        per = "-" if runs[0]["per_pass"] is None else f"{statistics.median(r['per_pass'] for r in runs):.2f}"
        mb = statistics.median(r["mb_per_token"] for r in runs)
        lines.append(f"| {name} | {label} | {med:.1f} | {ratio:.2f}x | {acc} | {per} | {mb:.2f} | "
                     f"{'yes' if same else 'NO'} |")
    if llama:
        plain = [child(LLAMA, path, json.dumps(messages), n, 0) for _ in range(reps)]
        look = [child(LLAMA, path, json.dumps(messages), n, 1) for _ in range(reps)]
        pm, lm = statistics.median(r["tok_s"] for r in plain), statistics.median(r["tok_s"] for r in look)
        lines.append(f"| {name} | llama.cpp plain | {pm:.1f} | | | | | |")
        lines.append(f"| {name} | llama.cpp prompt lookup (10) | {lm:.1f} | {lm / pm:.2f}x | | | | |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("--cases", default="ram-repeat,ram-chat,flash-smollm2,flash-gemma3,moe-smollm2,moe-synthetic")
    ap.add_argument("--dir", default=None, help="folder for the converted files (default: a temporary one)")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from flashlm.formats import registry

    print(f"CPU flags: {cpu_flags()}; 2 threads; greedy; medians of {args.reps} interleaved rounds\n")
    print("| case | draft | tok/s | vs plain | acceptance | tokens/pass | MB read/token | same text |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    smollm2 = str(registry.pull("smollm2-135m", quiet=True))
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        folder = Path(d)
        for case in args.cases.split(","):
            if case == "ram-repeat":
                lines = run_case(case, smollm2, {}, REPEAT, ["ngram", '{"source": "ngram", "adaptive": false}'],
                                 args.n, args.reps, llama=True)
            elif case == "ram-chat":
                lines = run_case(case, smollm2, {}, CHAT, ["ngram", '{"source": "ngram", "adaptive": false}'],
                                 args.n, args.reps)
            elif case.startswith("flash-"):
                path, kw = flash_file({"smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}[case[6:]], folder)
                lines = run_case(case, path, kw, REPEAT, ['{"source": "self", "adaptive": false}', "self", "ngram"],
                                 args.n, args.reps)
            elif case.startswith("moe-"):
                path, kw = moe_file(case[4:], folder)
                lines = run_case(case, path, kw, REPEAT, ['{"source": "self", "adaptive": false}', "self", "ngram"],
                                 args.n, args.reps)
            else:
                raise SystemExit(f"unknown case {case}")
            print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
