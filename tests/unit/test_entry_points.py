"""The commands the docs give still run: every `python -m <module>` and `jobs/<name>.py` named
in the README, BENCHMARKS.md, the runbook, the Makefile and the cluster files exists, and each
job answers `--help` (both ways of starting it)."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [
    ROOT / "README.md",
    ROOT / "BENCHMARKS.md",
    ROOT / "Makefile",
    ROOT / "docs" / "RUNBOOK.md",
    *sorted((ROOT / "infra").rglob("*.yaml")),
    *sorted((ROOT / "docker").iterdir()),
    ROOT / "bench" / "gpu_session.sh",
]
JOBS = ["prepare_data", "train", "tune", "evaluate", "promote"]


def _named(pattern: str) -> set[str]:
    found: set[str] = set()
    for doc in DOCS:
        found.update(re.findall(pattern, doc.read_text()))
    return found


def test_the_docs_name_commands_to_check():
    modules = _named(r"python3? -m ((?:pipeline|jobs|bench)(?:\.[a-z_0-9]+)+)")
    assert {"pipeline.training.engine", "jobs.train", "jobs.prepare_data"} <= modules


@pytest.mark.parametrize("module", sorted(_named(r"-m ((?:pipeline|jobs|bench)(?:\.[a-z_0-9]+)+)")))
def test_every_module_the_docs_run_exists(module):
    assert importlib.util.find_spec(module) is not None, f"{module} is named in the docs"


@pytest.mark.parametrize("script", sorted(_named(r"\b(jobs/\w+\.py)\b")))
def test_every_job_script_the_docs_run_exists(script):
    assert (ROOT / script).is_file()


@pytest.mark.parametrize("job", JOBS)
def test_each_job_answers_help_as_a_module_and_as_a_script(job):
    for cmd in ([sys.executable, "-m", f"jobs.{job}"], [sys.executable, f"jobs/{job}.py"]):
        proc = subprocess.run(
            [*cmd, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.startswith("usage:"), proc.stdout[:500]
