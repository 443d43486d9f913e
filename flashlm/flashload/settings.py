"""StreamSettings: how a FlashStore streams a flash layout's FFN neurons."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgumentError
from .predictor import PREDICTORS


@dataclass
class StreamSettings:
    """How a FlashStore streams (the ablation's switches).

    predictor: None (every neuron), "gate" or "lowrank" (predictor.py)
    keep:      fraction of each layer's neurons a token keeps (with a predictor); the
               default 0.8 keeps SmolLM2's perplexity within 2% with the gate
               predictor (benchmarks/flash_quality.py)
    window:    tokens whose neurons stay in DRAM (0: none)
    hot:       with a window, what it holds: True, the layer's first `capacity`
               neurons for good (in a calibrated flash file, the most often needed:
               layout.neuron_order), so what a token still reads is the contiguous
               tail of the records; False, the neurons of the last `window` tokens
               ("LLM in a flash"'s sliding window), least recently used out first
    prefetch:  with hot windows, start reading the next layer's tail while this layer
               computes (the pages its last token needed)
    bundled:   one read per neuron record; False reads gate, up and down rows
               separately (the paper's "no bundling" step)
    capacity:  neurons per layer the window may hold (None: all); what one token needs
               beyond it is read into a spill buffer for that token only
    verify:    check every record read against its checksum (a bad one is read again,
               then refused); False saves its cost (benchmarks/README.md) on a disk
               and file you trust
    """

    predictor: str | None = "gate"
    keep: float = 0.8
    window: int = 16
    hot: bool = True
    prefetch: bool = True
    bundled: bool = True
    capacity: int | None = None
    verify: bool = True

    def __post_init__(self):
        if not isinstance(self.keep, (int, float)) or not isinstance(self.window, int):
            raise InvalidArgumentError("keep must be a number and window an integer")
        if self.predictor not in (None, *PREDICTORS):
            raise InvalidArgumentError(f"unknown predictor {self.predictor!r}; choose from {', '.join(PREDICTORS)}")
        if not 0.0 < self.keep <= 1.0:
            raise InvalidArgumentError(f"keep must be in (0, 1], got {self.keep}")
        if self.window < 0:
            raise InvalidArgumentError(f"window must be >= 0, got {self.window}")
        if self.capacity is not None and (not isinstance(self.capacity, int) or self.capacity < 1):
            raise InvalidArgumentError(f"capacity must be a positive number of neurons, got {self.capacity!r}")
        if self.keep >= 1.0:  # every neuron: nothing to predict
            self.predictor, self.keep = None, 1.0
