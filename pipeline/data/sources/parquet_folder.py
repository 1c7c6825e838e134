"""Raw source (a): a Parquet folder, `train.parquet` + `test.parquet` [+ `classes.json`].

Columns `image` (PNG/JPEG bytes, or a struct with a `bytes` field) and `label`; optional
`coarse_label` and `sample_id`. Like ../shared/data/cifar10.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import SourceFormatError
from pipeline.data.codec import decode_images
from pipeline.data.sources.raw import (
    RawDataset,
    RawSplit,
    build_raw_dataset,
    checksum_files,
    read_class_file,
)


def is_parquet_folder(path: Path) -> bool:
    return (
        path.is_dir() and (path / "train.parquet").is_file() and (path / "test.parquet").is_file()
    )


def _integer_column(table: pa.Table, name: str, path: Path) -> np.ndarray:
    col = table.column(name)
    if not pa.types.is_integer(col.type):
        raise SourceFormatError(f"{path}: column '{name}' must be integers, got {col.type}")
    if col.null_count:
        raise SourceFormatError(f"{path}: column '{name}' has {col.null_count} null value(s)")
    return col.to_numpy().astype(np.int64)


def _read_split(path: Path, split: str) -> RawSplit:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise SourceFormatError(f"{path}: not a readable Parquet file ({exc})") from None
    cols = set(table.column_names)
    missing = {"image", "label"} - cols
    if missing:
        raise SourceFormatError(
            f"{path}: missing column(s) {sorted(missing)}; found {sorted(cols)} "
            f"(expected image=encoded bytes, label=int)"
        )
    image_col = table.column("image")
    if pa.types.is_struct(image_col.type):  # Hugging Face style {"bytes": ..., "path": ...}
        image_col = pa.chunked_array([c.field("bytes") for c in image_col.chunks])
    if not (pa.types.is_binary(image_col.type) or pa.types.is_large_binary(image_col.type)):
        raise SourceFormatError(
            f"{path}: column 'image' must hold encoded image bytes, got {image_col.type}"
        )
    labels = _integer_column(table, "label", path)
    coarse = _integer_column(table, "coarse_label", path) if "coarse_label" in cols else None
    if "sample_id" in cols:
        sample_ids = np.array([str(s) for s in table.column("sample_id").to_pylist()])
    else:
        sample_ids = np.array([f"{split}/{i:05d}" for i in range(len(labels))])
    images = decode_images(image_col.to_pylist(), str(path))
    return RawSplit(images=images, labels=labels, sample_ids=sample_ids, coarse_labels=coarse)


def load_parquet_folder(root: Path, dataset: str) -> RawDataset:
    names, coarse_names = read_class_file(root)
    train = _read_split(root / "train.parquet", "train")
    test = _read_split(root / "test.parquet", "test")
    files = [root / "train.parquet", root / "test.parquet"]
    files += [p for p in (root / "classes.json", root / "classes.txt") if p.is_file()]
    return build_raw_dataset(
        dataset, "parquet", root, names, train, test, checksum_files(root, files), coarse_names
    )
