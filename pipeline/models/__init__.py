"""Models: SHIKE multi-expert networks, baselines and inference wrappers.

Everything else in the pipeline codes against three names:

    model = build_model(cfg.model, num_classes)   # ShikeNet
    logits = model(x)                              # (M, B, C): every expert's logits
    probs = ImageClassifier(model, mean, std, class_names)(uint8_nhwc)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.models.heads import NormedLinear, make_head
from pipeline.models.inference import ExpertInference, ImageClassifier
from pipeline.models.resnet_cifar import resnet32, shike_resnet32
from pipeline.models.resnet_imagenet import load_pretrained, shike_imagenet
from pipeline.models.shike import DepthwiseKnowledgeFusion, ExpertBranch, ShallowAdapter, ShikeNet

if TYPE_CHECKING:
    from pipeline.config import ModelConfig

__all__ = [
    "DepthwiseKnowledgeFusion",
    "ExpertBranch",
    "ExpertInference",
    "ImageClassifier",
    "NormedLinear",
    "ShallowAdapter",
    "ShikeNet",
    "build_model",
    "load_pretrained",
    "make_head",
]

_IMAGENET_ARCHS = {
    "shike_resnet18": "resnet18",
    "shike_resnet50": "resnet50",
    "shike_resnext50": "resnext50",
    "shike_resnet152": "resnet152",
}


def build_model(cfg: ModelConfig, num_classes: int) -> ShikeNet:
    """Build `cfg.arch` for `num_classes` classes; forward gives (M, B, C) logits."""
    if cfg.arch == "resnet32":  # single expert, no adapter; num_experts/dkf do not apply
        return resnet32(num_classes, head=cfg.head, cosine_scale=cfg.cosine_scale)
    kwargs = dict(
        num_experts=cfg.num_experts,
        expert_sources=cfg.expert_sources,
        dkf=cfg.dkf,
        fusion=cfg.fusion,
        adapter_relu=cfg.adapter_final_relu,
        head=cfg.head,
        cosine_scale=cfg.cosine_scale,
    )
    if cfg.arch == "shike_resnet32":
        return shike_resnet32(num_classes, **kwargs)
    if cfg.arch in _IMAGENET_ARCHS:
        return shike_imagenet(_IMAGENET_ARCHS[cfg.arch], num_classes, **kwargs)
    raise ValueError(f"unknown model.arch {cfg.arch!r}")
