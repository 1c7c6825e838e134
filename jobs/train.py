"""Train SHIKE as a Ray Train job, tracked in MLflow, model registered as `candidate`.

    python -m jobs.train --config configs/smoke.yaml --set data.uri=.data/cifar10-lt-if100
    ray job submit --working-dir . -- python -m jobs.train --config configs/cifar100_lt_if100.yaml \\
        --set data.uri=s3://bucket/datasets/cifar100-lt-if100 --run-name c100-if100-seed0

Relaunching with the same --run-name resumes from its latest checkpoint and continues the
same MLflow run; a launch while another of the same run name is alive is refused (exit 1,
one line naming the owner). Ctrl-C stops the run: Ray Train's workers are stopped, the MLflow
run ends KILLED, and one line says which checkpoint is kept and the command that resumes (exit
130).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from jobs._options import add_verbose_argument
from pipeline.config import add_override_argument


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description="Train SHIKE on Ray Train (local Ray, or the cluster of `ray job submit`).",
    )
    parser.add_argument(
        "--config", required=True, help="YAML preset, e.g. configs/cifar100_lt_if100.yaml"
    )
    add_override_argument(parser, "cluster.num_workers=4")
    parser.add_argument(
        "--run-name",
        default=None,
        help="Ray Train run name and MLflow run key (default: the config's name); reuse it to resume",
    )
    parser.add_argument(
        "--no-register", action="store_true", help="do not register the model in MLflow"
    )
    add_verbose_argument(parser)
    return parser


def resume_command(argv: list[str], run_name: str) -> str:
    """The command that resumes this launch: its own arguments, with the run name spelled out."""
    args = list(argv)
    if "--run-name" not in args and not any(a.startswith("--run-name=") for a in args):
        args += ["--run-name", run_name]
    return shlex.join(["python", "-m", "jobs.train", *args])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    # Validate everything that needs neither Ray nor MLflow before importing them.
    from pipeline.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from pipeline.distributed import console

    console.setup_console(args.verbose)
    from pipeline.data import DataError
    from pipeline.distributed.train import TrainingInterrupted, TrainingJobError, run_training_job
    from pipeline.storage import StorageError
    from pipeline.tracking.runs import TrackingError, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    console.say(
        f"training run '{args.run_name or cfg.name}': {cfg.model.arch}, stage-1 loss "
        f"{cfg.loss.stage1}, {cfg.optim.epochs} epochs, data {cfg.data.uri or '(data.uri not set)'}"
    )
    gpu = {"auto": " (+ 1 GPU each where the cluster has GPUs)", "true": " + 1 GPU", "false": ""}
    console.say(
        f"Ray: {console.ray_target()}, {cfg.cluster.num_workers} Train workers x "
        f"{cfg.cluster.cpus_per_worker:g} CPU{gpu[cfg.cluster.use_gpu]} | MLflow: {uri}, "
        f"experiment '{cfg.tracking.experiment}'"
    )
    resume = resume_command(argv, args.run_name or cfg.name)
    try:
        outcome = run_training_job(
            cfg, args.run_name, register=False if args.no_register else None, resume_command=resume
        )
    except TrainingInterrupted as exc:  # Ctrl-C: a stop, with the shell's status for SIGINT
        print(exc, file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C while the first one's run was being closed
        name = args.run_name or cfg.name
        print(f"training run '{name}' interrupted; resume with: {resume}", file=sys.stderr)
        return 130
    except (DataError, StorageError, TrackingError, TrainingJobError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    metrics = outcome.metrics
    print(f"run '{outcome.run_name}' finished: MLflow run {outcome.mlflow_run_id}")
    for key in ("val/acc", "test/acc", "test/acc_many", "test/acc_medium", "test/acc_few"):
        if key in metrics:
            print(f"  {key:<16} {100 * metrics[key]:.2f}%")
    print(f"  checkpoint       {outcome.checkpoint_path}")
    if outcome.model_version:
        model = f"models:/{outcome.model_name}@candidate"
        print(f"  model            {model} (version {outcome.model_version})")
    print(f"  MLflow           {uri}, experiment '{cfg.tracking.experiment}'")
    if not uri.startswith(("http://", "https://", "databricks")):
        print(f"  MLflow UI        mlflow ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
