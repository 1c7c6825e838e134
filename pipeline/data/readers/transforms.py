"""Image transforms shared by every reader (engine, Ray Data, evaluation).

CIFAR presets (SHIKE.md §3.1), for images already at the model's size:
- "shike": RandomCrop 32 pad 4 -> horizontal flip -> AutoAugment (CIFAR-10 policy, fill 128)
  -> to float -> Cutout (one 16x16 hole, centre uniform, clipped at borders) -> normalise;
- "basic": crop + flip; "none": nothing random. Evaluation: to float -> normalise.
Normalised with CIFAR-10 statistics.

ImageNet-style presets, for images of any size (the large benchmarks' source JPEGs):
- "imagenet": RandomResizedCrop(image_size) -> horizontal flip;
- "imagenet_jitter": + ColorJitter(brightness, contrast, saturation 0.4);
- "randaugment": + RandAugment (torchvision's defaults: 2 ops, magnitude 9).
Evaluation: resize the shorter side to image_size / 0.875, centre crop image_size. Normalised
with ImageNet statistics.

All randomness comes from torch's default CPU generator, so reseeding it per image makes
augmentation reproducible (`transform_seeded`; pipeline.seeding gives the per-image seed).
Inputs are uint8 CHW tensors (or HWC numpy arrays via `to_chw_tensor`); outputs float CHW.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from pipeline.config import CIFAR_AUGMENTS
from pipeline.data import DataError
from pipeline.data.codec import decode_jpeg_region, decode_rgb, open_jpeg

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMAGENET_AUGMENTS = ("imagenet", "imagenet_jitter", "randaugment")
# Evaluation of the ImageNet-style presets: resize so that the centre crop keeps 87.5% of the
# shorter side (224 of 256), the usual ImageNet protocol.
EVAL_CROP_FRACTION = 0.875


class Cutout(nn.Module):
    """Zero one `size` x `size` square whose centre is uniform over the image (DeVries & Taylor).

    Applied after scaling to [0, 1] and before normalisation, as in the recipe, so the hole
    becomes -mean/std after normalising. The square is clipped at the borders.
    """

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        self.size = size

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy = int(torch.randint(h, (1,)))
        cx = int(torch.randint(w, (1,)))
        half = self.size // 2
        y0, y1 = max(cy - half, 0), min(cy + half, h)
        x0, x1 = max(cx - half, 0), min(cx + half, w)
        img = img.clone()
        img[..., y0:y1, x0:x1] = 0.0
        return img


def normalization(augment: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) that an `augment` preset normalises with; the inference wrapper that the
    registry packages must use the same."""
    if augment in CIFAR_AUGMENTS:
        return CIFAR_MEAN, CIFAR_STD
    if augment in IMAGENET_AUGMENTS:
        return IMAGENET_MEAN, IMAGENET_STD
    raise ValueError(
        f"unknown augment {augment!r}; expected one of {CIFAR_AUGMENTS + IMAGENET_AUGMENTS}"
    )


def require_resizing_preset(augment: str, dataset: str) -> None:
    """Images of varying size (the large benchmarks' source files) need a preset that brings
    every image to image_size; the CIFAR presets keep the input's size."""
    if augment not in IMAGENET_AUGMENTS:
        raise DataError(
            f"data.augment={augment!r} keeps each image's own size, but {dataset} holds images "
            f"of varying size: use one of {', '.join(IMAGENET_AUGMENTS)}"
        )


def _cifar_steps(kind: str, train: bool, image_size: int) -> list[nn.Module]:
    steps: list[nn.Module] = []
    if train and kind in ("shike", "basic"):
        steps += [v2.RandomCrop(image_size, padding=4), v2.RandomHorizontalFlip()]
    if train and kind == "shike":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=128))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if train and kind == "shike":
        steps.append(Cutout(16))
    return steps


def evaluation_crop(image_size: int) -> v2.Compose:
    """The ImageNet-style presets' evaluation geometry alone, uint8 in and out: the shorter
    side resized to image_size / 0.875, then the centre image_size square. This is what
    the registered model (which takes uint8 images at image_size and normalises them itself)
    should be fed from images of any size."""
    resize = round(image_size / EVAL_CROP_FRACTION)
    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(image_size)])


def imagenet_geometry(train: bool, image_size: int) -> v2.Compose:
    """The ImageNet-style presets' geometry, uint8 in and out: RandomResizedCrop(image_size)
    + horizontal flip for training, `evaluation_crop` else. What the readers do on the CPU when
    the colour work and normalisation run on the training device (`batch_augment`): with
    torch's generator seeded alike, the same draws as the first steps of `build_transform`."""
    if not train:
        return evaluation_crop(image_size)
    return v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip()])


class Decode:
    """Encoded image -> `transform` of its uint8 CHW pixels: a reader's step per image. With a
    `seed`, torch's default CPU generator is reseeded first (as `transform_seeded`), so the
    image's random transform depends on the seed alone."""

    def __init__(self, transform: v2.Compose) -> None:
        self.transform = transform

    def __call__(self, blob: bytes, what: str, seed: int | None = None) -> torch.Tensor:
        if seed is not None:
            torch.default_generator.manual_seed(seed)
        return self._decode(blob, what)

    def _decode(self, blob: bytes, what: str) -> torch.Tensor:
        return self.transform(decode_rgb(blob, what))


class DecodeGeometry(Decode):
    """`Decode` of `imagenet_geometry(train, image_size)`, uint8 (3, S, S) out: the readers' step
    when the training device does the colour work and normalisation.

    For training, RandomResizedCrop's parameters are drawn from the size in the JPEG's header,
    before decoding, and only the crop's region is decoded (`codec.decode_jpeg_region`): the
    same draws from torch's generator as the geometry transform makes, hence the same pixels.
    Evaluation, and images the region decoder does not take, decode whole.
    """

    def __init__(self, train: bool, image_size: int) -> None:
        super().__init__(imagenet_geometry(train, image_size))
        self.train = train
        if train:
            crop = self.transform.transforms[0]
            self._scale, self._ratio = crop.scale, crop.ratio
            # float32, as torchvision keeps them: the bounds of its aspect-ratio draw
            self._log_ratio = [float(r) for r in torch.log(torch.tensor(crop.ratio))]
            self._draw = torch.empty(1)

    def _decode(self, blob: bytes, what: str) -> torch.Tensor:
        stream = open_jpeg(blob) if self.train else None
        if stream is None:
            return super()._decode(blob, what)
        crop, flip = self.transform.transforms
        region = decode_jpeg_region(
            stream, blob, what, **self.crop_box(stream.height, stream.width)
        )
        out = F.resize(region, crop.size, crop.interpolation, antialias=crop.antialias)
        # RandomHorizontalFlip's own draw and test (v2's _RandomApplyTransform).
        return F.horizontal_flip(out) if torch.rand(1) < flip.p else out

    def crop_box(self, height: int, width: int) -> dict[str, int]:
        """RandomResizedCrop's next box (top, left, height, width) for an image of that size:
        the draws of torchvision's `make_params` from torch's default generator, in its order
        and float32 precision (ten tries of an area share and a log-uniform aspect ratio, the
        box's corner; else the centre crop at the nearest allowed ratio), without the input
        and the tensors it builds for each draw."""
        area, draw = height * width, self._draw
        for _ in range(10):
            target_area = area * draw.uniform_(*self._scale).item()
            aspect = draw.uniform_(*self._log_ratio).exp_().item()
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,)))
                left = int(torch.randint(0, width - w + 1, size=(1,)))
                return {"top": top, "left": left, "height": h, "width": w}
        w, h = width, height
        if width / height < min(self._ratio):
            h = round(w / min(self._ratio))
        elif width / height > max(self._ratio):
            w = round(h * max(self._ratio))
        return {"top": (height - h) // 2, "left": (width - w) // 2, "height": h, "width": w}


def _imagenet_steps(kind: str, train: bool, image_size: int) -> list[nn.Module]:
    steps = [imagenet_geometry(train, image_size)]
    if train:
        if kind == "imagenet_jitter":
            steps.append(v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4))
        elif kind == "randaugment":
            steps.append(v2.RandAugment())
    # Geometry and colour ops run on uint8 (torch's fast uint8 resampling); float comes last.
    return [*steps, v2.ToDtype(torch.float32, scale=True)]


def build_transform(kind: str, train: bool, image_size: int = 32) -> v2.Compose:
    """Transform from a uint8 CHW tensor to a normalised float CHW tensor; the ImageNet-style
    presets output image_size x image_size whatever the input's size."""
    mean, std = normalization(kind)
    if kind in CIFAR_AUGMENTS:
        steps = _cifar_steps(kind, train, image_size)
    else:
        steps = _imagenet_steps(kind, train, image_size)
    return v2.Compose([*steps, v2.Normalize(mean, std)])


def to_chw_tensor(image_hwc: np.ndarray) -> torch.Tensor:
    """uint8 HWC numpy -> uint8 CHW tensor (no copy of the pixel data when contiguous)."""
    return torch.from_numpy(np.ascontiguousarray(image_hwc)).permute(2, 0, 1)


def transform_seeded(transform: v2.Compose, image: torch.Tensor, seed: int) -> torch.Tensor:
    """`transform(image)` with torch's default CPU generator reseeded first, so the image's
    random transform depends on `seed` alone, not on which batch, worker or process runs it
    (`torch.default_generator.manual_seed`, far cheaper per image than `torch.manual_seed`,
    which also seeds every accelerator backend). The caller's generator state is consumed."""
    torch.default_generator.manual_seed(seed)
    return transform(image)


def apply_to_batch(
    transform: v2.Compose, images_nhwc: np.ndarray, seeds: Sequence[int] | None = None
) -> torch.Tensor:
    """Transform each image of a uint8 NHWC batch independently; returns float NCHW.

    With `seeds` (one per image), each image is transformed by `transform_seeded`.
    """
    if seeds is None:
        return torch.stack([transform(to_chw_tensor(img)) for img in images_nhwc])
    return torch.stack(
        [
            transform_seeded(transform, to_chw_tensor(img), seed)
            for img, seed in zip(images_nhwc, seeds, strict=True)
        ]
    )
