"""The whole training step captured once as a CUDA graph and replayed (`train.cuda_graphs`).

SHIKE's CIFAR ResNet-32 at batch 128 is far too small to keep a GPU busy: in eager PyTorch a
step is bound by launching about a thousand small kernels from Python, not by arithmetic.
Capturing forward, objective, backward and the SGD update once and replaying them removes the
launch overhead without changing any operation of the recipe.

What makes the step capturable:
- Static inputs: each full batch is copied into the captured input buffers before a replay.
- The learning rate lives in a device tensor, refilled each epoch. `torch.optim.SGD` reads a
  tensor learning rate with `.item()` (a host sync, which capture forbids), so the update inside
  the graph is `sgd_update` below: `torch.optim.SGD`'s arithmetic on its own momentum buffers.
- Warm-up: the first steps of each stage run eagerly through the session's `torch.optim.SGD`
  on a side stream (cuDNN chooses its algorithms, the momentum buffers come into existence).
  They are real training steps of the epoch, not extra ones.
- No GradScaler (its overflow check reads a flag back to the host): `train.amp` must be off;
  the step runs in float32 with cuDNN's TF32 convolutions.
- The last, partial batch of an epoch has another shape; it runs eagerly, and the gradients
  the graph writes to are put aside meanwhile.

Resuming from a checkpoint is exact up to rounding in this mode: the first steps after a
restore are warm-up steps through `torch.optim.SGD`, whose update rounds differently from
`sgd_update` in the last bit.

Off CUDA nothing is captured and the same static-buffer step runs as it is, so everything but
the capture itself is tested on machines without a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch
from torch import Tensor, nn


@torch.no_grad()
def sgd_update(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    lr: Tensor,
    *,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
) -> None:
    """One `torch.optim.SGD` step (dampening 0) for existing momentum buffers, with a tensor
    learning rate: g += wd * p; b = m * b + g; p -= lr * (nesterov ? g + m * b : b)."""
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum:
        torch._foreach_mul_(momentum_buffers, momentum)
        torch._foreach_add_(momentum_buffers, grads)
        if nesterov:
            grads = torch._foreach_add(grads, momentum_buffers, alpha=momentum)
        else:
            grads = momentum_buffers
    torch._foreach_sub_(params, torch._foreach_mul(grads, lr))


class CapturedTrainStep:
    """Trains epochs of one stage through a captured CUDA graph of the full step.

    Built per (model, objective, optimizer) triple: a new stage or a restored optimizer needs a
    new one. `train_epoch` returns what `train_one_epoch` accumulates: per-part loss sums
    (weighted by batch size, still on the device), samples and steps.
    """

    def __init__(
        self,
        model: nn.Module,
        objective: Callable,
        optimizer: torch.optim.SGD,
        batch_size: int,
        warmup_steps: int = 3,
    ) -> None:
        if len(optimizer.param_groups) != 1:
            raise ValueError("CapturedTrainStep expects one optimizer parameter group")
        group = optimizer.param_groups[0]
        if group.get("dampening", 0) or group.get("maximize", False):
            raise ValueError("CapturedTrainStep implements SGD without dampening or maximize")
        self.model = model
        self.objective = objective
        self.optimizer = optimizer
        self.group = group
        self.params: list[Tensor] = list(group["params"])
        self.batch_size = batch_size
        self.warmup_steps = warmup_steps
        self.eager_steps = 0
        self.device = self.params[0].device
        self.sums = {k: torch.zeros((), device=self.device) for k in self.objective.part_names}
        self.lr = torch.zeros((), device=self.device)
        # Off CUDA there is nothing to capture: the same static-buffer step runs uncaptured
        # (what the tests on machines without a GPU exercise).
        self.cuda = self.device.type == "cuda"
        self.captured = False
        self.graph: torch.cuda.CUDAGraph | None = None
        self._side_stream = torch.cuda.Stream(self.device) if self.cuda else None

    def _on_side_stream(self):
        """Warm-up work runs on a side stream, as CUDA graph capture requires."""
        if not self.cuda:
            return nullcontext()
        self._side_stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self._side_stream)

    # -- eager steps (warm-up and partial batches), through torch.optim.SGD
    def _eager_step(self, images: Tensor, labels: Tensor) -> None:
        # Keep the captured gradient buffers out of the way: the graph writes to them.
        static_grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        with self._on_side_stream():
            terms = self.objective(self.model(images), labels)
            terms.total.backward()
            self.optimizer.step()
            for k in self.objective.part_names:
                self.sums[k] += terms.parts[k] * labels.shape[0]
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._side_stream)
        for p, g in zip(self.params, static_grads, strict=True):
            p.grad = g if self.captured else None  # capture allocates them from its pool
        self.eager_steps += 1

    # -- the captured step
    def _step(self) -> None:
        """Forward, objective, backward and SGD update on the static buffers."""
        for p in self.params:
            p.grad = None  # backward writes fresh gradients (in a graph: into its own pool)
        terms = self.objective(self.model(self.static_images), self.static_labels)
        terms.total.backward()
        live = [p for p in self.params if p.grad is not None]
        momentum = self.group["momentum"]
        sgd_update(
            live,
            [p.grad for p in live],
            [self.optimizer.state[p]["momentum_buffer"] for p in live] if momentum else [],
            self.lr,
            momentum=momentum,
            weight_decay=self.group["weight_decay"],
            nesterov=self.group["nesterov"],
        )
        for k in self.objective.part_names:
            self.sums[k] += terms.parts[k] * self.batch_size

    def _capture(self, images: Tensor, labels: Tensor) -> None:
        self.static_images = images.clone()
        self.static_labels = labels.clone()
        self.captured = True
        if not self.cuda:
            return
        self.graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize(self.device)
        with torch.cuda.graph(self.graph):
            self._step()

    def train_epoch(
        self, batches: Iterable[tuple[Tensor, Tensor]], lr: float, channels_last: bool = False
    ) -> tuple[dict[str, Tensor], int, int, float]:
        """(loss-part sums, samples, steps, seconds) of one pass over `batches` at `lr`."""
        self.group["lr"] = lr  # the eager steps' learning rate
        self.lr.fill_(lr)
        for v in self.sums.values():
            v.zero_()
        self.model.train()
        samples = steps = 0
        start = time.perf_counter()
        for images, labels in batches:
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            full = labels.shape[0] == self.batch_size
            if full and not self.captured and self.eager_steps >= self.warmup_steps:
                self._capture(images, labels)
            if full and self.captured:
                self.static_images.copy_(images)
                self.static_labels.copy_(labels)
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self._step()
            else:
                self._eager_step(images, labels)
            samples += labels.shape[0]
            steps += 1
        sums = {k: v.clone() for k, v in self.sums.items()}
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return sums, samples, steps, time.perf_counter() - start
