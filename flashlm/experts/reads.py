"""How StreamedExperts (store.py) reads experts into their cache slots, by one of three
means, chosen when the store opens:

- native asynchronous direct reads of bundle records (io/aio.py): submitted, and the
  kernel fills the slots while the layer computes; a pending entry is None;
- without native AIO, posix_fadvise(WILLNEED) hints for prefetches, copied into their
  slots when needed; a pending entry is the record's offset;
- reads on the I/O engine's threads (no bundle, or no direct I/O); a pending entry is
  the set of its reads' futures.

Every record read from the bundle is checked against its xxh3_64 (bundle.py's table)
before its expert is used: a bad miss is read again, once, then a ModelFormatError names
the file, layer and expert (the slot is forgotten: a later call reads it again); a bad
prefetch is forgotten (a miss reads it again, and checks it).

A mixin of StreamedExperts, whose state it uses: cache, cfg, aio, engine, bundle,
_hint_fd, pending, _batches, _queued, _missing, stacks, part_bytes, stats, totals,
wait_s, io_s, verify, _sums."""

from __future__ import annotations

import os
import time

import numpy as np
from xxhash import xxh3_64_intdigest

from ..errors import ModelFormatError
from .bundle import record_offset


class ExpertReads:
    def _drain_misses(self) -> None:
        """Let the kernel finish the misses' reads (interrupted, say): their slots must not
        be given to other experts while it still writes into them."""
        while self.aio is not None and self.aio.in_flight("miss"):
            try:
                self.aio.wait("miss")
            except OSError:
                pass

    def _reap(self, key: int, unpin: bool = True) -> None:
        """Wait for a prefetched expert's read; it becomes an ordinary cached one. A failed
        read forgets it (a miss reads it again)."""
        futs = self.pending.pop(key)
        t0 = time.perf_counter()
        slot = self.cache.slot_of[key]
        try:
            if futs is None:  # an asynchronous read into its slot
                self.aio.wait(key)
            elif isinstance(futs, int):  # hinted: its record is in (or on its way to) the page cache
                rec = self.cache.item_bytes
                if os.preadv(self._hint_fd, [self.cache.pool[slot]], futs) != rec:
                    raise OSError(f"{self.bundle}: short read at offset {futs}; is the file truncated?")
                os.posix_fadvise(self._hint_fd, futs, rec, os.POSIX_FADV_DONTNEED)  # the page cache keeps nothing
            else:
                for f in futs:
                    f.result()
        except (OSError, ModelFormatError):  # (the engine's errors are ModelFormatErrors)
            self.cache.forget(key)
            return
        finally:
            dt = time.perf_counter() - t0
            self.wait_s += dt
            self.totals.io_wait_s += dt
        if slot >= 0 and not self._intact(key, slot):  # a miss reads it again (and checks it)
            self.cache.forget(key)
            return
        if unpin and slot >= 0:
            self.cache.pinned[slot] = False

    def _wait_misses(self) -> None:
        """Wait for the misses' direct reads: a failed one is a ModelFormatError naming the bundle."""
        try:
            self.aio.wait("miss")
        except OSError as e:
            raise ModelFormatError(f"{self.bundle}: {e}; check the disk, or delete the bundle (the next load "
                                   "writes it again)") from e

    def _ranges(self, keys: np.ndarray, slots: np.ndarray) -> tuple[list, list]:
        """The byte ranges of experts (keys, all of one layer) and their slots' buffers to
        read them into: one record each from the bundle, else gate, up and down in turn."""
        pool, rec, n_expert = self.cache.pool, self.cache.item_bytes, self.cfg.n_expert
        if self.bundle is not None:
            ranges = [(self._record(k), rec) for k in keys.tolist()]
            outs = [pool[s] for s in slots.tolist()]
        else:
            ranges, outs = [], []
            for k, s in zip(keys.tolist(), slots.tolist()):
                layer, e = divmod(k, n_expert)
                o = 0
                for t, n in zip(self.stacks[layer], self.part_bytes):
                    ranges.append((t.offset + e * n, n))
                    outs.append(pool[s, o:o + n])
                    o += n
        self._count_reads(int(keys[0]) // n_expert, sum(n for _, n in ranges), len(ranges))
        return ranges, outs

    def _count_reads(self, layer: int, nbytes: int, reads: int) -> None:
        self.stats[layer].bytes_read += nbytes
        self.totals.bytes_read += nbytes
        self.totals.bytes_requested += nbytes
        self.totals.reads += reads

    def _record(self, key: int) -> int:
        """Where expert `key` (layer * n_expert + e) starts in the bundle: records are in key order."""
        return record_offset(0, key, 1, self.cache.item_bytes)

    def _submit_records(self, keys: np.ndarray, slots: np.ndarray, tag) -> None:
        """Start the direct reads of experts keys' bundle records into their slots (native AIO)."""
        rec = self.cache.item_bytes
        self.aio.submit_addrs((keys * rec + self._record(0)).tolist(), rec, (slots * rec + self._pool_addr).tolist(),
                              tag, self.cache.pool)
        self._count_reads(int(keys[0]) // self.cfg.n_expert, rec * len(keys), len(keys))

    def _issue(self, misses=None, wait: bool = True) -> None:
        """Start the queued prefetch reads; misses (keys, slots): first read these, and
        wait for them (wait=False: start them; the prefetch waits for finish_misses)."""
        queued, self._queued = self._queued, None
        if not wait:
            self._queued, queued = queued, None
        try:
            self._start(misses, queued, wait)
        except BaseException:  # the slots hold no expert: forgotten, read again when needed
            self._drain_misses()
            for group in (misses, queued):
                if group is not None:
                    for k in group[0].tolist():
                        if self.aio is not None and self.aio.in_flight(k):
                            self.pending[k] = None  # its slot stays pinned until its read ends
                            continue
                        self.pending.pop(k, None)
                        self.cache.forget(k)
            raise

    def _start(self, misses, queued, wait: bool = True) -> None:
        if self.aio is not None:
            # the kernel reads the records straight into their slots while the layer
            # computes; no thread of ours wakes when they are done (on 2 cores, reads
            # finished on a thread pool preempted the decode's threads: it cost more than
            # it hid). Prefetches start once the misses are in: the disk shares its
            # bandwidth among the reads it holds, so submitted together, the misses took
            # as long as all of them.
            if misses is not None:
                self._submit_records(*misses, "miss")
                if not wait:
                    self._missing = misses[0]
                    return
                self._wait_misses()
                self._verify(*misses)
            if queued is not None:
                keys = queued[0].tolist()
                self._submit_records(queued[0], queued[1], keys)
                self.pending.update(dict.fromkeys(keys))
            return
        if misses is not None:
            self.engine.read_ranges(*self._ranges(*misses))
            self._verify(*misses)
        if queued is None:
            return
        keys, slots = queued
        if self._hint_fd >= 0:
            # without native asynchronous reads, the kernel reads the records ahead into
            # the page cache (posix_fadvise WILLNEED); the layer copies them into their
            # slots and drops the pages
            rec = self.cache.item_bytes
            for k in keys.tolist():
                off = self._record(k)
                os.posix_fadvise(self._hint_fd, off, rec, os.POSIX_FADV_WILLNEED)
                self.pending[k] = off
            self._count_reads(int(keys[0]) // self.cfg.n_expert, len(keys) * rec, len(keys))
            return
        t0 = time.perf_counter()
        futs = self.engine.submit(*self._ranges(keys, slots))
        per = len(futs) // len(keys)  # ranges per expert
        for i, k in enumerate(keys.tolist()):  # each expert waits for the reads of its ranges
            self.pending[k] = set(futs[per * i:per * (i + 1)])
        self._batches.append((t0, set(futs)))

    def _settle(self) -> None:
        """Unpin the prefetched experts whose asynchronous reads have ended (without waiting)."""
        if self.aio is None:
            return
        for key, err in self.aio.finished():
            if key in self.pending:
                del self.pending[key]
                slot = self.cache.slot_of[key]
                if err is not None or (slot >= 0 and not self._intact(key, slot)):
                    self.cache.forget(key)  # its slot holds no expert: read again if needed
                elif slot >= 0:
                    self.cache.pinned[slot] = False

    def _intact(self, key: int, slot: int) -> bool:
        """Whether slot holds expert key's record as its checksum says (True unless verifying)."""
        return not self.verify or xxh3_64_intdigest(self.cache.pool[slot]) == self._sums[key]

    def _verify(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Check the records just read into slots (misses): a bad one is read again, once,
        then ModelFormatError (the caller forgets the misses)."""
        if not self.verify:
            return
        bad = [(k, s) for k, s in zip(keys.tolist(), slots.tolist()) if not self._intact(k, s)]
        if not bad:
            return
        rec, pool = self.cache.item_bytes, self.cache.pool
        self.engine.read_ranges([(self._record(k), rec) for k, _ in bad], [pool[s] for _, s in bad])
        self._count_reads(bad[0][0] // self.cfg.n_expert, rec * len(bad), len(bad))
        for k, s in bad:
            if not self._intact(k, s):
                layer, e = divmod(k, self.cfg.n_expert)
                raise ModelFormatError(
                    f"{self.bundle}: layer {layer}, expert {e}: the record read (twice) does not match its checksum; "
                    "the file is damaged. Delete it: the next load writes it again")

    def _account(self) -> None:
        """Add the wall time of finished prefetch batches to io_s (submit to last read)."""
        keep = []
        for t0, futs in self._batches:
            if all(f.done() for f in futs):
                self.io_s += max(f.result() for f in futs) - t0
            else:
                keep.append((t0, futs))
        self._batches = keep

    # -- internals ----------------------------------------------------------------------
