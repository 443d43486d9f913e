"""Batched generation (runtime/batch.py): several sequences in one forward pass per step,
the prompt cache, slots saved to disk, cancelling, and the memory plan's share."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import flashlm
from flashlm.errors import ContextLengthError, FlashLMError, InvalidArgumentError

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,", "def fib(n):",
           "The three primary colors are", "1, 2, 3, 4,"]
GREEDY = dict(temperature=0, max_tokens=20)


def _resident_and_streamed(smollm2_path, moe_gguf, flash_files):
    return {"dense": (smollm2_path, {}),
            "flash": (flash_files["smollm2"], dict(memory_budget="125MiB")),
            "moe": (moe_gguf("qwen2moe"), dict(memory_budget=1 << 40))}


@pytest.mark.parametrize("kind", ["dense", pytest.param("flash", marks=pytest.mark.slow),
                                  pytest.param("moe", marks=pytest.mark.slow)])
def test_batched_greedy_output_is_each_prompts_own(smollm2_path, moe_gguf, flash_files, kind):
    """Sequences of different lengths decode together, more than there are slots (the
    rest queue): each completion is the one generate() gives alone. (Streamed models'
    batched steps are checked in tests/kernels/test_decode_batch.py; here, slow.)"""
    path, kw = _resident_and_streamed(smollm2_path, moe_gguf, flash_files)[kind]
    with flashlm.load(path, n_ctx=256, n_threads=2, **kw) as m:
        want = [m.generate(p, **GREEDY) for p in PROMPTS]
        assert m.generate_batch(PROMPTS, **GREEDY) == want
        with m.batch(parallel=3) as engine:  # 5 prompts on 3 slots
            assert engine.generate(PROMPTS, **GREEDY) == want
            assert engine.counters["steps"] < sum(len(m.tokenize(w, add_special=False)) for w in want)


def test_sampled_batches_are_reproducible(smollm2):
    kw = dict(temperature=0.9, seed=7, max_tokens=12)
    want = [smollm2.generate(p, **kw) for p in PROMPTS[:3]]
    assert smollm2.generate_batch(PROMPTS[:3], **kw) == want


def test_a_later_prompt_reuses_an_earlier_ones_keys_and_values(smollm2):
    m = smollm2
    with m.batch(parallel=1, cache_bytes=64 << 20) as engine:
        first = m.tokenize("The capital of France is")
        job = engine.submit(first, **GREEDY)
        reply = job.text()
        assert job.n_cached == 0
        # The next turn: the whole first exchange is in the slot; only the new tokens run.
        second = first + m.tokenize(reply, add_special=False)[:5] + m.tokenize(" and", add_special=False)
        job = engine.submit(second, **GREEDY)
        want = job.text()
        assert job.n_cached == len(first) + 5
        # Another prompt takes the only slot; the cache keeps what it held.
        engine.submit("Something else entirely", **GREEDY).text()
        job = engine.submit(second, **GREEDY)
        # the same keys and values as the run before (decoded positions among them: a fresh
        # prefill of those rounds otherwise, the decode step's products summing in another order)
        assert job.text() == want
        assert job.n_cached == len(second) - 1  # all but the last token, which runs for its logits
        assert engine.cache_used > 0
        job = engine.submit(second, cache_prompt=False, **GREEDY)
        job.text()
        assert job.n_cached == 0


def test_a_prompt_cache_entry_beyond_the_byte_limit_is_not_kept(smollm2):
    with smollm2.batch(parallel=1, cache_bytes=1000) as engine:  # less than one position of SmolLM2's
        engine.submit("The capital of France is", **GREEDY).text()
        engine.submit("Something else", **GREEDY).text()
        assert engine.cache_used == 0


def test_a_saved_slot_restores_into_another_engine(smollm2, tmp_path):
    prompt = smollm2.tokenize("The capital of France is")
    with smollm2.batch(parallel=2) as engine:
        want = engine.submit(prompt, **GREEDY).text()
        assert engine.save_slot(0, tmp_path / "slot.npz") >= len(prompt)
    with smollm2.batch(parallel=2) as engine:
        assert engine.restore_slot(1, tmp_path / "slot.npz") >= len(prompt)
        job = engine.submit(prompt, **GREEDY)
        assert job.text() == want
        # The prompt was prefilled: its last two tokens run again as one pass, as a fresh
        # prefill ran them (a lone token would take the decode step's rounding).
        assert job.n_cached == len(prompt) - 2
        with pytest.raises(InvalidArgumentError, match="not a saved slot"):
            engine.restore_slot(0, tmp_path)
        with pytest.raises(InvalidArgumentError, match="slot must be"):
            engine.save_slot(5, tmp_path / "x.npz")


def test_cancel_ends_a_sequence_and_frees_its_slot(smollm2):
    with smollm2.batch(parallel=1) as engine:
        job = engine.submit("Once upon a time", temperature=0, max_tokens=200)
        first = next(job)
        assert first.text
        job.cancel()
        rest = list(job)
        assert rest[-1].finish_reason == "cancelled"
        assert sum(c.n_generated for c in rest[-1:]) < 200
        queued = engine.submit("Hello", **GREEDY)
        queued.cancel()  # before it starts
        assert list(queued)[-1].finish_reason == "cancelled"
        assert engine.submit("The capital of France is", **GREEDY).text() == smollm2.generate(
            "The capital of France is", **GREEDY)


def test_submitted_from_many_threads_each_gets_its_own_completion(smollm2):
    want = {p: smollm2.generate(p, **GREEDY) for p in PROMPTS}
    got = {}
    with smollm2.batch(parallel=4) as engine:
        def client(p):
            got[p] = engine.submit(p, **GREEDY).text()

        threads = [threading.Thread(target=client, args=(p,)) for p in PROMPTS * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert got == want


def test_logprobs_are_the_models_log_softmax(smollm2):
    tokens = smollm2.tokenize("The capital of France is")
    with smollm2.batch(parallel=1) as engine:
        chunks = list(engine.submit(tokens, temperature=0, max_tokens=3, logprobs=3))
    lps = [lp for c in chunks for lp in c.logprobs]
    assert len(lps) == 3
    logits = smollm2.logits(tokens)[-1].astype(np.float64)
    want = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    assert lps[0].token == int(np.argmax(logits))
    assert lps[0].logprob == pytest.approx(want[lps[0].token], abs=1e-3)
    assert [t for t, _ in lps[0].top][0] == lps[0].token and len(lps[0].top) == 3
    assert all(a[1] >= b[1] for a, b in zip(lps[0].top, lps[0].top[1:]))


def test_bad_requests_are_refused_clearly(smollm2):
    with smollm2.batch(parallel=1) as engine:
        with pytest.raises(InvalidArgumentError, match="max_tokens"):
            engine.submit("hi", max_tokens=0)
        with pytest.raises(InvalidArgumentError, match="unknown sampling"):
            engine.submit("hi", temprature=0)
        with pytest.raises(ContextLengthError, match="context holds"):
            engine.submit([1] * smollm2.n_ctx)
    with pytest.raises(FlashLMError, match="closed"):
        engine.submit("hi")
    with pytest.raises(InvalidArgumentError, match="parallel"):
        smollm2.batch(parallel=0)


def test_the_plan_counts_every_sequences_kv_cache_and_the_prompt_cache(smollm2_path):
    with flashlm.load(smollm2_path, n_ctx=512, n_threads=2, memory_budget="1GiB") as one:
        kv = one.plan.kv
    with flashlm.load(smollm2_path, n_ctx=512, n_threads=2, memory_budget="1GiB", parallel=4,
                      cache_ram="32MiB") as four:
        assert four.plan.kv == 4 * kv and four.plan.prompt_cache == 32 << 20
        assert four.plan.fixed - one.plan.fixed == 3 * kv + (32 << 20)
        assert "KV cache f16 (4 seq)" in four.plan.table() and "prompt cache" in four.plan.table()
        with four.batch() as engine:
            assert engine.parallel == 4 and engine.cache_bytes == 32 << 20
    with pytest.raises(FlashLMError, match="x 64 sequences"):
        flashlm.load(smollm2_path, n_ctx=4096, memory_budget="150MiB", parallel=64)
