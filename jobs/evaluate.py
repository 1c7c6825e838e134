"""Evaluate a registered model on a split of a prepared dataset; log it to MLflow.

    python -m jobs.evaluate --model models:/shike-cifar10-lt-if100@candidate \\
        --data s3://datasets/cifar10-lt-if100 --split val --output per_class.csv
    python -m jobs.evaluate --model models:/shike-cifar10-lt-if100/3 --data .data/c10 --split test
    python -m jobs.evaluate --model runs:/<run_id>/model --data .data/c10 --workers 4 --no-log

Prints overall / many / medium / few accuracy and ECE. Unless --no-log, the evaluation is an
MLflow run in experiment `shike-evaluations` (one run per model version, split and dataset)
and the model version gets the tag `eval_<split>_acc`. --workers N > 1 runs the batches on
N Ray Data actors (the local Ray instance, or the cluster of `ray job submit`).

Exit status: 0 on success; 1 with one `error: ...` line on stderr (unknown model / alias /
version, data of another dataset than the model's, class mismatch, missing dataset, a manifest
edited after publication or contradicted by its shards' labels, unreachable tracking server);
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs._options import add_inference_options, add_verbose_argument, apply_threads


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.evaluate",
        description="Evaluate a registered SHIKE model on a split of a prepared dataset.",
    )
    p.add_argument(
        "--model", required=True,
        help="models:/<name>@<alias>, models:/<name>/<version> or runs:/<run_id>/<path>",
    )  # fmt: skip
    p.add_argument("--data", required=True, help="prepared dataset: folder, file:// or s3:// URI")
    p.add_argument("--split", choices=("val", "test"), default="val", help="default: val")
    p.add_argument("--output", default=None, metavar="CSV", help="write the per-class table here")
    p.add_argument("--no-log", action="store_true", help="do not log an MLflow evaluation run")
    add_inference_options(p)
    add_verbose_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_threads(args)
    from pipeline.distributed import console

    console.setup_console(args.verbose)

    from pipeline.data import DataError
    from pipeline.evaluation.evaluate import evaluate_model, log_evaluation_run
    from pipeline.evaluation.reports import format_table, per_class_csv
    from pipeline.evaluation.scoring import EvaluationError
    from pipeline.storage import StorageError
    from pipeline.tracking.store import TrackingError, resolve_tracking_uri
    from pipeline.tracking.versions import RegistryError

    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        report = evaluate_model(
            args.model,
            args.data,
            args.split,
            tracking_uri=uri,
            batch_size=args.batch_size,
            workers=args.workers,
        )
        print(format_table(report))
        if args.output:
            out = Path(args.output)
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(per_class_csv(report.rows))
            except OSError as exc:
                raise EvaluationError(f"cannot write {out}: {exc.strerror or exc}") from None
            print(f"per-class table: {out}")
        if not args.no_log:
            run_id = log_evaluation_run(report, uri)
            print(f"MLflow run: {run_id}")
    except (DataError, StorageError, EvaluationError, RegistryError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
