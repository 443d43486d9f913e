"""flashlm: run quantized LLMs on a laptop CPU.

    import flashlm
    with flashlm.load("smollm2-135m") as m:
        print(m.generate("The capital of France is", max_tokens=16, temperature=0))
"""

from __future__ import annotations

import os


def _numba_cache_dir() -> None:
    """Numba keeps compiled kernels beside their source (__pycache__); where the package
    folder is read-only (a system or shared install) they go under FLASHLM_HOME instead,
    so that only the first run compiles. NUMBA_CACHE_DIR, if set, wins."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    kernels = os.path.join(os.path.dirname(__file__), "kernels_cpu")
    if os.access(kernels, os.W_OK):
        return
    from .paths import home

    os.environ["NUMBA_CACHE_DIR"] = str(home() / "numba")
    import sys

    if "numba" in sys.modules:  # (imported before flashlm: its config was read already)
        sys.modules["numba"].config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"]


_numba_cache_dir()

from . import target  # noqa: E402,F401  (numba's target CPU, before numba compiles anything)

from .errors import (ContextLengthError, FlashLMError, InvalidArgumentError, ModelFetchError,  # noqa: F401
                     ModelFormatError, ModelNotFoundError, UnsupportedModelError)
from .runtime.model import Chunk, Model  # noqa: F401
from .stats import TokenStats  # noqa: F401
from .formats.registry import DEFAULT_MODEL, MODELS  # noqa: F401

__version__ = "0.1.0"


def load(model: str | os.PathLike | None = None, *, n_ctx: int | None = None, n_threads: int | None = None,
         memory_budget: str | int | None = None, streaming=None, experts: dict | None = None,
         parallel: int = 1, cache_ram: str | int = 0, speculative=None, cache_type_k: str = "f16",
         cache_type_v: str = "f16") -> Model:
    """Load a model: a .gguf path, an HF folder, or a registry name ("smollm2-135m",
    "gemma3-270m"; fetched into the cache on first use). None loads the default model.

    n_ctx: context length (default min(4096, the model's)); n_threads: kernel threads
    (default: physical cores); memory_budget: bytes or a size like "800MB".
    streaming: for a flash-layout file (`flashlm convert --flash`), how its FFN neurons
    are streamed: a flashload.settings.StreamSettings or a dict of its fields.
    experts: for a mixture-of-experts model under a memory_budget (its experts stream
    into a cache): {"policy": "freq" (default) | "score" | "lru" | "lfu", "prefetch": "auto" (default:
    on or off, whichever decodes faster here, measured while decoding) | True | False}.
    parallel, cache_ram: what Model.batch() (and `flashlm serve`) decode at once: the
    sequences, each with its own KV cache, and the bytes of prompt cache kept for later
    prompts; the memory plan counts both.
    speculative: speculative decoding for every generation (runtime/speculate.py): a
    draft source, "ngram" (prompt lookup), "model:PATH" (a small model with the same
    vocabulary; the plan counts it) or "self" (a streamed model from what it holds in
    memory), or a dict {"source", "draft_max", "draft_min", "adaptive"}. Greedy output
    is the same with it as without.
    cache_type_k, cache_type_v: the KV cache's type for keys and for values, llama.cpp's
    --cache-type-k/-v: "f16" (the default), "q8_0" (about half the memory, perplexity
    within a fraction of a percent) or "q4_0" (about a quarter); attention reads the
    blocks where they lie. The memory plan counts the type's bytes.
    """
    from .formats.registry import resolve
    from .runtime.loader import load_model

    return load_model(resolve(model), n_ctx=n_ctx, n_threads=n_threads, memory_budget=memory_budget,
                      streaming=streaming, experts=experts, parallel=parallel, cache_ram=cache_ram,
                      speculative=speculative, cache_type_k=cache_type_k, cache_type_v=cache_type_v)
