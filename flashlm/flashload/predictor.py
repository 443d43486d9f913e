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
  Costs r (n_embd + n_ff) bytes per layer (the factors held as Q8_0) and two small
  integer products.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from .. import kernels_cpu as K
from ..errors import ModelFormatError

PREDICTORS = ("gate", "lowrank")
Q8_0 = GGMLQuantizationType.Q8_0


def act(g: np.ndarray, gelu: bool) -> np.ndarray:
    """The gated FFN's activation (kernels_cpu.act: the same function the dense FFN applies)."""
    return K.act(g, gelu)


def n_keep(keep: float, n: int) -> int:
    """Neurons a token keeps of n: ceil(keep * n), at least one."""
    return max(1, min(n, int(np.ceil(keep * n))))


def top_fraction(score: np.ndarray, keep: float) -> np.ndarray:
    """Indices of the n_keep(keep, n) largest scores, ascending."""
    k = n_keep(keep, score.shape[0])
    if k == score.shape[0]:
        return np.arange(k)
    idx = np.argpartition(-score, k - 1)[:k]
    idx.sort()
    return idx


class GatePredictor:
    reads_gate = False

    def __init__(self, store):
        self.gates = [store.file.tensors[f"blk.{lb.layer}.ffn_gate.weight"] for lb in store.plans]
        self.nbytes = sum(g.nbytes for g in self.gates)  # mapped, touched every token

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
        t = store.file.tensors  # read with pread: the mapping's pages would stay resident too
        if f"blk.{store.plans[0].layer}.ffn_gate_lr_a" not in t:
            raise ModelFormatError(f"{store.file.path}: no low-rank gate factors; convert again")
        self.a, self.b = [], []
        for lb in store.plans:
            a = K.dequantize(store._read_copy(t[f"blk.{lb.layer}.ffn_gate_lr_a"]))
            b = K.dequantize(store._read_copy(t[f"blk.{lb.layer}.ffn_gate_lr_b"]))
            pad = (-a.shape[0]) % 32  # the rank padded to whole Q8_0 blocks, with zeros
            self.a.append(_q8_rows(np.pad(a, ((0, pad), (0, 0)))))
            self.b.append(_q8_rows(np.pad(b, ((0, 0), (0, pad)))))
        self.nbytes = sum(a.nbytes + b.nbytes for a, b in zip(self.a, self.b))

    @property
    def rank(self) -> int:
        return self.a[0].shape[0]

    def scores(self, i: int, x: np.ndarray, gelu: bool) -> tuple[np.ndarray, None]:
        return np.abs(act(K.matvec(K.matvec(x, self.a[i]), self.b[i]), gelu)), None

    def select(self, i: int, x: np.ndarray, keep: float, gelu: bool):
        score, _ = self.scores(i, x, gelu)
        return top_fraction(score, keep), None


def _q8_rows(m: np.ndarray):
    """A float factor as Q8_0 rows for the int8 kernels (a quarter of float32's bytes)."""
    from ..formats.modelfile import TensorRef

    data = np.ascontiguousarray(gguf_quants.quantize(np.ascontiguousarray(m, np.float32), Q8_0))
    return TensorRef("lowrank", Q8_0, m.shape, data, -1)


def make_predictor(name: str, store):
    return {"gate": GatePredictor, "lowrank": LowRankPredictor}[name](store)
