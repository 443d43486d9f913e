"""The one memory planner (cache/plan.py): every strategy's plan is divided by it."""

import pytest

from flashlm.cache import plan_budget
from flashlm.errors import FlashLMError

MIB = 1 << 20


class Slots:
    """A cache of equal slots, the simplest sizing."""

    name = "test cache"
    least_what = "two slots"

    def __init__(self, slot: int, n: int):
        self.slot, self.n = slot, n
        self.least, self.everything = 2 * slot, n * slot

    def fit(self, room):
        k = min(self.n, room // self.slot)
        return dict(cache_bytes=k * self.slot, holds=f"{k} of {self.n} slots", n_slots=k)


def test_a_budget_is_the_fixed_parts_plus_what_the_cache_holds():
    p = plan_budget(100 * MIB, 256, resident=40 * MIB, kv=10 * MIB, buffers=5 * MIB, predictor=3 * MIB,
                    sizing=Slots(4 * MIB, 20))
    assert p.fixed == 58 * MIB and p.minimum == 66 * MIB and p.full == 138 * MIB
    assert p.n_slots == 10 and p.cache_bytes == 40 * MIB and p.cache == "test cache"
    table = p.table()
    for line in ("resident weights", "predictor", "KV cache", "buffers, tokenizer", "test cache", "left over",
                 "10 of 20 slots"):
        assert line in table
    assert p.as_dict()["n_slots"] == 10


def test_below_the_minimum_the_error_names_it_and_what_to_do():
    with pytest.raises(FlashLMError) as e:
        plan_budget(60 * MIB, 512, resident=40 * MIB, kv=10 * MIB, buffers=5 * MIB, sizing=Slots(4 * MIB, 20),
                    advice="raise the budget")
    msg = str(e.value)
    assert "below the minimum 63.0 MiB" in msg and "n_ctx=512" in msg and "two slots" in msg
    assert msg.endswith("raise the budget") and "\n" not in msg


def test_a_resident_plan_has_no_cache():
    p = plan_budget(100 * MIB, 64, resident=40 * MIB, kv=10 * MIB, buffers=5 * MIB)
    assert p.minimum == p.full == p.fixed == 55 * MIB and p.cache_bytes == 0 and not p.cache
    assert "every weight resident" in p.table() and "predictor" not in p.table()
    with pytest.raises(FlashLMError, match="below the minimum"):
        plan_budget(50 * MIB, 64, resident=40 * MIB, kv=10 * MIB, buffers=5 * MIB)
