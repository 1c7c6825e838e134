"""Image transforms of SHIKE.md §3.1, shared by every reader (engine, Ray Data, evaluation).

Train ("shike"): RandomCrop 32 pad 4 -> horizontal flip -> AutoAugment (CIFAR-10 policy, fill
128) -> to float -> Cutout (one 16x16 hole, centre uniform, clipped at borders) -> normalise
with CIFAR-10 statistics. Test: to float -> normalise. All randomness comes from torch's RNG, so
seeding torch makes augmentation reproducible (the engine's loader: per epoch and loader worker;
Ray Data tasks: per image).

Inputs are uint8 HWC numpy arrays (the decoded pixels); outputs float CHW tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


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


def build_transform(
    kind: Literal["shike", "basic", "none"],
    train: bool,
    image_size: int = 32,
    mean: tuple[float, ...] = CIFAR_MEAN,
    std: tuple[float, ...] = CIFAR_STD,
) -> v2.Compose:
    """Transform from a uint8 CHW tensor to a normalised float CHW tensor."""
    steps: list[nn.Module] = []
    if train and kind in ("shike", "basic"):
        steps += [v2.RandomCrop(image_size, padding=4), v2.RandomHorizontalFlip()]
    if train and kind == "shike":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10, fill=128))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if train and kind == "shike":
        steps.append(Cutout(16))
    steps.append(v2.Normalize(mean, std))
    return v2.Compose(steps)


def to_chw_tensor(image_hwc: np.ndarray) -> torch.Tensor:
    """uint8 HWC numpy -> uint8 CHW tensor (no copy of the pixel data when contiguous)."""
    return torch.from_numpy(np.ascontiguousarray(image_hwc)).permute(2, 0, 1)


def apply_to_batch(
    transform: v2.Compose, images_nhwc: np.ndarray, seeds: Sequence[int] | None = None
) -> torch.Tensor:
    """Transform each image of a uint8 NHWC batch independently; returns float NCHW.

    With `seeds` (one per image), torch's default CPU generator is reseeded before each image,
    so an image's random transform depends on its seed alone, not on which batch or process
    transforms it (`torch.default_generator.manual_seed`: ~1.5 us, against ~300 us for
    `torch.manual_seed`, which also seeds every accelerator backend).
    """
    if seeds is None:
        return torch.stack([transform(to_chw_tensor(img)) for img in images_nhwc])
    out = []
    for img, seed in zip(images_nhwc, seeds, strict=True):
        torch.default_generator.manual_seed(seed)
        out.append(transform(to_chw_tensor(img)))
    return torch.stack(out)
