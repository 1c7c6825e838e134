"""Integration fixtures. Each component keeps its fixtures in its own clearly marked section."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

# ======================================================================================
# MLflow tracking server over HTTP (pipeline/tracking/runs.py, pipeline/tracking/registry.py)
# ======================================================================================


@dataclass
class MlflowServer:
    uri: str  # http://127.0.0.1:<port>
    bucket: str  # the moto bucket holding the proxied artifacts
    prefix: str  # key prefix of --artifacts-destination inside the bucket
    s3_endpoint_url: str
    credentials: dict[str, str]  # the fake AWS credentials the server process uses
    log_path: Path

    def s3_client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint_url,
            aws_access_key_id=self.credentials["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.credentials["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )

    def object_keys(self) -> list[str]:
        client = self.s3_client()
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + "/"
        ):
            keys += [obj["Key"] for obj in page.get("Contents", [])]
        return keys


def _mlflow_executable() -> list[str]:
    script = Path(sys.executable).with_name("mlflow")
    if script.exists():
        return [str(script)]
    found = shutil.which("mlflow")
    if found:
        return [found]
    return [sys.executable, "-m", "mlflow"]


@pytest.fixture(scope="session")
def mlflow_server(moto_server, tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1: SQLite backend in a temporary folder, artifacts
    proxied (--serve-artifacts) to s3://<bucket>/mlartifacts on the session's moto server.
    Started once per session (about 10 s), killed at the end."""
    from tests.helpers.s3_server import FAKE_CREDENTIALS, free_port

    creds = {k: v for k, v in FAKE_CREDENTIALS.items() if v}
    bucket = f"mlflow-{uuid.uuid4().hex[:10]}"
    base = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(
        uri="",
        bucket=bucket,
        prefix="mlartifacts",
        s3_endpoint_url=moto_server.endpoint_url,
        credentials=creds,
        log_path=base / "server.log",
    )
    server.s3_client().create_bucket(Bucket=bucket)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    env.update(creds)
    env.update(
        {
            "MLFLOW_S3_ENDPOINT_URL": moto_server.endpoint_url,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "AWS_CONFIG_FILE": str(base / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(base / "no-aws-config"),
        }
    )
    proc = None
    log = server.log_path.open("wb")
    try:
        # The probed free port can be taken before the server binds it: the server then exits,
        # and the next try takes another port, and a database of its own (a server stopped
        # mid-migration leaves its database half migrated: "duplicate column name").
        for attempt in range(3):
            port = free_port()
            server.uri = f"http://127.0.0.1:{port}"
            cmd = [
                *_mlflow_executable(), "server",
                "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{base / f'mlflow-{attempt}.db'}",
                "--serve-artifacts", "--artifacts-destination", f"s3://{bucket}/{server.prefix}",
            ]  # fmt: skip
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=base, start_new_session=True
            )
            # Creating the database under `make test`'s lanes has taken over 90 s (bench/
            # HISTORY.md, session 31): a live server is given 180 s.
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with urllib.request.urlopen(server.uri + "/health", timeout=2) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    time.sleep(0.25)
            else:
                _stop(proc)
                proc = None
                continue
            break
        if proc is None:
            tail = server.log_path.read_text(errors="replace")[-3000:]
            pytest.fail(f"mlflow server did not start; log tail:\n{tail}")
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server and its worker processes (it runs in its own session/group)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# ======================================================================================
# Training-job fixtures: one small prepared dataset for the Ray Train job tests
# ======================================================================================


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """CIFAR-10-LT shards of generated images (IF 4, 40 head images, 4 val and 6 test per
    class), shared read-only by the jobs.train tests."""
    from pipeline.data.prepare.from_raw import prepare_dataset
    from tests.helpers.cifar_archives import write_parquet_folder

    base = tmp_path_factory.mktemp("tiny")
    write_parquet_folder(base / "raw", train_per_class=40, test_per_class=6)
    prepare_dataset("cifar10", str(base / "raw"), str(base / "shards"), 4.0, val_per_class=4)
    return str(base / "shards")
