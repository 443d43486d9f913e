"""2,000 tokens, resident and streamed: memory stays flat but for the KV cache (slow)."""

import numpy as np
import pytest

import flashlm

N = 2000


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("streamed", [False, True])
def test_two_thousand_tokens_grow_no_memory_but_the_kv_cache(smollm2_path, flash_files, streamed):
    path, budget = (flash_files["smollm2"], 1 << 40) if streamed else (smollm2_path, None)
    if streamed:  # half the FFN records held: the rest stream every token
        with flashlm.load(path, n_ctx=N + 48, n_threads=2, memory_budget=budget) as m:
            budget = m.plan.fixed + (m.plan.full - m.plan.fixed) // 2
    with flashlm.load(path, n_ctx=N + 48, n_threads=2, memory_budget=budget) as m:
        kv_f16 = m.config.kv_bytes_per_token // 2  # the cache holds keys and values in float16
        logits = m.eval(m.tokenize("Once upon a time"))
        rss = {}
        for i in range(N):
            logits = m.eval([int(np.argmax(logits))])
            if i % 100 == 99:
                rss[i + 1] = m.take_stats()[-1].rss
        assert all(r > 0 for r in rss.values())
        # up to token 1,100 the KV cache doubles its room (256 .. 2,048 positions), and the
        # allocator may keep the buffers it outgrew (512 + 1,024 positions): that, and 16 MiB
        assert max(rss[k] for k in rss if k <= 1100) - rss[200] <= kv_f16 * (2048 + 1536) + (16 << 20), rss
        # from token 1,100 it has room to the end: nothing may grow but a few MiB of noise
        assert max(rss[k] for k in rss if k >= 1100) - rss[1100] <= 8 << 20, rss
