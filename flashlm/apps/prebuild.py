"""Compile the kernels ahead for a wheel to carry: a first run then loads machine code
instead of compiling it for a minute or two.

    python -m flashlm.apps.prebuild [--out flashlm/_prebuilt] [--targets all|host] [-m MODEL ...]

For each target this machine can run (flashlm/target.py: numba compiles for a portable
CPU baseline per SIMD path, not this exact CPU, so the code runs on every CPU of that
path), a child process runs every kernel, so that numba's cache (this checkout's, as
flashlm uses it) holds them, compiling what it lacks: the warmup steps
(runtime/warmup.py) and a short run of each model given (default: the default model:
its loading, a prompt, decoding alone and in a batch). The cache's files are then copied
to OUT (flashlm/_prebuilt, which the wheel packages; git ignores it), one folder per
flashlm subpackage, with a manifest of what they are valid for: numba's version,
Python's cache tag, the kernel sources' digest and the targets. kernels_cpu seeds
numba's cache from them on import when all of it matches here. Run it in a clean
checkout for a release (its cache then holds only what models run).

--targets host builds the host's target only; all (the default) adds the AVX2 target
under a VNNI host (FLASHLM_SIMD=avx2). AVX-VNNI code (Alder Lake) needs such a CPU to
run its warmup, so it is built only there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]


def _child(models: list[str]) -> int:
    """Compile every kernel in this process (numba's cache: NUMBA_CACHE_DIR); print the
    target and the kernel sources' digest as JSON."""
    import flashlm
    from flashlm import kernels_cpu
    from flashlm.formats import registry
    from flashlm.runtime import warmup

    warmup.warm(list(warmup.STEPS))
    for name in models:
        try:
            path = registry.resolve(name) if name in registry.MODELS else Path(name)
        except Exception as e:  # noqa: BLE001  (not fetched: its steps are warmed anyway)
            print(f"prebuild: skipping {name}: {e}", file=sys.stderr)
            continue
        with flashlm.load(path, n_ctx=256) as m:
            m.generate("Hello, how are you today? " * 4, max_tokens=4, temperature=0)
            m.generate_batch(["Hello", "Hi there"], max_tokens=2, temperature=0)
    print(json.dumps({"target": flashlm.target.TARGET.tag, "sources": kernels_cpu.sources_digest()}))
    return 0


def _targets(which: str) -> list[dict]:
    """Environment overrides, one per target to build."""
    from flashlm import target

    host = target.TARGET
    envs = [{}]
    if which == "all" and host.vnni:
        envs.append({"FLASHLM_SIMD": "avx2"})
    return envs


def build(out: Path, which: str = "all", models: list[str] | None = None) -> dict:
    """Compile into numba's cache what it lacks, then copy the cache into `out` (replaced);
    returns the manifest. A clean checkout's cache then holds exactly the kernels a model
    runs; a developer's holds the tests' variants too (more files, the same effect)."""
    import numba

    from flashlm import kernels_cpu
    from flashlm.formats.registry import DEFAULT_MODEL

    models = [DEFAULT_MODEL] if models is None else models
    manifest = {"numba": numba.__version__, "python": sys.implementation.cache_tag, "targets": []}
    for env_extra in _targets(which):
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "flashlm.apps.prebuild", "--child", *models],
                           env=dict(os.environ, **env_extra), capture_output=True, text=True, check=False,
                           cwd=PACKAGE.parent)
        if p.returncode != 0:
            raise RuntimeError(f"prebuild child failed ({env_extra}):\n{p.stderr[-4000:]}")
        info = json.loads(p.stdout.strip().splitlines()[-1])
        manifest["targets"].append(info["target"])
        manifest.setdefault("sources", info["sources"])
        if manifest["sources"] != info["sources"]:
            raise RuntimeError("the kernel sources changed during the build")
        print(f"prebuild: {info['target']}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    n = 0
    for sub in sorted(p for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        src = kernels_cpu.numba_cache_path(sub)
        files = sorted(src.glob("*.nb[ic]")) if src.is_dir() else []
        if files:
            (out / sub.name).mkdir()
            for f in files:
                shutil.copyfile(f, out / sub.name / f.name)
            n += len(files)
    manifest["files"] = n
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashlm.apps.prebuild", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=PACKAGE / "_prebuilt", help="where (default: flashlm/_prebuilt)")
    ap.add_argument("--targets", choices=("all", "host"), default="all")
    ap.add_argument("-m", "--model", action="append", default=None, help="a model to run (default: the default model)")
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        return _child(args.child)
    manifest = build(args.out, args.targets, args.model)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"prebuilt kernels for {', '.join(manifest['targets'])}: {manifest['files']} files, "
          f"{size / 2**20:.1f} MiB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
