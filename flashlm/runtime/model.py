"""The public Model: load a model file, then tokenize, score, generate, stream and chat."""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import kernels_cpu
from ..errors import ContextLengthError, InvalidArgumentError, ModelBusyError
from ..stats import RSSReader, TokenStats
from .autothreads import AutoThreads
from .blocks import Cancelled, KVCache
from .sampler import Sampler, SamplingParams

PREFILL_CHUNK = 128  # tokens per prefill forward pass


@dataclass(frozen=True)
class Chunk:
    """One piece of streamed output. The last chunk has finish_reason set (and may be
    empty text): "stop" (end-of-generation token or stop string), "length"
    (max_tokens or a full context) or "cancelled"."""
    text: str
    token: int | None
    finish_reason: str | None
    n_prompt: int  # prompt tokens
    n_generated: int  # tokens generated so far
    tokens_per_second: float  # generation speed so far
    prompt_tokens_per_second: float  # prefill speed of this request
    stats: TokenStats | None = None  # the forward passes since the last chunk (TokenStats.total of them)


_SAMPLING_KEYS = {f for f in SamplingParams.__dataclass_fields__}


class Model:
    """A loaded model. Use `flashlm.load(...)` to make one (loader.py composes it); close
    it (or use `with`).

    Threads may share a Model: its calls run one at a time (a generation holds the model
    from its first chunk to its last), and a call from a thread whose own generation is
    still open raises ModelBusyError instead of waiting for itself.

    config: the model's ModelConfig; file: its model file; plan: the memory plan under a
    budget (else None); n_ctx; n_threads (now) and threads (how it is chosen); load_seconds."""

    def __init__(self, *, path: Path, config, store, tokenizer, lm, experts, streams: list, plan,
                 memory_budget: int | None, n_ctx: int, threads: int | AutoThreads, load_seconds: float):
        self.path, self.config, self.store, self.tokenizer = path, config, store, tokenizer
        self.file = store.file  # the model file (GGUF or HF folder) its weights map
        self.model = lm  # the architecture's DecoderLM
        self.experts = experts  # a mixture of experts' source (resident or streamed), else None
        self.plan, self.memory_budget = plan, memory_budget
        self.n_ctx, self.load_seconds = n_ctx, load_seconds
        # kernel threads: a count the caller fixed, or chosen while decoding (autothreads.py)
        self.auto_threads = threads if isinstance(threads, AutoThreads) else None
        self._threads = threads if self.auto_threads is None else None
        self._streams = streams  # what streams weights: each pass's reads and hits (take_pass)
        self._passes: deque[TokenStats] = deque(maxlen=100_000)
        self._unreported: list[TokenStats] | None = None  # while streaming: passes since the last Chunk
        self._rss = RSSReader()
        self._kv = KVCache(config, n_ctx)
        self._kv_tokens: list[int] = []  # tokens whose keys/values _kv holds, in order
        self._exact = 0  # leading positions of _kv that a fresh prefill would reproduce bit for bit
        self._lock = threading.Lock()  # one call at a time
        self._owner: int | None = None  # the thread holding it
        self._state = threading.Lock()  # guards _running and the cancel event between threads
        self._running = None  # the generation running, if any
        self._pending: weakref.WeakSet = weakref.WeakSet()  # generations made by stream(), not finished

    # -- basics -------------------------------------------------------------------

    @property
    def n_threads(self) -> int:
        """The kernel threads the next pass runs on."""
        return self._threads or self.auto_threads.n

    @property
    def threads(self) -> str:
        """How the thread count is chosen: "2 (fixed)", or "auto: 1 of 2" while decoding."""
        return f"{self._threads} (fixed)" if self._threads else self.auto_threads.describe()

    @property
    def has_chat_template(self) -> bool:
        """Whether the model's file carries a chat template. A base model's carries none;
        chat() then renders a generic one (tokenizer.py), a format it never learned."""
        return self.tokenizer.template.own

    @property
    def name(self) -> str:
        """The model's name from its metadata (else the file's stem)."""
        return self.config.name or self.path.stem

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of text (with BOS if the model wants one and add_special)."""
        return self.tokenizer.encode(text, add_special=add_special)

    def detokenize(self, tokens: list[int]) -> str:
        """The text of token ids."""
        return self.tokenizer.decode(list(tokens))

    def cancel(self):
        """Stop the running generation, and those made by stream() but not started (from
        any thread; also during prefill). They end with finish_reason "cancelled" and leave
        the model as a fresh one would be. With none, it does nothing."""
        with self._state:
            for g in self._pending:
                g.cancelled = True
            if self._running is not None:
                self.model.cancel_event.set()

    @contextlib.contextmanager
    def _exclusive(self):
        """Hold the model for one call (other threads wait)."""
        me = threading.get_ident()
        if self._owner == me:
            raise ModelBusyError("this thread's generation on the model is still open: "
                                 "read it to the end or close() it first")
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    def close(self):
        """Release the mapped file, the streaming threads and the tokenizer (also on leaving `with`)."""
        if self.tokenizer is not None:
            self.tokenizer.close()
        if self.experts is not None:
            self.experts.close()
        self.store.close()
        self._rss.close()
        self._kv = None
        self.tokenizer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- scoring ------------------------------------------------------------------

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Teacher-forced logits: (len(tokens), n_vocab) float32, row i predicts token i+1."""
        tokens = self._check_tokens(tokens)
        kv = KVCache(self.config, len(tokens))
        out = np.empty((len(tokens), self.config.n_vocab), dtype=np.float32)
        with self._exclusive():
            for s in range(0, len(tokens), PREFILL_CHUNK):
                out[s:s + PREFILL_CHUNK] = self._forward(tokens[s:s + PREFILL_CHUNK], s, kv, prefill=True,
                                                         all_logits=True)
        return out

    def take_stats(self) -> list[TokenStats]:
        """One TokenStats per forward pass since the last call (the latest 100,000 at
        most): prefill chunks (prefill=True) and decoded tokens; then start afresh."""
        out = list(self._passes)
        self._passes.clear()
        return out

    @property
    def layout(self) -> str:
        """How the weights are held: what streams and how, or that all are resident."""
        return "; ".join(s.describe() for s in self._streams) or "every weight resident (mapped)"

    @property
    def expert_prefetch(self) -> str | None:
        """A mixture of experts' prefetch state ("on", "off", or what "auto" measured); None
        for a dense model."""
        return None if self.experts is None else self.experts.prefetch_state()

    def _forward(self, tokens, pos, kv, prefill: bool = False, **kw) -> np.ndarray:
        # numba's thread count is per calling thread: a model built on one thread and
        # used from another (a UI worker) would otherwise run on all cores.
        kernels_cpu.set_threads(self.n_threads)
        t0 = time.perf_counter()
        out = self.model.forward(tokens, pos, kv, **kw)
        st = TokenStats(tokens=len(tokens), prefill=prefill)
        for s in self._streams:
            st.add(s.take_pass())
        st.seconds = time.perf_counter() - t0
        st.compute_s = max(0.0, st.seconds - st.io_wait_s - st.bookkeeping_s - st.verify_s)
        st.rss = self._rss()
        if self.auto_threads is not None and not prefill and len(tokens) == 1:
            self.auto_threads.record(st.seconds)
        self._passes.append(st)
        if self._unreported is not None:
            self._unreported.append(st)
        return out

    def _check_tokens(self, tokens) -> np.ndarray:
        arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if arr.size == 0:
            raise InvalidArgumentError("no tokens given")
        if arr.size > self.n_ctx:
            raise ContextLengthError(f"{arr.size} tokens do not fit the context of {self.n_ctx}; pass a larger n_ctx")
        if arr.min() < 0 or arr.max() >= self.config.n_vocab:
            raise InvalidArgumentError(f"token ids must be in [0, {self.config.n_vocab})")
        return arr

    # -- generation ---------------------------------------------------------------

    def generate(self, prompt: str | list[int], **kw) -> str:
        """The completion of prompt as one string. Takes the same arguments as stream."""
        return "".join(c.text for c in self.stream(prompt, **kw))

    def chat(self, messages: list[dict], stream: bool = False, **kw):
        """Reply to OpenAI-style messages [{"role": ..., "content": ...}, ...] with the
        model's chat template. Returns the reply text, or a Chunk iterator if stream."""
        text = self.tokenizer.template.render(messages, add_generation_prompt=True)
        bos_text = self.tokenizer.template.bos_token
        add_special = not (bos_text and text.startswith(bos_text))  # the template wrote BOS
        tokens = self.tokenizer.encode(text, add_special=add_special)
        it = self.stream(tokens, **kw)
        return it if stream else "".join(c.text for c in it)

    def stream(self, prompt: str | list[int], max_tokens: int = 256, stop: list[str] | str | None = None,
               **sampling) -> Iterator[Chunk]:
        """Generate from prompt (text, or token ids), yielding Chunks as text arrives.

        Sampling: temperature (0 = greedy), top_k, top_p, min_p, repeat_penalty,
        repeat_last_n, seed. Stops at an end-of-generation token, a stop string (never
        shown), max_tokens, or a full context.
        """
        unknown = set(sampling) - _SAMPLING_KEYS
        if unknown:
            raise InvalidArgumentError(f"unknown sampling argument(s): {', '.join(sorted(unknown))}")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidArgumentError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        sampler = Sampler(SamplingParams(**sampling))
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if len(tokens) >= self.n_ctx:
            raise ContextLengthError(
                f"prompt has {len(tokens)} tokens but the context holds {self.n_ctx}; shorten it or pass a larger n_ctx")
        self._check_tokens(tokens)
        gen = _Generation()
        self._pending.add(gen)  # from here, not from its first chunk: a cancel() in between holds
        return self._generate(gen, tokens, sampler, max_tokens, stops)

    # -- the KV cache, token by token ---------------------------------------------------

    def reset(self) -> None:
        """Forget the tokens the KV cache holds: the next `eval` starts at position 0."""
        with self._exclusive():
            self._truncate(0)

    def eval(self, tokens: list[int]) -> np.ndarray:
        """Run tokens after the ones the KV cache holds (as llama.cpp's llama_decode) and
        return the logits (n_vocab,) float32 that predict the token after the last. Several
        tokens run as prefill chunks, one as a decode step."""
        arr = self._check_tokens(tokens)
        with self._exclusive():
            pos = len(self._kv_tokens)
            if pos + arr.size > self.n_ctx:
                raise ContextLengthError(f"{pos} + {arr.size} tokens do not fit the context of {self.n_ctx}; "
                                         "reset() or pass a larger n_ctx")
            self._unreported = None  # a stream left unfinished reports no more
            return self._extend(arr.tolist(), range(0, arr.size, PREFILL_CHUNK))

    def _truncate(self, n: int) -> None:
        del self._kv_tokens[n:]
        self._exact = min(self._exact, n)

    def _extend(self, tokens: list[int], starts) -> np.ndarray:
        """Run tokens after the KV cache's, in passes starting at offsets `starts` of
        tokens; the logits after the last. A pass of several tokens (prefill) computes
        each row as any other prefill would; one token goes the decode step's way, which
        rounds differently: the positions a fresh prefill would reproduce end there."""
        starts = list(starts) + [len(tokens)]
        logits = None
        for a, b in zip(starts, starts[1:]):
            pos = len(self._kv_tokens)
            logits = self._forward(np.asarray(tokens[a:b]), pos, self._kv, prefill=b - a > 1)
            self._kv_tokens += tokens[a:b]
            self._exact = pos + b - a if b - a > 1 and self._exact == pos else min(self._exact, pos)
        return logits[0]

    def _prefill(self, tokens: list[int]) -> np.ndarray:
        """Fill the KV cache with tokens, reusing the prefix it holds where that gives
        exactly what a fresh prefill would: the prefix computed by prefill passes (none
        where a row depends on its batch: a mixture of experts, or products through BLAS),
        then the rest in a fresh prefill's chunks (PREFILL_CHUNK-aligned), none of a single
        token that a fresh prefill runs with others."""
        independent = self.model.rows_independent and kernels_cpu.prefill_rows_independent()
        keep, exact = 0, self._exact if independent else 0  # (else: no reuse)
        for a, b in zip(self._kv_tokens[:exact], tokens):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(tokens) - 1)  # recompute at least the last token for its logits
        c0 = keep // PREFILL_CHUNK * PREFILL_CHUNK
        if keep > c0 and min(len(tokens), c0 + PREFILL_CHUNK) - keep == 1:
            keep -= 1  # not a lone token in its chunk: a fresh prefill ran it with the others
        self._truncate(keep)
        ends = range(c0 + PREFILL_CHUNK, len(tokens), PREFILL_CHUNK)
        return self._extend(tokens[keep:], [0] + [e - keep for e in ends])

    def _generate(self, gen, tokens, sampler, max_tokens, stops) -> Iterator[Chunk]:
        try:
            with self._exclusive():
                yield from self._run(gen, tokens, sampler, max_tokens, stops)
        finally:
            self._pending.discard(gen)

    def _run(self, gen, tokens, sampler, max_tokens, stops) -> Iterator[Chunk]:
        n_prompt = len(tokens)
        generated: list[int] = []
        emitted = 0  # characters of the decoded text already yielded
        t_prompt = time.perf_counter()
        pp_speed = tps = 0.0

        def chunk(text, token, reason):
            st = TokenStats.total(self._unreported) if self._unreported else None
            self._unreported = []
            return Chunk(text, token, reason, n_prompt, len(generated), tps, pp_speed, st)

        self._unreported = []  # collected only while this generation runs (eval and logits keep none)
        with self._state:
            self._running = gen
            if gen.cancelled:
                self.model.cancel_event.set()
        try:
            logits = self._prefill(tokens)
            t_gen = time.perf_counter()
            pp_speed = n_prompt / max(t_gen - t_prompt, 1e-9)
            reason = None
            while reason is None:
                tok = sampler(logits, tokens + generated)
                if tok in self.tokenizer.eog_ids:
                    reason = "stop"
                    break
                generated.append(tok)
                if len(generated) == 1:
                    t_first = time.perf_counter()
                else:  # decode speed: tokens after the first over the time since it
                    tps = (len(generated) - 1) / max(time.perf_counter() - t_first, 1e-9)
                text = self.tokenizer.decode(generated)
                cut = _find_stop(text, stops, emitted)
                if cut is not None:
                    yield chunk(text[emitted:cut], tok, None)
                    emitted = len(text)  # nothing after the stop string is shown
                    reason = "stop"
                    break
                safe = _safe_end(text, stops)
                if safe > emitted:
                    yield chunk(text[emitted:safe], tok, None)
                    emitted = safe
                if len(generated) >= max_tokens or len(tokens) + len(generated) >= self.n_ctx:
                    reason = "length"
                    break
                logits = self._extend([tok], [0])
        except Cancelled:
            reason = "cancelled"
        finally:
            with self._state:
                self._running = None
                self.model.cancel_event.clear()
        text = self.tokenizer.decode(generated) if generated else ""
        if len(text) > emitted:  # flush text held back for a stop string that never came
            yield chunk(text[emitted:], None, None)
        last = chunk("", None, reason)
        self._unreported = None
        yield last


class _Generation:
    """One stream() call's generation, until it ends: whether cancel() asked it to stop."""
    cancelled = False


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
