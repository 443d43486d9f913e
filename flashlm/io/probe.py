"""`flashlm probe-disk`: this disk's read curve (read size -> MB/s and IOPS at several
queue depths), with direct I/O so the page cache does not flatter it. flashload sizes
its reads from the curve (`pick_read_size`)."""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .buffers import ALIGN, aligned_empty

SIZES = (4 << 10, 32 << 10, 128 << 10, 1 << 20)
DEPTHS = (1, 4, 16)


@dataclass
class ProbeRow:
    read_size: int  # bytes
    depth: int  # reads in flight
    mb_s: float
    iops: float
    direct: bool


def _make_file(folder: str, nbytes: int) -> str:
    fd, path = tempfile.mkstemp(prefix="flashlm-probe-", suffix=".bin", dir=folder)
    chunk = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    with os.fdopen(fd, "wb") as f:
        for _ in range(0, nbytes, len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    return path


def _open(path: str) -> tuple[int, bool]:
    if hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            pass
        else:
            try:
                os.preadv(fd, [aligned_empty(ALIGN)], 0)  # some file systems accept the flag, then fail reads
                return fd, True
            except OSError:
                os.close(fd)
    return os.open(path, os.O_RDONLY), False


def probe_disk(folder: str | None = None, file_mib: int = 256, sizes=SIZES, depths=DEPTHS,
               seconds: float = 0.5, progress=None) -> list[ProbeRow]:
    """Random aligned reads of each size at each queue depth for about `seconds` each,
    on a scratch file of file_mib MiB written in `folder` (default: the model cache
    folder, so the disk measured is the one models stream from), deleted afterwards."""
    from ..paths import home

    folder = folder or str(home())
    os.makedirs(folder, exist_ok=True)
    path = _make_file(folder, file_mib << 20)
    rows = []
    try:
        fd, direct = _open(path)
        n_blocks = (file_mib << 20) // ALIGN
        try:
            for size in sizes:
                for depth in depths:
                    if progress:
                        progress(f"{size >> 10} KiB reads, {depth} in flight")
                    rows.append(_measure(fd, direct, size, depth, n_blocks, seconds))
        finally:
            os.close(fd)
    finally:
        os.unlink(path)
    return rows


def _measure(fd: int, direct: bool, size: int, depth: int, n_blocks: int, seconds: float) -> ProbeRow:
    span = n_blocks - size // ALIGN

    def worker(k: int) -> tuple[int, int]:
        buf = aligned_empty(size)
        offs = np.random.default_rng((size, depth, k)).integers(0, span, 1 << 16) * ALIGN
        done = nbytes = 0
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            off = int(offs[done % offs.shape[0]])
            if not direct:
                os.posix_fadvise(fd, off, size, os.POSIX_FADV_DONTNEED)
            nbytes += os.preadv(fd, [buf], off)
            done += 1
        return done, nbytes

    t0 = time.perf_counter()
    with ThreadPoolExecutor(depth) as pool:
        results = list(pool.map(worker, range(depth)))
    dt = time.perf_counter() - t0
    reads = sum(r[0] for r in results)
    nbytes = sum(r[1] for r in results)
    return ProbeRow(size, depth, nbytes / dt / 1e6, reads / dt, direct)


def pick_read_size(rows: list[ProbeRow], share: float = 0.8) -> int:
    """The smallest read size that reaches `share` of the best throughput seen at the
    deepest queue: larger reads only waste bytes once the disk is saturated."""
    if not rows:
        return 1 << 20
    depth = max(r.depth for r in rows)
    at = {r.read_size: r.mb_s for r in rows if r.depth == depth}
    best = max(at.values())
    return min(s for s, v in at.items() if v >= share * best)


def pick_gap(rows: list[ProbeRow], depth: int = 8) -> int:
    """The largest gap worth reading through to merge two reads: what one more small
    read costs, in bytes of streaming (bandwidth / small-read IOPS), at the queue
    depth nearest `depth`. 32 KiB without a probe."""
    if not rows:
        return DEFAULT_GAP
    d = min({r.depth for r in rows}, key=lambda x: abs(x - depth))
    at = [r for r in rows if r.depth == d]
    small = min(at, key=lambda r: r.read_size)
    if small.iops <= 0:
        return DEFAULT_GAP
    return int(max(r.mb_s for r in at) * 1e6 / small.iops) // ALIGN * ALIGN or ALIGN


DEFAULT_GAP = 32 << 10


def probe_file() -> str:
    from ..paths import home

    return str(home() / "disk-probe.json")


def save_probe(rows: list[ProbeRow]) -> str:
    """Keep the curve where the loader looks for it (the cache folder)."""
    import json
    from dataclasses import asdict

    path = probe_file()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump([asdict(r) for r in rows], f, indent=1)
    return path


def load_probe() -> list[ProbeRow]:
    """The saved curve, or [] if `flashlm probe-disk` has not run (or its file is bad)."""
    import json

    try:
        with open(probe_file()) as f:
            rows = [ProbeRow(**r) for r in json.load(f)]
        return [r for r in rows if r.iops > 0 and r.mb_s > 0]
    except (OSError, ValueError, TypeError, AttributeError):
        return []


def format_probe(rows: list[ProbeRow]) -> str:
    depths = sorted({r.depth for r in rows})
    by = {(r.read_size, r.depth): r for r in rows}
    mode = "direct I/O" if rows and rows[0].direct else "buffered reads with dropped pages (no direct I/O here)"
    lines = [f"random reads, {mode}: MB/s (IOPS)",
             "| read size | " + " | ".join(f"depth {d}" for d in depths) + " |",
             "|---:|" + "---:|" * len(depths)]
    for size in sorted({r.read_size for r in rows}):
        cells = [f"{by[(size, d)].mb_s:.0f} ({by[(size, d)].iops:.0f})" for d in depths]
        lines.append(f"| {size >> 10} KiB | " + " | ".join(cells) + " |")
    lines.append(f"\nflashload reads in chunks of {pick_read_size(rows) >> 10} KiB on this disk "
                 "(the smallest size within 80% of the best throughput), and merges reads less than "
                 f"{pick_gap(rows) >> 10} KiB apart (one more read costs as much as streaming that gap).")
    return "\n".join(lines)
