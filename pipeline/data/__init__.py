"""Data layer: long-tail profile and split, raw-dataset sources, Parquet shards + manifest, storage.

Importing this package is cheap and has no side effects: the submodules are imported on use
(`from pipeline.data.longtail import longtail_counts`). Only the shared error types live here.

Modules
- `longtail`  long-tail class counts (SHIKE.md §4), subset selection, val split, many/medium/few
- `sources`   raw datasets -> decoded uint8 pixels (`RawDataset`): Parquet folder, official
              cifar-10/100 python archives (or their extracted folders), image folders
- `storage`   URI (`file:///abs`, bare path, `s3://bucket/prefix`) -> pyarrow filesystem + path
- `shards`    long-tailed splits -> Parquet shards + `manifest.json` (atomic publish), and the
              verifying reader (`read_manifest`, `load_split`)
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
