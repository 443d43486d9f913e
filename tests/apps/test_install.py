"""The user's install path (issue: install in under a minute, with no compiler): the
built wheel, installed into a fresh virtualenv without the dev extra, runs the default
model. That catches a missing dependency or missing package data, which the editable
developer install hides.

It runs last in a session (tests/conftest.py), when the suite has compiled the kernels:
the wheel carries them as a release's does (python -m flashlm.apps.prebuild), and the
fresh install's first run must load them, not compile. Its seconds are reported, never
asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flashlm.formats import registry


@pytest.mark.timeout(1500)
def test_the_built_wheel_installs_without_a_compiler_and_runs_the_default_model(tmp_path):
    registry.pull(registry.DEFAULT_MODEL, quiet=True)  # the user's model, fetched already
    subprocess.run([sys.executable, str(Path(__file__).parent / "install_check.py"), str(tmp_path)], timeout=1400,
                   check=False)
    r = json.loads((tmp_path / "result.json").read_text())
    for step in ("prebuild", "build", "venv", "install", "cold", "warm"):
        assert step in r and r[step]["rc"] == 0, (step, r.get(step, {}).get("stderr", "not reached")[-3000:])
    assert r["built_from_source"] == [], "a dependency was built from source (a compiler was needed)"
    assert not r["llama_cpp_installed"], "llama-cpp-python is an extra, not a dependency"
    for run in ("cold", "warm"):
        assert r[run]["stdout"].strip(), f"the {run} run printed no reply"
        # the wheel's compiled kernels seeded the empty cache: nothing compiles, cold or warm
        assert "compiling kernels" not in r[run]["stderr"], (run, r[run]["stderr"][-3000:])
    print({k: r[k]["seconds"] for k in ("prebuild", "build", "venv", "install", "cold", "warm")})

