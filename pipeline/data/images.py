"""Images <-> encoded bytes: lossless PNG for the shards, any Pillow format when decoding."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from pipeline.data import SourceFormatError

PNG_COMPRESS_LEVEL = 6


def encode_png(images: np.ndarray) -> list[bytes]:
    """PNG bytes of each uint8 (H, W, 3) image; deterministic (Pillow writes no time chunk)."""
    out = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        out.append(buf.getvalue())
    return out


def decode_images(
    blobs: Sequence[bytes], what: str = "images", *, row_names: Sequence[str] | None = None
) -> np.ndarray:
    """Decode encoded images (PNG/JPEG/...) into one uint8 (N, H, W, 3) RGB array.

    All images must share one size. Errors name `what` ("train.parquet") and the row, or
    `row_names[row]` when given (e.g. the image's file). Plain sequential Pillow decoding: for
    32x32 images threads do not help (the per-image cost is Python overhead under the GIL);
    60k CIFAR PNGs take ~3 s.
    """
    out: np.ndarray | None = None
    for i, blob in enumerate(blobs):
        row = row_names[i] if row_names is not None else f"row {i}"
        try:
            with Image.open(io.BytesIO(blob)) as im:
                pixels = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
        except Exception as exc:  # PIL raises several types for bad bytes
            raise SourceFormatError(f"{what}: {row} is not a decodable image ({exc})") from None
        if out is None:
            out = np.empty((len(blobs), *pixels.shape), dtype=np.uint8)
        elif pixels.shape != out.shape[1:]:
            raise SourceFormatError(
                f"{what}: {row} is {pixels.shape[1]}x{pixels.shape[0]} but earlier images are "
                f"{out.shape[2]}x{out.shape[1]}; all images must share one size"
            )
        out[i] = pixels
    if out is None:
        return np.empty((0, 0, 0, 3), dtype=np.uint8)
    return out
