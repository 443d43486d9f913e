"""Shared fixtures: the real models (pulled into the same cache users get), llama.cpp as
the oracle, and random-weight GGUFs for architectures with no small real model."""

from __future__ import annotations

import logging

import numpy as np
import pytest

import flashlm
from flashlm.formats import registry
from flashlm.runtime.tokenizer import quiet_stderr


def pytest_configure(config):
    try:
        import llama_cpp._logger
    except ImportError:  # the oracle's tests skip (pip install -e ".[dev]" has it)
        return
    llama_cpp._logger.logger.setLevel(logging.CRITICAL + 1)


INSTALL_JOB = pytest.StashKey()  # (Popen, out folder) of tests/apps/install_check.py


def pytest_collection_modifyitems(session, config, items):
    """tests/apps/test_install.py checks a wheel built and installed into a fresh
    virtualenv: minutes of work, mostly waiting on downloads and one cold compile, started
    here in the background (niced, beside the suite) and its test moved last to wait."""
    picked = [i for i in items if i.path.name == "test_install.py"]
    if not picked:
        return
    items[:] = [i for i in items if i.path.name != "test_install.py"] + picked
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    registry.pull(registry.DEFAULT_MODEL, quiet=True)  # the user's model, fetched already
    out = Path(tempfile.mkdtemp(prefix="flashlm-install-"))
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    proc = subprocess.Popen([*nice, sys.executable, str(Path(__file__).parent / "apps" / "install_check.py"), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config.stash[INSTALL_JOB] = (proc, out)


def pytest_unconfigure(config):
    job = config.stash.get(INSTALL_JOB, None)
    if job is not None and job[0].poll() is None:  # the session ended first (-x, ^C): stop it
        job[0].kill()
        job[0].wait()


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels():
    """The kernels every kind of model runs (resident, flash-streamed, mixtures of experts
    resident and streamed), loaded from numba's cache, or compiled into it, before the
    first test. A fresh checkout compiles for two minutes: that belongs to no test, and
    inside the first one it overran a wait for the interface."""
    import subprocess
    import sys

    from flashlm.runtime import warmup

    # in two processes at once (numba compiles on one core): the experts' kernels, which
    # share no compiled function with the rest, in a child; then all of them loaded here
    moe = ["experts", "routing", "expert cache"]
    child = subprocess.Popen([sys.executable, "-c", f"from flashlm.runtime import warmup; warmup.warm({moe!r})"],
                             stderr=subprocess.DEVNULL)
    try:
        warmup.warm([s for s in warmup.STEPS if s not in moe])
    finally:
        child.wait()
    warmup.warm(list(warmup.STEPS))


@pytest.fixture(scope="session")
def smollm2_path():
    return registry.pull("smollm2-135m", quiet=True)


@pytest.fixture(scope="session")
def gemma3_path():
    return registry.pull("gemma3-270m", quiet=True)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    m = flashlm.load(smollm2_path, n_ctx=512, n_threads=2)
    yield m
    m.close()


def llama_cpp_model(path, n_ctx=512, **kw):
    """llama.cpp (llama-cpp-python) on the same file, all logits kept."""
    import llama_cpp

    with quiet_stderr():
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, **kw)


def llama_cpp_logits(llm, tokens) -> np.ndarray:
    llm.reset()
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _fixture_files(folder, write, vocab):
    made = {}

    def make(arch):
        if arch not in made:
            made[arch] = write(folder / f"{arch}.gguf", arch, vocab)
        return made[arch]

    return make


@pytest.fixture(scope="session")
def random_gguf(tmp_path_factory, smollm2_path):
    """random_gguf(arch) -> path of a small random-weight GGUF of that architecture."""
    from gguf_fixtures import write_random_gguf

    return _fixture_files(tmp_path_factory.mktemp("random-gguf"), write_random_gguf, smollm2_path)


@pytest.fixture(scope="session")
def moe_gguf(tmp_path_factory, smollm2_path):
    """moe_gguf(arch) -> path of a small random-weight mixture-of-experts GGUF (moe_fixtures.py)."""
    from moe_fixtures import write_random_moe_gguf

    return _fixture_files(tmp_path_factory.mktemp("moe-gguf"), write_random_moe_gguf, smollm2_path)


@pytest.fixture(scope="session")
def flash_files(tmp_path_factory, smollm2_path, gemma3_path):
    """The flash layouts of both real models (runtime/convert.py), converted once."""
    from flashlm.runtime import convert

    d = tmp_path_factory.mktemp("flash")
    return {name: convert.convert(path, d / f"{name}.flash.gguf")
            for name, path in (("smollm2", smollm2_path), ("gemma3", gemma3_path))}
