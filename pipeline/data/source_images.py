"""One source image as the large benchmarks' shards keep it: its own encoded bytes, checked to
decode and measured from its header; optionally shrunk to a maximum side.

The check decodes the whole entropy-coded stream at 1/8 scale (JPEG's DCT scaling, Pillow's
`draft`), several times cheaper than a full decode, so a truncated or corrupt file is refused
while preparing rather than hours into a training run. Sizes are the stored image's, as
written in its header (EXIF orientation is not applied, as no reader applies it).
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from pipeline.data import SourceFormatError

RESIZED_JPEG_QUALITY = 90
# Formats the re-encoded JPEG keeps as they are; others (palette, alpha, 16-bit) become RGB.
_JPEG_MODES = ("RGB", "L")


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the image header, without decoding pixels."""
    with Image.open(io.BytesIO(data)) as im:
        return im.height, im.width


def _check_decodes(im: Image.Image) -> None:
    im.draft(None, (max(1, im.width // 8), max(1, im.height // 8)))
    im.load()


def _shrunk(im: Image.Image, max_side: int) -> bytes:
    # thumbnail() keeps the aspect ratio, decodes at a reduced JPEG scale first, then resamples.
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    if im.mode not in _JPEG_MODES:
        im = im.convert("RGB")
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=RESIZED_JPEG_QUALITY)
    return out.getvalue()


def load_source_image(file: Path, where: str, max_side: int | None) -> tuple[bytes, int, int]:
    """(stored bytes, height, width) of one source image: the file's own bytes, or a JPEG of
    it shrunk to `max_side` when its longer side exceeds that. `where` names the list entry
    (list file and line) in errors, which also name the image file."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise SourceFormatError(f"{where}: image file {file} does not exist") from None
    except OSError as exc:
        raise SourceFormatError(f"{where}: cannot read image file {file}: {exc}") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            height, width = im.height, im.width
            if max_side is not None and max(height, width) > max_side:
                data = _shrunk(im, max_side)
                height, width = image_size(data)
            else:
                _check_decodes(im)
    except Exception as exc:  # Pillow raises several types for bad bytes
        raise SourceFormatError(
            f"{where}: image file {file} is not a readable image ({exc})"
        ) from None
    return data, height, width
