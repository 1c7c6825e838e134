"""A 4-trial ASHA sweep on a real Ray cluster, tracked in MLflow as parent + children."""

from __future__ import annotations

import io
import math
import os
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.tracking.store import mlflow_uris
from tests.helpers.processes import interrupt, start_driver
from tests.helpers.ray_cluster import RAY_JOB_TEST_TIMEOUT_S

pytestmark = [pytest.mark.integration, pytest.mark.timeout(RAY_JOB_TEST_TIMEOUT_S)]
ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 48


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def learnable_dataset(tmp_path_factory):
    """Each class has its own colour (plus noise): a working config learns it in one epoch,
    a learning rate of ~0 stays at chance, which makes ASHA's decision deterministic. The
    images are 48 px, not CIFAR's 32: the registered model's signature must follow the data."""
    from pipeline.data.prepare.from_raw import prepare_dataset

    base = tmp_path_factory.mktemp("learnable")
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, size=(10, 3))
    raw = base / "raw"
    raw.mkdir()
    for split, per_class in (("train", 40), ("test", 10)):
        labels = np.repeat(np.arange(10), per_class)
        noise = rng.integers(-20, 21, size=(len(labels), IMAGE_SIZE, IMAGE_SIZE, 3))
        images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
        table = pa.table(
            {"image": [_png(i) for i in images], "label": pa.array(labels, pa.int16())}
        )
        pq.write_table(table, raw / f"{split}.parquet")
    prepare_dataset("cifar10", str(raw), str(base / "shards"), 4.0, val_per_class=5)
    return str(base / "shards")


def test_bad_search_space_is_a_clear_error(tmp_path):
    from pipeline.distributed.tune import SweepError, load_sweep

    bad = tmp_path / "sweep.yaml"
    bad.write_text(
        "name: s\nbase_config: configs/smoke.yaml\nspace:\n  loss.dkt_wieght: {choice: [1, 2]}\n"
    )
    with pytest.raises(
        SweepError, match="search space parameter 'loss.dkt_wieght': unknown config key"
    ):
        load_sweep(bad)
    bad.write_text("name: s\nbase_config: configs/smoke.yaml\nspace:\n  optim.lr: {choice: [-1]}\n")
    with pytest.raises(SweepError, match="'optim.lr'"):
        load_sweep(bad)
    bad.write_text(
        "name: s\nbase_config: configs/smoke.yaml\nspace:\n  optim.lr: {between: [0, 1]}\n"
    )
    with pytest.raises(SweepError, match="between"):
        load_sweep(bad)


NO_DASHBOARD_SWEEP = """
import sys, tempfile
import ray
from pipeline.distributed.tune import SweepError, load_sweep, run_sweep
spec, base = load_sweep(sys.argv[1], sys.argv[2:])
ray.init(num_cpus=1, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="/tmp/rn"))
try:
    run_sweep(spec, base)
except SweepError as exc:
    print(exc)
    sys.exit(3)
finally:
    ray.shutdown()
"""


def test_sweep_refuses_a_ray_without_its_state_api(tiny_dataset, tmp_path):
    """Without the dashboard, the placement groups of finished Ray Train trials are never
    freed (the sweep would hang after the first trials): refused up front, before any MLflow
    run exists."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        Path(ROOT, "configs/sweep_smoke.yaml").read_text() + "trial_workers: 2\n"  # Ray Train
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            NO_DASHBOARD_SWEEP,
            str(sweep),
            f"data.uri={tiny_dataset}",  # a real dataset: the data is checked first
            f"tracking.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            f"cluster.storage_path={tmp_path}/runs",
        ],
        cwd=ROOT,
        env=env | {"RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "State API does not answer" in proc.stdout
    assert not list((tmp_path / "runs").glob("*/.shike-data.json"))  # the sweep never started
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert not experiments or client.search_runs(experiments) == []


def test_one_device_asha_sweep_tracks_parent_and_children_and_registers_the_best(
    ray_cluster, learnable_dataset, tmp_path
):
    from pipeline.distributed.tune import load_sweep, run_sweep

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "name: sweep-test\nbase_config: configs/smoke.yaml\n"
        # Ranked by the training loss: one epoch of these learning rates is too short to tell
        # them apart by val accuracy, but 0.1 is clearly worse (and deterministically so) by
        # its loss, which it blows up (about 9.6 against 4.5 at the first rung).
        "metric: train/loss\nmode: min\nnum_samples: 2\nmax_concurrent_trials: 1\n"
        "scheduler: {type: asha, grace_period: 1, reduction_factor: 2}\n"
        "space:\n  optim.peak_lr: {grid: [1.0e-7, 0.1]}\n  loss.tau: {choice: [0.5, 1.0]}\n"
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec, base = load_sweep(
        sweep,
        [
            f"data.uri={learnable_dataset}",
            "cluster.num_workers=1",
            "cluster.cpus_per_worker=0.5",
            f"cluster.storage_path={tmp_path}/runs",
            f"tracking.tracking_uri={uri}",
            "tracking.model_name=shike-sweep-test",
            "optim.batch_size=8",
            "train.threads=1",
            # The sweep machinery is under test, not SHIKE's cost: the single-expert ResNet-32
            # has the same two stages at a third of the CPU time. No augmentation: AutoAugment's
            # colour operations would hide the colour that identifies each class here.
            "model.arch=resnet32",
            "optim.epochs=2",  # ASHA rung at epoch 1, then stage 2
            "optim.stage2_start=1",
            "data.augment=none",
        ],
    )
    summary = run_sweep(spec, base)

    rows = summary["trials"]
    assert len(rows) == 4
    # Trials run one at a time in grid order (1e-7, 0.1, 1e-7, 0.1): ASHA's first rung stops
    # each 0.1 trial, clearly worse than the 1e-7 one before it, and no other
    stopped = {r["optim.peak_lr"] for r in rows if r["stopped_early"]}
    assert stopped == {0.1}, rows
    assert summary["trial_epochs_run"] < summary["trial_epochs_full"]
    finished = [r for r in rows if r["epochs_run"] == base.optim.epochs]
    assert summary["best"] == min(finished, key=lambda r: r["train/loss"])

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("shike")
    children = client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'"
    )
    assert len(children) == 4
    assert {c.data.params["optim.peak_lr"] for c in children} == {"1e-07", "0.1"}
    assert {c.info.status for c in children} <= {"FINISHED", "KILLED"}
    assert any(c.info.status == "KILLED" for c in children)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert "sweep_summary.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    mv = client.get_model_version_by_alias("shike-sweep-test", "candidate")
    best_child = next(
        c for c in children if c.data.tags["shike.trial_id"] == summary["best"]["trial_id"]
    )
    assert mv.run_id == best_child.info.run_id
    with mlflow_uris(uri):
        registered = mlflow.pyfunc.load_model(f"models:/shike-sweep-test/{mv.version}")
    assert registered.metadata.signature.inputs.to_dict()[0]["tensor-spec"] == {
        "dtype": "uint8",
        "shape": (-1, IMAGE_SIZE, IMAGE_SIZE, 3),
    }
    images = np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    assert registered.predict(images).shape == (2, 10)

    # relaunching the finished sweep restores it instead of starting over
    again = run_sweep(spec, base, register=False)
    assert {r["trial_id"] for r in again["trials"]} == {r["trial_id"] for r in rows}


def test_min_mode_sweep_registers_a_finite_trial_not_a_diverged_one(
    ray_cluster, learnable_dataset, tmp_path
):
    """Ranked by calibration error (`val/ece`, mode min). At a learning rate of 1e30 the one
    training step of the epoch is finite but leaves non-finite weights: the val logits are
    NaN, the trial reports no ECE (NaN) and must rank last, not first."""
    from pipeline.distributed.tune import load_sweep, run_sweep

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "name: sweep-nan\nbase_config: configs/smoke.yaml\nmetric: val/ece\nmode: min\n"
        "num_samples: 1\nmax_concurrent_trials: 1\nscheduler: {type: none}\n"
        "space:\n  optim.peak_lr: {grid: [1.0e+30, 0.05]}\n"
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = _sweep_overrides("sweep-nan", learnable_dataset, tmp_path)
    # one step an epoch (216 training images): the step's loss is finite, the weights are not
    spec, base = load_sweep(sweep, [*overrides, "optim.batch_size=256"])
    summary = run_sweep(spec, base)

    by_lr = {r["optim.peak_lr"]: r for r in summary["trials"]}
    assert not by_lr[1e30]["error"] and by_lr[1e30]["epochs_run"] == 1
    assert math.isnan(by_lr[1e30]["val/ece"])  # the diverged trial
    assert summary["best"]["optim.peak_lr"] == 0.05
    client = MlflowClient(uri)
    mv = client.get_model_version_by_alias("shike-sweep-nan", "candidate")
    assert client.get_run(mv.run_id).data.params["optim.peak_lr"] == "0.05"


def _finished_children(uri: str) -> list:
    """Child (trial) runs whose trial driver finished (they close their run as FINISHED)."""
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return [
        r for r in runs if r.data.tags.get("mlflow.parentRunId") and r.info.status == "FINISHED"
    ]


def _a_child_finished(db: Path) -> bool:
    """Whether a trial's run has closed as FINISHED, read from the SQLite file with plain sqlite3
    while the sweep's driver may still be creating MLflow's tables there: an MlflowClient would
    run MLflow's schema migration on the same file at the same time, and a driver's migration
    failed so ("table _alembic_tmp_experiments already exists")."""
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
                "WHERE tags.key = 'mlflow.parentRunId' AND runs.status = 'FINISHED'"
            ).fetchone()
    except sqlite3.OperationalError:  # no file or tables yet, or a writer holds the lock
        return False
    return count > 0


def _sweep_overrides(name: str, dataset: str, tmp_path: Path) -> list[str]:
    """The cheap settings of these tests' one-epoch sweeps."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return [
        f"data.uri={dataset}",
        "cluster.num_workers=1",
        "cluster.cpus_per_worker=0.5",
        f"cluster.storage_path={tmp_path}/runs",
        f"tracking.tracking_uri={uri}",
        f"tracking.model_name=shike-{name}",
        "optim.batch_size=16",
        "train.threads=1",
        "model.arch=resnet32",
        "optim.epochs=1",
        "optim.stage2_start=1",
        "data.augment=none",
    ]


def _sweep_command(sweep_yaml: Path, name: str, dataset: str, tmp_path: Path) -> list[str]:
    """`python -m jobs.tune` on `sweep_yaml` with the cheap settings of these tests."""
    cmd = [sys.executable, "-m", "jobs.tune", "--config", str(sweep_yaml)]
    for o in _sweep_overrides(name, dataset, tmp_path):
        cmd += ["--set", o]
    return cmd


@pytest.mark.parametrize("stop", ["ctrl-c", "kill"])
def test_stopped_sweep_resumes_when_relaunched(ray_cluster, learnable_dataset, tmp_path, stop):
    """The sweep's driver is stopped after the first trial, by Ctrl-C (nothing is registered,
    the exit status says so) or killed outright; the relaunch keeps the finished trial (not
    trained again) and runs the rest."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "name: sweep-resume\nbase_config: configs/smoke.yaml\nmetric: val/score\n"
        "num_samples: 1\nmax_concurrent_trials: 1\nscheduler: {type: none}\n"
        "space:\n  optim.peak_lr: {grid: [0.05, 0.1]}\n"
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = _sweep_command(sweep, "sweep-resume", learnable_dataset, tmp_path)
    first = start_driver(cmd, ROOT, ray_cluster.env)
    deadline = time.monotonic() + 300
    while not _a_child_finished(tmp_path / "mlflow.db"):
        assert first.poll() is None, first.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no trial finished in 300 s"
        time.sleep(1)
    if stop == "ctrl-c":
        out = interrupt(first, timeout=180)
        assert first.returncode == 130, out[-3000:]
        assert "relaunch it with the same name to resume" in out
    else:
        first.kill()
        first.communicate()
    client = MlflowClient(uri)
    assert client.search_registered_models() == []  # nothing chosen from a partial sweep
    [done_before] = _finished_children(uri)[:1]
    history_before = client.get_metric_history(done_before.info.run_id, "val/score")

    again = subprocess.run(
        cmd, cwd=ROOT, env=ray_cluster.env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "sweep 'sweep-resume': 2 trials" in again.stdout
    assert len(_finished_children(uri)) == 2
    history = client.get_metric_history(done_before.info.run_id, "val/score")
    assert len(history) == len(history_before)  # the finished trial was not trained again
    parents = [
        r
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
        if r.data.tags.get("shike.kind") == "sweep"
    ]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert client.get_model_version_by_alias("shike-sweep-resume", "candidate")


def test_ray_train_trials_register_their_best(ray_cluster, learnable_dataset, tmp_path):
    """`trial_workers: 2`: each trial is a Ray Train run of two workers; the best one's model
    is registered from its Train checkpoint, under its own child run."""
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "name: sweep-train\nbase_config: configs/smoke.yaml\ntrial_workers: 2\n"
        "num_samples: 1\nscheduler: {type: none}\nspace:\n  optim.peak_lr: {grid: [0.1]}\n"
    )
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = _sweep_command(sweep, "sweep-train", learnable_dataset, tmp_path)
    done = subprocess.run(
        cmd, cwd=ROOT, env=ray_cluster.env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [child] = _finished_children(uri)
    assert child.data.params["cluster.num_workers"] == "2"
    assert "train/images_per_s" in child.data.metrics
    mv = MlflowClient(uri).get_model_version_by_alias("shike-sweep-train", "candidate")
    assert mv.run_id == child.info.run_id
