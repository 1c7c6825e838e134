"""Images/s of the SHIKE augmentation per image in the loader against whole batches on the
device (data.augment_on), on one split, in one run; then whole training epochs either way.

    python -m bench.augment_speed --data ../shared/data/cifar10 [--epochs 3] [--train-epochs 3]

1. Augmentation alone, over the training split of `--config` (CIFAR-10-LT IF100 by default):
   the loader path in-process (0 workers: per-image transforms, per-image seeding, collation)
   and the batched path (`pipeline.data.readers.batch_augment`), both with one torch thread, so the
   ratio is per CPU core; on a machine with CUDA, the batched path on the GPU too.
2. Training epochs of `--train-config` (configs/smoke.yaml: ResNet-32 SHIKE, 1,236 images)
   with each setting of data.augment_on, on this machine's device and all its cores: what
   decides the default.
Medians over `--epochs` / `--train-epochs` passes after one untimed pass each.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench.record import record
from bench.reproduce import data_override
from pipeline.config import load_config
from pipeline.data.readers.batch_augment import BatchAugment, augmented_batches, shuffled_batches
from pipeline.data.readers.torch_reader import load_longtailed, make_loader
from pipeline.seeding import epoch_seed
from pipeline.training.engine import in_memory_inputs
from pipeline.training.session import TrainingSession, resolve_device


def _median_rate(one_pass, passes: int) -> float:
    rates = []
    for i in range(passes + 1):
        start = time.perf_counter()
        n = one_pass(i)
        if i:  # the first pass is a warm-up
            rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def loader_rate(split, cfg, passes: int) -> float:
    loader = make_loader(split, cfg.data.model_copy(update={"loader_workers": 0}),
                         cfg.optim.batch_size, train=True)  # fmt: skip

    def one_pass(i: int) -> int:
        loader.sampler.set_seed(epoch_seed(0, i))
        return sum(len(labels) for _, labels in loader)

    return _median_rate(one_pass, passes)


def batched_rate(split, cfg, passes: int, device: torch.device) -> float:
    images = torch.from_numpy(split.images).permute(0, 3, 1, 2).contiguous().to(device)
    labels = torch.as_tensor(split.labels).to(device)
    augment = BatchAugment(cfg.data.augment)

    def one_pass(i: int) -> int:
        seed = epoch_seed(0, i)
        batches = shuffled_batches(images, labels, cfg.optim.batch_size, seed)
        n = sum(len(y) for _, y in augmented_batches(batches, augment, seed, device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return n

    return _median_rate(one_pass, passes)


def training_rate(config: str, data: str, augment_on: str, passes: int) -> float:
    cfg = load_config(config, [data_override(data), f"data.augment_on={augment_on}",
                               f"data.loader_workers={min(os.cpu_count() or 1, 4)}"])  # fmt: skip
    device = resolve_device(cfg.train.device)
    inputs = in_memory_inputs(cfg, device)
    session = TrainingSession(cfg, inputs.class_counts, device)
    session.start(None)

    def one_pass(i: int) -> int:
        session.epoch = 0  # stage-1 epochs only, whatever the count
        stats = session.run_epoch(inputs.train_batches(i))
        return int(stats["samples"])

    return _median_rate(one_pass, passes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/cifar10_lt_if100.yaml")
    ap.add_argument("--train-config", default="configs/smoke.yaml")
    ap.add_argument("--data", required=True, help="prepared shards or a raw source")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-epochs", type=int, default=3)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, [data_override(args.data)])
    split = load_longtailed(cfg.data).train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    loader = loader_rate(split, cfg, args.epochs)
    batched = batched_rate(split, cfg, args.epochs, torch.device("cpu"))
    rows = [
        "| augmentation (SHIKE preset) | where | images/s | vs loader |",
        "|---|---|---:|---:|",
        f"| per image, loader path (0 workers) | 1 CPU thread | {loader:,.0f} | 1.00x |",
        f"| whole batches (batch_augment) | 1 CPU thread | {batched:,.0f} | "
        f"{batched / loader:.2f}x |",
    ]
    gpu = torch.cuda.is_available()
    if gpu:
        torch.set_num_threads(threads)
        on_gpu = batched_rate(split, cfg, args.epochs, torch.device("cuda"))
        rows.append(
            f"| whole batches (batch_augment) | {torch.cuda.get_device_name(0)} | "
            f"{on_gpu:,.0f} | {on_gpu / loader:.2f}x |"
        )
    torch.set_num_threads(threads)
    device = resolve_device("auto")
    rows += [
        "",
        f"| training epochs ({args.train_config}) | device | images/s | vs loader |",
        "|---|---|---:|---:|",
    ]
    rates = {on: training_rate(args.train_config, args.data, on, args.train_epochs)
             for on in ("loader", "device")}  # fmt: skip
    for on, rate in rates.items():
        rows.append(
            f"| data.augment_on={on} | {device.type}, {threads} threads | {rate:,.0f} | "
            f"{rate / rates['loader']:.2f}x |"
        )
    text = (
        f"{len(split.labels)} training images ({args.config}), batch {cfg.optim.batch_size}; "
        f"medians of {args.epochs} passes (training: {args.train_epochs} epochs)\n\n"
        + "\n".join(rows)
    )
    record(
        "augment_gpu" if gpu else "augment",
        f"Augmentation in the loader against whole batches on the device ({'GPU machine' if gpu else 'CPU'})",
        text,
        print_only=args.no_record,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
