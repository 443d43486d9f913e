"""The chat TUI, driven by textual's Pilot on the default model, and in a real terminal."""

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time

import pytest

import flashlm
from flashlm.apps.chat import ChatApp, Prompt


def _texts(app):
    from textual.widgets import Markdown, Static

    out = []
    for w in app.query_one("#log").children:
        if isinstance(w, Markdown):
            out.append(("md", w.source))
        elif isinstance(w, Static):
            out.append(("note", str(w.render())))
    return out


async def _send(pilot, app, text):
    box = app.query_one(Prompt)
    box.text = text
    box.move_cursor(box.document.end)  # as after typing it
    box.focus()
    await pilot.press("enter")


async def _wait(pilot, cond, timeout=60.0):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out")
        await pilot.pause(0.05)


@pytest.fixture(scope="module")
def chat_model(smollm2_path):
    with flashlm.load(smollm2_path, n_ctx=1024) as m:
        # the kernels compiled (a fresh checkout's first run compiles them, for a minute or
        # more) before the tests' waits for the interface start counting
        m.generate("Hello", max_tokens=2, temperature=0)
        yield m


def test_chat_streams_stops_and_continues(chat_model):
    async def go():
        # a reply long enough to be mid-way when Esc comes: the harness's pauses wait for the
        # interface to settle, and a fast model (one free core) wrote 200 tokens first
        app = ChatApp(chat_model, temperature=0, max_tokens=800)
        async with app.run_test(size=(100, 40)) as pilot:
            await _send(pilot, app, "Write a long story about a dragon.")
            # streamed text appears while the reply is still being generated
            await _wait(pilot, lambda: any(k == "md" and len(s) > 20 for k, s in _texts(app)))
            assert app.generating
            await pilot.press("escape")
            await _wait(pilot, lambda: not app.generating)
            assert app.last.finish_reason == "cancelled" and app.last.n_generated < 800
            assert any(k == "note" and "(stopped)" in s for k, s in _texts(app))
            assert [m["role"] for m in app.messages] == ["user", "assistant"]
            # the conversation goes on: a second message gets its own streamed reply
            await _send(pilot, app, "What is 2 + 2?")
            await _wait(pilot, lambda: not app.generating and len(app.messages) == 4, timeout=120)
            assert app.messages[3]["content"].strip()
            assert sum(k == "md" for k, _ in _texts(app)) == 2
            assert "tok/s" in str(app.query_one("#status").render())

    asyncio.run(go())


def test_chat_commands(chat_model, tmp_path):
    async def go():
        app = ChatApp(chat_model, max_tokens=8)
        async with app.run_test(size=(100, 40)) as pilot:
            await _send(pilot, app, "/set temp 0")
            assert app.settings["temperature"] == 0.0
            await _send(pilot, app, "/set temp hot")
            assert app.settings["temperature"] == 0.0 and "not a number" in _texts(app)[-1][1]
            await _send(pilot, app, "/set top_p 5")  # checked as a reply would check it, and refused
            assert app.settings.get("top_p", 0.95) == 0.95 and "top_p must be in (0, 1]" in _texts(app)[-1][1]
            await _send(pilot, app, "Hello!")
            await _wait(pilot, lambda: not app.generating and len(app.messages) == 2)
            await _send(pilot, app, f"/save {tmp_path / 'c.json'}")
            saved = json.loads((tmp_path / "c.json").read_text())
            assert [m["role"] for m in saved] == ["user", "assistant"] and saved[0]["content"] == "Hello!"
            await _send(pilot, app, f"/save {tmp_path / 'c.md'}")
            assert (tmp_path / "c.md").read_text().startswith("## user\n\nHello!")
            await _send(pilot, app, "/clear")
            assert app.messages == [] and _texts(app) == [("note", "conversation cleared")]
            await _send(pilot, app, '"""line one')
            assert app.query_one(Prompt).text == '"""line one\n'  # an open block takes more lines
            app.query_one(Prompt).clear()
            assert app.is_running
            await _send(pilot, app, "/bye")
            await pilot.pause(0.1)
            assert not app.is_running  # /bye quit the app
        assert app.return_code == 0

    asyncio.run(go())


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_chat_in_a_real_terminal(smollm2_path, tmp_path):
    """`flashlm chat` under tmux: type a message, read the reply from the pane, /bye."""
    name = f"flashlm-test-{int(time.time() * 1000) % 10**9}"
    cmd = f"{sys.executable} -m flashlm.apps.cli chat -m {smollm2_path} --temp 0 -n 24 -c 512 --memory-budget 400MiB"
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "100", "-y", "30", cmd], check=True)

    def pane():
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True).stdout

    try:
        t0 = time.monotonic()
        while "ready" not in pane():
            assert time.monotonic() - t0 < 120, pane()
            time.sleep(0.5)
        subprocess.run(["tmux", "send-keys", "-t", name, "-l", "What is the capital of France?"], check=True)
        subprocess.run(["tmux", "send-keys", "-t", name, "Enter"], check=True)
        t0 = time.monotonic()
        while "gen " not in pane():  # the footer shows the finished reply's speed
            assert time.monotonic() - t0 < 120, pane()
            time.sleep(0.5)
        lines = pane().splitlines()
        i = next(k for k, ln in enumerate(lines) if "> What is the capital of France?" in ln)
        assert lines[i + 1].strip(), pane()  # the reply, on the line below the message
        # the footer: the model's memory (RSS above the process before loading) against the budget
        used = re.search(r"model\s+(\d+)/400\s+MiB\s+budget", pane())
        assert used and 50 < int(used.group(1)) <= 400, pane()
        subprocess.run(["tmux", "send-keys", "-t", name, "-l", "/bye"], check=True)
        subprocess.run(["tmux", "send-keys", "-t", name, "Enter"], check=True)
        t0 = time.monotonic()
        while subprocess.run(["tmux", "has-session", "-t", name], capture_output=True).returncode == 0:
            assert time.monotonic() - t0 < 30, pane()
            time.sleep(0.3)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


def test_chat_shows_what_loading_printed(moe_gguf, tmp_path, monkeypatch):
    """A mixture of experts under a budget whose expert bundle cannot be written: the
    warning becomes a note in the chat (printed, it would tear the screen), and the
    model still loads (its experts read from the GGUF)."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("FLASHLM_HOME", str(blocker))  # the cache folder cannot be made

    async def go():
        app = ChatApp(str(moe_gguf("qwen3moe")), n_ctx=256, memory_budget="200MB")
        async with app.run_test(size=(120, 40)) as pilot:
            await _wait(pilot, lambda: app.model is not None and any("ready" in s for _, s in _texts(app)))
            notes = [s for k, s in _texts(app) if k == "note"]
            assert any("warning" in n and "bundle" in n for n in notes), notes
            assert app.model.experts.bundle is None

    asyncio.run(go())
