"""Image bytes <-> pixels: the shards' lossless PNG, decoding any encoded image to uint8 RGB,
and the large benchmarks' source images checked and measured from their headers.

Why torchvision.io decodes first: on ImageNet-like JPEGs it is faster per core than Pillow
with the same pixels (BENCHMARKS.md, decode_speed), hands back a tensor the transforms take
without a copy, and reads grayscale and CMYK JPEGs, PNG (palette, alpha), GIF and WebP straight
to 3-channel RGB. Pillow decodes what torchvision.io does not (BMP, TIFF). torchvision 0.29
deprecated its decoders in favour of TorchCodec (each call warns); the GPU machine has no
TorchCodec, so we keep them until an upgrade removes them, then re-measure with
bench/decode_speed.py.

A training crop of a JPEG (`open_jpeg` + `decode_jpeg_region`) is decoded alone: nvImageCodec's
CPU decoder (libjpeg-turbo's partial decoding) stops at the crop's last row and only
entropy-decodes the rows above it, with the same pixels as a whole decode cropped
(tests/unit/test_codec_region.py). Entropy decoding is most of a decode, so the rows above the
crop still cost most of theirs and leaving out the columns beside it saves little
(bench/HISTORY.md). Images it does not take (other formats, grayscale, CMYK) and machines
without its wheel (not Linux) decode whole.

Source images are checked by decoding the whole entropy-coded stream at 1/8 scale (JPEG's DCT
scaling, Pillow's `draft`), several times cheaper than a full decode, so a corrupt file is
refused while preparing rather than hours into training. Sizes are the stored image's, from its
header (EXIF orientation is not applied, as no reader applies it).
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data import SourceFormatError

if TYPE_CHECKING:
    import torch

PNG_COMPRESS_LEVEL = 6
RESIZED_JPEG_QUALITY = 90
# Formats the re-encoded JPEG keeps as they are; others (palette, alpha, 16-bit) become RGB.
_JPEG_MODES = ("RGB", "L")


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
    32x32 images threads do not help (the per-image cost is Python overhead under the GIL).
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


def _decode_with_pillow(blob: bytes, what: str) -> torch.Tensor:
    import torch

    try:
        with Image.open(io.BytesIO(blob)) as image:
            pixels = np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        raise SourceFormatError(f"{what} is not an image format we can decode") from None
    except Exception as exc:  # Pillow raises several types for bad bytes
        raise SourceFormatError(f"{what} is not a decodable image ({exc})") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def decode_rgb(blob: bytes, what: str = "image") -> torch.Tensor:
    """A uint8 (3, H, W) RGB tensor of one encoded image; SourceFormatError naming `what`
    (e.g. the sample id and its shard) when it cannot be decoded."""
    # Imported here, not with the module: the shard readers import this module in Ray's
    # coordinator processes, which never decode (pipeline.data.readers.ray_reader).
    import torch
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as F

    # A writable copy: torch.frombuffer warns on read-only `bytes` (the copy is cheap beside
    # the decode).
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:  # a format torchvision.io lacks, or bytes neither can read
        return _decode_with_pillow(blob, what)
    if image.dtype != torch.uint8:  # 16-bit PNG: rescale rather than clip to 8 bits
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


@functools.cache
def _region_decoder(pid: int):
    """This process's nvImageCodec CPU decoder (one thread: the readers' parallelism is their
    processes), or None where nvImageCodec is not installed. Keyed by pid: a DataLoader worker
    forked from a process that decoded must not reuse its parent's decoder threads."""
    try:
        from nvidia import nvimgcodec
    except ImportError:
        return None
    return nvimgcodec.Decoder(
        device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
        max_num_cpu_threads=1,
        backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)],
        options=":fancy_upsampling=1",  # libjpeg's default upsampling, as decode_rgb's
    )


def open_jpeg(blob: bytes):
    """The parsed header of a 3-channel JPEG that `decode_jpeg_region` decodes, or None (another
    format, grayscale or CMYK, a header that does not parse, no nvImageCodec): then decode the
    whole image with `decode_rgb`. `.height` and `.width` are the stored image's."""
    if _region_decoder(os.getpid()) is None:
        return None
    from nvidia import nvimgcodec

    try:
        stream = nvimgcodec.CodeStream(blob)
        if stream.codec_name == "jpeg" and stream.num_channels == 3:
            return stream
    except RuntimeError:  # not an image header it can read; decode_rgb names the sample
        pass
    return None


def decode_jpeg_region(
    stream, blob: bytes, what: str, top: int, left: int, height: int, width: int
) -> torch.Tensor:
    """The uint8 (3, height, width) region of an `open_jpeg` stream at (top, left): the pixels
    of `decode_rgb(blob)[:, top:top + height, left:left + width]`, decoding little else. Bytes
    it cannot decode go to `decode_rgb`, which decodes them alike or names `what`."""
    import torch
    from nvidia import nvimgcodec

    region = nvimgcodec.Region(top, left, top + height, left + width)
    params = nvimgcodec.DecodeParams(
        color_spec=nvimgcodec.ColorSpec.SRGB, apply_exif_orientation=False
    )
    decoded = _region_decoder(os.getpid()).decode(
        stream.get_sub_code_stream(region=region), params=params
    )
    if decoded is None:
        return decode_rgb(blob, what)[:, top : top + height, left : left + width]
    return torch.from_numpy(np.asarray(decoded.cpu())).permute(2, 0, 1)


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
