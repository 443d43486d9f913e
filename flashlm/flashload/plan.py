"""How a flash-layout model's neuron windows fill their share of a memory budget (the
planner itself is cache/plan.py's, one for every model).

    neuron window      each layer's window holds what its share buys
    spill buffer       when the windows cannot hold one token's neurons (keep x n_ff a
                       layer), what they lack is read each token into one buffer the
                       layers share

The minimum is a budget with no window at all: every token reads all its neurons, one
layer at a time, into the spill buffer. Budgets between that and one holding a token's
neurons in every window hold part of them and read the rest each token.
"""

from __future__ import annotations

from ..cache import SLACK, MemoryPlan, plan_budget

PREFILL_NEURONS = 512  # neurons per prefill chunk (store._dense)


def make_plan(store, budget: int, n_ctx: int, kv_bytes_per_position: int, n_vocab: int,
              tokenizer: int = 0, **sequences) -> MemoryPlan:
    """Divide `budget` bytes for FlashStore `store` (its settings pick the predictor and
    keep). FlashLMError naming the minimum if the budget is below it. sequences:
    plan_budget's `sequences` and `prompt_cache`."""
    plans = store.plans
    resident = store.resident_bytes
    biggest = max(plans, key=lambda lb: lb.bundle_bytes * lb.n_ff)
    chunk = min(PREFILL_NEURONS, biggest.n_ff)
    engine = store.engine
    staging = engine.n_threads * engine.max_read if engine is not None else 0
    buffers = (chunk * (2 * biggest.bundle_bytes + biggest.gate_bytes + biggest.up_bytes + 4 * biggest.n_embd)
               + staging  # prefill's chunk: read, split, down rows in float; the I/O threads' staging
               + 41 * sum(lb.n_ff for lb in plans)  # the windows' and spill buffers' slot tables: 8 bytes a
               # neuron each, 25 a row (held and spill rows are at most n_ff)
               + 4 * n_vocab * 2)  # logits
    buffers += tokenizer  # the tokenizer's tables, measured at load
    buffers += SLACK + resident // 100  # allocator slack, and pages faulted in around the mapped weights
    return plan_budget(budget, n_ctx, resident=resident, kv=n_ctx * kv_bytes_per_position, buffers=buffers,
                       predictor=store.predictor_bytes, sizing=NeuronSizing(store),
                       advice="raise the budget, lower -c/n_ctx, or lower --keep", **sequences)


class NeuronSizing:
    """The neuron windows' share of a budget (cache.plan.CacheSizing)."""

    name = "neuron window"
    least_what = "one layer's neurons for a token"

    def __init__(self, store):
        self.store = store
        self.per = [store.held_bytes(lb) for lb in store.plans]
        self.layer_ff = [lb.n_ff for lb in store.plans]
        # no window: the spill buffer takes a layer's needs (with hot windows, a layer's records)
        self.least = store.spill_bytes([0] * len(store.plans))
        self.everything = sum(p * n for p, n in zip(self.per, self.layer_ff))

    def _cost(self, caps) -> int:
        return sum(c * p for c, p in zip(caps, self.per)) + self.store.spill_bytes(caps)

    def fit(self, room: int) -> dict:
        store, per, layer_ff = self.store, self.per, self.layer_ff
        need = store.needs()
        if store.settings.window == 0:  # nothing kept between tokens
            caps = [0] * len(layer_ff)
        elif store.hot and self._cost(layer_ff) <= room:  # every neuron held: no tails
            caps = list(layer_ff)
        elif store.hot:  # each window holds its layer's first share f of neurons; the buffer takes a tail
            caps = _largest_share(layer_ff, self._cost, room)
        elif room >= sum(n * p for n, p in zip(need, per)):  # every window holds a token's neurons, and more
            total_ff = sum(layer_ff)
            caps = [min(n_ff, max(n, room * n_ff // total_ff // p)) for n_ff, n, p in zip(layer_ff, need, per)]
        else:  # windows hold a share f of each layer's needs; the spill buffer reads the rest each token
            caps = _largest_share(need, self._cost, room)
        held = sum(c * p for c, p in zip(caps, per))
        total = sum(layer_ff)
        holds = (f"window holds {sum(caps):,} neurons over {len(caps)} layers of {total:,} "
                 f"({sum(caps) / total:.0%}; up to {max(caps):,} a layer)")
        return dict(cache_bytes=held, spill=store.spill_bytes(caps), holds=holds, capacities=caps,
                    layer_ff=list(layer_ff), per_neuron=per)


def _largest_share(sizes: list[int], cost, room: int) -> list[int]:
    """Capacities int(f * size) for the largest share f whose cost fits in room (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        f = (lo + hi) / 2
        lo, hi = (f, hi) if cost([int(f * n) for n in sizes]) <= room else (lo, f)
    return [int(lo * n) for n in sizes]
