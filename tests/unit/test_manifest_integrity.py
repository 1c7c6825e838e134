"""Manifest integrity (issue 28): the manifest's seal (`manifest_sha256`), and
`pipeline.data.integrity.verify_dataset`, which counts the shards' labels against it.

The attack of the issue: two training class counts edited so that their sum (and so every
"adds up" check) stays the same, which silently changes the class priors of training. Once
as a hand edit (the seal catches it), once with the checksum recomputed or from a manifest
published before the seal (the label count catches it).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.data import DataError, IntegrityError
from pipeline.data.integrity import verify_dataset
from pipeline.data.manifest import (
    CHECKSUM_KEY,
    MANIFEST_NAME,
    content_checksum,
    read_manifest,
    seal_document,
)
from pipeline.data.prepare.from_raw import prepare_dataset
from tests.helpers.cifar_archives import write_parquet_folder


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    """A small prepared CIFAR-10-style dataset (10 classes, train 60..6, several shards)."""
    base = tmp_path_factory.mktemp("integrity")
    src = write_parquet_folder(base / "src", 60, 4)
    out = base / "out"
    prepare_dataset("cifar10", str(src.path), str(out), 10, val_per_class=5, shard_mb=0.02)
    return out


@pytest.fixture
def dataset(published, tmp_path) -> Path:
    """A private copy of the published dataset, free to edit."""
    return Path(shutil.copytree(published, tmp_path / "data"))


def _doc(root: Path) -> dict:
    return json.loads((root / MANIFEST_NAME).read_text())


def _write(root: Path, doc: dict) -> None:
    (root / MANIFEST_NAME).write_text(json.dumps(doc, indent=1))


def _move_training_images(doc: dict, src: int, dst: int, n: int) -> dict:
    """Two training class counts edited, their sum kept: in the priors and the split alike
    (so the manifest stays valid: totals, num_rows and the priors == split rule hold)."""
    for counts in (doc["class_counts"], doc["splits"]["train"]["class_counts"]):
        counts[src] -= n
        counts[dst] += n
    return doc


def test_published_manifest_is_sealed_and_verifies(dataset):
    doc = _doc(dataset)
    assert doc[CHECKSUM_KEY] == content_checksum(doc)
    assert len(doc[CHECKSUM_KEY]) == 64
    # Canonical: the layout of the file does not matter, only its content.
    _write(dataset, doc)
    m = verify_dataset(read_manifest(str(dataset)))
    assert m.to_dict() == doc and m.manifest_sha256 == doc[CHECKSUM_KEY]
    assert verify_dataset(m, ["train"]) is m  # an already-read manifest, some splits
    with pytest.raises(DataError, match="no split 'extra'"):
        verify_dataset(m, ["extra"])


def test_hand_edited_class_counts_are_refused_by_the_seal(dataset):
    doc = _move_training_images(_doc(dataset), 0, 1, 3)
    assert sum(doc["class_counts"]) == doc["splits"]["train"]["num_rows"]
    _write(dataset, doc)
    path = dataset / MANIFEST_NAME
    with pytest.raises(
        IntegrityError,
        match=rf"^{path}: manifest_sha256 is .* edited after publication; run jobs.prepare_data",
    ):
        read_manifest(str(dataset))
    with pytest.raises(IntegrityError, match="edited after publication"):
        verify_dataset(read_manifest(str(dataset)))


@pytest.mark.parametrize("sealed", [True, False], ids=["resealed", "unsealed-legacy"])
def test_class_counts_that_the_shards_contradict_are_refused(dataset, sealed):
    """A recomputed checksum (a careless tool), or a manifest from before the seal: the
    manifest reads, but the labels in the shards tell the truth."""
    doc = _move_training_images(_doc(dataset), 0, 1, 3)
    if sealed:
        doc = seal_document(doc)
    else:
        del doc[CHECKSUM_KEY]
    _write(dataset, doc)
    m = read_manifest(str(dataset))
    assert m.class_counts == doc["class_counts"]  # the seal alone cannot tell
    truth = doc["splits"]["train"]["class_counts"][0] + 3
    with pytest.raises(
        IntegrityError,
        match=(
            rf"{dataset}: split train: class 0 \('airplane'\) has {truth - 3} images in the "
            rf"manifest but {truth} in the shards \(and 1 more classes differ\).*prepare_data"
        ),
    ):
        verify_dataset(read_manifest(str(dataset)))
    verify_dataset(read_manifest(str(dataset)), ["val", "test"])  # the other splits are still right


def test_priors_must_be_the_training_split(dataset):
    """Only the priors edited (not the split's counts): refused on read, naming the class."""
    doc = _doc(dataset)
    doc["class_counts"][2] -= 1
    doc["class_counts"][5] += 1
    _write(dataset, seal_document(doc))
    with pytest.raises(
        IntegrityError,
        match=r"invalid manifest: class_counts\[2\] is \d+ but splits.train.class_counts\[2\] is",
    ):
        read_manifest(str(dataset))


def test_held_out_split_counts_are_checked_too(dataset):
    doc = _doc(dataset)
    counts = doc["splits"]["test"]["class_counts"]
    counts[3], counts[4] = counts[3] + 1, counts[4] - 1
    _write(dataset, seal_document(doc))
    with pytest.raises(IntegrityError, match=r"split test: class 3 \('cat'\) has 5 images"):
        verify_dataset(read_manifest(str(dataset)))
    verify_dataset(read_manifest(str(dataset)), ["train", "val"])


def test_class_groups_must_follow_the_counts(dataset):
    doc = _doc(dataset)
    groups = doc["class_groups"]
    moved = groups["medium"].pop(0)
    groups["few"].append(moved)
    _write(dataset, seal_document(doc))
    with pytest.raises(IntegrityError, match=rf"class_groups puts class {moved} .* in 'few'"):
        verify_dataset(read_manifest(str(dataset)))


def test_shard_problems_name_the_file(dataset):
    m = read_manifest(str(dataset))
    shard = m.splits["val"].shards[0]
    (dataset / shard.path).write_bytes(b"not parquet at all")
    with pytest.raises(IntegrityError, match=rf"shard {dataset / shard.path} is not a readable"):
        verify_dataset(read_manifest(str(dataset)), ["val"])
    (dataset / shard.path).unlink()
    with pytest.raises(IntegrityError, match=rf"shard {dataset / shard.path} .* is missing"):
        verify_dataset(read_manifest(str(dataset)), ["val"])


def test_manifests_from_before_the_seal_still_load(dataset):
    doc = _doc(dataset)
    del doc[CHECKSUM_KEY]
    _write(dataset, doc)
    m = verify_dataset(read_manifest(str(dataset)))
    assert m.manifest_sha256 is None and CHECKSUM_KEY not in m.to_dict()
