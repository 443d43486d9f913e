"""A byte-budgeted cache of equal-sized items in one preallocated pool, with a selectable
eviction policy. The MoE expert store keeps experts in it (an expert's gate, up and
down slices side by side in one slot; expert e of layer N is key N * n_expert + e).

Policies (what is evicted when a new item needs a slot):
    lru    the least recently used item
    lfu    the least frequently used (uses counted since the item was last loaded)
    score  the lowest score, an exponential moving average of a per-item signal the
           caller observes (for experts: the router's probability each token, as
           HybriMoE's score cache), kept for items not cached too
    freq   the lowest decayed use frequency: the same moving average of whether each
           item was used (for experts: chosen by the router) each step

Items in use (pinned) are never evicted: the caller pins what a step still needs.

Two users: the MoE expert store (above) and flashload's neuron windows, which keep their
rows in arrays of their own (item_bytes 0: the cache only does the bookkeeping), take
what does not fit as spill (`assign(spill=True)`) and drop what the last few tokens did
not use (`expire`), the paper's sliding window.

Keys are integers 0 .. n_keys-1 and the state is a few arrays, so a step's lookups,
evictions and pins run in one compiled call (`assign`): a decode step asks for about
200 experts, and in Python their bookkeeping cost as much as reading them.
"""

from __future__ import annotations

import numba
import numpy as np

from ..errors import InvalidArgumentError
from ..io import aligned_empty

POLICIES = ("lru", "lfu", "score", "freq")
DECAY = {"score": 0.9, "freq": 0.95}  # per step: the moving averages' weight on the past


class SlotCache:
    """n_slots slots of item_bytes each, for integer keys 0 .. n_keys-1."""

    def __init__(self, n_slots: int, item_bytes: int, policy: str = "lru", n_keys: int | None = None,
                 decay: float | None = None):
        """item_bytes 0: no pool, the caller keeps each slot's data (n_slots may be 0 too:
        every key spills)."""
        if policy not in POLICIES:
            raise InvalidArgumentError(f"unknown cache policy {policy!r}; choose from {', '.join(POLICIES)}")
        if n_slots < (1 if item_bytes else 0):
            raise InvalidArgumentError("a cache needs at least one slot")
        self.policy, self.decay = policy, DECAY.get(policy, 0.9) if decay is None else decay
        self._code = POLICIES.index(policy)
        self.item_bytes = item_bytes
        self.pool = (aligned_empty(n_slots * item_bytes, huge=True) if item_bytes
                     else np.empty(0, dtype=np.uint8)).reshape(n_slots, item_bytes)
        n_keys = n_slots if n_keys is None else n_keys
        self.slot_of = np.full(n_keys, -1, dtype=np.int64)  # key -> its slot, or -1
        self.key_in = np.full(n_slots, -1, dtype=np.int64)  # slot -> its key, or -1 (free)
        self.last = np.zeros(n_slots, dtype=np.int64)  # tick of the last use
        self.uses = np.zeros(n_slots, dtype=np.int64)  # uses since loaded
        # EMA of the observed signal, per key (lru and lfu keep none)
        self.score = np.zeros(n_keys if policy in ("score", "freq") else 0, dtype=np.float64)
        self.pinned = np.zeros(n_slots, dtype=np.bool_)
        self._tick = np.zeros(1, dtype=np.int64)

    @property
    def n_slots(self) -> int:
        return self.pool.shape[0]

    @property
    def n_held(self) -> int:
        return int((self.key_in >= 0).sum())

    @property
    def tick(self) -> int:
        """The use clock: every use and every load advances it (see `expire`)."""
        return int(self._tick[0])

    def assign(self, keys: np.ndarray, pin: bool = True, only_absent: bool = False,
               spill: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """For each key: its slot (marked used) if cached, else a slot evicted by the
        policy for the caller to fill (the cached keys are looked up first: no miss
        evicts a key of the same batch). (slots, missed): int64 slots (-1 where
        only_absent and the key was cached) and whether each key was missing. pin:
        pin every slot returned. When every slot is pinned: with spill, the missing keys
        left get slot -1 (the caller uses them without caching them); else RuntimeError,
        the batch undone. IndexError (nothing changed) for a key outside 0..n_keys-1."""
        keys = np.asarray(keys, dtype=np.int64)
        slots = np.empty(len(keys), dtype=np.int64)
        missed = np.empty(len(keys), dtype=np.bool_)
        was_pinned = np.empty(len(keys), dtype=np.bool_)
        stop = _assign(keys, self.slot_of, self.key_in, self.last, self.uses, self.score, self.pinned, self._tick,
                       self._code, pin, only_absent, slots, missed, was_pinned)
        if stop == -2:
            raise IndexError(f"a key outside 0..{len(self.slot_of) - 1}: {keys.min()}..{keys.max()}")
        if stop >= 0 and not spill:  # undone: the keys it took slots for are not cached, the pins it added released
            for j in range(len(keys) - 1, -1, -1):
                if slots[j] >= 0 and not was_pinned[j]:
                    self.pinned[slots[j]] = False
                if missed[j] and slots[j] >= 0:
                    self.forget(int(keys[j]))
            raise RuntimeError("every cache slot is pinned: the plan gave fewer slots than one step uses")
        return slots, missed

    def expire(self, before: int) -> None:
        """Drop every unpinned key last used before tick `before`."""
        gone = (self.key_in >= 0) & ~self.pinned & (self.last < before)
        self.slot_of[self.key_in[gone]] = -1
        self.key_in[gone] = -1

    def release(self) -> None:
        """Unpin every slot."""
        self.pinned[:] = False

    def clear(self) -> None:
        """Hold nothing."""
        self.slot_of[self.key_in[self.key_in >= 0]] = -1
        self.key_in[:] = -1
        self.pinned[:] = False

    def forget(self, key: int) -> None:
        """Drop key (its slot free and unpinned), as if it had never been cached."""
        s = self.slot_of[key]
        if s >= 0:
            self.slot_of[key], self.key_in[s], self.pinned[s] = -1, -1, False

    def lookup(self, key: int) -> int | None:
        """The slot holding key (marked used), or None."""
        if self.slot_of[key] < 0:
            return None
        return int(self.assign([key], pin=False)[0][0])

    def insert(self, key: int) -> int:
        """A slot for key (not cached), evicting by the policy; the caller fills it."""
        return int(self.assign([key], pin=False, only_absent=True)[0][0])

    def observe(self, first: int, values: np.ndarray) -> None:
        """Fold one observation per key, for keys first, first+1, ..., into their scores."""
        values = np.asarray(values, dtype=np.float64)
        if first < 0 or first + len(values) > len(self.score):
            raise IndexError(f"keys {first}..{first + len(values) - 1} outside 0..{len(self.score) - 1}")
        _observe(self.score, first, values, self.decay)

    def observe_used(self, first: int, n: int, used: np.ndarray) -> None:
        """Fold one step's uses into the scores of keys first .. first+n-1: 1 for the keys
        in `used` (distinct offsets from first; a (T, k) array is T steps in turn), 0 for
        the rest. IndexError (nothing folded in) for keys or uses out of range."""
        used = np.ascontiguousarray(used, dtype=np.int64)  # one compiled variant (prefill's ids are a slice)
        if used.ndim not in (1, 2):
            raise ValueError(f"uses are (k,) or (T, k) offsets, not shape {used.shape}")
        if first < 0 or n < 0 or first + n > len(self.score):
            raise IndexError(f"keys {first}..{first + n - 1} outside 0..{len(self.score) - 1}")
        if not _observe_used(self.score, first, n, used[None] if used.ndim == 1 else used, self.decay):
            raise IndexError(f"a use outside 0..{n - 1} (min {used.min()}, max {used.max()})")

    def observe_step(self, first: int, used: np.ndarray, probs: np.ndarray) -> None:
        """A routing step over keys first .. first+E-1, as the policy scores it: score folds
        in probs (T, E) (their mean over T), freq the uses (T, k) (offsets from first, each
        row in turn); lru and lfu keep no score."""
        if self.policy == "score":
            self.observe(first, probs[0] if probs.shape[0] == 1 else probs.mean(axis=0))
        elif self.policy == "freq":
            self.observe_used(first, probs.shape[1], used)

    def __contains__(self, key: int) -> bool:
        return self.slot_of[key] >= 0


@numba.njit(cache=True, nogil=True)
def _assign(keys, slot_of, key_in, last, uses, score, pinned, tick, policy, pin, only_absent, slots, missed,
            was_pinned):
    """-1; or the index of the key no slot was left for (the keys given no slot have
    slots -1); or -2, nothing changed, for a key outside 0..n_keys-1. was_pinned: each
    slot's pin before this call pinned it (to undo). The cached keys are looked up
    first, then the missing ones take slots in turn: no key of the batch evicts another
    one (with only_absent, the cached ones are held only while the batch is placed)."""
    for i in range(len(keys)):
        if keys[i] < 0 or keys[i] >= len(slot_of):
            return -2
    for i in range(len(keys)):
        slots[i] = -1
        was_pinned[i] = True
        s = slot_of[keys[i]]
        missed[i] = s < 0
        if s < 0:
            continue
        if only_absent:  # not returned, but no miss of the batch evicts it
            was_pinned[i] = pinned[s]
            pinned[s] = True
        else:  # marked used (a call per key here, even inlined, cost 10x the loop: measured)
            tick[0] += 1
            last[s], was_pinned[i], slots[i] = tick[0], pinned[s], s
            uses[s] += 1
            pinned[s] |= pin
    stop = -1
    # the slots the misses take, best first: sorted once for many misses, else found by a scan each
    order = np.empty(0, dtype=np.int64)
    nxt, sort = 0, missed.sum() > 8
    taken = np.zeros(len(key_in) if not sort else 0, dtype=np.bool_)
    for i in range(len(keys)):
        if not missed[i]:
            continue
        k = keys[i]
        if slot_of[k] >= 0:  # the same key twice in one batch: its first copy took the slot
            missed[i] = False
            if not only_absent:
                s = slot_of[k]
                tick[0] += 1
                last[s], was_pinned[i], slots[i] = tick[0], pinned[s], s
                uses[s] += 1
                pinned[s] |= pin
            continue
        tick[0] += 1
        if sort:
            if nxt == 0 and len(order) == 0:
                order = _eviction_order(key_in, last, uses, score, pinned, policy)
            s = order[nxt] if nxt < len(order) else -1
            nxt += 1
        else:
            s = _victim(key_in, last, uses, score, pinned, taken, policy)
        if s < 0:
            stop = i
            break
        if not sort:
            taken[s] = True
        if key_in[s] >= 0:
            slot_of[key_in[s]] = -1
        slot_of[k], key_in[s] = s, k
        last[s], uses[s] = tick[0], 1
        was_pinned[i] = pinned[s]
        if pin:
            pinned[s] = True
        slots[i] = s
    if only_absent:  # the cached keys' holds released
        for i in range(len(keys)):
            if not missed[i] and slots[i] < 0 and not was_pinned[i]:
                pinned[slot_of[keys[i]]] = False
    return stop


@numba.njit(cache=True, nogil=True)
def _victim(key_in, last, uses, score, pinned, taken, policy):
    """The first slot `_eviction_order` would give, among those not taken: -1 if none."""
    s, best, best_last = -1, np.inf, 0
    for j in range(len(key_in)):
        if taken[j]:
            continue
        if key_in[j] < 0:
            return j
        if pinned[j]:
            continue
        v = last[j] if policy == 0 else uses[j] if policy == 1 else score[key_in[j]]
        if v < best or (v == best and last[j] < best_last):
            s, best, best_last = j, v, last[j]
    return s


@numba.njit(cache=True, nogil=True)
def _eviction_order(key_in, last, uses, score, pinned, policy):
    """The slots a batch's misses take, in turn: the free ones (by index), then the
    unpinned ones by the policy's value, lowest first (ties: least recently used, then
    by index). One order serves a whole batch: each slot is taken once, so no miss
    evicts a key the same batch placed."""
    n = len(key_in)
    free = np.empty(n, dtype=np.int64)
    held = np.empty(n, dtype=np.int64)
    nf = nh = 0
    for j in range(n):
        if key_in[j] < 0:
            free[nf] = j
            nf += 1
        elif not pinned[j]:
            held[nh] = j
            nh += 1
    held = held[:nh]
    v = np.empty(nh, dtype=np.float64)
    lst = np.empty(nh, dtype=np.int64)
    for a in range(nh):
        j = held[a]
        lst[a] = last[j]
        v[a] = last[j] if policy == 0 else uses[j] if policy == 1 else score[key_in[j]]
    by_last = np.argsort(lst, kind="mergesort")  # stable sorts: value, then last use, then index
    held = held[by_last][np.argsort(v[by_last], kind="mergesort")]
    out = np.empty(nf + nh, dtype=np.int64)
    out[:nf] = free[:nf]
    out[nf:] = held
    return out


@numba.njit(cache=True, nogil=True)
def _observe(score, first, values, decay):
    for i in range(len(values)):
        score[first + i] = score[first + i] * decay + (1.0 - decay) * np.float64(values[i])


@numba.njit(cache=True, nogil=True)
def _observe_used(score, first, n, used, decay):
    """False (nothing changed) if a use is outside 0..n-1."""
    for e in used.ravel():
        if e < 0 or e >= n:
            return False
    for t in range(used.shape[0]):
        for i in range(n):
            score[first + i] *= decay
        for e in used[t]:
            score[first + e] += 1.0 - decay
    return True
