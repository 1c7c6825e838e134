"""One training run's state and its epochs, without Ray or MLflow (SHIKE.md §2.3, §3.1).

`train_one_epoch` and `evaluate` are pure functions of their arguments. `TrainingSession` holds
the mutable state (model, optimizer, scaler, epoch, stage), performs the stage switch and
round-trips through a complete checkpoint dict. Both drivers use it: the Ray-free engine
(pipeline.training.engine) and the Ray Train worker (pipeline.distributed.worker), which wraps the model
in DDP through `wrap`; the epoch loop around it is pipeline.training.fit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.config import Config, ConfigError, OptimConfig
from pipeline.evaluation.metrics import EvalCounts
from pipeline.losses import build_objective, logit_adjustment
from pipeline.models import build_model, load_pretrained
from pipeline.seeding import epoch_seed
from pipeline.training.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    load_pretrained_weights,
    restore_rng_state,
    save_checkpoint,
)
from pipeline.training.cuda_graph_step import CapturedTrainStep
from pipeline.training.schedule import lr_at, stage_of

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]

# The captured step replays one process's kernels: DDP's collectives cannot be in it.
ENGINE_ONLY_GRAPHS = (
    "train.cuda_graphs is supported by the Ray-free engine only "
    "(python -m pipeline.training.engine)"
)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is left untouched."""


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


class TrainingSession:
    """Mutable training state and the stage switch; the checkpoint is `state_dict()`.

    `wrap` turns the bare model into what forward/backward run through (identity here, DDP in
    the distributed layer); it is called again at the stage switch because the set of trainable
    parameters changes. `data_identity` (`pipeline.data.manifest.data_identity` of the data
    the driver reads) goes into every checkpoint, and a checkpoint of other data is refused on
    resume; None (a driver that does not know its manifest) records and checks nothing.
    """

    def __init__(
        self,
        cfg: Config,
        class_counts: list[int],
        device: torch.device,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        data_identity: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.data_identity = dict(data_identity) if data_identity else None
        self.class_counts = list(class_counts)
        self.device = device
        # The captured step replays one process's kernels; DDP's collectives are not in it.
        # Off CUDA the same static-buffer step runs uncaptured.
        self.cuda_graphs = cfg.train.cuda_graphs
        if self.cuda_graphs and wrap is not None:
            raise ConfigError(ENGINE_ONLY_GRAPHS)
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
        # τ·log n; softmax ignores the constant by which it differs from τ·log(n / Σn).
        adjustment = logit_adjustment(self.class_counts, self.cfg.loss.tau) if adjust else None
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
            "data": self.data_identity,  # ... and the data it was trained on
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

    def start(self, checkpoint_dir: str | Path | None) -> None:
        """Resume from `checkpoint_dir`, else start fresh: from `model.pretrained` when it is
        set (read only here, so a resumed run does not fetch weights it would overwrite)."""
        if checkpoint_dir is not None:
            self.restore(checkpoint_dir)
        elif self.cfg.model.pretrained:
            load_pretrained(self.model, load_pretrained_weights(self.cfg.model.pretrained))

    def save(self, directory: str | Path) -> Path:
        return save_checkpoint(directory, self.state_dict())

    def restore(self, directory: str | Path) -> None:
        self.load_state_dict(
            load_checkpoint(
                directory, expected_recipe=self.cfg.recipe(), expected_data=self.data_identity
            )
        )
