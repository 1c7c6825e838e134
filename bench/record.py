"""Append a benchmark's figures to BENCHMARKS.md with date, machine, commit and command."""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}"


def commit() -> str:
    """The checked-out commit; BENCH_COMMIT names it where the tree travels without .git."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!BENCHMARKS.md"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") or "unknown"
    except OSError:
        return "unknown"


def record(title: str, table: str, path: Path | None = None) -> None:
    """Print `table` and append it under a dated heading to BENCHMARKS.md (or `path`)."""
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    block = (
        f"\n### {title}\n\n"
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}\n"
        f"- machine: {machine()}\n- commit: {commit()}\n- command: `{command}`\n\n{table.strip()}\n"
    )
    print(block)
    target = path or Path(os.environ.get("BENCHMARKS_FILE", ROOT / "BENCHMARKS.md"))
    with open(target, "a") as fh:
        fh.write(block)
