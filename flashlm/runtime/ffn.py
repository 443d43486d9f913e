"""The FFN strategies' one small interface, and the resident dense FFN.

A layer's FFN is an object the loader (loader.py) chose for it:

    ffn(h)          (T, n_embd) float32 -> (T, n_embd): the FFN before any post-norm
                    (one row: a decode step's; several: a prefill's, computed as one)
    ffn.rows(h)     several tokens decoded in one pass (a speculative verification):
                    each row what ffn(h[t:t+1]) gives, and what streams is read once
                    for all of them (the union of their neurons or experts)
    ffn.weights()   the resident (gate, up, down) TensorRefs the compiled decode step
                    may read straight from the mapping, or None: it runs in Python
                    between the compiled attention calls (blocks.LayerDecoder)
    ffn.on_route    None, or called with each routing decision of a mixture of experts
    ffn.rows_independent
                    whether a prefill computes each token's row alike whatever tokens
                    share the pass: then a KV cache prefix can be reused bit for bit

The strategies: `DenseFFN` (here), `flashload.ffn.NeuronFFN` (neurons streamed from a
flash layout) and `experts.moe.MoEFFN` (experts from a resident or streamed source).
Model and architecture code call them and never ask which they hold.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .. import kernels_cpu as K


class FFN(Protocol):
    on_route: object
    rows_independent: bool

    def __call__(self, h: np.ndarray) -> np.ndarray: ...

    def rows(self, h: np.ndarray) -> np.ndarray: ...

    def weights(self) -> tuple | None: ...


class DenseFFN:
    """down(act(gate h) * up h) with every weight resident (the mapped file)."""

    on_route = None
    rows_independent = True

    def __init__(self, store, layer: int, gelu: bool):
        self.refs = tuple(store.get(f"blk.{layer}.{n}.weight") for n in ("ffn_gate", "ffn_up", "ffn_down"))
        self.gelu = gelu

    def __call__(self, h: np.ndarray) -> np.ndarray:
        gate, up, down = self.refs
        g, u = K.linear_many(h, [gate, up])
        return K.linear(K.glu(g, u, self.gelu), down)

    def rows(self, h: np.ndarray) -> np.ndarray:
        return np.concatenate([self(h[t:t + 1]) for t in range(h.shape[0])])

    def weights(self) -> tuple:
        return self.refs
