"""`flashlm profile`: what a model does token by token under a memory budget.

Writes DIR/profile.json (per decoded token: latency split into compute, I/O wait and
bookkeeping; bytes and reads from disk; window hits, or expert cache hits for a
mixture of experts; RSS), DIR/profile.png (latency
stacked by part; RSS against the budget) and prints a summary. With a sweep, runs
several budgets and plots tok/s against the budget (DIR/sweep.json, DIR/sweep.png).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import psutil

from ..errors import FlashLMError, InvalidArgumentError
from ..formats.registry import display_name
from ..stats import TokenStats

MIB = 2**20


def profile_run(spec, out_dir, prompt: str, n_tokens: int, memory_budget=None, n_ctx=None, n_threads=None,
                streaming=None, plot: bool = True, experts: dict | None = None, warn: bool = True,
                speculative=None, cache_type_k: str = "f16", cache_type_v: str = "f16") -> dict:
    """Profile one run; returns the profile dict (also written to out_dir). A
    mixture-of-experts model under a budget reports its expert cache instead of
    windows: hits are cached experts, I/O the wait for expert reads. warn: print a
    context longer than the model's trained one to stderr. speculative: greedy decoding
    with that draft source; a row per pass (a verification's `tokens` > 1) and the
    summary's `speculation` (acceptance, tokens per pass, MB read per token).
    cache_type_k, cache_type_v: the KV cache's types (load's)."""
    import flashlm

    proc = psutil.Process()
    base = idle_rss(proc)
    with flashlm.load(spec, n_ctx=n_ctx, n_threads=n_threads, memory_budget=memory_budget,
                      streaming=streaming, experts=experts, speculative=speculative, cache_type_k=cache_type_k,
                      cache_type_v=cache_type_v) as m:
        if warn:
            warn_context(m, spec)
        tokens = m.tokenize(prompt)
        if len(tokens) + n_tokens > m.n_ctx:
            raise InvalidArgumentError(f"{len(tokens)} prompt tokens + {n_tokens} do not fit n_ctx={m.n_ctx}; "
                                       "pass a larger -c or fewer tokens")
        m.take_stats()
        sp = None
        if speculative is None:
            logits = m.eval(tokens)
            prefill = TokenStats.total(m.take_stats())
            passes = []
            for _ in range(n_tokens):
                logits = m.eval([int(np.argmax(logits))])
                passes += m.take_stats()
        else:  # generated as a user's run is: drafts verified in passes of several tokens
            sp = list(m.stream(tokens, max_tokens=n_tokens, temperature=0))[-1].speculation
            every = m.take_stats()
            prefill = TokenStats.total(p for p in every if p.prefill)
            passes = [p for p in every if not p.prefill]
        rows = [dict(token=i, tokens=st.tokens, latency_ms=1e3 * st.seconds, compute_ms=1e3 * st.compute_s, io_ms=1e3 * st.io_wait_s,
                     bookkeeping_ms=1e3 * st.bookkeeping_s, bytes_read=st.bytes_read, reads=st.reads,
                     needed=st.neurons_needed + st.experts_needed, hits=st.neuron_hits + st.expert_hits,
                     rss_mib=st.rss / MIB) for i, st in enumerate(passes)]
        every = TokenStats.total(passes)
        plan = None if m.plan is None else dict(m.plan.as_dict(), prefetch=m.expert_prefetch)
        out = dict(model=display_name(spec), path=str(m.path), streamed=every.neurons_needed > 0,
                   experts=every.experts_needed > 0, memory_budget=m.memory_budget, n_ctx=m.n_ctx, n_threads=m.n_threads, plan=plan,
                   cache_type=m.cache_type, kv_bytes=m.n_ctx * m.kv_bytes_per_position,
                   idle_rss_mib=base / MIB, prompt_tokens=len(tokens), prefill_ms=1e3 * prefill.seconds,
                   prefill_bytes_read=prefill.bytes_read, tokens=rows)
    lat = [r["latency_ms"] / r["tokens"] for r in rows]  # per token (a verification pass runs several)
    needed = sum(r["needed"] for r in rows)
    hit_rate = sum(r["hits"] for r in rows) / needed if needed else None
    out["summary"] = dict(tokens_per_second=1e3 / float(np.median(lat)) if lat else 0.0,
                          median_latency_ms=float(np.median(lat)) if lat else 0.0,
                          io_share=sum(r["io_ms"] for r in rows) / max(1e-9, sum(lat)),
                          mb_read_per_token=sum(r["bytes_read"] for r in rows) / max(1, len(rows)) / 1e6,
                          window_hit_rate=None if out["experts"] else hit_rate,
                          expert_hit_rate=hit_rate if out["experts"] else None,
                          peak_rss_mib=max([r["rss_mib"] for r in rows], default=proc.memory_info().rss / MIB))
    if speculative is not None:  # tokens per second over the whole decode (passes differ in size)
        n = sum(r["tokens"] for r in rows)
        out["summary"].update(
            tokens_per_second=n / max(1e-9, sum(r["latency_ms"] for r in rows) / 1e3),
            mb_read_per_token=sum(r["bytes_read"] for r in rows) / max(1, n) / 1e6,
            speculation=None if sp is None else dict(passes=sp.passes, drafted=sp.drafted, accepted=sp.accepted,
                                                     acceptance=sp.acceptance, tokens_per_pass=sp.tokens_per_pass))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "profile.json").write_text(json.dumps(out, indent=1))
    if plot:
        _plot(out, out_dir / "profile.png")
    return out


def warn_context(model, spec) -> None:
    """Print context_warning's line on stderr, if there is one; spec names the model."""
    if w := context_warning(model, display_name(spec)):
        print(w, file=sys.stderr)


def context_warning(model, name: str) -> str | None:
    """The warning (one line) for a context longer than the one the model was trained on,
    else None: positions past it are ones the model never saw, and its text degrades there."""
    if model.n_ctx <= model.config.n_ctx_train:
        return None
    return (f"flashlm: warning: context {model.n_ctx} is longer than {name}'s trained context "
            f"({model.config.n_ctx_train} tokens); text past that may degrade")


def idle_rss(proc) -> int:
    """RSS of this process with the kernels loaded but no model: the overhead the
    budget does not cover (numba's compiler, the interpreter, the libraries, the
    compiled kernels, the decode step's among them)."""
    import llama_cpp  # noqa: F401  (the tokenizer's library: fixed, whatever the model)

    from .. import kernels_cpu as K
    from ..formats.modelfile import TensorRef

    from gguf import GGMLQuantizationType

    w = TensorRef("w", GGMLQuantizationType.Q8_0, (32, 64), np.zeros((32, 68), np.uint8), 0)  # a tiny weight
    x = np.ones((5, 64), np.float32)
    K.linear(x, w), K.linear(x[:1], w), K.glu(x, x, False)
    K.matvec_t(np.ones(4, np.float32), w, np.arange(4), np.zeros(64, np.float32))
    from ..runtime.warmup import warm_decode_kernels

    warm_decode_kernels()  # the compiled decode step and its per-layer pieces
    return proc.memory_info().rss


def _plot(prof: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = prof["tokens"]
    x = np.arange(len(rows))
    parts = [("compute", "compute_ms", "#4c72b0"), ("I/O wait", "io_ms", "#dd8452"),
             ("bookkeeping", "bookkeeping_ms", "#55a868")]
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    bottom = np.zeros(len(rows))
    for label, key, color in parts:
        v = np.array([r[key] for r in rows])
        a.bar(x, v, bottom=bottom, label=label, color=color, width=0.85)
        bottom += v
    a.set_ylabel("ms per token")
    a.set_title(f"{prof['model']}: decode latency by part"
                + (f", budget {prof['memory_budget'] / MIB:.0f} MiB" if prof["memory_budget"] else ""))
    a.legend(loc="upper right")
    b.plot(x, [r["rss_mib"] - prof["idle_rss_mib"] for r in rows], label="RSS above an idle process",
           color="#4c72b0")
    if prof["memory_budget"]:
        b.axhline(prof["memory_budget"] / MIB, color="#c44e52", linestyle="--", label="budget")
    b.set_ylim(bottom=0)
    b.set_ylabel("MiB")
    b.set_xlabel("decoded token")
    b.set_title(f"the model's memory: RSS minus the idle process's {prof['idle_rss_mib']:.0f} MiB "
                "(interpreter, numba, libraries)")
    b.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep(spec, out_dir, fractions: list[float], prompt: str, n_tokens: int, n_ctx=None, n_threads=None,
          streaming=None, experts: dict | None = None, speculative=None, cache_type_k: str = "f16",
          cache_type_v: str = "f16") -> list[dict]:
    """Profile at budgets that are `fractions` of what holds every streamed neuron (or,
    for a mixture of experts, every expert); budgets below the minimum are recorded as such."""
    import flashlm

    kv = {"cache_type_k": cache_type_k, "cache_type_v": cache_type_v}
    with flashlm.load(spec, n_ctx=n_ctx, n_threads=1, memory_budget=1 << 50, streaming=streaming,
                      experts=experts, **kv) as m:
        warn_context(m, spec)
        if not m.plan.cache:  # every weight resident: no budget to sweep
            raise FlashLMError("--sweep needs a model in the flash layout (flashlm convert --flash OUT) or a "
                               "mixture of experts")
        full = m.plan.full
    out_dir = Path(out_dir)
    results = []
    for f in fractions:
        budget = int(f * full)
        try:
            prof = profile_run(spec, out_dir / f"budget-{f:.0%}", prompt, n_tokens, budget, n_ctx, n_threads,
                               streaming, experts=experts, warn=False, speculative=speculative, **kv)
            results.append(dict(fraction=f, budget=budget, **prof["summary"]))
        except FlashLMError as e:
            results.append(dict(fraction=f, budget=budget, error=str(e)))
    (out_dir / "sweep.json").write_text(json.dumps(dict(full=full, runs=results), indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["budget"] / MIB for r in ok], [r["tokens_per_second"] for r in ok], marker="o")
    ax.set_xlabel("memory budget (MiB)")
    ax.set_ylabel("decode tok/s")
    ax.set_title("tok/s against the memory budget")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "sweep.png", dpi=100)
    plt.close(fig)
    return results


def parse_fractions(text: str) -> list[float]:
    try:
        out = [float(t.strip().rstrip("%")) / 100 for t in text.split(",") if t.strip()]
    except ValueError:
        raise InvalidArgumentError(f"bad --sweep '{text}': give percentages like 50%,75%,100%") from None
    if not out or any(f <= 0 for f in out):
        raise InvalidArgumentError(f"bad --sweep '{text}': give positive percentages like 50%,75%,100%")
    return out


def summary_table(prof: dict) -> str:
    s = prof["summary"]
    hits = s["expert_hit_rate"] if prof.get("experts") else s["window_hit_rate"]
    lines = [f"{prof['model']}: {len(prof['tokens'])} tokens after a {prof['prompt_tokens']}-token prompt "
             f"({prof['prefill_ms']:.0f} ms)",
             f"| tok/s | median ms | I/O share | MB read/token | {'expert cache hits' if prof.get('experts') else 'window hits'}"
             " | peak RSS MiB |",
             "|---:|---:|---:|---:|---:|---:|",
             f"| {s['tokens_per_second']:.1f} | {s['median_latency_ms']:.1f} | {s['io_share']:.0%} | "
             f"{s['mb_read_per_token']:.2f} | "
             f"{'-' if hits is None else format(hits, '.0%')} | "
             f"{s['peak_rss_mib']:.0f} |"]
    if s.get("speculation"):
        sp = s["speculation"]
        lines.append(f"speculation: {sp['drafted']} drafted, {sp['accepted']} accepted ({sp['acceptance']:.0%}), "
                     f"{sp['tokens_per_pass']:.2f} tokens per pass")
    if prof.get("cache_type"):
        lines.append(f"KV cache: {prof['cache_type']}, {prof['kv_bytes'] / MIB:.1f} MiB at n_ctx={prof['n_ctx']}")
    if prof.get("experts") and prof["plan"]:
        p = prof["plan"]
        lines.append(f"expert cache: {p['n_slots']:,} of {p['n_experts']:,} experts; prefetch {p['prefetch']}")
    return "\n".join(lines)


def ensure_dir(path: str) -> str:
    """Make the output folder now, so a bad -o fails before the model loads."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InvalidArgumentError(f"-o {path}: exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise InvalidArgumentError(f"-o {path}: cannot create the folder ({e.strerror}); pick another") from e
    if not os.access(path, os.W_OK):
        raise InvalidArgumentError(f"-o {path}: the folder is not writable; pick another")
    return path
