"""Mixture-of-experts architectures against llama.cpp, on small random-weight GGUFs
(tests/moe_fixtures.py), and the routing rules they use."""

import json

import numba
import numpy as np
import pytest
from conftest import cosine_rows, llama_cpp_logits, llama_cpp_model
from parity_prompts import PROMPTS
from reference import route

import flashlm
from flashlm.errors import ModelFormatError
from flashlm.experts.moe import route_one, route_rows
from flashlm.kernels_cpu import acts as _acts
from flashlm.kernels_cpu import moe as _moe

ARCHS = ["mixtral", "qwen2moe", "qwen3moe", "olmoe", "granitemoe", "granitemoe_shared"]


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    """Expert bundles go to a cache folder of the test's own, not the user's."""
    monkeypatch.setenv("FLASHLM_HOME", str(tmp_path / "flashlm-home"))


@pytest.mark.parametrize("arch", ARCHS)
def test_moe_parity_with_llama_cpp(arch, moe_gguf):
    path = moe_gguf(arch)
    ref = llama_cpp_model(path)
    with flashlm.load(path, n_ctx=512, n_threads=2) as m:
        assert m.config.n_expert == 8
        routes = []
        m.model.on_route = lambda layer, ids, w, p: routes.append(ids)
        ours, theirs = [], []
        for prompt in PROMPTS:
            tokens = m.tokenize(prompt)
            ours.append(m.logits(tokens))
            theirs.append(llama_cpp_logits(ref, tokens))
        # and decoding, token by token (compiled attention around the experts)
        tokens = m.tokenize(PROMPTS[0])
        m.eval(tokens[:-4])
        steps = [m.eval([t]) for t in tokens[-4:]]
    cos = np.concatenate([cosine_rows(a, b) for a, b in zip(ours, theirs)])
    top1 = np.concatenate([a.argmax(1) == b.argmax(1) for a, b in zip(ours, theirs)])
    print(f"\n{arch}: {len(cos)} positions, cos min {cos.min():.5f}, argmax {top1.mean():.3f}")
    assert cos.min() >= 0.995
    assert top1.mean() >= 0.98
    # scale too (granite's logit_scale changes no cosine or argmax)
    assert max(np.abs(a - b).max() / np.abs(b).max() for a, b in zip(ours, theirs)) < 0.02
    assert cosine_rows(np.array(steps), ours[0][-4:]).min() >= 0.999
    chosen = np.concatenate(routes)
    assert len(np.unique(chosen)) == 8  # the router spreads tokens over all the experts


def test_routing_rules():
    class Cfg:
        n_expert_used, expert_gating, expert_weights_norm, expert_weights_scale = 2, "softmax", False, 0.0

    logits = np.array([[0.0, 2.0, 1.0, -1.0]], dtype=np.float32)
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()
    ids, w, _ = route(logits, Cfg)
    assert ids.tolist() == [[1, 2]]
    np.testing.assert_allclose(w[0], p[[1, 2]], rtol=1e-6)  # softmax over all experts, then top-k, as they are
    Cfg.expert_weights_norm = True
    np.testing.assert_allclose(route(logits, Cfg)[1][0], p[[1, 2]] / p[[1, 2]].sum(), rtol=1e-6)
    Cfg.expert_weights_scale, Cfg.expert_gating = 2.5, "sigmoid"
    s = 1 / (1 + np.exp(-logits[0]))
    np.testing.assert_allclose(route(logits, Cfg)[1][0], 2.5 * s[[1, 2]] / s[[1, 2]].sum(), rtol=1e-6)


@pytest.mark.parametrize("gating, norm, scale", [("softmax", False, 0.0), ("softmax", True, 0.0), ("sigmoid", True, 2.5)])
def test_prompt_routing_is_one_tokens_routing_per_row(gating, norm, scale):
    """A prompt's routing (route_rows, one compiled call) chooses, for each token, what the
    numpy twin chooses from the same router logits, with the same weights."""
    from gguf import GGMLQuantizationType

    from flashlm.formats.modelfile import TensorRef

    class Cfg:
        n_expert_used, expert_gating, expert_weights_norm, expert_weights_scale = 3, gating, norm, scale

    class Store:  # the router as a mapped float32 tensor
        def get(self, name):
            return TensorRef(name, GGMLQuantizationType.F32, W.shape, raw, 0)

    rng = np.random.default_rng(5)
    W = rng.standard_normal((8, 64)).astype(np.float32)
    raw = W.view(np.uint8).reshape(8, -1)
    h = rng.standard_normal((6, 64)).astype(np.float32)
    ids, w, p = route_rows(Store(), Cfg, 0, h)
    want_ids, want_w, want_p = route(h.astype(np.float64) @ W.T.astype(np.float64), Cfg)
    np.testing.assert_allclose(p, want_p, rtol=1e-5, atol=1e-7)
    assert (ids == want_ids).all()
    np.testing.assert_allclose(w, want_w, rtol=1e-5)
    one = route_one(Store(), Cfg, 0, h[2])  # the same as a single token's
    assert (one[0] == ids[2]).all() and (one[1] == w[2]).all()


@numba.njit(cache=True)
def _generic_f32_rows(w, x, out, lut, rows):
    _acts._mv(0, w, x, out, lut, 1, rows)


@numba.njit(cache=True)
def _in_place_f32_rows(w, x, out):
    _moe._f32_rows(w, x, out)


def test_compiled_routing():
    """One token's compiled routing: a float32 router read in place gives the generic
    float matvec's logits to the bit, and the k largest are picked as a stable sort
    would (ties to the lower id)."""
    from flashlm.kernels_cpu import F16_TABLE, _all_rows
    from flashlm.kernels_cpu import moe as D

    generic, in_place = _generic_f32_rows, _in_place_f32_rows
    rng = np.random.default_rng(7)
    for t in range(40):
        n, d = int(rng.integers(2, 40)), 16 * int(rng.integers(1, 40))
        k = int(rng.integers(1, n + 1))
        W = rng.standard_normal((n, d)).astype(np.float32)
        W[n - 1] = W[0]  # a tie
        raw = W.view(np.uint8).reshape(n, -1)
        raw.setflags(write=False)  # as mapped
        x = rng.standard_normal(d).astype(np.float32)
        a, b = np.empty(n, np.float32), np.empty(n, np.float32)
        generic(raw, x, a, F16_TABLE, _all_rows(n))
        in_place(raw, x, b)
        np.testing.assert_array_equal(a, b)
        ids, w, p = np.empty(k, np.int64), np.empty(k, np.float32), np.empty(n, np.float32)
        D.moe_route(raw, 0, x, False, True, 0.0, F16_TABLE, _all_rows(n), ids, w, p)
        assert ids.tolist() == np.argsort(-p, kind="stable")[:k].tolist()
        want = np.exp(W.astype(np.float64) @ x - (W.astype(np.float64) @ x).max())
        np.testing.assert_allclose(p, want / want.sum(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(w, p[ids] / p[ids].sum(), rtol=1e-6)


@pytest.mark.parametrize("policy, prefetch, bundle", [("freq", "auto", True), ("lru", True, True), ("lfu", False, True), ("score", True, False),
                                                      ("lru", False, False)])
def test_streamed_experts_equal_resident(policy, prefetch, bundle, moe_gguf):
    from flashlm.errors import FlashLMError
    from flashlm.experts.store import StreamedExperts
    from flashlm.io import NativeAIO

    path = moe_gguf("qwen2moe")
    opts = dict(policy=policy, prefetch=prefetch, bundle=bundle)
    with pytest.raises(FlashLMError, match=r"below the minimum") as e:
        flashlm.load(path, n_ctx=256, memory_budget="1MB", experts=opts)
    per = 2 if prefetch is True else 1  # auto: prefetch only where the cache holds two layers' experts
    assert f"{4 * per} experts" in str(e.value)  # qwen2moe's fixture uses 4 of 8
    with flashlm.load(path, n_ctx=256, n_threads=2) as ref:
        tokens = ref.tokenize(PROMPTS[1])
        want = ref.logits(tokens)
        text = ref.generate(PROMPTS[0], max_tokens=12, temperature=0)
        minimum = None
        with flashlm.load(path, n_ctx=256, n_threads=2, memory_budget=1 << 40, experts=opts) as big:
            minimum, expert = big.plan.minimum, big.plan.expert_bytes
        if prefetch == "auto":  # too small a cache for prefetch: auto turns it off
            with flashlm.load(path, n_ctx=256, n_threads=2, memory_budget=minimum + 3 * expert, experts=opts) as m:
                assert m.experts.auto is None and not m.experts.prefetching
                assert m.experts.take_stats()["prefetch"] == "auto: off (the cache holds fewer than two layers' experts)"
        extra = 3 + 4 * (prefetch == "auto")
        budget = minimum + extra * expert  # a cache of k (+k) + 3 of the 16 experts: mostly misses
        with flashlm.load(path, n_ctx=256, n_threads=2, memory_budget=budget, experts=opts) as m:
            assert isinstance(m.experts, StreamedExperts) and m.plan.n_slots == 4 * per + extra
            assert (m.experts.bundle is not None) == bundle
            aio = bundle and m.experts.aio is not None
            if bundle:  # where native asynchronous reads work, misses and prefetches use them
                probe = NativeAIO.open(m.experts.bundle)
                assert aio == (probe is not None)
                if probe is not None:
                    probe.close()
            np.testing.assert_array_equal(m.logits(tokens), want)  # the same bytes, the same math
            m.experts.take_stats()
            for x in (ref, m):  # decode steps too (a token's experts computed in parts while misses are read)
                x.reset()
                x.eval(tokens[:1])
            for t in tokens[1:]:
                np.testing.assert_array_equal(m.eval([t]), ref.eval([t]))
            m.reset()  # the prompt prefilled afresh, as when `text` was made
            assert m.generate(PROMPTS[0], max_tokens=12, temperature=0) == text
            st = m.experts.take_stats()
            ex = m.experts
            auto = ex.auto
            if prefetch == "auto":  # every one-token step timed (a longer prompt's not), prefetch switched as told
                n = auto.tokens
                m.logits(tokens)
                assert auto.tokens == n
                m.reset()
                for t in tokens[:5]:
                    m.eval([t])
                assert auto.tokens == n + 5 and ex.prefetching == auto.on
                auto.on, auto._times = False, None  # decided: off
                m.eval([tokens[5]])
                ex.take_stats()
                m.eval([tokens[6]])
                s = ex.take_stats()
                assert not ex.prefetching and s["precision"] is None and s["prefetch"].startswith("auto: off")
            else:
                assert auto is None and st["prefetch"] == ("on" if prefetch else "off")
    assert st["misses"] > 0 and st["hits"] > 0
    # under native AIO a token's cached experts computed while its misses were read (and equal above)
    assert (st["overlapped"] > 0) == aio
    if not prefetch:  # bundled, a miss reads its record (a slot); else the expert's three slices
        assert st["bytes_read"] == st["misses"] * (expert if bundle else sum(m.experts.part_bytes))
    else:
        assert 0 < st["precision"] <= 1 and 0 < st["recall"] <= 1 and st["io_s"] > 0 and st["wait_s"] > 0


def test_auto_prefetch_keeps_the_faster_side():
    from flashlm.experts.autoprefetch import AutoPrefetch

    def run(auto, on_s, off_s, n):
        sides = []
        for _ in range(n):
            sides.append(auto.on)
            auto.record(on_s if auto.on else off_s)
        return sides

    W, WARM = AutoPrefetch.WINDOW, AutoPrefetch.WARM
    a = AutoPrefetch()
    sides = run(a, 1.0, 2.0, WARM + 4 * W)  # prefetch twice as fast: decided after two pairs of windows
    assert sides == [True] * (WARM + W) + [False] * 2 * W + [True] * W  # ABBA, after the warm-up
    assert not a.measuring and a.on and a.ratio == 0.5 and a.measurements == 1
    assert run(a, 1.0, 2.0, AutoPrefetch.HOLD) == [True] * AutoPrefetch.HOLD and a.measuring  # held, then again
    assert "on" in a.describe() and "measuring again" in a.describe()
    b = AutoPrefetch()
    sides = run(b, 1.0, 0.9, WARM + 2 * AutoPrefetch.PAIRS * W)  # 10% slower with it: within EARLY, all pairs
    assert sides.count(True) - WARM == sides.count(False) and not b.measuring and not b.on
    assert b.ratio == pytest.approx(1 / 0.9)
    c = AutoPrefetch()  # a median: one stalled token (a page fault, another process) does not decide
    times = iter([1.0] * (WARM + W) + [0.9] * (W - 1) + [50.0] + [0.9] * W + [1.0] * W)
    for _ in range(WARM + 4 * W):
        c.record(next(times))
    assert c.measuring  # a mean would have put prefetch 4x ahead and decided; the median sees 10% behind
    run(c, 1.0, 0.9, 2 * (AutoPrefetch.PAIRS - 2) * W)
    assert not c.measuring and not c.on and c.ratio == pytest.approx(1 / 0.9)
    d = AutoPrefetch()  # the first tokens (compiling, the cache after the prompt) and each window's first
    for i in range(WARM + 4 * W):  # ones (the cache as the other side left it) are not counted
        counted = i >= WARM and (i - WARM) % W >= AutoPrefetch.SETTLE
        d.record(1.0 if counted else 50.0)  # what is counted: a tie, kept measuring
    assert d.measuring and d.tokens == WARM + 4 * W
    assert d._times == {True: [1.0] * 2 * (W - AutoPrefetch.SETTLE), False: [1.0] * 2 * (W - AutoPrefetch.SETTLE)}


def test_auto_prefetch_is_off_in_a_one_layer_moe(smollm2_path, tmp_path, monkeypatch):
    import moe_fixtures

    monkeypatch.setitem(moe_fixtures.MOE_SPECS, "mixtral", {**moe_fixtures.MOE_SPECS["mixtral"], "n_layer": 1})
    path = moe_fixtures.write_random_moe_gguf(tmp_path / "one-layer.gguf", "mixtral", smollm2_path)
    with flashlm.load(path, n_ctx=64, n_threads=2, memory_budget=1 << 40) as m:
        ex = m.experts
        assert m.config.n_layer == 1 and ex.auto is None and not ex.prefetching
        m.generate("Hello", max_tokens=3, temperature=0)
        st = ex.take_stats()
        assert st["prefetch"] == "auto: off (one layer: no next layer to read ahead)" and st["precision"] is None


def test_experts_computed_in_parts_sum_as_one_call(moe_gguf):
    """moe_experts over any split of a token's experts, then moe_combine, gives moe_decode's
    output bit for bit (a streamed token computes its cached experts first)."""
    from flashlm.kernels_cpu import F16_TABLE, _all_rows
    from flashlm.kernels_cpu import moe as D

    with flashlm.load(moe_gguf("qwen2moe"), n_ctx=64, n_threads=2) as m:
        ex, cfg = m.experts, m.config
        rng = np.random.default_rng(5)
        ids = rng.permutation(cfg.n_expert)[:cfg.n_expert_used]
        buf, offs = ex.locate(1, ids)
        shapes, qts = ex.layout(1)
        x = rng.standard_normal(cfg.n_embd).astype(np.float32)
        w = rng.random(len(ids)).astype(np.float32)
        args = (shapes, qts, x, False, F16_TABLE, numba.get_num_threads(), _all_rows(max(shapes[0, 0], cfg.n_embd)))
        want = np.full(cfg.n_embd, 0.25, dtype=np.float32)  # out is added to
        D.moe_decode(buf, offs, *args[:3], w, *args[3:], want)
        # the next layer's router in the same call (what to prefetch) changes nothing
        r0, r1 = route_one(m.model.store, cfg, 0, x), route_one(m.model.store, cfg, 1, x)
        both = route_one(m.model.store, cfg, 0, x, ahead=True)
        for a, b in zip(both, list(r0) + [r1[0]]):
            np.testing.assert_array_equal(a, b)
        for first in ([], [0], [2, 1], list(range(len(ids)))):
            rest = [j for j in range(len(ids)) if j not in first]
            y = np.full((len(ids), shapes[2, 0]), np.nan, dtype=np.float32)
            for part in (first, rest):
                if part:
                    D.moe_experts(buf, offs, np.array(part, dtype=np.int64), *args, y)
            got = np.full(cfg.n_embd, 0.25, dtype=np.float32)
            D.moe_combine(y, w, got)
            np.testing.assert_array_equal(got, want)


def test_prefetched_experts_are_read_before_use_even_at_the_minimum_budget(moe_gguf):
    path = moe_gguf("qwen2moe")
    with flashlm.load(path, n_ctx=256, n_threads=2) as ref:
        tokens = ref.tokenize(PROMPTS[1])
        want = ref.logits(tokens)
        text = ref.generate(PROMPTS[0], max_tokens=16, temperature=0)
        rx = ref.experts
        with flashlm.load(path, n_ctx=256, memory_budget=1 << 40, experts=dict(prefetch=True)) as big:
            minimum = big.plan.minimum
            # a layer's own experts prefetched, then located at once: read before they are used
            ex, n = big.experts, big.config.n_expert
            ids = np.array([5, 0, 3, 6])
            ex.prefetch(1, ids)
            ex.begin_layer(1, ids[None], np.full((1, n), 1 / n, dtype=np.float32))
            buf, offs = ex.locate(1, ids)
            assert not set((ids + n).tolist()) & set(ex.pending)  # none of them still in flight
            rbuf, roffs = rx.locate(1, ids)
            for j in range(len(ids)):
                for p, nb in enumerate(ex.part_bytes):
                    np.testing.assert_array_equal(buf[offs[j, p]:offs[j, p] + nb], rbuf[roffs[j, p]:roffs[j, p] + nb])
            ex.end_layer(1)
        # the smallest budget: the next layer's prefetches and this layer's experts fill every slot
        with flashlm.load(path, n_ctx=256, n_threads=2, memory_budget=minimum, experts=dict(prefetch=True)) as m:
            assert m.plan.n_slots == 2 * m.config.n_expert_used
            np.testing.assert_array_equal(m.logits(tokens), want)
            assert m.generate(PROMPTS[0], max_tokens=16, temperature=0) == text
            assert not m.experts.cache.pinned.any() or m.experts.pending  # pins only for reads in flight


def test_a_streamed_moe_maps_none_of_its_expert_stacks(moe_gguf):
    """Budget honesty where the page cache holds the whole file: the process maps the
    resident weights and no page of the expert stacks (they stream into the cache), even
    where a fault on a neighbouring weight could map cached pages around it, and after
    writing the bundle (which reads every stack once)."""
    import mmap
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/pagemap")
    path = moe_gguf("qwen2moe")
    opts = dict(n_ctx=256, n_threads=2, memory_budget=1 << 40, experts=dict(prefetch=True))
    with flashlm.load(path, **opts):  # writes the experts' bundle, reading the stacks once
        pass
    with open(path, "rb") as f:
        while f.read(1 << 20):  # the whole file in the page cache
            pass
    with flashlm.load(path, **opts) as m:
        m.generate(PROMPTS[0], max_tokens=8, temperature=0)
        mm, page = m.file.reader.data, mmap.PAGESIZE
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(mm.ctypes.data // page * 8)
            raw = f.read(-(-mm.nbytes // page) * 8)
        present = (np.frombuffer(raw, dtype=np.uint64) >> np.uint64(63)).astype(bool)
        stacked = 0
        for layer in m.experts.stacks:
            for t in layer:
                lo, hi = -(-t.offset // page), (t.offset + t.nbytes) // page
                stacked += hi - lo
                assert not present[lo:hi].any(), f"{t.name}: {present[lo:hi].sum()} pages mapped"
        assert stacked > 0
        embd = m.file.tensors["token_embd.weight"]
        assert present[embd.offset // page:(embd.offset + embd.nbytes - 1) // page + 1].all()  # resident: mapped


def test_expert_bundle_records(moe_gguf, tmp_path):
    """Each record is the expert's gate, up and down slices from the GGUF, then zeros to
    4 KiB; a changed source gets a new bundle, a truncated bundle is written again."""
    import os

    from flashlm.experts.bundle import (
        HEADER,
        PARTS,
        bundle_path,
        ensure_bundle,
        read_header,
        record_bytes,
    )
    from flashlm.formats.modelfile import GGUFModelFile
    from flashlm.runtime.config import config_from_gguf
    from flashlm.runtime.models import model_class

    src = tmp_path / "m.gguf"
    src.write_bytes(moe_gguf("mixtral").read_bytes())
    mf = GGUFModelFile(src)
    cfg = config_from_gguf(mf, model_class(mf.arch))
    path = ensure_bundle(mf, cfg, quiet=True)
    meta = read_header(path)
    rec = record_bytes(meta["parts"])
    assert rec % 4096 == 0 and meta["n_expert"] == cfg.n_expert
    data = np.fromfile(path, dtype=np.uint8)
    for layer, e in [(0, 0), (cfg.n_layer - 1, cfg.n_expert - 1), (1, 3)]:
        r = data[HEADER + (layer * cfg.n_expert + e) * rec:][:rec]
        want = np.concatenate([mf.tensors[f"blk.{layer}.{p}.weight"].data.reshape(cfg.n_expert, -1)[e] for p in PARTS])
        np.testing.assert_array_equal(r[:want.size], want)
        assert not r[want.size:].any()
    mtime = path.stat().st_mtime_ns
    assert ensure_bundle(mf, cfg, quiet=True) == path and path.stat().st_mtime_ns == mtime  # kept
    with open(path, "r+b") as f:
        f.truncate(HEADER + rec)
    assert read_header(path) is None
    assert ensure_bundle(mf, cfg, quiet=True) == path and read_header(path) is not None  # written again
    mf.close()
    os.utime(src, ns=(mtime + 10**9, mtime + 10**9))  # the source changed: another bundle
    assert bundle_path(src) != path


def test_traces_and_the_cache_simulator(moe_gguf, tmp_path):
    from flashlm.cache import POLICIES
    from flashlm.experts import trace as tr

    with flashlm.load(moe_gguf("mixtral"), n_ctx=64, n_threads=2) as m:
        t = tr.record(m, m.tokenize(PROMPTS[0])[:21])
    assert t.ids.shape == (20, 2, 2) and t.probs.shape == (20, 2, 8)
    np.testing.assert_allclose(t.probs.sum(2), 1.0, rtol=1e-5)
    assert (np.take_along_axis(t.probs, t.ids, 2) >= np.sort(t.probs, 2)[:, :, -2:-1]).all()  # the top 2
    tr.save(t, tmp_path / "t.npz")
    t = tr.load(tmp_path / "t.npz")
    distinct = len({(layer, e) for layer in range(2) for e in t.ids[:, layer].ravel().tolist()})
    for policy in POLICIES:  # every expert fits: only the first use of each misses
        assert tr.simulate(t, 16, policy) == pytest.approx(1 - distinct / t.ids.size)
    # a hand-made trace where recency and frequency disagree: expert 0 every other token,
    # 1..3 in turn between; 2 slots of one layer
    ids = np.array([[[0]], [[1]], [[0]], [[2]], [[0]], [[3]], [[0]], [[1]]] * 4)
    probs = np.full(ids.shape[:2] + (4,), 0.25, dtype=np.float32)
    hand = tr.Trace(ids, probs)
    assert tr.simulate(hand, 2, "lfu") > tr.simulate(hand, 1, "lfu")
    # LRU, 2 slots: expert 0 hits but for its first use (15 of 32); 1, 2, 3 evict each other
    # and miss, except the 1 that ends one round and starts the next (3 more hits)
    assert tr.simulate(hand, 2, "lru") == 18 / 32
    assert tr.belady(hand, 2) == 18 / 32  # here LRU is optimal; 1 slot: expert 0's repeats never meet
    assert tr.belady(hand, 1) == 0.0
    for n in (2, 3, 4, 16):  # no policy beats the offline optimum
        assert all(tr.simulate(t, n, p) <= tr.belady(t, n) for p in POLICIES)
    assert tr.belady(t, 16) == pytest.approx(1 - distinct / t.ids.size)


def test_cli_on_a_moe_under_a_budget(moe_gguf, capsys, tmp_path):
    from flashlm.apps.cli import main

    path = str(moe_gguf("qwen3moe"))
    assert main(["info", path, "--memory-budget", "200MB", "-c", "256"]) == 0
    out = capsys.readouterr().out
    assert "expert cache" in out and "the cache holds 16 of 16 experts" in out
    assert main(["run", "-m", path, "--memory-budget", "200MB", "-c", "256", "-p", "Hello", "-n", "4", "--temp", "0",
                 "--stats", "--policy", "score"]) == 0
    err = capsys.readouterr().err
    assert "experts: cache hit rate" in err and "prefetch precision" in err and "prefetch auto (measuring)" in err
    assert main(["run", "-m", path, "--memory-budget", "200MB", "-c", "256", "-p", "Hello", "-n", "2", "--temp", "0",
                 "--stats", "--prefetch", "off"]) == 0
    err = capsys.readouterr().err
    assert "experts: cache hit rate" in err and "prefetch off" in err and "precision" not in err
    # the profile report: the expert cache's hits and reads per token, its plan
    assert main(["profile", "-m", path, "--memory-budget", "200MB", "-c", "256", "-n", "4", "-o", str(tmp_path),
                 "--prefetch", "off"]) == 0
    out = capsys.readouterr().out
    assert "expert cache hits" in out and "expert cache: 16 of 16 experts; prefetch off" in out
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert prof["experts"] and prof["plan"]["n_slots"] == 16 and prof["summary"]["window_hit_rate"] is None
    rows = prof["tokens"]
    assert len(rows) == 4 and all(r["needed"] == 2 * 2 for r in rows)  # 2 layers, 2 of 8 experts routed
    assert sum(r["hits"] for r in rows) > 0 and prof["summary"]["expert_hit_rate"] == pytest.approx(
        sum(r["hits"] for r in rows) / 16)
    assert all(r["bytes_read"] == (r["needed"] - r["hits"]) * prof["plan"]["expert_bytes"] for r in rows)
    # a sweep of budgets: shares of what holds every expert, below the minimum recorded as such
    assert main(["profile", "-m", path, "-c", "256", "-n", "2", "--sweep", "1%,100%", "-o", str(tmp_path / "sw"),
                 "--prefetch", "off"]) == 0
    out = capsys.readouterr().out
    assert "expert cache hits" in out and "below the minimum" in out
    runs = json.loads((tmp_path / "sw" / "sweep.json").read_text())["runs"]
    assert "minimum" in runs[0]["error"] and runs[1]["expert_hit_rate"] is not None and runs[1]["tokens_per_second"] > 0
    with pytest.raises(SystemExit):  # two answers to one question
        main(["run", "-m", path, "--prefetch", "on", "--no-prefetch", "-p", "Hi"])
    assert "not allowed with" in capsys.readouterr().err
    for bad in (1, "on", None):
        with pytest.raises(flashlm.errors.InvalidArgumentError, match="prefetch must be"):
            flashlm.load(path, memory_budget="200MB", experts={"prefetch": bad})
    assert main(["run", "-m", path, "--memory-budget", "2MB", "-p", "Hi"]) == 2
    assert "below the minimum" in capsys.readouterr().err


def test_a_failed_expert_read_is_a_clear_error_and_leaves_nothing_pinned(moe_gguf, tmp_path):
    """A miss whose read fails (the bundle truncated under a running model) raises a
    ModelFormatError naming the read; its slot is forgotten and no slot stays pinned."""
    import os
    import shutil

    from flashlm.experts.bundle import HEADER

    path = tmp_path / "m.gguf"
    shutil.copy(moe_gguf("qwen2moe"), path)
    with flashlm.load(path, n_ctx=256, n_threads=2, memory_budget=1 << 40, experts=dict(prefetch=False)) as big:
        minimum, expert = big.plan.minimum, big.plan.expert_bytes
    with flashlm.load(path, n_ctx=256, n_threads=2, memory_budget=minimum + 3 * expert,
                      experts=dict(prefetch=False)) as m:
        ex = m.experts
        os.truncate(ex.bundle, HEADER + 3 * expert)  # layer 0's first 3 experts only
        with pytest.raises(ModelFormatError, match=r"direct read of \d+ bytes at \d+ gave|short read"):
            m.generate(PROMPTS[0], max_tokens=8, temperature=0)
        assert not ex.cache.pinned.any() and ex._missing is None
        held = ex.cache.key_in[ex.cache.key_in >= 0]
        assert (held < 3).all()  # only what was read whole is still cached
        if ex.aio is None:
            pytest.skip("no native asynchronous direct I/O here: misses are read before locate returns")
        # a token's misses read while its cached experts compute (locate(wait=False)): the
        # error comes when they are waited for
        n, ids = m.config.n_expert, np.array([1, 4, 6])
        ex.begin_layer(1, ids[None], np.full((1, n), 1 / n, dtype=np.float32))
        _, _, missed = ex.locate(1, ids, wait=False)
        assert missed.all() and ex._missing is not None
        with pytest.raises(ModelFormatError, match=r"direct read of \d+ bytes at \d+ gave"):
            ex.finish_misses()
        assert not ex.cache.pinned.any() and not ((ex.cache.key_in >= n) & (ex.cache.key_in < 2 * n)).any()
        # an error (an interrupt, say) between locate(wait=False) and finish_misses: abort_misses
        # lets the reads end, forgets their experts and releases the layer's pins
        ids = np.array([3, 4, 6])  # layer 0's, none cached
        ex.begin_layer(0, ids[None], np.full((1, n), 1 / n, dtype=np.float32))
        _, _, missed = ex.locate(0, ids, wait=False)
        assert missed.all() and ex.aio.in_flight("miss")
        ex.abort_misses()
        assert not ex.aio.in_flight("miss") and ex._missing is None and not ex.cache.pinned.any()
        assert (ex.cache.slot_of[ids] < 0).all()
