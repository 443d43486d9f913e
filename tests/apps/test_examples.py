"""The scripts in examples/ run as they are, from a fresh folder, and print what they say
they do."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.py"))


def _quickstart(out: str):
    assert "Paris" in out.splitlines()[0]  # greedy: "The capital of France is" -> " Paris."
    assert re.search(r"\n\[\d+ tok/s\]\n", out)  # after the streamed story
    reply = out.split(" tok/s]\n", 1)[1]
    assert re.search(r"(?i)\b(red|blue|green|yellow)\b", reply), reply  # "Name three colours."


def _cancel(out: str):
    m = re.search(r"finish reason: cancelled, (\d+) tokens", out)
    assert m and int(m.group(1)) < 2000, out  # stopped by the timer, not by max_tokens


def _memory_budget(out: str):
    assert "memory plan for a budget of 140.0 MiB" in out
    m = re.search(r"read ([\d.]+) MB from disk in (\d+) reads; window hit rate while decoding (\d+)%", out)
    assert m and float(m.group(1)) > 0 and int(m.group(2)) > 0, out  # the budget holds less than every neuron
    text = out.split(m.group(0))[0].splitlines()[-1]
    assert len(text.split()) >= 5, out  # 24 greedy tokens of "The history of the city begins"


CHECKS = {"quickstart.py": _quickstart, "cancel.py": _cancel, "memory_budget.py": _memory_budget}


def test_every_example_is_checked():
    assert sorted(CHECKS) == [p.name for p in EXAMPLES]


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(script, smollm2_path, tmp_path):
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, stdin=subprocess.DEVNULL,
                         capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    CHECKS[script.name](out.stdout)
    assert not list(tmp_path.iterdir())  # nothing written where it ran (the cache folder holds what it keeps)
