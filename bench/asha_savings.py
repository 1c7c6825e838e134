"""Compute saved by ASHA: the same 8-trial grid swept with ASHA and without early stopping.

    python -m bench.asha_savings [--epochs 4] [--head-images 250] [--concurrency 2] [--no-record]

Grid: loss.dkt_weight x optim.peak_lr (2 x 4 = 8 trials, learning rates from far too small to
large) on CIFAR-10-LT IF100 with 250 head-class images (real CIFAR-10 from CIFAR10_DIR), SHIKE
ResNet-32, 1 worker per trial with 1 torch thread, 2 trials at a time. Two at a time because a
trial spends about 45 s starting (its driver, Ray Train controller and worker processes, the
first Ray Data batches) and one trial's single thread leaves a core idle: on 2 cores the 8-trial
grid took 762 s one at a time and 479 s two at a time (500 head images, 2026-12-02).
Reports trial-epochs run with ASHA / trial-epochs of the full grid, and whether ASHA's best
configuration (by val/score at the end) is the one the full grid finds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import prepare_cifar10_lt, scratch_dir
from bench.record import record

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--head-images", type=int, default=250)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    import ray

    from pipeline.config import load_config
    from pipeline.distributed.tune import SchedulerSpec, SweepSpec, run_sweep

    work = scratch_dir("bench-asha-")
    data = str(work / "data")
    manifest = prepare_cifar10_lt(data, args.head_images, 20)
    base = load_config(
        ROOT / "configs/smoke.yaml",
        [
            f"data.uri={data}",
            f"optim.epochs={args.epochs}",
            f"optim.stage2_start={args.epochs - 1}",
            "optim.batch_size=64",
            "cluster.num_workers=1",
            "cluster.cpus_per_worker=1",
            "train.threads=1",
            f"cluster.storage_path={work}/runs",
            f"tracking.tracking_uri=sqlite:///{work}/mlflow.db",
        ],
    )
    space = {
        "loss.dkt_weight": {"grid": [1, 10]},
        "optim.peak_lr": {"grid": [0.001, 0.01, 0.05, 0.2]},
    }
    # The dashboard serves the State API that Ray Train needs to free finished trials.
    ray.init(num_cpus=2 * args.concurrency, log_to_driver=False)
    outcomes = {}
    for kind in ("asha", "none"):
        spec = SweepSpec(
            name=f"asha-bench-{kind}",
            base_config="configs/smoke.yaml",
            num_samples=1,
            max_concurrent_trials=args.concurrency,
            space=space,
            scheduler=SchedulerSpec(type=kind, grace_period=1, reduction_factor=2),
        )
        start = time.perf_counter()
        outcomes[kind] = (run_sweep(spec, base, register=False), time.perf_counter() - start)
    ray.shutdown()

    def params(row):
        return f"dkt {row['loss.dkt_weight']}, peak lr {row['optim.peak_lr']}"

    asha, asha_s = outcomes["asha"]
    full, full_s = outcomes["none"]
    ratio = asha["trial_epochs_run"] / asha["trial_epochs_full"]
    same = params(asha["best"]) == params(full["best"])
    lines = [
        f"8-trial grid (loss.dkt_weight x optim.peak_lr), {args.epochs} epochs each (stage 2 in the last), "
        f"CIFAR-10-LT IF100 with {args.head_images} head images ({sum(manifest.class_counts)} train "
        "images), ASHA grace 1 epoch, reduction 2, "
        f"{args.concurrency} trials at a time",
        "",
        "| sweep | trial-epochs run | of a full grid | wall time (s) | best configuration | its val/score |",
        "|---|---|---|---|---|---|",
        f"| ASHA | {asha['trial_epochs_run']} | {asha['trial_epochs_full']} ({ratio:.2f}) | {asha_s:.0f} | "
        f"{params(asha['best'])} | {asha['best']['val/score']:.3f} |",
        f"| no early stopping | {full['trial_epochs_run']} | {full['trial_epochs_full']} (1.00) | {full_s:.0f} | "
        f"{params(full['best'])} | {full['best']['val/score']:.3f} |",
        "",
        f"Same best configuration with and without early stopping: {'yes' if same else 'no'}.",
        "",
        "| configuration | ASHA: epochs run | ASHA: last val/score | no early stopping: val/score |",
        "|---|---|---|---|",
    ]
    full_by_config = {params(r): r for r in full["trials"]}
    for row in sorted(asha["trials"], key=params):
        other = full_by_config[params(row)]
        lines.append(
            f"| {params(row)} | {row['epochs_run']} | {row['val/score']:.3f} | "
            f"{other['val/score']:.3f} |"
        )
    table = "\n".join(lines)
    record("asha", "ASHA: compute saved on an 8-trial sweep", table, print_only=args.no_record)


if __name__ == "__main__":
    main()
