"""Routing traces of a mixture-of-experts model, and an offline cache simulator.

    trace = record(model, tokens)            # decode token by token, routing kept
    save(trace, "t.npz"); trace = load("t.npz")
    simulate(trace, n_slots, "lru")          # -> hit rate of that cache on that trace

A trace holds, per decoded token and layer, the chosen experts (T, L, k) and the
router's probabilities (T, L, E). The simulator replays it through the same SlotCache
the expert store uses (a layer's cached chosen experts pinned before its misses take
slots, all of them while it runs; scores fed the probabilities (score) or the choices
(freq)), so the policy it picks is the one the runtime has.
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
        model._prefill(model._ctx, tokens[:prefix])
        ids.clear(), probs.clear()  # a one-token prefill routes like a decode step: not part of the trace
        for pos, t in enumerate(tokens[prefix:], start=prefix):
            model._forward(np.array([t]), pos, model._ctx.kv)
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
    T, L, k = trace.ids.shape
    E = trace.probs.shape[2]
    cache = SlotCache(n_slots, 1, policy, n_keys=L * E)
    hits = misses = 0
    for t in range(T):
        for layer in range(L):
            keys = trace.ids[t, layer] + layer * E
            cache.observe_step(layer * E, trace.ids[t, layer:layer + 1], trace.probs[t, layer:layer + 1])
            slots, missed = cache.assign(keys, pin=True)  # pinned while the layer runs (no miss evicts its hits)
            cache.pinned[slots] = False
            if t >= warmup:
                n = int(np.count_nonzero(missed))
                misses += n
                hits += k - n
    return hits / max(1, hits + misses)


def belady(trace: Trace, n_slots: int, warmup: int = 0) -> float:
    """The hit rate no policy can beat: Belady's offline optimum, which evicts the expert
    used again furthest in the future (a layer's chosen experts held while it runs)."""
    import heapq

    T, L, k = trace.ids.shape
    E = trace.probs.shape[2]
    keys = (trace.ids + (np.arange(L) * E)[None, :, None]).reshape(-1).tolist()
    step = np.repeat(np.arange(T * L), k).tolist()  # accesses of one layer and token share a step
    never = len(keys) + 1
    nxt, seen = [never] * len(keys), {}
    for i in range(len(keys) - 1, -1, -1):
        nxt[i], seen[keys[i]] = seen.get(keys[i], never), i
    held: dict[int, int] = {}  # key -> its next use
    used_at: dict[int, int] = {}  # key -> the step of its last use
    heap: list = []  # (-next use, key), stale entries skipped
    hits = misses = 0
    for i, key in enumerate(keys):
        counted = step[i] // L >= warmup
        if key in held:
            hits += counted
        else:
            misses += counted
            if len(held) >= n_slots:
                skipped = []
                while True:  # the furthest next use, not of this step (those are pinned)
                    use, victim = heapq.heappop(heap)
                    if held.get(victim) != -use:
                        continue  # stale
                    if used_at[victim] != step[i]:
                        break
                    skipped.append((use, victim))
                for item in skipped:
                    heapq.heappush(heap, item)
                del held[victim]
        held[key], used_at[key] = nxt[i], step[i]
        heapq.heappush(heap, (-nxt[i], key))
    return hits / max(1, hits + misses)
