"""Whether prefetching experts pays on this machine, measured while decoding.

Prefetch reads the next layer's predicted experts while a layer computes. What it hides
is the misses' read latency; what it costs is the prediction, a second submission in most
layers and the reads of the experts predicted wrongly. Which wins depends on the disk,
the experts' size, the cache's size and the model's routing (benchmarks/README.md has
the figures that showed it going both ways). So by default (prefetch "auto") the store times its decode
steps with prefetch on and off, in alternating windows of tokens, keeps whichever was
faster, and measures again HOLD tokens after each decision (the routing and the cache
drift along a long generation).

    auto = AutoPrefetch()
    on = auto.record(seconds)   # after each decoded token (the time of its layers, from the
                                # first router on): whether to prefetch for the next one

The windows go in ABBA order (on, off, off, on, on, off, ...) so that a slow drift
(the context growing, the cache filling) weighs on both sides alike. Each side's figure
is the median of its tokens' times, leaving out the first SETTLE tokens of each window
(the cache as the other side left it) and the first WARM tokens of all. It decides after
PAIRS pairs of windows, or after two when one side is EARLY times faster.
"""

from __future__ import annotations

import statistics


class AutoPrefetch:
    WINDOW = 8  # tokens per window
    SETTLE = 2  # of each window's tokens, the first ones are not counted (the other side's cache)
    WARM = 8  # tokens not counted before the first measurement (compiling, the cache after the prompt)
    PAIRS = 6  # pairs of windows (one on, one off) before deciding: 96 tokens
    EARLY = 1.25  # decide after two pairs when one side is this much faster
    HOLD = 1024  # tokens from a decision to the next measurement

    def __init__(self):
        self.on = True
        self.ratio = None  # the last measurement: median time per token with prefetch / without
        self.measurements = 0
        self.tokens = 0  # tokens recorded
        self._warm = self.WARM
        self._measure()

    @property
    def measuring(self) -> bool:
        return self._times is not None

    def _measure(self) -> None:
        self._times = {True: [], False: []}
        self._first = self.on  # window 0's side: ABBA from it
        self._n = 0  # tokens of this measurement (or since the decision)

    def record(self, seconds: float) -> bool:
        """One decoded token took `seconds` with prefetch self.on: whether to prefetch for
        the next one."""
        self.tokens += 1
        if self._warm:
            self._warm -= 1
            return self.on
        self._n += 1
        if self._times is None:  # holding a decision
            if self._n >= self.HOLD:
                self._measure()
            return self.on
        if (self._n - 1) % self.WINDOW >= self.SETTLE:
            self._times[self.on].append(seconds)
        if self._n % self.WINDOW:
            return self.on
        window = self._n // self.WINDOW  # windows done
        if window % 2 == 0:  # a pair done
            on, off = (statistics.median(self._times[s]) for s in (True, False))
            r = on / off
            pairs = window // 2
            if pairs >= self.PAIRS or (pairs >= 2 and not 1 / self.EARLY < r < self.EARLY):
                self.ratio, self.on = r, r < 1.0  # a tie: off (fewer reads)
                self.measurements += 1
                self._times, self._n = None, 0
                return self.on
        # ABBA: window w's side is the first side when w % 4 is 0 or 3
        self.on = self._first if window % 4 in (0, 3) else not self._first
        return self.on

    def describe(self) -> str:
        if self.ratio is None:
            return "auto (measuring)"
        state = "on" if self.on else "off"
        return f"auto: {state} (a token's layers took {self.ratio:.2f}x as long with it as without)" + (
            ", measuring again" if self.measuring else "")
