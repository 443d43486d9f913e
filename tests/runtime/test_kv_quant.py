"""The quantized KV cache (load's cache_type_k / cache_type_v, the CLI's -ctk / -ctv):
rows written as GGML's reference quantizers write them, attention over them (the same
in prefill and decode, on any thread count), generation close to f16's on the default
model, prefix reuse, clear errors, and the memory plan's bytes."""

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

import flashlm
from flashlm.apps.cli import main
from flashlm.errors import InvalidArgumentError
from flashlm.kernels_cpu import attention as A
from flashlm.runtime.blocks import KVCache, kv_bytes_per_position

GGML = {A.Q8_0: T.Q8_0, A.Q4_0: T.Q4_0}
GREEDY = {"temperature": 0, "max_tokens": 16}


@pytest.fixture(scope="module")
def q8(smollm2_path):
    m = flashlm.load(smollm2_path, n_ctx=512, n_threads=2, cache_type_k="q8_0", cache_type_v="q8_0")
    yield m
    m.close()


def _rows(rng, n=64):
    """Rows at scales from 1e-3 to 50, and the edge cases: all zero, a zero block, one
    large outlier, a negative maximum, exact halves of the step (ties), a subnormal scale."""
    x = (rng.standard_normal((300, n)) * rng.uniform(1e-3, 50, (300, 1))).astype(np.float32)
    x[0] = 0
    x[1, :32] = 0
    x[2, 5] = 1000
    x[3, 40] = -77
    x[4, 0] = -127.0
    x[4, 1:32] = np.arange(31) + 0.5  # q8_0: d = 1, each x / d a tie
    x[5, 32] = -8.0  # q4_0: d = 1, each x / d + 8.5 a whole number
    x[5, 33:64] = np.linspace(-7.5, 7.5, 31)
    x[6] *= 1e-7
    return x


@pytest.mark.parametrize("cache_type", [A.Q8_0, A.Q4_0], ids=["q8_0", "q4_0"])
def test_rows_are_ggml_blocks_bit_for_bit(cache_type):
    x = _rows(np.random.default_rng(cache_type))
    rows = np.empty((len(x), A.row_words(cache_type, 64)), dtype=np.uint16)
    A.quantize_rows(cache_type, x, rows)
    want = quants.quantize(x, GGML[cache_type])
    assert np.array_equal(rows.view(np.uint8), want)
    back = np.empty_like(x)
    A.dequantize_rows(cache_type, rows, back)
    assert np.array_equal(back, quants.dequantize(want, GGML[cache_type]))


def test_f16_rows_are_numpys_float16():
    x = _rows(np.random.default_rng(1))
    rows = np.empty(x.shape, dtype=np.uint16)
    A.quantize_rows(A.F16, x, rows)
    assert np.array_equal(rows, x.astype(np.float16).view(np.uint16))


def test_the_rotation_is_ggmls_hadamard():
    """Sylvester's Walsh-Hadamard matrix, orthonormal, as ggml_gen_hadamard builds it:
    the same product, and its own inverse."""
    h = np.array([[1.0]])
    while len(h) < 64:
        h = np.block([[h, h], [h, -h]])
    h /= 8.0
    x = np.random.default_rng(2).standard_normal((5, 128)).astype(np.float32)
    y = x.copy()
    A.hadamard_rows(y, 64)
    assert np.allclose(y, (x.reshape(5, 2, 64) @ h).reshape(5, 128), atol=1e-5)
    A.hadamard_rows(y, 64)
    assert np.allclose(y, x, atol=1e-5)
    assert A.rotation(A.Q4_0, 256) == 256 and A.rotation(A.Q4_0, 256, values=True) == 64
    assert A.rotation(A.F16, 64) == 0 and A.rotation(A.Q8_0, 96) == 0


@pytest.mark.parametrize("cache_type", [A.F16, A.Q8_0, A.Q4_0], ids=["f16", "q8_0", "q4_0"])
def test_attention_reads_the_cached_rows(cache_type):
    """Over a cache of 600 positions (three chunks), with and without a sliding window:
    close to float64 attention over the dequantized rows; a decoded batch's rows
    (attend_rows: two rows in two slots, each on 1 and 2 threads) bit for bit prefill's."""
    rng = np.random.default_rng(3)
    n_kv, g, hd, L = 2, 3, 64, 600
    w = A.row_words(cache_type, hd)
    kc = np.empty((1, n_kv, L, w), dtype=np.uint16)
    vc = np.empty_like(kc)
    kf = (rng.standard_normal((n_kv * L, hd)) * 2).astype(np.float32)
    vf = rng.standard_normal((n_kv * L, hd)).astype(np.float32)
    A.quantize_rows(cache_type, kf, kc.reshape(-1, w))
    A.quantize_rows(cache_type, vf, vc.reshape(-1, w))
    kd, vd = np.empty_like(kf), np.empty_like(vf)
    A.dequantize_rows(cache_type, kc.reshape(-1, w), kd)
    A.dequantize_rows(cache_type, vc.reshape(-1, w), vd)
    kd, vd = kd.reshape(n_kv, L, hd).astype(np.float64), vd.reshape(n_kv, L, hd).astype(np.float64)
    T_, pos0 = 3, L - 3
    q = rng.standard_normal((T_, n_kv * g * hd)).astype(np.float32)
    for window in (0, 300):
        out = np.empty((T_, n_kv * g * hd), dtype=np.float32)
        A.attend_queries(q, kc, vc, 0, pos0, n_kv * g, n_kv, hd, hd, np.float32(0.125), window, cache_type,
                         cache_type, 0, out, 0, T_ * n_kv)
        want = np.empty_like(out, dtype=np.float64)
        for t in range(T_):
            lo = max(0, pos0 + t - window + 1) if window else 0
            for h in range(n_kv * g):
                s = kd[h // g, lo:pos0 + t + 1] @ q[t, h * hd:(h + 1) * hd] * 0.125
                p = np.exp(s - s.max())
                want[t, h * hd:(h + 1) * hd] = p / p.sum() @ vd[h // g, lo:pos0 + t + 1]
        assert np.abs(out - want).max() < (2e-3 if cache_type == A.F16 else 3e-2)
        pool_k, pool_v = np.zeros((3,) + kc.shape, np.uint16), np.zeros((3,) + vc.shape, np.uint16)
        pool_k[2], pool_v[2], pool_k[0], pool_v[0] = kc, vc, kc, vc
        for threads in (1, 2):
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # (each pass sets its own)
            rows = np.empty((2, out.shape[1]), dtype=np.float32)
            A.attend_rows(q[[2, 0]], pool_k, pool_v, np.array([2, 0]), np.array([pos0 + 2, pos0]), 0, window, n_kv,
                          hd, hd, 0.125, cache_type, cache_type, 0, rows)
            assert np.array_equal(rows, out[[2, 0]]), (window, threads)


def _cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _teacher_forced(m, tokens):
    """Logits of a prompt's prefill, and of 24 decode steps after its first 96 tokens."""
    prefill = m.logits(tokens)
    m.reset()
    m.eval(tokens[:96])
    decode = np.array([m.eval([t]) for t in tokens[96:120]])
    m.reset()
    return prefill, decode


def test_quantized_caches_stay_close_to_f16(smollm2, smollm2_path, q8):
    """Teacher-forced over 128 tokens of text: the next-token distributions of a q8_0
    cache are f16's but for rounding (measured on SmolLM2: top-1 agreement 0.95 in
    prefill, 1.0 in 24 decode steps; cosine median 0.9996, min 0.97 and 0.99;
    perplexity +2.2% on these 128 tokens, within +0.5% over the whole text), q4_0's
    close (0.88 and 0.83; cosine median 0.994, min 0.63 and 0.95; perplexity +3.1%).
    Attention reading garbage fails all of these."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "data" / "eval_text.txt").read_text()
    tokens = smollm2.tokenize(text)[:128]
    base, base_dec = _teacher_forced(smollm2, tokens)
    with flashlm.load(smollm2_path, n_ctx=512, n_threads=2, cache_type_k="q4_0", cache_type_v="q4_0") as q4:
        for m, top1, cos_min in ((q8, 0.9, 0.95), (q4, 0.7, 0.5)):
            got, dec = _teacher_forced(m, tokens)
            c, cd = _cosines(got, base), _cosines(dec, base_dec)
            assert np.mean(got.argmax(1) == base.argmax(1)) >= top1, m.cache_type
            assert np.mean(dec.argmax(1) == base_dec.argmax(1)) >= top1 - 0.1, m.cache_type
            assert np.median(c) >= (0.999 if m is q8 else 0.99) and c.min() >= cos_min, m.cache_type
            assert cd.min() >= (0.98 if m is q8 else 0.8), m.cache_type

            def nll(x):
                x = x[:-1].astype(np.float64)
                x -= x.max(1, keepdims=True)
                return -(x[np.arange(len(x)), tokens[1:]] - np.log(np.exp(x).sum(1))).mean()

            assert np.exp(nll(got) - nll(base)) < (1.05 if m is q8 else 1.15), m.cache_type


def test_reused_prefixes_batches_and_verification_on_a_q8_0_cache(q8):
    """Everything that keeps or shares keys and values gives a fresh run's tokens: the
    prompt prefix reused from the last generation, a generation after reset(), decoding
    in a batch (the slot pool), the batch engine's prompt cache, speculative decoding's
    verification (the batch step on one slot)."""
    prompt = "The capital of France is Paris. The capital of Italy is"
    q8.reset()
    fresh = q8.generate(prompt, **GREEDY)
    chunks = list(q8.stream(prompt, **GREEDY))
    assert chunks[-1].n_cached > 0 and "".join(c.text for c in chunks) == fresh
    q8.reset()
    assert q8.generate(prompt, **GREEDY) == fresh
    chunks = list(q8.stream(prompt, speculative={"source": "ngram", "adaptive": False}, **GREEDY))
    assert "".join(c.text for c in chunks) == fresh and chunks[-1].speculation.passes > 0
    other = "Once upon a time"
    assert q8.generate_batch([prompt, other], **GREEDY) == [fresh, q8.generate(other, **GREEDY)]
    with q8.batch(parallel=1, cache_bytes=64 << 20) as engine:
        assert engine.submit(prompt, **GREEDY).text() == fresh
        engine.submit(other, **GREEDY).text()  # the slot is taken: the first sequence goes to the prompt cache
        job = engine.submit(prompt, **GREEDY)
        assert job.text() == fresh and job.n_cached > 0 and engine.cache_used > 0


def _chunks(job):
    """A job's text and its tokens' log-probabilities (each a float64 of its logits)."""
    chunks = list(job)
    return "".join(c.text for c in chunks), [lp for c in chunks for lp in c.logprobs]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cache_type", ["f16", "q8_0", "q4_0"])
def test_kept_keys_and_values_give_the_run_that_wrote_them_bit_for_bit(smollm2_path, cache_type, threads):
    """Each cache type, on 1 and 2 threads: a prefix that prefill computed, reused after a
    generation, gives a fresh prefill's logits bit for bit (past a prefill chunk); the
    prompt cache's entry, which holds positions that decode steps wrote, gives back the
    run that wrote them (text and log-probabilities, bit for bit). A fresh prefill of
    decoded positions is not that run: the decode step's products sum in another order
    than prefill's GEMM (on main too), which is why Model._prefill reuses decoded
    positions only where asked to (the prompt cache's reuse_any)."""
    with flashlm.load(smollm2_path, n_ctx=512, n_threads=threads, cache_type_k=cache_type,
                      cache_type_v=cache_type) as m:
        tokens = m.tokenize("The quick brown fox jumps over the lazy dog. " * 16)  # > one prefill chunk
        n = len(tokens)
        want = {}
        for k in (n - 40, n):
            m.reset()
            want[k] = m.eval(tokens[:k])  # a prefill from position 0
        m.reset()
        m.generate(tokens[:n - 40], max_tokens=3, temperature=0)  # prefill, then decoded tokens
        for k in (n - 40, n, n - 40):
            assert np.array_equal(m._prefill(m._ctx, tokens[:k])[0], want[k]), k
        kw = {"temperature": 0, "max_tokens": 8, "logprobs": 2}
        with m.batch(parallel=1, cache_bytes=64 << 20) as engine:
            first = m.tokenize("The capital of France is")
            reply = engine.submit(first, **kw).text()
            second = first + m.tokenize(reply, add_special=False)[:5] + m.tokenize(" and", add_special=False)
            ran = _chunks(engine.submit(second, **kw))  # after decoded positions, kept in the slot
            engine.submit("Something else entirely", **kw).text()  # the slot's entry goes to the prompt cache
            job = engine.submit(second, **kw)
            assert _chunks(job) == ran and job.n_cached == len(second) - 1


def test_bad_cache_types_are_one_line_errors(smollm2_path, q8, capsys):
    for kw in ({"cache_type_k": "q5_0"}, {"cache_type_v": "bf16"}, {"cache_type_k": 8}):
        with pytest.raises(InvalidArgumentError, match="must be one of f16, q8_0, q4_0"):
            flashlm.load(smollm2_path, **kw)
    for argv in (["-ctk", "q4_1"], ["--cache-type-v", "f32"]):
        assert main(["run", "-m", str(smollm2_path), "-p", "Hi", "-n", "1", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("flashlm: error: --cache-type-") and "f16, q8_0, q4_0" in err and "\n" not in err
    with pytest.raises(InvalidArgumentError, match="KV cache of f16 given to a model whose cache is q8_0"):
        q8.model.forward(np.array([1, 2]), 0, KVCache(q8.config, 16))


def test_the_memory_plan_counts_the_cache_types_bytes(smollm2_path, q8, capsys):
    cfg = q8.config
    f16, k8 = kv_bytes_per_position(cfg), q8.kv_bytes_per_position
    assert f16 == cfg.kv_bytes_per_token // 2 and k8 == cfg.n_layer * cfg.n_head_kv * 2 * (cfg.head_dim // 32 * 34)
    assert 0.5 < k8 / f16 < 0.54  # 34 bytes a block of 32 against 64
    kv = q8._ctx.kv
    assert kv.k.nbytes + kv.v.nbytes == kv.k.shape[-2] * k8  # the arrays are what the plan counts
    for k, v, name, per in (("q8_0", "q8_0", "q8_0", k8), ("q4_0", "f16", "K q4_0, V f16", None)):
        with flashlm.load(smollm2_path, n_ctx=1024, memory_budget="1GiB", cache_type_k=k, cache_type_v=v) as m:
            assert m.cache_type == name and m.plan.kv_type == name
            assert m.plan.kv == 1024 * (per or m.kv_bytes_per_position)
            assert f"KV cache {name}" in m.plan.table()
            if per is None:
                assert m.kv_bytes_per_position == (f16 + cfg.n_layer * cfg.n_head_kv * 2 * 36) // 2
    assert main(["info", str(smollm2_path), "-c", "1024", "-ctk", "q8_0", "-ctv", "q8_0"]) == 0
    assert f"KV cache {1024 * k8 / 2**20:.1f} MiB at q8_0" in capsys.readouterr().out
