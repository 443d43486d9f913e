"""The slot cache and its eviction policies (cache/slots.py)."""

import numpy as np
import pytest

from flashlm.cache import SlotCache


def test_slot_cache_policies():
    a, b, c_, d, e = range(5)

    def fill(policy):
        c = SlotCache(3, 8, policy, n_keys=5)
        for k in (a, b, c_):
            c.insert(k)
        return c

    c = fill("lru")
    c.lookup(a)
    assert c.key_in[c.insert(d)] == d and b not in c  # b: least recently used
    c = fill("lfu")
    c.lookup(a), c.lookup(a), c.lookup(c_)
    c.insert(d)
    assert b not in c and {a, c_, d} == set(c.key_in.tolist())  # b: used least
    c = fill("score")
    c.observe(0, [0.9, 0.5, 0.1])
    c.insert(d)
    assert c_ not in c  # c: lowest router-probability average
    c.pinned[c.slot_of[b]] = True
    c.observe(0, [0.0, 0.0, 0.0, 1.0])
    c.insert(e)
    assert b in c and a not in c  # pinned b survives though its score is lowest
    slots, missed = c.assign([b, e, c_], pin=True)  # a batch: hits, then a miss evicting the lowest unpinned
    assert missed.tolist() == [False, False, True] and c.key_in[slots[2]] == c_ and d not in c
    with pytest.raises(RuntimeError, match="pinned"):
        c.assign([a])  # every slot pinned
    c.pinned[c.slot_of[c_]] = False
    with pytest.raises(RuntimeError, match="pinned"):
        c.assign([a, d])  # a takes c's slot, then d finds none: undone, a not cached and nothing newly pinned
    assert a not in c and c_ not in c and c.pinned.sum() == 2
    c.pinned[:] = False
    c.insert(d)  # full again: b, e, d
    slots, missed = c.assign([a, b, e], pin=True)  # the miss comes first, yet evicts d, not e (lowest score, cached)
    assert missed.tolist() == [True, False, False] and d not in c and {a, b, e} == set(c.key_in.tolist())
    assert c.pinned.sum() == 3
    c.pinned[:] = False
    slots, missed = c.assign([d, e], pin=True, only_absent=True)  # a prefetch: d evicts a or b, never e
    assert missed.tolist() == [True, False] and slots[1] == -1 and e in c and d in c
    assert c.pinned.tolist().count(True) == 1 and c.pinned[c.slot_of[d]]  # only the new one stays pinned
    before = (c.slot_of.copy(), c.pinned.copy())
    with pytest.raises(IndexError):
        c.assign([d, 5])  # a key past n_keys: an error, not a write out of bounds, and nothing changed
    assert (c.slot_of == before[0]).all() and (c.pinned == before[1]).all()
    with pytest.raises(IndexError):
        c.observe(3, [0.5, 0.5, 0.5])
    c = fill("freq")  # a decayed count of uses: recent uses weigh more than old ones
    assert c.decay == 0.95
    c.observe_used(0, 3, [[a], [a], [a]])
    c.observe_used(0, 3, [b, c_])
    np.testing.assert_allclose(c.score[:3], [0.05 * (0.95 ** 3 + 0.95 ** 2 + 0.95), 0.05, 0.05])
    c.observe_used(0, 3, [[c_]] * 10)
    c.insert(d)
    # b: the lowest decayed count (a's 3 older uses outweigh b's 1)
    assert b not in c and {a, c_, d} == set(c.key_in.tolist())
    before = c.score.copy()
    for first, n, used in ((3, 3, [0]), (0, 3, [3]), (0, 3, [-1])):  # keys past n_keys, uses outside the range
        with pytest.raises(IndexError):
            c.observe_used(first, n, used)
    with pytest.raises(IndexError):
        c.observe_used(0, 3, [[0], [3]])  # the second step's use is out of range: the first is not folded in either
    assert (c.score == before).all()  # nothing folded in
    assert SlotCache(1, 8, "score").decay == 0.9 and SlotCache(1, 8, "freq", decay=0.5).decay == 0.5
