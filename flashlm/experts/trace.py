"""Routing traces of a mixture-of-experts model, and an offline cache simulator.

    trace = record(model, tokens)            # decode token by token, routing kept
    save(trace, "t.npz"); trace = load("t.npz")
    simulate(trace, n_slots, "lru")          # -> hit rate of that cache on that trace

A trace holds, per decoded token and layer, the chosen experts (T, L, k) and the
router's probabilities (T, L, E). The simulator replays it through the same SlotCache
the expert store uses (a layer's chosen experts pinned while it runs, scores fed the
probabilities), so the policy it picks is the one the runtime has.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..cache import SlotCache


@dataclass
class Trace:
    ids: np.ndarray  # (T, L, k) int
    probs: np.ndarray  # (T, L, E) float32

    @property
    def n_layer(self) -> int:
        return self.ids.shape[1]


def record(model, tokens: list[int], prefix: int = 1) -> Trace:
    """Decode tokens[prefix:] one at a time after a prefill of tokens[:prefix] (teacher
    forcing), recording each token's routing in every layer."""
    lm, cfg = model.model, model.config
    ids, probs = [], []

    def on_route(layer, chosen, w, p):
        if chosen.shape[0] == 1:
            ids.append(chosen[0].copy())
            probs.append(p[0].astype(np.float32))

    prev, lm.on_route = lm.on_route, on_route
    try:
        model._prefill(tokens[:prefix])
        ids.clear(), probs.clear()  # a one-token prefill routes like a decode step: not part of the trace
        for pos, t in enumerate(tokens[prefix:], start=prefix):
            model._forward(np.array([t]), pos, model._kv)
    finally:
        lm.on_route = prev
    L = cfg.n_layer
    return Trace(np.array(ids, dtype=np.int64).reshape(-1, L, cfg.n_expert_used),
                 np.array(probs, dtype=np.float32).reshape(-1, L, cfg.n_expert))


def save(trace: Trace, path) -> None:
    np.savez_compressed(path, ids=trace.ids, probs=trace.probs)


def load(path) -> Trace:
    with np.load(path) as f:
        return Trace(f["ids"], f["probs"])


def simulate(trace: Trace, n_slots: int, policy: str, warmup: int = 0) -> float:
    """Hit rate of a cache of n_slots experts under `policy` on the trace (tokens after
    the first `warmup` counted)."""
    cache = SlotCache(n_slots, 1, policy)
    hits = misses = 0
    T, L, _ = trace.ids.shape
    for t in range(T):
        for layer in range(L):
            chosen = trace.ids[t, layer].tolist()
            if policy == "score":
                cache.observe([(layer, e) for e in range(trace.probs.shape[2])], trace.probs[t, layer])
            pins = set()
            for e in chosen:
                s = cache.lookup((layer, e))
                if s is None:
                    s = cache.insert((layer, e))
                    misses += t >= warmup
                else:
                    hits += t >= warmup
                pins.add(s)
                cache.pinned.add(s)
            cache.pinned -= pins
    return hits / max(1, hits + misses)
