"""JPEG decode + RandomResizedCrop(224) + flip for the large benchmarks: one CPU core per image
(what the streaming readers do today) against nvJPEG batch decoding and the crop on the GPU.

    python -m bench.gpu_decode [--images 512] [--batch 64] [--passes 3] [--no-record]

PyTorch and torchvision only (runs on the GPU machine). The JPEGs are generated in memory
(sides 375-500 px, quality 90, smooth content plus noise, about ImageNet's size). The CPU
figure is per core (one torch thread); multiply by the cores a GPU has on its node to compare
with the GPU's. Without CUDA only the CPU row is measured. Medians of `--passes` passes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
from torchvision.transforms import v2

from bench.record import record
from pipeline.data.readers.device_decode import decode_crops

IMAGE_SIZE = 224


def generated_jpegs(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        h, w = (int(s) for s in torch.randint(375, 501, (2,), generator=g))
        coarse = torch.rand(3, h // 16 + 1, w // 16 + 1, generator=g)
        smooth = torch.nn.functional.interpolate(coarse[None], size=(h, w), mode="bilinear")[0]
        pixels = (smooth * 200 + torch.rand(3, h, w, generator=g) * 55).to(torch.uint8)
        out.append(encode_jpeg(pixels, quality=90))
    return out


def _rate(one_pass, n: int, passes: int) -> float:
    rates = []
    for i in range(passes + 1):
        start = time.perf_counter()
        one_pass()
        if i:
            rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    jpegs = generated_jpegs(args.images)
    augment = v2.Compose(
        [v2.RandomResizedCrop(IMAGE_SIZE, antialias=True), v2.RandomHorizontalFlip()]
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def on_cpu() -> None:
        for blob in jpegs:
            augment(decode_jpeg(blob, ImageReadMode.RGB))

    cpu = _rate(on_cpu, len(jpegs), args.passes)
    torch.set_num_threads(threads)
    kb = sum(b.numel() for b in jpegs) / len(jpegs) / 1e3
    rows = [
        "| decode + RandomResizedCrop 224 + flip | where | images/s | vs one CPU core |",
        "|---|---|---:|---:|",
        f"| decode_jpeg, per image | 1 CPU core | {cpu:,.0f} | 1.00x |",
    ]
    if torch.cuda.is_available():
        device = torch.device("cuda")

        def on_gpu() -> None:
            for start in range(0, len(jpegs), args.batch):
                images = decode_jpeg(
                    jpegs[start : start + args.batch], ImageReadMode.RGB, device=device
                )
                torch.stack([augment(image) for image in images])
            torch.cuda.synchronize(device)

        blobs = [bytes(blob.numpy()) for blob in jpegs]
        seeds = list(range(len(blobs)))
        ids = [str(i) for i in seeds]

        def ours() -> None:  # what a Ray Train worker runs with data.decode_on=device
            for start in range(0, len(blobs), args.batch):
                part = slice(start, start + args.batch)
                decode_crops(blobs[part], ids[part], seeds[part], IMAGE_SIZE, device)
            torch.cuda.synchronize(device)

        gpu, steps = _rate(on_gpu, len(jpegs), args.passes), _rate(ours, len(jpegs), args.passes)
        name = torch.cuda.get_device_name(0)
        rows += [
            f"| decode_jpeg(device=cuda), batches of {args.batch}; crop per image on the GPU | "
            f"{name} | {gpu:,.0f} | {gpu / cpu:.2f}x |",
            f"| device_decode.decode_crops (data.decode_on=device), batches of {args.batch} | "
            f"{name} | {steps:,.0f} | {steps / cpu:.2f}x |",
        ]
    text = (
        f"{len(jpegs)} generated JPEGs (sides 375-500 px, quality 90, {kb:.0f} kB on average); "
        f"median of {args.passes} passes\n\n" + "\n".join(rows)
    )
    gpu_machine = torch.cuda.is_available()
    record(
        "gpu_decode" if gpu_machine else "gpu_decode_cpu",
        "JPEG decode + crop: CPU core against the GPU",
        text,
        print_only=args.no_record or not gpu_machine,  # the CPU row alone goes nowhere
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
