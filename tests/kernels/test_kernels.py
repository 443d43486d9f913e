"""kernels_cpu against gguf's numpy `dequantize`, the reference of every block format."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGML_QUANT_SIZES, quants

from flashlm import kernels_cpu
from flashlm.kernels_cpu import quants as K
from flashlm.formats.modelfile import GGUFModelFile, TensorRef

import reference

ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def random_blocks(qtype, rows, cols, rng):
    """Random rows of `qtype`: real quantization where gguf has it, else random bytes
    with sane f16 scales (K-quants have no numpy quantizer)."""
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        bs, ts = GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, size=(rows, cols // bs, ts), dtype=np.uint8)
        scales = rng.uniform(0.001, 0.1, size=(rows, cols // bs, 2)).astype(np.float16).view(np.uint8)
        if qtype == Q.Q6_K:
            raw[:, :, 208:210] = scales[:, :, :2]
        else:
            raw[:, :, 0:4] = scales
        return raw.reshape(rows, -1)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    if qtype == Q.F32:
        return x.view(np.uint8)
    return np.ascontiguousarray(quants.quantize(x, qtype)).view(np.uint8).reshape(rows, -1)


def ref_dequant(raw, qtype, cols):
    if qtype == Q.F32:
        return raw.view(np.float32).reshape(raw.shape[0], cols)
    if qtype == Q.F16:
        return raw.view(np.float16).astype(np.float32).reshape(raw.shape[0], cols)
    return quants.dequantize(raw, qtype).reshape(raw.shape[0], cols)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequant_random_blocks_exact(qtype):
    rng = np.random.default_rng(int(qtype))
    raw = random_blocks(qtype, 16, 512, rng)
    out = np.empty((16, 512), np.float32)
    K.dequant_rows(int(qtype), raw, 0, out, K.F16_TABLE)
    np.testing.assert_array_equal(out, ref_dequant(raw, qtype, 512))


@pytest.mark.parametrize("gemm", ["int8", "blas"])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matvec_and_matmul_random(qtype, gemm, monkeypatch):
    monkeypatch.setattr(kernels_cpu, "INT8_GEMM", gemm == "int8")
    rng = np.random.default_rng(100 + int(qtype))
    raw = random_blocks(qtype, 96, 512, rng)
    w = TensorRef("w", qtype, (96, 512), raw, 0)
    dense = ref_dequant(raw, qtype, 512)
    x = rng.standard_normal((7, 512)).astype(np.float32)  # 7: the GEMM pads to 8 tokens
    xq = kernels_cpu.quantize_activations(x, int(qtype))
    want = xq.astype(np.float64) @ dense.T.astype(np.float64)
    tol = 1e-4 * np.abs(want).max()
    np.testing.assert_allclose(kernels_cpu.linear(x[:1], w), want[:1] + q8_1_sum_correction(raw, qtype, x[:1]),
                               atol=tol)  # matvec (decode): integer dot products
    # matmul (prefill): the integer GEMM follows llama.cpp's Q8_1 sums too; BLAS tiles do not
    int_gemm = gemm == "int8" and qtype not in (Q.F32, Q.F16, Q.BF16)
    np.testing.assert_allclose(kernels_cpu.linear(x, w), want + (q8_1_sum_correction(raw, qtype, x) if int_gemm else 0),
                               atol=tol)


def q8_1_sum_correction(raw, qtype, x):
    """What llama.cpp's Q8_1 activations change for Q4_1/Q5_1 weights: the block sum s
    is stored as f16, so the min term m * s differs from m * d * sum(q) (else 0)."""
    if qtype not in (Q.Q4_1, Q.Q5_1):
        return 0.0
    xq, xd, xs, isum = kernels_cpu.quantize_q8(x, 32)
    bs = GGML_QUANT_SIZES[qtype][1]
    m = raw.reshape(raw.shape[0], -1, bs)[:, :, 2:4].copy().view(np.float16).astype(np.float64)[:, :, 0]
    return (m[None, :, :] * (xs - xd * isum)[:, None, :]).sum(2)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16], ids=lambda t: t.name)
def test_float_rows_sum_near_float64(qtype):
    """A float row's dot product (16 partial sums, a MoE router's matvec) within float32
    rounding of float64, with 23 rows (the last group of 4 partial) and 515 columns (not
    a multiple of 16)."""
    from flashlm.kernels_cpu import acts as D

    rng = np.random.default_rng(300 + int(qtype))
    dense = rng.standard_normal((23, 515)).astype(np.float32)
    raw = {Q.F32: dense, Q.F16: dense.astype(np.float16)}.get(qtype)
    if raw is None:  # bf16: the high half of each float32
        raw = (dense.view(np.uint32) >> 16).astype(np.uint16)
    raw = np.ascontiguousarray(raw).view(np.uint8)
    x = rng.standard_normal(515).astype(np.float32)
    out = np.empty(23, np.float32)
    D._mv(int(qtype), raw, x, out, K.F16_TABLE, 2, np.arange(23, dtype=np.int64))
    xr = kernels_cpu.quantize_activations(x[None], int(qtype))[0]
    want = ref_dequant(raw, qtype, 515).astype(np.float64) @ xr.astype(np.float64)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_row_subsets_and_transposed_product(qtype):
    rng = np.random.default_rng(200 + int(qtype))
    raw = random_blocks(qtype, 70, 256, rng)
    w = TensorRef("w", qtype, (70, 256), raw, 0)
    x = rng.standard_normal(256).astype(np.float32)
    rows = rng.permutation(70)[:23]
    np.testing.assert_array_equal(kernels_cpu.matvec(x, w, rows), kernels_cpu.matvec(x, w)[rows])
    # transposed: out += sum_i coef_i * W[rows_i] (down-projection columns stored as rows)
    # (Q8_0 goes 4 rows at a time: counts that leave 1, 3 and 3 rows over)
    for n in (1, 3, 23):
        coef = rng.standard_normal(n).astype(np.float32)
        out = np.ones(256, np.float32)
        kernels_cpu.matvec_t(coef, w, rows[:n], out)
        want = 1.0 + coef.astype(np.float64) @ ref_dequant(raw, qtype, 256)[rows[:n]].astype(np.float64)
        np.testing.assert_allclose(out, want, atol=1e-4 * np.abs(want).max())


def test_activation_quantization_error_is_bounded():
    # Q8 round trip: each element moves by at most half a step of its block's scale d =
    # amax/127, plus, for Q8_0, 127 times d's own f16 rounding (relative 2^-11).
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 512)).astype(np.float32)
    for qtype, block in ((Q.Q4_0, 32), (Q.Q4_K, 256)):
        y = kernels_cpu.quantize_activations(x, int(qtype))
        amax = np.abs(x.reshape(3, -1, block)).max(-1, keepdims=True)
        err = np.abs((y - x).reshape(3, -1, block))
        d = amax / 127
        slack = 127 * 2.0**-11 if block == 32 else 0.0
        assert (err <= d * (0.5 + slack) * 1.001 + 1e-7).all()


@pytest.mark.parametrize("model", ["smollm2_path", "gemma3_path"])
def test_real_tensors_match_reference(model, request):
    mf = GGUFModelFile(request.getfixturevalue(model))
    seen = set()
    rng = np.random.default_rng(0)
    for t in mf.tensors.values():
        if t.qtype in seen or len(t.shape) != 2:
            continue
        seen.add(t.qtype)
        rows = min(64, t.shape[0])
        sub = TensorRef(t.name, t.qtype, (rows, t.shape[1]), t.data[:rows], t.offset)
        ref = ref_dequant(np.ascontiguousarray(sub.data), t.qtype, t.shape[1])
        np.testing.assert_array_equal(kernels_cpu.dequantize(sub), ref)
        x = rng.standard_normal((5, t.shape[1])).astype(np.float32)
        want = kernels_cpu.quantize_activations(x, int(t.qtype)) @ ref.T
        want_q8_1 = want + q8_1_sum_correction(np.ascontiguousarray(sub.data), t.qtype, x)
        tol = 1e-4 * np.abs(want).max()
        np.testing.assert_allclose(kernels_cpu.linear(x[:1], sub), want_q8_1[:1], atol=tol)  # decode
        if kernels_cpu.INT8_GEMM:  # prefill: the integer GEMM, or BLAS on dequantized tiles
            np.testing.assert_allclose(kernels_cpu.linear(x, sub), want_q8_1, atol=tol)
        else:
            np.testing.assert_allclose(kernels_cpu.linear(x, sub), want, atol=tol)
    assert len(seen) >= 2


def test_embed_gathers_rows(smollm2_path):
    mf = GGUFModelFile(smollm2_path)
    emb = mf.tensors["token_embd.weight"]
    ids = np.array([0, 5, 49151, 5])
    ref = ref_dequant(np.ascontiguousarray(emb.data[ids]), emb.qtype, emb.shape[1])
    np.testing.assert_array_equal(kernels_cpu.embed(emb, ids), ref)


@pytest.mark.parametrize("rows", [(40, 72, 8), (48, 80, 16)], ids=["blas-tiles", "int8-gemm"])
def test_linear_many_equals_one_at_a_time(rows, monkeypatch):
    # Several weights of different types in one pass of the prefill threads, with
    # shares that cut through a weight. (The integer GEMM takes row counts in
    # multiples of 16; other counts go to BLAS.)
    monkeypatch.setattr(kernels_cpu, "INT8_GEMM", True)
    rng = np.random.default_rng(11)
    ws = []
    for qtype, rows in zip((Q.Q4_1, Q.Q4_K, Q.Q8_0), rows):
        raw = random_blocks(qtype, rows, 256, rng)
        ws.append(TensorRef(qtype.name, qtype, (rows, 256), raw, 0))
    x = rng.standard_normal((9, 256)).astype(np.float32)
    for got, w in zip(kernels_cpu.linear_many(x, ws), ws):
        np.testing.assert_allclose(got, kernels_cpu.linear(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 5])
def test_prefill_attention_matches_reference(window):
    # The compiled causal attention over the cache against the numpy reference twin,
    # with grouped-query heads, earlier positions in the cache, and a sliding window.
    rng = np.random.default_rng(12)
    n_layer, n_head, n_kv, hd, n_ctx, pos0, T = 2, 6, 2, 16, 32, 4, 7
    f16 = lambda a: a.astype(np.float16).astype(np.float32)  # noqa: E731
    kc = f16(rng.standard_normal((n_layer, n_kv, n_ctx, hd)).astype(np.float32))
    vc = f16(rng.standard_normal((n_layer, n_kv, n_ctx, hd)).astype(np.float32))
    q = rng.standard_normal((T, n_head, hd)).astype(np.float32)
    f16_bits = lambda a: a.astype(np.float16).view(np.uint16)  # noqa: E731  the cache's storage
    got = kernels_cpu.attend(q, f16_bits(kc), f16_bits(vc), 1, pos0, 0.25, window)
    L = pos0 + T
    want = reference.attention(q.copy(), kc[1, :, :L], vc[1, :, :L], pos0, 0.25, window)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_glu_matches_reference():
    rng = np.random.default_rng(13)
    g = (rng.standard_normal((5, 300)) * 4).astype(np.float32)
    g[0, :4] = [-12.0, 12.0, 0.0, -0.0]
    u = rng.standard_normal((5, 300)).astype(np.float32)
    np.testing.assert_array_equal(kernels_cpu.glu(g, u, gelu=True), reference.gelu(g) * u)
    np.testing.assert_allclose(kernels_cpu.glu(g, u, gelu=False), reference.silu(g) * u, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(kernels_cpu.act(g[1], True), reference.gelu(g[1]))


def _arch(**kw):
    from flashlm.kernels_cpu.layer import arch_array

    base = dict(n_layer=2, n_embd=64, n_head=4, n_head_kv=2, head_dim=16, v_head_dim=16, rope_dim=16, neox=True,
                window=0, qk_norm=False, qk_norm_full=False, post_norms=False, gelu=False, scale_q=False, bias=False,
                eps=1e-6, rope_base=10000.0, rope_base_swa=10000.0, rope_scale=1.0, attn_scale=0.25, embed_scale=1.0,
                softcap=0.0, residual=1.0, logit_scale=1.0)
    return arch_array(**{**base, **kw})


def test_layer_norm_and_rope_match_reference():
    # The compiled layer steps against the numpy twin (tests/reference.py): RMSNorm, and
    # q/k through biases, per-head norms and RoPE (both pair orders) into the f16 cache.
    from flashlm.kernels_cpu import layer as L

    rng = np.random.default_rng(21)
    T, pos0 = 5, 3
    x = rng.standard_normal((T, 64)).astype(np.float32)
    w = rng.standard_normal(64).astype(np.float32)
    out = np.empty_like(x)
    L.norm_rows(x, w, 1e-6, out)
    np.testing.assert_allclose(out, reference.rmsnorm(x, w, 1e-6), rtol=2e-6, atol=2e-6)
    for neox, qk_norm, bias in ((True, False, False), (False, True, True)):
        a = _arch(neox=neox, qk_norm=qk_norm, bias=bias)
        vl = rng.standard_normal((len(L.VECS), 64)).astype(np.float32)
        q = rng.standard_normal((T, 64)).astype(np.float32)
        k = rng.standard_normal((T, 32)).astype(np.float32)
        v = rng.standard_normal((T, 32)).astype(np.float32)
        kc = np.zeros((2, 2, 16, 16), dtype=np.uint16)
        vc = np.zeros((2, 2, 16, 16), dtype=np.uint16)
        want_q, want_k, want_v = q.copy(), k.copy(), v.copy()
        if bias:
            want_q += vl[L.V_BQ, :64]
            want_k += vl[L.V_BK, :32]
            want_v += vl[L.V_BV, :32]
        want_q, want_k = want_q.reshape(T, 4, 16), want_k.reshape(T, 2, 16)
        if qk_norm:
            want_q = reference.rmsnorm(want_q, vl[L.V_Q_NORM, :16], 1e-6)
            want_k = reference.rmsnorm(want_k, vl[L.V_K_NORM, :16], 1e-6)
        style = reference.ROPE_NEOX if neox else reference.ROPE_NORM
        pos = np.arange(pos0, pos0 + T)
        reference.rope(want_q, pos, 16, 10000.0, 1.0, style)
        reference.rope(want_k, pos, 16, 10000.0, 1.0, style)
        scale = L.qkv_rows(1, pos0, q, k, v, vl, False, kc, vc, a)
        assert scale == 0.25
        np.testing.assert_allclose(q.reshape(T, 4, 16), want_q, rtol=1e-5, atol=1e-5)
        cached = kc[1, :, pos0:pos0 + T].view(np.float16).astype(np.float32).transpose(1, 0, 2)
        np.testing.assert_allclose(cached, want_k, rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(vc[1, :, pos0:pos0 + T].view(np.float16).transpose(1, 0, 2),
                                      want_v.reshape(T, 2, 16).astype(np.float16))
        assert not kc[1, :, :pos0].any() and not kc[0].any()  # nothing else written


def test_residual_steps_match_reference():
    from flashlm.kernels_cpu import layer as L

    rng = np.random.default_rng(22)
    a = _arch(post_norms=True, bias=True, residual=0.5, logit_scale=2.0, softcap=3.0)
    vl = rng.standard_normal((len(L.VECS), 64)).astype(np.float32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    o = rng.standard_normal((3, 64)).astype(np.float32)
    want_o = reference.rmsnorm(o + vl[L.V_BO], vl[L.V_POST_ATTN], 1e-6)
    want_x = x + want_o * np.float32(0.5)
    h = np.empty_like(x)
    L.attn_residual(o, x, h, vl, a)
    np.testing.assert_allclose(x, want_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h, reference.rmsnorm(want_x, vl[L.V_FFN_NORM], 1e-6), rtol=1e-5, atol=1e-5)
    d = rng.standard_normal((3, 64)).astype(np.float32)
    want_x = x + reference.rmsnorm(d, vl[L.V_POST_FFN], 1e-6) * np.float32(0.5)
    L.ffn_residual(d, x, vl, a)
    np.testing.assert_allclose(x, want_x, rtol=1e-5, atol=1e-5)
    logits = rng.standard_normal((2, 10)).astype(np.float32) * 10
    want = np.tanh(logits * np.float32(0.5) / 3.0) * 3.0
    L.logits_rows(logits, a)
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)


def test_f16_bits_match_numpy():
    from flashlm.kernels_cpu.qdot import f16_bits, round_f16

    rng = np.random.default_rng(14)
    x = np.concatenate([rng.standard_normal(20000) * 100, rng.standard_normal(2000) * 1e-5,
                        [0.0, -0.0, 65504, 65519, 65520, -1e6, 6.1e-5, np.inf, -np.inf]]).astype(np.float32)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    np.testing.assert_array_equal([f16_bits(v) for v in x], want.view(np.uint16).astype(np.int64))
    np.testing.assert_array_equal([round_f16(v) for v in x], want.astype(np.float32))


def test_blas_limit_restored_after_overlapping_prefills(monkeypatch):
    """Two threads' prefills overlap (A in, B in, A out, B out): BLAS is limited once,
    by the first to open, and restored once, by the last to close. (A recording
    controller stands in for threadpoolctl's: OpenBLAS itself does not reliably report
    a limit set from a thread other than the main one.)"""
    import threading

    import threadpoolctl

    calls = []

    class Limiter:
        def restore_original_limits(self):
            calls.append("restore")

    class Controller:
        def limit(self, limits, user_api):
            calls.append(("limit", limits, user_api))
            return Limiter()

    monkeypatch.setattr(threadpoolctl, "ThreadpoolController", Controller)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with kernels_cpu.blas_one_thread():
            a_in.set()
            b_in.wait()
        a_out.set()

    def b():
        a_in.wait()
        with kernels_cpu.blas_one_thread():
            b_in.set()
            a_out.wait()
            seen["b_after_a"] = list(calls)

    ts = [threading.Thread(target=f) for f in (a, b)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert seen["b_after_a"] == [("limit", 1, "blas")]  # still limited while B runs
    assert calls == [("limit", 1, "blas"), "restore"]


def test_on_threads_waits_for_workers_when_caller_share_raises():
    import time

    done = []

    def job(i):
        if i == 0:
            raise ValueError("first share")
        time.sleep(0.2)
        done.append(i)

    with pytest.raises(ValueError):
        kernels_cpu._on_threads(job, [(0,), (1,)])
    assert done == [1]


def test_portable_simd_path_matches(tmp_path):
    """The generic LLVM vector path (non-x86 hosts, FLASHLM_SIMD=generic) gives the
    same products as the path this host uses. Run in a child process with its own
    compile cache."""
    import os
    import subprocess
    import sys

    from flashlm.kernels_cpu import simd

    rng = np.random.default_rng(7)
    qtypes = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
    x = rng.standard_normal((6, 512)).astype(np.float32)
    data = {t.name: random_blocks(t, 48, 512, rng) for t in qtypes}
    np.savez(tmp_path / "w.npz", x=x, **data)
    script = f"""
import numpy as np
from gguf import GGMLQuantizationType as Q
from flashlm import kernels_cpu
from flashlm.kernels_cpu import simd
from flashlm.formats.modelfile import TensorRef
assert simd.MODE == "generic", simd.MODE
d = np.load({str(tmp_path / "w.npz")!r})
assert kernels_cpu.INT8_GEMM
out = {{n: kernels_cpu.matvec(d["x"][0], TensorRef("w", Q[n], (48, 512), d[n], 0)) for n in d.files if n != "x"}}
out.update({{"gemm_" + n: kernels_cpu.linear(d["x"], TensorRef("w", Q[n], (48, 512), d[n], 0))
            for n in d.files if n != "x"}})
np.savez({str(tmp_path / "out.npz")!r}, **out)
"""
    env = dict(os.environ, FLASHLM_SIMD="generic", FLASHLM_PREFILL="int8", NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=600)
    got = np.load(tmp_path / "out.npz")
    for t in qtypes:
        w = TensorRef("w", t, (48, 512), data[t.name], 0)
        here = kernels_cpu.matvec(x[0], w)
        np.testing.assert_allclose(got[t.name], here, rtol=0, atol=1e-5 * np.abs(here).max(), err_msg=t.name)
        with pytest.MonkeyPatch.context() as mp:  # the GEMM's generic dpbusd against this host's
            mp.setattr(kernels_cpu, "INT8_GEMM", True)
            here = kernels_cpu.linear(x, w)
        np.testing.assert_allclose(got["gemm_" + t.name], here, rtol=0, atol=1e-5 * np.abs(here).max(), err_msg=t.name)
    assert simd.MODE in ("avx2", "generic")
