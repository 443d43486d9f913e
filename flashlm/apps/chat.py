"""`flashlm chat`: a terminal chat (textual) on the public Model API.

- Replies stream into a Markdown widget, appended piece by piece (no full redraw).
- The conversation is rendered with the model's chat template each turn; the model
  reuses the KV cache of the prefix it already holds, so a turn costs its new tokens.
- Esc or Ctrl+C stops a reply (also during prefill) and keeps what was said; Ctrl+C
  twice at an empty prompt quits.
- Enter sends; Shift+Enter (where the terminal reports it) or a message that starts
  with \"\"\" (sent when it ends with \"\"\") spans several lines. Paste works as is.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path

import psutil
from textual import events, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Markdown, Static, TextArea

from ..errors import ContextLengthError, FlashLMError
from ..formats.registry import display_name
from ..runtime.sampler import SamplingParams
from .profile import context_warning

HELP = """\
**Commands**

| command | does |
|---|---|
| `/help` | this list |
| `/bye`, `/exit` | quit |
| `/clear` | forget the conversation (keeps the system prompt) |
| `/set temp\\|top_k\\|top_p\\|min_p\\|seed\\|max_tokens VALUE` | change a setting |
| `/system TEXT` | set the system prompt (and clear the conversation) |
| `/stats` | speed and memory of the last reply |
| `/save FILE` | save the conversation: `.json`, else markdown |

Enter sends. Shift+Enter, or a message between `\"\"\"` and `\"\"\"`, spans lines.
Esc or Ctrl+C stops a reply; Ctrl+C twice at an empty prompt quits."""

_SETTINGS = {"temp": ("temperature", float), "top_k": ("top_k", int), "top_p": ("top_p", float),
             "min_p": ("min_p", float), "seed": ("seed", int), "max_tokens": ("max_tokens", int)}


class Prompt(TextArea):
    """The input box: Enter sends, Shift+Enter or a \"\"\" block adds lines."""

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "shift+enter":
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        if event.key == "enter":
            text = self.text
            open_block = text.lstrip().startswith('"""') and not (len(text.strip()) > 3 and text.rstrip().endswith('"""'))
            event.stop()
            event.prevent_default()
            if open_block:
                self.insert("\n")
                return
            self.post_message(self.Submitted(text))
            return
        await super()._on_key(event)


class ChatApp(App):
    """Chat with a model. `model`: a loaded flashlm.Model, or a spec to load (a path or
    registry name; None = the default model), loaded in the background."""

    TITLE = "flashlm chat"
    CSS = """
    #log { height: 1fr; padding: 0 1; }
    .user { margin: 1 0 0 0; color: $accent; }
    .note { color: $text-muted; }
    Prompt { height: auto; max-height: 10; }
    #status { height: auto; max-height: 2; background: $panel; color: $text; padding: 0 1; }
    """
    BINDINGS = [Binding("escape", "stop", "stop reply", show=False),
                Binding("ctrl+c", "ctrl_c", "stop / quit", show=False, priority=True)]

    def __init__(self, model=None, *, n_ctx: int | None = None, n_threads: int | None = None,
                 memory_budget=None, system: str | None = None, streaming=None, experts=None, speculative=None,
                 cache_type_k: str = "f16", cache_type_v: str = "f16", **settings):
        super().__init__()
        self._spec = model
        self.model = model if hasattr(model, "chat") else None
        self.model_name = display_name(model if self.model is None else self.model.path)  # for the header and footer
        self.warnings: list[str] = []  # what loading warned of: notes here, printed on stderr after (run_chat)
        self._load_kw = dict(n_ctx=n_ctx, n_threads=n_threads, memory_budget=memory_budget, streaming=streaming,
                             experts=experts, speculative=speculative, cache_type_k=cache_type_k,
                             cache_type_v=cache_type_v)
        self.system = system
        self.messages: list[dict] = []
        self.settings = {"max_tokens": 512, **settings}
        self.generating = False
        self._quit_armed = 0.0
        self.last = None  # the last reply's final Chunk
        self._streamed = None  # (MB read from disk, "hits" or "expert hits", hit rate) of the last reply, streamed
        self._stop_requested = False  # Esc/Ctrl+C during this reply (also before its stream exists)
        self._load_error = None  # why the model did not load: printed as one line after the app quits
        self._idle_rss = None  # RSS before the model loaded (kernels in): the part of RSS the budget does not cover

    # -- layout ---------------------------------------------------------------------

    def compose(self) -> ComposeResult:
        yield VerticalScroll(id="log")
        yield Prompt(id="prompt", soft_wrap=True, show_line_numbers=False)
        yield Static("", id="status")

    def on_mount(self) -> None:
        self.query_one(Prompt).focus()
        if self.model is None:
            t0 = time.monotonic()

            def tick():  # loading takes seconds: show them pass
                if self.model is None:
                    self._set_status(f"loading {self.model_name}... {time.monotonic() - t0:.0f} s")
                else:
                    timer.stop()

            timer = self.set_interval(0.5, tick)
            tick()
            self._load_model()
        else:
            self._model_ready()

    @work(thread=True, exclusive=True, group="load")
    def _load_model(self) -> None:
        import flashlm

        from .profile import idle_rss

        self._idle_rss = idle_rss(psutil.Process())
        said = io.StringIO()  # what loading prints (a MoE's first bundling, a warning) would tear the screen
        try:
            with contextlib.redirect_stderr(said):
                model = flashlm.load(self._spec, **self._load_kw)
        except FlashLMError as e:
            self._load_error = str(e)
            self.call_from_thread(self.exit, None, 2)
            return
        self.model = model
        notes = [ln.strip() for ln in said.getvalue().replace("\r", "\n").splitlines()]
        self.call_from_thread(self._model_ready, [n for n in notes if "warning" in n or " MiB in " in n])

    def _model_ready(self, notes=()) -> None:
        ours = [context_warning(self.model, self.model_name)]
        if not self.model.has_chat_template:
            ours.append(f"flashlm: warning: {self.model_name} has no chat template (a base model?); replies are plain "
                        "completions of the conversation")
        ours = [w for w in ours if w]
        for n in [*notes, *ours]:
            self._show_note(n)
        self.warnings = [n for n in notes if "warning" in n] + ours
        self._show_note(f"{self.model_name} ready ({self.model.n_ctx} tokens of context). /help lists commands.")
        self._update_footer()

    # -- output helpers -------------------------------------------------------------

    def _history(self):
        return self.query_one("#log", VerticalScroll)

    def _show_note(self, text: str) -> None:
        self._history().mount(Static(text, classes="note", markup=False))
        self._history().scroll_end(animate=False)

    def _set_status(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    def _update_footer(self) -> None:
        if self.model is None:
            return
        parts = [self.model_name]
        if self.last is not None:
            parts.append(f"prompt {self.last.prompt_tokens_per_second:.0f} tok/s · "
                         f"gen {self.last.tokens_per_second:.1f} tok/s")
        rss = psutil.Process().memory_info().rss / 2**20
        budget = getattr(self.model, "memory_budget", None)
        # The model's share of RSS (above the process before loading) is the figure the budget bounds;
        # a model handed in loaded has no such baseline, so RSS it is.
        # (/stats shows the whole process's RSS beside it)
        used = f"model {rss - self._idle_rss / 2**20:.0f}" if self._idle_rss is not None else f"RSS {rss:.0f}"
        parts.append(used + (f"/{budget / 2**20:.0f} MiB budget" if budget else " MiB"))
        passes = self.model.take_stats()  # a streamed model: what the last reply read from disk
        if passes:
            from ..stats import TokenStats

            every, decode = TokenStats.total(passes), TokenStats.total(p for p in passes if not p.prefill)
            if decode.window_hit_rate is not None:
                self._streamed = (every.bytes_read / 1e6, "hits", decode.window_hit_rate)
            elif every.expert_hit_rate is not None:
                self._streamed = (every.bytes_read / 1e6, "expert hits", every.expert_hit_rate)
        if self._streamed:
            parts.append(f"disk {self._streamed[0]:.0f} MB · {self._streamed[1]} {self._streamed[2]:.0%}")
        self._set_status(" | ".join(parts))

    # -- input ----------------------------------------------------------------------

    def on_prompt_submitted(self, msg: Prompt.Submitted) -> None:
        text = msg.text.strip()
        if text.startswith('"""') and text.endswith('"""') and len(text) >= 6:
            text = text[3:-3].strip()
        if not text:
            return
        self.query_one(Prompt).clear()
        if text.startswith("/"):
            self._run_command(text)
            return
        if self.model is None:
            self._show_note("the model is still loading")
            return
        if self.generating:
            self._show_note("a reply is still streaming: Esc stops it")
            return
        self.messages.append({"role": "user", "content": text})
        self._history().mount(Static(f"> {text}", classes="user", markup=False))
        reply = Markdown("")
        self._history().mount(reply)
        self._history().scroll_end(animate=False)
        self.generating = True
        self._stop_requested = False
        self._generate_reply(reply)

    def _run_command(self, line: str) -> None:
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/bye", "/exit"):
            self.exit()
        elif cmd == "/help":
            self._history().mount(Markdown(HELP))
        elif cmd == "/clear":
            self.messages.clear()
            self._history().remove_children()
            self._show_note("conversation cleared")
        elif cmd == "/system":
            self.system = arg or None
            self.messages.clear()
            self._show_note(f"system prompt {'set' if arg else 'removed'}; conversation cleared")
        elif cmd == "/set":
            self._apply_set(arg)
        elif cmd == "/stats":
            self._show_note(self._stats_line())
        elif cmd == "/save":
            self._save_to(arg)
        else:
            self._show_note(f"unknown command {cmd}; /help lists them")
        self._history().scroll_end(animate=False)

    def _apply_set(self, arg: str) -> None:
        name, _, value = arg.partition(" ")
        if name not in _SETTINGS or not value.strip():
            self._show_note(f"usage: /set {'|'.join(_SETTINGS)} VALUE")
            return
        key, kind = _SETTINGS[name]
        try:
            v = kind(value.strip())
        except ValueError:
            self._show_note(f"/set {name}: {value.strip()!r} is not a{'n integer' if kind is int else ' number'}")
            return
        if key == "max_tokens" and v < 1:
            self._show_note(f"/set {name}: {v} is out of range (at least 1)")
            return
        if key != "max_tokens":
            try:  # the same checks a reply would make, now rather than at every reply
                SamplingParams(**{k: x for k, x in {**self.settings, key: v}.items()
                                  if k not in ("max_tokens", "stop")})
            except FlashLMError as e:
                self._show_note(f"/set {name}: {e}")
                return
        self.settings[key] = v
        self._show_note(f"{name} = {v}")

    def _stats_line(self) -> str:
        if self.last is None:
            return "no reply yet"
        c = self.last
        rss = psutil.Process().memory_info().rss / 2**20
        spec = f"; {c.speculation.describe()}" if c.speculation is not None else ""
        return (f"last reply: {c.n_prompt} prompt tokens at {c.prompt_tokens_per_second:.1f} tok/s, "
                f"{c.n_generated} generated at {c.tokens_per_second:.1f} tok/s; RSS {rss:.0f} MiB; "
                f"threads {self.model.threads}{spec}")

    def _save_to(self, arg: str) -> None:
        if not arg:
            self._show_note("usage: /save FILE (.json for JSON, else markdown)")
            return
        path = Path(arg).expanduser()
        convo = self._conversation()
        try:
            if path.suffix.lower() == ".json":
                path.write_text(json.dumps(convo, indent=2, ensure_ascii=False) + "\n")
            else:
                path.write_text("".join(f"## {m['role']}\n\n{m['content']}\n\n" for m in convo))
        except OSError as e:
            self._show_note(f"/save: cannot write {path}: {e.strerror}")
            return
        self._show_note(f"saved {len(convo)} messages to {path}")

    # -- generation -----------------------------------------------------------------

    def _conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    @work(thread=True, exclusive=True, group="gen")
    def _generate_reply(self, reply: Markdown) -> None:
        kw = dict(self.settings)
        text = ""
        last = None
        try:
            while True:
                try:
                    stream = self.model.chat(self._conversation(), stream=True, **kw)
                    if self._stop_requested:  # stopped before the stream existed
                        self.model.cancel()
                    break
                except ContextLengthError:
                    if len(self.messages) <= 1:
                        raise
                    del self.messages[:2]  # the oldest exchange
                    self.call_from_thread(self._show_note, "context full: the oldest exchange was dropped from the conversation")
            pending, shown = "", time.monotonic()
            for chunk in stream:
                text += chunk.text
                pending += chunk.text
                # Hand text to the UI at most 20 times a second: each hand-over waits
                # for the UI thread, which would otherwise pace the model.
                if pending and (time.monotonic() - shown > 0.05 or chunk.finish_reason):
                    self.call_from_thread(self._append, reply, pending)
                    pending, shown = "", time.monotonic()
                last = chunk
            if pending:
                self.call_from_thread(self._append, reply, pending)
        except FlashLMError as e:
            self.call_from_thread(self._show_note, f"error: {e}")
            if not text and self.messages and self.messages[-1]["role"] == "user":
                self.messages.pop()  # nothing was said: the failed turn leaves no trace in the history
        finally:
            if text or (last is not None and self.messages and self.messages[-1]["role"] == "user"):
                self.messages.append({"role": "assistant", "content": text})
            self.call_from_thread(self._finish_reply, last)

    async def _append(self, reply: Markdown, text: str) -> None:
        await reply.append(text)
        self._history().scroll_end(animate=False)

    def _finish_reply(self, last) -> None:
        self.generating = False
        if last is not None:
            self.last = last
            if last.finish_reason == "cancelled":
                self._show_note("(stopped)")
            elif last.finish_reason == "length" and last.n_prompt + last.n_generated >= self.model.n_ctx:
                self._show_note(f"context full ({self.model.n_ctx} tokens): the reply was cut; "
                           "the next message drops the oldest exchanges, or /clear to start over")
            elif last.finish_reason == "length":
                self._show_note(f"(reply reached max_tokens = {self.settings['max_tokens']}; /set max_tokens N to change)")
        self._update_footer()

    # -- keys -----------------------------------------------------------------------

    def action_stop(self) -> None:
        if self.generating and self.model is not None:
            self._stop_requested = True
            self.model.cancel()

    def action_ctrl_c(self) -> None:
        if self.generating:
            self.action_stop()
            return
        if self.query_one(Prompt).text:
            self.query_one(Prompt).clear()
            return
        now = time.monotonic()
        if now - self._quit_armed < 3.0:
            self.exit()
        else:
            self._quit_armed = now
            self._show_note("press Ctrl+C again to quit")

    def on_unmount(self) -> None:
        if self.model is not None and self.generating:
            self.model.cancel()


def run_chat(spec=None, **kw) -> int:
    """Chat with the model at spec (a path or registry name) until the user quits."""
    app = ChatApp(spec, **kw)
    app.run()
    if app.model is not None:  # loaded by the app, so closed here
        app.model.close()
    for w in app.warnings:  # shown as notes, where printing would have torn the screen; kept in the terminal now
        print(w, file=sys.stderr)
    if app._load_error:
        print(f"flashlm: error: {app._load_error}", file=sys.stderr)
        return 2
    return 0
