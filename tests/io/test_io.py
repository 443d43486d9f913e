"""The I/O engine shared by flashload and experts, and the disk probe."""

import mmap
import os
import threading

import numpy as np
import pytest

from flashlm.apps.cli import main
from flashlm.errors import ModelFormatError
from flashlm.io import ALIGN, HUGE, NativeAIO, ReadEngine, aligned_empty, coalesce
from flashlm.io.probe import format_probe, pick_read_size, probe_disk


def test_coalesce_merges_near_ranges_within_limits():
    ranges = [(0, 100), (150, 50), (10_000, 10), (5000, 10)]
    reads = coalesce(ranges, max_gap=64, max_read=1 << 20)
    assert reads == [(0, 200, [0, 1]), (5000, 10, [3]), (10_000, 10, [2])]
    # a read never grows past max_read (a single larger range still comes whole)
    reads = coalesce([(0, 100), (100, 100), (200, 5000)], max_gap=0, max_read=150)
    assert reads == [(0, 100, [0]), (100, 100, [1]), (200, 5000, [2])]
    # aligned for direct I/O: starts and ends on block boundaries
    (s, n, m), = coalesce([(5000, 10), (6000, 100)], max_gap=0, max_read=1 << 20, align=ALIGN)
    assert (s, n, m) == (4096, 4096, [0, 1])


@pytest.mark.parametrize("direct", [True, False])
def test_read_ranges_returns_the_files_bytes(tmp_path, direct):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, 3_000_001, dtype=np.uint8)  # not a multiple of the block
    path = tmp_path / "blob.bin"
    data.tofile(path)
    ranges = [(int(o), int(n)) for o, n in zip(rng.integers(0, len(data) - 70_000, 300), rng.integers(1, 70_000, 300))]
    ranges.append((len(data) - 17, 17))  # the file's last bytes
    outs = [np.empty(n, np.uint8) for _, n in ranges]
    with ReadEngine(path, n_threads=4, direct=direct) as e:
        e.read_ranges(ranges, outs)
        for o, (a, n) in zip(outs, ranges):
            np.testing.assert_array_equal(o, data[a:a + n])
        st = e.stats
        assert st.requests == len(ranges) and 0 < st.reads < len(ranges)  # some were coalesced
        assert st.bytes_read > 0 and st.mean_read > 0
        with pytest.raises(ModelFormatError, match="outside the file"):
            e.read_ranges([(len(data) - 5, 10)], [np.empty(10, np.uint8)])


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("kind", ["error", "short"])
def test_a_failed_read_is_tried_again_then_a_clear_error(tmp_path, direct, kind):
    path = tmp_path / "f.bin"
    data = np.random.default_rng(1).integers(0, 256, 1 << 18, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    ranges = [(5000, 300), (70000, 9000), (0, 1 << 17)]  # staged, and one large one in pieces
    fails = []

    def fault(off, n):  # the first read at each offset fails; the retry succeeds
        if off in fails:
            return None
        fails.append(off)
        if kind == "error":
            raise OSError(5, "Input/output error")
        return n // 3

    with ReadEngine(path, n_threads=2, direct=direct, max_read=1 << 16) as e:
        e.fault = fault
        outs = [np.empty(n, np.uint8) for _, n in ranges]
        e.read_ranges(ranges, outs)  # each failed once, then read
        assert fails
        for o, (a, n) in zip(outs, ranges):
            np.testing.assert_array_equal(o, data[a:a + n])
        e.fault = (lambda off, n: (_ for _ in ()).throw(OSError(5, "Input/output error"))) if kind == "error" \
            else (lambda off, n: 0)  # every read fails
        with pytest.raises(ModelFormatError, match="read error: Input/output error" if kind == "error"
                           else "short read: the file was truncated"):
            e.read_ranges(ranges, [np.empty(n, np.uint8) for _, n in ranges])
        e.fault = None
        outs = [np.empty(n, np.uint8) for _, n in ranges]
        e.read_ranges(ranges, outs)  # the engine stays usable
        np.testing.assert_array_equal(outs[1], data[70000:79000])


@pytest.mark.parametrize("direct", [True, False])
def test_a_large_range_is_staged_in_pieces(tmp_path, direct):
    # One range larger than max_read, into a buffer that is not page-aligned (with direct
    # I/O it goes through staging): read piece by piece, the staging buffer stays at max_read.
    data = np.random.default_rng(2).integers(0, 256, 1_000_003, dtype=np.uint8)
    path = tmp_path / "blob.bin"
    data.tofile(path)
    with ReadEngine(path, n_threads=1, direct=direct, max_read=64 * 1024) as e:
        for off, n in ((5, 700_001), (0, 1_000_003), (123_456, 65_537)):
            out = np.empty(n + 1, np.uint8)[1:]  # off by a byte from any page
            e.read_ranges([(off, n)], [out])
            np.testing.assert_array_equal(out, data[off:off + n])
        stage = e.pool.submit(lambda: getattr(e._local, "buf", None)).result()
        if direct:  # (without direct I/O, a lone range is read straight into its buffer: no staging)
            assert stage is not None and stage.shape[0] == 64 * 1024


def test_native_aio_reads_into_buffers_and_reports_each_tag(tmp_path):
    data = np.random.default_rng(3).integers(0, 256, 40 * ALIGN + 123, dtype=np.uint8)
    path = tmp_path / "blob.bin"
    data.tofile(path)
    aio = NativeAIO.open(path, depth=4)  # a shallow queue: a batch of 10 waits for room
    if aio is None:
        pytest.skip("no native asynchronous direct I/O here (not Linux x86-64/aarch64, or no O_DIRECT)")
    try:
        buf = aligned_empty(10 * 2 * ALIGN).reshape(10, 2 * ALIGN)
        ranges = [((3 * i + 1) * ALIGN, 2 * ALIGN) for i in range(10)]
        aio.submit(ranges[:4], list(buf[:4]), "a")
        aio.submit(ranges[4:], list(buf[4:]), [f"b{i}" for i in range(6)])  # a tag per read
        aio.wait("a")
        for i in range(4):
            np.testing.assert_array_equal(buf[i], data[ranges[i][0]:ranges[i][0] + 2 * ALIGN])
        aio.wait("b5")
        seen = set()
        while len(seen) < 5:  # every tag not waited for is reported finished once, errors none
            got = aio.finished()
            assert all(err is None for _, err in got)
            seen |= {t for t, _ in got}
        assert seen == {f"b{i}" for i in range(5)} and aio.finished() == []
        for i in range(10):
            np.testing.assert_array_equal(buf[i], data[ranges[i][0]:ranges[i][0] + 2 * ALIGN])
        assert aio.reads == 10 and aio.bytes_read == 20 * ALIGN
        aio.submit([(40 * ALIGN, 2 * ALIGN)], [buf[0]], "short")  # past the end: a short read fails its tag
        with pytest.raises(OSError, match=f"at {40 * ALIGN} gave 123 bytes"):
            aio.wait("short")
        aio.wait("short")  # the error is raised once
        with pytest.raises(ValueError, match="aligned"):
            aio.submit([(100, ALIGN)], [buf[0]], "x")
        aio.wait("x")  # nothing was submitted under it
        many = aligned_empty(9 * ALIGN).reshape(9, ALIGN)  # one tag over more reads than the queue holds
        aio.submit([(i * ALIGN, ALIGN) for i in range(9)], list(many), "many")
        aio.wait("many")
        np.testing.assert_array_equal(many.reshape(-1), data[:9 * ALIGN])
        assert aio.finished() == []  # waited for: not reported again
        pool = aligned_empty(3 * ALIGN)  # reads as ints into one owner's memory
        base = pool.ctypes.data
        aio.submit_addrs([5 * ALIGN, 0], [2 * ALIGN, ALIGN], [base, base + 2 * ALIGN], ["p", "q"], pool)
        aio.wait("q"), aio.wait("p")
        np.testing.assert_array_equal(pool, np.concatenate([data[5 * ALIGN:7 * ALIGN], data[:ALIGN]]))
        with pytest.raises(ValueError, match="aligned"):
            aio.submit_addrs([0], [ALIGN], [base + 8], "y", pool)
        with pytest.raises(ValueError, match="differ in number"):
            aio.submit_addrs([0, ALIGN], [ALIGN], [base], "z", pool)
        assert not aio.in_flight("y") and not aio.in_flight("z")
        aio.submit_addrs([3 * ALIGN, 0, ALIGN], ALIGN, [base, base + ALIGN, base + 2 * ALIGN], "w", pool)  # one length
        aio.wait("w")
        np.testing.assert_array_equal(pool, np.concatenate([data[3 * ALIGN:4 * ALIGN], data[:2 * ALIGN]]))
        with pytest.raises(ValueError, match="aligned"):
            aio.submit_addrs([0], np.int64(ALIGN + 1), [base], "v", pool)
        aio.submit_addrs([], ALIGN, [], "none", pool)  # an empty batch: nothing to wait for
        assert not aio.in_flight("none") and aio.finished() == []
        ints = [i * ALIGN for i in range(9)]  # more reads than the queue holds, as ints
        many[:] = 0
        aio.submit_addrs(ints, ALIGN, [many.ctypes.data + o for o in ints], "many2", many)
        aio.wait("many2")
        np.testing.assert_array_equal(many.reshape(-1), data[:9 * ALIGN])
        assert not aio.in_flight("v") and aio.reads == 10 + 1 + 9 + 2 + 3 + 9
    finally:
        aio.close()
    with pytest.raises(OSError, match="in flight"):  # closed with a read unreaped: no endless wait
        aio._left["late"] = 1
        aio.wait("late")


def test_probe_disk_measures_and_cleans_up(tmp_path):
    rows = probe_disk(str(tmp_path), file_mib=16, sizes=(4096, 65536), depths=(1, 2), seconds=0.05)
    assert [(r.read_size, r.depth) for r in rows] == [(4096, 1), (4096, 2), (65536, 1), (65536, 2)]
    assert all(r.mb_s > 0 and r.iops > 0 for r in rows)
    assert pick_read_size(rows) in (4096, 65536)
    assert "| 64 KiB |" in format_probe(rows)
    assert os.listdir(tmp_path) == []  # the scratch file is gone


@pytest.mark.parametrize("argv, needle", [(["probe-disk", "--size-mib", "1"], "--size-mib"),
                                          (["probe-disk", "--dir", "/no/such/dir"], "/no/such/dir")])
def test_probe_disk_bad_arguments(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("flashlm: error:") and needle in err and "Traceback" not in err


def _region(addr: int) -> tuple[int, int, set] | None:
    """(start, end, VmFlags) of the mapping that holds addr, from /proc/self/smaps (None
    where the kernel does not say)."""
    try:
        lines = open("/proc/self/smaps").read().splitlines()
    except OSError:
        return None
    inside = None
    for line in lines:
        head = line.split()[0] if line.split() else ""
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = (lo, hi) if lo <= addr < hi else None
        elif inside and head == "VmFlags:":
            return (*inside, set(line.split()[1:]))
    return None


def test_a_huge_buffer_is_aligned_zeroed_and_advised_for_huge_pages_on_whole_ones_only(tmp_path):
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("no transparent huge pages on this platform")
    n = 3 * HUGE + 5 * ALIGN  # whole huge pages, then a tail of 4 KiB pages
    buf = aligned_empty(n, huge=True)
    assert buf.shape == (n,) and buf.ctypes.data % HUGE == 0 and not buf.any()
    buf[:] = 7
    assert (buf == 7).all()
    small = aligned_empty(n)
    assert small.ctypes.data % ALIGN == 0
    head, tail, rows = _region(buf.ctypes.data), _region(buf.ctypes.data + 3 * HUGE), _region(small.ctypes.data)
    if head is None or "hg" not in head[2]:
        pytest.skip("this kernel keeps no huge-page advice (no THP, or smaps without VmFlags)")
    assert head[:2] == (buf.ctypes.data, buf.ctypes.data + 3 * HUGE)  # exactly the whole huge pages
    assert "nh" in tail[2] and "hg" not in tail[2]  # the tail: 4 KiB pages, whatever the system's THP setting
    assert "nh" in rows[2]  # the default buffer: 4 KiB pages
    data = np.random.default_rng(5).integers(0, 256, 4 * ALIGN, dtype=np.uint8)
    (tmp_path / "blob.bin").write_bytes(data.tobytes())
    aio = NativeAIO.open(tmp_path / "blob.bin", depth=4)
    if aio is None:
        pytest.skip("no native asynchronous direct I/O here")
    try:
        aio.submit([(0, 4 * ALIGN)], [buf[HUGE - 2 * ALIGN:HUGE + 2 * ALIGN]], "x")  # across a huge page's end
        aio.wait("x")
        np.testing.assert_array_equal(buf[HUGE - 2 * ALIGN:HUGE + 2 * ALIGN], data)
    finally:
        aio.close()


def test_staging_rows_are_page_aligned_and_each_thread_has_its_own(tmp_path):
    data = np.random.default_rng(6).integers(0, 256, 64 * ALIGN, dtype=np.uint8)
    path = tmp_path / "blob.bin"
    data.tofile(path)
    with ReadEngine(path, n_threads=3, max_read=3 * ALIGN + 100, max_gap=1 << 20) as e:  # an unaligned max_read
        outs = [np.zeros(50, dtype=np.uint8) for _ in range(12)]
        ranges = [(i * 5 * ALIGN + 7, 50) for i in range(12)]  # each read its own, staged
        for _ in range(3):
            e.read_ranges(ranges, outs)
            for (off, n), out in zip(ranges, outs):
                np.testing.assert_array_equal(out, data[off:off + n])
        held = {}  # thread -> the address of its staging buffer
        for _ in range(30):
            ident, buf = e.pool.submit(lambda: (threading.get_ident(), getattr(e._local, "buf", None))).result()
            if buf is not None:
                held[ident] = buf.ctypes.data
        assert held and len(set(held.values())) == len(held) <= 3  # one row each
        assert all(a % ALIGN == 0 for a in held.values())
