"""Issue 35's scenario through the command line: a run trained on one dataset, relaunched under
its run name with another. The relaunch is refused in one line naming both datasets, within
seconds and before anything is written to the run's MLflow run or registry."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers.ray_cluster import RAY_JOB_TEST_TIMEOUT_S

pytestmark = [pytest.mark.integration, pytest.mark.timeout(RAY_JOB_TEST_TIMEOUT_S)]
ROOT = Path(__file__).resolve().parents[2]


def _train(tmp_path: Path, data_uri: str, **extra) -> list[str]:
    values = {
        "data.uri": data_uri,
        # the cheapest run that leaves a checkpoint and an MLflow run behind
        "model.arch": "resnet32",
        "optim.epochs": 1,
        "optim.stage2_start": 1,
        "cluster.num_workers": 1,
        "cluster.cpus_per_worker": 0.5,
        "train.threads": 1,
        "cluster.storage_path": str(tmp_path / "runs"),
        "tracking.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "tracking.model_name": "shike-identity",
        **extra,
    }
    cmd = [sys.executable, "-m", "jobs.train", "--config", "configs/smoke.yaml"]
    cmd += ["--run-name", "same-name"]
    for key, value in values.items():
        cmd += ["--set", f"{key}={value}"]
    return cmd


def test_relaunch_on_other_data_is_refused_before_touching_the_run(
    ray_cluster, tiny_dataset, tmp_path
):
    from pipeline.data.manifest import read_manifest
    from pipeline.data.prepare.from_raw import prepare_dataset
    from pipeline.tracking.runs import manifest_hash

    # Another long-tailed split of the same images: IF 2 instead of tiny_dataset's IF 4.
    raw = Path(tiny_dataset).parent / "raw"
    other = str(tmp_path / "if2")
    prepare_dataset("cifar10", str(raw), other, 2.0, val_per_class=4)

    first = subprocess.run(
        _train(tmp_path, tiny_dataset, **{"tracking.register_model": "false"}),
        cwd=ROOT, env=ray_cluster.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    [run] = client.search_runs(
        [client.get_experiment_by_name("shike").experiment_id],
        "tags.`shike.run_name` = 'same-name'",
    )
    inputs = {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
    assert {name for name, _ in inputs} == {f"cifar10-lt-if4-{s}" for s in ("train", "val", "test")}

    # The relaunch would register its model (the default): it must not get that far.
    started = time.monotonic()
    again = subprocess.run(
        _train(tmp_path, other),
        cwd=ROOT, env=ray_cluster.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    took = time.monotonic() - started
    assert again.returncode != 0, again.stdout[-3000:] + again.stderr[-3000:]
    errors = [line for line in again.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, again.stderr[-3000:]
    line = errors[0]
    old, new = manifest_hash(read_manifest(tiny_dataset)), manifest_hash(read_manifest(other))
    assert f"run 'same-name' was started on cifar10 IF 4 (manifest {old[:12]})" in line, line
    assert f"this launch reads cifar10 IF 2 (manifest {new[:12]}) from {other}" in line, line
    assert f"--set data.uri={tiny_dataset}" in line and "new run name" in line, line
    assert took < 45, f"refused after {took:.0f} s"  # process start-up and imports only

    after = client.get_run(run.info.run_id)
    assert {(d.dataset.name, d.dataset.digest) for d in after.inputs.dataset_inputs} == inputs
    assert after.info.status == "FINISHED" and after.info.end_time == run.info.end_time
    assert after.data.tags["shike.dataset_manifest_hash"] == old
    assert after.data.params == run.data.params
    assert client.search_model_versions("name='shike-identity'") == []
