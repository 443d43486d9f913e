"""Loading the compiled kernels' machine code before a model needs it: from numba's cache,
or, where the cache lacks it (a first run, an upgrade, another CPU), compiling it, which
takes a minute or two, with a bar on stderr (flashlm.progress) instead of a silent wait
before the first token."""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import numba
import numpy as np
from gguf import GGMLQuantizationType

from .. import kernels_cpu as K
from .. import progress
from ..cache import SlotCache
from ..formats.modelfile import TensorRef
from ..kernels_cpu import F16_TABLE
from ..kernels_cpu import decode as D
from ..kernels_cpu import layer as L
from ..kernels_cpu import moe as M

COMPILING = "compiling kernels for this CPU (first run only, about a minute)"
Q8_0 = GGMLQuantizationType.Q8_0
_warmed: set[str] = set()  # steps run in this process


def warm_decode_kernels() -> None:
    """Run the compiled decode step, its per-layer pieces, the layer steps prefill runs,
    the experts' decode and routing and the expert cache's bookkeeping once on a tiny
    all-zero model (one layer, width 32, Q8_0), with the argument types real models
    pass: their machine code is then loaded (from numba's cache) as part of an idle
    process, like every other kernel, not at a model's first token."""
    warm(["decode step", "decode by layer", "decode batch", "prompt steps", "experts", "routing", "expert cache"])


def warm_kernels_for(model) -> None:
    """Warm the kernels a loaded Model runs: its decoder, its prompt's products, and what
    its FFN strategy calls (neuron windows, experts, routing, the expert cache)."""
    warm(steps_for(model))


def steps_for(model) -> list[str]:
    """The STEPS that a loaded Model's calls take. (Every weight reaches the kernels
    read-only, held in memory or mapped from the file alike: one compiled variant of
    each, not two; formats.modelfile.TensorRef.)"""
    from ..experts.store import StreamedExperts
    from ..flashload.store import FlashStore
    from .blocks import LayerDecoder

    lm = model.model
    steps = ["prompt steps", "products"]
    if lm.fused is not None:
        steps += ["decode by layer" if isinstance(lm.fused, LayerDecoder) else "decode step", "decode batch"]
    if isinstance(model.store, FlashStore):
        steps.append("neuron windows")
    if model.experts is not None:
        steps += ["routing", "experts"]
        if isinstance(model.experts, StreamedExperts):
            steps.append("expert cache")
    return steps


def warm(steps: list[str]) -> None:
    """Run these STEPS once per process; a bar of them on stderr once numba has to
    compile one (its cache lacks it)."""
    todo = [s for s in steps if s not in _warmed]
    if not todo:
        return
    with progress.task(COMPILING, total=len(todo), delay=None, done="compiled the kernels for this CPU") as bar, \
            _on_compile(bar.show):
        for k, name in enumerate(todo):
            bar.update(k, what=name)
            STEPS[name](_tiny())
            _warmed.add(name)
        bar.update(len(todo), what="")


@contextmanager
def _on_compile(call):
    """Call `call()` when numba starts compiling a function (not when it loads one from its cache)."""
    from numba.core import event

    class Listener(event.Listener):
        def on_start(self, ev):
            call()

        def on_end(self, ev):
            pass

    listener = Listener()
    event.register("numba:compile", listener)
    try:
        yield
    finally:
        event.unregister("numba:compile", listener)


def _tiny() -> SimpleNamespace:
    """An all-zero model of one layer, width d = 32, Q8_0 (34 bytes a row), in decode_step's
    arena form, read-only (as the kernels get every weight)."""
    d, n = 32, 2 * D.N_SLOTS + 2
    arena = np.zeros(n * d * 34, dtype=np.uint8)
    arena.setflags(write=False)
    t = SimpleNamespace(d=d, arena=arena, nt=numba.get_num_threads(), rows=np.arange(d, dtype=np.int64))
    t.mats = np.array([(i * d * 34, d, 34) for i in range(n)], dtype=np.int64)
    t.qt = np.full(n, int(Q8_0), dtype=np.int64)
    t.a = L.arch_array(n_layer=1, n_embd=d, n_head=1, n_head_kv=1, head_dim=d, v_head_dim=d, rope_dim=d, neox=True,
                       window=0, qk_norm=False, qk_norm_full=False, post_norms=False, gelu=False, scale_q=False,
                       bias=False, eps=1e-6, rope_base=10000.0, rope_base_swa=10000.0, rope_scale=1.0,
                       attn_scale=d ** -0.5, embed_scale=1.0, softcap=0.0, residual=1.0, logit_scale=1.0)
    t.vecs = np.ones((2, len(L.VECS), d), dtype=np.float32)
    t.swa = np.zeros(1, dtype=np.bool_)
    t.kc, t.vc = np.zeros((1, 1, 4, d), dtype=np.uint16), np.zeros((1, 1, 4, d), dtype=np.uint16)
    t.x, t.h, t.o = (np.zeros((1, d), dtype=np.float32) for _ in range(3))
    t.logits = np.zeros(d, dtype=np.float32)
    # a (d, d) Q8_0 weight, as the products take it (a TensorRef over rows of the arena)
    t.w = TensorRef("w", Q8_0, (d, d), arena[:d * 34].reshape(d, 34), 0)
    return t


def _decode_step(t) -> None:
    D.decode_step(0, 0, t.arena, t.mats, t.qt, t.vecs, t.swa, t.kc, t.vc, t.a, t.nt, F16_TABLE, t.rows, t.logits)


def _decode_by_layer(t) -> None:
    """decode_step in pieces, around an FFN that runs in Python (flash layouts, experts)."""
    D.decode_embed(0, t.arena, t.mats, t.qt, t.a, F16_TABLE, t.x[0])
    D.decode_attn(0, 1, t.x, t.h, t.arena, t.mats, t.qt, t.vecs, t.swa, t.kc, t.vc, t.a, t.nt, F16_TABLE, t.rows)
    D.decode_add_ffn(0, t.o, t.x, t.vecs, t.a)
    D.decode_head(t.x, t.arena, t.mats, t.qt, t.vecs, t.a, t.nt, F16_TABLE, t.rows, t.logits)


def _decode_batch(t) -> None:
    """Several rows' decode step at once (the batch engine's sequences, a speculative
    verification's drafted tokens), whole and in the pieces around a Python FFN."""
    pk, pv = t.kc[None], t.vc[None]
    toks, pos, slots = np.zeros(1, dtype=np.int64), np.ones(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
    D.decode_batch(toks, pos, slots, t.arena, t.mats, t.qt, t.vecs, t.swa, pk, pv, t.a, t.nt, F16_TABLE, t.rows,
                   t.logits[None])
    D.decode_embed_batch(toks, t.arena, t.mats, t.qt, t.a, F16_TABLE, t.x)
    D.decode_attn_batch(0, pos, slots, t.x, t.h, t.arena, t.mats, t.qt, t.vecs, t.swa, pk, pv, t.a, t.nt, F16_TABLE,
                        t.rows)
    D.decode_head_batch(t.x, t.arena, t.mats, t.qt, t.vecs, t.a, t.nt, F16_TABLE, t.rows, t.logits[None])


def _prompt_steps(t) -> None:
    """A prompt's layer steps (two tokens), its attention and FFN activation."""
    x2, h2, q2, k2, v2 = (np.zeros((2, t.d), dtype=np.float32) for _ in range(5))
    L.scale_rows(x2, 1.0)
    L.norm_rows(x2, t.vecs[0, 0], 1e-6, h2)
    L.qkv_rows(0, 0, q2, k2, v2, t.vecs[0], False, t.kc, t.vc, t.a)
    K.attend(q2.reshape(2, 1, t.d), t.kc, t.vc, 0, 0, 1.0)
    L.attn_residual(q2, x2, h2, t.vecs[0], t.a)
    K.glu(q2, k2, False)
    K.act(q2[0], False)
    L.ffn_residual(q2, x2, t.vecs[0], t.a)
    L.logits_rows(q2, t.a)


def _products(t) -> None:
    """A weight's products as the model's Python code calls them: a prompt's (two tokens;
    the integer GEMM or BLAS, as on this CPU), one token's (all rows, some rows), the
    transposed one (weights in memory), embedding rows and the whole tensor."""
    x2 = np.zeros((2, t.d), dtype=np.float32)
    K.linear_many(x2, [t.w, t.w])
    K.linear(x2[:1], t.w)
    K.matvec(x2[0], t.w, t.rows[:4])
    K.matvec_t(np.ones(4, dtype=np.float32), t.w, t.rows[:4], np.zeros(t.d, dtype=np.float32))  # a flash window's
    K.embed(t.w, t.rows[:2])
    K.dequantize(t.w)


def _neuron_windows(t) -> None:
    """A flash layer's window: its cache of rows, records copied into them, and the
    products over records read past it (a tail buffer's rows: strided views, another
    array type to numba than the window's)."""
    from ..flashload.window import _put_rows

    rec = np.zeros((4, 3 * 34), dtype=np.uint8)
    tail = [TensorRef("w", Q8_0, (4, t.d), rec[:, k * 34:(k + 1) * 34], 0) for k in range(3)]
    rows = t.rows[:2]
    K.matvec(t.x[0], tail[0], rows)
    K.matvec_t_split(np.ones(2, dtype=np.float32), t.w.data, tail[2].data, 1, int(Q8_0), rows,
                     np.zeros(t.d, dtype=np.float32))

    cache = SlotCache(4, 0, "lru", n_keys=8)
    slots = cache.assign(np.arange(2, dtype=np.int64), pin=False)[0]
    cache.expire(0)
    dst = np.zeros((4, 34), dtype=np.uint8)
    _put_rows(dst, slots, np.zeros((2, 68), dtype=np.uint8), 34)


def _experts(t) -> None:
    """A token's experts: from the mapped file, or the expert cache's pool (in memory);
    whole, and in parts, as a streamed token computes its cached experts while the
    others are read."""
    shapes = np.array([(t.d, 34)] * 3, dtype=np.int64)
    offs = np.zeros((1, 3), dtype=np.int64)
    qt = t.qt[:3].copy()
    M.moe_decode(t.arena, offs, shapes, qt, t.x[0], np.ones(1, dtype=np.float32), False, F16_TABLE, t.nt, t.rows,
                 np.zeros((1, t.d), dtype=np.float32)[0])
    y = np.zeros((1, t.d), dtype=np.float32)
    M.moe_experts(t.arena, offs, np.zeros(1, dtype=np.int64), shapes, qt, t.x[0], False, F16_TABLE, t.nt, t.rows, y)
    M.moe_combine(y, np.ones(1, dtype=np.float32), np.zeros(t.d, dtype=np.float32))


def _routing(t) -> None:
    """A token's routing (a float32 router of 2 experts; with the next layer's, to
    prefetch) and a prompt's."""
    router = np.zeros((2, 4 * t.d), dtype=np.uint8)
    router.setflags(write=False)
    f32 = int(GGMLQuantizationType.F32)
    x, x2 = t.x[0], np.zeros((2, t.d), dtype=np.float32)
    ids, wts, p = np.empty(1, dtype=np.int64), np.empty(1, dtype=np.float32), np.empty(2, dtype=np.float32)
    M.moe_route(router, f32, x, False, True, 0.0, F16_TABLE, t.rows, ids, wts, p)
    M.moe_route_ahead(router, f32, x, False, True, 0.0, F16_TABLE, t.rows, ids, wts, p, router, f32, t.rows,
                      ids.copy(), wts.copy(), p.copy())
    M.moe_route_rows(router, f32, x2, False, True, 0.0, F16_TABLE, t.rows, ids.reshape(1, 1).repeat(2, 0),
                     wts.reshape(1, 1).repeat(2, 0), p.reshape(1, 2).repeat(2, 0))


def _expert_cache(t) -> None:
    cache = SlotCache(2, 64, "score", n_keys=2)
    ids, p = np.zeros(1, dtype=np.int64), np.zeros(2, dtype=np.float32)
    cache.observe(0, p)
    cache.observe_used(0, 2, ids[None])
    cache.assign(ids, pin=True)


STEPS = {"decode step": _decode_step, "decode by layer": _decode_by_layer, "decode batch": _decode_batch,
         "prompt steps": _prompt_steps,
         "products": _products, "neuron windows": _neuron_windows, "experts": _experts, "routing": _routing,
         "expert cache": _expert_cache}
