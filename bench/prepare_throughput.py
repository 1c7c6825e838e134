"""Prepare throughput of the large benchmarks (pipeline/data/prepare/from_lists.py): MB/s of source
JPEG bytes turned into published shards, to a local folder and to S3 on loopback (moto).

    python -m bench.prepare_throughput [--images 2000] [--repeats 3] [--workers 1 2] [--no-record]

The source is generated in the ImageNet-LT layout (tests/helpers/lt_datasets.py): `--images`
JPEGs with sides of 300-450 px (median about 375 x 375) and ~100 kB each, about ImageNet's
weight, long-tailed over 20 classes. Shards of `--shard-mb` (16 by default, so that a small set
still makes enough shards for the workers; the real default is 256). Every figure is the median
of `--repeats` prepares into a fresh output, timed end to end: lists read and checked, files
looked up, each image checked to decode, Parquet written, sha256, upload, manifest. Also timed:
a re-run that finds every shard published (each verified by its sha256 and kept), and
`--max-side 256` (larger images shrunk and re-encoded).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

from bench.common import scratch_dir
from bench.record import record
from pipeline.data.prepare.from_lists import prepare_benchmark
from pipeline.storage import S3Options, create_bucket, resolve
from tests.helpers.lt_datasets import train_counts, write_imagenet_lt

CLASSES = 20
EVAL_PER_CLASS = 10  # val and test images per class
SIDES = (300, 450)
NOISE = 40.0  # ~100 kB per JPEG at these sizes


def _generate(root: Path, images: int) -> tuple[Path, int, float]:
    """(ROOT, image count, source MB) of an ImageNet-LT-format set of about `images` JPEGs."""
    n_max = 2
    while sum(train_counts(CLASSES, n_max, max(1, n_max // 25))) + 2 * CLASSES * EVAL_PER_CLASS < images:  # fmt: skip
        n_max += 1
    write_imagenet_lt(
        root,
        num_classes=CLASSES,
        n_max=n_max,
        n_min=max(1, n_max // 25),
        eval_per_class=EVAL_PER_CLASS,
        sides=SIDES,
        noise=NOISE,
    )
    files = list(root.rglob("*.JPEG"))
    return root, len(files), sum(f.stat().st_size for f in files) / 1e6


def _seconds(run, fresh_output, cleanup, repeats: int) -> tuple[float, int]:
    """Median wall time of `repeats` prepares, each into `fresh_output()`; and the shards."""
    times, shards = [], 0
    for _ in range(repeats):
        output = fresh_output()
        start = time.perf_counter()
        manifest = run(output)
        times.append(time.perf_counter() - start)
        shards = sum(len(s.shards) for s in manifest.splits.values())
        cleanup(output)
    return statistics.median(times), shards


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shard-mb", type=float, default=16.0)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)

    from tests.helpers.s3_server import FAKE_CREDENTIALS, MotoServer

    work = scratch_dir("bench-prepare-")
    t0 = time.perf_counter()
    source, count, source_mb = _generate(work / "imagenet-lt", args.images)
    print(f"generated {count:,} JPEGs ({source_mb:.0f} MB) in {time.perf_counter() - t0:.0f} s")
    serial = iter(range(10**6))

    def local_output() -> str:
        return str(work / f"out-{next(serial)}")

    def remove_local(output: str) -> None:
        shutil.rmtree(output, ignore_errors=True)

    rows = []

    def measure(what: str, workers: int, run, fresh_output, cleanup) -> None:
        seconds, shards = _seconds(run, fresh_output, cleanup, args.repeats)
        rows.append((what, workers, shards, seconds))
        print(f"{what}, {workers} worker(s): {seconds:.2f} s, {source_mb / seconds:.0f} MB/s")

    def prepare(workers: int, s3: S3Options | None = None, **kwargs):
        return lambda output: prepare_benchmark(
            "imagenet_lt", str(source), output, shard_mb=args.shard_mb, workers=workers, s3=s3, **kwargs
        )  # fmt: skip

    for workers in args.workers:
        measure("local folder", workers, prepare(workers), local_output, remove_local)
    most = max(args.workers)
    kept = local_output()
    prepare(most)(kept)
    measure("local folder, re-run (every shard verified and kept)", most, prepare(most), lambda: kept, lambda _: None)  # fmt: skip
    measure("local folder, --max-side 256", most, prepare(most, max_side=256), local_output, remove_local)  # fmt: skip

    with MotoServer() as server:
        s3 = S3Options(endpoint_url=server.endpoint_url, region="us-east-1")
        os.environ.update({k: v for k, v in FAKE_CREDENTIALS.items() if v})
        create_bucket("s3://bench-prepare", s3)

        def s3_output() -> str:
            return f"s3://bench-prepare/run-{next(serial)}"

        def remove_s3(output: str) -> None:  # moto keeps objects in memory
            fs, path = resolve(output, s3)
            fs.delete_dir_contents(path, missing_dir_ok=True)

        for workers in args.workers:
            measure("S3 on loopback (moto)", workers, prepare(workers, s3), s3_output, remove_s3)

    lines = [
        f"{count:,} generated JPEGs in the ImageNet-LT layout ({source_mb:.0f} MB, sides "
        f"{SIDES[0]}-{SIDES[1]} px, ~{source_mb / count * 1e3:.0f} kB each), shards of "
        f"{args.shard_mb:g} MB, median of {args.repeats} prepares into a fresh output",
        "",
        "| destination | workers | shards | seconds | MB/s of source bytes | images/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for what, workers, shards, seconds in rows:
        lines.append(
            f"| {what} | {workers} | {shards} | {seconds:.2f} | {source_mb / seconds:.0f} | "
            f"{count / seconds:,.0f} |"
        )
    table = "\n".join(lines)
    record(
        "prepare_throughput",
        "Prepare throughput: the large benchmarks' shards",
        table,
        print_only=args.no_record,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
