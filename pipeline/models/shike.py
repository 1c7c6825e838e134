"""SHIKE: a shared trunk, M experts with their own last stage, shallow adapters and DKF.

Paper notation (SHIKE.md §1) -> code:

    f_s  output of shared stage s (1-based)          `feats[s - 1]` in `ShikeNet.forward_features`
    d_m  expert m's deep feature (its own last stage) `ExpertBranch.deep`
    a_m  expert m's shallow feature, f_{src(m)} brought
         to d_m's resolution/width ("ShallowExpert")  `ExpertBranch.adapter` (a `ShallowAdapter`)
    g_m  Depth-wise Knowledge Fusion, d_m ⊙ a_m       `ExpertBranch.fusion` (`DepthwiseKnowledgeFusion`)
    h_m  global-average-pooled g_m                    output of `ExpertBranch`
    z_m  expert m's (cosine) logits                   `classifiers[m]` / `rt_classifiers[m]`

One `ShikeNet` serves every backbone: the backbone files (`resnet_cifar.py`,
`resnet_imagenet.py`) only supply a `Trunk` (stem, shared stages, a factory for the per-expert
stage). Two head banks exist per expert: `classifiers` for stage 1 and `rt_classifiers`, freshly
initialised, for the stage-2 classifier re-training (SHIKE.md §2.3). `set_stage` only switches
which bank `forward` uses; freezing everything else is the training engine's job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pipeline.models.heads import kaiming_linear_, make_head

ADAPTER_RELU_MODES = ("code", "on", "off")
FUSION_MODES = ("product", "sum", "concat")


@dataclass
class Trunk:
    """Backbone pieces a `ShikeNet` is assembled from.

    stem:           input -> features entering shared stage 1
    shared:         shared stages 1..S, run in order; stage s outputs f_s
    shared_channels channel count of each f_s
    make_deep:      returns a fresh per-expert last stage (input f_S, output d_m)
    deep_channels:  channel count of d_m (also the pooled feature size fed to the heads)
    """

    stem: nn.Module
    shared: list[nn.Module]
    shared_channels: list[int]
    make_deep: Callable[[], nn.Module]
    deep_channels: int


def adapter_relu_flags(depth: int, mode: str) -> list[bool]:
    """Which adapter units end in a ReLU.

    "code": every unit except index 1, as released (so a depth-2 adapter ends without ReLU and
            can output negatives while a depth-1 adapter ends with one; SHIKE.md §6 item 3).
    "on":   after every unit.
    "off":  after every unit but the last.
    """
    if mode == "code":
        return [i != 1 for i in range(depth)]
    if mode == "on":
        return [True] * depth
    if mode == "off":
        return [i != depth - 1 for i in range(depth)]
    raise ValueError(f"unknown adapter_final_relu {mode!r}: expected one of {ADAPTER_RELU_MODES}")


class ShallowAdapter(nn.Sequential):
    """The paper's "Down Sampling" / the code's ShallowExpert: f_src -> a_m.

    `depth` units of [3x3 conv, stride 2, pad 1, no bias, channels x2] + BN (+ ReLU per
    `adapter_relu_flags`). Each unit halves the resolution and doubles the width, which is what
    takes a shallow stage's output to the shape of the last stage's output.
    """

    def __init__(self, in_channels: int, depth: int, relu_mode: str = "code") -> None:
        units: list[nn.Module] = []
        channels = in_channels
        for relu in adapter_relu_flags(depth, relu_mode):
            layers: list[nn.Module] = [
                nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(channels * 2),
            ]
            if relu:
                layers.append(nn.ReLU(inplace=True))
            units.append(nn.Sequential(*layers))
            channels *= 2
        super().__init__(*units)
        self.depth = depth
        self.out_channels = channels


class DepthwiseKnowledgeFusion(nn.Module):
    """DKF: combine the deep feature d_m with the shallow feature a_m into g_m.

    "product" (released code and paper, ⊗ in the figure): g = d ⊙ a.
    "sum":    g = d + a.
    "concat": g = 1x1 conv (no bias) over cat([d, a]) back to d's channel count.
    """

    def __init__(self, mode: str, channels: int) -> None:
        super().__init__()
        if mode not in FUSION_MODES:
            raise ValueError(f"unknown fusion {mode!r}: expected one of {FUSION_MODES}")
        self.mode = mode
        # Always present (None unless "concat") so the attribute set is fixed for scripting.
        self.proj: nn.Module | None = (
            nn.Conv2d(2 * channels, channels, 1, bias=False) if mode == "concat" else None
        )

    def forward(self, d: Tensor, a: Tensor) -> Tensor:
        if self.mode == "product":
            return d * a
        if self.mode == "sum":
            return d + a
        assert self.proj is not None
        return self.proj(torch.cat([d, a], dim=1))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class ExpertBranch(nn.Module):
    """Everything private to expert m up to the head: (f_S, f_src) -> h_m.

    Without DKF (`adapter is None`, the "SHIKE w/o DKF" ablation and the single-expert
    baseline) g_m = d_m.
    """

    def __init__(
        self,
        deep: nn.Module,
        source: int,
        adapter: nn.Module | None = None,
        fusion: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.deep = deep
        self.source = source  # 1-based shared stage feeding the adapter
        self.adapter = adapter
        self.fusion = fusion
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, top: Tensor, shallow: Tensor) -> Tensor:
        g = self.deep(top)  # d_m
        if self.adapter is not None and self.fusion is not None:
            g = self.fusion(g, self.adapter(shallow))  # g_m = DKF(d_m, a_m)
        return torch.flatten(self.pool(g), 1)  # h_m


def default_sources(num_experts: int, num_shared: int) -> list[int]:
    """The released rule generalised: expert m reads shared stage (m mod S) + 1.

    ResNet-32 (S=2): [1, 2, 1]; 4-stage trunks (S=3): [1, 2, 3], cycling for M > 3.
    """
    return [(m % num_shared) + 1 for m in range(num_experts)]


class ShikeNet(nn.Module):
    """Multi-expert network; `forward(x)` returns every expert's logits stacked as (M, B, C).

    Construction order follows SHIKE.md §1.4: the trunk, the deep branches and the heads exist
    first and (optionally) receive Kaiming-normal init; the adapters and DKF projections are
    created afterwards and keep PyTorch's default init.
    """

    stage2_head_prefix: str = "rt_classifiers"

    def __init__(
        self,
        trunk: Trunk,
        num_classes: int,
        num_experts: int = 3,
        expert_sources: Sequence[int] | None = None,
        dkf: bool = True,
        fusion: str = "product",
        adapter_relu: str = "code",
        head: str = "cosine",
        cosine_scale: float = 30.0,
        kaiming_convs: bool = True,
    ) -> None:
        super().__init__()
        num_shared = len(trunk.shared)
        if expert_sources is None:
            expert_sources = default_sources(num_experts, num_shared)
        sources = [int(s) for s in expert_sources]
        if len(sources) != num_experts:
            raise ValueError(f"{len(sources)} expert sources given for {num_experts} experts")
        if any(not 1 <= s <= num_shared for s in sources):
            raise ValueError(f"expert sources {sources} out of range 1..{num_shared}")

        self.num_classes = num_classes
        self.num_experts = num_experts
        self.feature_dim = trunk.deep_channels
        self.expert_sources = sources
        self.stage = 1

        self.stem = trunk.stem
        self.shared = nn.ModuleList(trunk.shared)
        self.experts = nn.ModuleList(ExpertBranch(trunk.make_deep(), source) for source in sources)
        self.classifiers = nn.ModuleList(
            make_head(head, self.feature_dim, num_classes, cosine_scale) for _ in sources
        )
        self.rt_classifiers = nn.ModuleList(
            make_head(head, self.feature_dim, num_classes, cosine_scale) for _ in sources
        )

        # Kaiming-normal (fan_in) on Conv2d and Linear, as the released code does, *before*
        # the adapters exist. Torchvision trunks come initialised already (kaiming_convs=False);
        # linear heads get the same Kaiming init everywhere. NormedLinear keeps its own init.
        for module in self.modules():
            if isinstance(module, nn.Conv2d) and kaiming_convs:
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.Linear):
                kaiming_linear_(module)

        if dkf:
            for branch in self.experts:
                # k = S - src + 1 stride-2 units: one per shared stage skipped, plus the expert's
                # own stage (ResNet-32: stage 1 -> 2 units, stage 2 -> 1 unit).
                depth = num_shared - branch.source + 1
                adapter = ShallowAdapter(
                    trunk.shared_channels[branch.source - 1], depth, adapter_relu
                )
                if adapter.out_channels != trunk.deep_channels:
                    raise ValueError(
                        f"adapter from stage {branch.source} ends at {adapter.out_channels} "
                        f"channels, expert stage has {trunk.deep_channels}"
                    )
                branch.adapter = adapter
                branch.fusion = DepthwiseKnowledgeFusion(fusion, trunk.deep_channels)

    # ---- stages -----------------------------------------------------------------------------

    def set_stage(self, stage: int) -> None:
        """Select the head bank `forward` uses: 1 = `classifiers`, 2 = `rt_classifiers`."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        self.stage = int(stage)

    def stage2_head_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the stage-2 head bank only (what stage 2 trains)."""
        return self.rt_classifiers.parameters()

    @property
    def adapter_depths(self) -> list[int]:
        """Units per expert adapter; 0 where the expert has none (dkf off)."""
        return [b.adapter.depth if b.adapter is not None else 0 for b in self.experts]

    # ---- forward ----------------------------------------------------------------------------

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Pooled per-expert features [h_0, ..., h_{M-1}], each (B, feature_dim)."""
        x = self.stem(x)
        feats: list[Tensor] = []
        for stage in self.shared:
            x = stage(x)
            feats.append(x)  # f_1 .. f_S
        return [branch(x, feats[branch.source - 1]) for branch in self.experts]

    def forward(self, x: Tensor) -> Tensor:
        hs = self.forward_features(x)
        # Two explicit loops rather than picking a bank into a variable: TorchScript can only
        # iterate a ModuleList that it can name statically.
        logits: list[Tensor] = []
        if self.stage == 1:
            for m, head in enumerate(self.classifiers):
                logits.append(head(hs[m]))
        else:
            for m, head in enumerate(self.rt_classifiers):
                logits.append(head(hs[m]))
        return torch.stack(logits)  # (M, B, C)
