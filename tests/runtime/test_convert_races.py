"""Flash conversion under races and crashes: two processes converting the same model at
once, and a process killed mid-write, leave a whole flash file or none (never a partial
one under the final name), and the next conversion works."""

import os
import signal
import subprocess
import sys
import time

import pytest

import flashlm
from flashlm.flashload.layout import is_current
from flashlm.runtime import convert

from conftest import cosine_rows

CONVERTER = """
import sys, time
from pathlib import Path
from flashlm.runtime import convert

src, out, start, stop = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
convert.CALIBRATION_TOKENS = 12  # (a short calibration: the test's time)

def progress(done, total, what):
    if stop != "-" and what != "calibrating the neuron order" and done == total // 2:
        Path(stop).write_text("mid-write")  # half the tensors written: say so, and wait to be killed
        time.sleep(600)

while time.time() < start:
    time.sleep(0.002)
if out == "cached":
    print(convert.cached(src, progress=progress), flush=True)
else:
    print(convert.convert(src, out, force=True, progress=progress, calibration_tokens=12), flush=True)
"""


def converter(src, out="cached", start=0.0, stop="-"):
    return subprocess.Popen([sys.executable, "-c", CONVERTER, str(src), str(out), str(start), str(stop)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())


@pytest.fixture
def src(random_gguf, tmp_path, monkeypatch):
    """A copy of the tiny llama fixture (its own flash file name), the cache folder the test's own."""
    import shutil

    monkeypatch.setenv("FLASHLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(convert, "CALIBRATION_TOKENS", 12)  # (as in the converter: a short calibration)
    path = tmp_path / "tiny.gguf"
    shutil.copy(random_gguf("llama"), path)
    return path


def cached_out(src):
    from flashlm.paths import home

    return home() / "flash" / f"{src.stem}.flash.gguf"


def whole(out, src) -> bool:
    """out is src's flash layout, whole: current, and it computes the source's logits."""
    if not (out.exists() and is_current(out, src)):
        return False
    with flashlm.load(src, n_ctx=64, n_threads=2) as a, \
            flashlm.load(out, n_ctx=64, n_threads=2, streaming=dict(predictor=None)) as b:
        tokens = a.tokenize("One two three four five six seven")
        x, y = a.logits(tokens), b.logits(tokens)
    return cosine_rows(x, y).min() >= 0.999 and (x.argmax(1) == y.argmax(1)).all()


def partials(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.endswith(".partial"))


def killed_mid_write(src, out, mark):
    """Start a conversion of src to out ("cached": the cache's), and SIGKILL it half-way
    through writing; its pid."""
    p = converter(src, out, stop=mark)
    deadline = time.time() + 60
    while not mark.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert mark.exists(), p.communicate()
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    return p.pid


@pytest.mark.timeout(180)
def test_two_processes_converting_into_the_cache_leave_one_whole_file(src):
    out = cached_out(src)
    start = time.time() + 3.0  # both past their imports (on a busy machine too): they start together
    procs = [converter(src, "cached", start) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o.strip() for o, _ in outs] == [str(out)] * 2
    assert sum("waiting for another process writing" in e for _, e in outs) == 1  # one converted, the other waited
    assert whole(out, src) and partials(out) == []


@pytest.mark.timeout(180)
def test_two_processes_converting_to_one_file_leave_it_whole(src, tmp_path):
    out = tmp_path / "tiny.flash.gguf"
    start = time.time() + 3.0
    procs = [converter(src, out, start) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert whole(out, src) and partials(out) == []


@pytest.mark.timeout(180)
@pytest.mark.parametrize("where", ["cached", "explicit"])
def test_a_conversion_killed_mid_write_leaves_no_file_and_the_next_one_works(where, src, tmp_path):
    out = cached_out(src) if where == "cached" else tmp_path / "tiny.flash.gguf"
    if where == "cached":
        out.parent.mkdir(parents=True)
    pid = killed_mid_write(src, "cached" if where == "cached" else out, tmp_path / "mid-write")
    assert not out.exists()  # nothing under the final name: not taken for a conversion
    assert partials(out) == [f"{out.name}.{pid}.partial"]
    got = convert.cached(src) if where == "cached" else convert.convert(src, out, calibration_tokens=12)
    assert got == out and whole(out, src)
    assert partials(out) == []  # the killed one's removed


@pytest.mark.timeout(60)
def test_a_damaged_cached_conversion_is_converted_again(src, capsys):
    out = convert.cached(src)
    with open(out, "r+b") as f:
        f.seek(4)
        f.write(b"\xff\xff\xff\xff")  # the GGUF version
    capsys.readouterr()
    assert convert.cached(src) == out and whole(out, src)
    err = capsys.readouterr().err
    assert f"{out} cannot be read" in err and "converting again" in err


def test_a_live_writers_partial_file_is_left_alone(src, tmp_path):
    from flashlm.experts.bundle import clear_partials

    out = tmp_path / "x.flash.gguf"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        for pid in (live.pid, dead.pid):
            (tmp_path / f"{out.name}.{pid}.partial").write_bytes(b"x")
        (tmp_path / "other.flash.gguf.1.partial").write_bytes(b"x")
        clear_partials(out)
        assert partials(out) == sorted([f"{out.name}.{live.pid}.partial", "other.flash.gguf.1.partial"])
        clear_partials(out, locked=True)  # (the caller holds out's lock: every writer's gone)
        assert partials(out) == ["other.flash.gguf.1.partial"]
    finally:
        live.kill()
        live.wait()
