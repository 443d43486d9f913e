"""Reading model files around the page cache: aligned and huge-page buffers, a
thread-pool read engine, Linux native AIO and the disk probe. Shared by flashload
(FFN neurons) and experts (MoE experts); imports nothing of flashlm above the kernels."""

from .aio import NativeAIO  # noqa: F401
from .buffers import ALIGN, HUGE, aligned_empty, device_read_bytes, open_direct  # noqa: F401
from .reads import IOStats, ReadEngine, coalesce  # noqa: F401
