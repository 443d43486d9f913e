"""The one memory planner: how a budget is divided between what every model keeps and
the cache of streamed weights.

    resident weights   everything not streamed (mapped, touched every token)
    predictor          a flash layout's sparsity predictor (the gate, or low-rank factors)
    KV cache           n_ctx positions in the cache type (f16, q8_0, q4_0), for each
                       sequence decoded at once
    prompt cache       keys and values kept for later prompts (the server's --cache-ram)
    buffers            compute and I/O buffers, logits, the tokenizer's tables (measured
                       as it loads), and slack for the allocator
    the cache          the rest: neuron windows (flashload) or expert slots (experts);
                       none for a resident model
    spill buffer       what a token reads beyond the cache (neuron windows)

Each streaming strategy says how its cache fills a share of the budget (a `CacheSizing`);
the planner does the rest, and refuses a budget below the minimum, naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..errors import FlashLMError
from ..units import format_size

SLACK = 4 << 20  # what the allocator and page faults add beyond the planned arrays (measured: a few MiB)


class CacheSizing(Protocol):
    name: str  # "neuron window", "expert cache"
    least: int  # its bytes at the minimum budget
    least_what: str  # what that holds, for the error ("one layer's neurons for a token")
    everything: int  # bytes that hold every streamed weight

    def fit(self, room: int) -> dict:
        """The plan's cache fields for `room` bytes (at least `least`)."""


@dataclass
class MemoryPlan:
    """How a budget is divided (`Model.plan`): see the module's docstring."""

    budget: int
    resident: int
    kv: int
    buffers: int
    minimum: int
    full: int  # a budget that holds every streamed weight
    predictor: int = 0
    cache: str = ""  # what the cache is: "neuron window", "expert cache"; "" when nothing streams
    cache_bytes: int = 0
    spill: int = 0  # the buffer for what one token reads beyond the windows
    holds: str = ""  # what the cache holds, one line
    # neuron windows (flashload): neurons each layer's window holds, neurons per layer, bytes a held neuron takes
    capacities: list[int] = field(default_factory=list)
    layer_ff: list[int] = field(default_factory=list)
    per_neuron: list[int] = field(default_factory=list)
    # the expert cache (experts): experts it holds, of how many, and one slot's bytes
    n_slots: int = 0
    n_experts: int = 0
    expert_bytes: int = 0
    sequences: int = 1  # KV caches in `kv` (sequences decoded together)
    prompt_cache: int = 0
    draft: int = 0  # a speculative draft model, resident (its weights and KV cache)
    kv_type: str = "f16"  # the KV cache's type(s): "q8_0", or "K q8_0, V f16"

    @property
    def fixed(self) -> int:
        """Everything but the cache and the spill buffer."""
        return self.resident + self.predictor + self.kv + self.prompt_cache + self.draft + self.buffers

    @property
    def n_ff(self) -> int:
        """Neurons in all layers (neuron windows)."""
        return sum(self.layer_ff)

    def as_dict(self) -> dict:
        """The plan's figures (for the profile's JSON)."""
        return {k: v for k, v in vars(self).items() if not isinstance(v, list)}

    def table(self) -> str:
        """The plan as `flashlm info` prints it."""
        kv = f"KV cache {self.kv_type}" + ("" if self.sequences == 1 else f" ({self.sequences} seq)")
        rows = [("resident weights", self.resident), ("predictor", self.predictor), (kv, self.kv),
                ("prompt cache", self.prompt_cache), ("draft model", self.draft), ("buffers, tokenizer", self.buffers)]
        if self.cache:
            rows.append((self.cache, self.cache_bytes))
        if self.spill:
            rows.append(("spill buffer", self.spill))
        rows = [(n, b) for n, b in rows if b or n not in ("predictor", "prompt cache", "draft model")]
        out = [f"memory plan for a budget of {format_size(self.budget)} (minimum {format_size(self.minimum)}):"]
        out += [f"  {name:<18} {format_size(n):>10}" for name, n in rows]
        left = self.budget - self.fixed - self.cache_bytes - self.spill
        out.append(f"  {'left over':<18} {format_size(left):>10}")
        if self.holds:
            out.append(f"  {self.holds}")
        return "\n".join(out)


def plan_budget(budget: int, n_ctx: int, *, resident: int, kv: int, buffers: int, predictor: int = 0,
                sizing: CacheSizing | None = None, advice: str = "raise the budget or lower n_ctx",
                sequences: int = 1, prompt_cache: int = 0, draft: int = 0, kv_type: str = "f16") -> MemoryPlan:
    """Divide `budget` bytes; FlashLMError naming the minimum when it is below (with
    `advice`: what the user can do). kv: one sequence's KV cache (of kv_type, its
    name); `sequences` of them."""
    kv *= sequences
    fixed = resident + predictor + kv + prompt_cache + draft + buffers
    least = sizing.least if sizing is not None else 0
    minimum = fixed + least
    if budget < minimum:
        what = f", {sizing.least_what}" if sizing is not None else ""
        seqs = f" x {sequences} sequences" if sequences > 1 else ""
        pc = f", prompt cache {format_size(prompt_cache)}" if prompt_cache else ""
        pc += f", draft model {format_size(draft)}" if draft else ""
        raise FlashLMError(f"memory budget {format_size(budget)} is below the minimum {format_size(minimum)} for this "
                           f"model at n_ctx={n_ctx}{seqs} (resident weights {format_size(resident)}, KV cache "
                           f"{format_size(kv)} at {kv_type}{pc}{what}); {advice}")
    extra = dict(sequences=sequences, prompt_cache=prompt_cache, draft=draft, kv_type=kv_type)
    if sizing is None:
        return MemoryPlan(budget, resident, kv, buffers, minimum, fixed, predictor, **extra,
                          holds="every weight resident (`flashlm convert --flash OUT` makes a layout whose FFN streams)")
    return MemoryPlan(budget, resident, kv, buffers, minimum, fixed + sizing.everything, predictor, cache=sizing.name,
                      **extra, **sizing.fit(budget - fixed))
