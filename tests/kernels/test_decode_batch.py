"""The batched decode step (kernels_cpu/decode.py's decode_batch, blocks' step_batch): B
sequences, one token each at its own position in its own slot of a KV pool, give for
every row the logits and KV that the one-token step gives that sequence alone, bit for
bit (a server's greedy outputs must be Model.generate's)."""

import numpy as np
import pytest

import flashlm
from flashlm import kernels_cpu
from flashlm.errors import ContextLengthError, InvalidArgumentError
from flashlm.kernels_cpu import F16_TABLE, acts, qdot
from flashlm.formats.modelfile import TensorRef
from flashlm.runtime.blocks import FusedDecoder, KVCache, LayerDecoder

from test_kernels import ALL_TYPES, random_blocks

WORDS = " ".join(["one two three four five six seven eight nine ten"] * 4)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_products_of_b_vectors_are_each_vectors_own(qtype):
    """_mv_multi's row b is _mv of x[b]; matvec_rows_multi over a subset of rows (in any
    order, a count not a multiple of 4) is matvec_rows of each vector."""
    rng = np.random.default_rng(int(qtype))
    raw = random_blocks(qtype, 50, 512, rng)
    raw.setflags(write=False)  # as every weight reaches the kernels (one compiled variant, not two)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    all_rows = np.arange(50, dtype=np.int64)
    out = np.empty((5, 50), dtype=np.float32)
    acts._mv_multi(int(qtype), raw, x, out, F16_TABLE, 2, all_rows)
    for b in range(5):
        one = np.empty(50, dtype=np.float32)
        acts._mv(int(qtype), raw, x[b], one, F16_TABLE, 2, all_rows)
        assert np.array_equal(out[b], one), b
    block = kernels_cpu._act_block(int(qtype))
    if block:
        rows = rng.permutation(50)[:23].astype(np.int64)
        sub = np.empty((5, 23), dtype=np.float32)
        qdot.matvec_rows_multi(int(qtype), raw, rows, x, *kernels_cpu.quantize_q8(x, block), sub, F16_TABLE, 3, False)
        w = TensorRef("w", qtype, (50, 512), raw, 0)
        for b in range(5):
            assert np.array_equal(sub[b], kernels_cpu.matvec(x[b], w, rows)), b


def assert_batch_is_each_alone(decoder, lm, tokens, lens, n_steps=3):
    """Prefill each sequence tokens[:n] (n in lens) into its own KVCache and a copy into
    a pool slot (slots shuffled, one left spare); then n_steps of decoder.step_batch
    against decoder.step on each sequence's own cache: logits and KV bit for bit, and
    the spare slot never written."""
    cfg, B = lm.cfg, len(lens)
    cap = max(lens) + n_steps
    slots = np.random.default_rng(B).permutation(B + 1)[:B]
    shape = (B + 1, cfg.n_layer, cfg.n_head_kv, cap)
    pk, pv = np.zeros(shape + (cfg.head_dim,), np.uint16), np.zeros(shape + (cfg.v_head_dim,), np.uint16)
    kvs, cur = [], []
    for b, n in enumerate(lens):
        kv = KVCache(cfg, cap)
        cur.append(int(lm.forward(np.asarray(tokens[:n]), 0, kv)[-1].argmax()))
        pk[slots[b], :, :, :n], pv[slots[b], :, :, :n] = kv.k16[:, :, :n], kv.v16[:, :, :n]
        kvs.append(kv)
    pos = np.array(lens)
    for step in range(n_steps):
        got = decoder.step_batch(cur, pos, slots, pk, pv)
        for b in range(B):
            want = decoder.step(int(cur[b]), int(pos[b]), kvs[b])
            assert np.array_equal(got[b], want), (step, b, np.abs(got[b] - want).max())
            n = pos[b] + 1
            assert np.array_equal(pk[slots[b], :, :, :n], kvs[b].k16[:, :, :n]), (step, b)
            assert np.array_equal(pv[slots[b], :, :, :n], kvs[b].v16[:, :, :n]), (step, b)
        cur, pos = got.argmax(1), pos + 1
    spare = np.setdiff1d(np.arange(B + 1), slots)
    assert not pk[spare].any() and not pv[spare].any()


@pytest.mark.parametrize("B", [1, 2, 3, 4, 5])
def test_batch_matches_step_on_the_default_model(smollm2, B):
    lm = smollm2.model
    assert type(lm.fused) is FusedDecoder
    assert_batch_is_each_alone(lm.fused, lm, smollm2.tokenize(WORDS), [7, 3, 12, 5, 9][:B])


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_batch_matches_step_for_every_architecture(arch, random_gguf):
    # gemma3's sliding window is 16: rows before, across and past it
    with flashlm.load(random_gguf(arch), n_ctx=64, n_threads=2) as m:
        assert_batch_is_each_alone(m.model.fused, m.model, m.tokenize(WORDS), [3, 17, 14, 25, 30], n_steps=4)


def test_layer_decoder_batch_matches_its_step(random_gguf):
    """blocks.LayerDecoder (the attention compiled per layer around FFNs called from
    Python), here over a resident model's dense FFNs."""
    with flashlm.load(random_gguf("gemma3"), n_ctx=64, n_threads=2) as m:
        assert_batch_is_each_alone(LayerDecoder(m.model), m.model, m.tokenize(WORDS), [4, 18, 9], n_steps=4)


@pytest.mark.parametrize("kind", ["flash", "moe"])
def test_streamed_ffns_batch_matches_their_step(kind, random_gguf, moe_gguf, tmp_path):
    """A flash layout's neurons (with the gate predictor) and a mixture's experts: the
    FFN strategies' state (windows, caches, routing) changes no row."""
    from flashlm.runtime.convert import convert

    if kind == "flash":
        path, kw = convert(random_gguf("llama"), tmp_path / "llama.flash.gguf"), {}
    else:
        path, kw = moe_gguf("qwen2moe"), dict(memory_budget=1 << 40, experts=dict(prefetch=True))
    with flashlm.load(path, n_ctx=64, n_threads=2, **kw) as m:
        assert isinstance(m.model.fused, LayerDecoder)
        assert_batch_is_each_alone(m.model.fused, m.model, m.tokenize(WORDS), [6, 2, 11], n_steps=3)


def test_step_batch_refuses_what_would_write_outside_the_pool(smollm2):
    cfg, F = smollm2.config, smollm2.model.fused
    pk = np.zeros((2, cfg.n_layer, cfg.n_head_kv, 8, cfg.head_dim), np.uint16)
    pv = np.zeros_like(pk)
    with pytest.raises(InvalidArgumentError, match="distinct"):
        F.step_batch([1, 2], [0, 0], [1, 1], pk, pv)
    with pytest.raises(InvalidArgumentError, match="distinct"):
        F.step_batch([1], [0], [2], pk, pv)
    with pytest.raises(ContextLengthError):
        F.step_batch([1], [8], [0], pk, pv)
    with pytest.raises(InvalidArgumentError, match="C-contiguous"):
        F.step_batch([1], [0], [0], pk[:, :, :, :4], pv[:, :, :, :4])
    assert not pk.any()
