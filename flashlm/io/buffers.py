"""Page-aligned and huge-page buffers, direct-I/O file descriptors, and the bytes a
process has read from its storage device."""

from __future__ import annotations

import mmap
import os

import numpy as np

ALIGN = 4096


def _huge_page_size() -> int:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


HUGE = _huge_page_size()  # a transparent huge page (2 MiB with 4 KiB pages)


def aligned_empty(nbytes: int, huge: bool = False) -> np.ndarray:
    """A page-aligned, zeroed uint8 buffer (anonymous mmap), as direct I/O requires.

    By default it becomes resident 4 KiB at a time as it is used: no transparent huge
    pages, which would make a buffer's first touched byte cost 2 MiB (and the neuron
    windows exceed their memory plan). huge: 2 MiB-aligned and backed by transparent huge
    pages where the kernel has them, for a buffer that reads fill and that the memory
    plan counts whole (the expert cache, staging, hot windows' tails): a direct read into
    physically contiguous memory is one DMA segment, not one per 4 KiB page (a virtual
    disk pays for each segment: benchmarks/README.md)."""
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
