"""Several sequences decoded together: one forward pass per step for all of them, so
each weight (and, for a streamed model, each neuron or expert read) serves every
sequence at once. The server (apps/server.py) and Model.generate_batch both run here.

An Engine owns `parallel` slots: a KV cache each (one SlotPool), the tokens it holds,
and the sequence decoding in it, if any. Jobs queue until a slot is free. A finished
sequence's keys and values stay in its slot, so a later prompt that starts the same way
(the next turn of a chat) computes only its new tokens; a slot about to be overwritten
is kept in a prompt cache of `cache_bytes` (least recently used first out), as
llama-server's --cache-ram.

Each slot runs exactly what Model.stream would: the same prefill, and a batched decode
step whose rows are bit for bit the single-token step's (kernels_cpu.decode). Greedy
output at any batch size is the single request's.

With speculation (the model's, load(speculative=...)), a sequence decoding alone
drafts and verifies as Model.stream does (runtime/speculate.py); several decode
together in plain batched steps, which already share each weight read among them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from ..errors import ContextLengthError, FlashLMError, InvalidArgumentError
from .blocks import Cancelled, Context
from .output import Chunk, Sequence
from .sampler import Sampler, SamplingParams
from .speculate import Adaptive, SpecStats

_SAMPLING_KEYS = set(SamplingParams.__dataclass_fields__)


@dataclass
class _Entry:
    """A prompt cache entry: a sequence's tokens and their keys and values."""
    tokens: list[int]
    exact: int
    k: np.ndarray
    v: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class Job:
    """One submitted generation: iterate it for its Chunks (as Model.stream's), from any
    thread; cancel() ends it with finish_reason "cancelled" at the next step (or before
    it starts). An error inside the engine is raised from the iteration."""

    def __init__(self, seq: Sequence, cache_prompt: bool):
        self.seq, self.cache_prompt = seq, cache_prompt
        self.tokens = seq.prompt
        self.n_prompt, self.n_cached = len(seq.prompt), 0
        self.cancelled = False
        self.slot = None
        self.feed = None  # the token the next step runs
        self.adapt = None  # with speculation: its draft length and whether it pays (speculate.Adaptive)
        self.pp_speed = 0.0
        self.finish_reason = None
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._engine = None

    def cancel(self) -> None:
        self.cancelled = True
        if self._engine is not None:
            self._engine._wake(self)

    @property
    def generated(self) -> list[int]:
        return self.seq.generated

    def __iter__(self):
        return self

    def __next__(self) -> Chunk:
        item = self._q.get()
        if item is None:
            raise StopIteration
        if isinstance(item, BaseException):
            self._q.put(None)
            raise item
        return item

    def text(self) -> str:
        """The whole completion (waits for it)."""
        return "".join(c.text for c in self)


class Engine:
    """Batched generation on a Model (see the module's docstring). submit() returns a
    Job; close() cancels what runs and stops the worker thread."""

    def __init__(self, model, parallel: int = 4, cache_bytes: int = 0):
        if not isinstance(parallel, int) or parallel < 1:
            raise InvalidArgumentError(f"parallel must be a positive integer, got {parallel!r}")
        self.model, self.parallel, self.cache_bytes = model, parallel, int(cache_bytes)
        self.spec = model.speculation  # a sequence decoding alone speculates with it
        self.spec_stats = SpecStats()
        if self.spec is not None:
            model.drafter(self.spec)
        self.pool = model.model.slot_pool(parallel, model.n_ctx)
        self.slots = [Context(self.pool.slot(i)) for i in range(parallel)]
        self._job_of: list[Job | None] = [None] * parallel
        self._used = [0.0] * parallel  # when each slot last ran
        self._cache: OrderedDict[int, _Entry] = OrderedDict()  # prompt cache, oldest first
        self._cache_id = 0
        self._queue: deque[Job] = deque()
        self._active: list[Job] = []
        self._prefilling: Job | None = None
        self._cv = threading.Condition()
        self._closed = False
        self.counters = dict(requests=0, prompt_tokens=0, cached_tokens=0, generated_tokens=0, steps=0,
                             bytes_read=0, decode_seconds=0.0, decode_tokens=0)
        self._recent: deque[tuple[float, int]] = deque(maxlen=64)  # (seconds, tokens) of recent steps
        self._thread = threading.Thread(target=self._loop, name="flashlm-batch", daemon=True)
        self._thread.start()

    # -- the caller's side ---------------------------------------------------------------

    def submit(self, prompt, *, max_tokens: int = 256, stop=None, grammar=None, logprobs: int | None = None,
               cache_prompt: bool = True, **sampling) -> Job:
        """Queue a generation of prompt (text or token ids); Model.stream's arguments, and
        grammar (runtime.constrain.Grammar) to constrain it, logprobs (None, or how many
        alternatives to give per token) and cache_prompt (reuse a cached prefix)."""
        unknown = set(sampling) - _SAMPLING_KEYS
        if unknown:
            raise InvalidArgumentError(f"unknown sampling argument(s): {', '.join(sorted(unknown))}")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise InvalidArgumentError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        m = self.model
        tokens = m.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if len(tokens) >= m.n_ctx:
            raise ContextLengthError(f"prompt has {len(tokens)} tokens but the context holds {m.n_ctx}; "
                                     "shorten it or pass a larger n_ctx")
        m._check_tokens(tokens)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        seq = Sequence(m.tokenizer, tokens, Sampler(SamplingParams(**sampling)), stops, max_tokens, m.n_ctx, grammar,
                       logprobs)
        job = Job(seq, cache_prompt)
        with self._cv:
            if self._closed:
                raise FlashLMError("the batch engine is closed")
            job._engine = self
            self._queue.append(job)
            self.counters["requests"] += 1
            self._cv.notify()
        return job

    def generate(self, prompts: list, **kw) -> list[str]:
        """The completions of several prompts, decoded together."""
        jobs = [self.submit(p, **kw) for p in prompts]
        return [j.text() for j in jobs]

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return len(self._active) + (self._prefilling is not None)

    def tokens_per_second(self) -> float:
        """Decode speed over the recent steps, all sequences together."""
        s = sum(r[0] for r in self._recent)
        return sum(r[1] for r in self._recent) / s if s else 0.0

    @property
    def cache_used(self) -> int:
        return sum(e.nbytes for e in self._cache.values())

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for j in list(self._queue) + self._active:
                j.cancelled = True
            self._cv.notify()
        if self._prefilling is not None:
            self.model.model.cancel_event.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _wake(self, job: Job) -> None:
        with self._cv:
            if job in self._queue:  # not started: it ends now, without taking a slot
                self._finish(job, "cancelled")
            elif job is self._prefilling:
                self.model.model.cancel_event.set()
            self._cv.notify()

    # -- slots on disk (llama-server's /slots?action=save|restore) ---------------------

    def save_slot(self, i: int, path) -> int:
        """Write slot i's tokens and keys and values to path (.npz); the tokens saved."""
        with self._cv:
            ctx = self._slot_ctx(i)
            n = len(ctx.tokens)
            k, v = self.pool.k[i, ..., :n, :], self.pool.v[i, ..., :n, :]
            np.savez(path, tokens=np.asarray(ctx.tokens, dtype=np.int64), exact=ctx.exact, k=k, v=v)
        return n

    def restore_slot(self, i: int, path) -> int:
        """Load slot i from a file save_slot wrote; the tokens restored."""
        try:
            with np.load(path) as f:
                e = _Entry(f["tokens"].tolist(), int(f["exact"]), f["k"], f["v"])
        except (OSError, ValueError, KeyError) as err:
            raise InvalidArgumentError(f"{path}: not a saved slot ({err})") from None
        fits = all(a.dtype == b.dtype and a.shape[:-2] == b.shape[1:-2] and a.shape[-1] == b.shape[-1]
                   and a.shape[-2] == len(e.tokens) for a, b in ((e.k, self.pool.k), (e.v, self.pool.v)))
        if not fits:
            raise InvalidArgumentError(f"{path}: a slot saved from another model, or with another KV cache type")
        if len(e.tokens) > self.model.n_ctx:
            raise ContextLengthError(f"{path}: {len(e.tokens)} tokens do not fit the context of {self.model.n_ctx}")
        with self._cv:
            self._load(self._slot_ctx(i), i, e)
        return len(e.tokens)

    def _slot_ctx(self, i: int) -> Context:
        if not isinstance(i, int) or not 0 <= i < self.parallel:
            raise InvalidArgumentError(f"slot must be in [0, {self.parallel})")
        if self._job_of[i] is not None:
            raise InvalidArgumentError(f"slot {i} is generating; try again when it is idle")
        return self.slots[i]

    # -- the worker ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closed and not self._queue and not self._active:
                    self._cv.wait()
                if self._closed and not self._active and not self._queue:
                    return
                job = self._queue.popleft() if self._queue and None in self._job_of else None
                if job is not None:
                    self._prefilling = job
            if job is not None:
                self._start(job)
            if self._active and (job is None or not self._queue or None not in self._job_of):
                self._step()

    def _choose_slot(self, job: Job) -> int:
        """A free slot: the one holding the longest prefix of the prompt (the least
        recently used among equals); a prompt-cache entry with a longer one is restored
        into it, and what the slot held is kept in the cache if it would be lost."""
        free = [i for i in range(self.parallel) if self._job_of[i] is None]
        best = max(free, key=lambda i: (_common(self.slots[i].tokens, job.tokens) if job.cache_prompt else 0,
                                        -self._used[i]))
        ctx = self.slots[best]
        have = _common(ctx.tokens, job.tokens) if job.cache_prompt else 0
        hit = None
        if job.cache_prompt:
            for key, e in self._cache.items():
                n = _common(e.tokens, job.tokens)
                if n > have and (hit is None or n > hit[1]):
                    hit = key, n
        entry = self._cache.pop(hit[0]) if hit is not None else None  # (before _keep can drop it)
        if entry is not None or have < len(ctx.tokens):
            self._keep(ctx, best)
        if entry is not None:
            self._load(ctx, best, entry)
        return best

    def _keep(self, ctx: Context, i: int) -> None:
        """Put slot i's sequence into the prompt cache, dropping the oldest entries for room."""
        n = len(ctx.tokens)
        size = n * self.pool.bytes_per_position()
        if not n or size > self.cache_bytes:
            return
        for key, e in list(self._cache.items()):
            if _common(e.tokens, ctx.tokens) == n:  # an entry holds all this and maybe more
                self._cache.move_to_end(key)
                return
            if _common(e.tokens, ctx.tokens) == len(e.tokens):  # this holds all that entry does
                del self._cache[key]
        while self._cache and self.cache_used + size > self.cache_bytes:
            self._cache.popitem(last=False)
        self._cache_id += 1
        self._cache[self._cache_id] = _Entry(list(ctx.tokens), ctx.exact, self.pool.k[i, ..., :n, :].copy(),
                                             self.pool.v[i, ..., :n, :].copy())

    def _load(self, ctx: Context, i: int, e: _Entry) -> None:
        n = len(e.tokens)
        self.pool.reserve(n)
        self.pool.k[i, ..., :n, :] = e.k
        self.pool.v[i, ..., :n, :] = e.v
        ctx.tokens, ctx.exact = list(e.tokens), e.exact

    def _start(self, job: Job) -> None:
        """Prefill job's prompt in a free slot and sample its first token."""
        m = self.model
        try:
            with self._cv:
                i = self._choose_slot(job)
                self._job_of[i], job.slot = job, i
            if job.cancelled:
                raise Cancelled()
            t0 = time.perf_counter()
            with m._exclusive():
                m.model.cancel_event.clear()
                try:
                    ctx = self.slots[i]
                    if not job.cache_prompt:
                        ctx.truncate(0)
                    logits, job.n_cached = m._prefill(ctx, job.tokens, reuse_any=job.cache_prompt)
                finally:
                    m.model.cancel_event.clear()
            job.pp_speed = (job.n_prompt - job.n_cached) / max(time.perf_counter() - t0, 1e-9)
            self.counters["prompt_tokens"] += job.n_prompt
            self.counters["cached_tokens"] += job.n_cached
            self.counters["bytes_read"] = m.bytes_read
            with self._cv:
                self._prefilling = None
                self._active.append(job)
            self._next(job, logits)
        except Cancelled:
            self._finish(job, "cancelled")
        except BaseException as e:  # (the job's caller gets it)
            self._finish(job, None, error=e)
        finally:
            with self._cv:
                self._prefilling = None

    def _step(self) -> None:
        """One decode step for every active sequence."""
        with self._cv:
            for j in [j for j in self._active if j.cancelled]:
                self._finish(j, "cancelled")
            jobs = list(self._active)
        if not jobs:
            return
        if self.spec is not None and len(jobs) == 1 and not self._queue:
            return self._spec_step(jobs[0])
        m = self.model
        t0 = time.perf_counter()
        try:
            with m._exclusive():
                logits, _ = m._forward_batch([self.slots[j.slot] for j in jobs], [j.feed for j in jobs],
                                              self.pool, [j.slot for j in jobs])
        except BaseException as e:  # (every sequence in the step gets it)
            for j in jobs:
                self._finish(j, None, error=e)
            return
        dt = time.perf_counter() - t0
        self._recent.append((dt, len(jobs)))
        c = self.counters
        c["steps"] += 1
        c["decode_seconds"] += dt
        c["decode_tokens"] += len(jobs)
        c["bytes_read"] = m.bytes_read
        for b, j in enumerate(jobs):
            self._next(j, logits[b])

    def _spec_step(self, job: Job) -> None:
        """A sequence decoding alone: its next token, and the tokens a draft source
        proposes after it, verified in one pass (Model.stream's way, in its slot)."""
        m, ctx, seq = self.model, self.slots[job.slot], job.seq
        if job.adapt is None:
            job.adapt = Adaptive(self.spec)
        try:
            with m._exclusive():
                rows, drafts, dt = m._next(ctx, job.feed, seq, self.spec, job.adapt)
        except BaseException as e:
            return self._finish(job, None, error=e)
        c = self.counters
        c["steps"] += 1
        c["decode_seconds"] += dt
        c["bytes_read"] = m.bytes_read
        if not drafts:
            c["decode_tokens"] += 1
            self._recent.append((dt, 1))
            return self._next(job, rows[0])
        try:
            i, tok = m._accept(ctx, seq, rows, drafts, dt, self.spec_stats, job.adapt,
                               lambda piece, tok: self._emit(job, piece, tok, None))
        except BaseException as e:  # (a grammar's failure ends this sequence only)
            return self._finish(job, None, error=e)
        c["generated_tokens"] += i + 1 - (tok is None)
        c["decode_tokens"] += i + 1
        self._recent.append((dt, i + 1))
        if seq.finish:
            return self._finish(job, seq.finish)
        job.feed = tok

    def _next(self, job: Job, logits: np.ndarray) -> None:
        """Sample job's next token from logits and hand on its text; finish it where it ends."""
        seq = job.seq
        try:
            piece, tok = seq.advance(logits)
        except BaseException as e:  # (a grammar's failure ends this sequence only)
            return self._finish(job, None, error=e)
        if tok is not None:
            self.counters["generated_tokens"] += 1
        if piece or seq.out.stopped:
            self._emit(job, piece, tok, None)
        if seq.finish:
            return self._finish(job, seq.finish)
        job.feed = tok

    def _emit(self, job: Job, text: str, tok, reason) -> None:
        seq = job.seq
        job._q.put(Chunk(text, tok, reason, job.n_prompt, len(seq.generated), seq.tps, job.pp_speed, None,
                         job.n_cached, seq.take_logprobs()))

    def _finish(self, job: Job, reason: str | None, error: BaseException | None = None) -> None:
        with self._cv:
            if job in self._active:
                self._active.remove(job)
            if job in self._queue:
                self._queue.remove(job)
            if job.slot is not None and self._job_of[job.slot] is job:
                self._job_of[job.slot] = None
                self._used[job.slot] = time.perf_counter()
        job.finish_reason = reason
        if error is not None:
            job._q.put(error if isinstance(error, Exception) else FlashLMError(str(error)))
            return
        rest = job.seq.out.flush()
        if rest:
            self._emit(job, rest, None, None)
        self._emit(job, "", None, reason)
        job._q.put(None)


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    if n and a[:n] == b[:n]:
        return n
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
