"""The flash layout (flashload/layout.py) and streaming its FFN neurons (store.py)."""

import os
import re

import numpy as np
import pytest

import flashlm
from flashlm.apps.cli import main
from flashlm.errors import FlashLMError, InvalidArgumentError, ModelFormatError
from flashlm.flashload import layout
from flashlm.runtime import convert
from flashlm.flashload.predictor import top_fraction
from flashlm.flashload.store import PREFETCH_LAYERS, FlashStore
from flashlm.flashload.window import NeuronWindow
from flashlm import kernels_cpu as K
from flashlm.formats.modelfile import GGUFModelFile

PROMPT = "The quick brown fox jumps over the lazy dog, and then"


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_records_hold_each_neurons_gate_up_rows_and_down_column(name, flash_files, request):
    src = GGUFModelFile(request.getfixturevalue(f"{name}_path"))
    mf = GGUFModelFile(flash_files[name])
    plans = layout.read_plans(mf)
    assert len(plans) == int(src.metadata[f"{src.arch}.block_count"])
    for lb in (plans[0], plans[-1]):
        gate, up, down = (src.tensors[f"blk.{lb.layer}.{n}.weight"] for n in layout.FFN)
        assert lb.types[:2] == (gate.qtype, up.qtype)
        rec = mf.tensors[f"blk.{lb.layer}.ffn_bundles"]
        assert rec.offset % layout.ALIGN == 0 and rec.data.shape == (lb.n_ff, lb.bundle_bytes)
        a, b = lb.gate_bytes, lb.gate_bytes + lb.up_bytes
        ids = layout.neuron_ids(mf, lb.layer)  # the calibrated order: a permutation, not the identity
        assert sorted(ids) == list(range(lb.n_ff)) and (ids != np.arange(lb.n_ff)).any()
        np.testing.assert_array_equal(rec.data[:, :a], gate.data[ids])  # gate and up rows as they were
        np.testing.assert_array_equal(rec.data[:, a:b], up.data[ids])
        want = K.dequantize(down).T[ids]  # down columns, re-quantized to Q8_0: within its rounding
        got = K.dequantize(type(rec)("d", lb.types[2], (lb.n_ff, lb.n_embd), np.ascontiguousarray(rec.data[:, b:]), 0))
        step = np.abs(want).reshape(lb.n_ff, -1, 32).max(-1, keepdims=True) / 127  # plus d's own f16 rounding:
        assert (np.abs(got - want).reshape(lb.n_ff, -1, 32) <= step * (0.5 + 127 * 2.0**-11) * 1.001 + 1e-7).all()
        np.testing.assert_array_equal(mf.tensors[f"blk.{lb.layer}.ffn_gate.weight"].data, gate.data[ids])
        a_lr = K.dequantize(mf.tensors[f"blk.{lb.layer}.ffn_gate_lr_a"])
        assert a_lr.shape == (max(8, lb.n_embd // 8), lb.n_embd)
    for t in src.tensors.values():  # the rest as it was
        if not any(f".{n}." in t.name for n in layout.FFN):
            np.testing.assert_array_equal(mf.tensors[t.name].data, t.data)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_streamed_equals_resident_with_sparsity_off(name, flash_files):
    # The same model with every neuron: records read through the I/O engine and the
    # neuron window, against records taken from the mapping. Bit for bit.
    resident = flashlm.load(flash_files[name], n_threads=2, streaming=dict(predictor=None))
    resident.store.resident = True
    streamed = flashlm.load(flash_files[name], n_threads=2, streaming=dict(predictor=None, window=2))
    assert isinstance(streamed.store, FlashStore)
    tokens = streamed.tokenize(PROMPT)
    np.testing.assert_array_equal(streamed.logits(tokens), resident.logits(tokens))
    kw = dict(max_tokens=6, temperature=0.0)
    streamed.take_stats()
    assert streamed.generate(PROMPT, **kw) == resident.generate(PROMPT, **kw)
    stats = streamed.take_stats()
    n_ff = sum(lb.n_ff for lb in streamed.store.plans)
    assert stats[0].tokens == len(tokens) and stats[0].bytes_read >= n_ff * streamed.store.plans[0].bundle_bytes
    first, later = stats[1], stats[2:]
    assert first.neurons_needed == n_ff and first.neuron_hits == 0 and first.reads > 0
    assert all(s.neurons_needed == n_ff and s.neuron_hits == n_ff and s.bytes_read == 0 for s in later)  # all held since


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_flash_model_is_the_source_model_within_q8_rounding_of_down(name, flash_files, request):
    # With float activations, the only difference is the down projection's Q8_0
    # re-quantization: it must move the logits less than llama.cpp's own 8-bit
    # activations move them.
    src = flashlm.load(request.getfixturevalue(f"{name}_path"), n_threads=2)
    fl = flashlm.load(flash_files[name], n_threads=2, streaming=dict(predictor=None))
    tokens = src.tokenize(PROMPT)
    cos = lambda a, b: ((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min()  # noqa: E731
    with K.float_activations():
        a, b = src.logits(tokens), fl.logits(tokens)
    assert cos(a, b) > 0.99
    assert 1 - cos(a, b) < 1 - cos(a, src.logits(tokens))
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.9


def test_window_keeps_recent_neurons_and_evicts_the_least_recently_used(flash_files):
    mf = GGUFModelFile(flash_files["smollm2"])
    lb = layout.read_plans(mf)[0]
    w = NeuronWindow(lb, capacity=8)
    rows = lambda ids: w.gate[w.slot_of[ids]][:, 0]  # noqa: E731  a tag per row: rows stay with their neurons

    def use(ids, t, window, spilled=0):
        ids = np.array(ids)
        slots, missed = w.place(ids, t, window)
        assert (slots < 0).sum() == spilled and (missed[slots < 0]).all()
        load = missed & (slots >= 0)
        w.gate[slots[load], 0] = ids[load]  # tag each new row with its neuron id
        return ids[load]

    assert list(use([1, 2, 3, 4], 1, 2)) == [1, 2, 3, 4]
    assert list(use([3, 5], 2, 2)) == [5]  # 3 held; 1, 2, 4 still in the window
    assert list(use([5, 6], 3, 2)) == [6]  # 1, 2, 4 (last used at t=1) leave; 3 stays (t=2)
    assert w.n == 3 and sorted(np.flatnonzero(w.slot_of >= 0)) == [3, 5, 6]
    np.testing.assert_array_equal(rows([3, 5, 6]), [3, 5, 6])
    assert list(use([7, 8, 9, 10, 11, 12], 4, 5)) == [7, 8, 9, 10, 11, 12]  # 9 > 8 slots: LRU 3 goes
    assert w.n == 8 and w.slot_of[3] == -1
    np.testing.assert_array_equal(rows([5, 6, 7, 12]), [5, 6, 7, 12])
    # 9 neurons, 8 slots: every held one is evicted, 8 are taken and 1 spills (read for this token only)
    assert list(use(list(range(20, 29)), 5, 5, spilled=1)) == list(range(20, 28))
    assert w.n == 8 and (w.slot_of[[5, 6, 7, 12]] == -1).all() and w.slot_of[28] == -1
    np.testing.assert_array_equal(rows(list(range(20, 28))), list(range(20, 28)))
    assert list(use([20, 5], 6, 1)) == [5]  # window 1: only this token's neurons stay
    assert w.n == 2
    assert list(use([5, 6], 7, 0)) == [5, 6]  # window 0: nothing kept between tokens
    assert list(use([5, 6], 8, 0)) == [5, 6] and w.n == 2  # (held while the token runs)


def test_top_fraction_and_settings():
    s = np.array([0.1, 5.0, 0.3, 4.0, 2.0])
    np.testing.assert_array_equal(top_fraction(s, 0.4), [1, 3])
    np.testing.assert_array_equal(top_fraction(s, 1.0), np.arange(5))
    with pytest.raises(InvalidArgumentError):
        flashlm.flashload.settings.StreamSettings(predictor="oracle")
    with pytest.raises(InvalidArgumentError):
        flashlm.flashload.settings.StreamSettings(keep=0)


@pytest.mark.parametrize("bundled", [True, False])
@pytest.mark.parametrize("predictor", ["gate", "lowrank"])
def test_predictors_stream_only_the_kept_neurons(predictor, bundled, flash_files):
    m = flashlm.load(flash_files["smollm2"], n_threads=2,
                      streaming=dict(predictor=predictor, keep=0.5, window=0, bundled=bundled))
    m.take_stats()
    text = m.generate(PROMPT, max_tokens=4, temperature=0.0)
    assert text.strip()
    decode = m.take_stats()[1:]
    n_ff = sum(lb.n_ff for lb in m.store.plans)
    assert all(s.neurons_needed == n_ff // 2 and s.neuron_hits == 0 for s in decode)
    rec = m.store.plans[0]
    # bundled: whole records (the gate part too: it lies between the parts wanted); else the rows the window keeps
    per_neuron = rec.bundle_bytes if bundled else rec.up_bytes + rec.down_bytes + (rec.gate_bytes if predictor == "lowrank" else 0)
    assert all(s.bytes_requested == s.neurons_needed * per_neuron <= s.bytes_read for s in decode)
    if not bundled:
        assert all(s.reads == s.neurons_needed * (3 if predictor == "lowrank" else 2) for s in decode)


@pytest.mark.parametrize("predictor,prefetch", [("gate", True), ("gate", False), ("lowrank", True), (None, True)])
def test_hot_windows_read_only_the_tail_and_equal_records_from_the_mapping(predictor, prefetch, flash_files):
    # Half the FFN rows fit: each window holds its layer's first (most often needed)
    # records for good, and a token reads only the ones it needs past them, straight
    # into a tail buffer (with prefetch, the next layer's start while this one computes).
    # Bit for bit the run with every record from the mapping (sparsity off too).
    path = flash_files["smollm2"]
    streaming = dict(predictor=predictor, keep=0.5, prefetch=prefetch)
    with flashlm.load(path, n_ctx=64, n_threads=2, memory_budget=1 << 50, streaming=streaming) as m:
        budget = m.plan.fixed + (m.plan.full - m.plan.fixed) // 2
        assert m.plan.capacities == [lb.n_ff for lb in m.store.plans]  # room for all: no tails
    with flashlm.load(path, n_ctx=64, n_threads=2, memory_budget=m.plan.full, streaming=streaming) as m:
        assert m.plan.capacities == [lb.n_ff for lb in m.store.plans] and m.plan.spill == 0
    models = [flashlm.load(path, n_ctx=64, n_threads=2, memory_budget=budget, streaming=streaming) for _ in range(2)]
    models[1].store.resident = True
    tokens = models[0].tokenize(PROMPT)
    logits = []
    for m in models:
        m.eval(tokens[:4])
        m.take_stats()
        logits.append([m.eval([t]) for t in tokens[4:12]])
    np.testing.assert_array_equal(np.array(logits[0]), np.array(logits[1]))
    store = models[0].store
    caps = [w.cap for w in store.windows]
    assert 0 < sum(caps) < sum(lb.n_ff for lb in store.plans)
    assert all((w.slot_of[:w.cap] == np.arange(w.cap)).all() and w.n == w.cap for w in store.windows)  # the first records, in order
    stats = models[0].take_stats()
    assert stats[0].bytes_read >= sum(c * lb.bundle_bytes for c, lb in zip(caps, store.plans))  # the hot set, once
    tails = sum((lb.n_ff - c) * lb.bundle_bytes + 8192 for c, lb in zip(caps, store.plans))  # at most each tail
    for s in stats[1:]:
        assert s.neurons_needed == sum(lb.n_ff // (2 if predictor else 1) for lb in store.plans) and 0 < s.neuron_hits < s.neurons_needed
        # a prefetch reads the pages the last token needed; what it missed is read too
        assert 0 < s.reads and s.bytes_requested <= s.bytes_read <= tails * (2 if prefetch else 1)
    assert not prefetch or store._pending  # the next layers' reads were in flight
    # the calibrated order at work: the first records are needed more often than the rest
    # (with the source's order, the share of hits would be the share of neurons held: 0.34 here)
    held = sum(caps) / sum(lb.n_ff for lb in store.plans)
    if predictor:  # (with every neuron needed, the hits are exactly the neurons held)
        assert np.median([s.neuron_hits / s.neurons_needed for s in stats[1:]]) > 1.15 * held
    for m in models:
        m.close()


def test_cached_converts_again_when_the_source_or_the_layout_changes(random_gguf, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("FLASHLM_HOME", str(tmp_path / "home"))
    src = tmp_path / "tiny.gguf"
    shutil.copy(random_gguf("llama"), src)
    first = convert.cached(src)
    made = first.stat().st_mtime_ns
    assert convert.cached(src) == first and first.stat().st_mtime_ns == made  # reused
    os.utime(src, ns=(made, made + 10**9))  # the source changed: converted again
    assert convert.cached(src) == first and first.stat().st_mtime_ns != made
    assert not list(first.parent.glob("*.partial"))


def test_convert_refuses_to_overwrite_and_rejects_non_flash_files(flash_files, smollm2_path, tmp_path, capsys):
    out = flash_files["smollm2"]
    assert main(["convert", "-m", str(smollm2_path), "--flash", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "-m", str(out), "--flash", str(tmp_path / "again.gguf")]) == 2
    assert "already in the flash layout" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(ModelFormatError, match="not a flash-layout file"):
        layout.read_plans(GGUFModelFile(smollm2_path))
    assert main(["convert", "-m", str(smollm2_path), "--flash", str(tmp_path / "s.gguf"), "--force"]) == 0
    assert "flash layout" in capsys.readouterr().out


def test_memory_plan_fits_the_budget_and_names_the_minimum(flash_files, capsys):
    path = flash_files["smollm2"]
    for hot in (True, False):
        _check_plans(path, hot)
    assert main(["info", "-m", str(path), "--memory-budget", "200MB", "-c", "256"]) == 0
    out = capsys.readouterr().out
    assert "memory plan for a budget of 190.7 MiB" in out and "neuron window" in out and "layout:       flash" in out
    assert main(["run", "-m", str(path), "--memory-budget", "60MB", "-c", "256", "-p", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "minimum" in err
    assert main(["run", "-m", str(path), "--keep", "1", "-p", "Hi", "-n", "2"]) == 0  # keep 1: every neuron
    for flags in (["--sliding"], ["--no-prefetch"]):  # the paper's sliding window; no prefetch
        assert main(["run", "-m", str(path), "--memory-budget", "150MB", "-c", "256", "-p", "Hi", "-n", "2", *flags]) == 0
    assert main(["run", "-m", str(path), "--keep", "2", "-p", "Hi"]) == 2
    assert "keep must be in (0, 1]" in capsys.readouterr().err
    assert main(["run", "-m", str(path), "--window", "-1", "-p", "Hi"]) == 2
    assert "window must be >= 0" in capsys.readouterr().err


def _check_plans(path, hot):
    import re

    minima = []
    for _ in range(2):  # the tokenizer's share is measured as the model loads: its first load counts more
        with pytest.raises(FlashLMError, match=r"below the minimum [0-9.]+ MiB") as e:
            flashlm.load(path, n_ctx=256, memory_budget="60MB", streaming=dict(hot=hot))
        minima.append(float(re.search(r"minimum ([0-9.]+) MiB", str(e.value)).group(1)))
    minimum = min(minima)
    # Just above the minimum, hardly any window: a token reads most of its neurons into the
    # spill buffer, one layer at a time. Hot windows (the first neurons, for good) and
    # sliding ones (the last tokens' neurons).
    m = flashlm.load(path, n_ctx=256, n_threads=2, memory_budget=int((minimum + 2) * 2**20),
                      streaming=dict(hot=hot))
    plan, store = m.plan, m.store
    need = [int(np.ceil(0.8 * lb.n_ff)) for lb in store.plans]
    assert all(c < n // 4 for c, n in zip(plan.capacities, need))
    if hot:  # the buffer takes a layer's records past its window, page-aligned at both ends
        one = max(-(-(lb.n_ff - c) * lb.bundle_bytes // 4096) * 4096 + 8192 for lb, c in zip(store.plans, plan.capacities))
        assert plan.spill == (1 + PREFETCH_LAYERS) * one  # one more per layer read ahead
    else:  # the buffer takes what a token needs beyond the window
        assert plan.spill == max((n - c) * p for n, c, p in zip(need, plan.capacities, plan.per_neuron))
    assert plan.fixed + plan.cache_bytes + plan.spill <= plan.budget
    assert m.generate(PROMPT, max_tokens=3, temperature=0.0).strip()
    st = m.take_stats()[-1]
    assert st.neurons_needed == sum(need) and st.neuron_hits <= sum(plan.capacities) and st.reads > 0
    m.close()
    full_windows = sum(n * p for n, p in zip(need, plan.per_neuron))
    # the minimum's buffer takes whole layers with hot windows: what the windows take off it is room too
    freed = store.spill_bytes([0] * len(need)) - store.spill_bytes([n for n in need]) if hot else 0
    for part, extra in ((True, full_windows // 2), (False, full_windows + (4 << 20) - freed)):  # half a token's needs; all, and more
        m = flashlm.load(path, n_ctx=256, n_threads=2, memory_budget=int(minimum * 2**20) + extra,
                          streaming=dict(hot=hot))
        plan, store = m.plan, m.store
        assert plan.fixed + plan.cache_bytes + plan.spill <= plan.budget
        for win, cap, n, lb in zip(store.windows, plan.capacities, need, store.plans):
            assert win.cap == cap <= lb.n_ff
            assert win.gate.shape[1] == 0  # the gate predictor holds the gate: windows keep up and down rows only
            assert (0 < cap < n) if part else (cap >= n)
        assert sum(plan.capacities) < plan.n_ff  # neither holds every neuron
        text = m.generate(PROMPT, max_tokens=6, temperature=0.0)
        assert text.strip() and all(w.n <= w.cap for w in store.windows)
        m.close()


def test_window_zero_shares_one_buffer_between_layers(flash_files):
    m = flashlm.load(flash_files["smollm2"], n_ctx=64, n_threads=2, streaming=dict(predictor="gate", window=0))
    assert all(w.cap == 0 for w in m.store.windows)  # nothing kept: every token's neurons spill
    bases = {w.up.base.ctypes.data if w.up.base is not None else None for w in m.store.spills}
    assert len(bases) == 1 and None not in bases
    assert m.generate(PROMPT, max_tokens=3, temperature=0.0).strip()


def test_unbundled_reads_are_one_per_range(tmp_path):
    from flashlm.io import ReadEngine

    path = tmp_path / "f.bin"
    data = np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    ranges = [(100, 300), (400, 500), (900, 50)]  # adjacent and in one page: merged when bundled
    for merge, reads in ((True, 1), (False, 3)):
        outs = [np.empty(n, np.uint8) for _, n in ranges]
        with ReadEngine(path, n_threads=2, merge=merge) as e:
            e.read_ranges(ranges, outs)
            assert e.stats.reads == reads
        for (off, n), o in zip(ranges, outs):
            np.testing.assert_array_equal(o, data[off:off + n])


def test_chat_footer_shows_what_a_streamed_model_read(flash_files):
    import asyncio

    from flashlm.apps.chat import ChatApp, Prompt

    model = flashlm.load(flash_files["smollm2"], n_ctx=512, n_threads=2)

    async def go():
        app = ChatApp(model, temperature=0, max_tokens=8)
        async with app.run_test(size=(140, 30)) as pilot:
            box = app.query_one(Prompt)
            box.text = "Hello!"
            box.move_cursor(box.document.end)
            box.focus()
            await pilot.press("enter")
            for _ in range(600):
                await pilot.pause(0.05)
                if app.last is not None and not app.generating:
                    break
            status = str(app.query_one("#status").render())
            assert re.search(r"disk \d+ MB · hits \d+%", status), status

    asyncio.run(go())
    model.close()


def test_profile_of_a_streamed_model_and_a_budget_sweep(flash_files, tmp_path, capsys):
    import json

    path = str(flash_files["smollm2"])
    assert main(["profile", "-m", path, "--memory-budget", "200MB", "-c", "128", "-n", "4", "-o", str(tmp_path)]) == 0
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert prof["streamed"] and prof["plan"]["cache_bytes"] > 0 and prof["memory_budget"] == 200_000_000
    assert sum(r["bytes_read"] for r in prof["tokens"]) > 0 and prof["prefill_bytes_read"] > 0
    assert all(r["needed"] > 0 for r in prof["tokens"])
    assert (tmp_path / "profile.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["profile", "-m", path, "-c", "128", "-n", "2", "--sweep", "10%,100%", "-o", str(tmp_path / "sw")]) == 0
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert "minimum" in sweep["runs"][0]["error"] and sweep["runs"][1]["tokens_per_second"] > 0
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "below the minimum" in capsys.readouterr().out
