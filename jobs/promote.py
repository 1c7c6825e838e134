"""Move the `champion` alias to the `candidate` when it is better on the same held-out split.

    python -m jobs.promote --model-name shike-cifar10-lt-if100 --data s3://datasets/c10-lt
    python -m jobs.promote --model-name shike-cifar10-lt-if100 --data .data/c10 --dry-run

Evaluates `models:/<name>@candidate` and `models:/<name>@champion` on --split (val by
default); promotes when there is no champion yet or the candidate's top-1 accuracy is at least
the champion's + --margin. The decision and both scores are recorded as `promotion.*` tags on
both versions; --dry-run changes nothing in the registry.

Exit status: 0 when a decision was made (promote, keep, already-champion, first promotion);
1 with one `error: ...` line on stderr (no candidate alias, unknown model, class mismatch,
missing dataset, unreachable tracking server); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import math
import sys

from jobs._options import add_inference_options, add_verbose_argument, apply_threads


def _margin(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0 or value >= 1:
        raise argparse.ArgumentTypeError(
            f"must be in [0, 1) (a fraction: 0.002 = 0.2%), got {text}"
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.promote",
        description="Promote the candidate model to champion when it beats the champion.",
    )
    p.add_argument(
        "--model-name", required=True, help="registered model, e.g. shike-cifar10-lt-if100"
    )
    p.add_argument("--data", required=True, help="prepared dataset: folder, file:// or s3:// URI")
    p.add_argument(
        "--split", choices=("val", "test"), default="val",
        help="held-out split both models are scored on (default: val; test is allowed, with a warning)",
    )  # fmt: skip
    p.add_argument(
        "--margin", type=_margin, default=0.002,
        help="top-1 accuracy the candidate must gain over the champion (default: 0.002 = 0.2%%)",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="decide and print; change nothing")
    add_inference_options(p)
    add_verbose_argument(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_threads(args)
    from pipeline.distributed import console

    console.setup_console(args.verbose)

    import warnings

    from pipeline.data import DataError
    from pipeline.evaluation.promotion import format_decision, promote, split_warning
    from pipeline.evaluation.scoring import EvaluationError
    from pipeline.storage import StorageError
    from pipeline.tracking.store import TrackingError, resolve_tracking_uri
    from pipeline.tracking.versions import RegistryError

    warning = split_warning(args.split)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="promoting on the test split")
            decision = promote(
                args.model_name,
                args.data,
                split=args.split,
                margin=args.margin,
                dry_run=args.dry_run,
                tracking_uri=resolve_tracking_uri(args.tracking_uri),
                batch_size=args.batch_size,
                workers=args.workers,
                log=lambda msg: print(msg, file=sys.stderr),
            )
    except (DataError, StorageError, EvaluationError, RegistryError, TrackingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_decision(decision))
    return 0


if __name__ == "__main__":
    sys.exit(main())
