"""Decoding a training crop's region alone (pipeline.data.codec.open_jpeg / decode_jpeg_region)
and the readers' step built on it (pipeline.data.readers.transforms.DecodeGeometry): the same
pixels as a whole decode, cropped, and the same crops and flips as torchvision's
RandomResizedCrop + RandomHorizontalFlip on the same seeds."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from pipeline.data import SourceFormatError
from pipeline.data.codec import decode_jpeg_region, decode_rgb, open_jpeg
from pipeline.data.readers.transforms import DecodeGeometry, imagenet_geometry, transform_seeded

# torchvision.io's decoders warn on every call that 0.29 deprecated them (pipeline.data.codec).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def _photo_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus noise: chroma varies, so subsampled JPEGs upsample it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    return np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, mode: str = "RGB", **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format="JPEG", quality=90, **options)
    return out.getvalue()


# 4:2:0 (Pillow's default), 4:2:2, 4:4:4 chroma subsampling and a progressive JPEG: the region
# decoder must get the chroma of the crop's first rows and columns right in each.
JPEG_KINDS = {
    "4:2:0": {},
    "4:2:2": {"subsampling": 1},
    "4:4:4": {"subsampling": 0},
    "progressive": {"progressive": True},
}


@pytest.mark.parametrize("kind", JPEG_KINDS)
def test_a_region_is_the_whole_decode_cropped(kind):
    blob = _jpeg(_photo_like(301, 389), **JPEG_KINDS[kind])
    stream = open_jpeg(blob)
    assert stream is not None and (stream.height, stream.width) == (301, 389)
    whole = decode_rgb(blob)
    rng = np.random.default_rng(1)
    boxes = [(0, 0, 301, 389), (0, 0, 1, 1), (300, 388, 1, 1), (17, 9, 128, 255)]
    for _ in range(40):  # odd offsets and sizes, none aligned to the 8/16-pixel blocks
        top, left = int(rng.integers(0, 300)), int(rng.integers(0, 388))
        boxes.append((top, left, int(rng.integers(1, 302 - top)), int(rng.integers(1, 390 - left))))
    for top, left, height, width in boxes:
        region = decode_jpeg_region(stream, blob, "x", top, left, height, width)
        assert region.dtype == torch.uint8 and region.shape == (3, height, width)
        expected = whole[:, top : top + height, left : left + width]
        assert torch.equal(region, expected), (top, left, height, width)


def test_images_the_region_decoder_does_not_take_are_left_to_a_whole_decode():
    pixels = _photo_like(40, 50)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    for blob in (_jpeg(pixels, "L"), _jpeg(pixels, "CMYK"), png.getvalue(), b"not an image"):
        assert open_jpeg(blob) is None


@pytest.mark.parametrize("kind", ["4:2:0", "progressive"])
def test_the_training_step_crops_and_flips_as_torchvision_on_the_same_seed(kind):
    """DecodeGeometry draws RandomResizedCrop's box from the header and decodes only that box:
    on every seed, the pixels of torchvision's RandomResizedCrop(64) + flip of the whole image
    (which also pins the draws: scale 0.08-1, ratio 3/4-4/3, the fallback, the flip)."""
    blob = _jpeg(_photo_like(150, 113, seed=2), **JPEG_KINDS[kind])
    assert open_jpeg(blob) is not None  # the region path, not the whole-decode fallback
    step, geometry = DecodeGeometry(True, 64), imagenet_geometry(True, 64)
    outs = []
    for seed in range(60):
        out = step(blob, "x", seed)
        assert torch.equal(out, transform_seeded(geometry, decode_rgb(blob), seed)), seed
        outs.append(out)
    assert len({o.numpy().tobytes() for o in outs}) == len(outs)  # each seed its own crop


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_the_training_step_decodes_other_jpegs_whole_with_the_same_draws(mode):
    blob = _jpeg(_photo_like(90, 70), mode)
    step, geometry = DecodeGeometry(True, 32), imagenet_geometry(True, 32)
    for seed in range(5):
        assert torch.equal(
            step(blob, "x", seed), transform_seeded(geometry, decode_rgb(blob), seed)
        )


def test_a_jpeg_cut_short_is_an_error_naming_the_sample_wherever_the_crop_falls():
    """As with a whole decode: a crop inside the bytes that remain is refused too."""
    blob = _jpeg(_photo_like(200, 160))
    cut = blob[: len(blob) // 3]
    assert open_jpeg(cut) is not None  # the header parses: the region path is taken
    for seed in range(10):
        with pytest.raises(SourceFormatError, match="train/c1/7.jpg"):
            DecodeGeometry(True, 32)(cut, "train/c1/7.jpg", seed)


def _ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


@pytest.mark.parametrize("height, width", [(375, 500), (40, 400)])  # the second: fallbacks
def test_the_crop_boxes_follow_torchvisions_random_resized_crop(height, width):
    """Drawn without reseeding, 3,000 boxes of DecodeGeometry against 3,000 of torchvision's
    RandomResizedCrop(224) on an image of that size (scale 0.08-1, ratio 3/4-4/3, the central
    fallback on a strip): area share, aspect ratio and centre of the box, each with a
    two-sample KS distance under its 0.1% critical value."""
    torch.manual_seed(0)
    step = DecodeGeometry(True, 224)
    ours = [step.crop_box(height, width) for _ in range(3000)]
    reference = v2.RandomResizedCrop(224, antialias=True)
    image = torch.zeros((), dtype=torch.uint8).expand(3, height, width)
    theirs = [reference.make_params([image]) for _ in range(3000)]

    def features(boxes):
        b = {k: np.array([box[k] for box in boxes], dtype=float) for k in boxes[0]}
        area = b["height"] * b["width"] / (height * width)
        centre = (b["left"] + b["width"] / 2) / width
        return area, np.log(b["width"] / b["height"]), centre

    critical = 1.95 * np.sqrt(2 / 3000)
    for name, a, b in zip(
        ("area", "log aspect", "centre"), features(ours), features(theirs), strict=True
    ):
        assert _ks_distance(a, b) < critical, name
    area = features(ours)[0]
    assert area.min() >= 0.07 and area.max() <= 1.0


@pytest.mark.parametrize("height, width", [(375, 500), (500, 375), (40, 400), (400, 40), (7, 9)])
def test_each_crop_box_is_the_one_torchvision_draws_on_the_same_seed(height, width):
    """DecodeGeometry draws its boxes itself (cheaper than building make_params' input): box
    for box on 300 seeds, the box of torchvision's RandomResizedCrop(224), including the
    central fallback of a strip, and the generator left where torchvision leaves it."""
    step = DecodeGeometry(True, 224)
    reference = v2.RandomResizedCrop(224, antialias=True)
    image = torch.zeros((), dtype=torch.uint8).expand(3, height, width)
    for seed in range(300):
        torch.manual_seed(seed)
        ours, after = step.crop_box(height, width), torch.rand(1)
        torch.manual_seed(seed)
        assert ours == reference.make_params([image]), seed
        assert torch.equal(after, torch.rand(1)), seed
