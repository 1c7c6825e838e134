"""Inference wrappers: the expert ensemble (SHIKE.md §1.2) and the registry-facing classifier.

`ExpertInference` averages the current stage's per-expert logits: plain arithmetic mean, no
gating or logit adjustment. `ImageClassifier` is what the model registry stores: raw uint8 RGB
images in, class probabilities out, with preprocessing baked in so serving needs no transforms.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class ExpertInference(nn.Module):
    """(B, 3, H, W) float -> (B, C): mean over experts of `model(x)`'s (M, B, C) logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x).mean(dim=0)


class ImageClassifier(nn.Module):
    """uint8 RGB batch (N, H, W, 3) -> softmax probabilities (N, C).

    Preprocessing mirrors the test transform (to-tensor, normalise). The forward pass has no
    Python-side branching on data, so it traces, scripts and exports.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        class_names: Sequence[str],
    ) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}")
        self.net = model if isinstance(model, ExpertInference) else ExpertInference(model)
        self.register_buffer(
            "mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        )
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self.class_names: list[str] = [str(c) for c in class_names]

    def forward(self, images: Tensor) -> Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0  # NHWC uint8 -> NCHW [0, 1]
        x = (x - self.mean) / self.std
        return torch.softmax(self.net(x).float(), dim=1)
