"""The user's install path (issue: install in under a minute, with no compiler): the
built wheel, installed into a fresh virtualenv without the dev extra, runs the default
model. That catches a missing dependency or missing package data, which the editable
developer install hides.

The work (build, install, two runs: minutes, mostly the first run's kernel compiling)
runs in the background from the start of the session (tests/conftest.py starts
install_check.py at collection); this test, moved last, waits for it and checks what it
wrote. Its seconds are reported, never asserted."""

import json

import pytest
from conftest import INSTALL_JOB


@pytest.mark.timeout(1500)
def test_the_built_wheel_installs_without_a_compiler_and_runs_the_default_model(request):
    job = request.config.stash.get(INSTALL_JOB, None)
    if job is None:
        pytest.fail("the install check was not started at collection (tests/conftest.py)")
    proc, out = job
    proc.wait(timeout=1400)
    r = json.loads((out / "result.json").read_text())
    for step in ("build", "venv", "install", "cold", "warm"):
        assert step in r and r[step]["rc"] == 0, (step, r.get(step, {}).get("stderr", "not reached")[-3000:])
    assert r["built_from_source"] == [], "a dependency was built from source (a compiler was needed)"
    assert not r["llama_cpp_installed"], "llama-cpp-python is an extra, not a dependency"
    for run in ("cold", "warm"):
        assert r[run]["stdout"].strip(), f"the {run} run printed no reply"
    print({k: r[k]["seconds"] for k in ("build", "venv", "install", "cold", "warm")})

