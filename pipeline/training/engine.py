"""The Ray-free engine: the SHIKE recipe on one machine with PyTorch alone (no Ray, no MLflow).

It drives `pipeline.training.fit` with torch DataLoaders and keeps its checkpoint in a local folder; the
GPU machine (which has neither Ray nor MLflow) trains the paper recipe with it. Input: CIFAR-style
datasets are decoded whole into memory (pipeline.data.readers.torch_reader); datasets of source images
(`data.uri` whose manifest says `image.encoding: source`: ImageNet-LT, iNaturalist 2018,
Places-LT) are streamed shard by shard (pipeline.data.readers.stream_reader).

    python -m pipeline.training.engine --config configs/smoke.yaml [--set optim.epochs=4 ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import Config, ConfigError, add_override_argument, load_config
from pipeline.data import DataError
from pipeline.data.manifest import Manifest, data_identity, read_manifest
from pipeline.data.readers.batch_augment import (
    BatchAugment,
    FinishedBatches,
    augmented_batches,
    shuffled_batches,
)
from pipeline.data.readers.device_decode import decoded_batches, decodes_on_device
from pipeline.data.readers.stream_reader import make_stream_loader
from pipeline.data.readers.torch_reader import LongTailedData, load_longtailed, make_loader
from pipeline.seeding import epoch_seed
from pipeline.storage import StorageError
from pipeline.training.checkpoint import CheckpointError
from pipeline.training.fit import EpochEnd, fit
from pipeline.training.session import NonFiniteLossError, TrainingSession, resolve_device

EVAL_BATCH = 256


@dataclass
class Inputs:
    """What the run reads: each epoch's training batches and the evaluation splits' batches."""

    summary: str  # "<dataset> train N / val N / test N images, C classes"
    class_counts: list[int]
    train_batches: Callable[[int], Iterable]
    val_batches: Iterable | None
    test_batches: Iterable | None


def in_memory_inputs(
    cfg: Config, device: torch.device, data: LongTailedData | None = None
) -> Inputs:
    """CIFAR-style splits decoded whole (`data`, when the caller has them decoded already).
    The training split is either kept whole on the device as uint8 and augmented there a batch
    at a time (`data.augment_on`), or read by one loader for the whole run (its workers live as
    long as it does, see make_loader)."""
    data = data or load_longtailed(cfg.data)
    pin = device.type == "cuda"
    if cfg.data.augments_on_device:
        images = torch.from_numpy(data.train.images).permute(0, 3, 1, 2).contiguous().to(device)
        labels = torch.as_tensor(data.train.labels, dtype=torch.int64).to(device)
        augment = BatchAugment(cfg.data.augment)

        def train_batches(epoch: int):
            seed = epoch_seed(cfg.train.seed, epoch)
            batches = shuffled_batches(images, labels, cfg.optim.batch_size, seed)
            return augmented_batches(batches, augment, seed, device)

    else:
        train = make_loader(
            data.train, cfg.data, cfg.optim.batch_size, train=True, pin_memory=pin, persistent=True
        )

        def train_batches(epoch: int):
            train.sampler.set_seed(epoch_seed(cfg.train.seed, epoch))
            return train

    def evaluation(split, persistent: bool = False):
        return make_loader(
            split, cfg.data, EVAL_BATCH, False, pin_memory=pin, persistent=persistent
        )

    where = "on the device" if cfg.data.augments_on_device else "in the loader"
    return Inputs(
        summary=f"{data.name} train {len(data.train.labels)} / val {len(data.val.labels)} / "
        f"test {len(data.test.labels)} images, {data.num_classes} classes; "
        f"augmented {where}",
        class_counts=data.class_counts,
        train_batches=train_batches,
        val_batches=evaluation(data.val, persistent=True) if len(data.val.labels) else None,
        test_batches=evaluation(data.test),
    )


def streamed_inputs(
    cfg: Config, manifest: Manifest, device: torch.device, decode_on_device: bool = False
) -> Inputs:
    """Source images streamed from the shards, decoded and cropped in the loader workers (or,
    `decode_on_device`, the training split decoded and cropped on the device); the rest of the
    preset on the training device (`data.augment_on`), or in the loader too."""
    pin = device.type == "cuda"
    train = make_stream_loader(
        manifest,
        "train",
        cfg.data,
        cfg.optim.batch_size,
        train=True,
        pin_memory=pin,
        encoded=decode_on_device,
    )
    augment = BatchAugment(cfg.data.augment) if cfg.data.augments_on_device else None

    def train_batches(epoch: int):
        seed = epoch_seed(cfg.train.seed, epoch)
        train.dataset.set_seed(seed)
        if augment is None:
            return train
        if decode_on_device:
            train_crops = decoded_batches(train, seed, cfg.data.image_size, device)
        else:
            train_crops = train
        return augmented_batches(train_crops, augment, seed, device)

    def evaluation(split: str, per_class: int | None = None):
        info = manifest.splits.get(split)
        if info is None or not info.num_rows:
            return None
        return make_stream_loader(
            manifest, split, cfg.data, EVAL_BATCH, False, pin_memory=pin, per_class=per_class
        )

    val, test = evaluation("val"), evaluation("test", cfg.data.test_per_class)
    where = "; training split decoded on the device" if decode_on_device else ""
    rows = [0 if loader is None else loader.dataset.num_rows for loader in (train, val, test)]
    if augment is not None:  # uint8 evaluation crops: normalised on the device
        val, test = (
            None if split is None else FinishedBatches(split, augment, device)
            for split in (val, test)
        )
    return Inputs(
        summary=f"{manifest.dataset} train {rows[0]} / val {rows[1]} / test {rows[2]} images "
        f"(streamed at {cfg.data.image_size} px{where}), {manifest.num_classes} classes",
        class_counts=list(manifest.class_counts),
        train_batches=train_batches,
        val_batches=val,
        test_batches=test,
    )


def run(cfg: Config, checkpoint_dir: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Train `cfg` start to finish (resuming from `checkpoint_dir` when it holds a checkpoint)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its algorithms
    manifest = read_manifest(cfg.data.uri) if cfg.data.uri else None
    encoding = manifest.image.encoding if manifest is not None else "decoded"
    dataset = manifest.uri if manifest is not None else cfg.data.dataset
    on_device = decodes_on_device(cfg.data, encoding, device.type == "cuda", dataset)
    if encoding == "source":
        inputs = streamed_inputs(cfg, manifest, device, on_device)  # images of varying size
    else:
        inputs = in_memory_inputs(cfg, device)
    log(f"data: {inputs.summary}; device {device}")
    # A checkpoint of prepared shards records them, and resumes only on the same data.
    data = data_identity(manifest) if manifest is not None else None
    session = TrainingSession(cfg, inputs.class_counts, device, data_identity=data)
    resume = checkpoint_dir and (Path(checkpoint_dir) / "state.pt").exists()
    session.start(checkpoint_dir if resume else None)
    if resume:
        log(f"resumed from {checkpoint_dir} at epoch {session.epoch}")

    def save_when_due(end: EpochEnd) -> None:
        if checkpoint_dir and end.checkpoint_due:
            session.save(checkpoint_dir)

    started = time.perf_counter()
    ends = fit(
        session,
        inputs.train_batches,
        val_batches=inputs.val_batches,
        test_batches=inputs.test_batches,
        on_epoch_end=save_when_due,
        log=log,
    )
    history = [
        {
            **end.train,
            **({"val_acc": end.val.results["acc"]} if end.val else {}),
            **({"test_acc": end.test.results["acc"]} if end.test else {}),
        }
        for end in ends
        if end.train is not None
    ]
    last = ends[-1]
    return {
        "history": history,
        "test": last.test.results if last.test is not None else None,
        "val": last.val.results if last.val is not None else None,
        "session": session,
        "wall_seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.training.engine",
        description="Train SHIKE with the Ray-free engine (no Ray, no MLflow).",
    )
    parser.add_argument("--config", required=True, help="YAML preset, e.g. configs/smoke.yaml")
    add_override_argument(parser, "loss.dkt_weight=5")
    parser.add_argument(
        "--checkpoint-dir",
        default=None,
        help="save the complete state here every train.checkpoint_every epochs; resume from it if present",
    )
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg, args.checkpoint_dir)
    except (ConfigError, DataError, StorageError, CheckpointError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
