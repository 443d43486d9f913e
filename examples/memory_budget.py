"""Run a model whose FFN streams from disk, under a memory budget, and see what it read.

    python examples/memory_budget.py [BUDGET]      (default 140MiB)

Converts the default model to the flash layout once (into the cache folder, again
after an upgrade that changed the layout), then generates with its FFN neurons read from disk as the tokens need them.
"""

import sys

import flashlm
from flashlm import TokenStats
from flashlm.runtime.convert import cached

flash = cached("smollm2-135m")

budget = sys.argv[1] if len(sys.argv) > 1 else "140MiB"
with flashlm.load(flash, n_ctx=256, memory_budget=budget, streaming={"keep": 0.8, "window": 16}) as model:
    print(model.plan.table())
    print(model.generate("The history of the city begins", max_tokens=24, temperature=0))
    passes = model.take_stats()  # one TokenStats per forward pass
    every, decode = TokenStats.total(passes), TokenStats.total(p for p in passes if not p.prefill)
    print(f"read {every.bytes_read / 1e6:.1f} MB from disk in {every.reads} reads; "
          f"window hit rate while decoding {decode.window_hit_rate:.0%}")
