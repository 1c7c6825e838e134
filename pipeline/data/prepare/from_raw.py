"""Raw dataset -> long-tailed splits -> Parquet shards + `manifest.json`, published atomically
(what jobs/prepare_data.py runs).

Every split is encoded as PNG and cut into shards of about `shard_mb` MB; each shard is
serialised in memory, named by its content hash, and uploaded (skipped when an identical file
is already there); the manifest is published last and then shards of earlier versions are
removed (`publish`). The bytes depend only on the inputs (no timestamps; PNG and Parquet output is
deterministic for a given Pillow/pyarrow), so a re-run with the same inputs is a no-op. A
failure before the manifest is written publishes nothing: readers still see the previous
manifest (if any) and every shard it lists.
"""

from __future__ import annotations

import hashlib
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.data import DataError
from pipeline.data.codec import encode_png
from pipeline.data.longtail import (
    SELECTION_RULES,
    LongTailSplits,
    build_longtail_splits,
    class_counts_of,
)
from pipeline.data.manifest import (
    SCHEMA_VERSION,
    TRAIN_ROW_ORDER,
    TRAIN_ROW_ORDER_SEED,
    Column,
    ImageInfo,
    Manifest,
    Selection,
    ShardInfo,
    SplitInfo,
    shard_schema,
)
from pipeline.data.prepare.publish import (
    Log,
    parquet_bytes,
    publish_manifest,
    same_file,
    shard_ranges,
)
from pipeline.data.sources.load import load_raw_dataset
from pipeline.data.sources.raw import RawDataset, RawSplit
from pipeline.storage import (
    S3Options,
    check_access,
    join,
    resolve,
    write_bytes,
)

DEFAULT_SHARD_MB = 64.0
ENCODE_PROGRESS_MIN_IMAGES = 4000  # smaller splits encode in a moment: no progress lines


def _quiet(_: str) -> None:
    pass


def _encode_with_progress(images: np.ndarray, log: Log, what: str) -> list[bytes]:
    """PNG bytes of every image, logging each quarter done for large splits."""
    n = len(images)
    quarter = max(1, math.ceil(n / 4))
    pngs: list[bytes] = []
    for start in range(0, n, quarter):
        pngs += encode_png(images[start : start + quarter])
        if n >= ENCODE_PROGRESS_MIN_IMAGES and len(pngs) < n:
            log(f"{what}: encoded {len(pngs):,}/{n:,} images")
    return pngs


def _write_split(
    fs: pafs.FileSystem,
    root: str,
    name: str,
    split: RawSplit,
    with_coarse: bool,
    target_bytes: int,
    log: Log,
) -> list[ShardInfo]:
    n = len(split.labels)
    if n == 0:
        log(f"{name}: 0 images, no shard")
        return []
    log(f"{name}: encoding {n:,} images as PNG")
    pngs = _encode_with_progress(split.images, log, name)
    ranges = shard_ranges([len(b) for b in pngs], target_bytes)
    shards = []
    for k, (a, b) in enumerate(ranges):
        columns = {
            "image": pngs[a:b],
            "label": split.labels[a:b],
            "sample_id": split.sample_ids[a:b].astype(str),
        }
        if with_coarse:
            assert split.coarse_labels is not None
            columns["coarse_label"] = split.coarse_labels[a:b]
        data = parquet_bytes(pa.table(columns, schema=shard_schema(with_coarse)))
        sha = hashlib.sha256(data).hexdigest()
        rel = f"{name}/part-{k:05d}-{sha[:16]}.parquet"
        path = join(root, rel)
        if same_file(fs, path, len(data), sha):
            verb = "unchanged"
        else:
            write_bytes(fs, path, data)
            verb = "wrote"
        log(
            f"{name}: {verb} shard {k + 1}/{len(ranges)} {rel} ({b - a:,} rows, {len(data) / 1e6:.1f} MB)"
        )
        shards.append(ShardInfo(path=rel, num_rows=b - a, bytes=len(data), sha256=sha))
    return shards


def write_dataset(
    splits: LongTailSplits,
    raw: RawDataset,
    output: str,
    *,
    imbalance_factor: float,
    selection: str,
    selection_seed: int,
    val_per_class: int,
    test_per_class: int | None = None,
    shard_mb: float = DEFAULT_SHARD_MB,
    s3: S3Options | None = None,
    log: Log = _quiet,
) -> Manifest:
    """Write the splits as shards under `output`, then publish `manifest.json` (last)."""
    if not shard_mb > 0 or not math.isfinite(shard_mb):
        raise DataError(f"shard size must be a positive number of MB, got {shard_mb}")
    fs, root = resolve(output, s3)
    with_coarse = raw.train.coarse_labels is not None and raw.test.coarse_labels is not None
    target = max(1, int(shard_mb * 1e6))
    order = np.random.default_rng(TRAIN_ROW_ORDER_SEED).permutation(len(splits.train.labels))
    infos = {}
    for name, split in (
        ("train", splits.train.take(order)),
        ("val", splits.val),
        ("test", splits.test),
    ):
        shards = _write_split(fs, root, name, split, with_coarse, target, log)
        infos[name] = SplitInfo(
            num_rows=len(split.labels),
            class_counts=class_counts_of(split.labels, raw.num_classes),
            shards=shards,
        )
    height, width = raw.train.images.shape[1:3]
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        dataset=raw.name,
        source={"path": raw.source, "format": raw.source_format, "checksum": raw.checksum},
        imbalance_factor=imbalance_factor,
        n_max=splits.n_max,
        selection=Selection(rule=selection, seed=selection_seed),
        val_per_class=val_per_class,
        test_per_class=test_per_class,
        num_classes=raw.num_classes,
        class_names=raw.class_names,
        coarse_class_names=raw.coarse_class_names if with_coarse else None,
        class_counts=splits.class_counts,
        train_row_order=TRAIN_ROW_ORDER,
        class_groups=splits.groups,
        image=ImageInfo(height=height, width=width),
        columns=[Column(name=f.name, type=str(f.type)) for f in shard_schema(with_coarse)],
        splits=infos,
        uri=str(output),
        filesystem=fs,
        root=root,
    )
    publish_manifest(fs, root, manifest, log)
    return manifest


def prepare_from_raw(
    raw: RawDataset,
    output: str,
    imbalance_factor: float = 100.0,
    *,
    n_max: int | None = None,
    selection: str = "first",
    selection_seed: int = 0,
    val_per_class: int = 20,
    test_per_class: int | None = None,
    shard_mb: float = DEFAULT_SHARD_MB,
    s3: S3Options | None = None,
    log: Log = _quiet,
) -> Manifest:
    """Long-tailed split of an already loaded RawDataset -> shards + manifest at `output`."""
    fs, root = resolve(output, s3)
    check_access(fs, root, "write to")
    try:
        splits = build_longtail_splits(
            raw,
            imbalance_factor,
            n_max=n_max,
            selection=selection,
            selection_seed=selection_seed,
            val_per_class=val_per_class,
            test_per_class=test_per_class,
        )
    except ValueError as exc:
        raise DataError(f"{raw.source}: {exc}") from None
    log(
        f"long-tailed split: train {len(splits.train):,} images (IF {imbalance_factor:g}, "
        f"n_max {splits.n_max}, {selection} rule), val {len(splits.val):,}, test {len(splits.test):,}"
    )
    val_counts = class_counts_of(splits.val.labels, raw.num_classes)
    short = [c for c, n in enumerate(val_counts) if n < val_per_class]
    if short:
        log(
            f"note: val has fewer than {val_per_class} images for {len(short)} class(es) "
            f"{short[:10]}{'...' if len(short) > 10 else ''}: the long-tailed subset uses (almost) "
            f"all of their training images"
        )
    return write_dataset(
        splits,
        raw,
        output,
        imbalance_factor=imbalance_factor,
        selection=selection,
        selection_seed=selection_seed,
        val_per_class=val_per_class,
        test_per_class=test_per_class,
        shard_mb=shard_mb,
        s3=s3,
        log=log,
    )


def prepare_dataset(
    dataset: str,
    source: str | None,
    output: str,
    imbalance_factor: float = 100.0,
    *,
    n_max: int | None = None,
    selection: str = "first",
    selection_seed: int = 0,
    val_per_class: int = 20,
    test_per_class: int | None = None,
    shard_mb: float = DEFAULT_SHARD_MB,
    s3: S3Options | None = None,
    log: Log = _quiet,
) -> Manifest:
    """Raw dataset -> long-tailed Parquet shards + manifest at `output`.

    Checks that `output` is reachable first (one request), then reads and validates the source,
    draws the splits, writes shards and publishes the manifest. Raises DataError (one line,
    naming the culprit) for anything the user can fix; nothing is published in that case.
    """
    if selection not in SELECTION_RULES:
        raise DataError(
            f"unknown selection rule {selection!r}; expected one of {', '.join(SELECTION_RULES)}"
        )
    if not imbalance_factor >= 1:
        raise DataError(f"imbalance factor must be >= 1, got {imbalance_factor}")
    if val_per_class < 0:
        raise DataError(f"val per class must be >= 0, got {val_per_class}")
    if not shard_mb > 0:
        raise DataError(f"shard size must be a positive number of MB, got {shard_mb}")
    fs, root = resolve(output, s3)
    check_access(fs, root, "write to")
    t0 = time.perf_counter()
    log(f"reading {dataset} from {source or 'the default source'}")
    raw = load_raw_dataset(dataset, source)
    log(
        f"read {raw.name} ({raw.source_format}) from {raw.source}: {len(raw.train):,} train + "
        f"{len(raw.test):,} test images, {raw.num_classes} classes, in {time.perf_counter() - t0:.1f} s"
    )
    return prepare_from_raw(
        raw,
        output,
        imbalance_factor,
        n_max=n_max,
        selection=selection,
        selection_seed=selection_seed,
        val_per_class=val_per_class,
        test_per_class=test_per_class,
        shard_mb=shard_mb,
        s3=s3,
        log=log,
    )
