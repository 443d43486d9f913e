"""How a mixture of experts' expert cache fills its share of a memory budget (the
planner itself is cache/plan.py's, one for every model): everything but the experts
resident, and as many experts as the rest holds, each in a 4 KiB-aligned slot."""

from __future__ import annotations

from ..cache import SLACK, MemoryPlan, plan_budget
from ..units import format_size
from .bundle import part_sizes, record_bytes
from .moe import PARTS


def plan_experts(model_file, cfg, budget: int, n_ctx: int, tokenizer: int, prefetch: bool,
                 io_threads: int = 8, max_read: int = 1 << 20, kv_position: int | None = None,
                 **sequences) -> MemoryPlan:
    """Divide `budget`; FlashLMError naming the minimum (one token's experts in a layer,
    twice that with prefetch) when it is below. sequences: plan_budget's `sequences` and
    `prompt_cache`. kv_position: a KV cache's bytes per position (default: float16's)."""
    stacked = {f"blk.{i}.{p}.weight" for i in range(cfg.n_layer) for p in PARTS}
    resident = sum(t.nbytes for t in model_file.tensors.values() if t.name not in stacked)
    buffers = tokenizer + io_threads * max_read + 8 * cfg.n_vocab + SLACK + resident // 100
    sizing = ExpertSizing(record_bytes(part_sizes(model_file, cfg)), cfg.n_layer * cfg.n_expert,
                          cfg.n_expert_used * (2 if prefetch else 1))
    if kv_position is None:
        kv_position = cfg.kv_bytes_per_token // 2
    return plan_budget(budget, n_ctx, resident=resident, kv=n_ctx * kv_position, buffers=buffers,
                       sizing=sizing, **sequences)


class ExpertSizing:
    """The expert cache's share of a budget (cache.plan.CacheSizing)."""

    name = "expert cache"

    def __init__(self, expert_bytes: int, n_experts: int, least_experts: int):
        self.expert_bytes, self.n_experts = expert_bytes, n_experts  # a cache slot: one bundle record
        self.least = least_experts * expert_bytes
        self.least_what = f"{least_experts} experts of {format_size(expert_bytes)}"
        self.everything = n_experts * expert_bytes

    def fit(self, room: int) -> dict:
        n = min(self.n_experts, room // self.expert_bytes)
        holds = (f"the cache holds {n:,} of {self.n_experts:,} experts ({n / self.n_experts:.0%}), "
                 f"{format_size(self.expert_bytes)} each")
        return dict(cache_bytes=n * self.expert_bytes, holds=holds, n_slots=n, n_experts=self.n_experts,
                    expert_bytes=self.expert_bytes)
