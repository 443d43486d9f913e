"""The layers of ARCHITECTURE.md, enforced: import-linter's contracts in pyproject.toml."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def lint(root: Path) -> subprocess.CompletedProcess:
    """import-linter over the flashlm package under root, with the repo's contracts."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          check=False, cwd=root, env=env, capture_output=True, text=True)


def test_contracts_hold():
    r = lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout


def test_an_upward_import_breaks_them(tmp_path):
    # the same check on a copy of the package with one import from a kernel up to the runtime
    shutil.copytree(ROOT / "flashlm", tmp_path / "flashlm", ignore=shutil.ignore_patterns("__pycache__"))
    ops = tmp_path / "flashlm" / "kernels_cpu" / "layer.py"
    ops.write_text(ops.read_text() + "\nfrom ..runtime import sampler  # noqa: E402,F401\n")
    r = lint(tmp_path)
    assert r.returncode != 0
    assert "flashlm.kernels_cpu.layer -> flashlm.runtime.sampler" in r.stdout


def test_every_package_has_a_layer():
    # A package left out of the layers contract would be free to import anything: so the
    # contract must name every package and module of flashlm (removing one fails here).
    import pkgutil

    import flashlm

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: import-linter's own TOML reader
        import tomli as tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    ours = {f"flashlm.{m.name}" for m in pkgutil.iter_modules(flashlm.__path__)}
    assert ours == named, f"not in a layer: {sorted(ours - named)}; not in flashlm: {sorted(named - ours)}"
