"""The compiled decode step (kernels_cpu/decode.py) computes what the layer-by-layer path
computes, for every architecture."""

import copy

import numpy as np
import pytest

import flashlm
from flashlm.runtime.blocks import KVCache

from conftest import cosine_rows


def _both_paths(model, tokens, n_decode):
    """Logits of the last n_decode tokens, decoded one at a time by each path."""
    M, cfg = model.model, model.config
    kv = KVCache(cfg, 128)
    M.forward(np.asarray(tokens[:-n_decode]), 0, kv)
    kv_layers = copy.deepcopy(kv)
    fused, layered = [], []
    fused_decoder = M.fused
    assert fused_decoder is not None
    for i, t in enumerate(tokens[-n_decode:]):
        pos = len(tokens) - n_decode + i
        M.fused = fused_decoder
        fused.append(M.forward(np.asarray([t]), pos, kv)[0])
        M.fused = None
        layered.append(M.forward(np.asarray([t]), pos, kv_layers)[0])
    M.fused = fused_decoder
    return np.array(fused), np.array(layered), kv, kv_layers


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_fused_decode_matches_layer_path(arch, random_gguf):
    with flashlm.load(random_gguf(arch), n_ctx=128, n_threads=2) as m:
        tokens = m.tokenize("One two three four five six seven eight nine ten eleven twelve thirteen")
        a, b, kv, kv2 = _both_paths(m, tokens, 8)
    cos = cosine_rows(a, b)
    assert cos.min() >= 0.9999, cos
    assert (a.argmax(1) == b.argmax(1)).all()
    n = len(tokens)
    np.testing.assert_allclose(kv.k[:, :, :n], kv2.k[:, :, :n], atol=2e-2 * np.abs(kv2.k[:, :, :n]).max())


def test_fused_decode_on_the_default_model(smollm2):
    tokens = smollm2.tokenize("The capital of France is Paris, and the capital of Italy is")
    a, b, _, _ = _both_paths(smollm2, tokens, 6)
    cos = cosine_rows(a, b)
    # The two paths differ only in float summation order, which can flip an int8
    # activation rounding here and there, and this 30-layer model amplifies such flips
    # (llama.cpp's own two attention kernels differ by up to cos 0.97 on it; see
    # test_parity). Measured: min 0.996, median 0.9989.
    assert np.median(cos) >= 0.998 and cos.min() >= 0.99, cos
    assert (a.argmax(1) == b.argmax(1)).mean() >= 5 / 6


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_streamed_decode_step_matches_layer_path(arch, random_gguf, tmp_path):
    # A flash-layout model decodes through blocks.LayerDecoder: compiled attention per
    # layer around the store's own FFN. It must compute what the layer path computes.
    from flashlm.runtime.convert import convert
    from flashlm.runtime.blocks import LayerDecoder

    flash = convert(random_gguf(arch), tmp_path / f"{arch}.flash.gguf")
    with flashlm.load(flash, n_ctx=128, n_threads=2, streaming=dict(predictor=None)) as m:
        assert isinstance(m.model.fused, LayerDecoder)
        tokens = m.tokenize("One two three four five six seven eight nine ten eleven twelve thirteen")
        a, b, kv, kv2 = _both_paths(m, tokens, 8)
    cos = cosine_rows(a, b)
    assert cos.min() >= 0.9999, cos
    assert (a.argmax(1) == b.argmax(1)).all()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_layer_math_matches_the_numpy_twin(arch, random_gguf):
    # Prefill runs kernels_cpu/layer.py's compiled steps; tests/reference.py builds the same
    # forward pass from numpy ops (llama.cpp's definitions). They differ only in float
    # summation order and where the f16 cache rounds.
    import reference

    with flashlm.load(random_gguf(arch), n_ctx=128, n_threads=2) as m:
        tokens = m.tokenize("One two three four five six seven eight nine ten eleven twelve thirteen")
        got = m.logits(tokens)
        want = reference.forward(m.model, tokens)
    cos = cosine_rows(got, want)
    assert cos.min() >= 0.9999, cos
    assert (got.argmax(1) == want.argmax(1)).all()
