"""The memory plan: how a memory budget is divided for a streamed (flash-layout) model.

    resident weights   everything but the FFN records: embeddings, attention, norms,
                       output (mapped, touched every token)
    predictor          the resident gate ("gate") or the low-rank factors ("lowrank")
    KV cache           n_ctx positions at float16
    buffers            prefill's chunk of records and its products, I/O staging, logits,
                       the tokenizer's tables (measured as it loads), and some slack
    neuron window      the rest: each layer's window holds what its share buys
    spill buffer       when the windows cannot hold one token's neurons (keep x n_ff a
                       layer), what they lack is read each token into one buffer the
                       layers share

The minimum is a budget with no window at all: every token reads all its neurons, one
layer at a time, into the spill buffer. Below it, loading fails with an error that
names the minimum. Budgets between that and one holding a token's neurons in every
window hold part of them and read the rest each token.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FlashLMError
from ..units import format_size

PREFILL_NEURONS = 512  # neurons per prefill chunk (store._dense)
SLACK = 4 << 20  # what the allocator and page faults add beyond the planned arrays (measured: a few MiB)


@dataclass
class MemoryPlan:
    """How a budget is divided for a streamed model (`Model.plan`; see the module's docstring)."""

    budget: int
    resident: int
    predictor: int
    kv: int
    buffers: int  # compute and I/O buffers, the tokenizer's tables
    window: int  # bytes for the neuron windows, all layers
    spill: int  # bytes of the spill buffer (0 when the windows hold a token's neurons)
    capacities: list[int]  # neurons each layer's window holds
    layer_ff: list[int]  # neurons in each layer
    per_neuron: list[int]  # bytes a held neuron takes, per layer
    minimum: int

    @property
    def n_ff(self) -> int:
        """Neurons in all layers."""
        return sum(self.layer_ff)

    @property
    def fixed(self) -> int:
        """Everything but the neuron windows and the spill buffer."""
        return self.resident + self.predictor + self.kv + self.buffers

    @property
    def full(self) -> int:
        """A budget whose windows hold every neuron."""
        return self.fixed + sum(p * n for p, n in zip(self.per_neuron, self.layer_ff))

    def table(self) -> str:
        rows = [("resident weights", self.resident), ("predictor", self.predictor), ("KV cache", self.kv),
                ("buffers, tokenizer", self.buffers), ("neuron window", self.window), ("spill buffer", self.spill)]
        out = [f"memory plan for a budget of {format_size(self.budget)} (minimum {format_size(self.minimum)}):"]
        out += [f"  {name:<17} {format_size(n):>10}" for name, n in rows]
        out.append(f"  window holds {sum(self.capacities):,} neurons over {len(self.capacities)} layers "
                   f"of {self.n_ff:,} ({sum(self.capacities) / self.n_ff:.0%}; up to {max(self.capacities):,} a layer)")
        return "\n".join(out)


def make_plan(store, budget: int, n_ctx: int, kv_bytes_per_token_f16: int, n_vocab: int,
              tokenizer: int = 0) -> MemoryPlan:
    """Divide `budget` bytes for FlashStore `store` (its settings pick the predictor and
    keep). FlashLMError naming the minimum if the budget is below it."""
    s = store.settings
    plans = store.plans
    per = [store.held_bytes(lb) for lb in plans]
    resident, predictor = store.resident_bytes, store.predictor_bytes
    kv = n_ctx * kv_bytes_per_token_f16
    biggest = max(plans, key=lambda lb: lb.bundle_bytes * lb.n_ff)
    chunk = min(PREFILL_NEURONS, biggest.n_ff)
    engine = store.engine
    staging = engine.n_threads * engine.max_read if engine is not None else 0
    buffers = (chunk * (2 * biggest.bundle_bytes + biggest.gate_bytes + biggest.up_bytes + 4 * biggest.n_embd)
               + staging  # prefill's chunk: read, split, down rows in float; the I/O threads' staging
               + 24 * sum(lb.n_ff for lb in plans)  # the windows' neuron tables
               + 4 * n_vocab * 2)  # logits
    buffers += tokenizer  # the tokenizer's tables, measured at load
    buffers += SLACK + resident // 100  # allocator slack, and pages faulted in around the mapped weights
    need = store.needs()
    fixed = resident + predictor + kv + buffers
    # no window: the spill buffer takes a layer's needs (with hot windows, a layer's records)
    minimum = fixed + store.spill_bytes([0] * len(plans))
    if budget < minimum:
        raise FlashLMError(f"memory budget {format_size(budget)} is below the minimum {format_size(minimum)} for this "
                           f"model at n_ctx={n_ctx} (resident weights {format_size(resident)}, KV cache "
                           f"{format_size(kv)}, one layer's neurons for a token); raise the budget, lower n_ctx or keep")
    room = budget - fixed
    total_ff = sum(lb.n_ff for lb in plans)

    def cost(caps):
        return sum(c * p for c, p in zip(caps, per)) + store.spill_bytes(caps)

    if s.window == 0:  # nothing kept between tokens
        caps = [0] * len(plans)
    elif store.hot and cost([lb.n_ff for lb in plans]) <= room:  # every neuron held: no tails
        caps = [lb.n_ff for lb in plans]
    elif store.hot:  # each window holds its layer's first share f of neurons; the buffer takes a tail
        caps = _largest_share([lb.n_ff for lb in plans], cost, room)
    elif room >= sum(n * p for n, p in zip(need, per)):  # every window holds a token's neurons, and more
        caps = [min(lb.n_ff, max(n, room * lb.n_ff // total_ff // p)) for lb, n, p in zip(plans, need, per)]
    else:  # windows hold a share f of each layer's needs; the spill buffer reads the rest each token
        caps = _largest_share(need, cost, room)
    spill = store.spill_bytes(caps)
    held = sum(c * p for c, p in zip(caps, per))
    return MemoryPlan(budget, resident, predictor, kv, buffers, held, spill, caps, [lb.n_ff for lb in plans], per,
                      minimum)


def _largest_share(sizes: list[int], cost, room: int) -> list[int]:
    """Capacities int(f * size) for the largest share f whose cost fits in room (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        f = (lo + hi) / 2
        lo, hi = (f, hi) if cost([int(f * n) for n in sizes]) <= room else (lo, f)
    return [int(lo * n) for n in sizes]
