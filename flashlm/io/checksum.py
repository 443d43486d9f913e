"""Checksums of streamed records: xxh3_64 from the `xxhash` package, one per record.

Measured on 19,000 flash records of 1,332 bytes (a token's reads at half the FFN held):
2.4 ms a call per record, against 6.0 ms for XXH64 compiled with numba on 2 threads; the
per-call cost dominates (the whole buffer at once: 0.65 ms). See benchmarks/README.md."""

from __future__ import annotations

import numpy as np
from xxhash import xxh3_64_intdigest


def record_sums(data: np.ndarray, rows=None) -> np.ndarray:
    """xxh3_64 of each row (or of rows `rows`) of a 2-D uint8 array with contiguous rows;
    uint64 (n,)."""
    picked = data if rows is None else (data[r] for r in np.asarray(rows).tolist())
    n = data.shape[0] if rows is None else len(rows)
    return np.fromiter((xxh3_64_intdigest(r) for r in picked), dtype=np.uint64, count=n)
