"""The verifying reader of prepared datasets: Parquet shards + `manifest.json`.

Layout under the dataset URI (a local folder or s3://bucket/prefix):

    manifest.json                                   written last: the dataset exists once it does
    train/part-00000-<sha256[:16]>.parquet          zstd; columns image (PNG bytes), label (int64),
    val/part-00000-<sha256[:16]>.parquet            sample_id (string), [coarse_label (int64)]
    test/part-00000-<sha256[:16]>.parquet

Each shard is checked against the manifest (exists, byte size, Parquet schema, row count, and
its sha256 once a run: a reader that read it before, as the streaming loader's later epochs,
passes `hashed`) before use; any mismatch is an IntegrityError naming the file. For Ray Data,
`shard_files` gives the pyarrow filesystem and paths (`verify_split` first).

The manifest model lives in `pipeline.data.manifest` and the writer in `pipeline.data.prepare.from_raw`;
the names other modules import from here are re-exported below.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data import IntegrityError, SourceFormatError
from pipeline.data.codec import decode_images
from pipeline.data.longtail import class_counts_of
from pipeline.data.manifest import Manifest, ShardInfo
from pipeline.data.sources.raw import RawSplit
from pipeline.storage import display, join, read_buffer


def _schema_text(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}{'' if f.nullable else ' not null'}" for f in schema)


def read_shard(manifest: Manifest, shard: ShardInfo, *, hashed: bool = False) -> pa.Table:
    """One shard, verified against the manifest (exists, size, sha256, schema, rows). With
    `hashed` (the caller's run checked this file's sha256 already) the bytes are not hashed
    again: a rewrite of the same size goes unnoticed, one of another size does not."""
    fs = manifest.filesystem
    path = join(manifest.root, shard.path)
    where = display(fs, path)
    try:
        data = read_buffer(fs, path)
    except FileNotFoundError:
        raise IntegrityError(f"shard {where} listed in the manifest is missing") from None
    if len(data) != shard.bytes:
        raise IntegrityError(
            f"shard {where} is {len(data):,} bytes but the manifest says {shard.bytes:,} "
            f"(truncated or replaced)"
        )
    if not hashed and (sha := hashlib.sha256(data).hexdigest()) != shard.sha256:
        raise IntegrityError(
            f"shard {where} has sha256 {sha[:16]}... but the manifest says {shard.sha256[:16]}... (altered or corrupt)"
        )
    try:
        # ParquetFile, not read_table: read_table imports pyarrow.dataset on first use, which
        # every epoch's loader workers, new processes, would pay again (bench/HISTORY.md).
        table = pq.ParquetFile(pa.BufferReader(data)).read()
    except (pa.ArrowException, OSError) as exc:
        raise IntegrityError(f"shard {where} is not a readable Parquet file ({exc})") from None
    expected = manifest.arrow_schema
    if not table.schema.equals(expected, check_metadata=False):
        raise IntegrityError(
            f"shard {where} has schema [{_schema_text(table.schema)}] but expected [{_schema_text(expected)}]"
        )
    if table.num_rows != shard.num_rows:
        raise IntegrityError(
            f"shard {where} has {table.num_rows:,} rows but the manifest says {shard.num_rows:,}"
        )
    return table


def verify_split(m: Manifest, split: str) -> Manifest:
    """Check every shard of a split (reads each once); use before handing paths to Ray Data."""
    for shard in m.split_info(split).shards:
        read_shard(m, shard)
    return m


def read_split_table(m: Manifest, split: str) -> pa.Table:
    """All verified shards of a split as one Arrow table (images still PNG-encoded)."""
    tables = [read_shard(m, s) for s in m.split_info(split).shards]
    return pa.concat_tables(tables) if tables else m.arrow_schema.empty_table()


def load_split(m: Manifest, split: str) -> RawSplit:
    """A split decoded to uint8 pixels (RawSplit: images, labels, sample_ids, coarse_labels),
    every shard verified first; the label histogram must match the manifest's class_counts."""
    info = m.split_info(split)
    table = read_split_table(m, split)
    labels = table.column("label").to_numpy().astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= m.num_classes):
        raise IntegrityError(f"{m.uri}: split {split} holds labels outside 0..{m.num_classes - 1}")
    if class_counts_of(labels, m.num_classes) != info.class_counts:
        raise IntegrityError(
            f"{m.uri}: split {split} labels do not match the manifest's class_counts"
        )
    h, w, _ = m.image_shape
    try:
        images = decode_images(table.column("image").to_pylist(), f"{m.uri} ({split})")
    except SourceFormatError as exc:
        raise IntegrityError(str(exc)) from None
    if not len(labels):
        images = np.empty((0, h, w, 3), np.uint8)
    elif images.shape[1:] != (h, w, 3):
        raise IntegrityError(
            f"{m.uri}: split {split} images are {images.shape[1:]}, manifest says {(h, w, 3)}"
        )
    coarse = table.column("coarse_label").to_numpy().astype(np.int64) if m.has_coarse else None
    ids = np.array(table.column("sample_id").to_pylist(), dtype=str)
    return RawSplit(images=images, labels=labels, sample_ids=ids, coarse_labels=coarse)


def shard_files(m: Manifest, split: str) -> tuple[pafs.FileSystem, list[str]]:
    """(pyarrow filesystem, shard paths) of a split, e.g. for `ray.data.read_parquet(paths,
    filesystem=fs)`; the shards are not read here (call `verify_split` to check them)."""
    return m.filesystem, m.shard_paths(split)


__all__ = [
    "load_split",
    "read_shard",
    "read_split_table",
    "shard_files",
    "verify_split",
]
