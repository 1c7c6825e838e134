"""Raw source (c): an image folder.

`root/<split>/<class>/*.png|jpg|jpeg|bmp|webp` (class names = sorted folder names of train/),
or with a list file `root/<split>.txt` of `relative/path label` lines (class names from
`classes.json`/`classes.txt` when present). All images of a dataset must share one size.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.data import SourceFormatError
from pipeline.data.codec import decode_images
from pipeline.data.sources.raw import (
    RawDataset,
    RawSplit,
    build_raw_dataset,
    checksum_files,
    read_class_file,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _natural_key(s: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def is_image_folder(root: Path) -> bool:
    if not root.is_dir():
        return False
    if (root / "train.txt").is_file() and (root / "test.txt").is_file():
        return True
    return (
        (root / "train").is_dir()
        and (root / "test").is_dir()
        and any(d.is_dir() for d in (root / "train").iterdir())
    )


def _listed_images(list_file: Path, root: Path) -> tuple[list[Path], list[int], list[str]]:
    """(paths, labels, sample ids) of a `<split>.txt` list file, in its order."""
    paths, labels, ids = [], [], []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
            raise SourceFormatError(
                f"{list_file}: line {n} must be 'relative/path label', got {line!r}"
            )
        rel = parts[0].strip()
        path = root / rel
        if not path.is_file():
            raise SourceFormatError(f"{list_file}: line {n}: image {path} does not exist")
        paths.append(path)
        labels.append(int(parts[1]))
        ids.append(rel)
    return paths, labels, ids


def _class_folder_images(
    root: Path, split: str, class_names: Sequence[str]
) -> tuple[list[Path], list[int], list[str]]:
    """(paths, labels, sample ids) of `root/<split>/<class>/*`, class by class, files in
    natural order (2.png before 10.png)."""
    base = root / split
    if not base.is_dir():
        raise SourceFormatError(f"{root}: no {split}/ folder and no {split}.txt list file")
    known = set(class_names)
    extra = sorted(d.name for d in base.iterdir() if d.is_dir() and d.name not in known)
    if extra:
        raise SourceFormatError(f"{base}: class folder(s) {extra[:5]} are not classes of train/")
    paths, labels, ids = [], [], []
    for c, name in enumerate(class_names):
        folder = base / name
        if not folder.is_dir():
            continue
        files = sorted(
            (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda p: _natural_key(p.name),
        )
        paths += files
        labels += [c] * len(files)
        ids += [f"{split}/{name}/{p.name}" for p in files]
    return paths, labels, ids


def _decode_files(paths: Sequence[Path], what: str) -> np.ndarray:
    blobs = []
    for p in paths:
        try:
            blobs.append(p.read_bytes())
        except OSError as exc:
            raise SourceFormatError(f"{what}: cannot read {p}: {exc.strerror or exc}") from None
    return decode_images(blobs, what, row_names=[str(p) for p in paths])


def load_image_folder(root: Path, dataset: str) -> RawDataset:
    names, _ = read_class_file(root)
    uses_lists = (root / "train.txt").is_file()
    if names is None and not uses_lists:
        names = sorted((d.name for d in (root / "train").iterdir() if d.is_dir()), key=_natural_key)
    splits = {}
    all_files: list[Path] = []
    for split in ("train", "test"):
        list_file = root / f"{split}.txt"
        if list_file.is_file():
            paths, labels, ids = _listed_images(list_file, root)
        else:
            assert names is not None
            paths, labels, ids = _class_folder_images(root, split, names)
        if not paths:
            raise SourceFormatError(
                f"{root}: the {split} split has no image ({', '.join(IMAGE_SUFFIXES)})"
            )
        images = _decode_files(paths, f"{root} ({split})")
        splits[split] = RawSplit(
            images=images, labels=np.asarray(labels, np.int64), sample_ids=np.array(ids)
        )
        all_files += paths
    metadata = ("train.txt", "test.txt", "classes.json", "classes.txt")
    list_files = [root / f for f in metadata if (root / f).is_file()]
    checksum = checksum_files(root, sorted(set(all_files + list_files)))
    return build_raw_dataset(
        dataset, "imagefolder", root, names, splits["train"], splits["test"], checksum
    )
