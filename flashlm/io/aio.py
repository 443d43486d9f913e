"""Linux native asynchronous direct reads (io_submit / io_getevents)."""

from __future__ import annotations

import ctypes
import os
import sys
import time
from functools import reduce
from operator import or_

import numpy as np

from .buffers import ALIGN, open_direct


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
        an SSD's reads of an expert end within a millisecond, and a sleep and wake-up cost
        tens of microseconds a wait (a virtual machine's idle CPU halts). On a disk much
        slower than that, each wait spends up to SPIN_S of one core (holding the GIL):
        lower SPIN_S there."""
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
