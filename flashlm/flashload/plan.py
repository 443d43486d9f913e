"""The memory plan: how a memory budget is divided for a streamed (flash-layout) model.

    resident weights   everything but the FFN records: embeddings, attention, norms,
                       output (mapped, touched every token)
    predictor          the resident gate ("gate") or the low-rank factors ("lowrank")
    KV cache           n_ctx positions at float16
    buffers            prefill's chunk of records and its products, I/O staging, logits,
                       the tokenizer's tables (measured as it loads), and some slack
    neuron window      the rest: each layer's window holds what its share buys

The minimum is a budget whose window holds, in every layer, the neurons one token
needs (keep x n_ff). Below it, loading fails with an error that names the minimum.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FlashLMError
from ..units import format_size
from .predictor import n_keep

PREFILL_NEURONS = 512  # neurons per prefill chunk (store._dense)
SLACK = 4 << 20  # what the allocator and page faults add beyond the planned arrays (measured: a few MiB)


@dataclass
class MemoryPlan:
    budget: int
    resident: int
    predictor: int
    kv: int
    buffers: int  # compute and I/O buffers, the tokenizer's tables
    window: int  # bytes for the neuron windows, all layers
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
        """Everything but the neuron window."""
        return self.resident + self.predictor + self.kv + self.buffers

    @property
    def full(self) -> int:
        """A budget whose windows hold every neuron."""
        return self.fixed + sum(p * n for p, n in zip(self.per_neuron, self.layer_ff))

    def table(self) -> str:
        rows = [("resident weights", self.resident), ("predictor", self.predictor), ("KV cache", self.kv),
                ("buffers, tokenizer", self.buffers), ("neuron window", self.window)]
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
    keep = s.keep if s.predictor else 1.0
    need = [n_keep(keep, lb.n_ff) for lb in plans]
    fixed = resident + predictor + kv + buffers
    if s.window == 0:  # nothing kept between tokens: one layer's neurons at a time, in a shared buffer
        minimum = fixed + max(n * p for n, p in zip(need, per))
    else:
        minimum = fixed + sum(n * p for n, p in zip(need, per))
    if budget < minimum:
        raise FlashLMError(f"memory budget {format_size(budget)} is below the minimum {format_size(minimum)} for this "
                           f"model at n_ctx={n_ctx} (resident weights {format_size(resident)}, KV cache "
                           f"{format_size(kv)}, one token's neurons); raise the budget, lower n_ctx or keep")
    window = budget - fixed
    total_ff = sum(lb.n_ff for lb in plans)
    if s.window == 0:
        caps = need
        held = minimum - fixed
    else:
        caps = [min(lb.n_ff, max(n, window * lb.n_ff // total_ff // p)) for lb, n, p in zip(plans, need, per)]
        held = sum(c * p for c, p in zip(caps, per))
    return MemoryPlan(budget, resident, predictor, kv, buffers, held, caps, [lb.n_ff for lb in plans], per, minimum)
