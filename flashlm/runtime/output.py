"""What a generation hands its caller: Chunks of text, cut at stop strings and never in
the middle of a character. One sequence's way from logits to text (Sequence), shared by
Model.stream and the batched engine (batch.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..stats import TokenStats


@dataclass(frozen=True)
class Chunk:
    """One piece of streamed output. The last chunk has finish_reason set (and may be
    empty text): "stop" (end-of-generation token, stop string, or a finished grammar),
    "length" (max_tokens or a full context) or "cancelled"."""
    text: str
    token: int | None
    finish_reason: str | None
    n_prompt: int  # prompt tokens
    n_generated: int  # tokens generated so far
    tokens_per_second: float  # generation speed so far
    prompt_tokens_per_second: float  # prefill speed of this request
    stats: TokenStats | None = None  # the forward passes since the last chunk (TokenStats.total of them)
    n_cached: int = 0  # prompt tokens whose keys and values were reused, not computed
    logprobs: tuple = ()  # with logprobs asked for: one TokenLogprob per token this chunk's text came from
    speculation: object = None  # the last chunk of a speculative generation: its speculate.SpecStats


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of its logits,
    before sampling settings) and the `top` most likely tokens' ((token, logprob), ...)."""
    token: int
    logprob: float
    top: tuple = ()


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    z = logits.astype(np.float64)
    z -= z.max()
    lp = z - np.log(np.exp(z).sum())
    best = ()
    if top:
        idx = np.argpartition(-lp, top - 1)[:top]
        idx = idx[np.argsort(-lp[idx], kind="stable")]
        best = tuple((int(i), float(lp[i])) for i in idx)
    return TokenLogprob(int(token), float(lp[token]), best)


class TextOut:
    """A sequence's text as its tokens arrive. push(token) returns the text now safe to
    show: not an incomplete UTF-8 character, not a tail that may begin a stop string,
    nothing from a stop string on (then `stopped` is set). flush() returns what was held
    back once no more tokens come."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.tokens: list[int] = []
        self.emitted = 0  # characters of the decoded text already shown
        self.stopped = False

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        cut = _find_stop(text, self.stops, self.emitted)
        if cut is not None:
            piece = text[self.emitted:cut]
            self.emitted, self.stopped = len(text), True  # nothing after the stop string is shown
            return piece
        safe = _safe_end(text, self.stops)
        if safe <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted:safe], safe
        return piece

    def flush(self) -> str:
        if self.stopped or not self.tokens:
            return ""
        text = self.tokenizer.decode(self.tokens)
        piece, self.emitted = text[self.emitted:], max(self.emitted, len(text))
        return piece


class Sequence:
    """One generation's state between forward passes: advance(logits) masks them by the
    grammar, samples the next token, and returns the text now safe to show; `finish` is
    set ("stop" or "length") once the sequence has ended, and the token it returned
    then is not to be run."""

    def __init__(self, tokenizer, prompt: list[int], sampler, stops: list[str], max_tokens: int, n_ctx: int,
                 grammar=None, logprobs: int | None = None):
        self.prompt, self.sampler, self.max_tokens, self.n_ctx = prompt, sampler, max_tokens, n_ctx
        self.eog = tokenizer.eog_ids
        self.out = TextOut(tokenizer, stops)
        self.matcher = grammar.matcher() if grammar is not None else None
        self.logprobs = logprobs  # None, or how many alternatives each token's TokenLogprob lists
        self.pending: list[TokenLogprob] = []  # of tokens whose text is not shown yet
        self.finish: str | None = None
        self.t_first = None
        self.tps = 0.0  # decode speed: tokens after the first over the time since it

    @property
    def generated(self) -> list[int]:
        return self.out.tokens

    def advance(self, logits: np.ndarray, draft: int | None = None) -> tuple[str, int | None]:
        """The next token from logits (n_vocab,), changed in place by the grammar's mask:
        (text to show now, the token), or ("", None) at an end-of-generation token.
        draft: the token a draft source proposed there (speculate.py; the sampler keeps
        or replaces it so that the token is distributed as without one)."""
        raw = logits.copy() if self.logprobs is not None and self.matcher is not None else logits
        if self.matcher is not None:
            self.matcher.mask(logits)
        tok = self.sampler(logits, self.prompt + self.generated, draft)
        if tok in self.eog:
            self.finish = "stop"
            return "", None
        if self.logprobs is not None:  # under the model: before the grammar and the sampling settings
            self.pending.append(token_logprob(raw, tok, self.logprobs))
        if self.matcher is not None:
            self.matcher.accept(tok)
        piece = self.out.push(tok)
        now = time.perf_counter()
        if self.t_first is None:
            self.t_first = now
        else:
            self.tps = (len(self.generated) - 1) / max(now - self.t_first, 1e-9)
        if self.out.stopped or (self.matcher is not None and self.matcher.done):
            self.finish = "stop"
        elif len(self.generated) >= self.max_tokens or len(self.prompt) + len(self.generated) >= self.n_ctx:
            self.finish = "length"
        return piece, tok

    def take_logprobs(self) -> tuple:
        out, self.pending = tuple(self.pending), []
        return out


def _find_stop(text: str, stops: list[str], emitted: int) -> int | None:
    """Index where the earliest stop string starts in text (searching new text only)."""
    best = None
    for s in stops:
        i = text.find(s, max(0, emitted - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _safe_end(text: str, stops: list[str]) -> int:
    """How much of text can be shown: not an incomplete UTF-8 character, and not a tail
    that might be the start of a stop string."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[end - k:end] == s[:k]:
                hold = max(hold, k)
                break
    return end - hold
