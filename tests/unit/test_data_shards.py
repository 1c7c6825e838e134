"""Shards + manifest + storage + the prepare job: local folders and a real S3 server (moto)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import DataError, IntegrityError, SourceFormatError
from pipeline.data.longtail import (
    build_longtail_splits,
    class_counts_of,
    longtail_counts,
    select_longtail,
)
from pipeline.data.manifest import (
    CHECKSUM_KEY,
    MANIFEST_NAME,
    TRAIN_ROW_ORDER_SEED,
    Manifest,
    read_manifest,
    seal_document,
)
from pipeline.data.prepare.from_raw import prepare_dataset, prepare_from_raw
from pipeline.data.readers.torch_reader import load_prepared
from pipeline.data.shards import load_split, read_split_table, shard_files, verify_split
from pipeline.storage import S3Options, StorageError, resolve
from tests.helpers.cifar_archives import write_cifar100_archive, write_parquet_folder

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"


def _files(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def small(tmp_path):
    """A small generated CIFAR-10-style Parquet folder (60 train / 4 test images per class)."""
    return write_parquet_folder(tmp_path / "src", 60, 4)


@pytest.fixture
def small_prepared(small, tmp_path):
    out = tmp_path / "out"
    prepare_dataset("cifar10", str(small.path), str(out), 10, val_per_class=5, shard_mb=0.02)
    return out


# --------------------------------------------------------------------------------------
# generated CIFAR-100 (the paper's benchmark), 500 images per class


@pytest.mark.parametrize("imbalance, total", [(100, 10847), (50, 12608), (10, 19573)])
def test_cifar100_counts(cifar100_raw, imbalance, total):
    s = build_longtail_splits(cifar100_raw, imbalance)
    assert len(s.train) == total and s.n_max == 500
    assert class_counts_of(s.train.labels, 100) == longtail_counts(500, 100, imbalance)
    # val: 20 unused images per class where there are 20 (class 0 uses all of its 500)
    expected = [min(20, 500 - n) for n in longtail_counts(500, 100, imbalance)]
    assert class_counts_of(s.val.labels, 100) == expected and expected[0] == 0
    assert not set(s.train_indices) & set(s.val_indices)


def test_cifar100_prepare_round_trip(cifar100_raw, cifar100_archive, tmp_path):
    out = tmp_path / "c100"
    lines: list[str] = []
    m = prepare_from_raw(cifar100_raw, str(out), 100, shard_mb=1, log=lines.append)
    assert any("published" in line for line in lines)
    assert m.splits["train"].num_rows == 10847 and len(m.splits["train"].shards) >= 2
    assert m.splits["val"].num_rows == 99 * 20 and m.splits["test"].num_rows == 1000
    m2 = read_manifest(str(out))
    assert m2.to_dict() == m.to_dict()
    assert m2.dataset == "cifar100" and m2.class_names == cifar100_archive.class_names
    assert m2.coarse_class_names == cifar100_archive.coarse_class_names
    assert m2.class_counts == longtail_counts(500, 100, 100)
    assert [len(m2.class_groups[k]) for k in ("many", "medium", "few")] == [35, 35, 30]
    assert m2.source["checksum"] == cifar100_raw.checksum and m2.source["format"] == "cifar-python"
    assert m2.selection.rule == "first" and m2.selection.seed == 0 and m2.imbalance_factor == 100.0
    train = load_split(m2, "train")
    idx = select_longtail(cifar100_raw.train.labels, m2.class_counts)
    idx = idx[np.random.default_rng(TRAIN_ROW_ORDER_SEED).permutation(len(idx))]  # stored order
    assert np.array_equal(train.images, cifar100_raw.train.images[idx])
    assert np.array_equal(train.labels, cifar100_raw.train.labels[idx])
    assert np.array_equal(train.coarse_labels, cifar100_raw.train.coarse_labels[idx])
    assert list(train.sample_ids) == list(cifar100_raw.train.sample_ids[idx])
    test = load_split(read_manifest(str(out)), "test")
    assert np.array_equal(test.images, cifar100_raw.test.images)
    assert np.array_equal(test.coarse_labels, cifar100_raw.test.coarse_labels)


# --------------------------------------------------------------------------------------
# the real CIFAR-10 (skipped without $CIFAR10_DIR)


@pytest.fixture(scope="session")
def cifar10_if100(cifar10_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("cifar10_if100")
    manifest = prepare_from_raw(cifar10_raw, str(out), 100)
    return out, manifest


def test_real_cifar10_prepared_if100(cifar10_raw, cifar10_if100):
    out, m = cifar10_if100
    assert m.class_counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert m.splits["train"].num_rows == 12406
    assert m.splits["test"].num_rows == 10000 and m.splits["test"].class_counts == [1000] * 10
    assert m.splits["val"].class_counts == [0] + [20] * 9
    for name, info in m.splits.items():  # manifest counts match the shards
        table = read_split_table(m, name)
        assert table.num_rows == info.num_rows == sum(s.num_rows for s in info.shards)
        assert class_counts_of(table.column("label").to_numpy(), 10) == info.class_counts
        for s in info.shards:
            p = out / s.path
            assert (
                p.stat().st_size == s.bytes
                and hashlib.sha256(p.read_bytes()).hexdigest() == s.sha256
            )
    train = load_prepared(str(out)).train  # the engine's (class, source id) order
    idx = select_longtail(cifar10_raw.train.labels, m.class_counts)
    assert np.array_equal(train.images, cifar10_raw.train.images[idx])  # bit for bit
    assert list(train.sample_ids[:2]) == ["train/00000", "train/00001"]
    val = load_split(read_manifest(str(out)), "val")
    val_idx = np.array([int(s.split("/")[1]) for s in val.sample_ids])
    assert not set(val_idx) & set(idx)
    assert np.array_equal(val.images, cifar10_raw.train.images[val_idx])
    test = load_split(read_manifest(str(out)), "test")
    assert np.array_equal(test.images, cifar10_raw.test.images)
    assert np.array_equal(test.labels, cifar10_raw.test.labels)


@pytest.mark.parametrize(
    "imbalance, counts",
    [
        (50, [5000, 3237, 2096, 1357, 878, 568, 368, 238, 154, 100]),
        (10, [5000, 3871, 2997, 2320, 1796, 1391, 1077, 834, 645, 500]),
    ],
)
def test_real_cifar10_splits_if50_if10(cifar10_raw, imbalance, counts):
    s = build_longtail_splits(cifar10_raw, imbalance)
    assert class_counts_of(s.train.labels, 10) == counts and len(s.train) == sum(counts)
    assert class_counts_of(s.val.labels, 10) == [0] + [20] * 9
    assert class_counts_of(s.test.labels, 10) == [1000] * 10


# --------------------------------------------------------------------------------------
# determinism, re-runs, shard size


def test_same_inputs_same_bytes_and_rerun_is_a_noop(small, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        prepare_dataset("cifar10", str(small.path), str(out), 10, val_per_class=5, shard_mb=0.02)
    assert _files(a) == _files(b)
    assert len([k for k in _files(a) if k.startswith("train/")]) >= 2
    mtimes = {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()}
    lines: list[str] = []
    prepare_dataset(
        "cifar10", str(small.path), str(a), 10, val_per_class=5, shard_mb=0.02, log=lines.append
    )
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*") if p.is_file()} == mtimes
    assert not [
        line for line in lines if line.startswith(("wrote", "published")) or " wrote " in line
    ]
    assert any("manifest unchanged" in line for line in lines)


def test_training_rows_are_stored_shuffled_and_the_engine_restores_class_order(small, tmp_path):
    """Ray Data shuffles within a local buffer of ~1,000 rows only, so shards that held the
    training split class by class gave whole stretches of one-class batches. The shards now
    hold one seeded random order; the Ray-free reader puts the rows back in (class, source id)
    order, so its epochs do not depend on how the shards are laid out."""
    out = tmp_path / "out"
    manifest = prepare_dataset("cifar10", str(small.path), str(out), 10, val_per_class=5)
    assert manifest.train_row_order == read_manifest(str(out)).train_row_order == "shuffled"
    stored = read_split_table(manifest, "train")
    labels = stored.column("label").to_numpy()
    assert len(set(labels[:40].tolist())) >= 6  # class by class, 40 rows hold one class

    train = load_prepared(str(out)).train
    assert sorted(train.sample_ids.tolist()) == sorted(stored.column("sample_id").to_pylist())
    order = list(zip(train.labels.tolist(), train.sample_ids.tolist(), strict=True))
    assert order == sorted(order)
    again = tmp_path / "again"  # a rerun writes the same order
    prepare_dataset("cifar10", str(small.path), str(again), 10, val_per_class=5)
    assert _files(again) == _files(out)


def test_ray_reader_refuses_class_ordered_training_rows(small, tmp_path):
    """A dataset prepared before the shuffled row order has no "train_row_order": the engine
    still reads it, the Ray reader says to prepare it again."""
    from pipeline.data.readers.ray_reader import training_datasets

    out = tmp_path / "out"
    prepare_dataset("cifar10", str(small.path), str(out), 10, val_per_class=5)
    path = out / MANIFEST_NAME
    doc = json.loads(path.read_text())
    del doc["train_row_order"], doc[CHECKSUM_KEY]  # such manifests were not sealed either
    path.write_text(json.dumps(doc))
    assert read_manifest(str(out)).to_dict()["train_row_order"] == {"order": "class"}
    assert len(load_prepared(str(out)).train.labels) == sum(doc["class_counts"])
    with pytest.raises(DataError, match=r"class by class.*jobs/prepare_data.py again"):
        training_datasets(read_manifest(str(out)), "shike", 0)


def test_new_version_replaces_old_shards(small, tmp_path):
    out = tmp_path / "out"
    prepare_dataset("cifar10", str(small.path), str(out), 10, val_per_class=5, shard_mb=0.02)
    before = set(_files(out))
    m = prepare_dataset("cifar10", str(small.path), str(out), 50, val_per_class=5)
    after = set(_files(out))
    listed = {s.path for info in m.splits.values() for s in info.shards}
    assert after == listed | {MANIFEST_NAME} and before != after
    assert read_manifest(str(out)).imbalance_factor == 50
    assert not list(out.rglob("*.tmp-*"))


def test_shards_are_zstd_parquet_with_the_contract_schema(small_prepared):
    m = read_manifest(f"file://{small_prepared}")
    fs, paths = shard_files(m, "train")
    assert (
        fs.type_name == "local"
        and len(paths) >= 2
        and all(p.startswith(str(small_prepared)) for p in paths)
    )
    meta = pq.ParquetFile(paths[0]).metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"
    schema = pq.read_schema(paths[0])
    assert schema.names == ["image", "label", "sample_id"]
    assert schema.field("label").type == pa.int64() and schema.field("image").type == pa.binary()
    table = pq.read_table(paths[0])
    assert table.column("image")[0].as_py()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((small_prepared / MANIFEST_NAME).read_text())
    assert manifest["schema_version"] == 1 and set(manifest["splits"]) == {"train", "val", "test"}
    assert manifest["selection"] == {"rule": "first", "seed": 0} and manifest["val_per_class"] == 5
    # the manifest may be addressed directly too
    assert read_manifest(str(small_prepared / MANIFEST_NAME)).to_dict() == m.to_dict()
    assert verify_split(m, "train") is m


def test_selection_shuffle_and_caps(small, tmp_path):
    m = prepare_dataset(
        "cifar10",
        str(small.path),
        str(tmp_path / "o"),
        10,
        selection="shuffle",
        selection_seed=3,
        n_max=50,
        val_per_class=4,
        test_per_class=2,
    )
    assert m.selection.rule == "shuffle" and m.selection.seed == 3 and m.n_max == 50
    assert m.splits["val"].class_counts == [4] * 10 and m.splits["test"].class_counts == [2] * 10
    assert m.class_counts == longtail_counts(50, 10, 10)


# --------------------------------------------------------------------------------------
# bad inputs: clear errors, nothing published


def test_bad_sources_publish_nothing(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.txt").write_text("hello")
    out = tmp_path / "out"
    with pytest.raises(SourceFormatError, match="unknown format"):
        prepare_dataset("cifar10", str(junk), str(out), 100)
    assert not out.exists() or not any(out.rglob("*"))
    bad = write_parquet_folder(tmp_path / "bad", 3, 1, bad_label=("train", 4, 12))
    with pytest.raises(SourceFormatError, match="train split row 4 has label 12"):
        prepare_dataset("cifar10", str(bad.path), str(out), 100)
    assert not out.exists() or not any(out.rglob("*"))
    few = write_parquet_folder(tmp_path / "few", 3, 1)
    with pytest.raises(DataError, match="no training image"):
        prepare_dataset("cifar10", str(few.path), str(out), 100)  # 3 / 100 < 1 image
    assert not (out / MANIFEST_NAME).exists()


def test_missing_manifest(tmp_path):
    with pytest.raises(IntegrityError, match=f"no manifest.json at {tmp_path}/manifest.json"):
        read_manifest(str(tmp_path))
    with pytest.raises(IntegrityError, match="no manifest.json"):
        load_split(read_manifest(str(tmp_path / "nothing")), "train")


def test_missing_shard(small_prepared):
    m = read_manifest(str(small_prepared))
    victim = small_prepared / m.splits["train"].shards[1].path
    victim.unlink()
    with pytest.raises(IntegrityError, match=f"shard {victim} listed in the manifest is missing"):
        load_split(read_manifest(str(small_prepared)), "train")
    load_split(read_manifest(str(small_prepared)), "test")  # other splits still load


def test_truncated_shard(small_prepared):
    m = read_manifest(str(small_prepared))
    victim = small_prepared / m.splits["train"].shards[0].path
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(
        IntegrityError, match=f"shard {victim} is .* bytes but the manifest says .*truncated"
    ):
        load_split(read_manifest(str(small_prepared)), "train")


def test_altered_shard_sha_mismatch(small_prepared):
    m = read_manifest(str(small_prepared))
    victim = small_prepared / m.splits["val"].shards[0].path
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(
        IntegrityError, match=f"shard {victim} has sha256 .* but the manifest says .*altered"
    ):
        verify_split(read_manifest(str(small_prepared)), "val")


def test_schema_mismatch(small_prepared):
    m = read_manifest(str(small_prepared))
    shard = m.splits["test"].shards[0]
    victim = small_prepared / shard.path
    table = pq.read_table(victim)
    table = table.set_column(1, "label", table.column("label").cast(pa.int32()))
    pq.write_table(table, victim)
    # a manifest that vouches for the new bytes: only the schema check can catch it
    data = victim.read_bytes()
    manifest = json.loads((small_prepared / MANIFEST_NAME).read_text())
    entry = manifest["splits"]["test"]["shards"][0]
    entry["bytes"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (small_prepared / MANIFEST_NAME).write_text(json.dumps(seal_document(manifest)))
    with pytest.raises(
        IntegrityError,
        match=f"shard {victim} has schema .*label: int32.* but expected .*label: int64",
    ):
        load_split(read_manifest(str(small_prepared)), "test")


def test_corrupt_shard_with_matching_sha_is_not_parquet(small_prepared):
    m = read_manifest(str(small_prepared))
    victim = small_prepared / m.splits["test"].shards[0].path
    victim.write_bytes(b"this is not parquet")
    manifest = json.loads((small_prepared / MANIFEST_NAME).read_text())
    entry = manifest["splits"]["test"]["shards"][0]
    entry["bytes"], entry["sha256"] = 19, hashlib.sha256(b"this is not parquet").hexdigest()
    (small_prepared / MANIFEST_NAME).write_text(json.dumps(seal_document(manifest)))
    with pytest.raises(IntegrityError, match=f"shard {victim} is not a readable Parquet file"):
        load_split(read_manifest(str(small_prepared)), "test")


def test_bad_manifests(small_prepared):
    path = small_prepared / MANIFEST_NAME
    good = json.loads(path.read_text())

    def refused(doc, message):
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        with pytest.raises(IntegrityError, match=f"^{path}: {message}"):
            read_manifest(str(small_prepared))

    def altered(change):
        doc = json.loads(json.dumps(good))
        change(doc)
        return doc

    refused("{not json", "not valid JSON")
    refused("[1, 2]", "invalid manifest: Input should be an object")
    refused({**good, "schema_version": 99}, "invalid manifest: schema_version: 99 is not supported")
    refused(
        altered(
            lambda d: d["splits"]["train"].update(num_rows=d["splits"]["train"]["num_rows"] + 1)
        ),
        "invalid manifest: splits.train: shard rows do not add up",
    )
    refused(
        altered(lambda d: d["splits"]["train"]["shards"][0].update(path="../../etc/passwd")),
        r"invalid manifest: splits.train.shards.0.path: .*must be relative",
    )
    refused(
        altered(lambda d: d["splits"]["val"]["shards"][0].update(sha256="abc")),
        r"invalid manifest: splits.val.shards.0.sha256: String should match pattern",
    )
    refused(
        altered(lambda d: d["splits"]["test"].update(class_counts=[2] * 5)),
        "invalid manifest: splits.test: class_counts do not add up",
    )
    refused(altered(lambda d: d.update(num_classes=9)), "invalid manifest: num_classes is 9")
    refused(
        altered(lambda d: d.pop("class_names")), "invalid manifest: class_names: Field required"
    )
    refused(altered(lambda d: d.update(n_max="many")), "invalid manifest: n_max: Input should be")


@pytest.mark.parametrize("name", ["manifest_cifar10_v1.json", "manifest_cifar100_v1.json"])
def test_manifests_written_before_the_pydantic_model_still_load(name, tmp_path):
    """The fixtures are manifest.json files written by the hand-written Manifest.to_dict (before
    the model moved to pydantic): they load, and writing them back gives the same bytes."""
    fixture = FIXTURES / name
    (tmp_path / MANIFEST_NAME).write_bytes(fixture.read_bytes())
    m = read_manifest(str(tmp_path))
    assert m.to_json() == fixture.read_bytes()
    assert m.to_dict() == json.loads(fixture.read_text())
    assert m.train_row_order == "shuffled" and m.image_shape == [32, 32, 3]
    assert m.num_classes == len(m.class_names) == len(m.class_counts)
    assert m.has_coarse == (m.dataset == "cifar100")
    assert [c.name for c in m.columns] == m.arrow_schema.names
    class_ordered = json.loads(fixture.read_text())  # before the shuffled row order
    del class_ordered["train_row_order"]
    again = Manifest.model_validate(class_ordered)
    assert again.train_row_order == "class"
    assert again.to_dict() == {**class_ordered, "train_row_order": {"order": "class"}}


# --------------------------------------------------------------------------------------
# storage URIs


def test_resolve_uris(tmp_path, monkeypatch):
    fs, path = resolve(f"file://{tmp_path}/x/")
    assert fs.type_name == "local" and path == f"{tmp_path}/x"
    monkeypatch.chdir(tmp_path)
    fs, path = resolve("rel/dir")
    assert fs.type_name == "local" and path == f"{tmp_path}/rel/dir"
    fs, path = resolve(
        "s3://my-bucket/some/prefix/",
        S3Options(endpoint_url="http://127.0.0.1:9", region="eu-west-1"),
    )
    assert fs.type_name == "s3" and path == "my-bucket/some/prefix" and fs.region == "eu-west-1"
    for bad, msg in [
        ("gs://b/x", "unsupported URI scheme"),
        ("s3://", "needs a bucket"),
        ("s3://Bad_Bucket/x", "not a valid S3 bucket name"),
        ("file://host/x", "must be absolute"),
    ]:
        with pytest.raises(StorageError, match=msg):
            resolve(bad)


def test_endpoint_from_environment(monkeypatch):
    from pipeline.storage import endpoint_of

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1234")
    fs, _ = resolve("s3://bucket-a/x")
    assert endpoint_of(fs) == "http://127.0.0.1:1234"
    fs, _ = resolve("s3://bucket-a/x", S3Options(endpoint_url="https://minio.example:9000"))
    assert endpoint_of(fs) == "https://minio.example:9000"


# --------------------------------------------------------------------------------------
# a real S3 server (moto, loopback)


@pytest.mark.integration
def test_s3_round_trip(s3_env, small, tmp_path):
    uri = s3_env.uri("datasets", "c10-lt")
    m = prepare_dataset(
        "cifar10", str(small.path), uri, 10, val_per_class=5, shard_mb=0.02, s3=s3_env.options
    )
    assert m.uri == uri
    m2 = read_manifest(uri, s3_env.options)
    assert m2.to_dict() == m.to_dict()
    local = tmp_path / "local"
    prepare_dataset("cifar10", str(small.path), str(local), 10, val_per_class=5, shard_mb=0.02)
    assert read_manifest(str(local)).to_dict() == m2.to_dict()  # same bytes wherever written
    for split in ("train", "val", "test"):
        a, b = load_split(m2, split), load_split(read_manifest(str(local)), split)
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    fs, paths = shard_files(m2, "train")
    assert fs.type_name == "s3" and all(
        p.startswith(f"{s3_env.bucket}/datasets/c10-lt/train/") for p in paths
    )
    assert m2.shard_uris("train")[0].startswith(
        f"s3://{s3_env.bucket}/datasets/c10-lt/train/part-00000-"
    )
    assert pq.read_table(paths, filesystem=fs).num_rows == m2.splits["train"].num_rows
    # the endpoint can come from the environment alone
    os.environ["AWS_ENDPOINT_URL"] = s3_env.endpoint_url
    try:
        assert read_manifest(uri).to_dict() == m2.to_dict()
    finally:
        del os.environ["AWS_ENDPOINT_URL"]
    lines: list[str] = []
    prepare_dataset(
        "cifar10",
        str(small.path),
        uri,
        10,
        val_per_class=5,
        shard_mb=0.02,
        s3=s3_env.options,
        log=lines.append,
    )
    assert any("manifest unchanged" in line for line in lines)


@pytest.mark.integration
def test_s3_integrity_errors_name_the_object(s3_env, small):
    import boto3

    with pytest.raises(
        IntegrityError, match=f"no manifest.json at s3://{s3_env.bucket}/nothing/manifest.json"
    ):
        read_manifest(s3_env.uri("nothing"), s3_env.options)
    uri = s3_env.uri("ds")
    m = prepare_dataset("cifar10", str(small.path), uri, 10, val_per_class=5, s3=s3_env.options)
    key = f"ds/{m.splits['val'].shards[0].path}"
    client = boto3.client("s3", endpoint_url=s3_env.endpoint_url)
    body = client.get_object(Bucket=s3_env.bucket, Key=key)["Body"].read()
    client.put_object(Bucket=s3_env.bucket, Key=key, Body=body[:-10])
    with pytest.raises(
        IntegrityError, match=f"shard s3://{s3_env.bucket}/{key} is .* bytes .*truncated"
    ):
        load_split(read_manifest(uri, s3_env.options), "val")
    client.delete_object(Bucket=s3_env.bucket, Key=key)
    with pytest.raises(
        IntegrityError, match=f"shard s3://{s3_env.bucket}/{key} listed in the manifest is missing"
    ):
        load_split(read_manifest(uri, s3_env.options), "val")


@pytest.mark.integration
def test_s3_missing_bucket(s3_env, small):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' does not exist"):
        prepare_dataset(
            "cifar10", str(small.path), "s3://no-such-bucket-x/ds", 10, s3=s3_env.options
        )


@pytest.mark.integration
def test_unreachable_s3_endpoint_fails_fast(s3_env, small):
    from tests.helpers.s3_server import free_port

    dead = S3Options(
        endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1", connect_timeout_s=2
    )
    t0 = time.monotonic()
    with pytest.raises(
        StorageError, match=r"cannot reach the S3 endpoint \(endpoint http://127\.0\.0\.1:\d+\)"
    ):
        prepare_dataset("cifar10", str(small.path), f"s3://{s3_env.bucket}/x", 10, s3=dead)
    with pytest.raises(StorageError, match="cannot reach the S3 endpoint"):
        read_manifest(f"s3://{s3_env.bucket}/x", dead)
    assert time.monotonic() - t0 < 30


@pytest.mark.integration
def test_silent_s3_endpoint_times_out(s3_env):
    import socket

    with socket.socket() as silent:  # accepts connections (kernel backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        opts = S3Options(
            endpoint_url=f"http://127.0.0.1:{silent.getsockname()[1]}",
            region="us-east-1",
            connect_timeout_s=1,
            request_timeout_s=1,
            max_attempts=2,
        )
        t0 = time.monotonic()
        with pytest.raises(StorageError, match="cannot reach the S3 endpoint .*Timeout"):
            read_manifest(f"s3://{s3_env.bucket}/x", opts)
        assert time.monotonic() - t0 < 20


@pytest.mark.integration
def test_wrong_credentials(s3_env, moto_auth_server, small, monkeypatch):
    secret = "wrong-secret-value-12345"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    opts = S3Options(endpoint_url=moto_auth_server.endpoint_url, region="us-east-1")
    for call in (
        lambda: prepare_dataset("cifar10", str(small.path), "s3://some-bucket/ds", 10, s3=opts),
        lambda: read_manifest("s3://some-bucket/ds", opts),
    ):
        with pytest.raises(StorageError) as err:
            call()
        msg = str(err.value)
        assert (
            "access denied" in msg
            and "check the S3 credentials" in msg
            and "s3://some-bucket/ds" in msg
        )
        assert secret not in msg and "AKIAWRONGWRONGWRONG1" not in msg


# --------------------------------------------------------------------------------------
# the job


def _job(args, module=True, env=None, timeout=120):
    cmd = (
        [sys.executable, "-m", "jobs.prepare_data"]
        if module
        else [sys.executable, str(ROOT / "jobs" / "prepare_data.py")]
    )
    return subprocess.run(
        cmd + args,
        cwd=ROOT if module else "/",
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_job_help_lists_every_option_with_defaults():
    r = _job(["--help"])
    assert r.returncode == 0
    for opt in (
        "--dataset",
        "--source",
        "--output",
        "--imbalance-factor",
        "--selection",
        "--selection-seed",
        "--val-per-class",
        "--shard-mb",
        "--endpoint-url",
        "--region",
        "--n-max",
        "--test-per-class",
    ):
        assert opt in r.stdout
    for default in (
        "(default: 100.0)",
        "(default: first)",
        "(default: 0)",
        "(default: 20)",
        "(default: 64.0)",
    ):
        assert default in r.stdout


def test_job_runs_as_module_and_as_script(small, tmp_path):
    r = _job(
        [
            "--dataset",
            "cifar10",
            "--source",
            str(small.path),
            "--output",
            str(tmp_path / "a"),
            "--imbalance-factor",
            "10",
            "--val-per-class",
            "5",
            "--shard-mb",
            "0.05",
        ]
    )
    assert r.returncode == 0, r.stderr
    assert (
        "published" in r.stdout
        and "done: cifar10 IF 10" in r.stdout
        and "train: wrote shard" in r.stdout
    )
    r2 = _job(
        [
            "--dataset",
            "cifar10",
            "--source",
            str(small.path),
            "--output",
            f"file://{tmp_path}/b",
            "--imbalance-factor",
            "10",
            "--val-per-class",
            "5",
            "--shard-mb",
            "0.05",
        ],
        module=False,
    )
    assert r2.returncode == 0, r2.stderr
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_job_errors_are_one_line(tmp_path, small):
    r = _job(["--dataset", "cifar10", "--source", str(tmp_path), "--output", str(tmp_path / "o")])
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(
        f"error: source {tmp_path}: unknown format"
    )
    assert not (tmp_path / "o" / MANIFEST_NAME).exists()
    r = _job(
        [
            "--dataset",
            "cifar10",
            "--source",
            str(small.path),
            "--output",
            "s3://bkt-x/ds",
            "--endpoint-url",
            "http://127.0.0.1:9",
            "--connect-timeout",
            "1",
        ],
        env={
            "AWS_ACCESS_KEY_ID": "a",
            "AWS_SECRET_ACCESS_KEY": "b",
            "AWS_EC2_METADATA_DISABLED": "true",
        },
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert "cannot reach the S3 endpoint (endpoint http://127.0.0.1:9)" in r.stderr
    r = _job(["--dataset", "cifar10", "--output", "x", "--imbalance-factor", "0.5"])
    assert r.returncode == 2 and "must be >= 1" in r.stderr


def test_job_generated_cifar100_archive(tmp_path):
    gen = write_cifar100_archive(tmp_path, 30, 2)
    r = _job(
        [
            "--dataset",
            "cifar100",
            "--source",
            str(gen.path),
            "--output",
            str(tmp_path / "o"),
            "--imbalance-factor",
            "10",
            "--val-per-class",
            "2",
            "--quiet",
        ]
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    m = read_manifest(str(tmp_path / "o"))
    assert m.class_counts == longtail_counts(30, 100, 10) and m.coarse_class_names is not None
