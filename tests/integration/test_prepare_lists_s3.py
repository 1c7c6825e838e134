"""The large benchmarks' prepare writing to a real S3 server (moto, 127.0.0.1): shards of the
source images' own bytes read back through pyarrow's S3 filesystem, re-runs keep them, and a
bad image publishes nothing."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import pytest

from pipeline.data import DataError
from pipeline.data.manifest import MANIFEST_NAME, read_manifest
from pipeline.data.prepare.from_lists import prepare_benchmark
from pipeline.data.shards import read_split_table
from pipeline.storage import S3Options, create_bucket, resolve
from tests.helpers.lt_datasets import write_imagenet_lt, write_inat2018_json
from tests.helpers.s3_server import FAKE_CREDENTIALS, MotoServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def own_moto():
    """A moto server of this module's own: these tests make a few hundred requests and leave
    the session's server to the others."""
    with MotoServer() as server:
        yield server


@dataclass
class S3:
    options: S3Options
    bucket: str

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"


@pytest.fixture
def s3_env(own_moto, monkeypatch, tmp_path):
    """Fake credentials in the environment (no user AWS config is read) and a fresh bucket."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in FAKE_CREDENTIALS.items():
        if value:
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-config"))
    options = S3Options(endpoint_url=own_moto.endpoint_url, region="us-east-1")
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    create_bucket(f"s3://{bucket}", options)
    return S3(options, bucket)


def _objects(s3_env, prefix: str) -> dict[str, tuple[int, object]]:
    """{key: (size, modification time)} of every object under the prefix."""
    import pyarrow.fs as pafs

    fs, root = resolve(s3_env.uri(prefix), s3_env.options)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path: (i.size, i.mtime) for i in infos if i.type == pafs.FileType.File}


def test_imagenet_lt_to_s3_and_back(s3_env, tmp_path):
    root = write_imagenet_lt(tmp_path / "src")
    uri = s3_env.uri("datasets/imagenet-lt")
    lines: list[str] = []
    m = prepare_benchmark(
        "imagenet_lt", str(root), uri, shard_mb=0.05, workers=2, s3=s3_env.options, log=lines.append
    )
    assert len(m.splits["train"].shards) > 1
    read_back = read_manifest(uri, s3_env.options)
    assert read_back.to_json() == m.to_json()
    for split in ("train", "val", "test"):
        table = read_split_table(read_back, split)  # verified: size and sha256 of each object
        ids = table.column("sample_id").to_pylist()
        assert len(ids) == m.splits[split].num_rows
        listed = (root / f"ImageNet_LT_{split}.txt").read_text().split()[::2]
        assert sorted(ids) == sorted(listed)
        for sample_id, image in zip(ids, table.column("image").to_pylist(), strict=True):
            assert image == (root / sample_id).read_bytes()

    before = _objects(s3_env, "datasets/imagenet-lt")
    lines.clear()
    prepare_benchmark(
        "imagenet_lt", str(root), uri, shard_mb=0.05, workers=2, s3=s3_env.options, log=lines.append
    )
    assert not any(": wrote shard" in line for line in lines)
    assert any("manifest unchanged" in line for line in lines)
    assert _objects(s3_env, "datasets/imagenet-lt") == before

    broken = root / (root / "ImageNet_LT_val.txt").read_text().split()[0]
    broken.write_bytes(broken.read_bytes()[:100])
    with pytest.raises(DataError, match="ImageNet_LT_val.txt line 1: image file"):
        prepare_benchmark("imagenet_lt", str(root), uri, shard_mb=0.05, s3=s3_env.options)
    assert _objects(s3_env, "datasets/imagenet-lt") == before


def test_inat2018_test_split_reads_the_val_objects(s3_env, tmp_path):
    root = write_inat2018_json(tmp_path / "src")
    uri = s3_env.uri("datasets/inat2018")
    prepare_benchmark("inat2018", str(root), uri, shard_mb=0.05, s3=s3_env.options)
    m = read_manifest(uri, s3_env.options)
    assert m.split_aliases == {"test": "val"}
    assert read_split_table(m, "test").equals(read_split_table(m, "val"))
    keys = _objects(s3_env, "datasets/inat2018")
    assert not any("/test/" in key for key in keys)
    assert any(key.endswith(f"/{MANIFEST_NAME}") for key in keys)
