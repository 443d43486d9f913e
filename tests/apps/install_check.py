"""The user's install path, as a new user takes it: build the wheel, install it into a
fresh virtualenv without the dev extra, and run the default model (already fetched).

    python tests/apps/install_check.py OUT_DIR      # writes OUT_DIR/result.json

It records each step's seconds and output: the build, the install (`pip install -v`:
its log shows whether any dependency had to be built from source, which needs a
compiler), and `flashlm run -n 4` twice: cold (kernels compile into an empty numba
cache) and warm. tests/apps/test_install.py runs it in the background from the start of
a test session and checks what it wrote at the end; it is also the measurement behind the
README's install and first-token figures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _step(result: dict, name: str, cmd: list[str], env: dict | None = None, timeout: float = 600) -> bool:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=result["dir"],
                           check=False)
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = -1, e.stdout or "", f"timed out after {timeout} s"
        out = out.decode() if isinstance(out, bytes) else out
    result[name] = {"seconds": round(time.perf_counter() - t0, 2), "rc": rc, "cmd": " ".join(cmd),
                    "stdout": out[-20000:], "stderr": err[-20000:]}
    return rc == 0


def main(out_dir: str) -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    result: dict = {"dir": str(work)}
    try:
        dist, venv = work / "dist", work / "venv"
        ok = _step(result, "build", [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)])
        wheels = sorted(dist.glob("flashlm-*.whl")) if ok else []
        ok = ok and len(wheels) == 1 and _step(result, "venv", [sys.executable, "-m", "venv", str(venv)])
        pip, flashlm = str(venv / "bin" / "pip"), str(venv / "bin" / "flashlm")
        ok = ok and _step(result, "install", [pip, "install", "-v", "--disable-pip-version-check", str(wheels[0])])
        if ok:
            log = result["install"]["stdout"]
            result["built_from_source"] = sorted(set(re.findall(r"Building wheel for (\S+)", log)))
            result["llama_cpp_installed"] = (venv / "bin" / "python").exists() and subprocess.run(
                [str(venv / "bin" / "python"), "-c", "import llama_cpp"], capture_output=True, check=False).returncode == 0
        # the runs: the model from the user's cache (fetched already), an empty numba cache
        env = dict(os.environ, NUMBA_CACHE_DIR=str(work / "numba"), PATH=f"{venv / 'bin'}:{os.environ['PATH']}")
        env.pop("PYTHONPATH", None)
        run = [flashlm, "run", "-p", "Hello", "-n", "4", "--temp", "0", "--stats"]
        for name in ("cold", "warm"):
            ok = ok and _step(result, name, run, env=env)
    finally:
        (out / "result.json").write_text(json.dumps(result, indent=1))
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
