"""Training-free sparsity predictors for gated FFNs (SwiGLU, GeGLU).

These models have no ReLU zeros: every neuron fires a little. A predictor ranks a
layer's neurons for the current token by the magnitude of their activation
|act(gate . x)|, and the token keeps the top fraction `keep` of them (a per-token
top-k, which is what a per-layer calibrated threshold gives on average).

- "gate" (CATS, Lee et al. 2024): the gate matrix stays resident and is computed
  exactly; the ranking is exact and the kept neurons' gate values are reused, so only
  their up and down rows are streamed. Costs the gate's bytes and a third of the FFN
  compute.
- "lowrank": a rank-r truncated SVD of the gate (W_gate ~ B A, made by the converter)
  estimates the gate; the kept neurons' true gate rows come with their records.
  Costs r (n_embd + n_ff) floats per layer and little compute.
"""

from __future__ import annotations

import numpy as np

from .. import kernels_cpu as K

PREDICTORS = ("gate", "lowrank")


def act(g: np.ndarray, gelu: bool) -> np.ndarray:
    if gelu:
        return K.gelu(g)
    with np.errstate(over="ignore"):
        return K.silu(g)


def top_fraction(score: np.ndarray, keep: float) -> np.ndarray:
    """Indices of the ceil(keep * n) largest scores, ascending."""
    k = max(1, min(score.shape[0], int(np.ceil(keep * score.shape[0]))))
    if k == score.shape[0]:
        return np.arange(k)
    idx = np.argpartition(-score, k - 1)[:k]
    idx.sort()
    return idx


class GatePredictor:
    reads_gate = False

    def __init__(self, store):
        self.gates = [store.file.tensors[f"blk.{lb.layer}.ffn_gate.weight"] for lb in store.plans]

    def scores(self, i: int, x: np.ndarray, gelu: bool) -> tuple[np.ndarray, np.ndarray]:
        g = K.matvec(x, self.gates[i])
        return np.abs(act(g, gelu)), g

    def select(self, i: int, x: np.ndarray, keep: float, gelu: bool):
        score, g = self.scores(i, x, gelu)
        idx = top_fraction(score, keep)
        return idx, g[idx]


class LowRankPredictor:
    reads_gate = True

    def __init__(self, store):
        t = store.file.tensors
        self.a = [K.dequantize(t[f"blk.{lb.layer}.ffn_gate_lr_a"]) for lb in store.plans]
        self.b = [K.dequantize(t[f"blk.{lb.layer}.ffn_gate_lr_b"]) for lb in store.plans]

    @property
    def rank(self) -> int:
        return self.a[0].shape[0]

    def scores(self, i: int, x: np.ndarray, gelu: bool) -> tuple[np.ndarray, None]:
        return np.abs(act(self.b[i] @ (self.a[i] @ x), gelu)), None

    def select(self, i: int, x: np.ndarray, keep: float, gelu: bool):
        score, _ = self.scores(i, x, gelu)
        return top_fraction(score, keep), None


def make_predictor(name: str, store):
    return {"gate": GatePredictor, "lowrank": LowRankPredictor}[name](store)
