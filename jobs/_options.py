"""Command-line value parsers and the options shared by the inference jobs."""

from __future__ import annotations

import argparse


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def add_verbose_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verbose", action="store_true",
        help="also show Ray's and MLflow's own INFO logging (Ray Train's reports, Ray Data's "
        "execution plans, ...); by default they show warnings and errors only",
    )  # fmt: skip


def add_inference_options(p: argparse.ArgumentParser) -> None:
    """--workers, --batch-size, --threads and --tracking-uri."""
    p.add_argument(
        "--workers", type=positive_int, default=1,
        help="Ray Data inference actors (default 1: in this process, no Ray)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=positive_int, default=256, help="default: 256")
    p.add_argument(
        "--threads", type=positive_int, default=None,
        help="torch intra-op threads in this process (default: torch's choice)",
    )  # fmt: skip
    p.add_argument(
        "--tracking-uri", default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )  # fmt: skip


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
