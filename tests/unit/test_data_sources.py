"""Raw dataset sources: Parquet folder, official CIFAR python archives, image folders."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.data import DataError, SourceFormatError
from pipeline.data.longtail import class_counts_of, longtail_counts, select_longtail
from pipeline.data.sources import cifar_archives
from pipeline.data.sources.load import load_raw_dataset
from pipeline.data.sources.raw import checksum_files, file_hexdigest
from tests.helpers.cifar_archives import (
    CIFAR10_NAMES,
    CIFAR100_COARSE_NAMES,
    CIFAR100_FINE_NAMES,
    write_cifar10_archive,
    write_cifar100_archive,
    write_image_folder,
    write_parquet_folder,
)


def _assert_same(raw_split, gen_split, ids=None):
    assert raw_split.images.dtype == np.uint8 and raw_split.labels.dtype == np.int64
    assert np.array_equal(raw_split.images, gen_split.images)
    assert np.array_equal(raw_split.labels, gen_split.labels)
    if gen_split.coarse_labels is not None:
        assert np.array_equal(raw_split.coarse_labels, gen_split.coarse_labels)
    assert list(raw_split.sample_ids) == (ids if ids is not None else gen_split.filenames)


# --------------------------------------------------------------------------------------
# official python archives


@pytest.mark.parametrize("protocol", [2, 4, "py2"])
def test_cifar100_archive(tmp_path, protocol):
    gen = write_cifar100_archive(tmp_path, 4, 2, protocol=protocol)
    raw = load_raw_dataset("cifar100", str(gen.path))
    assert raw.name == "cifar100" and raw.source_format == "cifar-python"
    assert raw.class_names == CIFAR100_FINE_NAMES
    assert raw.coarse_class_names == CIFAR100_COARSE_NAMES
    assert raw.train.images.shape == (400, 32, 32, 3) and len(raw.test) == 200
    _assert_same(raw.train, gen.train)
    _assert_same(raw.test, gen.test)
    assert raw.checksum.startswith("sha256:") and len(raw.checksum) == 71


def test_cifar100_extracted_folder_and_parent_folders(tmp_path):
    gen = write_cifar100_archive(tmp_path / "x", 2, 1, extracted=True)
    assert gen.path.name == "cifar-100-python"
    a = load_raw_dataset("cifar100", gen.path)  # the extracted folder itself
    b = load_raw_dataset("cifar100", tmp_path / "x")  # its parent
    assert a.checksum == b.checksum
    _assert_same(a.train, gen.train)
    tar = write_cifar100_archive(tmp_path / "y", 2, 1)
    c = load_raw_dataset("cifar100", f"file://{tmp_path / 'y'}")  # a folder holding the .tar.gz
    _assert_same(c.train, tar.train)
    assert c.source == str(tar.path)


@pytest.mark.parametrize("extracted, protocol", [(False, 4), (True, "py2")])
def test_cifar10_archive(tmp_path, extracted, protocol):
    gen = write_cifar10_archive(tmp_path, 6, 3, extracted=extracted, protocol=protocol)
    raw = load_raw_dataset("cifar10", gen.path)
    assert raw.class_names == CIFAR10_NAMES and raw.coarse_class_names is None
    assert raw.train.coarse_labels is None
    _assert_same(raw.train, gen.train)
    _assert_same(raw.test, gen.test)


def test_cifar_archive_of_the_wrong_dataset(tmp_path):
    gen = write_cifar10_archive(tmp_path, 1, 1)
    with pytest.raises(
        SourceFormatError,
        match=r"cifar-10-python\.tar\.gz.*cifar10 archive but the dataset is cifar100",
    ):
        load_raw_dataset("cifar100", gen.path)


def test_cifar_label_out_of_range_names_split_row_and_value(tmp_path):
    gen = write_cifar100_archive(tmp_path, 2, 1, bad_label=("train", 17, 100))
    with pytest.raises(SourceFormatError) as err:
        load_raw_dataset("cifar100", gen.path)
    msg = str(err.value)
    assert str(gen.path) in msg and "train split row 17 has label 100" in msg and "0..99" in msg


def test_truncated_archive_is_a_clear_error(tmp_path):
    gen = write_cifar100_archive(tmp_path, 3, 1)
    data = gen.path.read_bytes()
    gen.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceFormatError, match="damaged archive") as err:
        load_raw_dataset("cifar100", gen.path)
    assert str(gen.path) in str(err.value)


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    d = tmp_path / "cifar-100-python"
    d.mkdir()
    (d / "meta").write_bytes(pickle.dumps({"fine_label_names": Evil()}))
    (d / "train").write_bytes(b"x")
    (d / "test").write_bytes(b"x")
    with pytest.raises(
        SourceFormatError, match=r"meta: not a CIFAR python pickle .*(posix|os)\.system"
    ):
        load_raw_dataset("cifar100", d)


# --------------------------------------------------------------------------------------
# Parquet folder


def test_parquet_folder(tmp_path):
    gen = write_parquet_folder(tmp_path, 5, 2)
    raw = load_raw_dataset("cifar10", tmp_path)
    assert raw.source_format == "parquet" and raw.class_names == CIFAR10_NAMES
    _assert_same(raw.train, gen.train, ids=[f"train/{i:05d}" for i in range(50)])
    _assert_same(raw.test, gen.test, ids=[f"test/{i:05d}" for i in range(20)])
    again = load_raw_dataset("cifar10", str(tmp_path))
    assert again.checksum == raw.checksum
    (tmp_path / "classes.json").write_text(json.dumps(list("abcdefghij")))
    changed = load_raw_dataset("cifar10", tmp_path)
    assert changed.class_names == list("abcdefghij") and changed.checksum != raw.checksum


def test_parquet_optional_columns_and_jpeg(tmp_path):
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)

    def enc(a, fmt):
        b = io.BytesIO()
        Image.fromarray(a).save(b, format=fmt)
        return b.getvalue()

    for split in ("train", "test"):
        pq.write_table(
            pa.table(
                {
                    "image": [enc(a, "JPEG" if i % 2 else "PNG") for i, a in enumerate(imgs)],
                    "label": pa.array([0, 1, 2, 0, 1, 2], pa.int32()),
                    "coarse_label": [0, 0, 1, 0, 0, 1],
                    "sample_id": [f"{split}-{i}" for i in range(6)],
                }
            ),
            tmp_path / f"{split}.parquet",
        )
    raw = load_raw_dataset("imagefolder", tmp_path)
    assert raw.class_names == ["0", "1", "2"]
    assert list(raw.train.sample_ids) == [f"train-{i}" for i in range(6)]
    assert list(raw.train.coarse_labels) == [0, 0, 1, 0, 0, 1]
    assert np.array_equal(raw.train.images[0], imgs[0])  # PNG rows are exact
    assert raw.train.images.shape == (6, 8, 8, 3)


def test_parquet_label_out_of_range(tmp_path):
    write_parquet_folder(tmp_path, 2, 2, bad_label=("test", 5, 10))
    with pytest.raises(SourceFormatError) as err:
        load_raw_dataset("cifar10", tmp_path)
    assert "test split row 5 has label 10" in str(err.value) and str(tmp_path) in str(err.value)
    write_parquet_folder(tmp_path, 2, 2, bad_label=("train", 3, -1))
    with pytest.raises(SourceFormatError, match="train split row 3 has label -1"):
        load_raw_dataset("cifar10", tmp_path)


def test_parquet_problems_name_the_file(tmp_path):
    write_parquet_folder(tmp_path, 1, 1, num_classes=5)  # classes.json names 5 classes
    with pytest.raises(SourceFormatError, match="has 5 classes but cifar100 has 100"):
        load_raw_dataset("cifar100", tmp_path)
    pq.write_table(pa.table({"img": [b"x"], "label": [0]}), tmp_path / "train.parquet")
    with pytest.raises(SourceFormatError, match=r"train\.parquet: missing column\(s\) \['image'\]"):
        load_raw_dataset("imagefolder", tmp_path)
    pq.write_table(pa.table({"image": [b"not an image"], "label": [0]}), tmp_path / "train.parquet")
    with pytest.raises(SourceFormatError, match=r"train\.parquet: row 0 is not a decodable image"):
        load_raw_dataset("imagefolder", tmp_path)
    (tmp_path / "train.parquet").write_bytes(b"PAR1 garbage")
    with pytest.raises(SourceFormatError, match=r"train\.parquet: not a readable Parquet file"):
        load_raw_dataset("imagefolder", tmp_path)


# --------------------------------------------------------------------------------------
# image folder


def test_image_folder_natural_order(tmp_path):
    gen = write_image_folder(tmp_path, 11, 2)  # files 1.png .. 11.png: natural, not lexical
    raw = load_raw_dataset("imagefolder", tmp_path)
    assert raw.source_format == "imagefolder" and raw.class_names == ["cls_a", "cls_b", "cls_c"]
    _assert_same(raw.train, gen.train)
    _assert_same(raw.test, gen.test)
    with pytest.raises(SourceFormatError, match="has 3 classes but cifar10 has 10"):
        load_raw_dataset("cifar10", tmp_path)


def test_image_folder_with_list_files(tmp_path):
    gen = write_image_folder(tmp_path, 3, 1)
    for split, g in (("train", gen.train), ("test", gen.test)):
        lines = [f"{f} {int(c)}" for f, c in zip(g.filenames, g.labels, strict=True)][::-1]
        (tmp_path / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "classes.txt").write_text("A\nB\nC\n")
    raw = load_raw_dataset("imagefolder", tmp_path)
    assert raw.class_names == ["A", "B", "C"]
    assert list(raw.train.sample_ids) == gen.train.filenames[::-1]  # list order is source order
    assert np.array_equal(raw.train.images, gen.train.images[::-1])
    (tmp_path / "train.txt").write_text("train/cls_a/1.png 0\ntrain/cls_a/missing.png 1\n")
    with pytest.raises(
        SourceFormatError, match=r"train\.txt: line 2: image .*missing\.png does not exist"
    ):
        load_raw_dataset("imagefolder", tmp_path)


def test_image_folder_mixed_sizes(tmp_path):
    write_image_folder(tmp_path, 2, 1)
    Image.new("RGB", (16, 16)).save(tmp_path / "train" / "cls_b" / "9.png")
    with pytest.raises(
        SourceFormatError, match=r"cls_b/9\.png is 16x16 but earlier images are 32x32"
    ):
        load_raw_dataset("imagefolder", tmp_path)


# --------------------------------------------------------------------------------------
# detection, environment, download


def test_unknown_formats_name_the_path_and_the_accepted_formats(tmp_path):
    junk = tmp_path / "data.bin"
    junk.write_bytes(b"\x00" * 100)
    for path in (junk, tmp_path):
        with pytest.raises(SourceFormatError) as err:
            load_raw_dataset("cifar10", path)
        msg = str(err.value)
        assert f"source {path}: unknown format" in msg
        assert "train.parquet" in msg and "cifar-100-python" in msg and "image folder" in msg
    with pytest.raises(SourceFormatError, match="does not exist"):
        load_raw_dataset("cifar10", tmp_path / "nope")
    with pytest.raises(SourceFormatError, match="unknown dataset 'mnist'"):
        load_raw_dataset("mnist", tmp_path)
    with pytest.raises(SourceFormatError, match="only local paths"):
        load_raw_dataset("cifar10", "s3://bucket/cifar")
    with pytest.raises(SourceFormatError, match="imagefolder dataset needs a source"):
        load_raw_dataset("imagefolder", None)
    assert issubclass(SourceFormatError, DataError)


def test_source_from_environment(tmp_path, monkeypatch):
    gen = write_cifar100_archive(tmp_path, 1, 1)
    monkeypatch.setenv("CIFAR100_DIR", str(tmp_path))
    raw = load_raw_dataset("cifar100", None)
    _assert_same(raw.train, gen.train)


def test_offline_download_failure_is_a_clear_error(tmp_path, monkeypatch):
    from tests.helpers.s3_server import free_port

    monkeypatch.delenv("CIFAR100_DIR", raising=False)
    monkeypatch.setenv("SHIKE_DATA_CACHE", str(tmp_path / "cache"))
    url, name, md5 = cifar_archives.ARCHIVES["cifar100"]
    monkeypatch.setitem(
        cifar_archives.ARCHIVES, "cifar100", (f"http://127.0.0.1:{free_port()}/{name}", name, md5)
    )
    with pytest.raises(SourceFormatError) as err:
        load_raw_dataset("cifar100", None)
    msg = str(err.value)
    assert "downloading http://127.0.0.1" in msg and "--source" in msg and "$CIFAR100_DIR" in msg
    assert not list((tmp_path / "cache").glob("*"))  # no partial file left behind
    assert url.startswith("https://www.cs.toronto.edu/~kriz/")


def test_cached_archive_with_right_md5_is_used(tmp_path, monkeypatch):
    gen = write_cifar10_archive(tmp_path / "cache", 1, 1)
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    monkeypatch.setenv("SHIKE_DATA_CACHE", str(tmp_path / "cache"))
    url, name, _ = cifar_archives.ARCHIVES["cifar10"]
    md5 = file_hexdigest(gen.path, "md5")
    monkeypatch.setitem(cifar_archives.ARCHIVES, "cifar10", ("http://127.0.0.1:9/never", name, md5))
    raw = load_raw_dataset("cifar10", None)
    _assert_same(raw.train, gen.train)


def test_tar_without_cifar_members_is_unknown(tmp_path):
    path = tmp_path / "other.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        info = tarfile.TarInfo("hello.txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(SourceFormatError, match="unknown format"):
        load_raw_dataset("cifar10", path)


# --------------------------------------------------------------------------------------
# the real CIFAR-10 (../shared/data/cifar10; skipped without $CIFAR10_DIR)


def test_real_cifar10(cifar10_raw, cifar10_dir):
    raw = cifar10_raw
    assert raw.name == "cifar10" and raw.class_names == CIFAR10_NAMES
    assert raw.train.images.shape == (50000, 32, 32, 3) and raw.train.images.dtype == np.uint8
    assert raw.test.images.shape == (10000, 32, 32, 3)
    assert class_counts_of(raw.train.labels, 10) == [5000] * 10
    assert class_counts_of(raw.test.labels, 10) == [1000] * 10
    assert np.all(np.diff(raw.train.labels) >= 0)  # rows by class (SOURCE.md)
    # pixels are the PNGs' pixels, bit for bit
    table = pq.read_table(cifar10_dir / "train.parquet")
    for row in (0, 4999, 5000, 31337, 49999):
        png = table.column("image")[row].as_py()
        assert np.array_equal(
            raw.train.images[row], np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        )
    mean = raw.train.images.reshape(-1, 3).mean(0) / 255
    assert np.allclose(mean, [0.4913, 0.4821, 0.4465], atol=2e-4)
    assert raw.checksum == checksum_files(
        cifar10_dir,
        [cifar10_dir / "train.parquet", cifar10_dir / "test.parquet", cifar10_dir / "classes.json"],
    )


@pytest.mark.parametrize("imbalance, total", [(100, 12406), (50, 13996), (10, 20431)])
def test_real_cifar10_longtail_counts(cifar10_raw, imbalance, total):
    counts = longtail_counts(5000, 10, imbalance)
    idx = select_longtail(cifar10_raw.train.labels, counts)
    assert len(idx) == total and class_counts_of(cifar10_raw.train.labels[idx], 10) == counts
    # first n_i per class in row order: class c starts at row 5000*c
    for c, n in enumerate(counts):
        assert np.array_equal(
            idx[cifar10_raw.train.labels[idx] == c], np.arange(5000 * c, 5000 * c + n)
        )
