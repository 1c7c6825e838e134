"""What the distributed machinery costs: jobs/train.py on a Ray head node (127.0.0.1), shards
from S3 on loopback (moto), against the bare training step on in-memory tensors.

    python -m bench.pipeline_efficiency [--workers 1 2] [--epochs 3] [--head-images 500] [--no-record]

For each worker count, one `ray job submit` of jobs/train.py (SHIKE ResNet-32, global batch
128, CIFAR-10-LT IF100 with `--head-images` images in the head class: 500 -> 1,236 training
images, 5000 -> the full 12,406; stage 1 only) reports `train/images_per_s` per epoch (images /
wall time of the epoch's training loop, data waits included); the median over epochs after the
first is compared with the bare step (same model, batch 128, same total torch threads) measured
in the same run, beside the median `train/input_wait` (the share of the epoch the step waited
for its next batch, largest over workers): what the ratio loses to waiting for data; the rest
is a slower step. `train/input_start_s` is the part of that wait spent on the epoch's first
batch (Ray Data starting a new execution of the split each epoch). Also: seconds from
`ray job submit` to the first batch reaching the training step. Part of the job's cost comes
once per epoch, so the ratio grows with the epoch's size: compare `--head-images 500` with
`--head-images 5000` (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import cifar10_source, prepare_cifar10_lt, ray_temp_dir, scratch_dir
from bench.record import record
from bench.train_step import images_per_s

ROOT = Path(__file__).resolve().parents[1]


def after_first_epoch(client, run_id: str, key: str) -> float:
    """Median of a per-epoch metric over the epochs after the first (or the only one)."""
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return statistics.median(m.value for m in history[1:] or history)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--head-images", type=int, default=500, help="head-class size (n_max)")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    cifar10_source()  # before the S3 server starts

    import torch
    from mlflow.tracking import MlflowClient

    from pipeline.storage import S3Options, create_bucket
    from tests.helpers.ray_cluster import ray_head
    from tests.helpers.s3_server import FAKE_CREDENTIALS, MotoServer

    work = scratch_dir("bench-pipe-")
    os.environ.update(FAKE_CREDENTIALS)
    results = []
    with MotoServer() as server:
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint_url
        s3 = S3Options(endpoint_url=server.endpoint_url)
        create_bucket("s3://bench", s3)
        uri = f"s3://bench/c10-lt-if100-n{args.head_images}"
        manifest = prepare_cifar10_lt(uri, args.head_images, 20, s3=s3)
        train_images = manifest.splits["train"].num_rows
        ray_dir = ray_temp_dir("rb")
        with ray_head(ray_dir, num_cpus=4) as (_, dashboard, env):
            for workers in args.workers:
                name = f"bench-{workers}w"
                tracking = f"sqlite:///{work}/mlflow.db"
                cmd = [
                    str(Path(sys.executable).with_name("ray")),
                    "job",
                    "submit",
                    "--address",
                    dashboard,
                    "--working-dir",
                    str(ROOT),
                    "--",
                    sys.executable,
                    "-m",
                    "jobs.train",
                    "--config",
                    "configs/smoke.yaml",
                    "--run-name",
                    name,
                    "--no-register",
                    "--set",
                    f"data.uri={uri}",
                    "--set",
                    f"optim.epochs={args.epochs}",
                    "--set",
                    f"optim.stage2_start={args.epochs}",
                    "--set",
                    f"cluster.num_workers={workers}",
                    "--set",
                    "cluster.cpus_per_worker=1",
                    "--set",
                    f"train.threads={max(1, 2 // workers)}",
                    "--set",
                    f"cluster.storage_path={work}/runs",
                    "--set",
                    f"tracking.tracking_uri={tracking}",
                ]
                for _ in range(10):  # the head's job agent starts a little after the dashboard
                    submitted = time.time()
                    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
                    if "No available agent" not in proc.stderr:
                        break
                    time.sleep(2)
                if proc.returncode != 0:
                    sys.exit(f"job failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                announced = re.search(
                    r"first training batch at unix time ([0-9.]+)", proc.stdout + proc.stderr
                )
                first = float(announced.group(1))
                client = MlflowClient(tracking)
                run = client.search_runs(
                    [client.get_experiment_by_name("shike").experiment_id],
                    f"tags.`shike.run_name` = '{name}'",
                )[0]
                results.append(
                    (
                        workers,
                        after_first_epoch(client, run.info.run_id, "train/images_per_s"),
                        after_first_epoch(client, run.info.run_id, "train/input_wait"),
                        after_first_epoch(client, run.info.run_id, "train/input_start_s"),
                        first - submitted,
                        max(1, 2 // workers) * workers,
                    )
                )

    rows = [
        "| workers | torch threads in all | job images/s | bare step images/s | ratio | input wait | of which first batch (s) | submit -> first batch (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for workers, job_rate, wait, first_wait, startup, threads in results:
        torch.set_num_threads(threads)
        bare = images_per_s([], 128, 5, torch.device("cpu"))
        rows.append(
            f"| {workers} | {threads} | {job_rate:.1f} | {bare:.1f} | {job_rate / bare:.2f} "
            f"| {100 * wait:.0f}% | {first_wait:.1f} | {startup:.1f} |"
        )
    table = (
        f"jobs/train.py via `ray job submit` to a local head node, shards from moto S3 on 127.0.0.1, "
        f"SHIKE ResNet-32, global batch 128, {args.epochs} epochs of {train_images:,} images; job images/s, "
        f"input wait (share of the epoch spent waiting for batches) and its first-batch part = "
        f"medians of epochs 2..{args.epochs}\n\n" + "\n".join(rows)
    )
    if args.no_record:
        print(table)
    else:
        # One section per epoch size: 500 head images (small epochs) and 5000 (the full split).
        record(
            f"pipeline_efficiency_n{args.head_images}",
            "Pipeline efficiency: jobs/train.py against the bare training step "
            f"({train_images:,} images an epoch)",
            table,
        )


if __name__ == "__main__":
    main()
