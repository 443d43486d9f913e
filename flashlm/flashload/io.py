"""The I/O engine shared by flashload (FFN neurons) and experts (MoE experts): many byte
ranges of one file read with parallel `pread`s, around the page cache.

- Direct I/O (O_DIRECT) where the file system allows it: the page cache neither hides
  the disk's speed nor keeps the streamed bytes. Elsewhere (tmpfs, some overlays) the
  file is read normally and its pages dropped after each batch
  (posix_fadvise DONTNEED), which is what "dropped pages" means in the benchmarks.
- Adjacent or nearly adjacent ranges are coalesced into one read, up to `max_read`
  bytes: small scattered reads are what makes flash slow (4 KB reads at 43 MB/s against
  1900 MB/s at 1 MB on this machine's disk).
- Reads run on a thread pool (`os.preadv` releases the GIL), so several are in flight.

Direct I/O needs offsets, lengths and memory aligned to the device block; the engine
widens each read to 4 KiB boundaries and reads into page-aligned staging buffers, then
copies the requested bytes out.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import reduce
from operator import or_

import numpy as np

ALIGN = 4096


def _huge_page_size() -> int:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


HUGE = _huge_page_size()  # a transparent huge page (2 MiB with 4 KiB pages)


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


def aligned_empty(nbytes: int, huge: bool = False) -> np.ndarray:
    """A page-aligned, zeroed uint8 buffer (anonymous mmap), as direct I/O requires.

    By default it becomes resident 4 KiB at a time as it is used: no transparent huge
    pages, which would make a buffer's first touched byte cost 2 MiB (and the neuron
    windows exceed their memory plan). huge: 2 MiB-aligned and backed by transparent huge
    pages where the kernel has them, for a buffer that reads fill and that the memory
    plan counts whole (the expert cache, staging, hot windows' tails): a direct read into
    physically contiguous memory is one DMA segment, not one per 4 KiB page. On this
    machine's virtual disk that made an 84 KiB read end in 68 us against 100, a 1 MiB one
    in 0.62 ms against 1.36."""
    huge = huge and hasattr(mmap, "MADV_HUGEPAGE")
    size = max(ALIGN, _round_up(nbytes))
    if huge:  # private (shared memory gets no huge pages), with room to start on a huge page
        m = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        start = -np.frombuffer(m, dtype=np.uint8).ctypes.data % HUGE
    else:
        m, start = mmap.mmap(-1, size), 0
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        try:  # huge pages only on the whole ones inside nbytes (also where THP is "always"): the RSS stays nbytes
            m.madvise(mmap.MADV_NOHUGEPAGE)
            if huge and nbytes >= HUGE:
                m.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE * HUGE)
        except OSError:  # a kernel without transparent huge pages: 4 KiB pages
            pass
    return np.frombuffer(m, dtype=np.uint8)[start:start + nbytes]


def open_direct(path: str | os.PathLike) -> int | None:
    """A read-only file descriptor of path with direct I/O (O_DIRECT), or None where the
    platform or file system does not allow it."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return None
    try:
        os.preadv(fd, [aligned_empty(ALIGN)], 0)  # some file systems accept the flag, then fail reads
    except OSError:
        os.close(fd)
        return None
    return fd


def _round_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


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
        got = self._pread(stage, start)
        for i in members:
            off, ln = ranges[i]
            a = off - start
            if a + ln > got:
                raise OSError(f"{self.path}: short read at offset {off} ({got - a} of {ln} bytes); is the file truncated?")
            outs[i][:ln] = stage[a:a + ln]
        if not self.direct:  # keep the page cache from holding (and hiding) what we stream
            os.posix_fadvise(self.fd, start, n, os.POSIX_FADV_DONTNEED)
        return time.perf_counter()

    def _pread(self, buf: np.ndarray, start: int) -> int:
        """Fill buf from the file at start; the bytes read (fewer only at the file's end)."""
        got = 0
        while got < len(buf):  # preadv may return short counts; at EOF it returns 0
            k = os.preadv(self.fd, [buf[got:]], start + got)
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
        got = self._pread(stage, p)
        if b > p + got:
            raise OSError(f"{self.path}: short read at offset {p} ({got} of {b - p} bytes); is the file truncated?")
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
                raise ValueError(f"range ({off}, {n}) is outside {self.path} ({self.size} bytes)")

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
        got = 0
        while got < n:
            k = os.preadv(self.fd, [out[got:n]], start + got)
            if k <= 0:
                raise OSError(f"{self.path}: short read at offset {start} ({got} of {n} bytes); is the file truncated?")
            got += k
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


def device_read_bytes() -> int:
    """Bytes this process has caused to be read from storage (/proc/self/io read_bytes):
    what the disk really delivered, unlike bytes returned by read calls."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class _Iocb(ctypes.Structure):
    """The kernel's struct iocb (linux/aio_abi.h, 64-bit little-endian); opcode 0 is IOCB_CMD_PREAD."""
    _fields_ = [("data", ctypes.c_uint64), ("key", ctypes.c_uint32), ("rw_flags", ctypes.c_int32),
                ("opcode", ctypes.c_uint16), ("reqprio", ctypes.c_int16), ("fildes", ctypes.c_uint32),
                ("buf", ctypes.c_uint64), ("nbytes", ctypes.c_uint64), ("offset", ctypes.c_int64),
                ("reserved2", ctypes.c_uint64), ("flags", ctypes.c_uint32), ("resfd", ctypes.c_uint32)]


class _IoEvent(ctypes.Structure):
    """The kernel's struct io_event."""
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64), ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


class NativeAIO:
    """Linux native asynchronous direct reads (io_submit / io_getevents, through libc's
    syscall): the kernel reads each range straight into its buffer while the caller
    computes, with no thread of ours to wake when it is done, no page cache and no copy.
    On a 2-core laptop that is what makes prefetch pay: reads finished on a thread pool
    preempt the decode's own threads.

    aio = NativeAIO.open(path)   # None where unavailable (not Linux x86-64/aarch64, no
                                 # O_DIRECT on this file system, io_setup refused)
    aio.submit([(offset, n), ...], [buf, ...], tag)   # 4 KiB-aligned offsets, lengths, buffers
    aio.submit_addrs(offsets, lengths, addresses, tag, keep)   # the same, as ints (lengths: a
                                 # list, or one int for all; keep: what owns the memory,
                                 # held until the reads end)
    aio.wait(tag)                # until every read submitted with tag is done; OSError if one failed

    Callers must keep each buffer alive and unused until its tag has been waited for.
    A submission's bookkeeping is plain Python on ctypes structures: an expert cache
    submits one or two reads at a time, tens of times a token, where numpy's per-call
    costs outweighed the work.
    """

    _SYS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}  # setup, destroy, getevents, submit

    @classmethod
    def open(cls, path: str | os.PathLike, depth: int = 256):
        import platform

        nums = cls._SYS.get(platform.machine())
        if nums is None or ctypes.sizeof(ctypes.c_void_p) != 8 or not sys.platform.startswith("linux") or (
                ctypes.sizeof(_Iocb), ctypes.sizeof(_IoEvent)) != (64, 32):
            return None
        fd = open_direct(path)
        if fd is None:
            return None
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            ctx = ctypes.c_ulong(0)
            if libc.syscall(ctypes.c_long(nums[0]), ctypes.c_long(depth), ctypes.byref(ctx)) != 0:
                raise OSError(ctypes.get_errno(), "io_setup")
        except OSError:
            os.close(fd)
            return None
        return cls(fd, libc, ctx, nums, depth)

    def __init__(self, fd, libc, ctx, nums, depth):
        c = ctypes
        self.fd, self._ctx, self._nums, self.depth = fd, ctx.value, nums, depth
        L = c.c_long
        # syscall(nr, ctx, ...) with its arguments' types fixed, for each call made here
        self._sys_submit = c.CFUNCTYPE(L, L, c.c_ulong, L, c.c_void_p, use_errno=True)(("syscall", libc))
        self._sys_events = c.CFUNCTYPE(L, L, c.c_ulong, L, L, c.c_void_p, c.c_void_p, use_errno=True)(("syscall", libc))
        self._sys_destroy = c.CFUNCTYPE(L, L, c.c_ulong, use_errno=True)(("syscall", libc))
        self._iocbs = (_Iocb * depth)()  # one per read in flight, reused
        for cb in self._iocbs:
            cb.fildes = fd
        self._cb_addr = [c.addressof(cb) for cb in self._iocbs]
        self._events = (_IoEvent * depth)()
        self._events_addr = c.addressof(self._events)
        self._ptrs = (c.c_void_p * depth)()
        self._ptrs_addr = c.addressof(self._ptrs)
        self._free = list(range(depth - 1, -1, -1))
        self._tag_of: dict[int, object] = {}  # iocb index -> tag
        self._left: dict = {}  # tag -> reads not yet done
        self._failed: dict = {}  # tag -> the first error
        self._done: dict = {}  # tags whose reads all ended and were not waited for, for finished()
        self._in_kernel = 0  # reads submitted and not yet reaped
        self._zero = (c.c_long * 2)()  # a zero timespec: io_getevents returns at once
        self._zero_addr = c.addressof(self._zero)
        # the completion ring the kernel maps at the context's address (struct aio_ring: id,
        # nr, head, tail, magic, ...): finished() and wait() look at head and tail before
        # they ask the kernel
        ring = (c.c_uint * 8).from_address(self._ctx)
        self._ring = ring if ring[4] == 0xA10A10A1 else None
        self._bufs: dict[int, object] = {}  # keeps each buffer alive while its read is in flight
        self.reads = self.bytes_read = 0

    def submit(self, ranges, outs, tag) -> None:
        """Start reading each (offset, n) into its buffer; they complete under tag (or
        tags: a list, one per range)."""
        if len(outs) != len(ranges):
            raise ValueError("submit: a buffer is needed for each range")
        if any(o.nbytes < n for o, (_, n) in zip(outs, ranges)):
            raise ValueError("direct reads need 4 KiB-aligned offsets, lengths and buffers (a buffer is too small)")
        offs, lens = [r[0] for r in ranges], [r[1] for r in ranges]
        self.submit_addrs(offs, lens, [o.ctypes.data for o in outs], tag, list(outs))

    def submit_addrs(self, offs, lens, addrs, tag, keep=None) -> None:
        """submit() with the reads as lists of int offsets, lengths (or one int, every
        read's) and buffer addresses; keep: the buffers' owner (one object for all, or a
        list, one per read). An expert cache submits a few reads at a time, tens of times
        a token: this is plain Python on lists and ctypes structures, no numpy."""
        n = len(offs)
        if isinstance(lens, (int, np.integer)):
            aligned = lens = int(lens)
            lens = [lens] * n
        else:
            aligned = reduce(or_, lens, 0)
        if len(lens) != n or len(addrs) != n or (isinstance(tag, list) and len(tag) != n) or (
                isinstance(keep, list) and len(keep) != n):
            raise ValueError("submit_addrs: offsets, lengths, addresses (and tags, owners if lists) differ in number")
        if reduce(or_, addrs, reduce(or_, offs, aligned)) % ALIGN:
            raise ValueError("direct reads need 4 KiB-aligned offsets, lengths and buffers")
        if not n:  # nothing to read: no tag to wait for
            return
        left = self._left
        if isinstance(tag, list):  # counted for the whole batch first: a tag ends only when all its reads have
            for t in tag:
                left[t] = left.get(t, 0) + 1
        else:
            left[tag] = left.get(tag, 0) + n
        if n <= len(self._free):
            self._submit(offs, lens, addrs, keep, tag)
        else:  # more than the queue holds: in turns
            for i in range(0, n, self.depth):
                j = min(n, i + self.depth)
                self._submit(offs[i:j], lens[i:j], addrs[i:j], keep[i:j] if isinstance(keep, list) else keep,
                             tag[i:j] if isinstance(tag, list) else tag)
        self.reads += n
        self.bytes_read += sum(lens)

    def _submit(self, offs, lens, addrs, keep, tag) -> None:
        """Submit reads (keep, tag: one for all, or lists, one per read)."""
        n = len(offs)
        while n > len(self._free):  # a full queue: let reads finish first
            self._collect(1)
        free, cbs, ptrs, cb_addr, tag_of, bufs = self._free, self._iocbs, self._ptrs, self._cb_addr, self._tag_of, self._bufs
        tags = tag if isinstance(tag, list) else None
        keeps = keep if isinstance(keep, list) else None
        idx = []
        for k in range(n):
            i = free.pop()
            cb = cbs[i]
            cb.data, cb.buf, cb.nbytes, cb.offset = i, addrs[k], lens[k], offs[k]
            tag_of[i] = tag if tags is None else tags[k]
            bufs[i] = keep if keeps is None else keeps[k]
            ptrs[k] = cb_addr[i]
            idx.append(i)
        done = 0
        while done < n:
            got = self._sys_submit(self._nums[3], self._ctx, n - done, self._ptrs_addr + 8 * done)
            if got < 0:
                err = ctypes.get_errno()
                if err == 11 and self._in_kernel:  # EAGAIN: the kernel's queue is full; finish some, then go on
                    self._collect(1)
                    continue
                for i in idx[done:]:  # not submitted: fail them under their tags
                    self._finish(i, OSError(err, f"io_submit: {os.strerror(err)}"))
                return
            done += got
            self._in_kernel += got

    SPIN_S = 0.002  # how long wait() watches the completion ring before it sleeps in the kernel

    def wait(self, tag) -> None:
        """Until all of tag's reads are done; OSError (once) if one of them failed.
        It watches the completion ring for up to SPIN_S before it sleeps in io_getevents:
        reads here take 0.1-0.6 ms, and a sleep and wake-up cost about 30 us a wait (a
        virtual machine's idle CPU halts). On a disk much slower than that, each wait
        spends up to SPIN_S of one core (holding the GIL): lower SPIN_S there."""
        ring = self._ring
        while tag in self._left:
            if ring is not None and self._in_kernel:
                end = time.perf_counter() + self.SPIN_S
                while ring[2] == ring[3] and time.perf_counter() < end:
                    pass
            self._collect(1)
        self._done.pop(tag, None)
        err = self._failed.pop(tag, None)
        if err is not None:
            raise err

    def in_flight(self, tag) -> bool:
        return tag in self._left

    def finished(self) -> list:
        """Without blocking: [(tag, OSError or None)] of the tags whose reads all ended
        since the last call and were not waited for."""
        ring = self._ring
        if self._in_kernel and (ring is None or ring[2] != ring[3]):  # completions waiting in the ring
            self._collect(0)
        done, self._done = self._done, {}
        return [(t, self._failed.pop(t, None)) for t in done]

    def _collect(self, least: int) -> None:
        """Reap completions, blocking until at least `least` are done."""
        if not self._in_kernel:
            if least:
                raise OSError("no direct read is in flight to wait for (the reader was closed?)")
            return
        ev = self._events
        while True:
            got = self._sys_events(self._nums[2], self._ctx, least, len(ev), self._events_addr,
                                   self._zero_addr if least == 0 else None)
            if got >= 0:
                break
            if ctypes.get_errno() != 4:  # EINTR: again
                raise OSError(ctypes.get_errno(), "io_getevents")
        self._in_kernel -= got
        cbs = self._iocbs
        for k in range(got):
            e = ev[k]
            d, res = e.data, e.res
            want = cbs[d].nbytes
            self._finish(d, None if res == want else OSError(
                -res if res < 0 else 5, f"direct read of {want} bytes at {cbs[d].offset} gave "
                f"{os.strerror(-res) if res < 0 else f'{res} bytes (a truncated file?)'}"))

    def _finish(self, i: int, err) -> None:
        tag = self._tag_of.pop(i)
        self._bufs.pop(i, None)
        self._free.append(i)
        if err is not None:
            self._failed.setdefault(tag, err)
        self._left[tag] -= 1
        if not self._left[tag]:
            del self._left[tag]
            self._done[tag] = None

    def close(self) -> None:
        if self.fd >= 0:
            self._sys_destroy(self._nums[1], self._ctx)  # io_destroy waits for the reads still in flight (Linux >= 4.2)
            self._ring = None  # unmapped with the context
            os.close(self.fd)
            self.fd = -1
            self._in_kernel = 0
            for d in (self._tag_of, self._bufs, self._left, self._done, self._failed):
                d.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
