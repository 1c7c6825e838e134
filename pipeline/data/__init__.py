"""Data layer: long-tail profile and split, raw-dataset sources, Parquet shards + manifest, storage.

Importing this package is cheap and has no side effects: the submodules are imported on use
(`from pipeline.data.longtail import longtail_counts`). Only the shared error types live here.

Modules
- `longtail`       long-tail class counts (SHIKE.md §4), subset selection, val split, and the
                   many/medium/few class groups (the one definition of their thresholds)
- `raw`            `RawSplit` / `RawDataset`: decoded uint8 pixels of a raw source
- `sources`        which format a source is, and its reader: `parquet_folder` (a folder of
                   Parquet files), `cifar_archives` (official cifar-10/100 python archives),
                   `image_folder` (a folder per class)
- `images`         PNG encode / decode
- `decode`         encoded bytes (JPEG, PNG, ...) -> uint8 RGB tensors (the streaming readers)
- `storage`        URI (`file:///abs`, bare path, `s3://bucket/prefix`) -> pyarrow filesystem
- `manifest`       the `manifest.json` model (pydantic), its seal (own checksum) and its reader
- `integrity`      `verify_dataset`: the shards' labels counted against the manifest (cheap,
                   Ray-free; run by the drivers before anything starts)
- `prepare`        long-tailed splits -> Parquet shards + manifest (atomic publish)
- `lt_lists`       ImageNet-LT / Places-LT / iNaturalist 2018 list files and JSON
- `prepare_lists`  those lists -> shards of the source files' own bytes (`source_shards`,
                   `source_images`; publishing shared with `prepare` in `publish`)
- `shards`         the verifying shard reader (`load_split`, `verify_split`)
- `transforms`     the SHIKE.md §3.1 augmentation
- `torch_reader`   the Ray-free reader: decoded splits and torch DataLoaders
- `stream_reader`  the Ray-free streaming reader of source-encoded shards (sizes vary)
- `ray_reader`     Ray Data datasets over the shards (the Ray Train workers' input)
"""

from __future__ import annotations


class DataError(Exception):
    """A data problem the user can fix (bad source, missing/altered shard, unreachable store).

    The message is one line and names the culprit (file, split, row, class or URI). Messages
    never contain credentials.
    """


class SourceFormatError(DataError):
    """The raw source is not in a format we read, or its content is invalid."""


class IntegrityError(DataError):
    """A prepared dataset is missing, incomplete or altered (manifest, shard, schema)."""


class StorageError(DataError):
    """The object store or filesystem could not be reached or refused the operation."""


__all__ = ["DataError", "IntegrityError", "SourceFormatError", "StorageError"]
