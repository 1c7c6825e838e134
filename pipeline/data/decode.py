"""Encoded image bytes (the shards' source JPEGs, PNGs, ...) -> uint8 RGB CHW tensors.

Why torchvision.io first: on ImageNet-like JPEGs (sides 375-500 px, ~97 kB) one core decoded
about 950 images/s with it against 700-790 with Pillow (`Image.open(...).convert("RGB")` +
numpy), 1.2-1.36x across runs, with the same pixels (bench/decode_speed.py; BENCHMARKS.md,
decode_speed); Pillow-SIMD is not available to us. It also hands back a tensor, which the
transforms take without a copy, and reads grayscale and CMYK JPEGs, PNG (palette, alpha), GIF
and WebP straight to 3-channel RGB. Pillow decodes what torchvision.io does not (BMP, TIFF).

torchvision 0.29 deprecated its decoders in favour of TorchCodec (each call warns; Python
ignores DeprecationWarning outside __main__ by default). We pin torchvision 0.29.1, and the GPU
machine has torchvision but not TorchCodec; when an upgrade removes them, re-measure TorchCodec
against Pillow with bench/decode_speed.py and decode with the faster.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from pipeline.data import SourceFormatError


def _decode_with_pillow(blob: bytes, what: str) -> torch.Tensor:
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
    # A writable copy: torch.frombuffer warns on read-only `bytes` (~5 us for a 100 kB JPEG).
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    try:
        image = decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:  # a format torchvision.io lacks, or bytes neither can read
        return _decode_with_pillow(blob, what)
    if image.dtype != torch.uint8:  # 16-bit PNG: rescale rather than clip to 8 bits
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image
