"""Raw datasets -> decoded pixels in source order (`RawDataset`): finding and reading a source.

    raw = load_raw_dataset("cifar10", "/work/shared/data/cifar10")
    raw.train.images    # uint8 (50000, 32, 32, 3), row order of train.parquet
    raw.train.labels    # int64 (50000,)

Formats, detected by content (not by name), each read by its own module:
(a) a Parquet folder (`parquet_folder`): `train.parquet` + `test.parquet` [+ `classes.json`];
(b) the official python archives (`cifar_archives`): `cifar-100-python.tar.gz` /
    `cifar-10-python.tar.gz`, their extracted folders, or a folder holding either;
(c) an image folder (`image_folder`): `root/<split>/<class>/*.png|jpg|...`, or list files
    `root/<split>.txt` of `relative/path label` lines.

source None: $CIFAR10_DIR / $CIFAR100_DIR, else the official archive is downloaded (md5
verified) into $SHIKE_DATA_CACHE (default ~/.cache/shike). The image folder needs a source.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.data import SourceFormatError
from pipeline.data.codec import decode_images
from pipeline.data.sources.cifar_archives import (
    ENV_VARS,
    cifar_kind,
    download_archive,
    load_cifar_folder,
    load_cifar_tar,
    tar_kind,
)
from pipeline.data.sources.image_folder import is_image_folder, load_image_folder
from pipeline.data.sources.parquet_folder import is_parquet_folder, load_parquet_folder
from pipeline.data.sources.raw import RawDataset, RawSplit

DATASETS = ("cifar10", "cifar100", "imagefolder")
ACCEPTED_FORMATS = (
    "a Parquet folder with train.parquet and test.parquet (columns image, label); "
    "cifar-10-python.tar.gz / cifar-100-python.tar.gz or their extracted folders "
    "(cifar-10-batches-py/, cifar-100-python/); "
    "an image folder root/train/<class>/*.png|jpg and root/test/<class>/... "
    "(or root/train.txt, root/test.txt list files of 'path label' lines)"
)


def resolve_source(dataset: str, source: str | os.PathLike | None) -> Path:
    """The local path to read: `source`, else $CIFAR10_DIR / $CIFAR100_DIR, else a download."""
    if dataset not in DATASETS:
        raise SourceFormatError(
            f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}"
        )
    if source is not None and str(source) != "":
        s = str(source)
        if s.startswith("file://"):
            s = s[len("file://") :]
        elif "://" in s:
            raise SourceFormatError(
                f"source {source}: only local paths are read (download it first)"
            )
        return Path(s).expanduser()
    if dataset == "imagefolder":
        raise SourceFormatError("the imagefolder dataset needs a source: pass --source <folder>")
    env = os.environ.get(ENV_VARS[dataset])
    if env:
        return Path(env).expanduser()
    return download_archive(dataset)


def detect_format(path: Path) -> tuple[str, Path]:
    """(format, path to read) for a source path; SourceFormatError naming it when unknown."""
    if not path.exists():
        raise SourceFormatError(f"source {path} does not exist")
    if path.is_file():
        if tar_kind(path):
            return "cifar-tar", path
        raise SourceFormatError(f"source {path}: unknown format; accepted: {ACCEPTED_FORMATS}")
    if is_parquet_folder(path):
        return "parquet", path
    names = {p.name for p in path.iterdir()}
    if cifar_kind(n for n in names if (path / n).is_file()):
        return "cifar-dir", path
    for sub in ("cifar-100-python", "cifar-10-batches-py"):
        if (
            sub in names
            and (path / sub).is_dir()
            and cifar_kind(p.name for p in (path / sub).iterdir())
        ):
            return "cifar-dir", path / sub
    for arch in ("cifar-100-python.tar.gz", "cifar-10-python.tar.gz"):
        if arch in names and (path / arch).is_file() and tar_kind(path / arch):
            return "cifar-tar", path / arch
    if is_image_folder(path):
        return "imagefolder", path
    raise SourceFormatError(f"source {path}: unknown format; accepted: {ACCEPTED_FORMATS}")


LOADERS = {
    "parquet": load_parquet_folder,
    "cifar-tar": load_cifar_tar,
    "cifar-dir": load_cifar_folder,
    "imagefolder": load_image_folder,
}


def load_raw_dataset(dataset: str, source: str | os.PathLike | None = None) -> RawDataset:
    """Read a raw dataset (train + official test split) as decoded uint8 pixels in source order.

    dataset: "cifar10" (10 classes), "cifar100" (100 classes) or "imagefolder" (any class
    count). Raises SourceFormatError (a DataError) with one line naming the path for unknown
    formats, unreadable files, wrong class counts and out-of-range labels (split, row, value).
    """
    fmt, target = detect_format(resolve_source(dataset, source))
    return LOADERS[fmt](target, dataset)


__all__ = [
    # re-exported: the raw dataset model and the decoder, imported from here elsewhere
    "RawDataset",
    "RawSplit",
    "decode_images",
    # this module
    "DATASETS",
    "detect_format",
    "load_raw_dataset",
    "resolve_source",
]
