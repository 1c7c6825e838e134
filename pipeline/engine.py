"""The Ray-free engine: the SHIKE recipe on one machine with PyTorch alone (no Ray, no MLflow).

It drives `pipeline.fit` with torch DataLoaders over the decoded splits and keeps its checkpoint
in a local folder; the GPU machine (which has neither Ray nor MLflow) trains the paper recipe
with it.

    python -m pipeline.engine --config configs/smoke.yaml [--set optim.epochs=4 ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pipeline.checkpoint import CheckpointError
from pipeline.config import Config, ConfigError, add_override_argument, load_config
from pipeline.data import DataError
from pipeline.data.torch_reader import load_longtailed, make_loader
from pipeline.fit import EpochEnd, fit
from pipeline.seeding import epoch_seed
from pipeline.session import NonFiniteLossError, TrainingSession, resolve_device


def run(cfg: Config, checkpoint_dir: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Train `cfg` start to finish (resuming from `checkpoint_dir` when it holds a checkpoint)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN time its algorithms
    data = load_longtailed(cfg.data)
    log(
        f"data: {data.name} train {len(data.train.labels)} / val {len(data.val.labels)} / "
        f"test {len(data.test.labels)} images, {data.num_classes} classes; device {device}"
    )
    session = TrainingSession(cfg, data.class_counts, device)
    if checkpoint_dir and (Path(checkpoint_dir) / "state.pt").exists():
        session.restore(checkpoint_dir)
        log(f"resumed from {checkpoint_dir} at epoch {session.epoch}")

    pin = device.type == "cuda"
    # One loader for the whole run: its workers live as long as it does (see make_loader).
    train_loader = make_loader(
        data.train, cfg.data, cfg.optim.batch_size, train=True, pin_memory=pin, persistent=True
    )

    def train_batches(epoch: int):
        train_loader.sampler.set_seed(epoch_seed(cfg.train.seed, epoch))
        return train_loader

    def save_when_due(end: EpochEnd) -> None:
        if checkpoint_dir and end.checkpoint_due:
            session.save(checkpoint_dir)

    def eval_loader(split, persistent: bool = False):
        return make_loader(split, cfg.data, 256, train=False, pin_memory=pin, persistent=persistent)

    started = time.perf_counter()
    ends = fit(
        session,
        train_batches,
        val_batches=eval_loader(data.val, persistent=True) if len(data.val.labels) else None,
        test_batches=eval_loader(data.test),
        on_epoch_end=save_when_due,
        log=log,
    )
    history = [
        {**end.train, **({"val_acc": end.val.results["acc"]} if end.val else {})}
        for end in ends
        if end.train is not None
    ]
    return {
        "history": history,
        "test": ends[-1].test.results,
        "session": session,
        "wall_seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.engine",
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
    except (ConfigError, DataError, CheckpointError, NonFiniteLossError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
