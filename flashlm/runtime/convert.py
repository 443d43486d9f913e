"""Flash conversion: write a GGUF's flash layout (flashload/layout.py), then order each
layer's neurons by how often the model itself needs them (calibration runs the model,
so it lives here, above the format)."""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import FlashLMError
from ..experts.bundle import clear_partials, file_lock, partial_path, replace_durably
from ..flashload.layout import is_current, permute_neurons, write_layout
from ..flashload.predictor import top_fraction
from ..formats.modelfile import GGUFModelFile
from ..formats.registry import resolve
from ..paths import home
from ..progress import task

CALIBRATION_PROMPTS = (
    "Once upon a time, in a small village by the sea,",
    "def parse_arguments(argv):",
    "The mitochondria is the part of the cell that",
    "Dear members of the committee, I am writing to",
    "Q: Why is the sky blue?\nA:",
    "The history of the Roman Empire begins",
)
CALIBRATION_TOKENS = 192
CALIBRATION_KEEP = 0.8


def convert(src: str | os.PathLike, out: str | os.PathLike, force: bool = False, progress=None,
            rank: int | None = None, calibration_tokens: int = CALIBRATION_TOKENS, n_threads: int | None = None) -> Path:
    """Write the flash layout of GGUF model `src` to `out`.

    Refuses to overwrite an existing `out` unless force. rank: of the low-rank gate
    predictor (default n_embd / 8). calibration_tokens: tokens the model writes to
    order its neurons by how often they are needed (0: keep the source's order).
    progress(done, total, what), if given, is called as tensors are written and as
    calibration goes (None: a bar on stderr shows them, flashlm.progress). Writes a
    ".partial" file of this process's own beside out, then fsync and rename, so a failure
    or a crash leaves nothing half-written under the final name, and two processes
    converting at once leave one whole file (the last renamed). n_threads: the calibration's
    kernel threads (default: chosen while decoding, as flashlm.load's).

    The conversion is deterministic (fixed seeds; no result depends on the thread
    count), so with the default options a current conversion of src in the cache folder
    (`cached`) is copied instead of made again.
    """
    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise FlashLMError("the output must be a different file from the model")
    if out.exists() and not force:
        raise FlashLMError(f"{out} already exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise FlashLMError(f"{out.parent}: no such folder")
    made = _cache_path(src)
    if rank is None and calibration_tokens == CALIBRATION_TOKENS and out.resolve() != made.resolve() \
            and _current(made, src):
        return _copy(made, out)
    with _reporting(src, progress) as report:
        return _write(src, out, report, rank, calibration_tokens, n_threads=n_threads)


def _cache_path(src: Path) -> Path:
    return home() / "flash" / (src.stem + ".flash.gguf")


def _copy(made: Path, out: Path) -> Path:
    """out as a copy of the conversion `made`, written as _write writes."""
    with _writing(out) as tmp:
        shutil.copyfile(made, tmp)
    return out


@contextmanager
def _writing(out: Path, locked: bool = False):
    """This process's temporary file for out (those of killed conversions cleared first;
    locked: the caller holds out's file_lock), fsynced and renamed to out when the block
    ends, removed if it fails."""
    clear_partials(out, locked)
    tmp = partial_path(out)
    try:
        yield tmp
        replace_durably(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FlashLMError(f"cannot write {out}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def _reporting(src: Path, progress):
    """The progress callback a conversion calls: the caller's, else a bar on stderr."""
    if progress is not None:
        yield progress
        return
    with task(f"converting {src.name} to the flash layout", done=f"converted {src.name} to the flash layout") as t:
        yield t.update


def _write(src: Path, out: Path, progress, rank, calibration_tokens: int, locked: bool = False,
           n_threads: int | None = None) -> Path:
    """Convert src to out through this process's temporary file (locked: the caller holds out's file_lock)."""
    with _writing(out, locked) as tmp:
        mf = GGUFModelFile(src)
        try:
            write_layout(mf, src, tmp, rank, progress, calibrated=calibration_tokens > 0)
        finally:
            mf.close()
        if calibration_tokens:
            permute_neurons(tmp, neuron_order(tmp, calibration_tokens, progress=progress, n_threads=n_threads))
    return out


def cached(model: str | os.PathLike, progress=None, n_threads: int | None = None) -> Path:
    """The flash layout of `model` (a registry name or a GGUF path) in the cache folder,
    converted when it is missing, was written by another layout version, or was made
    from another file (size or modification time not the source's). One process converts
    at a time (a lock); another waits, then uses its file. progress, n_threads: as convert's."""
    src = Path(resolve(model))
    out = _cache_path(src)
    if _current(out, src):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out):
        if _current(out, src):  # converted by another process meanwhile
            return out
        with _reporting(src, progress) as report:
            return _write(src, out, report, None, CALIBRATION_TOKENS, locked=True, n_threads=n_threads)


def _current(out: Path, src: Path) -> bool:
    """Whether out is src's flash layout as it is now; a file that cannot be read as one
    is converted again, with a notice."""
    if not out.exists():
        return False
    try:
        return is_current(out, src)
    except (FlashLMError, OSError, ValueError) as e:
        print(f"flashlm: {out} cannot be read ({e}): converting again", file=sys.stderr)
        return False


def neuron_order(path: str | os.PathLike, n_tokens: int = CALIBRATION_TOKENS, keep: float = CALIBRATION_KEEP,
                 progress=None, n_threads: int | None = None) -> list[np.ndarray]:
    """Each layer's neuron ids of flash file `path`, most often needed first: the model
    writes about n_tokens of its own text (sampled, fixed seeds) from
    CALIBRATION_PROMPTS, and each decoded token's gate predictor keeps the top `keep`
    of the neurons. Ties go to the larger mean |act(gate)| relative to the token's largest."""
    from .loader import load_model

    with load_model(path, n_ctx=512, n_threads=n_threads, streaming=dict(predictor="gate", keep=keep, window=0)) as m:
        store = m.store
        store.resident = True  # records from the mapping: nothing streamed, memory stays bounded
        counts = [np.zeros(lb.n_ff, np.int64) for lb in store.plans]
        mags = [np.zeros(lb.n_ff, np.float64) for lb in store.plans]
        inner = store.predictor
        seen = [0]

        class Counting:
            reads_gate, nbytes = inner.reads_gate, inner.nbytes

            def select(self, i, x, keep, gelu):
                score, g = inner.scores(i, x, gelu)
                idx = top_fraction(score, keep)
                counts[i][idx] += 1
                mags[i] += score / max(float(score.max()), 1e-30)
                if i == 0:
                    seen[0] += 1
                    if progress:
                        progress(min(seen[0], n_tokens), n_tokens, "calibrating the neuron order")
                return idx, g[idx]

        store.predictor = Counting()
        per_prompt = -(-n_tokens // len(CALIBRATION_PROMPTS))
        for seed, prompt in enumerate(CALIBRATION_PROMPTS):
            m.generate(prompt, max_tokens=per_prompt, temperature=0.8, seed=seed)
            if seen[0] >= n_tokens:
                break
    return [np.lexsort((-mg, -c)) for c, mg in zip(counts, mags)]


