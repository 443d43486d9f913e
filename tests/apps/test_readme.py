"""Every command and code block in README.md runs as written and exits 0.

The ```sh blocks' lines and the ```python blocks run in one fresh folder, in README
order, each as its own test (a command may use a file an earlier one wrote, as
question.txt). Commands run under bash with this interpreter's bin folder first on
PATH (so `flashlm` and `python` are the ones under test); Python blocks run as
scripts with this interpreter. What is not run as it stands, and why:

- The block under "## Set-up" is skipped: it makes the virtual environment, then the
  install and `pytest` themselves, which .ci/run runs as they are (pytest here would
  run this test again). So is the block under "## Install" (the user's `pip install .`
  would replace the editable install under test): test_install.py installs the built
  wheel into a fresh virtualenv instead, and runs the default model from it.
  test_readme_has_what_this_file_runs checks both hold nothing else.
- `flashlm convert` runs in order like the rest, after the fixture has made the
  default model's conversion in the cache (runtime.convert.cached(), as
  examples/memory_budget.py and the README's Python block do): convert then copies that
  file instead of converting again, as it does for any user. Converting from scratch
  (122-195 s here, more than this whole file may take) runs in test_readme_convert,
  marked slow, with an empty flash cache.
- `flashlm chat` opens a terminal interface: it runs under tmux, and the test quits it
  with /bye once it says it is ready (as test_chat.py's real-terminal test does).
- `flashlm serve` runs until stopped: the test starts it in the background and waits
  until /health answers; the `curl` lines and Python blocks after it in its section use
  it (a curl reply holding an error JSON fails them), and it is stopped with SIGTERM when
  a case from another section runs or the module ends, which must exit it with status 0.
  Port 8080 in that section's text is replaced with a free port (the same text with one
  number changed), so a server already on 8080 here cannot collide with it.
- A Python block that imports a package the project does not depend on (OPTIONAL:
  LangChain's `langchain_openai`) runs where that package is installed, and is skipped
  naming it where it is not; it is never silently passed.
- Files a user brings are provided: ./model.gguf is a link to the default model's GGUF,
  moe.gguf a small random-weight mixture of experts (tests/moe_fixtures.py, Mixtral's
  layout), and benchmarks/ a link to the clone's (the README runs its scripts from the
  clone's folder).
- FLASHLM_HOME is a fresh folder whose models/ and flash/ link to the real cache's:
  nothing is fetched or converted again, and what the commands write there (the disk
  probe, expert bundles) leaves the user's cache alone.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SKIP_SECTIONS = {  # the blocks not run here, and what each holds (see the docstring)
    "Install": [["pip install .", "flashlm chat"]],
    "Set-up": [["python3 -m venv .venv && . .venv/bin/activate", 'pip install -e ".[dev]"', "pytest"]],
}
TIMEOUT = 300  # seconds a command may take (a fresh checkout's first run compiles the kernels)
README_PORT = 8080  # the server's port as the README writes it, replaced with a free one here
OPTIONAL = {"langchain_openai": "langchain-openai"}  # module a block may import: the package that has it


@dataclass
class Case:
    kind: str  # "sh", "chat", "serve" or "python"
    line: int  # where it is in README.md
    text: str
    section: str = ""  # the heading it is under

    @property
    def id(self) -> str:
        first = self.text.strip().splitlines()[0] if self.kind == "python" else self.text
        return f"L{self.line}:{first.split('  #')[0].strip()[:60]}"


def fenced_blocks(text: str) -> list[tuple[str, str, int, list[str]]]:
    """(section heading, language, first line number, lines) of each fenced block."""
    blocks, section, fence, body, start = [], "", None, [], 0
    for n, line in enumerate(text.splitlines(), 1):
        if fence is None:
            if line.startswith("#"):
                section = line.lstrip("#").strip()
            elif line.startswith("```"):
                fence, body, start = line[3:].strip(), [], n + 1
        elif line.startswith("```"):
            blocks.append((section, fence, start, body))
            fence = None
        else:
            body.append(line)
    return blocks


def readme_cases(text: str) -> list[Case]:
    """The README's commands (one a line of a ```sh block, `\\`-continued lines joined)
    and ```python blocks, in order, but for the blocks under SKIP_SECTIONS."""
    cases = []
    for section, lang, start, body in fenced_blocks(text):
        if section in SKIP_SECTIONS:
            continue
        if lang == "python":
            cases.append(Case("python", start, "\n".join(body) + "\n", section))
        elif lang == "sh":
            cmd, at = "", None
            for k, ln in enumerate(body, start):
                at = at or k
                if ln.endswith("\\"):
                    cmd += ln[:-1]
                    continue
                text, first = (cmd + ln).strip(), at
                cmd, at = "", None
                if text and not text.startswith("#"):
                    cases.append(Case(_kind(text), first, text, section))
    return cases


def _kind(cmd: str) -> str:
    return "chat" if cmd.startswith("flashlm chat") else "serve" if cmd.startswith("flashlm serve") else "sh"


CASES = readme_cases(README.read_text())


def test_readme_has_what_this_file_runs():
    """The parse finds the README's commands (so an edit that breaks a fence shows here),
    every block is one it runs (or the layout's plain text), and the blocks it skips
    hold the user's install, and the developers' venv, install and pytest, nothing else."""
    blocks = fenced_blocks(README.read_text())
    assert {lang for _, lang, _, _ in blocks} <= {"sh", "python", ""}
    for skipped, bodies in SKIP_SECTIONS.items():
        assert [body for section, _, _, body in blocks if section == skipped] == bodies, skipped
    kinds = {c.kind for c in CASES}
    assert {"sh", "chat", "serve", "python"} <= kinds, kinds
    serve = next(c for c in CASES if c.kind == "serve")  # what uses the server follows it in its section
    users = [c for c in CASES if f":{README_PORT}" in c.text]
    assert users and all(c.section == serve.section and c.line > serve.line for c in users)
    assert any(c.text.startswith("flashlm convert") for c in CASES)
    assert not any(c.text.startswith(("pip install", "pytest")) for c in CASES)
    assert len(CASES) >= 25, len(CASES)


def _environment(home: Path) -> dict:
    env = dict(os.environ, FLASHLM_HOME=str(home))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _fresh_home(folder: Path, flash: bool = True) -> Path:
    """A cache folder sharing the real one's models (and flash layouts, if flash), and
    nothing else (its disk probe copied, so streamed models read as they would)."""
    from flashlm.paths import home as real_home

    real, home = real_home(), folder / "flashlm-home"
    home.mkdir()
    for part in ("models", "flash") if flash else ("models",):
        (real / part).mkdir(parents=True, exist_ok=True)
        (home / part).symlink_to(real / part, target_is_directory=True)
    if (real / "disk-probe.json").exists():
        shutil.copy(real / "disk-probe.json", home / "disk-probe.json")
    return home


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, smollm2_path, gemma3_path, moe_gguf):
    """The folder the README's commands run in, with the files a user would bring."""
    from flashlm.runtime.convert import cached

    flash = cached("smollm2-135m")  # before FLASHLM_HOME moves: the user's cached conversion
    d = tmp_path_factory.mktemp("readme")
    env = _environment(_fresh_home(d))
    d = d / "work"
    d.mkdir()
    (d / "model.gguf").symlink_to(smollm2_path)
    (d / "moe.gguf").symlink_to(moe_gguf("mixtral"))
    (d / "benchmarks").symlink_to(ROOT / "benchmarks", target_is_directory=True)
    assert flash.exists()  # the README's convert line copies it
    return d, env


def _check(out: subprocess.CompletedProcess, what: str) -> None:
    assert out.returncode == 0, f"{what}\nexit {out.returncode}\n{out.stdout[-1500:]}\n{out.stderr[-2500:]}"
    assert "Traceback" not in out.stderr, f"{what}\n{out.stderr[-2500:]}"


def _run_sh(cmd: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)


def _run_chat(cmd: str, cwd: Path, env: dict) -> int:
    """Start `flashlm chat` under tmux, wait for "ready", type /bye; its exit status."""
    if shutil.which("tmux") is None:
        pytest.skip("needs tmux")
    name = f"flashlm-readme-{os.getpid()}-{int(time.time() * 1000) % 10**9}"
    rc = cwd / f".{name}.rc"
    script = cwd / f".{name}.sh"
    script.write_text(f"export PATH={shlex.quote(env['PATH'])} FLASHLM_HOME={shlex.quote(env['FLASHLM_HOME'])}\n"
                      f"cd {shlex.quote(str(cwd))}\n{cmd}\necho $? > {shlex.quote(str(rc))}\n")
    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "100", "-y", "30", f"bash {script}"], check=True)

    def pane():
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True,
                              check=False).stdout

    try:
        t0 = time.monotonic()
        while "ready" not in pane() and not rc.exists():
            assert time.monotonic() - t0 < TIMEOUT, pane()
            time.sleep(0.3)
        if not rc.exists():
            subprocess.run(["tmux", "send-keys", "-t", name, "-l", "/bye"], check=True)
            subprocess.run(["tmux", "send-keys", "-t", name, "Enter"], check=True)
        t0 = time.monotonic()
        while not rc.exists() or not rc.read_text().strip():
            assert time.monotonic() - t0 < 60, pane()
            time.sleep(0.2)
        return int(rc.read_text())
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True, check=False)


class _Servers:
    """The `flashlm serve` a README section started, running for the cases after it."""

    def __init__(self):
        self.running: list[tuple[Case, subprocess.Popen, Path]] = []
        self.port = 0

    def start(self, case: Case, cmd: str, cwd: Path, env: dict) -> None:
        """Start the server in the background; return once /health answers."""
        import urllib.request

        log = cwd / f".serve-L{case.line}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT)
        self.running.append((case, proc, log))
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, f"README.md line {case.line}: {cmd}\n{log.read_text()[-2500:]}"
            assert time.monotonic() - t0 < TIMEOUT, log.read_text()[-2500:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM each server: it must exit cleanly (status 0), with no traceback."""
        running, self.running = self.running, []
        for case, proc, log in running:
            proc.terminate()
            try:
                rc = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc = "none (killed after 60 s)"
            text = log.read_text()
            assert rc == 0 and "Traceback" not in text, f"README.md line {case.line}: exit {rc}\n{text[-2500:]}"


@pytest.fixture(scope="module")
def servers():
    import socket

    s = _Servers()
    with socket.socket() as sock:  # a free port (the README's 8080 may be taken here)
        sock.bind(("127.0.0.1", 0))
        s.port = sock.getsockname()[1]
    yield s
    s.stop()


def _on_port(text: str, port: int) -> str:
    """The README's text with its server port replaced."""
    return text.replace(f":{README_PORT}", f":{port}").replace(f"--port {README_PORT}", f"--port {port}")


def _optional_missing(code: str) -> str | None:
    """The package a block needs that is not installed here, if any (OPTIONAL)."""
    import importlib.util

    for module, package in OPTIONAL.items():
        if re.search(rf"^\s*(from|import) {module}\b", code, re.M) and importlib.util.find_spec(module) is None:
            return package
    return None


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_readme(case, workdir, servers):
    cwd, env = workdir
    if servers.running and servers.running[0][0].section != case.section:
        servers.stop()  # a server serves its own section's cases
    text = _on_port(case.text, servers.port)
    if case.kind == "chat":
        assert _run_chat(text, cwd, env) == 0, case.text
    elif case.kind == "serve":
        servers.start(case, text, cwd, env)
    elif case.kind == "python":
        if missing := _optional_missing(text):
            pytest.skip(f"README.md line {case.line} needs {missing}, which is not installed here")
        script = cwd / f"readme_L{case.line}.py"
        script.write_text(text)
        out = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=TIMEOUT, check=False)
        _check(out, f"README.md line {case.line}: python block")
        assert out.stdout.strip()
    else:
        out = _run_sh(text, cwd, env)
        _check(out, f"README.md line {case.line}: {case.text}")
        if text.startswith("curl"):  # curl exits 0 on an HTTP error: the reply must not be one
            assert '"error"' not in out.stdout, f"README.md line {case.line}: {case.text}\n{out.stdout[-1500:]}"


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.text.startswith("flashlm convert")], ids=lambda c: c.id)
def test_readme_convert(case, tmp_path, smollm2_path):
    """The README's convert line, as written, in an empty folder with an empty flash
    cache: it converts from scratch and writes what it names."""
    env = _environment(_fresh_home(tmp_path, flash=False))
    cwd = tmp_path / "work"
    cwd.mkdir()
    out = _run_sh(case.text, cwd, env)
    _check(out, case.text)
    written = re.search(r"--flash (\S+)", case.text).group(1)
    assert (cwd / written).stat().st_size > 0 and "flash layout" in out.stdout
