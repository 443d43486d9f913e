"""The I/O engine shared by flashload (FFN neurons) and experts (MoE experts): many byte
ranges of one file read with parallel `pread`s, around the page cache.

- Direct I/O (O_DIRECT) where the file system allows it: the page cache neither hides
  the disk's speed nor keeps the streamed bytes. Elsewhere (tmpfs, some overlays) the
  file is read normally and its pages dropped after each batch
  (posix_fadvise DONTNEED), which is what "dropped pages" means in the benchmarks.
- Adjacent or nearly adjacent ranges are coalesced into one read, up to `max_read`
  bytes: small scattered reads are what makes flash slow (`flashlm probe-disk` measures
  the curve of a disk's speed against read size).
- Reads run on a thread pool (`os.preadv` releases the GIL), so several are in flight.

Direct I/O needs offsets, lengths and memory aligned to the device block; the engine
widens each read to 4 KiB boundaries and reads into page-aligned staging buffers, then
copies the requested bytes out.

A read that fails (an I/O error) or comes back short (the file truncated since it was
opened) is tried once more, then raises ModelFormatError naming the file and the offset.
`ReadEngine.fault` is the tests' hook for both.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..errors import ModelFormatError
from .buffers import ALIGN, aligned_empty, open_direct, _round_up


@dataclass
class IOStats:
    """What the engine did since the last reset."""

    requests: int = 0  # ranges asked for
    reads: int = 0  # preads issued after coalescing
    bytes_requested: int = 0
    bytes_read: int = 0  # including alignment padding and coalesced gaps
    seconds: float = 0.0  # wall time inside read_ranges
    per_batch: list = field(default_factory=list)

    @property
    def mean_read(self) -> float:
        return self.bytes_read / self.reads if self.reads else 0.0


def coalesce(ranges: list[tuple[int, int]], max_gap: int, max_read: int, align: int = 1) -> list[tuple[int, int, list[int]]]:
    """Group (offset, length) ranges into reads: (start, length, [indices of the ranges
    it covers]). Ranges closer than max_gap are merged while the read stays within
    max_read (a single larger range is never split). With align > 1, reads start and
    end on multiples of align."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    reads: list[tuple[int, int, list[int]]] = []
    cur_s = cur_e = None
    members: list[int] = []
    for i in order:
        off, n = ranges[i]
        s, e = off // align * align, _round_up(off + n, align)
        if cur_s is not None and s - cur_e <= max_gap and max(e, cur_e) - cur_s <= max_read:
            cur_e = max(cur_e, e)
            members.append(i)
            continue
        if cur_s is not None:
            reads.append((cur_s, cur_e - cur_s, members))
        cur_s, cur_e, members = s, e, [i]
    if cur_s is not None:
        reads.append((cur_s, cur_e - cur_s, members))
    return reads


class ReadEngine:
    """Parallel, coalesced reads of byte ranges from one file, bypassing the page cache.

    engine = ReadEngine(path); engine.read_ranges([(off, n), ...], [buf, ...])
    fills each buf (a writable uint8 array of length n) with the file's bytes.
    """

    # tests' fault injection: fault(offset, n) runs before each read of n bytes at offset;
    # it may raise OSError (an I/O error) or return a smaller n (a short read)
    fault = None

    def __init__(self, path: str | os.PathLike, n_threads: int = 8, direct: bool = True,
                 max_gap: int = 64 * 1024, max_read: int = 1 << 20, merge: bool = True):
        self.path = os.fspath(path)
        self.size = os.path.getsize(self.path)
        self.max_gap, self.max_read = max_gap, max_read
        self.merge = merge  # False: one read per range, even for ranges sharing a page
        fd = open_direct(self.path) if direct else None
        self.direct = fd is not None
        self.fd = fd if self.direct else os.open(self.path, os.O_RDONLY)
        self.pool = ThreadPoolExecutor(max_workers=n_threads, thread_name_prefix="flashlm-io")
        self.n_threads = n_threads
        self.stats = IOStats()
        self._local = threading.local()
        self._slab, self._slabs_taken, self._slab_lock = None, 0, threading.Lock()  # staging (_staging)

    def _staging(self, n: int) -> np.ndarray:
        """This thread's staging buffer of at least n bytes: max_read of one slab that the
        threads share, on huge pages (a direct read into it is one DMA segment), taken
        the first time a thread stages."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.shape[0] < n:
            with self._slab_lock:
                if n > self.max_read or self._slabs_taken == self.n_threads:  # (a caller's own thread)
                    buf = aligned_empty(max(n, self.max_read))
                else:
                    if self._slab is None:  # rows page-aligned, for direct I/O
                        row = _round_up(self.max_read)
                        self._slab = aligned_empty(self.n_threads * row, huge=True).reshape(self.n_threads, row)
                    buf = self._slab[self._slabs_taken, :self.max_read]
                    self._slabs_taken += 1
            self._local.buf = buf
        return buf

    def _read_one(self, start: int, length: int, members: list[int], ranges, outs) -> float:
        end = min(start + length, _round_up(self.size)) if self.direct else min(start + length, self.size)
        n = end - start
        if len(members) == 1 and self._straight(start, n, ranges[members[0]], outs[members[0]]):
            return time.perf_counter()
        stage = self._staging(n)[:n]
        self._pread(stage, start, max(ranges[i][0] + ranges[i][1] for i in members) - start)
        for i in members:
            off, ln = ranges[i]
            a = off - start
            outs[i][:ln] = stage[a:a + ln]
        if not self.direct:  # keep the page cache from holding (and hiding) what we stream
            os.posix_fadvise(self.fd, start, n, os.POSIX_FADV_DONTNEED)
        return time.perf_counter()

    def _pread(self, buf: np.ndarray, start: int, need: int) -> None:
        """Fill buf from the file at start, at least its first `need` bytes (the rest may
        lie past the file's end); a failed or short read is tried once more, then
        ModelFormatError."""
        for again in (False, True):
            try:
                if self._fill(buf, start) >= need:
                    return
                why = "a short read: the file was truncated or replaced while in use"
            except OSError as e:
                why = f"a read error: {e.strerror or e}"
            if again:
                raise ModelFormatError(f"{self.path}: {why} (at byte {start:,}); check the file and the disk, "
                                       "then load the model again")

    def _fill(self, buf: np.ndarray, start: int) -> int:
        """Read into buf from start: the bytes read (fewer only at the file's end)."""
        got = 0
        while got < len(buf):  # preadv may return short counts; at EOF it returns 0
            part = buf[got:]
            if self.fault is not None:
                part = part[:self.fault(start + got, len(part))]
            k = os.preadv(self.fd, [part], start + got) if len(part) else 0
            if k <= 0:
                break
            got += k
            if self.direct and k % ALIGN:  # only the end of the file gives an unaligned count,
                break  # and a direct read from the unaligned offset after it would fail
        return got

    def _read_piece(self, p: int, m: int, rng, out: np.ndarray) -> float:
        """Read [p, p + m), one piece of the large range rng = (off, ln), and put the part
        of rng it holds into out (straight when it can, else through max_read of staging)."""
        off, ln = rng
        a, b = max(off, p), min(off + ln, p + m)
        dst = out[a - off:b - off]
        if a == p and b == p + m and self._straight(p, m, (p, m), dst):
            return time.perf_counter()
        stage = self._staging(self.max_read)[:m]
        self._pread(stage, p, b - p)
        dst[:] = stage[a - p:b - p]
        if not self.direct:
            os.posix_fadvise(self.fd, p, m, os.POSIX_FADV_DONTNEED)
        return time.perf_counter()

    def submit(self, ranges: list[tuple[int, int]], outs: list[np.ndarray]) -> list[Future]:
        """Start filling outs[i][:n_i] with the file's bytes [off_i, off_i + n_i). Returns
        range i's future (ranges coalesced into one read share it), done when its bytes
        are in outs; its result is the time.perf_counter() at which the read finished."""
        self._check(ranges)
        if self.merge:
            reads = coalesce(ranges, self.max_gap, self.max_read, ALIGN if self.direct else 1)
        else:
            a = ALIGN if self.direct else 1
            reads = [(off // a * a, _round_up(off + n, a) - off // a * a, [i]) for i, (off, n) in enumerate(ranges)]
        end = _round_up(self.size) if self.direct else self.size
        pieces = sum(-(-(min(s + n, end) - s) // self.max_read) if n > self.max_read else 1 for s, n, _ in reads)
        self._count(ranges, reads, pieces)
        futs = [None] * len(ranges)
        for s, n, m in reads:
            if n > self.max_read:  # one large range (merged reads stay within max_read): in pieces, in
                i = m[0]  # parallel, so no thread stages more than max_read
                n = min(s + n, end) - s
                futs[i] = _all_of([self.pool.submit(self._read_piece, p, min(self.max_read, s + n - p), ranges[i],
                                                    outs[i]) for p in range(s, s + n, self.max_read)])
                continue
            f = self.pool.submit(self._read_one, s, n, m, ranges, outs)
            for i in m:
                futs[i] = f
        return futs

    def _check(self, ranges) -> None:
        for off, n in ranges:
            if off < 0 or n < 0 or off + n > self.size:
                raise ModelFormatError(f"{self.path}: bytes {off:,}..{off + n:,} lie outside the file ({self.size:,} "
                                       "bytes); the file is damaged: make or download it again")

    def _count(self, ranges, reads, n_reads: int | None = None) -> None:
        st = self.stats
        st.requests += len(ranges)
        st.reads += len(reads) if n_reads is None else n_reads
        st.bytes_requested += sum(n for _, n in ranges)
        st.bytes_read += sum(n for _, n, _ in reads)

    def _straight(self, start: int, n: int, rng, out: np.ndarray) -> bool:
        """Read one range straight into its buffer, with no staging copy, where it can be:
        for direct I/O the range and the buffer must be page-aligned (a bundle record into
        its cache slot). False if it cannot."""
        off, ln = rng
        if off != start or ln != n or out.shape[0] < n:
            return False
        if self.direct and (n % ALIGN or out.ctypes.data % ALIGN):
            return False
        self._pread(out[:n], start, n)
        if not self.direct:
            os.posix_fadvise(self.fd, start, n, os.POSIX_FADV_DONTNEED)
        return True

    def read_ranges(self, ranges: list[tuple[int, int]], outs: list[np.ndarray]) -> None:
        """Fill outs[i][:n_i] with the file's bytes [off_i, off_i + n_i), waiting."""
        t0 = time.perf_counter()
        self._check(ranges)
        if len(ranges) == 1 and self._straight(*ranges[0], ranges[0], outs[0]):
            # one read that needs no staging: done on this thread (a pool's handoff costs ~60 us)
            self._count(ranges, [(*ranges[0], [0])])
        else:
            for f in set(self.submit(ranges, outs)):
                f.result()
        self.stats.seconds += time.perf_counter() - t0

    def reset_stats(self) -> IOStats:
        old, self.stats = self.stats, IOStats()
        return old

    def close(self) -> None:
        if self.fd >= 0:
            self.pool.shutdown(wait=True)
            os.close(self.fd)
            self.fd = -1
            self._slab = None  # the staging memory goes with the engine's threads

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _all_of(futs: list[Future]) -> Future:
    """A future done when all of futs are: the first error, else the latest result."""
    out, left, lock = Future(), [len(futs)], threading.Lock()

    def done(_):
        with lock:
            left[0] -= 1
            if left[0]:
                return
        errors = [f.exception() for f in futs if f.exception() is not None]
        if errors:
            out.set_exception(errors[0])
        else:
            out.set_result(max(f.result() for f in futs))

    for f in futs:
        f.add_done_callback(done)
    return out
