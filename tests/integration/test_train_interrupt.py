"""Ctrl-C on a jobs.train driver: a stop, not a failure; and a relaunch of the stopped run on
other data: refused, before anything is written to its MLflow run or the registry.

The driver is connected to the session's Ray cluster (RAY_ADDRESS), as under `ray job submit`:
its Train actors live in that cluster, so they must be gone when the driver says it stopped.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.checkpoints import registered_checkpoint
from tests.helpers.processes import interrupt, start_driver
from tests.helpers.ray_cluster import RAY_JOB_TEST_TIMEOUT_S

pytestmark = [pytest.mark.integration, pytest.mark.timeout(RAY_JOB_TEST_TIMEOUT_S)]
ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 5


def _live_train_actors(cluster) -> set[str]:
    """Ids of the cluster's live actors of Ray Train runs: controllers and workers (not the
    cluster's one detached TrainStateActor, which outlives every run by design)."""
    from ray.util.state import list_actors

    alive = list_actors(
        address=cluster.dashboard,
        filters=[("state", "=", "ALIVE")],
        limit=1000,
        raise_on_missing_output=False,
    )
    run_actors = ("TrainController", "RayTrainWorker")
    return {a.actor_id for a in alive if any(name in a.class_name for name in run_actors)}


def test_ctrl_c_stops_the_run_and_a_relaunch_on_other_data_is_refused(
    ray_cluster, tiny_dataset, tmp_path
):
    """SIGINT mid-run, after the first registered checkpoint: within 30 s the driver exits 130
    with one line (the epoch reached, the checkpoint kept, the command that resumes) and no
    traceback; its MLflow run is KILLED, not FAILED; no Train actor of it is left alive. Then
    the stopped run relaunched on other data (refused), and with its own (it finishes)."""
    name = "ctrl-c"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    overrides = {
        "data.uri": tiny_dataset,
        "model.arch": "resnet32",  # any two-stage model; this one is cheapest on CPU
        "optim.epochs": EPOCHS,  # more than run before the SIGINT: it lands mid-epoch
        "optim.stage2_start": EPOCHS - 1,
        "optim.batch_size": 32,
        "cluster.num_workers": 1,
        "cluster.cpus_per_worker": 0.5,
        "cluster.storage_path": str(tmp_path / "runs"),
        "tracking.tracking_uri": uri,
        "train.threads": 1,
    }
    args = ["--config", "configs/smoke.yaml", "--run-name", name]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    before = _live_train_actors(ray_cluster)
    proc = start_driver([sys.executable, "-m", "jobs.train", *args], ROOT, ray_cluster.env)
    deadline = time.monotonic() + 240
    while registered_checkpoint(tmp_path / "runs", name) is None:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint was registered in 240 s"
        time.sleep(0.3)

    assert _live_train_actors(ray_cluster) - before, (
        "the run's Train actors are not seen: the check is void"
    )
    sent = time.monotonic()
    out = interrupt(proc, timeout=30)
    assert time.monotonic() - sent < 30, out[-3000:]
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    kept = registered_checkpoint(tmp_path / "runs", name)
    lines = [ln for ln in out.splitlines() if "interrupted at epoch" in ln]
    assert len(lines) == 1, out[-3000:]
    [line] = lines
    assert f"training run '{name}' interrupted at epoch {kept.epoch} of {EPOCHS}" in line, line
    assert f"the checkpoint of epoch {kept.epoch} is kept ({kept.path})" in line, line
    assert line.endswith(f"resume with: {shlex.join(['python', '-m', 'jobs.train', *args])}")

    client = MlflowClient(uri)
    [run] = client.search_runs(
        [client.get_experiment_by_name("shike").experiment_id],
        f"tags.`shike.run_name` = '{name}'",
    )
    assert run.info.status == "KILLED"
    # The driver's actors die with it, but the cluster notices its exit a moment later.
    deadline = time.monotonic() + 15
    while (left := _live_train_actors(ray_cluster) - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Train actors still alive after the driver exited: {left}"
    _relaunch_on_other_data_is_refused(args, tiny_dataset, tmp_path, ray_cluster.env, uri, run)

    # The resume command of the line, on the run's own data: it goes on where it stopped.
    done = subprocess.run(
        [sys.executable, "-m", "jobs.train", *args],
        cwd=ROOT, env=ray_cluster.env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert f"resumed from checkpoint at epoch {kept.epoch}" in out, out[-3000:]
    finished = client.get_run(run.info.run_id)
    assert finished.info.status == "FINISHED"
    # Named and described by the data it learned (IF 4), not by configs/smoke.yaml's IF 100.
    assert finished.data.params["data.imbalance_factor"] == "4.0"
    [model] = client.search_registered_models()
    assert model.name == "shike-cifar10-lt-if4-resnet32"
    assert f"models:/{model.name}@candidate (version 1)" in done.stdout, done.stdout[-2000:]
    [version] = client.search_model_versions(f"name = '{model.name}'")
    assert "imbalance factor 4" in version.description, version.description


def _relaunch_on_other_data_is_refused(args, tiny_dataset, tmp_path, env, uri, run) -> None:
    """The stopped run relaunched with another long-tailed split of the same images (IF 2, not
    IF 4): one line naming both datasets and the ways out, within seconds, the MLflow run and
    the registry untouched (the relaunch would register its model: the default)."""
    from pipeline.data.manifest import manifest_hash, read_manifest
    from pipeline.data.prepare.from_raw import prepare_dataset

    other = str(tmp_path / "if2")
    prepare_dataset("cifar10", str(Path(tiny_dataset).parent / "raw"), other, 2.0, val_per_class=4)
    relaunch = [sys.executable, "-m", "jobs.train", *args, "--set", f"data.uri={other}"]
    started = time.monotonic()
    again = subprocess.run(relaunch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - started
    assert again.returncode == 1, again.stdout[-3000:] + again.stderr[-3000:]
    [line] = [ln for ln in again.stderr.splitlines() if ln.startswith("error: ")]
    old, new = manifest_hash(read_manifest(tiny_dataset)), manifest_hash(read_manifest(other))
    name = run.data.tags["shike.run_name"]
    assert f"run '{name}' was started on cifar10 IF 4 (manifest {old[:12]})" in line, line
    assert f"this launch reads cifar10 IF 2 (manifest {new[:12]}) from {other}" in line, line
    assert f"--set data.uri={tiny_dataset}" in line and "new run name" in line, line
    assert took < 45, f"refused after {took:.0f} s"  # process start-up and imports only

    client = MlflowClient(uri)
    after = client.get_run(run.info.run_id)
    inputs = {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
    assert {(d.dataset.name, d.dataset.digest) for d in after.inputs.dataset_inputs} == inputs
    assert after.info.status == "KILLED" and after.info.end_time == run.info.end_time
    assert after.data.params == run.data.params
    assert client.search_registered_models() == []
