"""What the distributed machinery costs: jobs/train.py on a Ray head node (127.0.0.1) against
the bare training step on in-memory tensors, on the same cores.

    python -m bench.pipeline_efficiency [--workers 1 2] [--epochs 3] [--head-images 500] [--no-record]
    python -m bench.pipeline_efficiency --large [--train-images 20000] [--no-record]

CIFAR rows (the default): for each worker count, one `ray job submit` of jobs/train.py (SHIKE
ResNet-32, global batch 128, CIFAR-10-LT IF100 with `--head-images` images in the head class:
500 -> 1,236 training images, 5000 -> the full 12,406; stage 1 only; shards from S3 on loopback,
moto) reports `train/images_per_s` per epoch (images / wall time of the epoch's training loop,
data waits included); the median over epochs after the first is compared with the bare step
(same model, batch 128, same total torch threads) measured in the same run, beside the median
`train/input_wait` (the share of the epoch the step waited for its next batch, largest over
workers): what the ratio loses to waiting for data; the rest is a slower step.
`train/input_start_s` is the part of that wait spent on the epoch's first batch (Ray Data
starting a new execution of the split each epoch). Also: seconds from `ray job submit` to the
first batch reaching the training step. Part of the job's cost comes once per epoch, so the
ratio grows with the epoch's size: compare `--head-images 500` with `--head-images 5000`.

`--large`: the large-benchmark path. Generated JPEGs (sides 375-500 px, about ImageNet's
weight) in the ImageNet-LT layout, 100 classes, long-tailed, at least `--train-images` training
images, prepared by `jobs.prepare_data --dataset imagenet_lt` into local shards; one epoch of
`configs/imagenet_lt_smoke.yaml` at 224 px (SHIKE on the ResNet-18 trunk) on 2 Ray Train
workers, decoded and cropped by Ray Data, colour and normalisation on the workers; against
the bare step of the same model at 224 px on the same 2 threads; and the job's peak memory:
the largest sum over the node's processes (driver and Ray workers included) of their
proportional set size, so shared pages (Ray's object store) count once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import cifar10_source, prepare_cifar10_lt, ray_temp_dir, scratch_dir
from bench.record import record
from bench.train_step import images_per_s

ROOT = Path(__file__).resolve().parents[1]
LARGE_CLASSES = 100
LARGE_IMAGE_SIZE = 224
LARGE_BATCH = 64  # global: 32 a worker
LARGE_SIDES = (375, 500)
LARGE_NOISE = 40.0  # ~100 kB JPEGs at these sides, about ImageNet's average


def after_first_epoch(client, run_id: str, key: str) -> float:
    """Median of a per-epoch metric over the epochs after the first (or the only one)."""
    history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return statistics.median(m.value for m in history[1:] or history)


def submit_train(dashboard: str, env: dict, name: str, config: str, overrides: dict) -> tuple:
    """`ray job submit -- python -m jobs.train` run to its end: (the run's MLflow client and
    run id, seconds from submission to the first training batch)."""
    from mlflow.tracking import MlflowClient

    from tests.helpers.ray_cluster import submit_job

    entry = [sys.executable, "-m", "jobs.train", "--config", config, "--run-name", name]
    entry += ["--no-register", *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]]
    submitted = time.time()
    proc = submit_job(dashboard, entry, ROOT, env, timeout=7200)
    if proc.returncode != 0:
        sys.exit(f"job failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    first = re.search(r"first training batch at unix time ([0-9.]+)", proc.stdout + proc.stderr)
    client = MlflowClient(overrides["tracking.tracking_uri"])
    [run] = client.search_runs(
        [client.get_experiment_by_name("shike").experiment_id],
        f"tags.`shike.run_name` = '{name}'",
    )
    return client, run.info.run_id, float(first.group(1)) - submitted


def cifar_rows(args) -> None:
    cifar10_source()  # before the S3 server starts
    import torch

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
        with ray_head(ray_temp_dir("rb"), num_cpus=4) as (_, dashboard, env):
            for workers in args.workers:
                threads = max(1, 2 // workers)
                overrides = {
                    "data.uri": uri,
                    "optim.epochs": args.epochs,
                    "optim.stage2_start": args.epochs,
                    "cluster.num_workers": workers,
                    "cluster.cpus_per_worker": 1,
                    "train.threads": threads,
                    "cluster.storage_path": f"{work}/runs",
                    "tracking.tracking_uri": f"sqlite:///{work}/mlflow.db",
                }
                name = f"bench-{workers}w"
                client, run_id, startup = submit_train(
                    dashboard, env, name, "configs/smoke.yaml", overrides
                )
                results.append(
                    (
                        workers,
                        after_first_epoch(client, run_id, "train/images_per_s"),
                        after_first_epoch(client, run_id, "train/input_wait"),
                        after_first_epoch(client, run_id, "train/input_start_s"),
                        startup,
                        threads * workers,
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
    # One section per epoch size: 500 head images (small epochs) and 5000 (the full split).
    record(
        f"pipeline_efficiency_n{args.head_images}",
        "Pipeline efficiency: jobs/train.py against the bare training step "
        f"({train_images:,} images an epoch)",
        table,
        print_only=args.no_record,
    )


class PeakMemory:
    """The largest sum of the proportional set sizes (PSS) of a Ray node's processes, sampled
    every `period` seconds in a thread while the `with` block runs."""

    def __init__(self, ray_dir: Path, period: float = 1.0) -> None:
        self.ray_dir, self.period, self.peak = ray_dir, period, 0
        self._done = threading.Event()

    def _sample(self) -> None:
        import psutil

        from tests.helpers.ray_cluster import node_processes

        while not self._done.wait(self.period):
            total = 0
            for proc in node_processes(self.ray_dir):
                # a process may end between listing and reading
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_full_info().pss
            self.peak = max(self.peak, total)

    def __enter__(self) -> PeakMemory:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def prepare_large(work: Path, train_images: int) -> tuple:
    """ImageNet-LT-layout JPEGs with at least `train_images` training images, prepared into
    local shards by the users' command: (shards folder, Manifest)."""
    from pipeline.data.manifest import read_manifest
    from tests.helpers.lt_datasets import train_counts, write_imagenet_lt

    n_max = 10
    while sum(train_counts(LARGE_CLASSES, n_max, n_max // 100 or 1)) < train_images:
        n_max += 10
    raw = write_imagenet_lt(
        work / "raw", num_classes=LARGE_CLASSES, n_max=n_max, n_min=n_max // 100 or 1,
        eval_per_class=2, sides=LARGE_SIDES, noise=LARGE_NOISE,
    )  # fmt: skip
    shards = work / "shards"
    subprocess.run(
        [sys.executable, "-m", "jobs.prepare_data", "--dataset", "imagenet_lt"]
        + ["--source", str(raw), "--output", str(shards)],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    return shards, read_manifest(str(shards))


def large_row(args) -> None:
    import torch

    from tests.helpers.ray_cluster import ray_head

    work = scratch_dir("bench-pipe-large-")
    shards, manifest = prepare_large(work, args.train_images)
    train = manifest.splits["train"]
    overrides = {
        "data.uri": str(shards),
        "data.image_size": LARGE_IMAGE_SIZE,
        "optim.epochs": 1,
        "optim.stage2_start": 1,
        "optim.batch_size": LARGE_BATCH,
        "cluster.num_workers": 2,
        "cluster.cpus_per_worker": 0.5,
        "train.threads": 1,
        "cluster.storage_path": f"{work}/runs",
        "tracking.tracking_uri": f"sqlite:///{work}/mlflow.db",
    }
    torch.set_num_threads(2)
    model = [f"model.{k}={v}" for k, v in (("arch", "shike_resnet18"), ("num_experts", 3))]

    def bare_step() -> float:
        return images_per_s(
            [*model, "data.dataset=imagenet_lt", f"data.image_size={LARGE_IMAGE_SIZE}"],
            LARGE_BATCH, 3, torch.device("cpu"), LARGE_IMAGE_SIZE, list(train.class_counts),
        )  # fmt: skip

    # Before and after the job: the machine's speed drifts over the job's half hour, and a ratio
    # to one short measurement at one end moved with it.
    bare_before = bare_step()
    ray_dir = ray_temp_dir("rl")
    # Reading every process's PSS walks its page tables (Ray's workers map the object store):
    # sampled each second it took 8% of a core from the job measured (bench/HISTORY.md).
    memory = PeakMemory(ray_dir, period=5.0)
    with ray_head(ray_dir, num_cpus=4) as (_, dashboard, env), memory:
        client, run_id, startup = submit_train(
            dashboard, env, "bench-large", "configs/imagenet_lt_smoke.yaml", overrides
        )
    job_rate = after_first_epoch(client, run_id, "train/images_per_s")
    wait = after_first_epoch(client, run_id, "train/input_wait")
    bare_after = bare_step()
    bare = (bare_before + bare_after) / 2
    table = (
        f"jobs/train.py via `ray job submit` to a local head node (4 logical CPUs on 2 cores), "
        f"`configs/imagenet_lt_smoke.yaml` at {LARGE_IMAGE_SIZE} px (SHIKE, ResNet-18 trunk, 3 "
        f"experts), 2 Ray Train workers x 1 torch thread, global batch {LARGE_BATCH}, one epoch of "
        f"{train.num_rows:,} generated JPEGs ({LARGE_CLASSES} classes, ImageNet-LT layout, sides "
        f"{LARGE_SIDES[0]}-{LARGE_SIDES[1]} px) from local shards; bare step: the same model, "
        f"batch {LARGE_BATCH}, 2 threads, random tensors, measured before and after the job (the "
        f"ratio is to their mean); peak memory: the node's processes' summed PSS, sampled every "
        f"{memory.period:g} s\n\n"
        "| job images/s | bare step images/s (before / after) | ratio | input wait | submit -> first batch (s) | peak memory (GiB) |\n"
        "|---|---|---|---|---|---|\n"
        f"| {job_rate:.1f} | {bare_before:.1f} / {bare_after:.1f} | {job_rate / bare:.2f} "
        f"| {100 * wait:.0f}% "
        f"| {startup:.1f} | {memory.peak / 2**30:.1f} |"
    )
    record(
        "pipeline_efficiency_large",
        "Pipeline efficiency at 224 px: one epoch of ImageNet-LT-layout shards on 2 Ray Train "
        "workers against the bare training step",
        table,
        print_only=args.no_record,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--head-images", type=int, default=500, help="head-class size (n_max)")
    ap.add_argument("--large", action="store_true", help="the 224 px ImageNet-LT-layout row")
    ap.add_argument("--train-images", type=int, default=20000, help="with --large")
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    if args.large:
        large_row(args)
    else:
        cifar_rows(args)


if __name__ == "__main__":
    main()
