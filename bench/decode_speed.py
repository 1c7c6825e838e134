"""Decode + augment throughput at 224 px for the large benchmarks' input: images/s per CPU core
of the Ray-free streaming loader and of the Ray Data path, reading source-JPEG shards, against
torchvision's `ImageFolder` + `DataLoader` on the same JPEGs in a folder; plus the decoders
alone (Pillow against torchvision.io), which chose pipeline/data/codec.py's decoder.

    python -m bench.decode_speed [--images 800] [--passes 3] [--no-record]

Everything is measured in one run on the same generated RGB JPEGs (sides 375-500 px, quality
90, about 95 kB each, close to ImageNet's average). Each pipeline trains-augments with the
"imagenet" preset (RandomResizedCrop 224 + flip; ImageFolder: the same in torchvision's
classic PIL transforms, then ToTensor + Normalize) in batches of 32 on all cores (DataLoader
workers = cores; Ray started with num_cpus = cores). Passes alternate between the pipelines;
each figure is the median over passes of the mid-pass rate (`timed_pass`) per core; the first
batch's wait is shown on its own. Ray Data's up-front shard verification happens when the
dataset is built and is not timed.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import scratch_dir
from bench.record import record

BATCH = 32
IMAGE_SIZE = 224
SIDES = (375, 500)
IMAGES_PER_SHARD = 40


def timed_pass(batches: Iterable, labels_of: Callable, total: int) -> tuple[float, float]:
    """(seconds to the first batch, images/s in the middle of the pass) of one pass over
    `batches` of `total` images. The rate counts the images delivered between the 25% and the
    75% marks over the time between them: neither the start-up nor the tail (where workers or
    tasks run out of shards and cores idle) enters it, nor work done before the first batch."""
    start = time.perf_counter()
    first_wait, marks, seen = None, [], 0
    for batch in batches:
        now = time.perf_counter()
        first_wait = now - start if first_wait is None else first_wait
        seen += len(labels_of(batch))
        marks.append((seen, now))
    lo = next(m for m in marks if m[0] >= total * 0.25)
    hi = next(m for m in marks if m[0] >= total * 0.75)
    return first_wait, (hi[0] - lo[0]) / (hi[1] - lo[1])


def decoder_rates(blobs: list[bytes], repeats: int) -> dict[str, float]:
    """Images/s of each decoder on one thread (best of `repeats` passes over `blobs`)."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    from pipeline.data.codec import decode_rgb

    def pillow(blob: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(blob)) as image:
            return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)

    def tensor(blob: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(blob), dtype=torch.uint8)

    decoders = {
        'Pillow: Image.open(...).convert("RGB") + numpy': pillow,
        "torchvision.io.decode_jpeg(mode=RGB)": lambda b: decode_jpeg(tensor(b), ImageReadMode.RGB),
        "torchvision.io.decode_image(mode=RGB)": lambda b: decode_image(
            tensor(b), ImageReadMode.RGB
        ),
        "pipeline.data.codec.decode_rgb (what the readers call)": decode_rgb,
    }
    rates = {name: 0.0 for name in decoders}
    torch.set_num_threads(1)
    for _ in range(repeats):  # alternate, so that drift in machine load hits all alike
        for name, decode in decoders.items():
            start = time.perf_counter()
            for blob in blobs:
                decode(blob)
            rates[name] = max(rates[name], len(blobs) / (time.perf_counter() - start))
    return rates


def write_image_folder(manifest, root: Path) -> Path:
    """The training shards' JPEGs, byte for byte, as root/<class>/<file> for ImageFolder."""
    from pipeline.data.shards import read_split_table

    table = read_split_table(manifest, "train")
    for blob, sample_id in zip(
        table.column("image").to_pylist(), table.column("sample_id").to_pylist(), strict=True
    ):
        path = root / sample_id  # "train/c3/5.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    return root / "train"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    # torchvision.io warns on every decode that 0.29 deprecated it (pipeline/data/codec.py)
    warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")  # loader workers

    import ray
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    from pipeline.config import load_config
    from pipeline.data.manifest import read_manifest
    from pipeline.data.readers.ray_reader import quiet_progress, split_dataset
    from pipeline.data.readers.stream_reader import make_stream_loader
    from pipeline.data.readers.transforms import IMAGENET_MEAN, IMAGENET_STD
    from tests.helpers.jpeg_shards import write_source_dataset

    cores = os.cpu_count() or 1
    work = scratch_dir("bench-decode-")
    classes = 8
    counts = [args.images // classes] * classes
    uri, encoded = write_source_dataset(
        work / "shards",
        {"train": counts},
        rows_per_shard=IMAGES_PER_SHARD,
        side_range=SIDES,
        mixed_formats=False,
    )
    blobs = encoded["train"]
    manifest = read_manifest(uri)
    folder = write_image_folder(manifest, work / "folder")
    decoders = decoder_rates(blobs, repeats=args.passes)
    torch.set_num_threads(cores)

    image_folder = datasets.ImageFolder(
        str(folder),
        transform=T.Compose(
            [
                T.RandomResizedCrop(IMAGE_SIZE),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        ),
    )
    cfg = load_config(
        None,
        ["data.augment=imagenet", f"data.image_size={IMAGE_SIZE}", f"data.loader_workers={cores}"],
    ).data
    stream = make_stream_loader(manifest, "train", cfg, BATCH, train=True)

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # lines per pass otherwise
    quiet_progress()
    ray_dataset = split_dataset(
        manifest, "train", augment="imagenet", train=True, seed=0, image_size=IMAGE_SIZE
    )
    pipelines: dict[str, tuple[Callable[[], Iterable], Callable]] = {
        "torchvision ImageFolder + DataLoader (Pillow decode, PIL transforms), JPEG folder": (
            lambda: DataLoader(image_folder, batch_size=BATCH, shuffle=True, num_workers=cores),
            lambda batch: batch[1],
        ),
        "Ray-free streaming loader (make_stream_loader), shards": (
            lambda: stream,
            lambda batch: batch[1],
        ),
        "Ray Data (split_dataset -> iter_torch_batches), shards": (
            lambda: ray_dataset.iter_torch_batches(batch_size=BATCH),
            lambda batch: batch["label"],
        ),
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in pipelines}
    for epoch in range(args.passes):
        stream.dataset.set_seed(epoch)
        for name, (make, labels_of) in pipelines.items():
            runs[name].append(timed_pass(make(), labels_of, len(blobs)))
    ray.shutdown()

    kb = sum(map(len, blobs)) / len(blobs) / 1e3
    lines = [
        f"{len(blobs)} generated RGB JPEGs (sides {SIDES[0]}-{SIDES[1]} px, quality 90, "
        f"{kb:.0f} kB on average), {cores} CPU cores; train preset `imagenet` at {IMAGE_SIZE} px, "
        f"batches of {BATCH}; median of {args.passes} passes, images/s between the 25% and 75% marks",
        "",
        "| pipeline | images/s per core | ratio to ImageFolder | first batch after |",
        "|---|---|---|---|",
    ]
    baseline = None
    for name, results in runs.items():
        per_core = statistics.median(rate for _, rate in results) / cores
        baseline = baseline or per_core
        first = statistics.median(wait for wait, _ in results)
        lines.append(f"| {name} | {per_core:.0f} | {per_core / baseline:.2f}x | {first:.2f} s |")
    lines += [
        "",
        f"Decoders alone, one thread, best of {args.passes} passes over the same JPEGs:",
        "",
        "| decoder | images/s | ratio to Pillow |",
        "|---|---|---|",
    ]
    pillow = next(iter(decoders.values()))
    lines += [f"| {name} | {rate:.0f} | {rate / pillow:.2f}x |" for name, rate in decoders.items()]
    table = "\n".join(lines)
    record(
        "decode_speed",
        "Decode + augment at 224 px: streaming readers vs ImageFolder",
        table,
        print_only=args.no_record,
    )


if __name__ == "__main__":
    main()
