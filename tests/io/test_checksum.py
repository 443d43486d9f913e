"""Record checksums (io/checksum.py) are the xxhash package's xxh3_64 of each row."""

import numpy as np
import xxhash

from flashlm.io.checksum import record_sums


def test_record_sums_are_each_rows_xxh3_64():
    rng = np.random.default_rng(0)
    for width in [0, 1, 7, 64, 1332]:
        data = rng.integers(0, 256, (6, width), dtype=np.uint8)
        want = [xxhash.xxh3_64_intdigest(r.tobytes()) for r in data]
        assert record_sums(data).tolist() == want, width
        assert record_sums(data, np.array([4, 1])).tolist() == [want[4], want[1]]
        assert record_sums(data, []).tolist() == []
