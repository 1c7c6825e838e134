"""Does a prepared dataset's manifest tell the truth about its shards? A cheap, Ray-free check
for the drivers to run before anything starts (training, sweeps, evaluation).

    manifest = verify_dataset(read_manifest("s3://bucket/cifar100-lt-if100"))  # every split
    manifest = verify_dataset(manifest, splits=("train", "val"))

The manifest's `class_counts` are what training turns into class priors (balanced softmax,
logit adjustment) and many/medium/few groups, and its seal (`manifest_sha256`, checked by
`read_manifest`) catches hand edits, but not a manifest published before the seal, nor an edit
whose checksum was recomputed. So the labels are counted where they live: each listed shard's
`label` column alone is read (the Parquet footer and that one column chunk: ranged reads on S3,
never the image bytes), and its row count, every split's per-class counts and the class groups
must be the manifest's. Every kind of prepared dataset is covered: CIFAR-style shards and the
large benchmarks' shards of source-encoded images (`prepare_lists`) both carry the `label`
column; a split listed under an alias (`split_aliases`, iNaturalist's test = val) lists the
same files, which are read once.

Shard bytes are not hashed here: the readers check each shard's sha256 once a run and its
size on every read (`shards.read_shard`, `shards.verify_split`). Mismatches are a DataError
(IntegrityError), one line naming the split, the class (index and name) and both counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import IntegrityError
from pipeline.data.longtail import lt_groups
from pipeline.data.manifest import Manifest, ShardInfo
from pipeline.storage import display, join, storage_error

_REPREPARE = "re-run jobs.prepare_data to publish the dataset again"


def _shard_labels(manifest: Manifest, shard: ShardInfo) -> np.ndarray:
    """The `label` column of one shard (nothing else is read), its row count checked against
    the manifest's entry."""
    fs = manifest.filesystem
    path = join(manifest.root, shard.path)
    where = display(fs, path)
    try:
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            # pyarrow silently skips a requested column the file does not have
            if "label" not in parquet.schema_arrow.names:
                raise IntegrityError(f"shard {where} has no label column")
            table = parquet.read(columns=["label"])
    except FileNotFoundError:
        raise IntegrityError(f"shard {where} listed in the manifest is missing") from None
    except pa.ArrowInvalid as exc:  # not a Parquet file
        raise IntegrityError(f"shard {where} is not a readable Parquet file ({exc})") from None
    except OSError as exc:
        raise storage_error(exc, fs, path, "read") from None
    if table.num_rows != shard.num_rows:
        raise IntegrityError(
            f"shard {where} has {table.num_rows:,} rows but the manifest says {shard.num_rows:,}"
        )
    return table.column("label").to_numpy().astype(np.int64, copy=False)


def _split_counts(manifest: Manifest, split: str, cache: dict[str, list[int]]) -> list[int]:
    """Per-class label counts of a split's shards (each file read once over all splits)."""
    total = np.zeros(manifest.num_classes, np.int64)
    for shard in manifest.split_info(split).shards:
        if shard.path not in cache:
            labels = _shard_labels(manifest, shard)
            bad = labels[(labels < 0) | (labels >= manifest.num_classes)]
            if bad.size:
                where = display(manifest.filesystem, join(manifest.root, shard.path))
                raise IntegrityError(
                    f"shard {where} (split {split}) holds label {int(bad[0])}, outside "
                    f"0..{manifest.num_classes - 1} of the manifest's {manifest.num_classes} classes"
                )
            cache[shard.path] = np.bincount(labels, minlength=manifest.num_classes).tolist()
        total += np.asarray(cache[shard.path], np.int64)
    return [int(n) for n in total]


def _class(manifest: Manifest, c: int) -> str:
    return f"class {c} ({manifest.class_names[c]!r})"


def _compare(manifest: Manifest, what: str, listed: Sequence[int], found: Sequence[int]) -> None:
    for c, (ours, theirs) in enumerate(zip(listed, found, strict=True)):
        if ours != theirs:
            others = sum(a != b for a, b in zip(listed, found, strict=True)) - 1
            more = f" (and {others} more classes differ)" if others else ""
            raise IntegrityError(
                f"{manifest.uri}: {what}: {_class(manifest, c)} has {ours:,} images in the "
                f"manifest but {theirs:,} in the shards{more}: the manifest was edited or does "
                f"not belong to these shards; {_REPREPARE}"
            )


def _check_groups(manifest: Manifest) -> None:
    """`class_groups` must be the many/medium/few of `class_counts` (longtail.lt_groups)."""
    expected = lt_groups(manifest.class_counts)
    listed = {c: g for g, ids in manifest.class_groups.items() for c in ids}
    for group, ids in expected.items():
        for c in ids:
            if listed.get(c) != group:
                raise IntegrityError(
                    f"{manifest.uri}: class_groups puts {_class(manifest, c)} in "
                    f"{listed.get(c, 'no group')!r} but its {manifest.class_counts[c]:,} "
                    f"training images make it {group!r}; {_REPREPARE}"
                )
    if sum(len(ids) for ids in manifest.class_groups.values()) != manifest.num_classes:
        raise IntegrityError(
            f"{manifest.uri}: class_groups lists {sum(map(len, manifest.class_groups.values()))} "
            f"class entries for {manifest.num_classes} classes; {_REPREPARE}"
        )


def verify_dataset(manifest: Manifest, splits: Sequence[str] | None = None) -> Manifest:
    """Check a manifest (`read_manifest`) against the labels of its shards; returns it.

    `splits`: which splits to count (each must be in the manifest); None: every split it lists.
    The training priors (`class_counts`) and the class groups are checked whenever "train" is
    among them. Cost: one footer and one label column chunk per shard file.

    Raises IntegrityError (a DataError) naming the split, the class and both counts, or the
    shard; StorageError when the store cannot be read. Needs neither Ray nor MLflow.
    """
    names = list(manifest.splits) if splits is None else list(splits)
    cache: dict[str, list[int]] = {}
    for split in names:
        info = manifest.split_info(split)
        found = _split_counts(manifest, split, cache)
        _compare(manifest, f"split {split}", info.class_counts, found)
        if split == "train":
            _compare(manifest, "class_counts (training priors)", manifest.class_counts, found)
            _check_groups(manifest)
    return manifest


__all__ = ["verify_dataset"]
