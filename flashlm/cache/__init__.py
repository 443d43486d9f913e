"""A byte-budgeted cache of equal-sized items in one preallocated pool, with a selectable
eviction policy. The MoE expert store keeps experts in it (an expert's gate, up and
down slices side by side in one slot).

Policies (what is evicted when a new item needs a slot):
    lru    the least recently used item
    lfu    the least frequently used (uses counted since the item was last loaded)
    score  the lowest score, an exponential moving average of a per-item signal the
           caller observes (for experts: the router's probability each token, as
           HybriMoE's score cache), kept for items not cached too

Items in use (pinned) are never evicted: the caller pins what a step still needs.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from ..errors import InvalidArgumentError
from ..flashload.io import aligned_empty

POLICIES = ("lru", "lfu", "score")


class SlotCache:
    """n_slots slots of item_bytes each; keys are any hashable (an expert: (layer, e))."""

    def __init__(self, n_slots: int, item_bytes: int, policy: str = "lru", decay: float = 0.9):
        if policy not in POLICIES:
            raise InvalidArgumentError(f"unknown cache policy {policy!r}; choose from {', '.join(POLICIES)}")
        if n_slots < 1:
            raise InvalidArgumentError("a cache needs at least one slot")
        self.policy, self.decay = policy, decay
        self.item_bytes = item_bytes
        self.pool = aligned_empty(n_slots * item_bytes).reshape(n_slots, item_bytes)
        self.slot_of: dict = {}
        self.key_in = [None] * n_slots
        self.free = list(range(n_slots - 1, -1, -1))
        self.last = np.zeros(n_slots, dtype=np.int64)  # tick of the last use
        self.uses = np.zeros(n_slots, dtype=np.int64)  # uses since loaded
        self.slot_score = np.zeros(n_slots, dtype=np.float64)  # score of the key in each slot
        self.score: dict = defaultdict(float)  # EMA of the observed signal, per key
        self.pinned: set[int] = set()
        self.tick = 0

    @property
    def n_slots(self) -> int:
        return self.pool.shape[0]

    def lookup(self, key) -> int | None:
        """The slot holding key (marked used), or None."""
        s = self.slot_of.get(key)
        if s is not None:
            self.tick += 1
            self.last[s] = self.tick
            self.uses[s] += 1
        return s

    def insert(self, key) -> int:
        """A slot for key (not cached), evicting by the policy; the caller fills it."""
        if self.free:
            s = self.free.pop()
        else:
            s = self._victim()
            del self.slot_of[self.key_in[s]]
        self.slot_of[key], self.key_in[s] = s, key
        self.tick += 1
        self.last[s], self.uses[s] = self.tick, 1
        self.slot_score[s] = self.score[key]
        return s

    def _victim(self) -> int:
        """The slot to evict: the lowest key of the policy among slots not pinned; ties go
        to the least recently used."""
        key = self.last if self.policy == "lru" else self.uses if self.policy == "lfu" else self.slot_score
        m = key.astype(np.float64)
        if self.pinned:
            m[list(self.pinned)] = np.inf
        lo = m.min()
        if lo == np.inf:
            raise RuntimeError("every cache slot is pinned: the plan gave fewer slots than one step uses")
        cand = np.flatnonzero(m == lo)
        return int(cand[0]) if len(cand) == 1 else int(cand[np.argmin(self.last[cand])])

    def observe(self, keys, values) -> None:
        """Fold one observation per key into its score (policy "score")."""
        d = self.decay
        for k, v in zip(keys, values.tolist() if isinstance(values, np.ndarray) else values):
            s = self.score[k] = d * self.score[k] + (1.0 - d) * float(v)
            slot = self.slot_of.get(k)
            if slot is not None:
                self.slot_score[slot] = s

    def __contains__(self, key) -> bool:
        return key in self.slot_of
