"""Classifier heads: the cosine ("NormedLinear") head SHIKE uses, and a plain linear one.

SHIKE.md §1.1 step 5: every expert ends in a bias-free cosine classifier

    z_c = s * < h / ||h|| , w_c / ||w_c|| >        (s = cfg.cosine_scale = 30)

so each logit lies in [-s, s]. That bound matters elsewhere: the DKT loss masks the target slot
with -s, "the lowest value a 30-scaled cosine can take" (SHIKE.md §2.2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NormedLinear(nn.Module):
    """Scaled cosine-similarity classifier without bias.

    The weight uses nn.Linear's (out_features, in_features) layout, so row c is the class
    vector w_c. Init: uniform in [-1, 1], then every w_c rescaled to unit L2 norm (the
    released code does the same on a transposed weight via renorm; the forward pass normalises
    anyway, so only the direction of the init matters).
    """

    def __init__(self, in_features: int, out_features: int, scale: float = 30.0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.weight.uniform_(-1.0, 1.0)
        self.weight.div_(self.weight.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def forward(self, h: Tensor) -> Tensor:
        # cos(h, w_c) for all classes at once, then the fixed temperature s.
        return self.scale * F.linear(F.normalize(h, dim=1), F.normalize(self.weight, dim=1))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"
        )


def make_head(kind: str, in_features: int, num_classes: int, scale: float = 30.0) -> nn.Module:
    """One classifier head: "cosine" (SHIKE) or "linear" (nn.Linear with bias, for baselines)."""
    if kind == "cosine":
        return NormedLinear(in_features, num_classes, scale)
    if kind == "linear":
        return nn.Linear(in_features, num_classes, bias=True)
    raise ValueError(f"unknown head kind {kind!r}: expected 'cosine' or 'linear'")


def kaiming_linear_(layer: nn.Linear) -> None:
    """Kaiming-normal weight (fan_in, ReLU gain), bias back to nn.Linear's default range.

    The released code re-initialises every nn.Linear this way; only the weight is touched there,
    so the bias keeps PyTorch's default uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """
    nn.init.kaiming_normal_(layer.weight)
    if layer.bias is not None:
        bound = 1.0 / math.sqrt(layer.in_features)
        nn.init.uniform_(layer.bias, -bound, bound)
