"""Sampling the next token from logits: greedy, temperature, top-k, top-p, min-p,
repeat penalty, seeded. The order is llama.cpp's: penalties, top-k, top-p, min-p,
temperature, then a draw."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is picked, llama.cpp's settings and defaults; checked on creation
    (InvalidArgumentError names the bad one)."""

    temperature: float = 0.8  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1 = off
    min_p: float = 0.05  # 0 = off
    repeat_penalty: float = 1.0  # 1 = off
    repeat_last_n: int = 64  # tokens the penalty looks back over
    seed: int | None = None  # None (or -1, llama.cpp's way) = a fresh random seed

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
            (self.seed is None or (isinstance(self.seed, (int, np.integer)) and self.seed >= -1),
             "seed must be an integer >= 0, or -1 for a random one"),
        ]
        for ok, msg in checks:
            if not ok:
                raise InvalidArgumentError(f"invalid sampling setting: {msg}")


class Sampler:
    """Picks tokens from logits as SamplingParams says: repeat penalty, then greedy at
    temperature 0, else top-k, top-p, min-p and a draw at the temperature."""

    def __init__(self, params: SamplingParams):
        self.p = params
        self.rng = np.random.default_rng(None if params.seed == -1 else params.seed)

    def __call__(self, logits: np.ndarray, history: list[int], draft: int | None = None,
                 q: np.ndarray | None = None) -> int:
        """Pick a token from logits (n_vocab,) float32, given the tokens so far.

        draft: a token a draft source proposed, drawn from its distribution q (n_vocab,)
        (None: it was certain, as a greedy draft's or prompt lookup's). Greedy picks as
        without it. A draw keeps the draft with probability min(1, p/q), else draws from
        norm(max(0, p - q)) (q one-hot: p without the draft): the token is distributed
        as a plain draw (speculative sampling)."""
        p = self.p
        logits = logits.astype(np.float64)
        if p.repeat_penalty != 1.0 and p.repeat_last_n and history:
            recent = np.unique(np.asarray(history[-p.repeat_last_n:]))
            vals = logits[recent]
            logits[recent] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.temperature == 0:
            return int(np.argmax(logits))
        idx, probs = self._distribution(logits)
        if draft is None:
            return int(idx[self.rng.choice(len(idx), p=probs)])
        at = np.flatnonzero(idx == draft)
        p_d = float(probs[at[0]]) if len(at) else 0.0
        q_d = 1.0 if q is None else float(q[draft])
        if p_d > 0 and self.rng.random() < min(1.0, p_d / q_d):
            return int(draft)
        if q is None:
            rest = probs.copy()
            rest[at] = 0.0
        else:
            rest = np.maximum(0.0, probs - np.asarray(q, dtype=np.float64)[idx])
        return int(idx[self.rng.choice(len(idx), p=rest / rest.sum())])

    def _distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The candidates (token ids) and their probabilities after top-k, top-p, min-p and
        the temperature, from penalized float64 logits."""
        p = self.p
        # Candidates sorted by logit, best first.
        k = p.top_k if 0 < p.top_k < logits.size else logits.size
        idx = np.argpartition(-logits, k - 1)[:k] if k < logits.size else np.arange(logits.size)
        idx = idx[np.argsort(-logits[idx], kind="stable")]
        cand = logits[idx]
        probs = np.exp(cand - cand[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            idx, cand, probs = idx[:keep], cand[:keep], probs[:keep]
        if p.min_p > 0:
            keep = probs >= p.min_p * probs[0]
            idx, cand = idx[keep], cand[keep]
        z = cand / p.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        return idx, probs
