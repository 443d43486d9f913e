"""Expert bundles: each expert's gate, up and down slices side by side in one record.

In a GGUF, expert e of layer N is one byte range in each of the three stacked tensors
blk.N.ffn_{gate,up,down}_exps, so a cache miss costs three reads into a staging buffer
and a copy. A bundle file stores, layer after layer, expert after expert:

    record (layer, e) = gate slice | up slice | down slice | zeros to a 4 KiB multiple

so a miss is one direct read of one record straight into its cache slot (the slots are
records too): fewer, larger reads (benchmarks/README.md measures the difference). It costs disk
space as large as the experts (checked first: a GiB is left free); `bundle=False` /
`--no-bundle` opts out.

The file is made once per model, beside the models in the user cache
(~/.cache/flashlm/experts/), the first time the model streams its experts; its header
names the source file's size and modification time, and a changed source gets a new
bundle. Where it cannot be written (disk full, read-only cache) the experts stream from
the GGUF's stacked tensors, as before, with a one-line warning.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ..io import ALIGN
from .moe import PARTS

MAGIC = b"FLMEXPB1"
HEADER = ALIGN  # the header's bytes: magic, JSON, zeros; records start after it


def record_bytes(part_bytes) -> int:
    """One expert's record: its parts, rounded up to the 4 KiB direct I/O needs."""
    return -(-sum(part_bytes) // ALIGN) * ALIGN


def record_offset(layer: int, e: int, n_expert: int, record: int) -> int:
    """Where expert e of layer starts in the bundle."""
    return HEADER + (layer * n_expert + e) * record


def part_sizes(model_file, cfg) -> list[int]:
    """Bytes of one expert's gate, up and down slices."""
    return [model_file.tensors[f"blk.0.{p}.weight"].nbytes // cfg.n_expert for p in PARTS]


def file_mapping(model_file):
    """The mmap of a GGUF model file (gguf's reader maps it whole, at offset 0), or None
    where there is none or it cannot be told to drop pages (not Linux, say)."""
    mm = getattr(getattr(getattr(model_file, "reader", None), "data", None), "_mmap", None)
    return mm if mm is not None and hasattr(mmap, "MADV_DONTNEED") else None


def unmap(model_file, tensors) -> None:
    """Unmap the pages wholly inside these tensors of the model file's mapping from this
    process (the page cache keeps them; a later read maps them again)."""
    mm = file_mapping(model_file)
    if mm is None:
        return
    page = mmap.PAGESIZE
    for t in tensors:
        lo = -(-t.offset // page) * page
        hi = (t.offset + t.nbytes) // page * page
        if hi > lo:
            try:
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            except (OSError, ValueError):  # left mapped: RSS counts them
                return


def bundle_path(src: str | os.PathLike) -> Path:
    from ..paths import home

    src = Path(src).resolve()
    st = src.stat()
    key = hashlib.sha1(f"{src}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return home() / "experts" / f"{src.stem}-{key}.experts"


def _header(model_file, cfg) -> dict:
    st = Path(model_file.path).stat()
    return dict(source=str(Path(model_file.path).resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns,
                n_layer=cfg.n_layer, n_expert=cfg.n_expert, parts=part_sizes(model_file, cfg))


def read_header(path: str | os.PathLike) -> dict | None:
    """The bundle's header, or None if the file is not a whole bundle."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER)
    except OSError:
        return None
    if len(head) < HEADER or not head.startswith(MAGIC):
        return None
    try:
        meta = json.loads(head[len(MAGIC):].rstrip(b"\0"))
    except ValueError:
        return None
    want = HEADER + meta.get("n_layer", 0) * meta.get("n_expert", 0) * record_bytes(meta.get("parts", [0]))
    return meta if os.path.getsize(path) == want else None


def ensure_bundle(model_file, cfg, quiet: bool = False) -> Path:
    """The bundle of model_file's experts, written first if there is none (or a stale
    one); OSError if it cannot be written."""
    path = bundle_path(model_file.path)
    meta = _header(model_file, cfg)
    have = read_header(path)
    if have is not None and all(have.get(k) == v for k, v in meta.items()):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    parts = meta["parts"]
    rec = record_bytes(parts)
    total = cfg.n_layer * cfg.n_expert * rec
    free = shutil.disk_usage(path.parent).free
    if free < total + (1 << 30):  # leave the disk a GiB
        raise OSError(f"{path.parent} has {free / 2**30:.1f} GiB free; the bundle needs {total / 2**30:.1f} GiB + 1 GiB")
    t0 = time.perf_counter()
    tmp = path.with_suffix(f".partial{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            head = MAGIC + json.dumps(meta).encode()
            if len(head) > HEADER:
                raise OSError(f"the model's path is too long for a bundle header: {model_file.path}")
            f.write(head + b"\0" * (HEADER - len(head)))
            for i in range(cfg.n_layer):
                layer = np.zeros((cfg.n_expert, rec), dtype=np.uint8)
                o = 0
                stacks = [model_file.tensors[f"blk.{i}.{p}.weight"] for p in PARTS]
                for t, n in zip(stacks, parts):
                    layer[:, o:o + n] = np.asarray(t.data).reshape(-1).view(np.uint8).reshape(cfg.n_expert, n)
                    o += n
                unmap(model_file, stacks)  # read once: the process keeps none of it mapped (RSS within budget)
                f.write(layer.data)
                if not quiet and total > 64 << 20:
                    print(f"\rflashlm: bundling experts for streaming (once): layer {i + 1}/{cfg.n_layer}",
                          end="", file=sys.stderr, flush=True)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not quiet and total > 64 << 20:
        print(f" - {total / 2**20:.0f} MiB in {time.perf_counter() - t0:.1f} s, {path}", file=sys.stderr)
    return path


def map_resident_only(model_file, stacks) -> None:
    """Leave this process mapping the model file's resident weights and none of its
    expert stacks (those stream through the cache). Where the page cache holds the file
    in large folios (after a sequential read of it, say), a first touch of a weight next
    to an expert stack maps up to a whole folio of the stack with it: 32 MiB on the
    synthetic MoE, 20 MiB over budget + idle. So every page of the other weights is
    touched now (the plan counts them resident), and the stacks' pages unmapped after
    (the page cache keeps them; nothing here reads them through the mapping)."""
    mm = file_mapping(model_file)
    if mm is None:
        return
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # PTEs, not 2 MiB entries (which unmapping part of unmaps whole)
        try:
            mm.madvise(mmap.MADV_NOHUGEPAGE)
        except OSError:
            pass
    stacked = {t.name for layer in stacks for t in layer}
    page = mmap.PAGESIZE
    resident = [np.asarray(t.data).reshape(-1).view(np.uint8) for t in model_file.tensors.values()
                if t.name not in stacked and t.nbytes]
    _touch(resident, page)
    unmap(model_file, [t for layer in stacks for t in layer])
    _touch(resident, page)  # again: a 2 MiB entry mapped before this call was unmapped whole


def _touch(arrays, page: int) -> None:
    """Read a byte of every page of these arrays (mapping them)."""
    for a in arrays:
        int(a[::page].sum()) + int(a[-1])
