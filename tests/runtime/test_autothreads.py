"""The default thread count follows a busy CPU (runtime/autothreads.py), and no count
changes a result."""

import numpy as np
import pytest

import flashlm
from flashlm.runtime.autothreads import AutoThreads


def drive(auto, cost, n_tokens, start=0):
    """Feed auto `n_tokens` decode steps whose time is cost(token, n); the counts used."""
    used = []
    for t in range(start, start + n_tokens):
        n = auto.n
        used.append(n)
        auto.record(cost(t, n))
    return used


def idle(t, n):
    return 10.0 / n ** 0.8  # two threads faster than one


def busy_from(t0, stall=50.0):
    """One core taken from token t0 on: two threads stall on it, one runs as before."""
    return lambda t, n: idle(t, n) * (stall if n > 1 and t >= t0 else 1.0)


def test_an_idle_machine_keeps_every_core_and_tries_others_rarely():
    auto = AutoThreads(2)
    used = drive(auto, idle, 1000)
    assert auto.n == 2
    assert used.count(1) <= 3 * 6  # probes back off: at most ~6 probes of 3 tokens in 1000


def test_a_core_taken_mid_run_is_given_up_within_a_few_tokens():
    auto = AutoThreads(2)
    used = drive(auto, busy_from(100), 1100)
    assert used[:100].count(2) >= 90
    first_one = 100 + used[100:].index(1)
    assert first_one <= 100 + 8  # "slower than after the decision" probes at once
    assert auto.n == 1
    # the stalling count is retried ever more rarely: a few tokens in a thousand
    assert used[first_one:].count(2) <= 8


def test_a_core_freed_again_is_taken_back():
    auto = AutoThreads(2)
    drive(auto, busy_from(0), 600)
    assert auto.n == 1
    used = drive(auto, idle, 2 * AutoThreads.MAX_GAP + 20, start=600)
    assert auto.n == 2
    assert used.count(2) > AutoThreads.MAX_GAP


def test_eight_cores_walk_down_to_the_free_ones():
    auto = AutoThreads(8)
    # 4 cores busy: more than 4 threads stall, up to 4 scale
    drive(auto, lambda t, n: 10.0 / n if n <= 4 else 200.0, 400)
    assert auto.n == 4


def test_noise_does_not_make_it_flap():
    rng = np.random.default_rng(0)
    auto = AutoThreads(2)
    drive(auto, lambda t, n: 10.0 * rng.uniform(0.9, 1.1), 2000)  # both counts alike
    assert auto.switches <= 4


def test_one_core_never_changes():
    auto = AutoThreads(1)
    assert set(drive(auto, idle, 300)) == {1}


class Flip(AutoThreads):
    """A count that changes every token: 1, 2, 1, 2, ..."""

    def record(self, seconds):
        self.n = 3 - self.n
        return self.n


def _greedy(m, prompt):
    toks = m.tokenize(prompt)
    logits = [m.eval(toks).copy()]
    for _ in range(6):
        logits.append(m.eval([int(logits[-1].argmax())]).copy())
    return np.stack(logits)


@pytest.mark.parametrize("kind", ["dense", "dense, BLAS prefill", "flash", "moe"])
def test_the_thread_count_changes_no_logit(kind, smollm2_path, flash_files, moe_gguf, monkeypatch):
    """Every kernel splits by whole output rows: one thread, two, or a count that changes
    every token give the same logits bit for bit, so the automatic count cannot change text.
    "BLAS prefill" is the prefill of CPUs without VNNI: dequantized tiles through BLAS,
    each thread's share cut at a tile's edge."""
    from flashlm import kernels_cpu

    if kind == "dense, BLAS prefill":
        monkeypatch.setattr(kernels_cpu, "INT8_GEMM", False)
    path, kw = {"dense": (smollm2_path, {}), "dense, BLAS prefill": (smollm2_path, {}),
                "flash": (flash_files["smollm2"], dict(memory_budget="125MiB")),
                "moe": (moe_gguf("qwen2moe"), dict(memory_budget=1 << 40, experts=dict(prefetch=True)))}[kind]
    prompt = "The capital of France is a city that has long"
    out = []
    for threads in (1, 2, None):
        with flashlm.load(path, n_ctx=256, n_threads=threads, **kw) as m:
            if threads is None:
                m.auto_threads = Flip(2, 1)
                assert m.threads.startswith("auto")
            out.append(_greedy(m, prompt))
    assert np.array_equal(out[0], out[1])
    assert np.array_equal(out[0], out[2])


def test_a_fixed_count_stays_fixed(smollm2_path):
    with flashlm.load(smollm2_path, n_ctx=64, n_threads=1) as m:
        assert m.auto_threads is None and m.n_threads == 1 and m.threads == "1 (fixed)"
    with flashlm.load(smollm2_path, n_ctx=64) as m:
        assert m.auto_threads is not None and m.threads.startswith("auto")
