"""The large benchmarks' prepare (ImageNet-LT, Places-LT, iNaturalist 2018): list files ->
shards of the source images' own bytes + manifest, on small generated datasets in each exact
on-disk format (tests/helpers/lt_datasets.py), written to a local folder."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data import DataError
from pipeline.data.manifest import MANIFEST_NAME, read_manifest
from pipeline.data.prepare.from_lists import prepare_benchmark
from pipeline.data.shards import read_split_table, verify_split
from tests.helpers.lt_datasets import (
    write_imagenet_lt,
    write_inat2018_json,
    write_inat2018_txt,
    write_places_lt,
)

ROOT = Path(__file__).resolve().parents[2]
FORMATS = {
    "imagenet_lt": write_imagenet_lt,
    "places_lt": write_places_lt,
    "inat2018-json": write_inat2018_json,
    "inat2018-txt": write_inat2018_txt,
}
LIST_FILES = {
    "imagenet_lt": "ImageNet_LT_{}.txt",
    "places_lt": "Places_LT_{}.txt",
    "inat2018-txt": "iNaturalist18_{}.txt",
}


def _dataset(fmt: str) -> str:
    return fmt.split("-")[0]


def _listed(root: Path, fmt: str) -> dict[str, list[tuple[str, int]]]:
    """(path, label) per split, read straight from the files (not through the code under test)."""
    if fmt == "inat2018-json":
        out = {}
        for split in ("train", "val"):
            doc = json.loads((root / f"{split}2018.json").read_text())
            label = {a["image_id"]: a["category_id"] for a in doc["annotations"]}
            out[split] = [(im["file_name"], label[im["id"]]) for im in doc["images"]]
        return out
    splits = ("train", "val") if fmt == "inat2018-txt" else ("train", "val", "test")
    return {
        split: [
            (path, int(label))
            for path, label in (
                line.split()
                for line in (root / LIST_FILES[fmt].format(split)).read_text().splitlines()
            )
        ]
        for split in splits
    }


def _files(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root: (sha256, mtime in ns)."""
    return {
        p.relative_to(root).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _prepare(root: Path, out: Path, fmt: str = "imagenet_lt", **kwargs):
    kwargs = {"shard_mb": 0.05, "workers": 2, **kwargs}
    return prepare_benchmark(_dataset(fmt), str(root), str(out), **kwargs)


# --------------------------------------------------------------------------------------
# what the shards and the manifest hold


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_shards_hold_the_source_files_bytes_and_the_lists_counts(fmt, tmp_path):
    root = FORMATS[fmt](tmp_path / "src")
    m = _prepare(root, tmp_path / "out", fmt)
    listed = _listed(root, fmt)
    assert len(m.splits["train"].shards) > 1  # several shards, written in parallel
    for split in ("train", "val", "test"):
        table = read_split_table(m, split)  # the verifying reader: sizes and sha256 match
        rows = listed["val" if split == "test" and fmt.startswith("inat") else split]
        ids = table.column("sample_id").to_pylist()
        labels = table.column("label").to_pylist()
        assert sorted(zip(ids, labels, strict=True)) == sorted(rows)
        for sample_id, image in zip(ids, table.column("image").to_pylist(), strict=True):
            assert image == (root / sample_id).read_bytes()
        counts = Counter(label for _, label in rows)
        assert m.splits[split].class_counts == [counts[c] for c in range(m.num_classes)]
    train_ids = read_split_table(m, "train").column("sample_id").to_pylist()
    in_list_order = [path for path, _ in listed["train"]]
    assert train_ids != in_list_order and sorted(train_ids) == sorted(in_list_order)

    counts = m.class_counts
    assert counts == m.splits["train"].class_counts and counts[0] == max(counts) == m.n_max
    assert m.imbalance_factor == max(counts) / min(counts)
    assert m.selection is None and m.val_per_class is None and m.train_row_order == "shuffled"
    assert m.image.encoding == "source" and m.image.height is None and m.image.max_side is None
    sizes = [Image.open(root / path).size for path, _ in listed["train"]]  # (width, height)
    for axis, values in (("width", [s[0] for s in sizes]), ("height", [s[1] for s in sizes])):
        stats = m.image.sizes[axis]
        assert (stats.min, stats.max) == (min(values), max(values))
        assert stats.median == sorted(values)[(len(values) - 1) // 2]
    assert m.source["path"] == str(root) and m.source["checksum"].startswith("sha256:")
    assert m.source["format"] == (fmt if fmt.startswith("inat") else f"{fmt}-txt")
    assert [c.name for c in m.columns] == ["image", "label", "sample_id"]


def test_class_names_of_each_format(tmp_path):
    names = {}
    for fmt, write in FORMATS.items():
        root = write(tmp_path / fmt, num_classes=4, n_max=5, n_min=2, eval_per_class=1)
        names[fmt] = _prepare(root, tmp_path / f"{fmt}-out", fmt).class_names
    assert names["imagenet_lt"] == ["n01440764", "n01448683", "n01456602", "n01464521"]
    assert names["places_lt"] == ["a/abbey", "a/airfield", "a/apartment_building/outdoor", "b/bakery/shop"]  # fmt: skip
    assert names["inat2018-json"] == ["Quercus robur", "Amanita muscaria", "Danaus plexippus", "Parus major"]  # fmt: skip
    assert names["inat2018-txt"] == ["Plantae/0", "Fungi/1", "Insecta/2", "Aves/3"]


@pytest.mark.parametrize("fmt", ["inat2018-json", "inat2018-txt"])
def test_inat_test_split_is_val_without_a_copy(fmt, tmp_path):
    root = FORMATS[fmt](tmp_path / "src")
    m = _prepare(root, tmp_path / "out", fmt)
    assert m.split_aliases == {"test": "val"}
    assert m.splits["test"] == m.splits["val"]
    assert not (tmp_path / "out" / "test").exists()
    assert read_manifest(str(tmp_path / "out")).split_aliases == {"test": "val"}
    assert '"split_aliases"' in (tmp_path / "out" / MANIFEST_NAME).read_text()


def test_inat_json_is_preferred_when_both_formats_are_there(tmp_path):
    root = write_inat2018_json(tmp_path / "src")
    write_inat2018_txt(root)  # the same images again, plus the txt lists
    assert _prepare(root, tmp_path / "out", "inat2018-json").source["format"] == "inat2018-json"


def test_max_side_shrinks_only_larger_images(tmp_path):
    root = write_imagenet_lt(tmp_path / "src", sides=(24, 96))
    out = tmp_path / "out"
    _prepare(root, out)
    before = set(_files(out))
    m = _prepare(root, out, max_side=48)
    assert m.image.max_side == 48 and m.image.sizes["width"].max <= 48
    assert m.image.sizes["height"].max <= 48
    shrunk = kept = 0
    for split in ("train", "val", "test"):
        table = read_split_table(m, split)
        for sample_id, data in zip(
            table.column("sample_id").to_pylist(), table.column("image").to_pylist(), strict=True
        ):
            source = (root / sample_id).read_bytes()
            width, height = Image.open(io.BytesIO(source)).size
            if max(width, height) <= 48:
                assert data == source
                kept += 1
                continue
            stored = Image.open(io.BytesIO(data))
            assert stored.format == "JPEG" and max(stored.size) == 48
            assert abs(stored.size[0] / stored.size[1] - width / height) < 0.1 * width / height
            shrunk += 1
    assert shrunk and kept
    # the shards of the first version are gone: only what the manifest lists remains
    listed = {s.path for info in m.splits.values() for s in info.shards}
    assert set(_files(out)) == listed | {MANIFEST_NAME} and not listed & before


# --------------------------------------------------------------------------------------
# re-runs


def test_rerun_keeps_published_shards_and_rebuilds_only_damaged_ones(tmp_path):
    root = write_imagenet_lt(tmp_path / "src")
    out = tmp_path / "out"
    m = _prepare(root, out)
    first = _files(out)
    lines: list[str] = []
    assert _prepare(root, out, log=lines.append) == m
    shard_lines = [line for line in lines if " shard " in line]
    assert len(shard_lines) == sum(len(s.shards) for s in m.splits.values())
    assert all(": kept shard" in line for line in shard_lines)
    assert "manifest unchanged" in "\n".join(lines)
    assert _files(out) == first  # nothing rewritten: same bytes, same modification times

    shards = m.splits["train"].shards
    (out / shards[0].path).unlink()
    damaged = out / shards[1].path
    damaged.write_bytes(b"\0" * damaged.stat().st_size)  # same size, other bytes
    lines.clear()
    _prepare(root, out, log=lines.append)
    rewritten = sorted(line.split()[4] for line in lines if ": wrote shard" in line)
    assert rewritten == sorted([shards[0].path, shards[1].path])
    for split in ("train", "val", "test"):
        verify_split(read_manifest(str(out)), split)
    assert {k: v[0] for k, v in _files(out).items()} == {k: v[0] for k, v in first.items()}


# --------------------------------------------------------------------------------------
# bad inputs: one error naming the list file and line (and the image), nothing published


def _line_of(list_file: Path, number: int) -> str:
    return list_file.read_text().splitlines()[number - 1]


def _missing_file(root: Path) -> tuple[str, ...]:
    path = _line_of(root / "ImageNet_LT_train.txt", 7).split()[0]
    (root / path).unlink()
    return "ImageNet_LT_train.txt line 7", str(root / path), "does not exist"


def _truncated_image(root: Path) -> tuple[str, ...]:
    path = root / _line_of(root / "ImageNet_LT_val.txt", 4).split()[0]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "ImageNet_LT_val.txt line 4", str(path), "not a readable image"


def _not_an_image(root: Path) -> tuple[str, ...]:
    path = root / _line_of(root / "ImageNet_LT_test.txt", 2).split()[0]
    path.write_text("no image here")
    return "ImageNet_LT_test.txt line 2", str(path), "not a readable image"


def _label_outside(root: Path) -> tuple[str, ...]:
    lst = root / "ImageNet_LT_val.txt"
    lines = lst.read_text().splitlines()
    lines[2] = lines[2].split()[0] + " 10"  # 10 classes: 0..9
    lst.write_text("\n".join(lines) + "\n")
    return "ImageNet_LT_val.txt line 3", "label 10", "outside the class range 0..9"


def _path_twice(root: Path) -> tuple[str, ...]:
    lst = root / "ImageNet_LT_train.txt"
    lines = lst.read_text().splitlines()
    lst.write_text("\n".join([*lines, lines[4]]) + "\n")
    return f"ImageNet_LT_train.txt line {len(lines) + 1}", "listed twice (first at line 5)"


def _json_path_twice(root: Path) -> tuple[str, ...]:
    doc = json.loads((root / "train2018.json").read_text())
    doc["images"][9]["file_name"] = doc["images"][2]["file_name"]
    (root / "train2018.json").write_text(json.dumps(doc))
    return "train2018.json images[9]", "listed twice (first at images[2])"


def _json_category_outside(root: Path) -> tuple[str, ...]:
    doc = json.loads((root / "val2018.json").read_text())
    doc["annotations"][5]["category_id"] = 12
    (root / "val2018.json").write_text(json.dumps(doc))
    return "val2018.json images[5]", "label 12", "outside the class range 0..9"


BAD_INPUTS = {
    "missing file": ("imagenet_lt", _missing_file),
    "truncated image": ("imagenet_lt", _truncated_image),
    "not an image": ("imagenet_lt", _not_an_image),
    "label outside the class range": ("imagenet_lt", _label_outside),
    "path listed twice": ("imagenet_lt", _path_twice),
    "iNat JSON path listed twice": ("inat2018-json", _json_path_twice),
    "iNat JSON category outside the range": ("inat2018-json", _json_category_outside),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_naming_file_and_line_and_publishes_nothing(case, tmp_path):
    fmt, spoil = BAD_INPUTS[case]
    root = FORMATS[fmt](tmp_path / "src")
    published = tmp_path / "published"
    _prepare(root, published, fmt)
    before = _files(published)
    expected = spoil(root)

    for out in (published, tmp_path / "fresh"):
        with pytest.raises(DataError) as err:
            _prepare(root, out, fmt)
        message = str(err.value)
        assert "\n" not in message
        for part in expected:
            assert part in message, (part, message)
    assert _files(published) == before  # the published dataset is untouched
    assert not (tmp_path / "fresh").exists() or _files(tmp_path / "fresh") == {}


def test_an_error_mid_way_removes_the_shards_the_run_wrote(tmp_path):
    # One worker builds the shards in order (train, val, test): a broken last test image
    # fails the last shard, after every other one was written.
    root = write_imagenet_lt(tmp_path / "src")
    last = _line_of(root / "ImageNet_LT_test.txt", 30).split()[0]
    (root / last).write_bytes(b"broken")
    lines: list[str] = []
    with pytest.raises(DataError, match="ImageNet_LT_test.txt line 30: image file"):
        _prepare(root, tmp_path / "out", workers=1, log=lines.append)
    assert sum(": wrote shard" in line for line in lines) > 5
    assert not any((tmp_path / "out").rglob("*.parquet"))


# --------------------------------------------------------------------------------------
# the job


def _job(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.prepare_data", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_job_prepares_a_benchmark_and_says_which_lists_it_read(tmp_path):
    root = write_inat2018_txt(tmp_path / "src")
    out = tmp_path / "out"
    r = _job(["--dataset", "inat2018", "--source", str(root), "--output", str(out), "--shard-mb", "0.05", "--workers", "2"])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "iNaturalist18_train.txt + iNaturalist18_val.txt" in r.stdout
    assert "done: inat2018" in r.stdout and "test 30 (= val)" in r.stdout
    m = read_manifest(str(out))
    train = Counter(label for _, label in _listed(root, "inat2018-txt")["train"])
    assert m.class_counts == [train[c] for c in range(10)]


def test_job_refuses_the_options_of_the_other_dataset_kind(tmp_path):
    base = ["--source", str(tmp_path), "--output", str(tmp_path / "o")]
    r = _job(["--dataset", "imagenet_lt", *base, "--imbalance-factor", "10", "--val-per-class", "5"])  # fmt: skip
    assert r.returncode == 2
    assert "--imbalance-factor, --val-per-class: only for --dataset cifar10" in r.stderr
    r = _job(["--dataset", "cifar10", *base, "--max-side", "256"])
    assert r.returncode == 2 and "--max-side: only for --dataset imagenet_lt" in r.stderr
    r = _job(["--dataset", "places_lt", "--output", str(tmp_path / "o")])
    assert r.returncode == 2 and "--source is required" in r.stderr
    r = _job(["--dataset", "places_lt", *base])
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: source {tmp_path}: no Places_LT_train.txt")


# --------------------------------------------------------------------------------------
# memory


PEAK_RSS = textwrap.dedent(
    """
    import resource, sys
    from pipeline.data.prepare.from_lists import prepare_benchmark
    prepare_benchmark("imagenet_lt", sys.argv[1], sys.argv[2], shard_mb=0.5, workers=2)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """
)


def _peak_rss(root: Path, out: Path) -> int:
    r = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, str(root), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_image_count(tmp_path):
    # Noise JPEGs weigh ~20 kB each: the large set is ~57 MB more than the small one, so a
    # prepare that held the images (or the shards) of a split would show it.
    small = write_imagenet_lt(tmp_path / "small", n_max=120, n_min=12, eval_per_class=2, sides=(96, 128), noise=120.0)  # fmt: skip
    large = write_imagenet_lt(tmp_path / "large", n_max=1200, n_min=120, eval_per_class=2, sides=(96, 128), noise=120.0)  # fmt: skip
    source_mb = {
        name: sum(f.stat().st_size for f in root.rglob("*.JPEG")) / 1e6
        for name, root in (("small", small), ("large", large))
    }
    assert source_mb["large"] - source_mb["small"] > 50
    peak_small = _peak_rss(small, tmp_path / "out-small")
    peak_large = _peak_rss(large, tmp_path / "out-large")
    assert peak_large - peak_small < 25e6, (peak_small / 1e6, peak_large / 1e6, source_mb)
