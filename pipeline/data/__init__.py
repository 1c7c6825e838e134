"""Data layer: the long-tail profile, the manifest and the verified shards, at the top; raw
sources, preparing shards and reading them in sub-packages.

Importing this package is cheap and has no side effects: the submodules are imported on use
(`from pipeline.data.longtail import longtail_counts`). Only the shared error types live here.

- `longtail`   long-tail class counts (SHIKE.md §4), subset selection, val split, and the
               many/medium/few class groups (the one definition of their thresholds)
- `manifest`   the `manifest.json` model (pydantic), its seal (own checksum) and its reader
- `integrity`  `verify_dataset`: the shards' labels counted against the manifest (cheap,
               Ray-free; run by the drivers before anything starts)
- `shards`     the verifying shard reader (`load_split`, `verify_split`)
- `codec`      image bytes <-> uint8 pixels (PNG shards, any encoded image, source images)
- `sources/`   raw datasets in source order (CIFAR archives, image and Parquet folders, the
               large benchmarks' list files)
- `prepare/`   raw data -> Parquet shards + sealed manifest, published last
- `readers/`   the Ray-free readers, the Ray Data reader, per-image and whole-batch augmentation
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


__all__ = ["DataError", "IntegrityError", "SourceFormatError"]
