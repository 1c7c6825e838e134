"""Publishing a prepared dataset so that readers never see half of one: shard files first
(Parquet, zstd; a write skipped when an identical file is already there), `manifest.json`
last (sealed with its own checksum, `manifest_sha256`), then the shards of earlier versions
removed.

Both writers use it: `prepare` (CIFAR-style, re-encoded PNG) and `prepare_lists` (the large
benchmarks' own encoded bytes).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data.manifest import MANIFEST_NAME, SPLITS, Manifest
from pipeline.storage import display, file_size, join, read_buffer, write_bytes

ROW_GROUP_ROWS = 4096
ZSTD_LEVEL = 3
SHARD_NAME = re.compile(r"^part-\d{5}-[0-9a-f]{16}\.parquet$")
_TMP_RE = re.compile(r"\.tmp-[0-9a-f]{12}$")

Log = Callable[[str], None]


def shard_ranges(sizes: Sequence[int], target_bytes: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) row ranges of about target_bytes of image data each."""
    ranges, start, acc = [], 0, 0
    for i, s in enumerate(sizes):
        acc += s
        if acc >= target_bytes:
            ranges.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """The writer settings of every shard (for `pq.write_table` and `pq.ParquetWriter`):
    zstd, dictionary and statistics for the label columns only (image bytes gain nothing)."""
    cols = [c for c in ("label", "coarse_label") if c in schema.names]
    return {
        "compression": "zstd",
        "compression_level": ZSTD_LEVEL,
        "use_dictionary": cols,
        "write_statistics": cols,
        "write_page_index": False,
        "store_schema": True,
    }


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=ROW_GROUP_ROWS, **parquet_options(table.schema))
    return sink.getvalue().to_pybytes()


def same_file(fs: pafs.FileSystem, path: str, size: int, sha: str) -> bool:
    """True when `path` already holds exactly these bytes (so the write can be skipped)."""
    if file_size(fs, path) != size:
        return False
    try:
        return hashlib.sha256(read_buffer(fs, path)).hexdigest() == sha
    except FileNotFoundError:
        return False


def remove_stale(fs: pafs.FileSystem, root: str, manifest: Manifest, log: Log) -> None:
    """After publishing: delete shard files (and temp files) of earlier versions."""
    keep = {s.path for info in manifest.splits.values() for s in info.shards}
    for name in SPLITS:
        try:
            infos = fs.get_file_info(pafs.FileSelector(join(root, name), allow_not_found=True))
        except OSError:
            continue
        for info in infos:
            base = info.path.rsplit("/", 1)[-1]
            rel = f"{name}/{base}"
            if (
                info.type == pafs.FileType.File
                and rel not in keep
                and (SHARD_NAME.match(base) or _TMP_RE.search(base))
            ):
                try:
                    fs.delete_file(info.path)
                    log(f"removed stale {rel}")
                except OSError:
                    pass


def publish_manifest(fs: pafs.FileSystem, root: str, manifest: Manifest, log: Log) -> None:
    """Seal `manifest` (`Manifest.seal`: its own checksum, so later hand edits are refused)
    and write it as `manifest.json` (every shard it lists must already be in place), unless an
    identical one is there, then remove the shards no manifest lists any more."""
    blob = manifest.seal().to_json()
    mpath = join(root, MANIFEST_NAME)
    if same_file(fs, mpath, len(blob), hashlib.sha256(blob).hexdigest()):
        log(f"manifest unchanged: {display(fs, mpath)}")
    else:
        write_bytes(fs, mpath, blob)
        log(f"published {display(fs, mpath)}")
    remove_stale(fs, root, manifest, log)
