"""TokenStats: what one forward pass of a model did, the one statistics type that the
CLI, the chat TUI, the profile and embedding programs read (`Chunk.stats`,
`Model.take_stats()`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields


@dataclass
class TokenStats:
    """One forward pass: a decoded token (tokens == 1, prefill False) or a prefill chunk.
    Streamed models fill the disk and hit figures; a resident model's are 0."""

    tokens: int = 0  # tokens in the pass
    prefill: bool = False  # a prompt's pass (its logits feed the first generated token)
    seconds: float = 0.0  # wall time of the pass
    compute_s: float = 0.0  # seconds - io_wait_s - bookkeeping_s - verify_s
    io_wait_s: float = 0.0  # waiting for reads from disk (FFN neurons or experts)
    bookkeeping_s: float = 0.0  # window and cache updates, range lists, copies
    verify_s: float = 0.0  # checking the checksums of the records read
    bytes_read: int = 0  # from the disk: aligned reads, gaps of coalesced reads included
    bytes_requested: int = 0  # bytes of the weights asked for
    reads: int = 0  # read requests issued
    neurons_needed: int = 0  # FFN neurons a token's predictor chose (flash layout)
    neuron_hits: int = 0  # of those, already in the window
    experts_needed: int = 0  # experts the router chose (mixture of experts under a budget)
    expert_hits: int = 0  # of those, already in the expert cache
    prefetched: int = 0  # experts read ahead for a layer
    prefetch_used: int = 0  # of those, chosen by its router
    prefetch_chosen: int = 0  # experts chosen in layers with a prefetch (recall's denominator)
    rss: int = 0  # the process's resident memory after the pass, bytes

    @property
    def window_hit_rate(self) -> float | None:
        """Share of the neurons needed that the windows held (None: nothing streamed)."""
        return self.neuron_hits / self.neurons_needed if self.neurons_needed else None

    @property
    def expert_hit_rate(self) -> float | None:
        """Share of the experts chosen that the cache held (None: no expert cache)."""
        return self.expert_hits / self.experts_needed if self.experts_needed else None

    @property
    def prefetch_precision(self) -> float | None:
        return self.prefetch_used / self.prefetched if self.prefetched else None

    @property
    def prefetch_recall(self) -> float | None:
        return self.prefetch_used / self.prefetch_chosen if self.prefetch_chosen else None

    @property
    def mean_read(self) -> float:
        """Mean bytes per read."""
        return self.bytes_read / self.reads if self.reads else 0.0

    def add(self, other: "TokenStats") -> "TokenStats":
        """Add other's counts and times into this one (rss: the larger); returns self."""
        for f in _SUMMED:
            setattr(self, f, getattr(self, f) + getattr(other, f))
        self.rss = max(self.rss, other.rss)
        self.prefill = self.prefill or other.prefill
        return self

    @classmethod
    def total(cls, passes) -> "TokenStats":
        """The sum of several passes (rss: the peak)."""
        out = cls()
        for p in passes:
            out.add(p)
        return out


_SUMMED = tuple(f.name for f in fields(TokenStats) if f.name not in ("prefill", "rss"))


class RSSReader:
    """This process's resident memory, read cheaply enough for every token (/proc/self/statm,
    several times faster than psutil). Falls back to psutil where there is no /proc."""

    def __init__(self):
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        try:
            self._fd = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._fd = -1

    def __call__(self) -> int:
        if self._fd >= 0:
            return int(os.pread(self._fd, 96, 0).split()[1]) * self._page
        import psutil

        return psutil.Process().memory_info().rss

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
