"""Expert bundles under faults: records damaged after load (a clear error on the read that
hits one, never garbage, and the model stays usable), bundles damaged on disk (verified
when opened, written again), and writers racing or killed mid-write (a whole, verified
bundle or none)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from xxhash import xxh3_64_intdigest

import flashlm
from flashlm.errors import ModelFormatError
from flashlm.experts import bundle as B

from parity_prompts import PROMPTS

ARCH = "qwen2moe"  # 2 layers of 8 experts, 4 used


@pytest.fixture(autouse=True)
def _cache_home(tmp_path, monkeypatch):
    """Expert bundles go to a cache folder of the test's own, not the user's."""
    monkeypatch.setenv("FLASHLM_HOME", str(tmp_path / "flashlm-home"))


@pytest.fixture(scope="module")
def reference(moe_gguf, tmp_path_factory):
    """The fixture's logits and greedy text with every expert resident, and the smallest
    budget's bytes and one expert's."""
    path = moe_gguf(ARCH)
    with flashlm.load(path, n_ctx=256, n_threads=2) as ref:
        tokens = ref.tokenize(PROMPTS[1])
        want, text = ref.logits(tokens), ref.generate(PROMPTS[0], max_tokens=8, temperature=0)
    with pytest.MonkeyPatch.context() as mp:  # (a module's fixture: before _cache_home)
        mp.setenv("FLASHLM_HOME", str(tmp_path_factory.mktemp("flashlm-home")))
        with flashlm.load(path, n_ctx=256, n_threads=2, memory_budget=1 << 40, experts=dict(prefetch=True)) as big:
            sizes = big.plan.minimum, big.plan.expert_bytes
    return path, tokens, want, text, sizes


@pytest.fixture(params=["aio", "hinted", "threads"])
def backend(request):
    return request.param


def streamed(reference, backend, monkeypatch, prefetch=True):
    """The fixture streamed through a cache of 11 of its 16 experts, its records read by
    `backend`: native AIO, page-cache hints, or the I/O engine's threads."""
    from flashlm.experts import store
    from flashlm.io import NativeAIO

    path, _, _, _, (minimum, expert) = reference
    if backend == "aio":
        probe = NativeAIO.open(path)
        if probe is None:
            pytest.skip("no native asynchronous direct reads here")
        probe.close()
    else:
        monkeypatch.setattr(store.NativeAIO, "open", classmethod(lambda cls, p, depth=256: None))
    m = flashlm.load(path, n_ctx=256, n_threads=2, memory_budget=minimum + 3 * expert,
                     experts=dict(prefetch=prefetch, policy="lru"))
    ex = m.experts
    assert ex.bundle is not None and ex.verify and (ex.aio is not None) == (backend == "aio")
    if backend == "threads" and ex._hint_fd >= 0:  # prefetches on the engine's threads
        os.close(ex._hint_fd)
        ex._hint_fd = -1
    return m


def overwrite(path, offset, data) -> bytes:
    """Write data at offset of path (through the page cache, as a stray writer would); the bytes it replaced."""
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, len(data), offset)
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
    return old


def damage(ex, layer, e, data, at=0) -> tuple[int, bytes]:
    """Write data `at` bytes into expert e of layer's record in ex's bundle: (where, the bytes it replaced)."""
    off = B.record_offset(layer, e, ex.cfg.n_expert, ex.cache.item_bytes) + at
    return off, overwrite(ex.bundle, off, data)


def intact(ex, key) -> bool:
    """Expert key is cached, its slot holding its record as the bundle's checksum says."""
    s = ex.cache.slot_of[key]
    return s >= 0 and xxh3_64_intdigest(ex.cache.pool[s]) == ex._sums[key]


def garbage(n, seed=0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def settled(ex) -> bool:
    """The store as between two calls: no misses being read, no prefetch queued, and no
    slot pinned but those of prefetches still in flight."""
    pinned = set(np.flatnonzero(ex.cache.pinned).tolist())
    return pinned <= {int(ex.cache.slot_of[k]) for k in ex.pending} and ex._missing is None and ex._queued is None


@pytest.mark.timeout(120)
def test_garbage_in_the_records_is_a_clear_error_and_the_model_stays_usable(reference, backend, monkeypatch):
    _, tokens, want, text, _ = reference
    with streamed(reference, backend, monkeypatch) as m:
        ex = m.experts
        assert m.generate(PROMPTS[0], max_tokens=8, temperature=0) == text
        first = B.record_offset(0, 0, 1, 0)
        n = ex.cfg.n_layer * ex.cfg.n_expert * ex.cache.item_bytes
        old = overwrite(ex.bundle, first, garbage(n))  # every record (the 1 MiB of garbage, at this size)
        for _ in range(2):  # the prompt needs every expert; the cache holds 11 of 16: misses read garbage
            m.reset()
            with pytest.raises(ModelFormatError, match=r"layer \d, expert \d: the record read \(twice\) does not "
                                                       r"match its checksum.*Delete it") as err:
                m.logits(tokens)
            assert str(ex.bundle) in str(err.value)
            assert settled(ex)
        m.reset()
        for k in list(ex.pending):  # prefetches in flight end first
            ex._reap(k)
        ex.cache.clear()  # every expert read again
        with pytest.raises(ModelFormatError, match=r"layer \d, expert \d: the record read"):
            for t in tokens:  # decode steps: misses read while the cached experts compute, prefetches
                m.eval([t])
        assert settled(ex)
        overwrite(ex.bundle, first, old)  # repaired: no bad record was kept in the cache
        np.testing.assert_array_equal(m.logits(tokens), want)
        m.reset()
        assert m.generate(PROMPTS[0], max_tokens=8, temperature=0) == text


@pytest.mark.timeout(120)
def test_a_bundle_truncated_while_running_is_a_clear_error_and_the_model_stays_usable(reference, backend,
                                                                                     monkeypatch):
    _, tokens, want, text, _ = reference
    with streamed(reference, backend, monkeypatch) as m:
        ex = m.experts
        assert m.generate(PROMPTS[0], max_tokens=8, temperature=0) == text
        whole = Path(ex.bundle).read_bytes()
        os.truncate(ex.bundle, B.record_offset(0, 0, 1, 0) + ex.cache.item_bytes)  # one record left
        for k in list(ex.pending):
            ex._reap(k)
        ex.cache.clear()  # every expert read again
        m.reset()
        with pytest.raises(ModelFormatError, match=str(ex.bundle)):
            m.logits(tokens)
        assert settled(ex)
        Path(ex.bundle).write_bytes(whole)  # put back: the model goes on
        np.testing.assert_array_equal(m.logits(tokens), want)


@pytest.mark.timeout(120)
def test_a_damaged_record_names_its_expert_and_is_not_kept(reference, backend, monkeypatch):
    with streamed(reference, backend, monkeypatch, prefetch=False) as m:
        ex, n = m.experts, m.config.n_expert
        off, old = damage(ex, 1, 3, b"\xff" * 8, at=100)  # eight bytes of one record
        with pytest.raises(ModelFormatError, match=r"layer 1, expert 3:"):
            ex.get(1, 3)
        assert ex.cache.slot_of[n + 3] < 0 and settled(ex)
        assert ex.get(1, 2)[0].data.size and intact(ex, n + 2)  # the other experts read as before
        overwrite(ex.bundle, off, old)
        ex.get(1, 3)  # read again: now intact
        assert intact(ex, n + 3)


@pytest.mark.timeout(120)
def test_a_damaged_prefetch_is_read_again_then_an_error(reference, backend, monkeypatch):
    with streamed(reference, backend, monkeypatch) as m:
        ex, n = m.experts, m.config.n_expert
        off, old = damage(ex, 1, 5, garbage(ex.cache.item_bytes, 1))
        ex.prefetch(1, [5])
        with pytest.raises(ModelFormatError, match=r"layer 1, expert 5:"):
            ex.locate(1, [5])
        assert ex.cache.slot_of[n + 5] < 0 and settled(ex)
        overwrite(ex.bundle, off, old)
        ex.prefetch(1, [5, 6])
        ex.locate(1, [5, 6])
        ex.end_layer(1)
        assert intact(ex, n + 5) and intact(ex, n + 6)


@pytest.mark.timeout(120)
def test_a_record_bad_once_is_read_again(reference, backend, monkeypatch):
    """A read that comes back wrong once (the disk, the bus) costs a second read, no error."""
    with streamed(reference, backend, monkeypatch, prefetch=False) as m:
        ex = m.experts
        off, old = damage(ex, 0, 6, garbage(ex.cache.item_bytes, 2))
        reads, calls = ex.engine.read_ranges, []

        def repaired_before_the_second_read(ranges, outs):
            calls.append(ranges)
            if len(calls) == 1 + (ex.aio is None):  # the re-read (without native AIO the miss is the first)
                overwrite(ex.bundle, off, old)
            return reads(ranges, outs)

        monkeypatch.setattr(ex.engine, "read_ranges", repaired_before_the_second_read)
        ex.get(0, 6)
        assert calls[-1] == [(off, ex.cache.item_bytes)] and intact(ex, 6)


@pytest.mark.timeout(120)
def test_verifying_can_be_turned_off_and_no_bundle_has_nothing_to_verify(reference, monkeypatch):
    path, tokens, want, _, (minimum, expert) = reference
    with streamed(reference, "hinted", monkeypatch, prefetch=False) as m:
        damage(m.experts, 1, 3, garbage(m.experts.cache.item_bytes, 3))
        m.experts.verify = False  # (to measure what verifying costs): the garbage is used
        m.experts.get(1, 3)
        assert not intact(m.experts, m.config.n_expert + 3)
    with flashlm.load(path, n_ctx=256, n_threads=2, memory_budget=minimum + 3 * expert,
                      experts=dict(bundle=False)) as m:
        assert m.experts.bundle is None and not m.experts.verify
        np.testing.assert_array_equal(m.logits(tokens), want)


# -- the bundle file: verified when opened -------------------------------------------

def model_file(src):
    from flashlm.formats.modelfile import GGUFModelFile
    from flashlm.runtime.config import config_from_gguf
    from flashlm.runtime.models import model_class

    mf = GGUFModelFile(src)
    return mf, config_from_gguf(mf, model_class(mf.arch))


def flip(path, offset):
    """Invert the bits of one byte of path."""
    with open(path, "rb") as f:
        f.seek(offset)
        overwrite(path, offset, bytes([f.read(1)[0] ^ 0xFF]))


def damage_header(path):
    flip(path, len(B.MAGIC) + 3)


def damage_table(path):
    meta = B.read_header(path)
    flip(path, os.path.getsize(path) - B.table_bytes(meta["n_layer"] * meta["n_expert"]) + 8)


def old_version(path):
    overwrite(path, 0, b"FLMEXPB1")


def cut_short(path):
    os.truncate(path, os.path.getsize(path) - 4096)


@pytest.mark.parametrize("damage, why", [(damage_header, "has a damaged header"),
                                         (damage_table, "has a damaged checksum table"),
                                         (old_version, "was written by another version of flashlm"),
                                         (cut_short, "cut short")])
def test_a_damaged_bundle_is_written_again_with_a_notice(damage, why, moe_gguf, capsys):
    mf, cfg = model_file(moe_gguf(ARCH))
    path = B.ensure_bundle(mf, cfg, quiet=True)
    good = path.read_bytes()
    sums = B.read_checksums(path)
    rec = B.record_bytes(B.read_header(path)["parts"])
    assert sums == [xxh3_64_intdigest(good[B.HEADER + k * rec:][:rec]) for k in range(cfg.n_layer * cfg.n_expert)]
    capsys.readouterr()
    assert B.ensure_bundle(mf, cfg, quiet=True) == path and capsys.readouterr().err == ""  # intact: kept
    damage(path)
    assert B.read_header(path) is None
    with pytest.raises(ModelFormatError, match=why):
        B.read_checksums(path)
    assert B.ensure_bundle(mf, cfg, quiet=True) == path
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the expert bundle {path} " in err and why in err and "writing it again" in err
    assert path.read_bytes() == good
    mf.close()


# -- writers racing, and killed mid-write ----------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
from flashlm.experts import bundle
from flashlm.formats.modelfile import GGUFModelFile
from flashlm.runtime.config import config_from_gguf
from flashlm.runtime.models import model_class

src, start, pause, stop = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
unmap, layers = bundle.unmap, []

def slow_unmap(mf, tensors):  # called once a layer, before its records are written
    layers.append(1)
    if stop != "-" and len(layers) == 2:  # one layer written: say so, and wait to be killed
        Path(stop).write_text("mid-write")
        time.sleep(600)
    time.sleep(pause)
    unmap(mf, tensors)

bundle.unmap = slow_unmap
mf = GGUFModelFile(src)
cfg = config_from_gguf(mf, model_class(mf.arch))
while time.time() < start:
    time.sleep(0.002)
print(bundle.ensure_bundle(mf, cfg, quiet=True), flush=True)
"""


def writer(src, start=0.0, pause=0.0, stop="-"):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(src), str(start), str(pause), str(stop)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())


def whole(path, mf, cfg) -> bool:
    """path is a complete bundle of mf whose records all match their checksums and the GGUF."""
    meta = B.read_header(path)
    if meta is None:
        return False
    data, sums, rec = path.read_bytes(), B.read_checksums(path), B.record_bytes(meta["parts"])
    for layer in range(cfg.n_layer):
        recs = B._layer_records(mf, cfg, layer, meta["parts"], rec)
        for e in range(cfg.n_expert):
            k = layer * cfg.n_expert + e
            got = data[B.HEADER + k * rec:][:rec]
            if got != recs[e].tobytes() or xxh3_64_intdigest(got) != sums[k]:
                return False
    return True


def leftovers(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name.endswith(".partial"))


@pytest.mark.timeout(120)
def test_two_processes_writing_one_bundle_leave_one_whole_file(moe_gguf):
    src = moe_gguf(ARCH)
    mf, cfg = model_file(src)
    path = B.bundle_path(src)
    start = time.time() + 3.0  # both past their imports (on a busy machine too): they start together
    procs = [writer(src, start, pause=1.0) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o.strip() for o, _ in outs] == [str(path)] * 2
    assert sum("waiting for another process writing" in e for _, e in outs) == 1  # one wrote, the other waited
    assert whole(path, mf, cfg) and leftovers(path) == []
    mf.close()


@pytest.mark.timeout(120)
def test_a_writer_killed_mid_write_leaves_no_bundle_and_the_next_load_writes_it(moe_gguf, tmp_path):
    src = moe_gguf(ARCH)
    mf, cfg = model_file(src)
    path = B.bundle_path(src)
    mark = tmp_path / "mid-write"
    first = writer(src, stop=mark)
    deadline = time.time() + 60
    while not mark.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert mark.exists(), first.communicate()
    second = writer(src)  # waits for the lock the first holds
    deadline = time.time() + 60
    while not (path.parent / f"{path.name}.lock").exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(1.0)
    assert second.poll() is None  # still waiting
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    assert not path.exists() or whole(path, mf, cfg)
    out, err = second.communicate(timeout=60)  # the lock died with the first: the second writes the bundle
    assert second.returncode == 0 and out.strip() == str(path), err
    assert whole(path, mf, cfg) and leftovers(path) == []
    # killed again, alone this time: its temporary file stays until the next writer
    path.unlink()
    third = writer(src, stop=mark.with_name("again"))
    deadline = time.time() + 60
    while not mark.with_name("again").exists() and time.time() < deadline:
        time.sleep(0.01)
    third.send_signal(signal.SIGKILL)
    third.wait(timeout=30)
    assert not path.exists() and leftovers(path) == [f"{path.name}.{third.pid}.partial"]
    assert B.read_header(path) is None
    with flashlm.load(src, n_ctx=64, n_threads=2, memory_budget=1 << 40, experts=dict(prefetch=True)) as m:
        assert m.experts.bundle == path
        m.generate("Hello", max_tokens=3, temperature=0)
    assert whole(path, mf, cfg) and leftovers(path) == []
    mf.close()
