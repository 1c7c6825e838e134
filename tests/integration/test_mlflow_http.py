"""Tracking and registry through a real `mlflow server` (HTTP), artifacts proxied to S3 (moto)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig, build_config
from pipeline.data.readers.transforms import CIFAR_MEAN, CIFAR_STD
from pipeline.evaluation.metrics import EvalCounts
from pipeline.models import ImageClassifier, build_model

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline.tracking import registry, runs, versions  # noqa: E402
from pipeline.tracking.versions import RegistryError  # noqa: E402

pytestmark = pytest.mark.integration

NAMES = [f"c{i}" for i in range(10)]
CLASS_COUNTS = [500, 300, 180, 101, 100, 60, 20, 19, 8, 5]


@pytest.fixture(scope="module", autouse=True)
def _client_env(tmp_path_factory):
    """The client side has no AWS credentials at all: artifacts must go through the server."""
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            mp.delenv(key)
        for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_S3_ENDPOINT_URL"):
            mp.delenv(key, raising=False)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.chdir(tmp_path_factory.mktemp("client-cwd"))
        yield


def test_run_and_model_over_http_land_in_s3(mlflow_server, tmp_path):
    uri = mlflow_server.uri
    runs.check_tracking_server(uri, timeout_s=5)
    cfg = build_config({"data": {"dataset": "cifar10"}, "tracking": {"tracking_uri": uri}})
    assert runs.resolve_tracking_uri(cfg.tracking.tracking_uri) == uri

    # One run per run name, over HTTP too.
    run_id = runs.start_or_resume_run(uri, "shike-http", "http-run", runs.standard_tags(cfg))
    log = runs.RunLogger(uri, run_id)
    log.log_config(cfg)
    for epoch in range(2):
        log.log_metrics({"train/loss": 1.5 - epoch, "val/acc": 0.2 + 0.1 * epoch}, step=epoch)
    counts = EvalCounts(10)
    gen = torch.Generator().manual_seed(0)
    counts.update(torch.randn(200, 10, generator=gen), torch.arange(200) % 10)
    results = counts.compute(class_counts=CLASS_COUNTS)
    log.log_evaluation("test", results, CLASS_COUNTS, NAMES, counts=counts)
    log.finish()
    assert runs.start_or_resume_run(uri, "shike-http", "http-run") == run_id
    log.log_config(cfg)  # the resumed run accepts the same config again

    torch.manual_seed(0)
    net = build_model(ModelConfig(), 10)
    net.set_stage(2)
    name = registry.model_name_for(cfg)
    mv = registry.log_and_register(
        run_id, net, NAMES, name, mean=CIFAR_MEAN, std=CIFAR_STD,
        metrics={"test/acc": results["acc"]}, tracking_uri=uri,
    )  # fmt: skip
    log.finish()
    assert name == "shike-cifar10-lt-if100"
    assert str(mv.version) == "1" and mv.aliases == ["candidate"]

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied by the server
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.5), (1, 0.5)]
    assert run.data.params["loss.dkt_weight"] == "10.0"

    # The artifacts are in the S3 bucket behind the server.
    keys = mlflow_server.object_keys()
    run_keys = {
        k.split(f"/{run_id}/artifacts/", 1)[1] for k in keys if f"/{run_id}/artifacts/" in k
    }
    assert {
        "config.yaml",
        "test/per_class.csv",
        "test/per_class_accuracy.png",
        "test/reliability.png",
    } <= run_keys
    model_keys = [k for k in keys if "/models/" in k]
    assert any(k.endswith("/MLmodel") for k in model_keys), keys
    assert any(k.endswith("/data/model.pth") for k in model_keys), keys
    assert any(k.endswith("/code/pipeline/models/inference.py") for k in model_keys), keys

    # Loading by alias over HTTP, with both loaders, predicts like the eager model.
    x = np.random.default_rng(7).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    eager = ImageClassifier(net.eval(), CIFAR_MEAN, CIFAR_STD, NAMES).eval()
    with torch.no_grad():
        expected = eager(torch.from_numpy(x)).numpy()
    clf = registry.load_classifier(f"models:/{name}@candidate", tracking_uri=uri)
    with torch.no_grad():
        np.testing.assert_allclose(clf(torch.from_numpy(x)).numpy(), expected, atol=1e-5)
    pyfunc = registry.load_pyfunc(f"models:/{name}@candidate", tracking_uri=uri)
    np.testing.assert_allclose(pyfunc.predict(x), expected, atol=1e-5)
    assert registry.class_names_of(f"models:/{name}@candidate", tracking_uri=uri) == NAMES

    # Errors are the same clear ones over REST.
    with pytest.raises(RegistryError, match=f"model '{name}' has no alias 'champion'"):
        versions.resolve_model_version(f"models:/{name}@champion", tracking_uri=uri)
    with pytest.raises(RegistryError, match=f"model '{name}' has no version 3"):
        versions.resolve_model_version(f"models:/{name}/3", tracking_uri=uri)
    with pytest.raises(RegistryError, match="no registered model named 'nope'"):
        versions.resolve_model_version("models:/nope@candidate", tracking_uri=uri)
    assert versions.get_alias_version(name, "champion", tracking_uri=uri) is None
    versions.set_alias(name, "champion", 1, tracking_uri=uri)
    assert str(versions.get_alias_version(name, "champion", tracking_uri=uri).version) == "1"
