"""The neuron-streamed FFN strategy (runtime/ffn.py's interface) over a FlashStore."""

from __future__ import annotations

import numpy as np


class NeuronFFN:
    """Layer `layer`'s FFN with its neurons streamed: the store predicts, reads and
    multiplies the ones each token needs (store.FlashStore.ffn_forward)."""

    on_route = None
    rows_independent = True  # prefill multiplies every neuron for every row

    def __init__(self, store, layer: int, gelu: bool):
        self.store, self.layer, self.gelu = store, layer, gelu

    def __call__(self, h: np.ndarray) -> np.ndarray:
        return self.store.ffn_forward(self.layer, h, self.gelu)

    def rows(self, h: np.ndarray) -> np.ndarray:
        return self.store.ffn_rows(self.layer, h, self.gelu)

    def weights(self) -> None:
        return None
