"""Memory under a budget: the one planner (plan.py) that divides a budget between what
every model keeps and the cache of streamed weights, and the byte-budgeted slot cache
with its eviction policies (slots.py)."""

from .plan import SLACK, MemoryPlan, plan_budget  # noqa: F401
from .slots import DECAY, POLICIES, SlotCache  # noqa: F401
