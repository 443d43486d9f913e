"""One Model shared: threads, cancel(), and KV reuse give exactly what a fresh model gives."""

import json
import subprocess
import sys
import threading

import numpy as np
import pytest

import flashlm
from flashlm.errors import ModelBusyError

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
SAMPLED = dict(temperature=0.8, seed=7)  # sampling, seeded: a wrong logit changes the draw


@pytest.fixture(scope="module")
def fresh_outputs(smollm2_path):
    """What a freshly loaded model generates for each (prompt, settings)."""
    out = {}
    for p in PROMPTS:
        for name, kw in (("greedy", dict(temperature=0)), ("sampled", SAMPLED)):
            with flashlm.load(smollm2_path, n_ctx=512, n_threads=2) as m:
                out[p, name] = m.generate(p, max_tokens=16, **kw)
    return out


def _settings(name):
    return dict(temperature=0) if name == "greedy" else SAMPLED


@pytest.mark.timeout(300)
def test_two_threads_generating_at_once_each_get_a_fresh_models_output(smollm2, fresh_outputs):
    got, errors = {}, []
    go = threading.Barrier(2)

    def worker(p, name):
        try:
            go.wait()
            got[p, name] = [smollm2.generate(p, max_tokens=16, **_settings(name)) for _ in range(2)]
        except BaseException as e:  # noqa: BLE001  reported below
            errors.append(e)

    for name in ("greedy", "sampled"):
        threads = [threading.Thread(target=worker, args=(p, name)) for p in PROMPTS]
        [t.start() for t in threads]
        [t.join() for t in threads]
    assert not errors
    for key, texts in got.items():
        assert texts == [fresh_outputs[key]] * 2, key


def test_streams_interleaved_on_one_thread_get_a_clear_error(smollm2, fresh_outputs):
    first = smollm2.stream(PROMPTS[0], max_tokens=16, temperature=0)
    text = next(first).text
    second = smollm2.stream(PROMPTS[1], max_tokens=16, temperature=0)
    with pytest.raises(ModelBusyError, match="still open"):
        next(second)
    with pytest.raises(ModelBusyError):
        smollm2.logits([1, 2, 3])
    text += "".join(c.text for c in first)  # the first is unharmed
    assert text == fresh_outputs[PROMPTS[0], "greedy"]
    abandoned = smollm2.stream(PROMPTS[1], max_tokens=16, temperature=0)
    next(abandoned)
    abandoned.close()  # closing a generation frees the model
    assert smollm2.generate(PROMPTS[1], max_tokens=16, **SAMPLED) == fresh_outputs[PROMPTS[1], "sampled"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("after", [0, 1, 5])
def test_cancel_from_another_thread_leaves_a_fresh_models_output(smollm2, fresh_outputs, after):
    p = PROMPTS[after % 2]
    chunks, seen = [], threading.Event()

    def consume():
        for c in smollm2.stream(p, max_tokens=200, **SAMPLED):
            chunks.append(c)
            if len(chunks) > after:
                seen.set()

    t = threading.Thread(target=consume)
    t.start()
    assert seen.wait(120)
    smollm2.cancel()
    t.join(120)
    assert chunks[-1].finish_reason == "cancelled" and chunks[-1].n_generated < 200
    assert smollm2.generate(p, max_tokens=16, **SAMPLED) == fresh_outputs[p, "sampled"]


def test_cancel_before_a_stream_starts_holds_and_with_none_does_nothing(smollm2, fresh_outputs):
    smollm2.cancel()  # nothing running: nothing happens, now or later
    tokens = smollm2.tokenize(PROMPTS[0])
    assert smollm2.logits(tokens).shape == (len(tokens), smollm2.config.n_vocab)
    assert smollm2.generate(PROMPTS[0], max_tokens=16, temperature=0) == fresh_outputs[PROMPTS[0], "greedy"]
    pending = smollm2.stream(PROMPTS[0], max_tokens=16, temperature=0)
    smollm2.cancel()  # made but not started: it is cancelled when it starts
    chunks = list(pending)
    assert chunks[-1].finish_reason == "cancelled" and chunks[-1].n_generated == 0
    assert smollm2.generate(PROMPTS[0], max_tokens=16, temperature=0) == fresh_outputs[PROMPTS[0], "greedy"]


def test_the_same_prompt_and_seed_repeat_in_a_reused_model_and_a_fresh_process(smollm2, smollm2_path,
                                                                                 fresh_outputs):
    p = PROMPTS[0]
    runs = [smollm2.generate(p, max_tokens=16, **SAMPLED) for _ in range(3)]  # each reuses the last's cache
    code = ("import flashlm, json, sys; m = flashlm.load(sys.argv[1], n_ctx=512, n_threads=2); "
            f"print(json.dumps(m.generate({p!r}, max_tokens=16, temperature=0.8, seed=7)))")
    other = json.loads(subprocess.run([sys.executable, "-c", code, str(smollm2_path)], capture_output=True,
                                      text=True, check=True).stdout)
    assert runs == [fresh_outputs[p, "sampled"]] * 3 == [other] * 3


def test_reused_prefixes_give_a_fresh_prefills_logits(smollm2):
    # The cache keeps only what prefill computed; the rest runs in a fresh prefill's chunks.
    tokens = smollm2.tokenize("The quick brown fox jumps over the lazy dog. " * 30)  # > one prefill chunk
    n = len(tokens)
    with flashlm.load(smollm2.path, n_ctx=512, n_threads=2) as fresh:
        want = {}
        for k in (n - 60, n):
            fresh.reset()
            want[k] = fresh.eval(tokens[:k])  # a prefill from position 0
    smollm2.generate(tokens[:n - 60], max_tokens=3, temperature=0)  # prefill, then decoded tokens
    for k in (n - 60, n, n - 60):
        assert np.array_equal(smollm2._prefill(smollm2._ctx, tokens[:k])[0], want[k]), k


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("arch", ["qwen2moe", "mixtral"])
def test_a_mixture_of_experts_repeats_too(moe_gguf, streamed, arch):
    # A prefill runs an expert that one token chose as a matvec, one that several chose as a
    # GEMM: its rows depend on the batch, so its KV cache is not reused. (These fixtures' int8
    # products happen to agree either way; on MoEfied SmolLM2 reuse changed the sampled text.)
    path = moe_gguf(arch)
    budget = None
    if streamed:
        with flashlm.load(path, n_ctx=256, n_threads=2, memory_budget=1 << 40) as m:
            budget = m.plan.minimum + 3 * m.plan.expert_bytes
    kw = dict(max_tokens=12, **SAMPLED)
    tokens = None
    with flashlm.load(path, n_ctx=256, n_threads=2, memory_budget=budget) as m:
        runs = [m.generate(p, **kw) for p in (PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[0])]
        tokens = m.tokenize(PROMPTS[0])
        got, _ = m._prefill(m._ctx, tokens)  # after a generation from the same prompt
    with flashlm.load(path, n_ctx=256, n_threads=2, memory_budget=budget) as fresh:
        want = fresh.eval(tokens)  # a prefill from position 0
        fresh.reset()
        assert runs == [fresh.generate(p, **kw) for p in (PROMPTS[0],) * 2 + (PROMPTS[1], PROMPTS[0])]
    assert runs[0] == runs[1] == runs[3]
    assert np.array_equal(got, want)
