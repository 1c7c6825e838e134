"""Shared pytest fixtures. Each component keeps its fixtures in its own clearly marked section."""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

# ======================================================================================
# Data layer fixtures (pipeline/data): real CIFAR-10, generated CIFAR-100, S3 on loopback
# ======================================================================================


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """The real CIFAR-10 Parquet folder ($CIFAR10_DIR); tests using it skip when unset."""
    value = os.environ.get("CIFAR10_DIR")
    if not value:
        pytest.skip(
            "CIFAR10_DIR is not set (point it at ../shared/data/cifar10 for real-data tests)"
        )
    path = Path(value)
    if not (path / "train.parquet").is_file():
        pytest.skip(f"CIFAR10_DIR={value} has no train.parquet")
    return path


@pytest.fixture(scope="session")
def cifar10_raw(cifar10_dir):
    """Real CIFAR-10 decoded once per session (about 3-5 s): a RawDataset."""
    from pipeline.data.sources.load import load_raw_dataset

    return load_raw_dataset("cifar10", str(cifar10_dir))


@pytest.fixture(scope="session")
def cifar100_archive(tmp_path_factory):
    """A generated `cifar-100-python.tar.gz` with the real train size (500 per class, 50,000
    images) and a small test split (10 per class): a tests.helpers.cifar_archives.Generated."""
    from tests.helpers.cifar_archives import write_cifar100_archive

    return write_cifar100_archive(tmp_path_factory.mktemp("cifar100"), 500, 10, seed=0)


@pytest.fixture(scope="session")
def cifar100_raw(cifar100_archive):
    from pipeline.data.sources.load import load_raw_dataset

    return load_raw_dataset("cifar100", str(cifar100_archive.path))


@pytest.fixture(scope="session")
def moto_server():
    """moto's S3 server in a subprocess on 127.0.0.1 (no auth): a tests.helpers.s3_server.MotoServer.
    Clients need credentials in their environment: use `s3_env`."""
    from tests.helpers.s3_server import MotoServer

    server = MotoServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_auth_server():
    """A second moto server that enforces authentication from the first request, so every
    key pair is rejected (wrong-credentials tests)."""
    from tests.helpers.s3_server import MotoServer

    server = MotoServer(auth=True).start()
    yield server
    server.stop()


@dataclass
class S3Env:
    endpoint_url: str
    bucket: str
    options: object  # pipeline.storage.S3Options for this endpoint

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *[p.strip("/") for p in parts]])


@pytest.fixture
def s3_env(moto_server, monkeypatch, tmp_path):
    """Fake credentials in the environment (no user AWS config is read) and a fresh bucket."""
    from pipeline.storage import S3Options, create_bucket
    from tests.helpers.s3_server import FAKE_CREDENTIALS

    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in FAKE_CREDENTIALS.items():
        if value:
            monkeypatch.setenv(key, value)
    missing = tmp_path / "no-aws-config"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(missing))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing))
    options = S3Options(endpoint_url=moto_server.endpoint_url, region="us-east-1")
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    create_bucket(f"s3://{bucket}", options)
    return S3Env(moto_server.endpoint_url, bucket, options)


# ======================================================================================


# ======================================================================================
# Ray fixtures: one real head node on 127.0.0.1 for the whole session
# ======================================================================================


@dataclass
class RayCluster:
    address: str  # GCS address, for ray.init / RAY_ADDRESS
    dashboard: str  # http://127.0.0.1:<port>, for `ray job submit --address`
    env: dict  # environment for subprocess drivers and `ray` CLI calls
    tmp_dir: Path  # the head's --temp-dir: finds its processes (ray_cluster.node_processes)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """`ray start --head` once per session; this process connects to it too."""
    import ray

    from tests.helpers.ray_cluster import RAY_ENV, ray_head
    from tests.helpers.s3_server import FAKE_CREDENTIALS

    os.environ.update(RAY_ENV)
    # Short temp root: Ray's socket paths must stay under the 107-byte AF_UNIX limit.
    tmp = Path(f"/tmp/ray-{uuid.uuid4().hex[:8]}")
    # Like a cluster node configured for the object store: Ray Data read tasks that reach the
    # loopback S3 server (moto) find the fake credentials in their environment.
    node_env = {k: v for k, v in FAKE_CREDENTIALS.items() if v}
    with ray_head(tmp, extra_env=node_env) as (address, dashboard, env):
        ray.init(address=address, log_to_driver=False)
        try:
            yield RayCluster(address, dashboard, env, tmp)
        finally:
            ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
