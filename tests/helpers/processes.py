"""Driver processes of the integration tests: start one, stop it the way Ctrl-C does."""

from __future__ import annotations

import signal
import subprocess
from contextlib import nullcontext
from pathlib import Path


def start_driver(cmd: list[str], cwd: Path, env: dict, log: Path | None = None) -> subprocess.Popen:
    """The driver's output goes to a pipe, or to `log` for a driver that runs long enough to
    fill a pipe nobody reads."""
    with open(log, "w") if log else nullcontext(subprocess.PIPE) as stdout:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=stdout, stderr=subprocess.STDOUT, text=True
        )


def interrupt(proc: subprocess.Popen, timeout: float) -> str:
    """SIGINT, then wait up to `timeout` s (kill after that); returns the driver's piped output
    ("" when it went to a log file)."""
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""
