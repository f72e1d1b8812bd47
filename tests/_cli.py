"""The `vlmkit` command run as a user runs it, for the tests that go through it from an empty
folder: a subprocess with the checkout's code (installed or not), offline, one thread, no
progress bars; a traceback is always a failure, and a non-zero exit one unless `ok=False`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def vlmkit(cwd: Path, *args: str, stdin: str | None = None, ok: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    script = Path(sys.executable).with_name("vlmkit")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "vlmkit.cli"]
    proc = subprocess.run([*command, *args], check=False, cwd=cwd, env=env, input=stdin, capture_output=True, text=True,
                          timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr
    if ok:
        assert proc.returncode == 0, f"vlmkit {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc
