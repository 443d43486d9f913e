"""Per-pass statistics (flashlm.TokenStats): on each Chunk and from Model.take_stats()."""

from conftest import cosine_rows

import flashlm
from flashlm import TokenStats


def test_every_pass_is_counted_once(smollm2):
    smollm2.take_stats()
    prompt = "The capital of France is"
    chunks = list(smollm2.stream(prompt, max_tokens=5, temperature=0))
    passes = smollm2.take_stats()
    n_prompt = len(smollm2.tokenize(prompt))
    prefill = [p for p in passes if p.prefill]
    decode = [p for p in passes if not p.prefill]
    assert sum(p.tokens for p in prefill) == n_prompt and all(p.tokens == 1 for p in decode)
    generated = chunks[-1].n_generated
    assert len(decode) == generated - 1  # the last token's logits are never needed
    assert all(p.seconds > 0 and 0 < p.compute_s <= p.seconds and p.rss > 50 << 20 for p in passes)
    # resident: nothing read, no hits to count
    assert all(p.bytes_read == 0 and p.window_hit_rate is None and p.expert_hit_rate is None for p in passes)
    # each chunk carries the passes since the one before; together, every pass
    from_chunks = TokenStats.total(c.stats for c in chunks if c.stats is not None)
    every = TokenStats.total(passes)
    assert from_chunks.tokens == every.tokens and abs(from_chunks.seconds - every.seconds) < 1e-9
    assert smollm2.take_stats() == []  # taken: start afresh


def test_totals_add_counts_and_keep_the_peak_rss():
    a = TokenStats(tokens=1, bytes_read=10, neurons_needed=4, neuron_hits=3, rss=5)
    b = TokenStats(tokens=2, prefill=True, bytes_read=5, neurons_needed=4, neuron_hits=1, rss=9)
    t = TokenStats.total([a, b])
    assert (t.tokens, t.bytes_read, t.rss, t.prefill) == (3, 15, 9, True)
    assert t.window_hit_rate == 0.5 and t.expert_hit_rate is None


def test_eval_and_reset_run_the_kv_cache_token_by_token(smollm2):
    tokens = smollm2.tokenize("The capital of France is")
    smollm2.reset()
    whole = smollm2.eval(tokens)
    smollm2.reset()
    smollm2.eval(tokens[:-1])
    last = smollm2.eval(tokens[-1:])  # the same position, as a decode step after a shorter prefill
    # (the decode step sums in another order: tests/runtime/test_decode.py holds the two paths together)
    assert cosine_rows(whole[None], last[None])[0] >= 0.99
    assert int(whole.argmax()) == int(last.argmax())
    smollm2.reset()
    assert whole.shape == (smollm2.config.n_vocab,)


def test_layout_says_what_streams(smollm2):
    assert smollm2.layout == "every weight resident (mapped)" and smollm2.expert_prefetch is None
    assert isinstance(flashlm.TokenStats(), TokenStats)
