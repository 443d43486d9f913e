"""Status lines and progress bars on stderr for work that takes long: compiling the
kernels, converting a model, loading one. Never on stdout, which carries the generated
text. FLASHLM_QUIET=1 in the environment, or set_quiet(), silences them.

On a terminal each piece of work is a live line (spinner, description, the time so far)
and, once its total is known, a second (bar, done/total, what it is on), gone when the
work ends; nested work shows under it. Elsewhere (a log file, a pipe, a full-screen app)
it is one line when the work starts. Work that says what it did leaves one line at its end.

    with progress.task("converting x.gguf to the flash layout", done="converted x.gguf") as t:
        convert(..., progress=t.update)          # t.update(done, total, what)
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

_quiet: bool | None = None  # set_quiet's choice for this process; None: FLASHLM_QUIET's


def set_quiet(quiet: bool = True) -> None:
    """Silence flashlm's status lines and bars in this process (quiet=False: show them,
    whatever FLASHLM_QUIET says)."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    if _quiet is not None:
        return _quiet
    return os.environ.get("FLASHLM_QUIET", "").strip().lower() not in ("", "0", "false", "no")


def format_seconds(s: float) -> str:
    """8.2 s, 71 s, 11 min 3 s."""
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    return f"{int(s // 60)} min {int(s % 60)} s"


class Task:
    """One piece of work on stderr. update(done, total, what) is the progress callback
    flashlm's long calls take (convert's, for one); show() puts it on screen now, for
    work that learns late that it will take long (the kernels compiling)."""

    def __init__(self, description: str, total: int | None = None):
        self.description, self.total, self.done, self.what = description, total, 0, ""
        self.t0 = time.monotonic()
        self.shown = False  # on screen (or its line written), now or before
        self.closed = False
        self._row = None  # its row in the live display, while there

    def update(self, done: int | None = None, total: int | None = None, what: str | None = None) -> None:
        if done is not None:
            self.done = done
        if total is not None:
            self.total = total
        if what is not None:
            self.what = what
        if self._row is not None:
            _display.refresh(self)

    def show(self) -> None:
        _display.show(self)


@contextmanager
def task(description: str, total: int | None = None, delay: float | None = 0.0, done: str | None = None):
    """A Task on stderr while the block runs. delay: seconds the block must run before it
    shows (None: only once task.show() is called). done: a line kept once the block ends
    without an error, " in <time>" appended, if the task was shown. Nothing when quiet."""
    t = Task(description, total)
    timer = None
    if delay == 0:
        t.show()
    elif delay is not None:
        timer = threading.Timer(delay, t.show)
        timer.daemon = True
        timer.start()
    ok = False
    try:
        yield t
        ok = True
    finally:
        if timer is not None:
            timer.cancel()
        _display.close(t, f"{done} in {format_seconds(time.monotonic() - t.t0)}" if ok and done else None)


def _new_progress(console):
    """The live display (rich), each task in up to two lines, to fit 80 columns:

        ⠹ compiling kernels for this CPU (first run only, about a minute) 34 s
          ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━ 2/6 decode step (mapped)
    """
    from rich.progress import BarColumn, Progress, SpinnerColumn
    from rich.table import Table
    from rich.text import Text

    spinner, bar = SpinnerColumn(), BarColumn(bar_width=36)

    def line(*cells, shrink: int = -1):
        """One line of cells; cell `shrink` alone shrinks (an ellipsis) to fit."""
        grid = Table.grid(padding=(0, 1))
        for i, c in enumerate(cells):
            fixed = i != shrink % len(cells)
            grid.add_column(width=c.__rich_measure__(console, console.options).maximum if fixed else None)
        grid.add_row(*cells)
        return grid

    def text(s, style=""):
        return Text(s, style=style, no_wrap=True, overflow="ellipsis")

    class Rows(Progress):
        def get_renderables(self):
            for task in self.tasks:
                seconds = format_seconds(time.monotonic() - task.fields["t0"])  # since the work began
                yield line(spinner.render(task), text(task.description), text(seconds, "progress.elapsed"), shrink=1)
                if task.total is not None:  # a bar once there is something to count
                    yield line(text(" "), bar.render(task), text(f"{task.completed:.0f}/{task.total:.0f}"),
                               text(task.fields["what"], "dim"))

    return Rows(console=console, transient=True, redirect_stdout=False, redirect_stderr=True)


class _Display:
    """The tasks on screen: rows of one rich live display on a terminal (started with the
    first, stopped with the last), plain lines elsewhere."""

    def __init__(self):
        self.lock = threading.RLock()
        self.live = None  # rich Progress while a row is on screen
        self.rows = 0

    def show(self, t: Task) -> None:
        with self.lock:
            if t.closed or t.shown or is_quiet():
                return
            t.shown = True
            if self.live is None and self._terminal():
                from rich.console import Console

                self.live = _new_progress(Console(stderr=True))
                self.live.start()
            if self.live is not None:
                t._row = self.live.add_task(t.description, total=t.total, completed=t.done, what=t.what, t0=t.t0)
                self.rows += 1
            else:
                self._line(t.description)

    def refresh(self, t: Task) -> None:
        with self.lock:
            if t._row is not None and self.live is not None:
                self.live.update(t._row, completed=t.done, total=t.total, what=t.what)

    def close(self, t: Task, message: str | None) -> None:
        with self.lock:
            t.closed = True
            if t._row is not None:
                self.live.remove_task(t._row)
                self.live.refresh()  # its rows gone before a line prints above the others
                t._row = None
                self.rows -= 1
                if message:
                    self.live.console.print(f"flashlm: {message}", highlight=False, markup=False)
                if self.rows == 0:
                    self.live.stop()
                    self.live = None
            elif t.shown and message:
                self._line(message)

    def _terminal(self) -> bool:
        """Whether stderr is a terminal we may draw on (or TTY_COMPATIBLE=1 says it is): not
        a file, not a dumb terminal, and not inside another live display (rich then proxies
        stderr: lines of ours print above it)."""
        from rich.console import Console
        from rich.file_proxy import FileProxy

        if isinstance(sys.stderr, FileProxy):
            return False
        c = Console(stderr=True)
        try:  # the real file: FORCE_COLOR asks for colours, not animation in a log; a
            # full-screen app's capture of stderr (textual's) claims to be a terminal
            tty = os.environ.get("TTY_COMPATIBLE") == "1" or os.isatty(sys.stderr.fileno())
        except (AttributeError, OSError, ValueError):  # (io.UnsupportedOperation is both)
            tty = False
        return tty and c.is_terminal and not c.is_dumb_terminal

    @staticmethod
    def _line(text: str) -> None:
        try:
            print(f"flashlm: {text}", file=sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr closed: the work goes on without its status
            pass


_display = _Display()
