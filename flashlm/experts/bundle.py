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

Checksums: after the records, a table of each record's xxh3_64 (little-endian uint64, key
order, zeros to 4 KiB); the header holds the table's own xxh3_64. A bundle is verified
when opened (header, size, the table's checksum; one that fails is written again, with a
one-line notice) and each record when read (store.py: a bad one is read again, then a
ModelFormatError). The file is written whole: a temporary file beside it, fsync, rename,
fsync of the folder, under a lock (another process building the same bundle waits, then
uses it); a killed writer leaves only its temporary file, removed by the next writer.

    header (4 KiB) | records, (layer, e) in order | checksum table
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from xxhash import xxh3_64_intdigest

from .. import progress
from ..errors import ModelFormatError
from ..io import ALIGN
from .moe import PARTS

MAGIC = b"FLMEXPB2"  # B1: no checksums
HEADER = ALIGN  # the header's bytes: magic, JSON, zeros; records start after it


def record_bytes(part_bytes) -> int:
    """One expert's record: its parts, rounded up to the 4 KiB direct I/O needs."""
    return -(-sum(part_bytes) // ALIGN) * ALIGN


def record_offset(layer: int, e: int, n_expert: int, record: int) -> int:
    """Where expert e of layer starts in the bundle."""
    return HEADER + (layer * n_expert + e) * record


def table_bytes(n_records: int) -> int:
    """The checksum table's bytes: 8 a record, rounded up to 4 KiB."""
    return -(-n_records * 8 // ALIGN) * ALIGN


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
    """The bundle's header, or None if the file is not a whole, intact bundle."""
    return _inspect(path)[0]


def read_checksums(path: str | os.PathLike) -> list[int]:
    """Each record's xxh3_64, key order (layer * n_expert + e), from an intact bundle;
    ModelFormatError otherwise."""
    meta, sums, why = _inspect(path)
    if meta is None:
        raise ModelFormatError(f"{path} {why or 'is missing'}; delete it: the next load writes it again")
    return sums


def _inspect(path) -> tuple[dict | None, list[int] | None, str | None]:
    """(header, checksums, None) of an intact bundle, else (None, None, why not): "" for no file."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER)
            if not head.startswith(MAGIC):
                return None, None, ("was written by another version of flashlm" if head.startswith(MAGIC[:6])
                                    else "is not an expert bundle")
            meta = json.loads(head[len(MAGIC):].rstrip(b"\0"))
            n = meta["n_layer"] * meta["n_expert"]
            end = HEADER + n * record_bytes(meta["parts"])
            size = os.fstat(f.fileno()).st_size
            if size != end + table_bytes(n):
                return None, None, f"has {size:,} bytes, not {end + table_bytes(n):,} (cut short?)"
            f.seek(end)
            table = f.read(n * 8)
    except FileNotFoundError:
        return None, None, ""
    except OSError as e:
        return None, None, f"cannot be read ({e})"
    except (ValueError, KeyError, TypeError):
        return None, None, "has a damaged header"
    if xxh3_64_intdigest(table) != meta.get("table"):
        return None, None, "has a damaged checksum table"
    return meta, np.frombuffer(table, dtype="<u8").tolist(), None


def ensure_bundle(model_file, cfg, quiet: bool = False) -> Path:
    """The bundle of model_file's experts, verified, written first if there is none (or a
    stale or damaged one); OSError if it cannot be written."""
    path = bundle_path(model_file.path)
    meta = _header(model_file, cfg)
    if _usable(path, meta) is None:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path):
        why = _usable(path, meta)  # again: another process may have written it meanwhile
        if why is None:
            return path
        if why:
            print(f"flashlm: the expert bundle {path} {why}: writing it again", file=sys.stderr)
        clear_partials(path, locked=True)
        _write_bundle(model_file, cfg, path, meta, quiet)
    return path


def _usable(path: Path, meta: dict) -> str | None:
    """None where path is an intact bundle made with header meta, else why not ("": no file)."""
    have, _, why = _inspect(path)
    if have is not None and any(have.get(k) != v for k, v in meta.items()):
        return "was made from another file"
    return why


def _write_bundle(model_file, cfg, path: Path, meta: dict, quiet: bool) -> None:
    parts = meta["parts"]
    rec = record_bytes(parts)
    total = cfg.n_layer * cfg.n_expert * rec
    free = shutil.disk_usage(path.parent).free
    if free < total + (1 << 30):  # leave the disk a GiB
        raise OSError(f"{path.parent} has {free / 2**30:.1f} GiB free; the bundle needs {total / 2**30:.1f} GiB + 1 GiB")
    if len(_head(meta, 2**64 - 1)) > HEADER:
        raise OSError(f"the model's path is too long for a bundle header: {model_file.path}")
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as f, progress.task("bundling experts for streaming (once)", cfg.n_layer,
                                                 delay=None if quiet else 1.0,
                                                 done=f"bundled {total / 2**20:.0f} MiB of experts in {path}") as t:
            f.write(b"\0" * HEADER)  # the header last, once the table's checksum is known
            sums = []
            for i in range(cfg.n_layer):
                layer = _layer_records(model_file, cfg, i, parts, rec)
                sums += [xxh3_64_intdigest(r) for r in layer]
                f.write(layer.data)
                t.update(i + 1, what=f"layer {i + 1}")
            table = np.zeros(table_bytes(len(sums)) // 8, dtype="<u8")
            table[:len(sums)] = sums
            f.write(table.data)
            f.seek(0)
            f.write(_head(meta, xxh3_64_intdigest(table[:len(sums)])))
        replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _head(meta: dict, table_sum: int) -> bytes:
    """The header's bytes but its trailing zeros: magic, then meta and the table's checksum as JSON."""
    return MAGIC + json.dumps({**meta, "table": table_sum}).encode()


def _layer_records(model_file, cfg, i: int, parts, rec: int) -> np.ndarray:
    """Layer i's records (n_expert, rec): each expert's gate, up and down slices, zeros."""
    layer = np.zeros((cfg.n_expert, rec), dtype=np.uint8)
    o = 0
    stacks = [model_file.tensors[f"blk.{i}.{p}.weight"] for p in PARTS]
    for t, n in zip(stacks, parts):
        layer[:, o:o + n] = np.asarray(t.data).reshape(-1).view(np.uint8).reshape(cfg.n_expert, n)
        o += n
    unmap(model_file, stacks)  # read once: the process keeps none of it mapped (RSS within budget)
    return layer


# -- files written whole (the expert bundle here, the flash conversion in runtime/convert.py)

@contextmanager
def file_lock(path: Path):
    """Hold an exclusive lock on path's lock file (path + ".lock") while one process
    writes path; another waits (the lock ends with its holder, a killed one too)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: each writer's own temporary file and the rename suffice
        yield
        return
    with open(f"{path}.lock", "ab") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"flashlm: waiting for another process writing {path}", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield  # closing the file ends the lock


def partial_path(path: Path) -> Path:
    """This process's temporary file for path, beside it (the rename stays in one file system)."""
    return path.with_name(f"{path.name}.{os.getpid()}.partial")


def clear_partials(path: Path, locked: bool = False) -> None:
    """Remove the temporary files of path left by writers that are gone (killed, say):
    every one where the caller holds path's lock (file_lock: every writer holds it), else
    those of processes that no longer run."""
    head = f"{path.name}."
    for p in path.parent.iterdir():
        pid = p.name[len(head):-len(".partial")]
        if p.name.startswith(head) and p.name.endswith(".partial") and pid.isdigit() and (
                locked or not _alive(int(pid))):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process's own is not being written (it is about to be)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        pass
    return True


def replace_durably(tmp: Path, path: Path) -> None:
    """Put the written file tmp in path's place, so that a crash at any point leaves path
    as it was or whole: tmp's bytes on disk (fsync), the rename, then the folder's entry."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a folder that cannot be opened (not POSIX): the rename stands
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse it
        pass
    finally:
        os.close(fd)


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
