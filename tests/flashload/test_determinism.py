"""A flash-layout model's logits are the same in every process, under every budget.

The bug this guards against: with hot windows, a token's down products were summed in
two calls, the window's rows and the tail's, each in partial sums of its own, so the
FFN's output moved (by rounding) with the cut between them: the windows' capacity. The
memory plan draws that from the budget and from the RSS the tokenizer took at load,
which varies between processes (533 or 535 neurons a layer for SmolLM2 at 125 MiB), so
the same greedy run gave other logits from the third decode step on, one process to
the next. Now the down products are one sum over the needed rows in neuron order
(kernels_cpu.matvec_t_split), whatever the capacity.
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import flashlm
from flashlm import kernels_cpu as K
from flashlm.kernels_cpu import matvec_t_split
from flashlm.formats.modelfile import TensorRef

PROMPT = "Once upon a time, in a small village by the sea,"
STEPS = 12


def _greedy(m, steps: int = STEPS) -> list[str]:
    """Hashes of the logits after the prompt and after each of `steps` greedy steps."""
    logits = m.eval(m.tokenize(PROMPT))
    out = [_hash(logits)]
    for _ in range(steps):
        logits = m.eval([int(np.argmax(logits))])
        out.append(_hash(logits))
    return out


def _hash(a) -> str:
    return hashlib.md5(np.ascontiguousarray(a).tobytes()).hexdigest()[:12]


# what the report's script ran: a fresh process, the default streaming, 125 MiB
CHILD = """
import hashlib, json, sys
import numpy as np, flashlm
h = lambda a: hashlib.md5(np.ascontiguousarray(a).tobytes()).hexdigest()[:12]
with flashlm.load(sys.argv[1], n_ctx=256, n_threads=2, memory_budget="125MiB", streaming=json.loads(sys.argv[2])) as m:
    logits = m.eval(m.tokenize(sys.argv[3]))
    out = [h(logits)]
    for _ in range(int(sys.argv[4])):
        logits = m.eval([int(np.argmax(logits))])
        out.append(h(logits))
    print(json.dumps({"caps": sorted({w.cap for w in m.store.windows}), "hashes": out}))
"""


@pytest.fixture(scope="module")
def reference(flash_files):
    """The greedy run's hashes with windows that hold every neuron (no tails)."""
    with flashlm.load(flash_files["smollm2"], n_ctx=256, n_threads=2) as m:
        assert all(w.cap == lb.n_ff for w, lb in zip(m.store.windows, m.store.plans))
        return _greedy(m)


def test_hot_windows_capacity_does_not_change_the_logits(flash_files, reference):
    # Hot windows holding each layer's first 533 or 535 neurons (the two plans seen at
    # 125 MiB; the rest read into the tail buffer each token), with and without prefetch,
    # and a sliding window that spills: bit for bit the logits of windows that hold every
    # neuron. Before the fix 533 and 535 gave other logits from the third step on.
    path = flash_files["smollm2"]
    for st in ({"capacity": 533}, {"capacity": 535, "prefetch": False}, {"hot": False, "window": 2, "capacity": 600}):
        with flashlm.load(path, n_ctx=256, n_threads=2, streaming=st) as m:
            assert {w.cap for w in m.store.windows} == {st["capacity"]}
            assert _greedy(m) == reference, st


def test_fresh_processes_give_the_same_logits(flash_files, reference):
    # The report's configuration, each in a fresh process (each measures its own
    # tokenizer RSS, so may plan other capacities), with and without prefetch: the hashes
    # of the run with every neuron held, over 12 greedy decode steps.
    env = {**os.environ, "FLASHLM_QUIET": "1"}
    configs = [{}, {"prefetch": False}]
    results = []
    for c in configs:  # one after the other: two at once, each on 2 threads, overload 2 cores
        p = subprocess.run([sys.executable, "-c", CHILD, str(flash_files["smollm2"]), json.dumps(c), PROMPT,
                            str(STEPS)], check=False, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        results.append((c, json.loads(p.stdout.strip().splitlines()[-1])))
    for c, r in results:
        assert 0 < r["caps"][0] < 1536  # hot windows with tails, as the report's run had
        assert r["hashes"] == reference, (c, r["caps"])


@pytest.mark.parametrize("cap", [0, 1, 3, 64, 533, 535, 1535, 1536])
def test_split_down_products_equal_one_matvec_t(cap):
    # kernels_cpu.matvec_t_split over rows in a window (C-contiguous) and a tail of
    # records (strided): bit for bit kernels_cpu.matvec_t over the same rows in one matrix.
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    rng = np.random.default_rng(cap)
    n, d = 1536, 576
    for qtype in (T.Q8_0, T.F16):
        w = np.ascontiguousarray(quants.quantize(rng.standard_normal((n, d)).astype(np.float32), qtype))
        w = w.view(np.uint8).reshape(n, -1)
        rows = np.sort(rng.choice(n, 1229, replace=False))
        coef = rng.standard_normal(len(rows)).astype(np.float32)
        want = K.matvec_t(coef, TensorRef("w", qtype, (n, d), w, -1), rows, np.zeros(d, np.float32))
        records = np.zeros((n, 40 + w.shape[1]), dtype=np.uint8)  # other bytes before each row, as in a record
        records[:, 40:] = w
        got = matvec_t_split(coef, np.ascontiguousarray(w[:cap]), records[cap:, 40:], cap, int(qtype), rows,
                             np.zeros(d, np.float32))
        np.testing.assert_array_equal(got, want)
