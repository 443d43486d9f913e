"""Speculative decoding: a cheap source drafts the next few tokens, and the model checks
them all in one forward pass (Model._verify: each weight, and each streamed neuron or
expert, read once for all of them), keeping the longest prefix it agrees with.

Greedy decoding keeps exactly the tokens it would have picked one by one: the pass
computes each row as a decode step does, bit for bit. Sampling keeps a drafted token
with probability min(1, p/q) and otherwise draws from norm(max(0, p - q)) (sampler.py),
so the output is distributed as the model's own draws (Leviathan et al., 2023).

Draft sources (`--draft`, `speculative=`):

    ngram        prompt lookup: the continuation of the latest earlier occurrence of
                 the context's last n tokens (n from 4 down to 1); no model
    model:PATH   a small model with the same vocabulary, resident, greedy
    self         a streamed model computed only from what is in memory: the hot
                 windows' neurons, the cached experts; no reads

Draft lengths adapt to the acceptance (`draft_max`, `draft_min`), and speculation turns
itself off for a while when its tokens come slower than plain decoding's (measured on
this machine, as the expert prefetch's `auto` mode does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidArgumentError

SOURCES = ("ngram", "model:PATH", "self")


@dataclass
class SpecStats:
    """What speculation did over a generation (or a model's life): verification passes,
    tokens drafted and accepted, tokens the passes produced, and bytes streamed by them."""
    passes: int = 0
    drafted: int = 0
    accepted: int = 0
    produced: int = 0  # tokens the verification passes produced: accepted drafts + one each
    bytes_read: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.produced / self.passes if self.passes else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_read / self.produced if self.produced else 0.0

    def describe(self) -> str:
        if not self.passes:
            return "speculation: no verification pass"
        s = (f"speculation: {self.drafted} drafted, {self.accepted} accepted ({self.acceptance:.0%}), "
             f"{self.tokens_per_pass:.2f} tokens per pass")
        if self.bytes_read:
            s += f", {self.bytes_per_token / 2**20:.2f} MiB read per token"
        return s


class NgramDraft:
    """Prompt lookup (llama.cpp's `--spec-type ngram`, transformers' prompt_lookup): the
    tokens that followed the latest earlier occurrence of the context's last n tokens,
    for the longest n from n_max down to n_min that occurs. (n_min 2: one token's
    matches in free text are mostly chance, and each costs a wasted pass: measured,
    benchmarks/README.md.)"""

    name = "ngram"

    def __init__(self, n_max: int = 4, n_min: int = 2):
        self.n_max, self.n_min = n_max, n_min

    def propose(self, tokens: list[int], k: int, ctx=None) -> list[int]:
        arr = np.asarray(tokens, dtype=np.int64)
        L = len(arr)
        for n in range(min(self.n_max, L - 1), self.n_min - 1, -1):
            key = arr[L - n:]
            # starts j < L - n of earlier occurrences, each followed by at least one token
            win = np.lib.stride_tricks.sliding_window_view(arr[:L - 1], n)
            hits = np.flatnonzero((win == key).all(axis=1))
            if len(hits):
                j = int(hits[-1]) + n
                return arr[j:j + k].tolist()
        return []

    def close(self):
        pass


class ModelDraft:
    """A small model with the target's vocabulary drafts greedily, from a KV cache of its
    own (reusing the prefix it shares with the context: rejected drafts are recomputed)."""

    def __init__(self, draft, target_tokenizer, path: str):
        from .blocks import Context

        self.model, self.name = draft, f"model:{path}"
        check_vocab(draft.tokenizer, target_tokenizer, path)
        self.ctx = Context(draft.model.kv_cache(draft.n_ctx))

    def propose(self, tokens: list[int], k: int, ctx=None) -> list[int]:
        m = self.model
        k = min(k, m.n_ctx - len(tokens))
        if k <= 0:  # past the draft's context: no drafts
            return []
        with m._exclusive():
            logits, _ = m._prefill(self.ctx, list(tokens), reuse_any=True)
            out = []
            for _ in range(k):
                out.append(int(np.argmax(logits)))
                if len(out) == k:
                    break
                logits = m._extend(self.ctx, [out[-1]], [0])
        return out

    def close(self):
        self.model.close()


class SelfDraft:
    """The model itself, computed from what its streamed weights hold in memory (no
    reads): its decode steps run at the positions to be verified, in the model's own KV
    cache, which the verification pass then overwrites with the exact keys and values."""

    name = "self"

    def __init__(self, model):
        self.model = model
        self.sources = [s for s in model._streams if hasattr(s, "memory_only")]
        if not self.sources:
            raise InvalidArgumentError("draft 'self' needs a streamed model (a flash layout or experts under a "
                                       "memory budget); use 'ngram' or 'model:PATH' for one held in memory")

    def propose(self, tokens: list[int], k: int, ctx=None) -> list[int]:
        m = self.model
        pos = len(ctx.tokens)
        k = min(k, m.n_ctx - pos - 1)
        out, tok = [], tokens[-1]
        for s in self.sources:
            s.memory_only = True
        try:
            for i in range(k):
                logits = m.model.forward(np.array([tok]), pos + i, ctx.kv)
                tok = int(np.argmax(logits[0]))
                out.append(tok)
        finally:
            for s in self.sources:
                s.memory_only = False
                s.take_pass()  # what the draft steps did is not the model's pass
        return out

    def close(self):
        pass


def accept(seq, rows, drafts: list[int], emit) -> tuple[int, int | None]:
    """Advance seq (an output.Sequence) over a verification pass's rows of logits, row t
    checking drafts[t]: a token per row until one differs from its draft (the row after
    the last draft always does) or the sequence ends; emit(text, token) for each whose
    text is due. (accepted drafts, the last token sampled: the next to run, or None)."""
    for i, row in enumerate(rows):
        draft = drafts[i] if i < len(drafts) else None
        piece, tok = seq.advance(row, draft)
        if piece or seq.out.stopped:
            emit(piece, tok)
        if seq.finish or tok != draft:
            return i, tok
    raise AssertionError("the row after the last draft has no draft to match")


def check_vocab(draft_tok, target_tok, path) -> None:
    """InvalidArgumentError unless the draft's vocabulary is the target's, token by token."""
    if draft_tok.n_vocab != target_tok.n_vocab:
        raise InvalidArgumentError(f"draft model {path} has a vocabulary of {draft_tok.n_vocab} tokens, the model "
                                   f"{target_tok.n_vocab}: a draft model must share the model's vocabulary")
    for i in range(draft_tok.n_vocab):
        if _piece(draft_tok, i) != _piece(target_tok, i):
            raise InvalidArgumentError(f"draft model {path} differs from the model at token {i} "
                                       f"({_piece(draft_tok, i)!r} against {_piece(target_tok, i)!r}): a draft "
                                       "model must share the model's vocabulary")


def _piece(tok, i: int) -> bytes:
    if hasattr(tok, "piece"):
        return tok.piece(i, special=True)
    return tok.decode([i], skip_special=False).encode()


@dataclass
class Speculation:
    """How a model speculates: `source` ("ngram", "model:PATH" or "self"), draft lengths
    draft_min..draft_max, and `adaptive` (turn off while it does not pay)."""
    source: str
    draft_max: int = 8
    draft_min: int = 1
    adaptive: bool = True
    drafter: object = field(default=None, repr=False)

    @staticmethod
    def parse(spec) -> Speculation | None:
        """None, a source string, a dict of Speculation's fields, or a Speculation."""
        if spec is None or spec is False or spec == "":
            return None
        if isinstance(spec, Speculation):
            return spec
        if isinstance(spec, str):
            spec = {"source": spec}
        if not isinstance(spec, dict):
            raise InvalidArgumentError(f"speculative must be a draft source ({', '.join(SOURCES)}) or a dict, "
                                       f"got {spec!r}")
        unknown = set(spec) - {"source", "draft_max", "draft_min", "adaptive"}
        if unknown:
            raise InvalidArgumentError(f"unknown speculative setting(s): {', '.join(sorted(unknown))}")
        s = Speculation(**spec)
        src = s.source
        if not isinstance(src, str) or not (src in ("ngram", "self") or (src.startswith("model:") and len(src) > 6)):
            raise InvalidArgumentError(f"unknown draft source {src!r}; choose from {', '.join(SOURCES)}")
        if not (isinstance(s.draft_max, int) and isinstance(s.draft_min, int) and 1 <= s.draft_min <= s.draft_max
                <= 64):
            raise InvalidArgumentError(f"draft lengths need 1 <= draft_min <= draft_max <= 64, got {s.draft_min} "
                                       f"and {s.draft_max}")
        return s


class Adaptive:
    """The draft length and whether to speculate at all, from what this generation
    measured: k starts at 4 (a rejected long draft costs a pass of k + 1 rows for one
    token), grows by 2 while whole drafts are accepted and halves when the first
    drafted token is rejected; speculation pauses (for 16 tokens, doubling while it
    keeps losing, up to 256) when its seconds per token exceed plain decoding's."""

    def __init__(self, spec: Speculation):
        self.spec = spec
        self.k = max(spec.draft_min, min(spec.draft_max, 4))
        self.plain_s = None  # seconds per token, plain decode steps (an average of the recent ones)
        self.spec_s = None  # seconds per token, speculative rounds
        self.pause, self.backoff = 0, 16

    def speculate(self) -> bool:
        if not self.spec.adaptive:
            return True
        if self.plain_s is None:  # measure plain decoding first
            return False
        if self.pause > 0:
            self.pause -= 1
            return False
        return True

    def plain(self, seconds: float) -> None:
        self.plain_s = seconds if self.plain_s is None else 0.8 * self.plain_s + 0.2 * seconds

    def round(self, drafted: int, accepted: int, seconds: float, produced: int) -> None:
        if accepted == drafted:
            self.k = min(self.spec.draft_max, self.k + 2)
        elif accepted == 0:
            self.k = max(self.spec.draft_min, self.k // 2)
        per = seconds / max(produced, 1)
        self.spec_s = per if self.spec_s is None else 0.7 * self.spec_s + 0.3 * per
        if self.spec.adaptive and self.plain_s is not None and self.spec_s > self.plain_s:
            self.pause, self.backoff = self.backoff, min(256, self.backoff * 2)
            self.spec_s = None  # measured afresh after the pause
        elif self.plain_s is not None and self.spec_s <= self.plain_s:
            self.backoff = 16
