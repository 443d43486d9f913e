"""The public Model: load a model file, then tokenize, score, generate, stream and chat."""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np

from .. import kernels_cpu
from ..errors import ContextLengthError, InvalidArgumentError, ModelBusyError
from ..stats import RSSReader, TokenStats
from .autothreads import AutoThreads
from .blocks import Cancelled, Context, cache_label, kv_bytes_per_position
from .output import Chunk, Sequence
from .sampler import Sampler, SamplingParams
from .speculate import Adaptive, Speculation, SpecStats, accept

PREFILL_CHUNK = 128  # tokens per prefill forward pass


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
                 memory_budget: int | None, n_ctx: int, threads: int | AutoThreads, load_seconds: float,
                 parallel: int = 1, cache_ram: int = 0):
        self.path, self.config, self.store, self.tokenizer = path, config, store, tokenizer
        self.file = store.file  # the model file (GGUF or HF folder) its weights map
        self.model = lm  # the architecture's DecoderLM
        self.experts = experts  # a mixture of experts' source (resident or streamed), else None
        self.plan, self.memory_budget = plan, memory_budget
        self.n_ctx, self.load_seconds = n_ctx, load_seconds
        self.parallel, self.cache_ram = parallel, cache_ram  # batch()'s defaults, as the plan counts them
        # kernel threads: a count the caller fixed, or chosen while decoding (autothreads.py)
        self.auto_threads = threads if isinstance(threads, AutoThreads) else None
        self._threads = threads if self.auto_threads is None else None
        self._streams = streams  # what streams weights: each pass's reads and hits (take_pass)
        self._passes: deque[TokenStats] = deque(maxlen=100_000)
        self.bytes_read = 0  # from the disk by streamed weights, all passes since loading
        self._unreported: list[TokenStats] | None = None  # while streaming: passes since the last Chunk
        self._rss = RSSReader()
        self._ctx = Context(lm.kv_cache(n_ctx))  # the KV cache of stream() and eval(), and its tokens
        self._lock = threading.Lock()  # one call at a time
        self._owner: int | None = None  # the thread holding it
        self._state = threading.Lock()  # guards _running and the cancel event between threads
        self._running = None  # the generation running, if any
        self._pending: weakref.WeakSet = weakref.WeakSet()  # generations made by stream(), not finished
        self.speculation: Speculation | None = None  # stream()'s default (load(speculative=...))
        self._drafters: dict = {}  # draft source -> its drafter (speculate.py), made on first use
        self.spec_stats = SpecStats()  # speculation since loading, all generations

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
    def cache_type(self) -> str:
        """The KV cache's type: "f16" (the default), "q8_0", "q4_0", or "K q8_0, V f16"
        when keys and values differ (load's cache_type_k and cache_type_v)."""
        return cache_label(self.model.cache_types)

    @property
    def kv_bytes_per_position(self) -> int:
        """Bytes one position takes in one sequence's KV cache (all layers, keys and values)."""
        return kv_bytes_per_position(self.config, self.model.cache_types)

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
        for d in self._drafters.values():
            d.close()
        self._drafters = {}
        self.store.close()
        self._rss.close()
        self._ctx = None
        self.tokenizer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- scoring ------------------------------------------------------------------

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Teacher-forced logits: (len(tokens), n_vocab) float32, row i predicts token i+1."""
        tokens = self._check_tokens(tokens)
        kv = self.model.kv_cache(len(tokens))
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
        return self._pass(lambda: self.model.forward(tokens, pos, kv, **kw), len(tokens), prefill)

    def _pass(self, run, n_tokens: int, prefill: bool):
        """run() as a forward pass of n_tokens: on this model's threads, its TokenStats kept."""
        # numba's thread count is per calling thread: a model built on one thread and
        # used from another (a UI worker) would otherwise run on all cores.
        kernels_cpu.set_threads(self.n_threads)
        t0 = time.perf_counter()
        out = run()
        st = self._record(n_tokens, prefill, t0)
        if self._unreported is not None:
            self._unreported.append(st)
        return out

    def _record(self, n_tokens: int, prefill: bool, t0: float) -> TokenStats:
        """The TokenStats of the pass that began at t0 (kept for take_stats); a one-token
        step's time also goes to the automatic thread count."""
        st = TokenStats(tokens=n_tokens, prefill=prefill)
        for s in self._streams:
            st.add(s.take_pass())
        st.seconds = time.perf_counter() - t0
        st.compute_s = max(0.0, st.seconds - st.io_wait_s - st.bookkeeping_s - st.verify_s)
        st.rss = self._rss()
        self.bytes_read += st.bytes_read
        if self.auto_threads is not None and not prefill and n_tokens == 1:
            self.auto_threads.record(st.seconds)
        self._passes.append(st)
        return st

    def _forward_batch(self, ctxs: list[Context], toks: list[int], pool, slots: list[int]):
        """One decode step for several sequences, token toks[b] after ctxs[b]'s (slots[b]
        of pool): logits (B, n_vocab), each row what a single step gives; and the pass's
        TokenStats."""
        kernels_cpu.set_threads(self.n_threads)
        t0 = time.perf_counter()
        pos = [len(c.tokens) for c in ctxs]
        fused = self.model.fused
        if fused is not None and len(ctxs) > 1:
            pool.reserve(max(pos) + 1)
            logits = fused.step_batch(toks, pos, slots, pool.k16, pool.v16)
        else:
            logits = np.concatenate([self.model.forward(np.array([t]), p, c.kv) for c, t, p in zip(ctxs, toks, pos)])
        for c, t, p in zip(ctxs, toks, pos):
            c.tokens.append(t)
            c.exact = min(c.exact, p)
        return logits, self._record(len(toks), False, t0)

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
        it = self.stream(self.chat_tokens(messages), **kw)
        return it if stream else "".join(c.text for c in it)

    def chat_tokens(self, messages: list[dict], **template_vars) -> list[int]:
        """The token ids of messages rendered through the chat template, ready for the
        model's reply (template_vars, e.g. tools=[...], go to the template as well)."""
        text = self.tokenizer.template.render(messages, add_generation_prompt=True, **template_vars)
        bos_text = self.tokenizer.template.bos_token
        add_special = not (bos_text and text.startswith(bos_text))  # the template wrote BOS
        return self.tokenizer.encode(text, add_special=add_special)

    def stream(self, prompt: str | list[int], max_tokens: int = 256, stop: list[str] | str | None = None,
               grammar=None, speculative=None, **sampling) -> Iterator[Chunk]:
        """Generate from prompt (text, or token ids), yielding Chunks as text arrives.

        Sampling: temperature (0 = greedy), top_k, top_p, min_p, repeat_penalty,
        repeat_last_n, seed. Stops at an end-of-generation token, a stop string (never
        shown), max_tokens, or a full context. grammar: a runtime.constrain.Grammar the
        output keeps to (e.g. json_schema_grammar(schema, m.tokenizer)); it stops where
        the grammar is complete. speculative: a draft source ("ngram", "model:PATH",
        "self"), a dict of speculate.Speculation's fields, or False; default the one
        load() was given (runtime/speculate.py). Greedy output is the same with it.
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
        gen.grammar = grammar
        gen.spec = self.speculation if speculative is None else Speculation.parse(speculative)
        if gen.spec is not None:
            self.drafter(gen.spec)  # a bad source fails here, not at the first token
        self._pending.add(gen)  # from here, not from its first chunk: a cancel() in between holds
        return self._generate(gen, tokens, sampler, max_tokens, stops)

    # -- the KV cache, token by token ---------------------------------------------------

    def batch(self, parallel: int | None = None, cache_bytes: int | None = None):
        """A batch engine on this model (runtime/batch.py): up to `parallel` generations
        decoded together, one forward pass per step for all; `cache_bytes` of prompt cache
        (by default what load() planned: its parallel and cache_ram). Close it when done
        (or use `with`)."""
        from .batch import Engine

        return Engine(self, parallel=self.parallel if parallel is None else parallel,
                      cache_bytes=self.cache_ram if cache_bytes is None else cache_bytes)

    def generate_batch(self, prompts: list, **kw) -> list[str]:
        """The completions of several prompts (text or token ids), decoded together; the
        arguments are stream()'s. Greedy completions equal generate()'s one by one."""
        if not prompts:
            return []
        with self.batch(parallel=len(prompts)) as engine:
            return engine.generate(prompts, **kw)

    def reset(self) -> None:
        """Forget the tokens the KV cache holds: the next `eval` starts at position 0."""
        with self._exclusive():
            self._ctx.truncate(0)

    def eval(self, tokens: list[int]) -> np.ndarray:
        """Run tokens after the ones the KV cache holds (as llama.cpp's llama_decode) and
        return the logits (n_vocab,) float32 that predict the token after the last. Several
        tokens run as prefill chunks, one as a decode step."""
        arr = self._check_tokens(tokens)
        with self._exclusive():
            pos = len(self._ctx.tokens)
            if pos + arr.size > self.n_ctx:
                raise ContextLengthError(f"{pos} + {arr.size} tokens do not fit the context of {self.n_ctx}; "
                                         "reset() or pass a larger n_ctx")
            self._unreported = None  # a stream left unfinished reports no more
            return self._extend(self._ctx, arr.tolist(), range(0, arr.size, PREFILL_CHUNK))

    def _extend(self, ctx: Context, tokens: list[int], starts) -> np.ndarray:
        """Run tokens after ctx's, in passes starting at offsets `starts` of tokens; the
        logits after the last. A pass of several tokens (prefill) computes each row as
        any other prefill would; one token goes the decode step's way, which rounds
        differently: the positions a fresh prefill would reproduce end there."""
        starts = list(starts) + [len(tokens)]
        logits = None
        for a, b in zip(starts, starts[1:]):
            pos = len(ctx.tokens)
            logits = self._forward(np.asarray(tokens[a:b]), pos, ctx.kv, prefill=b - a > 1)
            ctx.tokens += tokens[a:b]
            ctx.exact = pos + b - a if b - a > 1 and ctx.exact == pos else min(ctx.exact, pos)
        return logits[0]

    def _prefill(self, ctx: Context, tokens: list[int], reuse_any: bool = False) -> tuple[np.ndarray, int]:
        """Fill ctx's KV cache with tokens, reusing the prefix it holds; the logits after
        the last token, and how many tokens were reused.

        By default only where that gives exactly what a fresh prefill would: the prefix
        computed by prefill passes (none where a row depends on its batch: a mixture of
        experts, or products through BLAS), then the rest in a fresh prefill's chunks
        (PREFILL_CHUNK-aligned), none of a single token that a fresh prefill runs with
        others. reuse_any: the whole common prefix, decoded tokens too (a prompt cache, as
        llama-server's: the next turn of a chat computes only its new tokens)."""
        independent = self.model.rows_independent and kernels_cpu.prefill_rows_independent()
        exact = ctx.exact if independent else 0
        limit = len(ctx.tokens) if reuse_any else exact
        keep = 0
        for a, b in zip(ctx.tokens[:limit], tokens):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(tokens) - 1)  # recompute at least the last token for its logits
        if keep > exact:  # past what a fresh prefill reproduces: continue from there
            ctx.truncate(keep)
            return self._extend(ctx, tokens[keep:], range(0, len(tokens) - keep, PREFILL_CHUNK)), keep
        c0 = keep // PREFILL_CHUNK * PREFILL_CHUNK
        if keep > c0 and min(len(tokens), c0 + PREFILL_CHUNK) - keep == 1:
            keep -= 1  # not a lone token in its chunk: a fresh prefill ran it with the others
        ctx.truncate(keep)
        ends = range(c0 + PREFILL_CHUNK, len(tokens), PREFILL_CHUNK)
        return self._extend(ctx, tokens[keep:], [0] + [e - keep for e in ends]), keep

    def drafter(self, spec: Speculation):
        """The draft source of spec (speculate.py), made on first use and kept. A draft
        model is loaded with the model (load's speculative=), where the plan counts it."""
        from .speculate import NgramDraft, SelfDraft

        d = self._drafters.get(spec.source)
        if d is None:
            if spec.source == "ngram":
                d = NgramDraft()
            elif spec.source == "self":
                d = SelfDraft(self)
            else:
                raise InvalidArgumentError(f"draft {spec.source!r} is not loaded: a draft model is loaded with the "
                                           f"model, flashlm.load(..., speculative={spec.source!r}) (or --draft)")
            self._drafters[spec.source] = d
        return d

    def _verify(self, ctx: Context, toks: list[int]) -> np.ndarray:
        """Run toks after ctx's tokens in one pass: logits (T, n_vocab), row t what a decode
        step gives toks[t] after the ones before it, bit for bit (a speculative
        verification; blocks.DecoderLM.verify)."""
        pos = len(ctx.tokens)
        logits = self._pass(lambda: self.model.verify(toks, pos, ctx.kv), len(toks), False)
        ctx.tokens += toks
        ctx.exact = min(ctx.exact, pos)
        return logits

    def _accept(self, ctx: Context, seq: Sequence, rows, drafts: list[int], seconds: float, stats: SpecStats, adapt,
                emit) -> tuple[int, int | None]:
        """Take the rows _next ran (speculate.accept) and keep the keys and values of the
        accepted drafts only; count the round. (accepted drafts, the token to run next)."""
        base = len(ctx.tokens) - len(rows)  # before the token the rows ran after
        i, tok = accept(seq, rows, drafts, emit)
        if drafts:
            ctx.truncate(base + 1 + i)
            self._speculated(stats, adapt, len(drafts), i, seconds)
        return i, tok

    def _next(self, ctx: Context, tok: int, seq: Sequence, spec, adapt) -> tuple[list, list, float]:
        """Run tok after ctx's tokens, and with speculation the tokens drafted after it:
        (rows of logits, the drafted tokens the rows after the first check, the seconds
        drafting and the pass took)."""
        t0 = time.perf_counter()
        if spec is not None and adapt.speculate():
            k = min(adapt.k, self.n_ctx - len(ctx.tokens) - 1, seq.max_tokens - len(seq.generated))
            drafts = self._drafters[spec.source].propose(ctx.tokens + [tok], k, ctx) if k >= spec.draft_min else []
            if len(drafts) >= spec.draft_min:
                rows = list(self._verify(ctx, [tok] + drafts))
                return rows, drafts, time.perf_counter() - t0
        logits = self._extend(ctx, [tok], [0])
        dt = time.perf_counter() - t0
        if adapt is not None:
            adapt.plain(dt)
        return [logits], [], dt

    def _generate(self, gen, tokens, sampler, max_tokens, stops) -> Iterator[Chunk]:
        try:
            with self._exclusive():
                yield from self._run(gen, tokens, sampler, max_tokens, stops)
        finally:
            self._pending.discard(gen)

    def _run(self, gen, tokens, sampler, max_tokens, stops) -> Iterator[Chunk]:
        seq = Sequence(self.tokenizer, tokens, sampler, stops, max_tokens, self.n_ctx, gen.grammar)
        t_prompt = time.perf_counter()
        pp_speed = 0.0
        n_cached = 0

        def chunk(text, token, reason):
            st = TokenStats.total(self._unreported) if self._unreported else None
            self._unreported = []
            return Chunk(text, token, reason, len(tokens), len(seq.generated), seq.tps, pp_speed, st, n_cached)

        self._unreported = []  # collected only while this generation runs (eval and logits keep none)
        with self._state:
            self._running = gen
            if gen.cancelled:
                self.model.cancel_event.set()
        spec, ctx = gen.spec, self._ctx
        adapt = Adaptive(spec) if spec is not None else None
        gen.stats = SpecStats()
        try:
            logits, n_cached = self._prefill(ctx, tokens)
            pp_speed = (len(tokens) - n_cached) / max(time.perf_counter() - t_prompt, 1e-9)
            rows, drafts, seconds = [logits], [], 0.0
            while True:
                out = []
                _, tok = self._accept(ctx, seq, rows, drafts, seconds, gen.stats, adapt,
                                      lambda piece, tok, out=out: out.append(chunk(piece, tok, None)))
                yield from out
                if seq.finish:
                    break
                rows, drafts, seconds = self._next(ctx, tok, seq, spec, adapt)
        except Cancelled:
            seq.finish = "cancelled"
        finally:
            with self._state:
                self._running = None
                self.model.cancel_event.clear()
        rest = seq.out.flush()  # text held back for a stop string that never came
        if rest:
            yield chunk(rest, None, None)
        last = chunk("", None, seq.finish)
        if gen.stats.passes:
            last = replace(last, speculation=gen.stats)
        self._unreported = None
        yield last

    def _speculated(self, stats: SpecStats, adapt, drafted: int, accepted: int, dt: float) -> None:
        """Count a round of drafting and verification that took dt seconds (into the
        generation's and the model's SpecStats, and the adaptive draft length)."""
        adapt.round(drafted, accepted, dt, accepted + 1)
        last = self._passes[-1]
        for s in (stats, self.spec_stats):
            s.passes += 1
            s.drafted += drafted
            s.accepted += accepted
            s.produced += accepted + 1
            s.bytes_read += last.bytes_read
            s.verify_seconds += last.seconds
            s.draft_seconds += dt - last.seconds


class _Generation:
    """One stream() call's generation, until it ends: whether cancel() asked it to stop,
    the grammar it keeps to (or None), its speculation (or None) and what that did."""
    cancelled = False
    grammar = None
    spec = None
    stats = None
