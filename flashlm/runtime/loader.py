"""The one place that composes a model: (file, options, budget) -> memory plan, stores,
one FFN strategy per layer (ffn.py) -> Model.

    dense, resident            DenseFFN over the mapped file
    dense, flash layout        NeuronFFN: neurons streamed by a FlashStore (flashload)
    mixture of experts         MoEFFN over ResidentExperts, or, under a memory budget,
                               StreamedExperts: an expert cache (experts)

Everything below the Model is built here and nowhere else; Model and architecture code
never ask which strategy they hold.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import psutil

from .. import kernels_cpu, progress
from ..cache import SLACK, plan_budget
from ..errors import InvalidArgumentError, ModelFormatError
from ..experts.moe import MoEFFN, ResidentExperts
from ..flashload.ffn import NeuronFFN
from ..flashload.layout import KEY as FLASH_KEY
from ..flashload.plan import make_plan
from ..flashload.settings import StreamSettings
from ..flashload.store import FlashStore
from ..formats import hf
from ..formats.modelfile import GGUFModelFile, HFModelFile, check_tensor_types
from ..formats.validate import check_tokenizer, validate_flash_layout
from ..formats.weights import WeightStore
from ..units import parse_size
from .autothreads import AutoThreads
from .blocks import cache_label, cache_types, kv_bytes_per_position
from .config import check_tensors, config_from_gguf, config_from_hf
from .ffn import DenseFFN
from .model import Model
from .models import model_class
from .speculate import ModelDraft, Speculation
from .gguf_tokenizer import GGUFTokenizer
from .tokenizer import HFTokenizer
from .warmup import warm_kernels_for

_TOKENIZER_BYTES: dict[str, int] = {}  # per model file: the RSS its tokenizer took to load, first time


def load_model(path: str | os.PathLike, *, n_ctx: int | None = None, n_threads: int | None = None,
               memory_budget: str | int | None = None, streaming=None, experts: dict | None = None,
               parallel: int = 1, cache_ram: str | int = 0, speculative=None, cache_type_k: str = "f16",
               cache_type_v: str = "f16") -> Model:
    """The model in file or folder `path`, composed for these options (flashlm.load's), its
    kernels loaded (or compiled where numba's cache lacks them: a bar on stderr). A status
    line on stderr says what loads while that takes more than a second."""
    t0 = time.perf_counter()
    _check_counts(n_threads, parallel)  # a bad argument fails before anything loads (or says it loads)
    if memory_budget is not None:
        parse_size(memory_budget)
    cache_types(cache_type_k, cache_type_v)
    spec = Speculation.parse(speculative)
    draft = None
    if spec is not None and spec.source.startswith("model:"):  # loaded first: the plan counts it
        from ..formats.registry import resolve

        draft = load_model(resolve(spec.source[len("model:"):]), n_ctx=n_ctx, n_threads=n_threads)
    with progress.task(f"loading {Path(path).name}", delay=1.0):
        try:
            model = _compose(path, n_ctx=n_ctx, n_threads=n_threads, memory_budget=memory_budget, streaming=streaming,
                             experts=experts, parallel=parallel, cache_ram=cache_ram,
                             draft=0 if draft is None else _draft_bytes(draft), kv_names=(cache_type_k, cache_type_v))
        except BaseException:
            if draft is not None:
                draft.close()
            raise
        try:
            if draft is not None:
                model._drafters[spec.source] = ModelDraft(draft, model.tokenizer, spec.source[len("model:"):])
            model.speculation = spec
            if spec is not None:
                model.drafter(spec)  # 'self' on a model held in memory is refused here
            warm_kernels_for(model)
        except BaseException:
            if draft is not None and spec.source not in model._drafters:
                draft.close()
            model.close()
            raise
    model.load_seconds = time.perf_counter() - t0
    return model


def _check_counts(n_threads, parallel) -> None:
    if n_threads is not None and (not isinstance(n_threads, int) or n_threads < 1):
        raise InvalidArgumentError(f"n_threads must be a positive integer, got {n_threads!r}")
    if not isinstance(parallel, int) or isinstance(parallel, bool) or parallel < 1:
        raise InvalidArgumentError(f"parallel must be a positive integer, got {parallel!r}")


def _draft_bytes(draft: Model) -> int:
    """What a resident draft model takes: its weights and its KV cache."""
    return draft.store.resident_bytes + draft.n_ctx * kv_bytes_per_position(draft.config, draft.model.cache_types)


def _compose(path, *, n_ctx, n_threads, memory_budget, streaming, experts, parallel, cache_ram, draft=0,
             kv_names=("f16", "f16")) -> Model:
    path = Path(path)
    opened = []  # what to close, last first, if loading fails
    try:
        file = HFModelFile(path, hf.gguf_name) if path.is_dir() else GGUFModelFile(path)
        opened.append(file)
        cfg, arch, flash = _validated(file)
        n_ctx = _check_ctx(n_ctx, cfg)
        _check_counts(n_threads, parallel)
        kv_types = cache_types(*kv_names, cfg)
        sequences = dict(sequences=parallel, prompt_cache=parse_size(cache_ram) if cache_ram else 0, draft=draft,
                         kv_type=cache_label(kv_types))
        threads = kernels_cpu.set_threads(n_threads) if n_threads else AutoThreads(kernels_cpu.set_threads(_cores()))
        store = FlashStore(file, _stream_settings(streaming)) if flash else WeightStore(file)
        opened[-1] = store  # closing the store closes the file
        tokenizer, tokenizer_bytes = _tokenizer(path, file, cfg)
        opened.append(tokenizer)
        budget = None if memory_budget is None else parse_size(memory_budget)
        plan, source, ffn, streams = _strategies(file, cfg, store, arch, flash, budget, n_ctx, tokenizer_bytes,
                                                 experts, opened, sequences, kv_bytes_per_position(cfg, kv_types))
        lm = arch(cfg, store, ffn, kv_types)
    except BaseException:
        for o in reversed(opened):
            o.close()
        raise
    return Model(path=path, config=cfg, store=store, tokenizer=tokenizer, lm=lm, experts=source, streams=streams, plan=plan,
                 memory_budget=budget, n_ctx=n_ctx, threads=threads, load_seconds=0.0,  # load_model times it
                 parallel=parallel, cache_ram=sequences["prompt_cache"])


def _cores() -> int:
    """The physical cores this process may run on (an affinity mask, `taskset`, counts)."""
    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return max(1, min(physical, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else physical))


def _validated(file):
    """(config, architecture class, whether it is a flash layout) of a model file, every
    part of it that later code trusts checked first: the metadata's values, each tensor's
    type and bytes, the flash layout's records, the tensors the architecture needs with
    the shapes the metadata implies, and the vocabulary llama.cpp will read (it must see
    nothing unchecked: its faults take the process down). ModelFormatError otherwise."""
    if file.kind == "hf":
        cfg = config_from_hf(file)
        arch = model_class(cfg.arch)
    else:
        arch = model_class(file.arch, file.path)
        cfg = config_from_gguf(file, arch)
    check_tensor_types(file)
    flash = file.kind == "gguf" and FLASH_KEY + ".version" in file.metadata
    if flash:
        validate_flash_layout(file)
    check_tensors(file, cfg, arch, flash)
    if file.kind == "gguf":
        check_tokenizer(file, cfg.n_vocab)
    return cfg, arch, flash


def _strategies(file, cfg, store, arch, flash: bool, budget, n_ctx: int, tokenizer_bytes: int, experts, opened,
                sequences: dict, kv_position: int):
    """The memory plan (None without a budget), a mixture's expert source (else None), one
    FFN strategy per layer, and what streams (each pass's reads and hits: take_pass). What
    holds the weights is decided here and only here. sequences: the plan's KV caches
    (sequences decoded together, their cache type) and prompt cache bytes; kv_position:
    a KV cache's bytes per position."""
    gelu = arch.activation == "gelu"
    plan = None
    if flash:  # FFN neurons streamed from the flash layout
        if budget is not None:
            plan = make_plan(store, budget, n_ctx, kv_position, cfg.n_vocab, tokenizer_bytes, **sequences)
            store.set_capacities(plan.capacities)
        return plan, None, [NeuronFFN(store, i, gelu) for i in range(cfg.n_layer)], [store]
    if cfg.n_expert:  # experts from the mapping, or streamed into a cache under a budget
        source, streams = ResidentExperts(store), []
        if budget is not None:
            from ..experts.plan import plan_experts
            from ..experts.store import StreamedExperts

            opts = _expert_options(experts)
            plan = plan_experts(file, cfg, budget, n_ctx, tokenizer_bytes,
                                opts["prefetch"] is True, kv_position=kv_position, **sequences)  # auto: off in a cache too small
            source = StreamedExperts(file, cfg, plan.n_slots, **opts)
            opened.append(source)
            streams = [source]
        return plan, source, [MoEFFN(store, source, cfg, i, gelu) for i in range(cfg.n_layer)], streams
    if budget is not None:  # every weight resident: the plan checks the budget holds them
        plan = plan_budget(budget, n_ctx, resident=store.resident_bytes, kv=n_ctx * kv_position,
                           buffers=tokenizer_bytes + 8 * cfg.n_vocab + SLACK + store.resident_bytes // 100,
                           advice="raise the budget, lower n_ctx, or stream its FFN from a flash layout "
                                  "(flashlm convert --flash OUT)", **sequences)
    return plan, None, [DenseFFN(store, i, gelu) for i in range(cfg.n_layer)], []


def _check_ctx(n_ctx, cfg) -> int:
    if n_ctx is None:
        n_ctx = min(4096, cfg.n_ctx_train)
    if not isinstance(n_ctx, int) or n_ctx < 8:
        raise InvalidArgumentError(f"n_ctx must be an integer >= 8, got {n_ctx!r}")
    return n_ctx


def _stream_settings(streaming) -> StreamSettings | None:
    """A flash layout's streaming settings: StreamSettings, a dict of its fields, or None."""
    if isinstance(streaming, dict):
        unknown = set(streaming) - set(StreamSettings.__dataclass_fields__)
        if unknown:
            raise InvalidArgumentError(f"unknown streaming setting(s): {', '.join(sorted(unknown))}")
        return StreamSettings(**streaming)
    return streaming


def _tokenizer(path: Path, file, cfg):
    """The model's tokenizer, and the RSS its tables took: measured the first time this
    process loads this file (later loads reuse freed memory and would measure less: one
    plan per file and process)."""
    rss0 = psutil.Process().memory_info().rss
    if file.kind == "gguf":
        tok = GGUFTokenizer(path, file.metadata, cfg.arch, file=file)
    else:
        tok = HFTokenizer(path, file.config)
        if tok.n_vocab > cfg.n_vocab:  # its ids would run past the embedding's rows
            raise ModelFormatError(f"{path}: tokenizer.json has {tok.n_vocab} tokens, more than config.json's"
                                   f" vocab_size {cfg.n_vocab}; download the model again")
    return tok, _TOKENIZER_BYTES.setdefault(str(path), max(0, psutil.Process().memory_info().rss - rss0))


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
