"""How many kernel threads a model uses by default, measured while decoding.

A laptop's cores are seldom all free. A kernel thread whose core another program holds
stalls every parallel region of a token until the scheduler hands the core back: with
one of two cores kept busy, two threads decoded SmolLM2 at 1-2 tok/s where one thread
decoded at 80-120 (benchmarks/bench_load.py). A count fixed at load cannot follow a
browser that starts and stops working. So by default (n_threads=None) the model times its
decode steps and, now and then, tries another thread count (one more or fewer, half or
double) for a few tokens,
keeping whichever was faster. Results do not depend on the count: every kernel splits
work by whole output rows, so each value is computed the same way with any number of
threads (tests/runtime/test_autothreads.py checks the logits bit for bit).

    auto = AutoThreads(max_threads)
    n = auto.n                # threads for the next pass (decode and prefill)
    auto.record(seconds)      # after each decode step run with auto.n threads

A try (a probe) runs PROBE tokens at the other count and compares their median with the
median of the last 3 tokens at the current one: adjacent tokens, so the context's growth
weighs on both alike. A probe that loses waits twice as long before the next try of that
count (up to MAX_GAP tokens), so a count that stalls costs little; one that wins is kept.
When the current count's tokens get SLOWER times slower than just after the last
decision (another program started), a probe runs at once.
"""

from __future__ import annotations

import statistics
from collections import deque


class AutoThreads:
    WARM = 2  # tokens not counted at first (the compiled step's first runs)
    HISTORY = 5  # tokens after a decision whose median is the current count's baseline
    PROBE = 3  # tokens per probe
    ABORT = 1.25  # a probe's first token this much slower than the reference ends it at once
    MARGIN = 0.93  # a probe wins when its median is below this share of the reference
    SLOWER = 1.5  # the current count this much slower than after the last decision: probe now
    GAP = 16  # tokens from a decision to a count's next probe
    MAX_GAP = 256  # a losing count's wait doubles up to this

    def __init__(self, max_threads: int, n: int | None = None):
        self.max = max(1, int(max_threads))
        self.n = min(self.max, n or self.max)
        self.probing = None  # the count being tried, or None
        self._current = self.n  # while probing, the count to go back to
        self.tokens = 0  # decode steps recorded
        self.switches = 0
        self.last_ratio = None  # the last probe's median / the reference's
        self._warm = self.WARM
        self._recent: deque[float] = deque(maxlen=self.HISTORY)
        self._probe_times: list[float] = []
        self._ref = 0.0
        self._baseline = None  # the current count's median just after the last decision
        self._gap = {}
        self._due = {}
        self._decided()
        for c in self._candidates:  # the first try soon: the machine may be busy from the start
            self._due[c] = self.WARM + 3

    def _decided(self) -> None:
        # the counts to try: neighbours, and half and double (a plateau, 8 threads as slow
        # as 7 on 4 free cores, is crossed)
        n = self.n
        self._candidates = sorted({c for c in (n - 1, n + 1, n // 2, 2 * n) if 1 <= c <= self.max} - {n})
        self._recent.clear()
        self._baseline = None
        for c in self._candidates:
            self._gap.setdefault(c, self.GAP)
            self._due[c] = self.tokens + self._gap[c]

    def record(self, seconds: float) -> int:
        """A decode step with self.n threads took `seconds`: the count for the next pass."""
        self.tokens += 1
        if self._warm:
            self._warm -= 1
            return self.n
        if self.probing is not None:
            return self._probe_step(seconds)
        self._recent.append(seconds)
        if len(self._recent) < 3:
            return self.n
        if self._baseline is None and len(self._recent) == self.HISTORY:
            self._baseline = statistics.median(self._recent)
        now = statistics.median(list(self._recent)[-3:])  # the last tokens: what a probe is held against
        slowed = self._baseline is not None and now > self.SLOWER * self._baseline
        due = [c for c in self._candidates if slowed or self.tokens >= self._due[c]]
        if due:
            self.probing = min(due, key=lambda c: self._due[c])
            self._ref, self._probe_times = now, []
            self.n, self._current = self.probing, self.n
        return self.n

    def _probe_step(self, seconds: float) -> int:
        times = self._probe_times
        times.append(seconds)
        if len(times) < self.PROBE and seconds < self.ABORT * self._ref:
            return self.n
        cand, self.probing = self.n, None
        self.last_ratio = statistics.median(times) / self._ref
        if len(times) == self.PROBE and self.last_ratio < self.MARGIN:
            self.switches += 1
            self._gap = {}  # every count gets tried again soon after a change
            self._decided()
            self._recent.extend(times)
            return self.n
        self.n = self._current
        self._gap[cand] = min(self.MAX_GAP, 2 * self._gap.get(cand, self.GAP))
        self._due[cand] = self.tokens + self._gap[cand]
        self._recent.clear()  # the reference restarts after the probe (a cache it disturbed),
        self._baseline = None  # and so does "slower than after the decision"
        return self.n

    def describe(self) -> str:
        """The state, for --stats and the chat footer."""
        s = f"auto: {self.n} of {self.max}"
        return s + (f" (trying {self.probing})" if self.probing is not None else "")
