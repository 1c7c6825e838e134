"""Driver processes of the integration tests: start one, stop it the way Ctrl-C does."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path


def start_driver(cmd: list[str], cwd: Path, env: dict, log: Path | None = None) -> subprocess.Popen:
    """The driver's output goes to a pipe, or to `log` for a driver that runs long enough to
    fill a pipe nobody reads."""
    if log is None:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    with open(log, "w") as fh:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True
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
