"""Speculative decoding (runtime/speculate.py): one pass verifies drafted tokens, each row
what a decode step gives; greedy output is the same with every draft source, on models
resident and streamed; sampling keeps the model's distribution."""

from __future__ import annotations

import numpy as np
import pytest

import flashlm
from flashlm.errors import InvalidArgumentError
from flashlm.runtime.blocks import KVCache
from flashlm.runtime.sampler import Sampler, SamplingParams
from flashlm.runtime.speculate import NgramDraft, Speculation

# a prompt whose continuation repeats it (prompt lookup's case), and a free-form one
REPEAT = ("Copy the list exactly.\nList: apples, pears, plums, figs, dates, limes, kiwis, grapes.\n"
          "Copy: apples, pears,")
FREE = "The capital of France is"
FIXED = dict(adaptive=False, draft_max=6)  # speculate every step (adaptive may pause it on a busy machine)


def _greedy(m, prompt, n=24, **kw):
    chunks = list(m.stream(prompt, max_tokens=n, temperature=0, **kw))
    return "".join(c.text for c in chunks), chunks[-1].speculation


def test_ngram_drafts_the_continuation_of_the_latest_match():
    d = NgramDraft()
    assert d.propose([1, 2, 3, 4, 9, 1, 2, 3], 3) == [4, 9, 1]
    assert d.propose([5, 1, 2, 7, 1, 2], 2) == [7, 1]  # the latest earlier match of the longest n
    assert d.propose([1, 2, 3], 4) == []  # nothing earlier matches
    assert d.propose([7, 7, 7], 4) == [7]  # a match runs into the context's end


@pytest.mark.parametrize("q_kind", ["one-hot", "distribution"])
def test_speculative_sampling_keeps_the_models_distribution(q_kind):
    """Drafts from q (fixed tokens, or draws from a distribution unlike p), kept or
    replaced by the rejection rule: the tokens come out distributed as p (chi-square, 6
    tokens, 40,000 draws; the critical value for p = 0.001 at 5 degrees of freedom)."""
    logits = np.log(np.array([0.35, 0.25, 0.2, 0.1, 0.06, 0.04], dtype=np.float32))
    p = np.exp(logits) / np.exp(logits).sum()
    q = np.array([0.05, 0.1, 0.15, 0.2, 0.2, 0.3])
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1))
    rng = np.random.default_rng(2)
    n = 40_000
    counts = np.zeros(6)
    for _ in range(n):
        if q_kind == "one-hot":
            draft, qq = 3, None  # a draft that is usually wrong, proposed with certainty
        else:
            draft, qq = int(rng.choice(6, p=q)), q
        counts[s(logits, [], draft, qq)] += 1
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
    assert chi2 < 20.5, (counts / n, p)
    # and the rule is not a plain draw in disguise: the draft is kept as often as theory says
    kept = np.mean([s(logits, [], 3, None) == 3 for _ in range(4000)])
    assert abs(kept - p[3]) < 0.03


def test_a_verification_pass_is_each_tokens_decode_step_bit_for_bit(smollm2):
    """blocks.FusedDecoder.verify over 5 tokens against 5 decode steps: the same logits
    and the same keys and values."""
    toks = smollm2.tokenize(FREE)
    fused = smollm2.model.fused
    a, b = KVCache(smollm2.config, 64), KVCache(smollm2.config, 64)
    for j, t in enumerate(toks[:3]):
        fused.step(t, j, a)
        fused.step(t, j, b)
    one = np.stack([fused.step(t, 3 + j, a) for j, t in enumerate(toks[3:] + [42, 7])])
    many = fused.verify(toks[3:] + [42, 7], 3, b)
    assert np.array_equal(one, many)
    n = 3 + len(toks[3:]) + 2
    assert np.array_equal(a.k[:, :, :n], b.k[:, :, :n]) and np.array_equal(a.v[:, :, :n], b.v[:, :, :n])


def test_greedy_output_is_the_same_with_speculation_in_ram(smollm2, smollm2_path, gemma3_path):
    with flashlm.load(smollm2_path, n_ctx=512, n_threads=2, speculative=f"model:{smollm2_path}") as m:
        for prompt in (REPEAT, FREE):
            want, none = _greedy(smollm2, prompt)
            assert none is None
            for spec in (dict(source="ngram", **FIXED), dict(source=f"model:{smollm2_path}", **FIXED)):
                got, st = _greedy(m, prompt, speculative=spec)
                assert got == want and st.passes > 0, spec
        assert st.accepted > 0  # the draft model is the model itself: most drafts are kept
        with pytest.raises(InvalidArgumentError, match="not loaded"):
            m.generate(FREE, speculative=f"model:{gemma3_path}")
    with flashlm.load(gemma3_path, n_ctx=256, n_threads=2, speculative=f"model:{gemma3_path}") as g:
        want, _ = _greedy(g, REPEAT, speculative=False)
        for src in ("ngram", f"model:{gemma3_path}"):
            got, st = _greedy(g, REPEAT, speculative=dict(source=src, **FIXED))
            assert got == want and st.accepted > 0, src


@pytest.mark.parametrize("kind", ["flash-smollm2", "flash-gemma3", "moe"])
def test_greedy_output_is_the_same_with_speculation_when_streamed(flash_files, moe_gguf, smollm2_path, gemma3_path,
                                                                   kind):
    """Streamed models (half of the FFN records, less the spill buffer; half of the
    experts), every draft source: the same greedy text; the passes read the union of the
    tokens' neurons or experts, and 'self' reads nothing to draft. (The draft model is
    the resident original of the streamed file, or SmolLM2 for the MoE built on its
    vocabulary.)"""
    if kind == "moe":
        path, draft = moe_gguf("qwen2moe"), smollm2_path
    else:
        path = flash_files[kind.split("-")[1]]
        draft = smollm2_path if kind == "flash-smollm2" else gemma3_path
    with flashlm.load(path, n_ctx=256, memory_budget=1 << 40, speculative=f"model:{draft}") as m:  # the plan's parts
        p = m.plan  # (its fixed part counts the draft model)
        half = p.n_experts // 2 * p.expert_bytes if kind == "moe" else (p.full - p.fixed) // 2
        kw = dict(memory_budget=p.fixed + half)
    with flashlm.load(path, n_ctx=256, n_threads=2, speculative=f"model:{draft}", **kw) as m:
        assert m.layout != "every weight resident (mapped)" and m.plan.draft > 0
        if kind == "moe":
            assert m.plan.n_slots < m.plan.n_experts
        else:
            assert sum(w.cap for w in m.store.windows) < sum(lb.n_ff for lb in m.store.plans) / 2
        want, none = _greedy(m, REPEAT, speculative=False)
        assert none is None
        for source in ("ngram", "self", f"model:{draft}"):
            got, st = _greedy(m, REPEAT, speculative=dict(source=source, **FIXED))
            assert got == want, source
            if source == "self" or kind != "moe":  # (random weights write no text to look up)
                assert st.passes > 0 and st.produced >= st.passes


def test_the_draft_model_is_loaded_checked_and_counted(smollm2_path, gemma3_path):
    with pytest.raises(InvalidArgumentError, match="vocabulary"):
        flashlm.load(smollm2_path, n_ctx=256, speculative=f"model:{gemma3_path}")
    with flashlm.load(smollm2_path, n_ctx=256, memory_budget="600MiB",
                      speculative=f"model:{smollm2_path}") as m:
        assert m.plan.draft > 90 << 20 and "draft model" in m.plan.table()
    with pytest.raises(InvalidArgumentError, match="streamed model"):
        flashlm.load(smollm2_path, n_ctx=256, speculative="self")
    with pytest.raises(InvalidArgumentError, match="unknown draft source"):
        flashlm.load(smollm2_path, n_ctx=256, speculative="medusa")
    with pytest.raises(InvalidArgumentError, match="draft lengths"):
        Speculation.parse(dict(source="ngram", draft_min=5, draft_max=2))


def test_adaptive_speculation_keeps_the_output_and_counts_what_it_did(smollm2):
    want, _ = _greedy(smollm2, REPEAT, n=48)
    got, _ = _greedy(smollm2, REPEAT, n=48, speculative="ngram")
    assert got == want
    before = smollm2.spec_stats.passes
    _greedy(smollm2, REPEAT, speculative=dict(source="ngram", **FIXED))
    assert smollm2.spec_stats.passes > before


def test_sampled_speculation_stays_within_the_grammar_and_limits(smollm2):
    """Sampling with drafts: max_tokens is kept exactly, stop strings cut as without."""
    chunks = list(smollm2.stream(REPEAT, max_tokens=17, temperature=0.7, seed=3,
                                 speculative=dict(source="ngram", **FIXED)))
    assert chunks[-1].n_generated == 17 and chunks[-1].finish_reason == "length"
    text = "".join(c.text for c in smollm2.stream(REPEAT, max_tokens=40, temperature=0, stop=["figs"],
                                                  speculative=dict(source="ngram", **FIXED)))
    assert "figs" not in text and text == smollm2.generate(REPEAT, max_tokens=40, temperature=0, stop=["figs"])


def test_the_kv_cache_keeps_only_accepted_tokens(smollm2):
    """After a speculative generation the cache holds the prompt and the tokens run (every
    generated one but the last), not a rejected draft."""
    prompt = smollm2.tokenize(REPEAT)
    chunks = list(smollm2.stream(prompt, max_tokens=24, temperature=0, speculative=dict(source="ngram", **FIXED)))
    out = [c.token for c in chunks if c.token is not None]
    assert chunks[-1].speculation.drafted > chunks[-1].speculation.accepted  # some drafts were rejected
    assert smollm2._ctx.tokens == prompt + out[:-1]


def test_the_batch_engine_speculates_for_a_sequence_alone(smollm2_path):
    """The server's engine: one sequence at a time drafts and verifies (the same greedy
    text as generate()); several decode together in plain batched steps."""
    with flashlm.load(smollm2_path, n_ctx=512, n_threads=2, speculative=dict(source="ngram", **FIXED)) as m:
        want = m.generate(REPEAT, max_tokens=24, temperature=0, speculative=False)
        with m.batch(parallel=2) as engine:
            assert engine.generate([REPEAT], max_tokens=24, temperature=0) == [want]
            assert engine.spec_stats.passes > 0 and engine.spec_stats.accepted > 0
            assert engine.generate([REPEAT, FREE], max_tokens=24, temperature=0)[0] == want


def test_profile_and_bench_report_speculation(smollm2_path, tmp_path):
    """`flashlm profile --draft` rows are passes (several tokens each), its summary the
    acceptance; `flashlm bench --draft ngram` adds the copy task for both engines."""
    from flashlm.apps.bench import run_bench
    from flashlm.apps.profile import profile_run

    prof = profile_run(smollm2_path, tmp_path, REPEAT, 24, n_ctx=256, n_threads=2, plot=False,
                       speculative=dict(source="ngram", **FIXED))
    sp = prof["summary"]["speculation"]
    assert sp["passes"] > 0 and sp["accepted"] > 0
    assert sum(r["tokens"] for r in prof["tokens"]) >= 23 and max(r["tokens"] for r in prof["tokens"]) > 1
    rows = run_bench(smollm2_path, threads=2, pp=0, tg=16, reps=1, draft="ngram")
    got = {(r.engine, r.test) for r in rows}
    assert {("flashlm", "copy16"), ("flashlm --draft ngram", "copy16"), ("llama.cpp", "copy16"),
            ("llama.cpp prompt lookup", "copy16")} <= got
    assert all(r.tok_s > 0 for r in rows)
