"""Small "source" datasets for the streaming readers' tests and benchmark: generated JPEGs of
varying sizes and aspect ratios (a few grayscale and CMYK JPEGs and a PNG among them), stored
as their encoded bytes in Parquet shards with a manifest (`image.encoding` "source"), published
the way the data contract says: shards first, `manifest.json` last.

The readers under test only see the shards and the manifest; the real list formats
(ImageNet-LT, iNaturalist, Places-LT) are another helper's concern.
"""

from __future__ import annotations

import hashlib
import io
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.data.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    TRAIN_ROW_ORDER,
    Column,
    ImageInfo,
    Manifest,
    ShardInfo,
    SizeStats,
    SplitInfo,
    shard_schema,
)
from pipeline.data.prepare.publish import parquet_options


def source_image(
    rng: np.random.Generator, side_range: tuple[int, int], label: int, mixed_formats: bool = True
) -> bytes:
    """One encoded image of a random size (each side drawn from `side_range`): a smooth random
    pattern tinted by the label, plus pixel noise that gives photo-like JPEG sizes (about 95 kB
    at 500x375, ImageNet's average is about 110 kB). An RGB JPEG, or with `mixed_formats`
    sometimes a grayscale or CMYK JPEG or a PNG."""
    height, width = (int(rng.integers(side_range[0], side_range[1] + 1)) for _ in range(2))
    coarse = rng.integers(0, 256, size=(height // 16 + 2, width // 16 + 2, 3), dtype=np.uint8)
    coarse[..., label % 3] = coarse[..., label % 3] // 2 + (40 * label) % 128
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))
    noisy = np.clip(smooth + rng.normal(0, 16, smooth.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(noisy)
    kinds = ["jpeg"] * 5 + ["gray", "cmyk", "png"] if mixed_formats else ["jpeg"]
    kind = str(rng.choice(kinds))
    out = io.BytesIO()
    if kind == "png":
        image.save(out, format="PNG")
    else:
        image.convert({"gray": "L", "cmyk": "CMYK"}.get(kind, "RGB")).save(
            out, format="JPEG", quality=90
        )
    return out.getvalue()


def _write_shard(root: Path, split: str, index: int, table: pa.Table) -> ShardInfo:
    buffer = io.BytesIO()
    # The settings jobs.prepare_data writes shards with (no dictionary of the image bytes):
    # the readers and bench.decode_speed then parse what they parse in production.
    pq.write_table(table, buffer, **parquet_options(table.schema))
    data = buffer.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    path = f"{split}/part-{index:05d}-{sha[:16]}.parquet"
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / path).write_bytes(data)
    return ShardInfo(path=path, num_rows=table.num_rows, bytes=len(data), sha256=sha)


def write_source_dataset(
    root: Path,
    splits: dict[str, Sequence[int]],
    *,
    rows_per_shard: int = 8,
    side_range: tuple[int, int] = (24, 72),
    seed: int = 0,
    train_row_order: str = TRAIN_ROW_ORDER,
    mixed_formats: bool = True,
) -> tuple[str, dict[str, list[bytes]]]:
    """Write a dataset whose split `name` has `splits[name][c]` images of class c; returns its
    URI (the folder) and each split's encoded images by row in stored order. Training rows are
    stored in a seeded random order (what a streaming reader needs); the others class by class.
    Sample ids are `<split>/c<class>/<n>.jpg`."""
    rng = np.random.default_rng(seed)
    num_classes = len(splits["train"])
    infos, encoded, heights, widths = {}, {}, [], []
    for split, counts in splits.items():
        labels = np.repeat(np.arange(num_classes), counts)
        ids = [
            f"{split}/c{label}/{n}.jpg"
            for label in range(num_classes)
            for n in range(counts[label])
        ]
        order = rng.permutation(len(labels)) if split == "train" else np.arange(len(labels))
        labels, ids = labels[order], [ids[i] for i in order]
        blobs = [source_image(rng, side_range, int(label), mixed_formats) for label in labels]
        for blob in blobs if split == "train" else []:
            with Image.open(io.BytesIO(blob)) as image:
                widths.append(image.width)
                heights.append(image.height)
        shards = []
        for index, start in enumerate(range(0, len(labels), rows_per_shard)):
            rows = slice(start, start + rows_per_shard)
            table = pa.table(
                {
                    "image": blobs[rows],
                    "label": labels[rows].astype(np.int64),
                    "sample_id": ids[rows],
                },
                schema=shard_schema(False),
            )
            shards.append(_write_shard(root, split, index, table))
        infos[split] = SplitInfo(num_rows=len(labels), class_counts=list(counts), shards=shards)
        encoded[split] = blobs

    def stats(values: list[int]) -> SizeStats:
        return SizeStats(min=min(values), median=int(statistics.median(values)), max=max(values))

    train_counts = list(splits["train"])
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        dataset="generated_lt",
        source={"path": "generated", "format": "generated", "checksum": f"seed:{seed}"},
        imbalance_factor=max(train_counts) / max(min(train_counts), 1),
        n_max=max(train_counts),
        num_classes=num_classes,
        class_names=[f"class{c}" for c in range(num_classes)],
        class_counts=train_counts,
        train_row_order=train_row_order,
        class_groups={"many": [], "medium": [], "few": list(range(num_classes))},
        image=ImageInfo(
            height=None,
            width=None,
            encoding="source",
            sizes={"height": stats(heights), "width": stats(widths)},
        ),
        columns=[Column(name=f.name, type=str(f.type)) for f in shard_schema(False)],
        splits=infos,
    )
    (root / MANIFEST_NAME).write_bytes(manifest.to_json())  # published last
    return str(root), encoded
