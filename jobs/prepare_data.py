"""Raw dataset -> long-tailed Parquet shards + manifest.json in object storage (or a folder).

    python -m jobs.prepare_data --dataset cifar10 --source ../shared/data/cifar10 \\
        --imbalance-factor 100 --output s3://datasets/cifar10-lt-if100 --endpoint-url http://127.0.0.1:9000

Also runs as `python jobs/prepare_data.py ...` (the package is installed). The logic lives in
pipeline.data.prepare (`prepare_dataset`); this file only parses arguments. Exit status: 0 on
success, 1 with one `error: ...` line on stderr for data/storage problems, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys

from jobs._options import non_negative_int, positive_int


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _factor(text: str) -> float:
    value = _positive_float(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" unless the help already explains the default or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.required
            or any(action.default is v for v in (None, False, argparse.SUPPRESS))
        ):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prepare_data",
        description=(
            "Build the long-tailed train split (n_i = int(n_max * IF^(-i/(C-1)))), a balanced val "
            "split from the training images it leaves unused, and the official test split; write "
            "them as Parquet shards with manifest.json (published last)."
        ),
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--dataset",
        choices=["cifar10", "cifar100", "imagefolder"],
        required=True,
        help="raw dataset kind",
    )
    p.add_argument(
        "--source",
        default=None,
        help="Parquet folder (train/test.parquet), cifar-*-python.tar.gz or its extracted "
        "folder, or an image folder; default: $CIFAR10_DIR / $CIFAR100_DIR, else the "
        "official archive is downloaded",
    )
    p.add_argument(
        "--output",
        required=True,
        help="where to write: s3://bucket/prefix, file:///abs/path or a local folder",
    )
    p.add_argument(
        "--imbalance-factor",
        type=_factor,
        default=100.0,
        help="largest / smallest class size of the train split",
    )
    p.add_argument(
        "--n-max",
        type=positive_int,
        default=None,
        help="images of the head class; default: the smallest per-class count of the source",
    )
    p.add_argument(
        "--selection",
        choices=["first", "shuffle"],
        default="first",
        help="first n_i images per class in source order (SHIKE), or LDAM-style seeded shuffle",
    )
    p.add_argument("--selection-seed", type=int, default=0, help="seed of the 'shuffle' rule")
    p.add_argument(
        "--val-per-class",
        type=non_negative_int,
        default=20,
        help="balanced val images per class, from training images the train split does not use",
    )
    p.add_argument(
        "--test-per-class",
        type=positive_int,
        default=None,
        help="cap on test images per class (smoke runs); default: the whole official test set",
    )
    p.add_argument("--shard-mb", type=_positive_float, default=64.0, help="target shard size in MB")
    p.add_argument(
        "--endpoint-url",
        default=None,
        help="S3 endpoint (MinIO etc.); default: $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL / AWS",
    )
    p.add_argument(
        "--region", default=None, help="S3 region; default: $AWS_REGION / $AWS_DEFAULT_REGION"
    )
    p.add_argument(
        "--virtual-addressing",
        action="store_true",
        help="virtual-hosted S3 addressing (default: path-style)",
    )
    p.add_argument(
        "--connect-timeout", type=_positive_float, default=5.0, help="S3 connect timeout, seconds"
    )
    p.add_argument(
        "--request-timeout", type=_positive_float, default=30.0, help="S3 request timeout, seconds"
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported after parsing so that --help and argument errors answer without loading the
    # data stack (pyarrow, and torch through pipeline.data.longtail).
    from pipeline.data import DataError
    from pipeline.data.prepare import prepare_dataset
    from pipeline.data.storage import S3Options, scrub

    def log(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    s3 = S3Options(
        endpoint_url=args.endpoint_url,
        region=args.region,
        virtual_addressing=args.virtual_addressing,
        connect_timeout_s=args.connect_timeout,
        request_timeout_s=args.request_timeout,
    )
    try:
        m = prepare_dataset(
            args.dataset,
            args.source,
            args.output,
            args.imbalance_factor,
            n_max=args.n_max,
            selection=args.selection,
            selection_seed=args.selection_seed,
            val_per_class=args.val_per_class,
            test_per_class=args.test_per_class,
            shard_mb=args.shard_mb,
            s3=s3,
            log=log,
        )
    except DataError as exc:
        print(f"error: {scrub(str(exc))}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. permission denied on a local output folder
        print(f"error: {scrub(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was published", file=sys.stderr)
        return 130
    counts = {name: s.num_rows for name, s in m.splits.items()}
    g = m.class_groups
    log(
        f"done: {m.dataset} IF {m.imbalance_factor:g} -> {args.output} | train {counts['train']:,}, "
        f"val {counts['val']:,}, test {counts['test']:,} | many/medium/few classes "
        f"{len(g['many'])}/{len(g['medium'])}/{len(g['few'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
