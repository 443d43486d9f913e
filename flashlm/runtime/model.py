"""The public Model: load a model file, then tokenize, score, generate, stream and chat."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import psutil

from .. import kernels_cpu
from ..flashload.layout import KEY as FLASH_KEY
from ..flashload.plan import make_plan
from ..flashload.store import FlashStore, StreamSettings
from ..errors import ContextLengthError, FlashLMError, InvalidArgumentError
from ..units import format_size, parse_size
from ..formats import hf
from .blocks import Cancelled, KVCache
from .config import config_from_gguf, config_from_hf
from ..formats.modelfile import GGUFModelFile, HFModelFile, check_tensor_types
from .models import model_class
from .sampler import Sampler, SamplingParams
from .tokenizer import HFTokenizer, LlamaCppTokenizer
from ..formats.weights import WeightStore

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


_SAMPLING_KEYS = {f for f in SamplingParams.__dataclass_fields__}


def _expert_options(experts: dict | None) -> dict:
    """A mixture-of-experts model's streaming options: policy ("freq", the default: the
    best hit rates on MoEfied SmolLM2's routing traces, benchmarks/expert_traces.py;
    "score"; "lru"; "lfu"), prefetch (the next layer's experts read while a layer computes:
    True, False, or "auto", the default: whichever decodes faster on this machine, measured
    while decoding; experts/autoprefetch.py) and bundle (write the experts' bundle once and
    read each expert in one read; experts/bundle.py)."""
    opts = {"policy": "freq", "prefetch": "auto", "bundle": True, **(experts or {})}
    unknown = set(opts) - {"policy", "prefetch", "bundle"}
    if unknown:
        raise InvalidArgumentError(f"unknown expert option(s): {', '.join(sorted(unknown))}")
    pf = opts["prefetch"]
    if not (isinstance(pf, (bool, np.bool_)) or (isinstance(pf, str) and pf == "auto")):
        raise InvalidArgumentError(f"expert prefetch must be True, False or \"auto\", not {pf!r}")
    opts["prefetch"] = pf if isinstance(pf, str) else bool(pf)
    from ..cache import POLICIES

    if opts["policy"] not in POLICIES:
        raise InvalidArgumentError(f"unknown cache policy {opts['policy']!r}; choose from {', '.join(POLICIES)}")
    return opts


_TOKENIZER_BYTES: dict[str, int] = {}  # per model file: the RSS its tokenizer took to load, first time


class Model:
    """A loaded model. Use `flashlm.load(...)` to make one; close it (or use `with`)."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int | None = None, n_threads: int | None = None,
                 memory_budget: str | int | None = None, streaming=None, experts: dict | None = None):
        t0 = time.perf_counter()
        self.path = Path(path)
        if self.path.is_dir():
            self.file = HFModelFile(self.path, hf.gguf_name)
            self.config = config_from_hf(self.file)
        else:
            self.file = GGUFModelFile(self.path)
            self.config = config_from_gguf(self.file)
        check_tensor_types(self.file)
        cfg = self.config
        if n_ctx is None:
            n_ctx = min(4096, cfg.n_ctx_train)
        if not isinstance(n_ctx, int) or n_ctx < 8:
            raise InvalidArgumentError(f"n_ctx must be an integer >= 8, got {n_ctx!r}")
        self.n_ctx = n_ctx
        if n_threads is not None and (not isinstance(n_threads, int) or n_threads < 1):
            raise InvalidArgumentError(f"n_threads must be a positive integer, got {n_threads!r}")
        self.n_threads = kernels_cpu.set_threads(n_threads or psutil.cpu_count(logical=False) or os.cpu_count() or 1)
        if self.file.kind == "gguf" and FLASH_KEY + ".version" in self.file.metadata:
            try:
                if isinstance(streaming, dict):
                    unknown = set(streaming) - set(StreamSettings.__dataclass_fields__)
                    if unknown:
                        raise InvalidArgumentError(f"unknown streaming setting(s): {', '.join(sorted(unknown))}")
                    streaming = StreamSettings(**streaming)
                self.store = FlashStore(self.file, streaming)  # FFN neurons streamed from the flash layout
            except BaseException:
                self.file.close()
                raise
        else:
            self.store = WeightStore(self.file)
        self.memory_budget = None
        self.plan = None  # a streamed model's memory plan (flashload.plan), when it has a budget
        try:
            rss0 = psutil.Process().memory_info().rss
            if self.file.kind == "gguf":
                self.tokenizer = LlamaCppTokenizer(self.path, self.file.metadata, cfg.arch)
            else:
                self.tokenizer = HFTokenizer(self.path, self.file.config)
            # measured: its vocab tables, the first time this process loads this file (later
            # loads reuse freed memory and would measure less: one plan per file and process)
            tokenizer_bytes = _TOKENIZER_BYTES.setdefault(str(self.path),
                                                          max(0, psutil.Process().memory_info().rss - rss0))
            if memory_budget is not None:
                self.memory_budget = parse_size(memory_budget)
                if cfg.n_expert and not isinstance(self.store, FlashStore):  # experts stream into a cache
                    from ..experts.store import plan_experts

                    opts = self._expert_opts = _expert_options(experts)
                    self.plan = plan_experts(self.file, cfg, self.memory_budget, n_ctx, tokenizer_bytes,
                                             opts["prefetch"] is True)  # auto: off in a cache too small
                elif isinstance(self.store, FlashStore):
                    self.plan = make_plan(self.store, self.memory_budget, n_ctx, cfg.kv_bytes_per_token // 2,
                                          cfg.n_vocab, tokenizer_bytes)
                    self.store.set_capacities(self.plan.capacities)
                else:
                    need = self.store.resident_bytes + n_ctx * cfg.kv_bytes_per_token // 2
                    if self.memory_budget < need:
                        raise FlashLMError(
                            f"memory budget {format_size(self.memory_budget)} is below the {format_size(need)} this"
                            f" model needs resident (weights + KV cache at n_ctx={n_ctx}); raise the budget, lower"
                            f" n_ctx, or stream its FFN from a flash layout (flashlm convert --flash OUT)")
        except BaseException:
            self.store.close()
            raise
        self.model = model_class(cfg.arch)(cfg, self.store)
        if cfg.n_expert and self.plan is not None and not isinstance(self.store, FlashStore):
            from ..experts.store import StreamedExperts

            self.model.experts = StreamedExperts(self.file, cfg, self.plan.n_slots, **self._expert_opts)
        self._kv = KVCache(cfg, n_ctx)
        self._kv_tokens: list[int] = []  # tokens whose keys/values _kv holds, in order
        self.load_seconds = time.perf_counter() - t0

    # -- basics -------------------------------------------------------------------

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
        """Stop the running generation (from any thread), also during prefill."""
        self.model.cancel_event.set()

    def close(self):
        """Release the mapped file, the streaming threads and the tokenizer (also on leaving `with`)."""
        if self.tokenizer is not None:
            self.tokenizer.close()
        if hasattr(getattr(self, "model", None), "experts") and hasattr(self.model.experts, "close"):
            self.model.experts.close()
        self.store.close()
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
        self.model.cancel_event.clear()
        for s in range(0, len(tokens), PREFILL_CHUNK):
            out[s:s + PREFILL_CHUNK] = self._forward(tokens[s:s + PREFILL_CHUNK], s, kv, all_logits=True)
        return out

    def _forward(self, tokens, pos, kv, **kw) -> np.ndarray:
        # numba's thread count is per calling thread: a model built on one thread and
        # used from another (a UI worker) would otherwise run on all cores.
        kernels_cpu.set_threads(self.n_threads)
        return self.model.forward(tokens, pos, kv, **kw)

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
        self.model.cancel_event.clear()  # here, not when iteration starts: a cancel() in between holds
        return self._generate(tokens, sampler, max_tokens, stops)

    def _prefill(self, tokens: list[int]) -> np.ndarray:
        """Fill the KV cache with tokens, reusing the prefix it already holds."""
        keep = 0
        for a, b in zip(self._kv_tokens, tokens):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(tokens) - 1)  # recompute at least the last token for its logits
        self._kv_tokens = self._kv_tokens[:keep]
        logits = None
        for s in range(keep, len(tokens), PREFILL_CHUNK):
            chunk = tokens[s:s + PREFILL_CHUNK]
            logits = self._forward(np.asarray(chunk), s, self._kv)
            self._kv_tokens += chunk
        return logits[0]

    def _generate(self, tokens, sampler, max_tokens, stops) -> Iterator[Chunk]:
        n_prompt = len(tokens)
        generated: list[int] = []
        emitted = 0  # characters of the decoded text already yielded
        t_prompt = time.perf_counter()
        pp_speed = tps = 0.0

        def chunk(text, token, reason):
            return Chunk(text, token, reason, n_prompt, len(generated), tps, pp_speed)

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
                pos = len(self._kv_tokens)
                logits = self._forward(np.asarray([tok]), pos, self._kv)[0]
                self._kv_tokens.append(tok)
        except Cancelled:
            reason = "cancelled"
        text = self.tokenizer.decode(generated) if generated else ""
        if len(text) > emitted:  # flush text held back for a stop string that never came
            yield chunk(text[emitted:], None, None)
        yield chunk("", None, reason)


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
