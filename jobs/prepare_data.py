"""Raw dataset -> long-tailed Parquet shards + manifest.json in object storage (or a folder).

    python -m jobs.prepare_data --dataset cifar10 --source ../shared/data/cifar10 \\
        --imbalance-factor 100 --output s3://datasets/cifar10-lt-if100 --endpoint-url http://127.0.0.1:9000
    python -m jobs.prepare_data --dataset imagenet_lt --source /data/imagenet \\
        --output s3://datasets/imagenet-lt [--shard-mb 256] [--max-side N] [--workers N]

CIFAR-style datasets (cifar10, cifar100, imagefolder) are decoded, cut to a long tail and
re-encoded (pipeline.data.prepare.from_raw, `prepare_dataset`). The large benchmarks (imagenet_lt,
inat2018, places_lt) bring their own long-tailed lists in --source, and their shards keep each
image's own bytes (pipeline.data.prepare.from_lists, `prepare_benchmark`); the options of one kind
given with the other kind are refused. Also runs as `python jobs/prepare_data.py ...` (the
package is installed); this file only parses arguments. Exit status: 0 on success, 1 with one
`error: ...` line on stderr for data/storage problems, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from jobs._options import non_negative_int, positive_int

if TYPE_CHECKING:
    from pipeline.data.manifest import Manifest
    from pipeline.storage import S3Options

CIFAR_STYLE = ("cifar10", "cifar100", "imagefolder")
LARGE_BENCHMARKS = ("imagenet_lt", "inat2018", "places_lt")
CIFAR_ONLY = ("imbalance_factor", "n_max", "selection", "selection_seed", "val_per_class",
              "test_per_class")  # fmt: skip
LARGE_ONLY = ("max_side", "workers")


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


def _add_source_options(p: argparse.ArgumentParser) -> None:
    """What to read and where to write: the options every dataset kind takes."""
    p.add_argument(
        "--dataset",
        choices=[*CIFAR_STYLE, *LARGE_BENCHMARKS],
        required=True,
        help="raw dataset kind",
    )
    p.add_argument(
        "--source",
        default=None,
        help="Parquet folder (train/test.parquet), cifar-*-python.tar.gz or its extracted "
        "folder, or an image folder; default: $CIFAR10_DIR / $CIFAR100_DIR, else the "
        "official archive is downloaded. Large benchmarks (required): the folder holding "
        "ImageNet_LT_*.txt, Places_LT_*.txt, or train2018.json + val2018.json (else "
        "iNaturalist18_*.txt) beside the images",
    )
    p.add_argument(
        "--output",
        required=True,
        help="where to write: s3://bucket/prefix, file:///abs/path or a local folder",
    )
    p.add_argument(
        "--shard-mb",
        type=_positive_float,
        default=64.0,
        help="target shard size in MB (large benchmarks: 256 unless given)",
    )


def _add_longtail_options(p: argparse.ArgumentParser) -> None:
    """How a CIFAR-style dataset is cut into its long-tailed train, val and test splits."""
    cifar = p.add_argument_group("CIFAR-style datasets only (cifar10, cifar100, imagefolder)")
    cifar.add_argument(
        "--imbalance-factor",
        type=_factor,
        default=100.0,
        help="largest / smallest class size of the train split",
    )
    cifar.add_argument(
        "--n-max",
        type=positive_int,
        default=None,
        help="images of the head class; default: the smallest per-class count of the source",
    )
    cifar.add_argument(
        "--selection",
        choices=["first", "shuffle"],
        default="first",
        help="first n_i images per class in source order (SHIKE), or LDAM-style seeded shuffle",
    )
    cifar.add_argument("--selection-seed", type=int, default=0, help="seed of the 'shuffle' rule")
    cifar.add_argument(
        "--val-per-class",
        type=non_negative_int,
        default=20,
        help="balanced val images per class, from training images the train split does not use",
    )
    cifar.add_argument(
        "--test-per-class",
        type=positive_int,
        default=None,
        help="cap on test images per class (smoke runs); default: the whole official test set",
    )


def _add_benchmark_shard_options(p: argparse.ArgumentParser) -> None:
    """How the large benchmarks' shards are built from the images their lists name."""
    large = p.add_argument_group("large benchmarks only (imagenet_lt, inat2018, places_lt)")
    large.add_argument(
        "--max-side",
        type=positive_int,
        default=None,
        help="shrink images whose longer side exceeds this many pixels (re-encoded as JPEG, "
        "quality 90); default: every image keeps its own bytes",
    )
    large.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        help="shards built and written at a time (each holds about 3 x --shard-mb of memory); "
        "default: min(4, CPU count)",
    )


def _add_storage_options(p: argparse.ArgumentParser) -> None:
    """How to reach S3, and whether to print progress."""
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


def build_parser() -> argparse.ArgumentParser:
    # The groups are added in this order because argparse lists options in the order they are
    # added: usage and --help read source, long-tail, benchmark, then storage options.
    p = argparse.ArgumentParser(
        prog="prepare_data",
        description=(
            "CIFAR-style datasets: build the long-tailed train split (n_i = int(n_max * "
            "IF^(-i/(C-1)))), a balanced val split from the training images it leaves unused, "
            "and the official test split. ImageNet-LT, iNaturalist 2018, Places-LT: take the "
            "splits of the community's list files in --source, keeping each image's own bytes. "
            "Either way, write them as Parquet shards with manifest.json (published last)."
        ),
        formatter_class=_HelpFormatter,
    )
    _add_source_options(p)
    _add_longtail_options(p)
    _add_benchmark_shard_options(p)
    _add_storage_options(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, with the options of the other dataset kind refused when given."""
    parser = build_parser()
    watched = (*CIFAR_ONLY, *LARGE_ONLY, "shard_mb")
    unset = object()  # argparse leaves an attribute alone unless its option is given
    args = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(watched, unset)))
    given = {dest for dest in watched if getattr(args, dest) is not unset}
    large = args.dataset in LARGE_BENCHMARKS
    misplaced = [d for d in (CIFAR_ONLY if large else LARGE_ONLY) if d in given]
    if misplaced:
        options = ", ".join("--" + d.replace("_", "-") for d in misplaced)
        kinds = LARGE_BENCHMARKS if not large else CIFAR_STYLE
        parser.error(f"{options}: only for --dataset {' / '.join(kinds)}, not {args.dataset}")
    if large and args.source is None:
        parser.error(f"--source is required for --dataset {args.dataset} (the list files' folder)")
    for dest in set(watched) - given:
        setattr(args, dest, None if large and dest == "shard_mb" else parser.get_default(dest))
    return args


def _prepare(args: argparse.Namespace, s3: S3Options, log: Callable[[str], None]) -> Manifest:
    """The prepare function of the dataset's kind, called with the arguments that apply."""
    if args.dataset in LARGE_BENCHMARKS:
        from pipeline.data.prepare.from_lists import (
            DEFAULT_SHARD_MB,
            DEFAULT_WORKERS,
            prepare_benchmark,
        )

        return prepare_benchmark(
            args.dataset,
            args.source,
            args.output,
            shard_mb=args.shard_mb or DEFAULT_SHARD_MB,
            max_side=args.max_side,
            workers=args.workers or DEFAULT_WORKERS,
            s3=s3,
            log=log,
        )
    from pipeline.data.prepare.from_raw import prepare_dataset

    return prepare_dataset(
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Imported after parsing so that --help and argument errors answer without loading the
    # data stack (pyarrow, Pillow, numpy).
    from pipeline.data import DataError
    from pipeline.storage import S3Options, StorageError, scrub

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
        m = _prepare(args, s3, log)
    except (DataError, StorageError) as exc:
        print(f"error: {scrub(str(exc))}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. permission denied on a local output folder
        print(f"error: {scrub(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was published", file=sys.stderr)
        return 130
    counts = {name: s.num_rows for name, s in m.splits.items()}
    aliases = {alias: f" (= {target})" for alias, target in (m.split_aliases or {}).items()}
    g = m.class_groups
    log(
        f"done: {m.dataset} IF {m.imbalance_factor:g} -> {args.output} | train {counts['train']:,}, "
        f"val {counts['val']:,}, test {counts['test']:,}{aliases.get('test', '')} | "
        f"many/medium/few classes {len(g['many'])}/{len(g['medium'])}/{len(g['few'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
