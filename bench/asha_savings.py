"""Compute saved by ASHA, and wall time by one-device trials: the same 8-trial grid swept with
ASHA on one-device trials, with ASHA on Ray Train trials, and without early stopping.

    python -m bench.asha_savings [--epochs 4] [--head-images 250] [--concurrency 2] [--no-record]

Grid: loss.dkt_weight x optim.peak_lr (2 x 4 = 8 trials, learning rates from far too small to
large) on CIFAR-10-LT IF100 with 250 head-class images (real CIFAR-10 from CIFAR10_DIR), SHIKE
ResNet-32 with 1 torch thread per worker, 1 CPU per trial (one device, or 2 Ray Train workers
x 0.5 CPU), 2 trials at a time. Reports trial-epochs run with ASHA / trial-epochs of the full
grid, whether ASHA's best configuration (by val/score at the end) is the one the full grid
finds, and each sweep's wall time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.common import prepare_cifar10_lt, scratch_dir
from bench.record import record

ROOT = Path(__file__).resolve().parents[1]


def run_sweeps(args: argparse.Namespace) -> tuple[int, dict]:
    """The grid swept three ways: (training images, {(scheduler, workers per trial): (the
    sweep's summary, its wall seconds)})."""
    import ray

    from pipeline.config import build_config, load_config
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
    # (scheduler, workers per trial): 1 trains on one device in the trial's actor, 2 is a Ray
    # Train run of 2 workers x 0.5 CPU; the same CPU per trial either way.
    for kind, workers in (("asha", 1), ("asha", 2), ("none", 1)):
        spec = SweepSpec(
            name=f"asha-bench-{kind}-{workers}",
            base_config="configs/smoke.yaml",
            num_samples=1,
            max_concurrent_trials=args.concurrency,
            space=space,
            scheduler=SchedulerSpec(type=kind, grace_period=1, reduction_factor=2),
            trial_workers=workers,
        )
        trial_base = build_config(base.to_dict(), values={"cluster.cpus_per_worker": 1 / workers})
        start = time.perf_counter()
        summary = run_sweep(spec, trial_base, register=False)
        outcomes[kind, workers] = (summary, time.perf_counter() - start)
    ray.shutdown()
    return sum(manifest.class_counts), outcomes


def _params(trial: dict) -> str:
    return f"dkt {trial['loss.dkt_weight']}, peak lr {trial['optim.peak_lr']}"


def _sweep_row(label: str, summary: dict, seconds: float) -> str:
    run, grid = summary["trial_epochs_run"], summary["trial_epochs_full"]
    return (
        f"| {label} | {run} | {grid} ({run / grid:.2f}) | {seconds:.0f} | "
        f"{_params(summary['best'])} | {summary['best']['val/score']:.3f} |"
    )


def report(args: argparse.Namespace, train_images: int, outcomes: dict) -> str:
    asha, asha_s = outcomes["asha", 1]
    train, train_s = outcomes["asha", 2]
    full, full_s = outcomes["none", 1]
    ratio = asha["trial_epochs_run"] / asha["trial_epochs_full"]
    same = _params(asha["best"]) == _params(full["best"])
    lines = [
        f"8-trial grid (loss.dkt_weight x optim.peak_lr), {args.epochs} epochs each (stage 2 in "
        f"the last), CIFAR-10-LT IF100 with {args.head_images} head images "
        f"({train_images} train images), ASHA grace 1 epoch, reduction 2, "
        f"{args.concurrency} trials at a time, 1 CPU per trial",
        "",
        "| sweep | trial-epochs run | of a full grid | wall time (s) | best configuration | its val/score |",
        "|---|---|---|---|---|---|",
        _sweep_row("ASHA, one-device trials", asha, asha_s),
        _sweep_row("ASHA, Ray Train trials (2 x 0.5 CPU)", train, train_s),
        _sweep_row("no early stopping, one-device trials", full, full_s),
        "",
        f"Wall time of the ASHA sweep, Ray Train trials / one-device trials: "
        f"{train_s / asha_s:.1f}x. ASHA ran {ratio:.2f} of the full grid's trial-epochs; same "
        f"best configuration with and without early stopping: {'yes' if same else 'no'}.",
        "",
        "| configuration | ASHA: epochs run | ASHA: last val/score | no early stopping: val/score |",
        "|---|---|---|---|",
    ]
    full_by_config = {_params(t): t for t in full["trials"]}
    for trial in sorted(asha["trials"], key=_params):
        other = full_by_config[_params(trial)]
        lines.append(
            f"| {_params(trial)} | {trial['epochs_run']} | {trial['val/score']:.3f} | "
            f"{other['val/score']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--head-images", type=int, default=250)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    train_images, outcomes = run_sweeps(args)
    table = report(args, train_images, outcomes)
    record("asha", "ASHA: compute saved on an 8-trial sweep", table, print_only=args.no_record)


if __name__ == "__main__":
    main()
