"""Decode + crop throughput at 224 px for the large benchmarks' input, in one run: images/s
per CPU core of our two readers (uint8 crops for the training device, and the per-image float
path), torchvision's `ImageFolder` + `DataLoader` and LitData reading the same JPEGs, against
the limit of one core (decode + RandomResizedCrop + flip on uint8, one thread); plus the
decode-and-crop candidates and the decoders alone, one thread each.

    python -m bench.decode_speed [--images 6400] [--passes 5] [--no-record]

Everything is measured in one run on the same generated RGB JPEGs (sides 375-500 px, quality
90, about 95 kB each, close to ImageNet's average). Each pipeline crops with the "imagenet"
preset (RandomResizedCrop 224 + flip; ImageFolder: the same in torchvision's classic PIL
transforms, then ToTensor + Normalize) in batches of 32 on all cores (DataLoader workers =
cores; Ray started with num_cpus = cores). Passes alternate between the pipelines, a round of
one pass each; each figure is the median over passes of the mid-pass rate (`timed_pass`) per
core, with the machine's CPU utilisation over the same window, and the ratio to ImageFolder is
the median over rounds of the ratio within a round (the machine's speed drifts between rounds);
so is the share of the one-core limit, against the limit timed on one thread (best of 2
passes) at the start of each round. The first batch's wait is shown on its own. The one-thread
tables time the first `ONE_THREAD_IMAGES` images. Ray Data's up-front shard verification
happens when the dataset is built and is not timed; the streaming loader hashes each shard in
its first pass (once a run), so its later passes, like Ray Data's, read shards already verified.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import psutil
import simplejpeg
import torch
from PIL import Image

from bench.common import scratch_dir
from bench.record import record

BATCH = 32
IMAGE_SIZE = 224
SIDES = (375, 500)
# Rows per shard (one row group each): about the 32 MB row groups `prepare_data` writes for
# source images (pipeline/data/prepare/source_shards.py, ROW_GROUP_BYTES) at ~95 kB an image.
IMAGES_PER_SHARD = 320
# Images the one-thread tables time (best of --passes passes over them each).
ONE_THREAD_IMAGES = 1600


class Pass(NamedTuple):
    first_wait: float  # seconds to the first batch
    rate: float  # images/s between the 25% and the 75% marks
    busy: float  # share of the machine's CPU time spent busy over the same window


def _busy_share(before, after) -> float:
    total = sum(after) - sum(before)
    idle = (after.idle + after.iowait) - (before.idle + before.iowait)
    return 1.0 - idle / total if total > 0 else float("nan")


def timed_pass(batches: Iterable, labels_of: Callable, total: int) -> Pass:
    """One pass over `batches` of `total` images. The rate counts the images delivered between
    the 25% and the 75% marks over the time between them: neither the start-up nor the tail
    (where workers or tasks run out of shards and cores idle) enters it, nor work done before
    the first batch."""
    start = time.perf_counter()
    first_wait, marks, seen = None, [], 0
    for batch in batches:
        now = time.perf_counter()
        first_wait = now - start if first_wait is None else first_wait
        seen += len(labels_of(batch))
        marks.append((seen, now, psutil.cpu_times()))
    lo = next(m for m in marks if m[0] >= total * 0.25)
    hi = next(m for m in marks if m[0] >= total * 0.75)
    return Pass(first_wait, (hi[0] - lo[0]) / (hi[1] - lo[1]), _busy_share(lo[2], hi[2]))


def one_thread_rates(blobs: list[bytes], fns: dict[str, Callable], repeats: int) -> dict:
    """Images/s of each function on one thread (best of `repeats` passes over `blobs`)."""
    rates = {name: 0.0 for name in fns}
    torch.set_num_threads(1)
    for _ in range(repeats):  # alternate, so that drift in machine load hits all alike
        for name, fn in fns.items():
            start = time.perf_counter()
            for blob in blobs:
                fn(blob)
            rates[name] = max(rates[name], len(blobs) / (time.perf_counter() - start))
    return rates


def _tensor(blob: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8)


def decoders() -> dict[str, Callable]:
    """The decoders alone (what chose pipeline/data/codec.py's)."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    from pipeline.data.codec import decode_rgb

    def pillow(blob: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(blob)) as image:
            return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)

    return {
        'Pillow: Image.open(...).convert("RGB") + numpy': pillow,
        "torchvision.io.decode_jpeg(mode=RGB)": lambda b: decode_jpeg(
            _tensor(b), ImageReadMode.RGB
        ),
        "torchvision.io.decode_image(mode=RGB)": lambda b: decode_image(
            _tensor(b), ImageReadMode.RGB
        ),
        "pipeline.data.codec.decode_rgb (what the readers call)": decode_rgb,
        # libjpeg-turbo through its TurboJPEG API: the same pixels as decode_jpeg's
        "simplejpeg.decode_jpeg": lambda b: _chw(simplejpeg.decode_jpeg(b)),
        # its faster integer IDCT and plain chroma upsampling: other pixels (a reduced decode)
        "simplejpeg.decode_jpeg(fastdct, fastupsample)": lambda b: _chw(
            simplejpeg.decode_jpeg(b, fastdct=True, fastupsample=True)
        ),
    }


def _chw(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels).permute(2, 0, 1)


LIMIT = "one-core limit: decode_jpeg + v2.RandomResizedCrop(224, antialias) + flip, uint8"


def crop_candidates() -> dict[str, Callable]:
    """Decode + RandomResizedCrop 224 + flip, uint8 out, one image at a time: the limit of one
    core (torchvision on the whole decoded image), another libjpeg-turbo binding, what our
    readers run (the crop's region decoded alone, same pixels), and a reduced decode (libjpeg's
    DCT scaling through Pillow's `draft` where the crop spans twice the output)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import v2

    from pipeline.data.readers.transforms import DecodeGeometry

    crop = v2.Compose([v2.RandomResizedCrop(IMAGE_SIZE, antialias=True), v2.RandomHorizontalFlip()])
    ours = DecodeGeometry(True, IMAGE_SIZE)
    seeds = iter(range(10**9))

    def reduced(blob: bytes) -> torch.Tensor:
        image = Image.open(io.BytesIO(blob))
        width, height = image.size
        top, left, h, w = v2.RandomResizedCrop.get_params(
            torch.empty(1, height, width), (0.08, 1.0), (3 / 4, 4 / 3)
        )
        scale = next((s for s in (8, 4, 2) if min(h, w) / s >= IMAGE_SIZE), 1)
        if scale > 1:
            image.draft("RGB", (math.ceil(width / scale), math.ceil(height / scale)))
        sx, sy = image.size[0] / width, image.size[1] / height
        box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
        out = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR, box=box)
        pixels = torch.from_numpy(np.asarray(out)).permute(2, 0, 1)
        return pixels.flip(-1) if torch.rand(1).item() < 0.5 else pixels

    return {
        LIMIT: lambda b: crop(decode_jpeg(_tensor(b), ImageReadMode.RGB)),
        "simplejpeg.decode_jpeg + the same crop + flip": lambda b: crop(
            _chw(simplejpeg.decode_jpeg(b))
        ),
        "ours: DecodeGeometry, the crop's region decoded alone, seeded per image (the readers' step)": (
            lambda b: ours(b, "image", next(seeds))
        ),
        "Pillow: reduced decode (draft) + resize of the crop box": reduced,
    }


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


def litdata_loader(blobs: list[bytes], labels: list[int], root: Path, cores: int):
    """LitData reading the same JPEGs, optimized into its chunks, with the one-core limit's step
    (whole decode + RandomResizedCrop + flip, uint8) in its loader workers."""
    import multiprocessing

    import litdata
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import v2

    crop = v2.Compose([v2.RandomResizedCrop(IMAGE_SIZE, antialias=True), v2.RandomHorizontalFlip()])

    class Cropped(litdata.StreamingDataset):
        def __getitem__(self, index):
            item = super().__getitem__(index)
            return crop(decode_jpeg(_tensor(item["image"]), ImageReadMode.RGB)), item["label"]

    start_method = multiprocessing.get_start_method()
    items = list(zip(blobs, labels, strict=True))
    litdata.optimize(
        fn=_litdata_item, inputs=items, output_dir=str(root), chunk_bytes="16MB",
        num_workers=1, verbose=False,
    )  # fmt: skip
    # optimize() switches the process to "spawn"; every loader here forks its workers (Linux's
    # default, and what lets this local class reach them).
    multiprocessing.set_start_method(start_method, force=True)
    dataset = Cropped(str(root), shuffle=True)
    return litdata.StreamingDataLoader(dataset, batch_size=BATCH, num_workers=cores)


def _litdata_item(item: tuple[bytes, int]) -> dict:
    return {"image": item[0], "label": item[1]}


def pipelines(manifest, work: Path, cores: int) -> dict[str, tuple[Callable, Callable]]:
    """name -> (a pass's batches, the labels of a batch), every pipeline over the same JPEGs."""
    import ray
    from torch.utils.data import DataLoader
    from torchvision import datasets
    from torchvision import transforms as T

    from pipeline.config import load_config
    from pipeline.data.readers.ray_reader import quiet_progress, split_dataset
    from pipeline.data.readers.stream_reader import make_stream_loader
    from pipeline.data.readers.transforms import IMAGENET_MEAN, IMAGENET_STD
    from pipeline.data.shards import read_split_table

    classic = [T.RandomResizedCrop(IMAGE_SIZE), T.RandomHorizontalFlip(), T.ToTensor()]
    image_folder = datasets.ImageFolder(
        str(write_image_folder(manifest, work / "folder")),
        transform=T.Compose([*classic, T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]),
    )
    table = read_split_table(manifest, "train")
    lit = litdata_loader(
        table.column("image").to_pylist(), table.column("label").to_pylist(), work / "lit", cores
    )
    settings = ["data.augment=imagenet", f"data.image_size={IMAGE_SIZE}"]
    settings.append(f"data.loader_workers={cores}")

    def stream(augment_on: str):
        cfg = load_config(None, [*settings, f"data.augment_on={augment_on}"]).data
        return make_stream_loader(manifest, "train", cfg, BATCH, train=True)

    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # lines per pass otherwise
    quiet_progress()

    def ray_data(uint8: bool):
        kwargs = {"augment": "imagenet", "train": True, "seed": 0, "image_size": IMAGE_SIZE}
        return split_dataset(manifest, "train", uint8=uint8, **kwargs)

    uint8_stream, float_stream = stream("device"), stream("loader")
    uint8_ray, float_ray = ray_data(True), ray_data(False)
    by_index, by_key = (lambda batch: batch[1]), (lambda batch: batch["label"])
    return {
        "torchvision ImageFolder + DataLoader (Pillow decode, PIL transforms), float": (
            lambda: DataLoader(image_folder, batch_size=BATCH, shuffle=True, num_workers=cores),
            by_index,
        ),
        "LitData StreamingDataset + StreamingDataLoader, whole decode + the same crop, uint8": (
            lambda: lit,
            by_index,
        ),
        "Ray-free streaming loader, uint8 crops (data.augment_on=device)": (
            lambda: uint8_stream,
            by_index,
        ),
        "Ray-free streaming loader, float (data.augment_on=loader)": (
            lambda: float_stream,
            by_index,
        ),
        "Ray Data (split_dataset -> iter_torch_batches), uint8 crops": (
            lambda: uint8_ray.iter_torch_batches(batch_size=BATCH),
            by_key,
        ),
        "Ray Data, float (data.augment_on=loader)": (
            lambda: float_ray.iter_torch_batches(batch_size=BATCH),
            by_key,
        ),
    }


def pipeline_rows(runs: dict[str, list[Pass]], cores: int, limits: list[float]) -> list[str]:
    """The pipelines' table; `limits`: the one-core limit (images/s) timed in each round."""
    rows = [
        "| pipeline | images/s per core | ratio to ImageFolder | share of the one-core limit "
        "| CPU busy | first batch after |",
        "|---|---|---|---|---|---|",
    ]
    baseline = next(iter(runs.values()))
    for name, passes in runs.items():
        per_core = statistics.median(p.rate for p in passes) / cores
        ratio = statistics.median(p.rate / b.rate for p, b in zip(passes, baseline, strict=True))
        share = statistics.median(
            p.rate / cores / lim for p, lim in zip(passes, limits, strict=True)
        )
        busy = statistics.median(p.busy for p in passes)
        first = statistics.median(p.first_wait for p in passes)
        rows.append(
            f"| {name} | {per_core:.0f} | {ratio:.2f}x | {share:.2f} "
            f"| {100 * busy:.0f}% | {first:.2f} s |"
        )
    return rows


def one_thread_rows(rates: dict[str, float], reference: str) -> list[str]:
    base = rates[reference]
    rows = ["| function | images/s | ratio to the first |", "|---|---|---|"]
    return rows + [f"| {name} | {rate:.0f} | {rate / base:.2f}x |" for name, rate in rates.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    # Enough images that the timed middle of a pass spans seconds and many Ray Data tasks: at
    # 2,400 it spanned one second, and where Ray Data's 64-image blocks fell against its ends
    # moved a pass's rate by a fifth.
    ap.add_argument("--images", type=int, default=6400)
    # Five rounds: on a shared host one pass moves by up to a fifth against the next
    # (bench/HISTORY.md, 2026-12-07 17:20), too much for a median of three to settle.
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()
    # torchvision.io warns on every decode that 0.29 deprecated it (pipeline/data/codec.py)
    warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")  # loader workers

    import ray

    from pipeline.data.manifest import read_manifest
    from tests.helpers.jpeg_shards import write_source_dataset

    cores = os.cpu_count() or 1
    work = scratch_dir("bench-decode-")
    classes = 8
    uri, encoded = write_source_dataset(
        work / "shards",
        {"train": [args.images // classes] * classes},
        rows_per_shard=IMAGES_PER_SHARD,
        side_range=SIDES,
        mixed_formats=False,
    )
    blobs = encoded["train"]
    candidates = crop_candidates()
    crops = one_thread_rates(blobs[:ONE_THREAD_IMAGES], candidates, repeats=args.passes)
    decoding = one_thread_rates(blobs[:ONE_THREAD_IMAGES], decoders(), repeats=args.passes)
    torch.set_num_threads(cores)
    found = pipelines(read_manifest(uri), work, cores)
    runs: dict[str, list[Pass]] = {name: [] for name in found}
    limit = {LIMIT: candidates[LIMIT]}
    limits = []
    for epoch in range(args.passes):
        limits.append(one_thread_rates(blobs[:ONE_THREAD_IMAGES], limit, repeats=2)[LIMIT])
        torch.set_num_threads(cores)  # one_thread_rates left one
        for name, (make, labels_of) in found.items():
            batches = make()
            if hasattr(getattr(batches, "dataset", None), "set_seed"):
                batches.dataset.set_seed(epoch)
            runs[name].append(timed_pass(batches, labels_of, len(blobs)))
    ray.shutdown()

    kb = sum(map(len, blobs)) / len(blobs) / 1e3
    lines = [
        f"{len(blobs)} generated RGB JPEGs (sides {SIDES[0]}-{SIDES[1]} px, quality 90, "
        f"{kb:.0f} kB on average), {cores} CPU cores; train preset `imagenet` at {IMAGE_SIZE} px, "
        f"batches of {BATCH}; median of {args.passes} passes, images/s between the 25% and 75% "
        "marks; ratio and share: medians over rounds of the figure within a round, the share "
        "against the one-core limit (the first row of the next table) timed on one thread, best "
        f"of 2 passes, at the round's start (median {statistics.median(limits):.0f} images/s); "
        f"the one-thread tables time the first {min(len(blobs), ONE_THREAD_IMAGES)} images",
        "",
        *pipeline_rows(runs, cores, limits),
        "",
        f"Decode + crop + flip to uint8, one thread, best of {args.passes} passes:",
        "",
        *one_thread_rows(crops, LIMIT),
        "",
        f"Decoders alone, one thread, best of {args.passes} passes:",
        "",
        *one_thread_rows(decoding, next(iter(decoding))),
    ]
    record(
        "decode_speed",
        "Decode + crop at 224 px: our readers, ImageFolder and LitData against one core's limit",
        "\n".join(lines),
        print_only=args.no_record,
    )


if __name__ == "__main__":
    main()
