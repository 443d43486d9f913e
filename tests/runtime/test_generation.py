"""Generation: sampling, stop handling, limits, cancellation and KV-cache reuse."""

import threading

import numpy as np
import pytest

import flashlm
from flashlm.errors import ContextLengthError, InvalidArgumentError
from flashlm.runtime.sampler import Sampler, SamplingParams

PROMPT = "The capital of France is"


def test_logits_shape(smollm2):
    tokens = smollm2.tokenize("Hello there, how are you?")
    out = smollm2.logits(tokens)
    assert out.shape == (len(tokens), smollm2.config.n_vocab) and out.dtype == np.float32


def test_greedy_is_deterministic_and_streams(smollm2):
    chunks = list(smollm2.stream(PROMPT, max_tokens=12, temperature=0))
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == "length" and chunks[-1].n_generated == 12
    assert chunks[-1].tokens_per_second > 0 and chunks[-1].prompt_tokens_per_second > 0
    text = "".join(c.text for c in chunks)
    assert text == smollm2.generate(PROMPT, max_tokens=12, temperature=0)
    assert "Paris" in text


def test_seed_makes_sampling_reproducible(smollm2):
    kw = dict(max_tokens=16, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = smollm2.generate(PROMPT, seed=1, **kw)
    assert a == smollm2.generate(PROMPT, seed=1, **kw)
    others = {smollm2.generate(PROMPT, seed=s, **kw) for s in (2, 3, 4)}
    assert others != {a}


def test_stop_string_is_never_shown(smollm2):
    full = smollm2.generate(PROMPT, max_tokens=24, temperature=0)
    # A stop string that starts inside a token and spans a token boundary.
    i = full.index("Paris") + 3
    stop = full[i:i + 6]
    pieces = [c for c in smollm2.stream(PROMPT, max_tokens=24, temperature=0, stop=["zzz-never", stop])]
    text = "".join(c.text for c in pieces)
    assert text == full[:i]
    assert pieces[-1].finish_reason == "stop"
    # A tail that looked like a stop's start but was not one is flushed, not lost.
    assert smollm2.generate(PROMPT, max_tokens=24, temperature=0, stop=[full[-1] + "\x00"]) == full


def test_eos_ends_chat_with_stop(smollm2):
    chunks = list(smollm2.chat([{"role": "user", "content": "What is 2+2?"}], stream=True, max_tokens=64,
                               temperature=0))
    assert chunks[-1].finish_reason == "stop"
    text = "".join(c.text for c in chunks)
    assert "4" in text and "<|im_end|>" not in text


def test_prompt_longer_than_context_is_an_error(smollm2_path):
    with flashlm.load(smollm2_path, n_ctx=32) as m:
        with pytest.raises(ContextLengthError, match="context holds 32"):
            m.generate("word " * 40)
        out = list(m.stream("word " * 20, max_tokens=100, temperature=0))
        assert out[-1].finish_reason == "length" and out[-1].n_prompt + out[-1].n_generated == 32


def test_bad_arguments(smollm2):
    with pytest.raises(InvalidArgumentError):
        smollm2.generate(PROMPT, temperature=-1)
    with pytest.raises(InvalidArgumentError):
        smollm2.generate(PROMPT, top_p=0)
    with pytest.raises(InvalidArgumentError):
        smollm2.generate(PROMPT, max_tokens=0)
    with pytest.raises(InvalidArgumentError, match="bogus"):
        smollm2.generate(PROMPT, bogus=1)
    with pytest.raises(InvalidArgumentError, match="seed must be an integer >= 0, or -1"):
        smollm2.generate(PROMPT, seed=-2)
    assert smollm2.generate(PROMPT, max_tokens=2, seed=-1)  # llama.cpp's "random seed"


def test_cli_seed_minus_one_is_a_random_seed(smollm2_path, capsys):
    from flashlm.apps.cli import main

    assert main(["run", "-m", str(smollm2_path), "-p", "Hi", "-n", "2", "--seed", "-1"]) == 0
    assert main(["run", "-m", str(smollm2_path), "-p", "Hi", "-n", "2", "--seed", "-7"]) == 2
    assert capsys.readouterr().err.strip().endswith("seed must be an integer >= 0, or -1 for a random one")


def _cancel_after(model, seconds):
    t = threading.Timer(seconds, model.cancel)
    t.start()
    return t


def test_cancel_during_prefill_and_resume(smollm2):
    long_prompt = " ".join(f"item {i}," for i in range(90))  # ~470 tokens: several prefill chunks
    smollm2.take_stats()
    timer = _cancel_after(smollm2, 0.3)
    chunks = list(smollm2.stream(long_prompt, max_tokens=8, temperature=0))
    timer.join()
    assert chunks[-1].finish_reason == "cancelled" and chunks[-1].n_generated == 0
    # stopped inside the prompt: the chunk it was in did not finish, and none after it ran
    assert sum(p.tokens for p in smollm2.take_stats()) < len(smollm2.tokenize(long_prompt))
    # The model is intact: the same request now runs to the end, as on a fresh start.
    again = smollm2.generate(long_prompt, max_tokens=8, temperature=0)
    with flashlm.load(smollm2.path, n_ctx=512) as fresh:
        assert again == fresh.generate(long_prompt, max_tokens=8, temperature=0)


def test_cancel_during_decode(smollm2):
    got = []
    timer = None
    for c in smollm2.stream(PROMPT, max_tokens=200, temperature=0):
        got.append(c)
        if len(got) == 3:
            timer = _cancel_after(smollm2, 0.0)
    timer.join()
    assert got[-1].finish_reason == "cancelled" and got[-1].n_generated < 200


def test_kv_prefix_reuse_gives_same_result(smollm2):
    a = "Once upon a time there was a small robot who"
    b = a + " loved to paint. Every morning it"
    smollm2.generate(a, max_tokens=4, temperature=0)  # leaves a's keys in the cache
    reused = smollm2.generate(b, max_tokens=10, temperature=0)
    with flashlm.load(smollm2.path, n_ctx=512) as fresh:
        assert reused == fresh.generate(b, max_tokens=10, temperature=0)


def test_sampler_filters():
    logits = np.array([5.0, 4.0, 1.0, 0.0, -3.0], dtype=np.float32)

    def draws(**kw):
        s = Sampler(SamplingParams(seed=0, **kw))
        return {s(logits, []) for _ in range(300)}

    assert draws(temperature=0) == {0}
    assert draws(temperature=1, top_k=2, top_p=1, min_p=0) == {0, 1}
    assert draws(temperature=1, top_k=0, top_p=0.5, min_p=0) == {0}
    assert draws(temperature=1, top_k=0, top_p=1, min_p=0.2) == {0, 1}
    assert draws(temperature=100, top_k=0, top_p=1, min_p=0) == {0, 1, 2, 3, 4}


def test_repeat_penalty_demotes_recent_tokens():
    logits = np.array([2.0, 1.9, 0.0], dtype=np.float32)
    s = Sampler(SamplingParams(temperature=0, repeat_penalty=1.5))
    assert s(logits, [0]) == 1
    assert s(logits, [2]) == 0


def test_thread_count_holds_on_other_threads(smollm2_path):
    """numba's thread count is per thread: a model made with n_threads=1 and used from a
    worker thread still runs its kernels on one thread."""
    import numba

    seen = []
    with flashlm.load(smollm2_path, n_ctx=64, n_threads=1) as m:
        forward = m.model.forward

        def spy(*a, **kw):
            seen.append(numba.get_num_threads())
            return forward(*a, **kw)

        m.model.forward = spy
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        t = threading.Thread(target=lambda: m.generate("Hi", max_tokens=2, temperature=0))
        t.start()
        t.join()
    assert seen and set(seen) == {1}
