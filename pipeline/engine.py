"""Ray-free training engine: the SHIKE two-stage recipe (SHIKE.md §2.3, §3.1).

Pure pieces: `lr_at` (the per-epoch schedule of both stages), `train_one_epoch`, `evaluate`.
`TrainingSession` holds the mutable state (model, optimizer, scaler, epoch, stage), performs the
stage switch and round-trips through a complete checkpoint dict. The distributed layer reuses it
with DDP-wrapped models and Ray Data batches; this module imports neither Ray nor MLflow.

    python -m pipeline.engine --config configs/smoke.yaml [--set optim.epochs=4 ...]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from pipeline.config import Config, ConfigError, OptimConfig, add_override_argument, load_config
from pipeline.data import DataError
from pipeline.cuda_graph_step import CapturedTrainStep
from pipeline.losses import build_objective
from pipeline.metrics import EvalCounts
from pipeline.models import build_model

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is left untouched."""


# ----------------------------------------------------------------------------- schedule


def _warmup_cosine(e: int, base: float, peak: float, warmup: int, length: int) -> float:
    """The released scheduler: linear warm-up that reaches `base` at e=1 and `peak` at e=warmup,
    then a half cosine from `peak` to 0 over the remaining epochs of the stage."""
    if e < warmup:
        return base + (peak - base) / max(warmup - 1, 1) * (e - 1)
    span = max(length - warmup, 1)
    return 0.5 * peak * (1.0 + math.cos(math.pi * (e - warmup) / span))


def stage_of(epoch: int, optim: OptimConfig) -> int:
    return 2 if epoch >= optim.stage2_start else 1


def lr_at(epoch: int, optim: OptimConfig) -> float:
    """Learning rate of `epoch` (0-based). Stage 1: 0.025..0.125 warm-up, 0.15 peak at epoch 5,
    cosine to ~0 at 179; stage 2 restarts: 0.0375..0.0875, 0.10 at 185, cosine to 0.0011 at 199."""
    if stage_of(epoch, optim) == 1:
        return _warmup_cosine(
            epoch, optim.lr, optim.peak_lr, optim.warmup_epochs, optim.stage2_start
        )
    return _warmup_cosine(
        epoch - optim.stage2_start,
        optim.stage2_lr,
        optim.stage2_peak_lr,
        optim.warmup_epochs,
        optim.epochs - optim.stage2_start,
    )


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of one epoch's shuffling and augmentation: a function of (run seed, epoch) only."""
    return (seed * 1_000_003 + epoch) % (2**63)


# ----------------------------------------------------------------------------- devices


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available")
    return torch.device(choice)


def autocast_for(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


# ----------------------------------------------------------------------------- epochs


def set_trainable(model: nn.Module, stage: int) -> list[nn.Parameter]:
    """Stage 1 trains everything but the stage-2 head bank; stage 2 trains only that bank.

    Parameters not trained in a stage get requires_grad=False, so DDP (built over the trainable
    set) neither waits for their gradients nor syncs them.
    """
    stage2_ids = {id(p) for p in model.stage2_head_parameters()}
    for p in model.parameters():
        p.requires_grad_((id(p) in stage2_ids) == (stage == 2))
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params: list[nn.Parameter], optim: OptimConfig, stage: int) -> torch.optim.SGD:
    lr = optim.lr if stage == 1 else optim.stage2_lr
    return torch.optim.SGD(
        params,
        lr=lr,
        momentum=optim.momentum,
        weight_decay=optim.weight_decay,
        nesterov=optim.nesterov,
    )


def train_one_epoch(
    model: nn.Module,
    objective: Callable,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    *,
    lr: float,
    device: torch.device,
    scaler: torch.amp.GradScaler,
    amp: bool = False,
    channels_last: bool = False,
) -> dict[str, float]:
    """One pass over `batches`. The model stays in train() mode in both stages: BN running
    statistics keep adapting during head re-training, as in the released code."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    sums: dict[str, torch.Tensor] = {}
    samples, steps = 0, 0
    start = time.perf_counter()
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, amp):
            logits = model(images)
        terms = objective(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(terms.total).backward()
        scaler.step(optimizer)
        scaler.update()
        for key, value in terms.parts.items():
            sums[key] = sums.get(key, 0.0) + value.detach() * labels.shape[0]
        samples += labels.shape[0]
        steps += 1
    return epoch_stats(sums, samples, steps, time.perf_counter() - start, lr)


class InputWait:
    """Iterates `batches` and adds up `seconds`, the wall time spent waiting for the next batch
    (the loader's start-up and end included): time the training step sat idle for its input.
    Its share of the epoch tells an input-bound epoch (near 1) from a compute-bound one (near 0);
    `first_seconds`, the wait for the first batch, is the part the loader's start-up costs.
    On CUDA the host may wait while queued kernels still run, so there it is an upper bound."""

    def __init__(self, batches: Batches) -> None:
        self.batches = batches
        self.seconds = 0.0
        self.first_seconds: float | None = None

    def __iter__(self):
        start = time.perf_counter()
        it = iter(self.batches)  # a DataLoader starts its workers here
        while True:
            batch = next(it, None)
            self.seconds += time.perf_counter() - start
            if self.first_seconds is None:
                self.first_seconds = self.seconds
            if batch is None:
                return
            yield batch
            start = time.perf_counter()


def epoch_stats(
    sums: dict[str, torch.Tensor], samples: int, steps: int, seconds: float, lr: float
) -> dict[str, float]:
    """Mean loss parts of an epoch (one host sync) and its throughput; raises on NaN/inf."""
    out = {k: float(v) / max(samples, 1) for k, v in sums.items()}
    if not all(math.isfinite(v) for v in out.values()):
        raise NonFiniteLossError(f"non-finite training loss: {out}")
    out.update(
        lr=lr,
        samples=samples,
        steps=steps,
        seconds=seconds,
        images_per_s=samples / max(seconds, 1e-9),
    )
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Batches,
    num_classes: int,
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
    logit_adjustment: torch.Tensor | None = None,
) -> tuple[EvalCounts, EvalCounts | None]:
    """Counts for the experts' mean logits (SHIKE.md §1.2), in eval() mode (BN running
    statistics); the caller's train/eval mode is restored afterwards.

    With `logit_adjustment` (e.g. tau * log class prior) a second set of counts is kept for the
    post-hoc adjusted logits `mean - adjustment`: during stage 1 this anticipates what stage-2
    balanced-softmax re-training will give, which is what a sweep should compare.
    """
    was_training = model.training
    model.eval()
    counts = EvalCounts(num_classes)
    adjusted = EvalCounts(num_classes) if logit_adjustment is not None else None
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, amp):
            mean_logits = model(images).float().mean(dim=0).cpu()
        counts.update(mean_logits, labels)
        if adjusted is not None:
            adjusted.update(mean_logits - logit_adjustment, labels)
    model.train(was_training)
    return counts, adjusted


# ----------------------------------------------------------------------------- session


class TrainingSession:
    """Mutable training state and the stage switch; the checkpoint is `state_dict()`.

    `wrap` turns the bare model into what forward/backward run through (identity here, DDP in
    the distributed layer); it is called again at the stage switch because the set of trainable
    parameters changes.
    """

    def __init__(
        self,
        cfg: Config,
        class_counts: list[int],
        device: torch.device,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        self.cfg = cfg
        self.class_counts = list(class_counts)
        self.device = device
        # The captured step replays one process's kernels; DDP's collectives are not in it.
        # Off CUDA the same static-buffer step runs uncaptured.
        self.cuda_graphs = cfg.train.cuda_graphs
        if self.cuda_graphs and wrap is not None:
            raise ConfigError("train.cuda_graphs is supported by the Ray-free engine only")
        self.wrap = wrap or (lambda m: m)
        self._captured: CapturedTrainStep | None = None
        torch.manual_seed(cfg.train.seed)  # model init is a function of the seed only
        self.model = build_model(cfg.model, len(class_counts)).to(device)
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp = cfg.train.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp)
        self.epoch = 0  # next epoch to run
        self._enter_stage(1)

    # -- stage handling
    def _enter_stage(self, stage: int) -> None:
        self.stage = stage
        self.model.set_stage(stage)
        params = set_trainable(self.model, stage)
        # Stage 2 gets a separate, new optimizer (SHIKE.md §2.3).
        self.optimizer = make_optimizer(params, self.cfg.optim, stage)
        scale = self.cfg.model.cosine_scale
        self.objective = build_objective(self.cfg.loss, stage, self.class_counts, scale)
        self.module = self.wrap(self.model)
        self._captured = None  # a graph holds an optimizer's buffers: capture again on use

    @property
    def finished(self) -> bool:
        return self.epoch >= self.cfg.optim.epochs

    def run_epoch(self, batches: Batches | Callable[[int], Batches]) -> dict[str, float]:
        """Train epoch `self.epoch` (switching stage first when it is due) and advance."""
        if stage_of(self.epoch, self.cfg.optim) != self.stage:
            self._enter_stage(stage_of(self.epoch, self.cfg.optim))
        torch.manual_seed(epoch_seed(self.cfg.train.seed, self.epoch))
        if callable(batches):
            batches = batches(self.epoch)
        batches = InputWait(batches)
        lr = lr_at(self.epoch, self.cfg.optim)
        if self.cuda_graphs:
            if self._captured is None:
                self._captured = CapturedTrainStep(
                    self.model, self.objective, self.optimizer, self.cfg.optim.batch_size
                )
            sums, samples, steps, seconds = self._captured.train_epoch(
                batches, lr, self.cfg.train.channels_last
            )
            stats = epoch_stats(sums, samples, steps, seconds, lr)
        else:
            stats = train_one_epoch(
                self.module,
                self.objective,
                self.optimizer,
                batches,
                lr=lr,
                device=self.device,
                scaler=self.scaler,
                amp=self.amp,
                channels_last=self.cfg.train.channels_last,
            )
        stats.update(
            epoch=self.epoch,
            stage=self.stage,
            input_wait=batches.seconds / max(stats["seconds"], 1e-9),
            input_start_s=batches.first_seconds or 0.0,
        )
        self.epoch += 1
        return stats

    def evaluate(
        self, batches: Batches, adjust: bool = False
    ) -> tuple[EvalCounts, EvalCounts | None]:
        """(counts, counts after post-hoc logit adjustment by tau * log prior, or None)."""
        adjustment = None
        if adjust:
            prior = torch.tensor(self.class_counts, dtype=torch.float32).clamp_min(1)
            adjustment = self.cfg.loss.tau * torch.log(prior / prior.sum())
        return evaluate(
            self.model,
            batches,
            len(self.class_counts),
            self.device,
            self.amp,
            self.cfg.train.channels_last,
            adjustment,
        )

    # -- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "config_hash": self.cfg.config_hash(),  # which exact config wrote it (MLflow tag)
            "recipe": self.cfg.recipe(),  # what a resume must match
            "epoch": self.epoch,
            "stage": self.stage,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self._enter_stage(int(state["stage"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        restore_rng_state(state["rng"])

    def save(self, directory: str | Path) -> Path:
        return save_checkpoint(directory, self.state_dict())

    def restore(self, directory: str | Path) -> None:
        self.load_state_dict(load_checkpoint(directory, expected_recipe=self.cfg.recipe()))


# ----------------------------------------------------------------------------- reporting


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_epoch_line(
    stats: dict[str, float], epochs: int, val: dict[str, Any] | None, eta_s: float
) -> str:
    line = (
        f"epoch {int(stats['epoch']) + 1:>3}/{epochs} stage {int(stats['stage'])} | "
        f"loss {stats['loss']:.4f} (ce {stats['loss_ce']:.4f} dkt {stats['loss_dkt']:.4f} "
        f"md {stats['loss_md']:.4f}) | lr {stats['lr']:.5f}"
    )
    if val is not None:
        line += f" | val acc {100 * val['acc']:.2f}%"
    return line + (
        f" | {stats['images_per_s']:.0f} img/s (input wait {100 * stats['input_wait']:.0f}%)"
        f" | eta {format_duration(eta_s)}"
    )


def format_results(split: str, results: dict[str, Any]) -> str:
    def pct(key: str) -> str:
        v = results.get(key, float("nan"))
        return "n/a" if v != v else f"{100 * v:.2f}%"

    return (
        f"{split}: top-1 {pct('acc')} | top-5 {pct('top5')} | many {pct('acc_many')} | "
        f"medium {pct('acc_medium')} | few {pct('acc_few')} | ECE {results['ece']:.4f} "
        f"({results['num_samples']} images)"
    )


# ----------------------------------------------------------------------------- CLI


def run(cfg: Config, checkpoint_dir: str | None = None, log: Callable[[str], None] = print) -> dict:
    """Train `cfg` start to finish (resuming from `checkpoint_dir` when it holds a checkpoint)."""
    from pipeline.data.torch_reader import load_longtailed, make_loader

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

    batch = cfg.optim.batch_size
    pin = device.type == "cuda"

    train_loader = make_loader(
        data.train, cfg.data, batch, train=True, pin_memory=pin, persistent=True
    )

    def train_batches(epoch: int):
        train_loader.sampler.set_seed(epoch_seed(cfg.train.seed, epoch))
        return train_loader

    val_loader = make_loader(data.val, cfg.data, 256, train=False, pin_memory=pin, persistent=True)
    history: list[dict] = []
    started = time.perf_counter()
    first_epoch = session.epoch
    while not session.finished:
        stats = session.run_epoch(train_batches)
        val = None
        if len(data.val.labels) and (session.epoch % cfg.train.eval_every == 0 or session.finished):
            val = session.evaluate(val_loader)[0].compute(class_counts=data.class_counts)
            stats["val_acc"] = val["acc"]
        done = session.epoch - first_epoch
        eta = (time.perf_counter() - started) / done * (cfg.optim.epochs - session.epoch)
        log(format_epoch_line(stats, cfg.optim.epochs, val, eta))
        history.append(stats)
        if checkpoint_dir and (session.epoch % cfg.train.checkpoint_every == 0 or session.finished):
            session.save(checkpoint_dir)
    test, _ = session.evaluate(make_loader(data.test, cfg.data, 256, train=False, pin_memory=pin))
    results = test.compute(class_counts=data.class_counts)
    log(format_results("test", results))
    wall = time.perf_counter() - started
    log(f"wall time {format_duration(wall)}")
    return {"history": history, "test": results, "session": session, "wall_seconds": wall}


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
