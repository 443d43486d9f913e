"""Status while working (flashlm.progress): compiling, converting and loading say what
they do on stderr, never on stdout; FLASHLM_QUIET=1 silences them; fast work says nothing."""

import os
import subprocess
import sys
import time

import pytest

import flashlm
from flashlm import progress
from flashlm.runtime import convert, loader
from flashlm.runtime.warmup import COMPILING


@pytest.fixture(autouse=True)
def shown(monkeypatch):
    """Status shown, whatever the environment running the tests says."""
    monkeypatch.delenv("FLASHLM_QUIET", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.setattr(progress, "_quiet", None)


def test_status_goes_to_stderr_and_never_to_stdout(capsys):
    with progress.task("working", total=3, done="worked") as t:
        t.update(1, 3, "the first")
        print("generated text")
    out, err = capsys.readouterr()
    assert out == "generated text\n"
    assert err.startswith("flashlm: working\n") and "flashlm: worked in " in err


def test_on_a_terminal_a_live_bar_goes_away_and_leaves_what_was_done(monkeypatch, capsys):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # (rich: draw as on a terminal)
    with progress.task("converting", total=4, done="converted") as outer:
        outer.update(1, 4, "tensors")
        with progress.task("compiling", total=2) as inner:  # nested work: a second row
            inner.update(1, 2, "decode step")
            time.sleep(0.25)  # a refresh or two
        print("generated text")
    out, err = capsys.readouterr()
    assert out == "generated text\n"
    assert "converting" in err and "compiling" in err and "decode step" in err
    assert "flashlm: converted in " in err and progress._display.live is None


def test_inside_another_live_display_lines_print_above_it(monkeypatch, capsys):
    from rich.console import Console
    from rich.progress import Progress

    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    with Progress(console=Console(stderr=True), transient=True) as theirs:  # as `flashlm convert` draws its own
        theirs.add_task("converting", total=None)
        with progress.task("compiling", done="compiled"):
            pass
        assert progress._display.live is None  # not a second live display
    assert "flashlm: compiling\n" in capsys.readouterr().err


def test_quiet_by_environment_or_call(monkeypatch, capsys):
    monkeypatch.setenv("FLASHLM_QUIET", "1")
    with progress.task("working", done="worked") as t:
        t.update(1, 2, "x")
    assert capsys.readouterr() == ("", "")
    progress.set_quiet(False)  # the call wins over the environment
    with progress.task("working"):
        pass
    assert capsys.readouterr().err == "flashlm: working\n"
    monkeypatch.delenv("FLASHLM_QUIET")
    progress.set_quiet()
    with progress.task("working", done="worked"):
        pass
    assert capsys.readouterr() == ("", "")


def test_work_faster_than_its_delay_says_nothing(capsys):
    with progress.task("loading fast", delay=0.5, done="loaded"):
        pass
    with progress.task("compiling", delay=None, done="compiled"):  # shown only if show() is called
        pass
    assert capsys.readouterr().err == ""
    with progress.task("loading slowly", delay=0.05, done="loaded"):
        time.sleep(0.3)
    assert capsys.readouterr().err.startswith("flashlm: loading slowly\nflashlm: loaded in ")


def test_convert_without_a_callback_shows_its_progress(random_gguf, tmp_path, monkeypatch, capsys):
    import shutil

    seen, update = [], progress.Task.update

    def spy(t, *a, **kw):  # every update of every task: (description, done, total, what)
        seen.append((t.description, *a))
        update(t, *a, **kw)

    monkeypatch.setattr(progress.Task, "update", spy)
    src = tmp_path / "tiny.gguf"
    shutil.copy(random_gguf("llama"), src)
    convert.convert(src, tmp_path / "tiny.flash.gguf", calibration_tokens=12)
    out, err = capsys.readouterr()
    assert out == ""
    assert "flashlm: converting tiny.gguf to the flash layout" in err
    assert "flashlm: converted tiny.gguf to the flash layout in " in err
    mine = [s for s in seen if s[0].startswith("converting tiny.gguf")]
    writes = [s for s in mine if s[3] != "calibrating the neuron order"]
    assert writes and writes[-1][1] == writes[-1][2]  # every tensor written, counted
    assert [s[2] for s in mine if s[3] == "calibrating the neuron order"][-1:] == [12]  # and the tokens calibrated


def test_cached_says_so_when_it_converts_and_not_when_it_reuses(random_gguf, tmp_path, monkeypatch, capsys):
    import shutil

    monkeypatch.setenv("FLASHLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(convert, "CALIBRATION_TOKENS", 12)
    src = tmp_path / "tiny.gguf"
    shutil.copy(random_gguf("llama"), src)
    seen = []
    out = convert.cached(src, progress=lambda *a: seen.append(a))  # the caller's progress: no bar of ours
    assert seen and "converting" not in capsys.readouterr().err
    out.unlink()
    convert.cached(src)
    assert "flashlm: converted tiny.gguf" in capsys.readouterr().err
    convert.cached(src)  # current: nothing to do, nothing said
    assert capsys.readouterr() == ("", "")


def test_a_warm_fast_load_says_nothing_and_a_slow_one_says_what_loads(random_gguf, monkeypatch, capsys):
    path = random_gguf("llama")
    flashlm.load(path, n_ctx=64, n_threads=1).close()  # its kernels loaded (or compiled: a cold cache)
    capsys.readouterr()
    with flashlm.load(path, n_ctx=64, n_threads=1) as m:
        m.generate("Hi", max_tokens=2)
    assert capsys.readouterr() == ("", "")
    compose = loader._compose

    def slow(*a, **kw):
        time.sleep(1.3)
        return compose(*a, **kw)

    monkeypatch.setattr(loader, "_compose", slow)
    flashlm.load(path, n_ctx=64, n_threads=1).close()
    out, err = capsys.readouterr()
    assert out == "" and err == f"flashlm: loading {path.name}\n"


COLD = """
import sys
from flashlm.runtime.warmup import warm
warm(["prompt steps"])
print("warmed")
"""


def test_a_cold_kernel_cache_says_it_compiles(tmp_path):
    # numba's cache in an empty folder: the prompt's layer steps compile (seconds), with the
    # message and a closing line on stderr; then the cache holds them, and nothing is said
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    env.pop("FLASHLM_QUIET", None)
    for cold in (True, False):
        r = subprocess.run([sys.executable, "-c", COLD], check=False, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr
        assert r.stdout == "warmed\n"
        if cold:
            assert r.stderr.startswith(f"flashlm: {COMPILING}\nflashlm: compiled the kernels for this CPU in ")
        else:
            assert r.stderr == ""


COLD_RUN = """
import sys, time
import numba.core.event as ev
import flashlm

t = time.perf_counter()
m = flashlm.load(sys.argv[1], n_ctx=64)
print(f"loaded in {time.perf_counter() - t:.0f} s", file=sys.stderr)
late = []
class Late(ev.Listener):
    def on_start(self, e): late.append(e.data["dispatcher"].py_func.__qualname__)
    def on_end(self, e): pass
ev.register("numba:compile", Late())
m.generate("The quick brown fox", max_tokens=4)
print("compiled after loading:", sorted(set(late)))
"""


@pytest.mark.slow
def test_a_cold_run_compiles_while_loading_with_a_bar_not_at_its_first_token(random_gguf, tmp_path):
    # a whole cold start (1-3 minutes): the loader's warm-up compiles every kernel the
    # model's prompt and tokens run, so generating compiles nothing more
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    env.pop("FLASHLM_QUIET", None)
    r = subprocess.run([sys.executable, "-c", COLD_RUN, str(random_gguf("llama"))], check=False, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    assert f"flashlm: {COMPILING}\n" in r.stderr and "flashlm: compiled the kernels for this CPU in " in r.stderr
    assert r.stdout == "compiled after loading: []\n"
