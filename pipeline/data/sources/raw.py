"""What every raw source produces (`RawSplit`, `RawDataset`) and what the sources share: the
checks a dataset passes before use, source checksums and class-name files."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data import SourceFormatError

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
CLASS_NAME_KEYS = ("label_names", "class_names", "classes", "fine_label_names")


@dataclass
class RawSplit:
    """One split of a raw dataset, in source order."""

    images: np.ndarray  # uint8 (N, H, W, 3), decoded pixels
    labels: np.ndarray  # int64 (N,)
    sample_ids: np.ndarray  # str (N,), stable ids in the source ("train/00042", a filename, ...)
    coarse_labels: np.ndarray | None = None  # int64 (N,), CIFAR-100 superclasses

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray | Sequence[int]) -> RawSplit:
        idx = np.asarray(indices, dtype=np.int64)
        return RawSplit(
            images=self.images[idx],
            labels=self.labels[idx],
            sample_ids=self.sample_ids[idx],
            coarse_labels=None if self.coarse_labels is None else self.coarse_labels[idx],
        )


@dataclass
class RawDataset:
    name: str  # "cifar10" | "cifar100" | "imagefolder"
    class_names: list[str]
    train: RawSplit
    test: RawSplit
    source: str  # where it came from (a local path)
    checksum: str  # "sha256:<hex>" of the source file(s); stable across runs and machines
    coarse_class_names: list[str] | None = None
    source_format: str = ""  # "parquet" | "cifar-python" | "imagefolder"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --------------------------------------------------------------------------------------
# validation


def _first_out_of_range(values: np.ndarray, count: int) -> int | None:
    bad = np.flatnonzero((values < 0) | (values >= count))
    return int(bad[0]) if bad.size else None


def _validate_split(split: RawSplit, num_classes: int, split_name: str, where: str) -> None:
    n = len(split.labels)
    if split.images.dtype != np.uint8 or split.images.ndim != 4 or split.images.shape[-1] != 3:
        raise SourceFormatError(
            f"{where}: {split_name} images must be uint8 (N, H, W, 3), got "
            f"{split.images.dtype} {split.images.shape}"
        )
    if split.images.shape[0] != n or len(split.sample_ids) != n:
        raise SourceFormatError(
            f"{where}: {split_name} has {split.images.shape[0]} images, {n} labels and "
            f"{len(split.sample_ids)} sample ids"
        )
    row = _first_out_of_range(split.labels, num_classes)
    if row is not None:
        raise SourceFormatError(
            f"{where}: {split_name} split row {row} has label {int(split.labels[row])}, out of "
            f"range 0..{num_classes - 1} for {num_classes} classes"
        )
    if split.coarse_labels is not None and len(split.coarse_labels) != n:
        raise SourceFormatError(f"{where}: {split_name} coarse labels do not match the image count")


def build_raw_dataset(
    dataset: str,
    fmt: str,
    source: Path,
    class_names: list[str] | None,
    train: RawSplit,
    test: RawSplit,
    checksum: str,
    coarse_class_names: list[str] | None = None,
) -> RawDataset:
    """The RawDataset of a source once it passes the checks every source shares (class count,
    label ranges, array shapes, one image size); class names default to "0", "1", ..."""
    expected = NUM_CLASSES.get(dataset)
    if class_names is None:
        top = max(int(train.labels.max(initial=-1)), int(test.labels.max(initial=-1)))
        n = expected if expected is not None else top + 1
        class_names = [str(i) for i in range(n)]
    if expected is not None and len(class_names) != expected:
        raise SourceFormatError(
            f"{source}: has {len(class_names)} classes but {dataset} has {expected}; "
            f"is this the right dataset?"
        )
    if len(class_names) == 0:
        raise SourceFormatError(f"{source}: no classes found")
    for split, name in ((train, "train"), (test, "test")):
        _validate_split(split, len(class_names), name, str(source))
        if split.coarse_labels is not None and coarse_class_names is not None:
            row = _first_out_of_range(split.coarse_labels, len(coarse_class_names))
            if row is not None:
                raise SourceFormatError(
                    f"{source}: {name} split row {row} has coarse label "
                    f"{int(split.coarse_labels[row])}, out of range 0..{len(coarse_class_names) - 1}"
                )
    if train.images.shape[1:] != test.images.shape[1:] and len(train) and len(test):
        raise SourceFormatError(
            f"{source}: train images are {train.images.shape[1:3]} but test images are "
            f"{test.images.shape[1:3]}"
        )
    return RawDataset(
        name=dataset,
        class_names=list(class_names),
        train=train,
        test=test,
        source=str(source),
        checksum=checksum,
        coarse_class_names=list(coarse_class_names) if coarse_class_names else None,
        source_format=fmt,
    )


# --------------------------------------------------------------------------------------
# checksums and class-name files (shared by the folder sources)


def file_hexdigest(path: Path, algorithm: str = "sha256") -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def checksum_files(root: Path, files: Iterable[Path]) -> str:
    """sha256 of one file, or of the sorted (relative path, sha256) list of several files."""
    files = sorted(files, key=lambda p: p.relative_to(root).as_posix())
    if len(files) == 1 and files[0] == root:
        return "sha256:" + file_hexdigest(root)
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(file_hexdigest(p).encode() + b"\n")
    return "sha256:" + h.hexdigest()


def read_class_file(root: Path) -> tuple[list[str] | None, list[str] | None]:
    """(class names, coarse class names) from classes.json (a list, or an object with one of
    CLASS_NAME_KEYS and optionally "coarse_label_names") or classes.txt (one name a line)."""
    json_file, text_file = root / "classes.json", root / "classes.txt"
    if json_file.is_file():
        try:
            data = json.loads(json_file.read_text())
        except (OSError, ValueError) as exc:
            raise SourceFormatError(f"{json_file}: not valid JSON ({exc})") from None
        if isinstance(data, list):
            return [str(x) for x in data], None
        if isinstance(data, dict):
            names = next((data[k] for k in CLASS_NAME_KEYS if k in data), None)
            coarse = data.get("coarse_label_names")
            if isinstance(names, list):
                coarse_names = [str(x) for x in coarse] if isinstance(coarse, list) else None
                return [str(x) for x in names], coarse_names
        raise SourceFormatError(
            f"{json_file}: expected a list of class names or an object with 'label_names'"
        )
    if text_file.is_file():
        return [line.strip() for line in text_file.read_text().splitlines() if line.strip()], None
    return None, None
