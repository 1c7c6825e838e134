"""DESIGN.md's layering, as import-linter contracts (pyproject.toml, [tool.importlinter]): the
core imports neither Ray nor MLflow, Ray stays in distributed/ and the Ray Data reader, MLflow in
tracking/, each layer imports only those below it (jobs/ on top), no package has a cycle."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = str(Path(sys.executable).with_name("lint-imports"))


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [LINT_IMPORTS, "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_contracts_hold():
    out = _lint_imports(ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


@pytest.mark.parametrize(
    "module, library",
    [("losses/classification.py", "ray"), ("training/fit.py", "mlflow")],
)
def test_ray_or_mlflow_in_the_core_breaks_its_contract(tmp_path, module, library):
    """The contracts catch what they exist for: a scratch copy of the packages whose losses
    import Ray, or whose training loop imports MLflow, fails `lint-imports`, naming the contract
    and the import."""
    for package in ("pipeline", "jobs"):
        shutil.copytree(ROOT / package, tmp_path / package)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    path = tmp_path / "pipeline" / module
    path.write_text(f"import {library}  # noqa: F401\n" + path.read_text())
    out = _lint_imports(tmp_path)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-2000:]
    assert "The core runs anywhere" in out.stdout and "BROKEN" in out.stdout
    dotted = "pipeline." + module.removesuffix(".py").replace("/", ".")
    assert f"{dotted} -> {library}" in out.stdout


def test_the_ray_data_reader_imports_no_torch():
    """Ray Train's controller, its DatasetManager and Ray Data's SplitCoordinator import the
    reader's module when they unpickle the datasets, at every launch, and never decode: the
    module leaves torch and torchvision to the functions that decode (in Ray Data's tasks)."""
    code = (
        "import sys, pipeline.data.readers.ray_reader;"
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
