"""A registered model served the way MLflow users serve one: `mlflow models serve` (local
environment, 127.0.0.1), scoring a JSON batch of uint8 images over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.data.readers.transforms import CIFAR_MEAN, CIFAR_STD
from pipeline.models import build_model
from tests.helpers.s3_server import free_port

pytestmark = pytest.mark.integration
mlflow = pytest.importorskip("mlflow")

NAMES = [f"class_{i}" for i in range(10)]


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(
        f"mlflow models serve did not answer /ping in {timeout} s: {log.read_text()[-3000:]}"
    )


def test_registered_model_serves_probabilities_for_uint8_images(tmp_path):
    from pipeline.tracking import registry, runs

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = runs.start_or_resume_run(store, "serving", "serve-run")
    torch.manual_seed(0)
    net = build_model(ModelConfig(), len(NAMES))
    net.set_stage(2)
    registry.log_and_register(
        run_id, net.eval(), NAMES, "shike-serve", mean=CIFAR_MEAN, std=CIFAR_STD,
        tracking_uri=store,
    )  # fmt: skip

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    bin_dir = str(Path(sys.executable).parent)  # the server execs `uvicorn` from PATH
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "MLFLOW_TRACKING_URI": store,
        "MLFLOW_REGISTRY_URI": store,
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    mlflow_bin = str(Path(bin_dir) / "mlflow")
    cmd = [mlflow_bin, "models", "serve", "-m", "models:/shike-serve@candidate"]
    cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_until_up(url, proc, log)
        batch = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
        request = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps({"inputs": batch.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            served = np.asarray(json.loads(response.read())["predictions"], dtype=np.float64)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert served.shape == (3, len(NAMES))
    assert np.allclose(served.sum(axis=1), 1, atol=1e-4) and (served >= 0).all()
    # what the server answers is what the registered model predicts when loaded in process
    mlflow.set_tracking_uri(store)
    local = np.asarray(mlflow.pyfunc.load_model("models:/shike-serve@candidate").predict(batch))
    np.testing.assert_allclose(served, local, atol=1e-5)
