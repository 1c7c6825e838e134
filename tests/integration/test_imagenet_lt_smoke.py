"""The ImageNet-LT path end to end, at smoke size, through the commands users type:
`jobs.prepare_data` on a folder in the ImageNet-LT layout, `configs/imagenet_lt_smoke.yaml`
through the Ray-free engine and through `jobs.train` on 2 Ray workers, and `jobs.evaluate` on
the model that run registered."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from pipeline.data.manifest import read_manifest
from pipeline.tracking.store import mlflow_uris
from tests.helpers.lt_datasets import write_imagenet_lt
from tests.helpers.ray_cluster import RAY_JOB_TEST_TIMEOUT_S

pytestmark = [pytest.mark.integration, pytest.mark.timeout(RAY_JOB_TEST_TIMEOUT_S)]
ROOT = Path(__file__).resolve().parents[2]
SMOKE = "configs/imagenet_lt_smoke.yaml"


def _run(cmd: list[str], env: dict | None = None, timeout: int = 600):
    proc = subprocess.run(
        [sys.executable, "-m", *cmd],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def imagenet_lt(tmp_path_factory):
    """(ROOT in the ImageNet-LT layout, its prepared shards): 10 classes, 30 down to 2
    training images, 3 val and 3 test images per class, JPEGs of 24-96 px sides."""
    base = tmp_path_factory.mktemp("imagenet-lt")
    root = write_imagenet_lt(base / "raw")
    shards = base / "shards"
    _run(["jobs.prepare_data", "--dataset", "imagenet_lt", "--source", str(root)]
         + ["--output", str(shards)])  # fmt: skip
    return root, shards


def test_prepare_keeps_the_source_bytes_and_the_list_files_counts(imagenet_lt):
    root, shards = imagenet_lt
    manifest = read_manifest(str(shards))
    for split in ("train", "val", "test"):
        listed = [ln.split() for ln in (root / f"ImageNet_LT_{split}.txt").read_text().splitlines()]
        per_class = Counter(int(label) for _, label in listed)
        assert manifest.splits[split].class_counts == [per_class[c] for c in range(10)], split
        rows = {}
        for path in manifest.shard_paths(split):
            table = pq.read_table(path, columns=["image", "sample_id", "label"]).to_pylist()
            rows.update({r["sample_id"]: (r["image"], r["label"]) for r in table})
        assert sorted(rows) == sorted(rel for rel, _ in listed)
        for rel, label in listed:
            assert rows[rel] == ((root / rel).read_bytes(), int(label)), rel
    assert manifest.class_counts == manifest.splits["train"].class_counts
    assert manifest.image.encoding == "source" and manifest.image.height is None


def test_smoke_preset_trains_with_the_ray_free_engine(imagenet_lt):
    _, shards = imagenet_lt
    proc = _run(["pipeline.training.engine", "--config", SMOKE, "--set", f"data.uri={shards}"])
    epochs = [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch")]
    assert [ln.split()[1] for ln in epochs] == ["1/2", "2/2"], proc.stdout
    assert "stage 2" in epochs[1]
    assert "test: top-1" in proc.stdout and "(30 images)" in proc.stdout


def test_smoke_preset_trains_on_two_ray_workers_and_the_model_evaluates(
    ray_cluster, imagenet_lt, tmp_path
):
    _, shards = imagenet_lt
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = {
        "data.uri": shards,
        "cluster.storage_path": tmp_path / "runs",
        "tracking.tracking_uri": uri,
        "train.threads": 1,
    }
    overrides = [arg for k, v in settings.items() for arg in ("--set", f"{k}={v}")]
    proc = _run(
        ["jobs.train", "--config", SMOKE, "--run-name", "smoke-lt", *overrides],
        env=ray_cluster.env,
    )
    assert "run 'smoke-lt' finished" in proc.stdout
    mv = MlflowClient(uri).get_model_version_by_alias("shike-imagenet-lt-resnet18", "candidate")
    with mlflow_uris(uri):
        import mlflow

        model = mlflow.pyfunc.load_model(f"models:/shike-imagenet-lt-resnet18/{mv.version}")
    # The registered model takes the images the run trained on: 64 px, the preset's size.
    assert model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 64, 64, 3)

    evaluated = _run(
        ["jobs.evaluate", "--model", "models:/shike-imagenet-lt-resnet18@candidate"]
        + ["--data", str(shards), "--split", "test", "--tracking-uri", uri]
    )  # fmt: skip
    assert "top-1" in evaluated.stdout and "30" in evaluated.stdout, evaluated.stdout

    # The registered model, fed the evaluation crop of each image, scores the val split as the
    # run's own val pass did (Ray Data's eval transform): the same preprocessing end to end.
    from pipeline.evaluation.evaluate import evaluate_model

    run = MlflowClient(uri).get_run(mv.run_id)
    report = evaluate_model(f"models:/shike-imagenet-lt-resnet18/{mv.version}", str(shards), "val",
                            tracking_uri=uri)  # fmt: skip
    assert report.results["num_samples"] == 30
    assert report.results["acc"] == pytest.approx(run.data.metrics["val/acc"], abs=1e-9)
