"""pipeline.evaluation.evaluate's Ray Data path (workers > 1, pipeline/distributed/scoring.py) on the
session's real Ray head node.

The batches run on a pool of two Ray Data actors (1 CPU each); the counts must be identical,
bit for bit, to the in-process evaluation (workers=1, with this process's torch threads) of the
same registered model.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.data.prepare.from_raw import prepare_dataset
from pipeline.data.readers.transforms import CIFAR_MEAN, CIFAR_STD
from pipeline.models import build_model
from tests.helpers.cifar_archives import write_parquet_folder

pytestmark = pytest.mark.integration

mlflow = pytest.importorskip("mlflow")

from pipeline.evaluation import evaluate  # noqa: E402
from pipeline.tracking import registry, runs  # noqa: E402


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(key, raising=False)
        base = tmp_path_factory.mktemp("eval-ray")
        write_parquet_folder(base / "raw", train_per_class=40, test_per_class=5)
        manifest = prepare_dataset(
            "cifar10", str(base / "raw"), str(base / "shards"), 3.0, n_max=30, val_per_class=6
        )
        store = f"sqlite:///{base / 'mlflow.db'}"
        torch.manual_seed(3)
        net = build_model(ModelConfig(), 10)
        net.set_stage(2)
        run_id = runs.start_or_resume_run(store, "shike-train", "train-ray-eval")
        registry.log_and_register(
            run_id, net.eval(), manifest.class_names, "shike-ray-eval", mean=CIFAR_MEAN,
            std=CIFAR_STD, tracking_uri=store,
        )  # fmt: skip
        yield str(base / "shards"), store


def test_ray_data_workers_equal_in_process(ray_cluster, registered):
    data_uri, store = registered
    model = "models:/shike-ray-eval@candidate"
    local = evaluate.evaluate_model(model, data_uri, "val", tracking_uri=store, batch_size=8)
    remote = evaluate.evaluate_model(
        model, data_uri, "val", tracking_uri=store, batch_size=8, workers=2
    )
    assert local.results["num_samples"] == remote.results["num_samples"] > 8
    # Bit-identical counts, ECE sums included, and so identical metrics.
    assert torch.equal(local.counts.to_tensor(), remote.counts.to_tensor())
    assert repr(local.results) == repr(remote.results)
    assert repr(local.rows) == repr(remote.rows)
