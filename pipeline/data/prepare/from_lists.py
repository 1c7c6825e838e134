"""ImageNet-LT, iNaturalist 2018 and Places-LT from their list files -> Parquet shards of the
source images' own encoded bytes + `manifest.json` (what `jobs/prepare_data.py --dataset
imagenet_lt|inat2018|places_lt` runs).

    prepare_benchmark("imagenet_lt", "/data/imagenet", "s3://shike/datasets/imagenet-lt")

1. The list files are read and checked (`lt_lists`) and every listed image file is looked up:
   a malformed line, a path named twice, a label outside the class range or a missing file
   stops the run here, before anything is written.
2. The training rows are put in one seeded random order (streaming readers shuffle only
   within a local buffer, see `manifest.TRAIN_ROW_ORDER`); every split is cut into shards of
   about `shard_mb` MB of source bytes (`source_shards`). With `max_side` the shrunk images
   make shards smaller than that: raise `shard_mb` to compensate.
3. `workers` threads build and write the shards: rows `image` (the file's own bytes, checked
   to decode; a JPEG of it when shrunk), `label`, `sample_id` (the path in the list). Only the
   shards in flight are in memory: about 2-3 x `shard_mb` per worker, whatever the dataset size.
4. The manifest is published last (`publish`): per-split class counts and shards (size,
   sha256), the training images' size statistics, imbalance factor (max / min training images
   per class), n_max, class names, and the list files' checksum as the source's.

An unreadable image stops the run as well: the shard files this run added are removed and no
manifest is written, so a dataset published before stays exactly as it was. A re-run with the
same arguments keeps every shard the published manifest lists whose file still has the
recorded size and sha256, and rebuilds only the others. iNaturalist 2018's `test` split lists
the shards of `val` (manifest `split_aliases`; see `lt_lists`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs

from pipeline.data import DataError, IntegrityError
from pipeline.data.longtail import lt_groups
from pipeline.data.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    TRAIN_ROW_ORDER,
    TRAIN_ROW_ORDER_SEED,
    Column,
    ImageInfo,
    Manifest,
    ShardInfo,
    SizeStats,
    SplitInfo,
    read_manifest,
)
from pipeline.data.prepare.publish import Log, publish_manifest
from pipeline.data.prepare.source_shards import (
    SCHEMA,
    FileStats,
    ShardPlan,
    ShardResult,
    build_shard,
    plan_split,
    stat_files,
)
from pipeline.data.sources.lt_lists import (
    OFFICIAL_NUM_CLASSES,
    BenchmarkLists,
    read_benchmark_lists,
)
from pipeline.storage import S3Options, check_access, display, file_size, join, resolve

DEFAULT_SHARD_MB = 256.0
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
STAT_CHUNK = 4096  # files looked up per task of the existence check


def _quiet(_: str) -> None:
    pass


def _size(n: float) -> str:
    """Bytes for a log line: "1.24 GB", "38.1 MB", "420 kB"."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def _stats(pool: ThreadPoolExecutor, lists: BenchmarkLists, split: str) -> FileStats:
    """Every file of a split looked up in parallel; the first missing one in list order fails."""
    source = lists.splits[split]
    n = len(source.entries)
    parts = list(
        pool.map(
            lambda a: stat_files(lists.root, source, a, min(n, a + STAT_CHUNK)),
            range(0, n, STAT_CHUNK),
        )
    )
    return FileStats(
        np.concatenate([p.sizes for p in parts]), np.concatenate([p.mtimes for p in parts])
    )


def _plans(
    lists: BenchmarkLists, stats: dict[str, FileStats], target_bytes: int, max_side: int | None
) -> dict[str, list[ShardPlan]]:
    """Every split's shards; the training rows in one seeded random order, the others in
    list order."""
    plans = {}
    for name, split in lists.splits.items():
        n = len(split.entries)
        if name == "train":
            order = np.random.default_rng(TRAIN_ROW_ORDER_SEED).permutation(n)
        else:
            order = np.arange(n)
        plans[name] = plan_split(name, split, order, stats[name], target_bytes, max_side)
    return plans


def _previous_shards(
    fs: pafs.FileSystem, root: str, output: str, s3: S3Options | None, log: Log
) -> dict[str, ShardInfo]:
    """{shard path: ShardInfo} of the manifest published at `output`, if there is one."""
    if file_size(fs, join(root, MANIFEST_NAME)) is None:
        return {}
    try:
        previous = read_manifest(output, s3)
    except IntegrityError as exc:
        log(f"note: the published manifest is not usable ({exc}); every shard is rebuilt")
        return {}
    return {s.path: s for split in previous.splits.values() for s in split.shards}


def _remove(fs: pafs.FileSystem, paths: list[str]) -> None:
    # Best effort: a shard no manifest lists is invisible to readers, and a later run
    # removes it (publish.remove_stale).
    for path in paths:
        with contextlib.suppress(OSError):
            fs.delete_file(path)


def _build_all(
    plans: list[ShardPlan],
    pool: ThreadPoolExecutor,
    lists: BenchmarkLists,
    max_side: int | None,
    fs: pafs.FileSystem,
    root: str,
    previous: dict[str, ShardInfo],
    log: Log,
) -> dict[str, ShardResult]:
    """Every planned shard built (or kept), as many at a time as the pool has workers. On an
    error the shards this run added are removed, and the error of the earliest failed shard
    in plan order is raised (not whichever thread failed first: same input, same message)."""
    created: list[str] = []
    futures: dict[Future, ShardPlan] = {
        pool.submit(
            build_shard, p, lists.root, max_side, fs, root, previous.get(p.path), created.append
        ): p
        for p in plans
    }
    per_split = {p.split: p.index + 1 for p in plans}
    results: dict[str, ShardResult] = {}
    try:
        for future in as_completed(futures):
            plan, result = futures[future], future.result()
            results[plan.path] = result
            log(
                f"{plan.split}: {result.action} shard {plan.index + 1}/{per_split[plan.split]} "
                f"{plan.path} ({len(plan.rows):,} rows, {_size(result.info.bytes)}) "
                f"[{len(results)}/{len(plans)}]"
            )
    except BaseException as exc:
        for future in futures:
            future.cancel()
        wait(futures)
        _remove(fs, created)
        failed = [f for f in futures if not f.cancelled() and f.exception() is not None]
        if isinstance(exc, Exception) and failed:
            raise failed[0].exception() from None
        raise
    return results


def _size_stats(values: np.ndarray) -> SizeStats:
    return SizeStats(
        min=int(values.min()),
        median=int(np.percentile(values, 50, method="lower")),
        max=int(values.max()),
    )


def _manifest(
    lists: BenchmarkLists,
    plans: dict[str, list[ShardPlan]],
    results: dict[str, ShardResult],
    max_side: int | None,
) -> Manifest:
    splits = {}
    for name, split_plans in plans.items():
        labels = [e.label for p in split_plans for e in p.rows]
        counts = np.bincount(labels, minlength=lists.num_classes).tolist()
        shards = [results[p.path].info for p in split_plans]
        splits[name] = SplitInfo(num_rows=len(labels), class_counts=counts, shards=shards)
    for alias, target in lists.aliases.items():
        splits[alias] = splits[target]
    train = [results[p.path] for p in plans["train"]]
    heights = np.concatenate([r.heights for r in train])
    widths = np.concatenate([r.widths for r in train])
    counts = splits["train"].class_counts
    return Manifest(
        schema_version=SCHEMA_VERSION,
        dataset=lists.dataset,
        source={
            "path": str(lists.root),
            "format": lists.format,
            "checksum": lists.checksum,
            "files": " ".join(s.file.name for s in lists.splits.values()),
        },
        imbalance_factor=max(counts) / min(counts),
        n_max=max(counts),
        num_classes=lists.num_classes,
        class_names=lists.class_names,
        class_counts=counts,
        train_row_order=TRAIN_ROW_ORDER,
        class_groups=lt_groups(counts),
        image=ImageInfo(
            height=None,
            width=None,
            encoding="source",
            sizes={"height": _size_stats(heights), "width": _size_stats(widths)},
            max_side=max_side,
        ),
        columns=[Column(name=f.name, type=str(f.type)) for f in SCHEMA],
        splits=splits,
        split_aliases=dict(lists.aliases) or None,
    )


def _check_arguments(source: str, shard_mb: float, max_side: int | None, workers: int) -> Path:
    if not shard_mb > 0 or not math.isfinite(shard_mb):
        raise DataError(f"shard size must be a positive number of MB, got {shard_mb}")
    if max_side is not None and max_side < 1:
        raise DataError(f"max side must be a positive number of pixels, got {max_side}")
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    if "://" in str(source):
        raise DataError(f"source {source}: the list files and images must be in a local folder")
    return Path(source).expanduser().absolute()


def _describe(lists: BenchmarkLists, log: Log) -> None:
    counts = ", ".join(f"{name} {len(s.entries):,}" for name, s in lists.splits.items())
    files = " + ".join(s.file.name for s in lists.splits.values())
    log(f"read {lists.dataset} lists ({files}) from {lists.root}: {counts} images")
    official = OFFICIAL_NUM_CLASSES[lists.dataset]
    note = "" if lists.num_classes == official else f" (the real benchmark has {official:,})"
    log(f"{lists.num_classes:,} classes{note}")
    for alias, target in lists.aliases.items():
        log(f"{alias} = {target}: no separate {alias} list; the manifest lists {target}'s shards")


def prepare_benchmark(
    dataset: str,
    source: str,
    output: str,
    *,
    shard_mb: float = DEFAULT_SHARD_MB,
    max_side: int | None = None,
    workers: int = DEFAULT_WORKERS,
    s3: S3Options | None = None,
    log: Log = _quiet,
) -> Manifest:
    """Shards + manifest of `dataset` (imagenet_lt, inat2018, places_lt) at `output` from the
    list files and images in the local folder `source`. Raises DataError (one line, naming the
    list file and line, and the image file) for anything the user can fix; nothing is
    published then."""
    root_dir = _check_arguments(source, shard_mb, max_side, workers)
    fs, root = resolve(output, s3)
    check_access(fs, root, "write to")
    t0 = time.perf_counter()
    lists = read_benchmark_lists(dataset, root_dir)
    _describe(lists, log)
    with ThreadPoolExecutor(workers, thread_name_prefix="prepare") as pool:
        stats = {name: _stats(pool, lists, name) for name in lists.splits}
        files = sum(len(s.sizes) for s in stats.values())
        total = sum(int(s.sizes.sum()) for s in stats.values())
        log(f"found all {files:,} image files ({_size(total)})")
        plans = _plans(lists, stats, max(1, int(shard_mb * 1e6)), max_side)
        every = [p for split_plans in plans.values() for p in split_plans]
        previous = _previous_shards(fs, root, output, s3, log)
        log(
            f"{len(every)} shards of about {shard_mb:g} MB to {display(fs, root)}, {workers} at a "
            f"time (about {_size(3 * workers * shard_mb * 1e6)} of memory at most)"
        )
        results = _build_all(every, pool, lists, max_side, fs, root, previous, log)
    manifest = _manifest(lists, plans, results, max_side)
    manifest.uri, manifest.filesystem, manifest.root = str(output), fs, root
    publish_manifest(fs, root, manifest, log)
    seconds = time.perf_counter() - t0
    log(
        f"prepared {_size(total)} of source images in {seconds:.1f} s ({total / 1e6 / seconds:.0f} MB/s)"
    )
    return manifest
