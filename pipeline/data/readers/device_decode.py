"""Source images decoded on the training device (`data.decode_on`): the readers hand over the
encoded bytes of a training batch, and the step decodes them where it trains, JPEGs with nvJPEG
(`torchvision.io.decode_jpeg` on a list, `device="cuda"`), then crops and flips each image
there: the CPUs of a GPU node only read shards.

Each image's crop and flip are `imagenet_geometry`'s, drawn from torch's CPU generator seeded
by `augmentation_seed(epoch seed, sample id)`, as the CPU readers draw them: the same boxes and
flips whichever side decodes. The pixels can differ by the decoders' rounding (nvJPEG's IDCT
and chroma upsampling are not libjpeg-turbo's): on CPU they are equal, on CUDA
tests/unit/test_device_decode.py bounds the difference (run by bench/gpu_session.sh). Images
that are not JPEG (a PNG or GIF among the source files) are decoded on the CPU
(`codec.decode_rgb`) and moved over.

Evaluation splits stay decoded on the CPU: rank 0 reads them once and keeps them in memory
where they fit (`distributed.worker.EvalBatches`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_jpeg

from pipeline.config import ConfigError, DataConfig
from pipeline.data.codec import decode_rgb
from pipeline.data.readers.transforms import imagenet_geometry, transform_seeded
from pipeline.seeding import augmentation_seed

# The three bytes every JPEG file starts with (SOI marker + the next marker's 0xFF).
JPEG_MAGIC = b"\xff\xd8\xff"


def decodes_on_device(cfg: DataConfig, encoding: str, cuda: bool, dataset: str) -> bool:
    """Whether the training split travels encoded and the training device decodes it:
    `data.decode_on` against the dataset's `encoding` ("source": the original files; "png":
    CIFAR-style shards) and whether the workers train on CUDA. "auto" decodes on the device
    where it can; "device" where it cannot is a ConfigError naming the reason."""
    if cfg.decode_on == "cpu":
        return False
    possible = cuda and encoding == "source" and cfg.augments_on_device
    if cfg.decode_on == "auto" or possible:
        return possible
    if not cuda:
        why = "the training device is not CUDA (nvJPEG decodes on NVIDIA GPUs)"
    elif encoding != "source":
        why = f"{dataset} holds {encoding} images, not source JPEGs (nvJPEG reads JPEG)"
    else:
        why = "data.augment_on=loader augments on the CPU, where the images must be decoded"
    raise ConfigError(f"data.decode_on=device, but {why}: use data.decode_on=auto or cpu")


def _one_jpeg(data: Tensor, device: torch.device) -> Tensor | None:
    try:
        return decode_jpeg(data, ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def _decoded(blobs: Sequence[bytes], names: Sequence[str], device: torch.device) -> list[Tensor]:
    """uint8 (3, H, W) images on `device`: the JPEGs in one `decode_jpeg` call there; when
    that call refuses the batch, each JPEG on its own; what is left (other formats, a JPEG the
    device's decoder cannot read, a corrupt file) on the CPU, which names an undecodable image
    (`codec.SourceFormatError`)."""
    jpeg = [i for i, blob in enumerate(blobs) if blob[:3] == JPEG_MAGIC]
    images: list[Tensor | None] = [None] * len(blobs)
    if jpeg:
        data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in jpeg]
        try:
            decoded = decode_jpeg(data, ImageReadMode.RGB, device=device)
        except RuntimeError:  # one image it cannot read fails the whole call
            decoded = [_one_jpeg(one, device) for one in data]
        for i, image in zip(jpeg, decoded, strict=True):
            images[i] = image
    return [
        decode_rgb(blobs[i], f"sample {names[i]}").to(device) if image is None else image
        for i, image in enumerate(images)
    ]


def decode_crops(
    blobs: Sequence[bytes],
    sample_ids: Sequence[str],
    seeds: Sequence[int] | None,
    image_size: int,
    device: torch.device,
    train: bool = True,
) -> Tensor:
    """uint8 (N, 3, image_size, image_size) on `device` from N encoded images (`_decoded`),
    each brought to image_size by `imagenet_geometry(train)` with torch's CPU generator seeded
    by `seeds[i]` (unseeded without). The caller's CPU generator state is left as it was."""
    images = _decoded(blobs, [str(i) for i in sample_ids], device)
    geometry = imagenet_geometry(train, image_size)
    with torch.random.fork_rng(devices=[]):
        if seeds is None:
            return torch.stack([geometry(image) for image in images])
        return torch.stack(
            [
                transform_seeded(geometry, image, seed)
                for image, seed in zip(images, seeds, strict=True)
            ]
        )


def decoded_batches(
    batches: Iterable[tuple[Sequence[bytes], Tensor, Sequence[str]]],
    epoch_seed: int,
    image_size: int,
    device: torch.device,
) -> Iterator[tuple[Tensor, Tensor]]:
    """(encoded images, labels, sample ids) training batches -> (uint8 crops on `device`,
    labels): each image cropped and flipped as `augmentation_seed(epoch_seed, sample id)`
    draws, as the CPU readers do for the same epoch."""
    for blobs, labels, sample_ids in batches:
        seeds = [augmentation_seed(epoch_seed, sample_id) for sample_id in sample_ids]
        yield decode_crops(blobs, sample_ids, seeds, image_size, device), torch.as_tensor(labels)
