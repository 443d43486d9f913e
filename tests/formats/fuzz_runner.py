"""Run fuzz cases in forked children, a few at a time: each loads a model with
flashlm.load(path, n_ctx=64, n_threads=1) and asks it for 2 tokens.

The parent loads the valid files once first (warm_up), so the children inherit compiled
kernels and a case takes milliseconds. The parent must not have started numba's OpenMP
threads (GNU OpenMP kills a forked child): a test process may have, so tests run cases
through a ForkServer, a fresh process on numba's workqueue threads. A child runs under RLIMIT_AS (its address space
at the fork plus 4 GiB, so that the machine survives) and reports one outcome:

    error      a FlashLMError: the contract (detail: its class, and whether llama.cpp refused)
    ok         loaded and generated
    exception  any other exception (detail: its type and where it was raised)
    memory     MemoryError, or an address space that grew more than 2 GiB
    signal     killed by a signal (SIGSEGV, SIGABRT, ...)
    hang       still running after the timeout (killed)
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

OUTCOMES = ("error", "ok", "exception", "memory", "signal", "hang")
GIB = 1 << 30
ALLOWED = ("error", "ok")  # the contract


@dataclass(frozen=True)
class Result:
    outcome: str
    detail: str = ""

    @property
    def allowed(self) -> bool:
        return self.outcome in ALLOWED


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def load_and_generate(path) -> None:
    import flashlm

    m = flashlm.load(path, n_ctx=64, n_threads=1)
    try:
        m.generate("Hi", max_tokens=2, temperature=0)
    finally:
        m.close()


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    last = tb[-1] if tb else None
    at = f" at {Path(last.filename).name}:{last.lineno} {last.name}" if last else ""
    return f"{type(e).__name__}{at}: {str(e)[:200]}"


def _classify(path) -> Result:
    from flashlm.errors import FlashLMError

    base = _vm_kib("VmSize") * 1024
    resource.setrlimit(resource.RLIMIT_AS, (base + 4 * GIB, resource.RLIM_INFINITY))
    try:
        load_and_generate(path)
        result = Result("ok")
    except FlashLMError as e:
        native = " (refused by llama.cpp)" if "llama.cpp" in str(e) else ""
        result = Result("error", type(e).__name__ + native + ": " + str(e)[:300])
    except MemoryError as e:
        result = Result("memory", _where(e))
    except BaseException as e:  # noqa: BLE001 -- anything else breaks the contract
        result = Result("exception", _where(e))
    grew = _vm_kib("VmPeak") * 1024 - base
    if grew > 2 * GIB and result.outcome != "memory":
        result = Result("memory", f"address space grew {grew / GIB:.1f} GiB; then {result.outcome}: {result.detail}")
    return result


def _child(path, wfd: int) -> None:
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        r = _classify(path)
        os.write(wfd, json.dumps([r.outcome, r.detail]).encode()[:60000])
    finally:
        os._exit(0)


def warm_up(paths) -> None:
    """Load each valid file once here, so that forked children start with compiled kernels."""
    for p in paths:
        load_and_generate(p)


def _write_case(slot: Path, files: dict, target: str) -> Path:
    shutil.rmtree(slot, ignore_errors=True)
    slot.mkdir(parents=True)
    for name, data in files.items():
        (slot / name).write_bytes(data)
    return slot / target


def _finish(pid: int, status: int, rfd: int) -> Result:
    out = b""
    while chunk := os.read(rfd, 65536):
        out += chunk
    os.close(rfd)
    if os.WIFSIGNALED(status):
        return Result("signal", signal.Signals(os.WTERMSIG(status)).name)
    if not out:
        return Result("exception", f"the child exited with status {os.WEXITSTATUS(status)} and no report")
    outcome, detail = json.loads(out)
    return Result(outcome, detail)


def run_cases(cases, workdir: Path, jobs: int = 2, timeout: float = 60.0):
    """Run cases (case_id, {file name: bytes}, target file name or "." for the folder),
    `jobs` at a time; yields (case_id, Result) as each finishes."""
    cases = iter(cases)
    running = {}  # pid -> (case_id, read fd, deadline, slot)
    free = [Path(workdir) / f"slot{k}" for k in range(jobs)]
    more = True
    while more or running:
        while more and free:
            case = next(cases, None)
            if case is None:
                more = False
                break
            case_id, files, target = case
            slot = free.pop()
            path = _write_case(slot, files, target)
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(rfd)
                _child(path, wfd)
            os.close(wfd)
            running[pid] = (case_id, rfd, time.monotonic() + timeout, slot)
        for pid, (case_id, rfd, deadline, slot) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done and time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                os.close(rfd)
                result = Result("hang", f"killed after {timeout:.0f} s")
            elif done:
                result = _finish(pid, status, rfd)
            else:
                continue
            del running[pid]
            free.append(slot)
            yield case_id, result
        if running:
            time.sleep(0.001)


class ForkServer:
    """A fresh Python process that warms up on the valid files `warm`, then runs each case
    sent to it in a forked child (run_cases), one at a time."""

    def __init__(self, warm, workdir: Path, timeout: float = 60.0):
        env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
        self.proc = subprocess.Popen([sys.executable, __file__, str(workdir), str(timeout), *map(str, warm)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        if pickle.load(self.proc.stdout) != "ready":
            raise RuntimeError("the fork server did not start")

    def run(self, files: dict, target: str) -> Result:
        pickle.dump((files, target), self.proc.stdin)
        self.proc.stdin.flush()
        return Result(*pickle.load(self.proc.stdout))

    def close(self) -> None:
        try:
            pickle.dump(None, self.proc.stdin)
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=60)


def _serve(workdir: str, timeout: str, *warm: str) -> None:
    out = os.fdopen(os.dup(1), "wb")  # the replies; anything else printed goes to stderr
    os.dup2(2, 1)
    warm_up([Path(p) for p in warm])
    pickle.dump("ready", out)
    out.flush()
    while (req := pickle.load(sys.stdin.buffer)) is not None:
        _, r = next(run_cases([(0, *req)], Path(workdir), 1, float(timeout)))
        pickle.dump((r.outcome, r.detail), out)
        out.flush()


if __name__ == "__main__":
    _serve(*sys.argv[1:])
