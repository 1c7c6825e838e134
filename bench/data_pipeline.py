"""Data benchmarks: prepare time, and images/s delivered to a consumer (decoded + augmented
batches of 128) from local shards and from S3 on loopback (moto), against the training step.

    python -m bench.data_pipeline [--epochs 2] [--no-record]

Needs CIFAR10_DIR (the real CIFAR-10 Parquet copy). Everything is measured in one run:
1. prepare CIFAR-10-LT IF100 from CIFAR10_DIR to a local folder (wall time);
2. the same dataset uploaded to a moto S3 server on 127.0.0.1;
3. Ray Data (read_parquet -> decode -> SHIKE augmentation -> iter_torch_batches(128)), local
   and S3, median images/s over `--epochs` full passes of the 12,406 training images;
4. the Ray-free reader (verified shards -> torch DataLoader with the same transform);
5. the SHIKE training step at batch 128 on this machine (bench/train_step.py's measurement),
   so the ratio "loader images/s / step images/s" says whether the loader keeps up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from bench.common import cifar10_source, scratch_dir
from bench.record import record
from bench.train_step import images_per_s


def _passes(make_iter, epochs: int) -> list[float]:
    rates = []
    for _ in range(epochs):
        start, n = time.perf_counter(), 0
        for batch in make_iter():
            n += len(batch[1]) if isinstance(batch, (list, tuple)) else len(batch["label"])
        rates.append(n / (time.perf_counter() - start))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    source = cifar10_source()

    import ray
    import torch

    from pipeline.config import load_config
    from pipeline.data.manifest import read_manifest
    from pipeline.data.prepare.from_raw import prepare_dataset
    from pipeline.data.readers.ray_reader import quiet_progress, split_dataset
    from pipeline.data.readers.torch_reader import load_prepared, make_loader
    from pipeline.storage import S3Options, create_bucket
    from tests.helpers.s3_server import FAKE_CREDENTIALS, MotoServer

    work = scratch_dir("bench-data-")
    t0 = time.perf_counter()
    prepare_dataset("cifar10", source, str(work / "local"), 100.0)
    prepare_s = time.perf_counter() - t0

    os.environ.update(FAKE_CREDENTIALS)
    rows = []
    with MotoServer() as server:
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint_url
        s3 = S3Options(endpoint_url=server.endpoint_url)
        create_bucket("s3://bench", s3)
        t0 = time.perf_counter()
        prepare_dataset("cifar10", source, "s3://bench/c10-lt-if100", 100.0, s3=s3)
        prepare_s3_s = time.perf_counter() - t0

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        quiet_progress()
        for where, uri in (
            ("local shards", str(work / "local")),
            ("S3 on loopback (moto)", "s3://bench/c10-lt-if100"),
        ):
            manifest = read_manifest(uri, s3)
            ds = split_dataset(manifest, "train", augment="shike", train=True, seed=0)
            rates = _passes(lambda ds=ds: ds.iter_torch_batches(batch_size=128), args.epochs)
            rows.append((f"Ray Data, {where}", statistics.median(rates)))
        ray.shutdown()

    cfg = load_config(None, ["data.dataset=cifar10", "data.loader_workers=2"])
    data = load_prepared(str(work / "local"))
    rates = _passes(lambda: make_loader(data.train, cfg.data, 128, train=True, seed=0), args.epochs)
    rows.append(("Ray-free reader (DataLoader, 2 workers), local shards", statistics.median(rates)))

    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step = images_per_s([], 128, 5, device)

    lines = [
        f"CIFAR-10-LT IF100 (12,406 training images), batch 128, median of {args.epochs} passes",
        "",
        "| what | figure | ratio to the SHIKE training step |",
        "|---|---|---|",
        f"| prepare CIFAR-10-LT IF100 to a local folder (decode, split, PNG-encode, write) | {prepare_s:.1f} s | |",
        f"| prepare the same to S3 on loopback (moto) | {prepare_s3_s:.1f} s | |",
    ]
    for name, rate in rows:
        lines.append(f"| {name}: decoded + augmented images/s | {rate:.0f} | {rate / step:.1f}x |")
    lines.append(f"| SHIKE training step (forward+backward+SGD), images/s | {step:.0f} | 1.0x |")
    table = "\n".join(lines)
    record(
        "data_pipeline",
        "Data: prepare time and streaming throughput",
        table,
        print_only=args.no_record,
    )


if __name__ == "__main__":
    main()
