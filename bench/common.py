"""What every benchmark starts with: the real CIFAR-10 copy and scratch folders that go away."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path


def cifar10_source() -> str:
    """The CIFAR-10 Parquet folder ($CIFAR10_DIR), or exit saying how to name it."""
    source = os.environ.get("CIFAR10_DIR")
    if not source:
        sys.exit("set CIFAR10_DIR to the CIFAR-10 Parquet folder (../shared/data/cifar10)")
    return source


def scratch_dir(prefix: str) -> Path:
    """A fresh temporary folder, removed when the process exits (sys.exit included)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    return work


def ray_temp_dir(tag: str) -> Path:
    """A Ray temp dir with a short path (Ray's socket paths are capped at 107 bytes), removed at
    exit."""
    path = Path(f"/tmp/{tag}{os.getpid() % 100000}")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def prepare_cifar10_lt(output: str, head_images: int, held_out_per_class: int, **kwargs):
    """A small CIFAR-10-LT (imbalance factor 100, `head_images` in the head class) prepared from
    $CIFAR10_DIR into `output`, `held_out_per_class` val and test images a class; its Manifest."""
    from pipeline.data.prepare.from_raw import prepare_dataset

    return prepare_dataset(
        "cifar10", cifar10_source(), output, 100.0, n_max=head_images,
        val_per_class=held_out_per_class, test_per_class=held_out_per_class, **kwargs,
    )  # fmt: skip
