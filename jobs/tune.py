"""A Ray Tune sweep of SHIKE hyperparameters (ASHA; optional Optuna), tracked in MLflow.

    python -m jobs.tune --config configs/sweep_cifar10.yaml [--name NAME] [--set key=value ...]

One MLflow parent run per sweep, a child run per trial; the best trial's model is registered
as `candidate`. Relaunching with the same --name resumes an interrupted sweep.
"""

from __future__ import annotations

import argparse
import sys

from jobs._options import add_verbose_argument
from pipeline.config import add_override_argument


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.tune", description="Sweep SHIKE hyperparameters with Ray Tune."
    )
    parser.add_argument(
        "--config", required=True, help="sweep YAML, e.g. configs/sweep_cifar10.yaml"
    )
    parser.add_argument(
        "--name", default=None, help="sweep name (default: the file's name); reuse it to resume"
    )
    add_override_argument(parser, "data.uri=s3://bucket/datasets/x")
    parser.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="trials to run (default: the file's num_samples)",
    )
    parser.add_argument(
        "--no-register", action="store_true", help="do not register the best trial's model"
    )
    add_verbose_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.distributed.tune import SweepError, load_sweep

    try:
        spec, base = load_sweep(args.config, args.overrides)
        if args.num_samples is not None:
            spec.num_samples = args.num_samples
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from pipeline.distributed import console

    console.setup_console(args.verbose)
    from pipeline.data import DataError
    from pipeline.distributed.tune import SweepInterrupted, run_sweep
    from pipeline.storage import StorageError
    from pipeline.tracking.runs import TrackingError, resolve_tracking_uri

    uri = resolve_tracking_uri(base.tracking.tracking_uri)
    console.say(
        f"sweep '{args.name or spec.name}': {spec.expected_trials()} trials of {base.model.arch}, "
        f"up to {base.optim.epochs} epochs each ({spec.scheduler.type}), {spec.metric} "
        f"({spec.mode}), data {base.data.uri or '(data.uri not set)'}"
    )
    console.say(
        f"Ray: {console.ray_target()}, {base.cluster.num_workers} Train worker(s) per trial | "
        f"MLflow: {uri}, experiment '{base.tracking.experiment}'"
    )
    try:
        summary = run_sweep(spec, base, args.name, register=not args.no_register)
    except SweepInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    except (SweepError, DataError, StorageError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    metric = spec.metric
    print(
        f"sweep '{summary['name']}': {len(summary['trials'])} trials, "
        f"{summary['trial_epochs_run']}/{summary['trial_epochs_full']} trial-epochs run"
    )
    for row in summary["trials"]:
        params = " ".join(f"{k}={row[k]}" for k in spec.space)
        flag = (
            "stopped early" if row["stopped_early"] else ("error" if row["error"] else "completed")
        )
        print(
            f"  {row['trial_id']}: {params} | {metric} {row[metric]:.4f} | {row['epochs_run']} epochs, {flag}"
        )
    print(f"best: {summary['best']['trial_id']} ({metric} {summary['best'][metric]:.4f})")
    if "model_version" in summary:
        print(f"registered as candidate: version {summary['model_version']}")
    print(
        f"MLflow: {uri}, experiment '{base.tracking.experiment}', parent run {summary['parent_run_id']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
