"""bench/: reproduce.py on CPU with a tiny epoch count (what a GPU lease runs), and every
script runnable as `python -m bench.NAME` from the repository root.

Runs outlive one call through `--checkpoints`: a finished run is reported from its saved result,
a run whose checkpoint exists continues from it instead of training again, and a folder written
with other settings is refused. `--report` tables saved results without training.
"""

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers.cifar_archives import write_parquet_folder

ROOT = Path(__file__).resolve().parents[2]


# A tiny recipe: 2 epochs (stage 2 in the second) on a 10-class long-tailed toy split.
TINY = [
    "optim.epochs=2",
    "optim.stage2_start=1",
    "optim.batch_size=32",
    "data.n_max=40",
    "data.imbalance_factor=10",
    "data.val_per_class=2",
    "data.test_per_class=4",
    "train.threads=1",
]


def _reproduce(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bench.reproduce", "--config", "configs/smoke.yaml"]
    cmd += ["--data", str(tmp_path / "raw"), "--variants", "shike", "ce", "--no-record"]
    cmd += ["--checkpoints", str(tmp_path / "ckpt"), "--log-dir", str(tmp_path / "logs"), *extra]
    for override in TINY:
        cmd += ["--set", override]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_reproduce_runs_resume_and_are_not_trained_twice(tmp_path):
    write_parquet_folder(tmp_path / "raw", train_per_class=48, test_per_class=4)
    results = str(tmp_path / "results.jsonl")
    first = _reproduce(tmp_path, "--results", results, "--set", "train.test_from_epoch=1")
    assert first.returncode == 0, first.stderr[-2000:]
    assert "| SHIKE (DKF + DKT, 3 experts) | 0 |" in first.stdout
    assert "| ResNet-32, cross-entropy | 0 |" in first.stdout
    finished = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {r["variant"] for r in finished} == {"shike", "ce"}
    assert all(r["resumed_from_epoch"] == 0 for r in finished)
    # test after each epoch from 1: last against best; val against test on val's classes
    for r in finished:
        assert list(r["test_history"]) == ["1", "2"] and r["test_history"]["2"] == r["test"]["acc"]
    assert first.stdout.count("against the best of epochs 1-2") == 2
    assert first.stdout.count("classes with val images: val") == 2
    shike_dir = tmp_path / "ckpt" / "shike-seed0"
    assert (shike_dir / "state.pt").exists() and (shike_dir / "result.json").exists()

    # Relaunched: both are reported from their saved results, nothing trains.
    again = _reproduce(tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "shike seed 0: finished in an earlier call" in again.stdout
    assert "started" not in again.stdout
    assert again.stdout.count("finished in an earlier call |") == 2

    # A run with a checkpoint but no result (stopped after its last save) continues from the
    # checkpoint: no epoch is trained again and the test figures are those of the first call.
    (shike_dir / "result.json").unlink()
    resumed = _reproduce(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "started shike seed 0" in resumed.stdout and "started ce" not in resumed.stdout
    result = json.loads((shike_dir / "result.json").read_text())
    assert result["resumed_from_epoch"] == 2
    first_shike = next(r for r in finished if r["variant"] == "shike")
    assert result["test"]["acc"] == first_shike["test"]["acc"]

    # Other settings with the same folder: refused up front, before anything trains or is
    # reported as if it had run with them, and the saved runs stay as they were.
    other = _reproduce(tmp_path, "--set", "loss.dkt_weight=5")
    assert other.returncode != 0
    assert "error: shike seed 0:" in other.stderr and "refusing to resume" in other.stderr
    assert "loss.dkt_weight=" in other.stderr and str(shike_dir) in other.stderr
    assert "started" not in other.stdout
    assert json.loads((shike_dir / "result.json").read_text()) == result

    # Execution settings may differ (a run started on a GPU continues on a CPU): the saved runs
    # are still this recipe's.
    moved = _reproduce(tmp_path, "--set", "train.channels_last=true", "--set", "train.amp=false")
    assert moved.returncode == 0, moved.stderr[-2000:]
    assert moved.stdout.count("finished in an earlier call |") == 2


def _saved_result(path: Path, variant: str, seed: int, acc: float) -> str:
    test = {"acc": acc, "top5": 0.99, "ece": 0.05, "acc_many": acc, "acc_medium": acc}
    test |= {"acc_few": float("nan"), "per_class_acc": [acc] * 10, "num_samples": 100}
    result = {"variant": variant, "seed": seed, "epochs": 200, "resumed_from_epoch": 0}
    result |= {"test": test, "train_loop_seconds": 9.0, "wall_seconds": 10.0}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return str(path)


def _report(*paths: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bench.reproduce", "--no-record", "--report", *paths]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_report_tables_saved_results_over_seeds_and_refuses_bad_ones(tmp_path):
    """Seeds finished in different calls or sessions (their result.json kept in bench/logs/)
    make one table, with mean ± std per variant, without training anything."""
    files = [
        _saved_result(tmp_path / "a" / "result.json", "shike", 0, 0.80),
        _saved_result(tmp_path / "b" / "result.json", "shike", 1, 0.82),
        _saved_result(tmp_path / "c" / "result.json", "ce", 0, 0.70),
        _saved_result(tmp_path / "bs0" / "result.json", "balanced_softmax", 0, 0.78),
        _saved_result(tmp_path / "bs1" / "result.json", "balanced_softmax", 1, 0.79),
    ]
    report = _report(*files)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "| SHIKE (DKF + DKT, 3 experts) | 1 | 82.00 |" in report.stdout
    assert "| SHIKE (DKF + DKT, 3 experts): mean ± std over 2 seeds | | 81.00 ± 1.41 |" in (
        report.stdout
    )
    assert "| ResNet-32, cross-entropy | 0 | 70.00 |" in report.stdout
    paired = "| SHIKE (DKF + DKT, 3 experts) − ResNet-32, balanced softmax, paired by seed | 0, 1 |"
    assert f"{paired} +2.50 ± 0.71 (+2.00, +3.00) |" in report.stdout
    assert "cross-entropy: mean" not in report.stdout and "started" not in report.stdout

    duplicate = _saved_result(tmp_path / "d" / "result.json", "shike", 1, 0.5)
    twice = _report(*files, duplicate)
    assert twice.returncode != 0
    assert f"shike seed 1 is in both {files[1]} and {duplicate}" in twice.stderr

    broken = tmp_path / "e" / "result.json"
    broken.parent.mkdir()
    broken.write_text('{"variant": "shike"}')
    bad = _report(files[0], str(broken))
    assert bad.returncode != 0 and f"error: {broken}: not a saved reproduce result" in bad.stderr
    assert "missing seed, test," in bad.stderr


# The runnable ones (bench/common.py is a helper module).
BENCH_SCRIPTS = sorted(
    p.stem for p in (ROOT / "bench").glob("*.py") if 'if __name__ == "__main__"' in p.read_text()
)

# Run in one child process from the repository root (as `python -m` runs): import each script,
# then check every `from X import Y` in it, those inside functions included.
IMPORTED_NAMES_EXIST = """
import ast, importlib, importlib.util, sys

def exists(module, name):
    source = importlib.import_module(module)
    if hasattr(source, name):
        return True
    return hasattr(source, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None

missing = []
for script in sys.argv[1:]:
    path = importlib.import_module(f"bench.{script}").__file__
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            missing += [f"bench/{script}.py: from {node.module} import {a.name}"
                        for a in node.names if not exists(node.module, a.name)]
sys.exit("\\n".join(missing) or None)
"""

# `python -m bench.NAME --help` for each script, in one process (torch is imported once).
HELP_AS_MODULE = """
import contextlib, io, runpy, sys

for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(f"bench.{script}", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        assert exc.code in (0, None), f"bench.{script} --help exited with {exc.code}"
    assert out.getvalue().startswith("usage:"), f"bench.{script}: {out.getvalue()[:200]}"
"""


def test_every_bench_script_imports_and_every_name_it_imports_exists():
    """The benchmark scripts run rarely (make bench, a GPU lease): a renamed helper must fail
    here, not in the middle of a benchmark run, including the names a script imports inside a
    function (its heavy imports wait until it runs)."""
    proc = subprocess.run(
        [sys.executable, "-c", IMPORTED_NAMES_EXIST, *BENCH_SCRIPTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_every_bench_script_runs_as_a_module_from_the_repository_root():
    """`python -m bench.NAME --help`, what the Makefile, gpu_session.sh and BENCHMARKS.md run:
    the scripts import `bench.*` and `tests.helpers`, which the repository root provides."""
    proc = subprocess.run(
        [sys.executable, "-c", HELP_AS_MODULE, *BENCH_SCRIPTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
