"""Shards of source images (the large benchmarks): which rows go in which shard, and one shard
built, or found already published, in one call (so a thread pool can run several).

A shard is planned from the list alone: its rows, their labels and their source files' sizes
and modification times. Its file is named by a hash of that plan, so a re-run finds a shard it
published before without reading a source image: when the previous manifest lists that name
and the file still has the recorded size and sha256, it is kept as it is.

Memory: a shard is assembled in memory (about its size, plus one row group of images being
read), so the shards in flight bound what a prepare holds, whatever the dataset's size.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.data import SourceFormatError
from pipeline.data.codec import image_size, load_source_image
from pipeline.data.manifest import ShardInfo, shard_schema
from pipeline.data.prepare.publish import parquet_options, same_file, shard_ranges
from pipeline.data.sources.lt_lists import ListEntry, SplitList
from pipeline.storage import file_size, join, read_buffer, write_bytes

# Part of every shard's name hash: a change to what a shard holds or how it is written must
# change this, so that re-runs rebuild instead of keeping shards of the old layout.
LAYOUT = "source-bytes/1"
# Row groups of about this much image data: readers that stream a shard row group by row group
# hold this much, not the whole shard.
ROW_GROUP_BYTES = 32_000_000
SCHEMA = shard_schema(with_coarse=False)


@dataclass(frozen=True)
class FileStats:
    """Sizes and modification times (ns) of a split's source files, in list order."""

    sizes: np.ndarray
    mtimes: np.ndarray


def stat_files(root: Path, split: SplitList, start: int, stop: int) -> FileStats:
    """Stats of entries [start, stop); a missing file is an error naming the list line."""
    sizes, mtimes = [], []
    for entry in split.entries[start:stop]:
        file = root / entry.path
        try:
            st = os.stat(file)
        except FileNotFoundError:
            raise SourceFormatError(
                f"{split.where(entry)}: image file {file} does not exist"
            ) from None
        except OSError as exc:
            raise SourceFormatError(f"{split.where(entry)}: cannot read {file}: {exc}") from None
        sizes.append(st.st_size)
        mtimes.append(st.st_mtime_ns)
    return FileStats(np.array(sizes, np.int64), np.array(mtimes, np.int64))


@dataclass(frozen=True)
class ShardPlan:
    split: str  # the split whose folder holds the shard
    index: int
    source: SplitList  # the list the rows come from (for error messages)
    rows: list[ListEntry]
    sizes: np.ndarray  # source bytes of each row
    key: str  # sha256 of everything the shard's bytes depend on

    @property
    def path(self) -> str:
        return f"{self.split}/part-{self.index:05d}-{self.key[:16]}.parquet"


def plan_split(
    split: str,
    source: SplitList,
    order: np.ndarray,
    stats: FileStats,
    target_bytes: int,
    max_side: int | None,
) -> list[ShardPlan]:
    """The split's rows (in `order`) cut into shards of about `target_bytes` source bytes."""
    rows = [source.entries[i] for i in order]
    sizes, mtimes = stats.sizes[order], stats.mtimes[order]
    plans = []
    for k, (a, b) in enumerate(shard_ranges(sizes.tolist(), target_bytes)):
        inputs = [
            LAYOUT,
            max_side,
            [[*rows[i][:2], int(sizes[i]), int(mtimes[i])] for i in range(a, b)],
        ]
        key = hashlib.sha256(json.dumps(inputs, separators=(",", ":")).encode()).hexdigest()
        plans.append(ShardPlan(split, k, source, rows[a:b], sizes[a:b], key))
    return plans


@dataclass
class ShardResult:
    info: ShardInfo
    heights: np.ndarray  # of the stored images, in row order
    widths: np.ndarray
    action: str  # "wrote", "unchanged" (identical file there) or "kept" (published and verified)


def _sizes_of(rows: list[bytes]) -> tuple[list[int], list[int]]:
    hw = [image_size(b) for b in rows]
    return [h for h, _ in hw], [w for _, w in hw]


def _kept(data: pa.Buffer, previous: ShardInfo) -> ShardResult:
    """A published shard whose bytes were verified: its images' sizes from their headers."""
    heights: list[int] = []
    widths: list[int] = []
    for batch in pq.ParquetFile(pa.BufferReader(data)).iter_batches(columns=["image"]):
        h, w = _sizes_of(batch.column(0).to_pylist())
        heights += h
        widths += w
    return ShardResult(previous, np.array(heights), np.array(widths), "kept")


def _verified(fs: pafs.FileSystem, path: str, previous: ShardInfo) -> pa.Buffer | None:
    """The file's bytes when they are exactly what the previous manifest recorded."""
    if file_size(fs, path) != previous.bytes:
        return None
    try:
        data = read_buffer(fs, path)
    except FileNotFoundError:
        return None
    return data if hashlib.sha256(data).hexdigest() == previous.sha256 else None


def _parquet(plan: ShardPlan, root: Path, max_side: int | None) -> tuple[pa.Buffer, list, list]:
    """The shard's Parquet bytes, read and written one row group at a time."""
    heights: list[int] = []
    widths: list[int] = []
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, SCHEMA, **parquet_options(SCHEMA)) as writer:
        for a, b in shard_ranges(plan.sizes.tolist(), ROW_GROUP_BYTES):
            images = []
            for entry in plan.rows[a:b]:
                where = plan.source.where(entry)
                data, h, w = load_source_image(root / entry.path, where, max_side)
                images.append(data)
                heights.append(h)
                widths.append(w)
            rows = plan.rows[a:b]
            table = pa.table(
                {
                    "image": images,
                    "label": [e.label for e in rows],
                    "sample_id": [e.path for e in rows],
                },
                schema=SCHEMA,
            )
            del images
            writer.write_table(table, row_group_size=len(rows))
    return sink.getvalue(), heights, widths


def build_shard(
    plan: ShardPlan,
    root: Path,
    max_side: int | None,
    fs: pafs.FileSystem,
    out_root: str,
    previous: ShardInfo | None,
    created: Callable[[str], None],
) -> ShardResult:
    """Keep the published shard of this plan if it verifies, else build and write it.
    `created(path)` is told of every file this call adds (so a failed run can remove them)."""
    path = join(out_root, plan.path)
    if previous is not None and previous.num_rows == len(plan.rows):
        data = _verified(fs, path, previous)
        if data is not None:
            return _kept(data, previous)
    buffer, heights, widths = _parquet(plan, root, max_side)
    sha = hashlib.sha256(buffer).hexdigest()
    info = ShardInfo(path=plan.path, num_rows=len(plan.rows), bytes=buffer.size, sha256=sha)
    new_file = file_size(fs, path) is None
    if not new_file and same_file(fs, path, buffer.size, sha):
        action = "unchanged"
    else:
        write_bytes(fs, path, buffer)
        if new_file:
            created(path)
        action = "wrote"
    return ShardResult(info, np.array(heights), np.array(widths), action)
