"""Driver processes of the integration tests: start one, stop it the way Ctrl-C does."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path


def start_driver(cmd: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def interrupt(proc: subprocess.Popen, timeout: float) -> str:
    """SIGINT, then wait up to `timeout` s (kill after that); returns the driver's output."""
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out
