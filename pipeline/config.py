"""Typed, validated configuration: YAML presets plus dotted command-line overrides.

One `Config` object drives a run end to end. Every section forbids unknown keys, so a typo
(`loss.dkt_wieght=5`) fails loudly instead of silently training the default. Defaults reproduce
the authors' CIFAR-100-LT IF100 recipe (SHIKE.md §3.1); presets in `configs/` only override.

    cfg = load_config("configs/smoke.yaml", overrides=["loss.dkt_weight=5"])
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Settings that decide how and where a run executes, not what it trains: a checkpoint resumes
# under other values of these (another machine, device, precision, memory layout, loader,
# storage or tracking server), while any other difference is refused (`Config.recipe`).
EXECUTION_SETTINGS = frozenset(
    {
        "data.source",
        "data.uri",
        "data.loader_workers",
        "data.augment_on",
        "data.decode_on",
        "train.device",
        "train.amp",
        "train.channels_last",
        "train.cuda_graphs",
        "train.threads",
        "train.eval_every",
        "train.test_from_epoch",
        "train.checkpoint_every",
        "cluster.use_gpu",
        "cluster.cpus_per_worker",
        "cluster.storage_path",
        "cluster.max_failures",
        "cluster.num_to_keep",
        "cluster.data_cpus",
        "cluster.stall_timeout_s",
        "tracking.tracking_uri",
        "tracking.experiment",
        "tracking.model_name",
        "tracking.register_model",
    }
)


class ConfigError(ValueError):
    """A configuration problem, with a one-line message naming the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# The augmentation presets for images kept at their own size (pipeline.data.readers.transforms).
CIFAR_AUGMENTS = ("shike", "basic", "none")


class DataConfig(_Section):
    # Which raw dataset; decides class count and the long-tail head size (n_max).
    dataset: Literal[
        "cifar10", "cifar100", "imagefolder", "imagenet_lt", "inat2018", "places_lt"
    ] = "cifar100"
    # Raw source for the in-memory builder (a Parquet folder like ../shared/data/cifar10, a
    # cifar-*-python archive or folder). None: the CIFAR10_DIR / CIFAR100_DIR environment variable.
    source: str | None = None
    # Prepared long-tailed shards (manifest URI). When set, training reads these instead.
    uri: str | None = None
    imbalance_factor: float = Field(100.0, ge=1.0)
    # Images of the head class; None: the dataset's full per-class count (500 / 5000).
    n_max: int | None = Field(None, ge=1)
    # SHIKE takes the first n_i images per class in source order; LDAM-style loaders shuffle.
    selection: Literal["first", "shuffle"] = "first"
    selection_seed: int = 0
    val_per_class: int = Field(20, ge=0)
    # Cap on test images per class (None: the whole official test set); smoke runs only.
    test_per_class: int | None = Field(None, ge=1)
    # CIFAR: "shike" (SHIKE.md §3.1), "basic" (crop + flip), "none". Large benchmarks:
    # "imagenet" (RandomResizedCrop + flip), "imagenet_jitter" (+ colour jitter 0.4),
    # "randaugment" (+ RandAugment); evaluation resizes to image_size / 0.875 and centre-crops.
    augment: Literal["shike", "basic", "none", "imagenet", "imagenet_jitter", "randaugment"] = (
        "shike"
    )
    # Side of the square images the model sees (CIFAR: the images' own 32).
    image_size: int = Field(32, ge=8)
    loader_workers: int = Field(2, ge=0)
    # Where the augmentation runs. "device" (and "auto"): images reach the training step as uint8
    # and its device augments whole batches (pipeline.data.readers.batch_augment): for the CIFAR
    # presets the whole preset; for the ImageNet-style ones the readers crop and flip on the
    # CPU (sizes vary) and the device does the colour ops and normalisation. Per CPU core this
    # decodes more images, and on a GPU node it frees the few CPUs a GPU has (BENCHMARKS.md).
    # "loader": everything per image, in loader workers or Ray Data tasks.
    augment_on: Literal["auto", "loader", "device"] = "auto"
    # Where the training split's source JPEGs are decoded and cropped (uint8 batches only,
    # pipeline.data.readers.device_decode). "device": the readers ship the encoded bytes and the
    # training GPU decodes them with nvJPEG, freeing the node's CPUs; "cpu": in loader workers
    # or Ray Data tasks; "auto": "device" where the workers train on CUDA on source images.
    decode_on: Literal["auto", "cpu", "device"] = "auto"

    @property
    def augments_on_device(self) -> bool:
        """Whether images reach the training step as uint8 batches that its device finishes
        augmenting and normalises (pipeline.data.readers.batch_augment)."""
        return self.augment_on != "loader"


CIFAR_ARCHS = ("shike_resnet32", "resnet32")


class ModelConfig(_Section):
    arch: Literal[
        "shike_resnet32",  # the paper's CIFAR network (SHIKE.md §1.1)
        "resnet32",  # single-expert baseline, same trunk
        "shike_resnet18",  # narrow 4-stage trunk (smoke runs)
        "shike_resnet50",
        "shike_resnext50",
        "shike_resnet152",
    ] = "shike_resnet32"
    num_experts: int = Field(3, ge=1, le=8)
    # Shared stage that feeds each expert's shallow adapter (1-based). None: the code's rule,
    # [1, 2, 1] on ResNet-32 (m mod 2) and [1, 2, 3] on 4-stage trunks.
    expert_sources: list[int] | None = None
    # Depth-wise Knowledge Fusion on/off (ablation "SHIKE without DKF": g_m = d_m).
    dkf: bool = True
    fusion: Literal["product", "sum", "concat"] = "product"
    # "code": ReLU after every adapter unit except the second (index 1), as released.
    adapter_final_relu: Literal["code", "on", "off"] = "code"
    head: Literal["cosine", "linear"] = "cosine"
    cosine_scale: float = Field(30.0, gt=0)
    # A torchvision state-dict file (local path or s3://) whose weights initialise the trunk
    # (4-stage archs; e.g. ImageNet weights for Places-LT). Loaded weights-only, never downloaded.
    pretrained: str | None = None

    @model_validator(mode="after")
    def _check_sources(self) -> ModelConfig:
        if self.expert_sources is not None:
            if len(self.expert_sources) != self.num_experts:
                raise ValueError(
                    f"model.expert_sources has {len(self.expert_sources)} entries but "
                    f"model.num_experts is {self.num_experts}"
                )
            max_stage = 2 if self.arch in CIFAR_ARCHS else 3
            bad = [s for s in self.expert_sources if not 1 <= s <= max_stage]
            if bad:
                raise ValueError(
                    f"model.expert_sources {bad} out of range: shared stages are 1..{max_stage}"
                )
        if self.pretrained and self.arch in CIFAR_ARCHS:
            raise ValueError(
                f"model.pretrained takes torchvision ResNet weights: {self.arch} is a CIFAR "
                "ResNet-32 (use a 4-stage arch, e.g. shike_resnet50)"
            )
        return self


class LossConfig(_Section):
    # Stage-1 objective. "shike" = CE + DKT + mutual distillation; baselines use the others.
    stage1: Literal["shike", "ce", "balanced_softmax"] = "shike"
    # Stage-2 (classifier re-training) objective; SHIKE uses balanced softmax.
    stage2: Literal["balanced_softmax", "ce"] = "balanced_softmax"
    ce_weight: float = Field(1.0, ge=0)
    dkt_weight: float = Field(10.0, ge=0)  # λ_hn; hard-coded 10 in the code
    md_weight: float = Field(1.0, ge=0)  # λ_mu; implicit 1 in the code
    temperature: float = Field(1.0, gt=0)
    teacher_detach: bool = False
    # Target slot of (teacher, student): "code" = (0, -s); "neg_scale" = (-s, -s); "neg_inf" masks both.
    target_slot: Literal["code", "neg_scale", "neg_inf"] = "code"
    hardest_negative: Literal["mean", "min", "mean_margin"] = "mean"
    hardest_negative_margin: float = Field(0.0, ge=0)
    # The code's kl_div reduction is "mean" over B*C elements; "batchmean" is per sample.
    kl_reduction: Literal["mean", "batchmean"] = "mean"
    tau: float = Field(1.0, ge=0)  # logit adjustment strength of balanced softmax


class OptimConfig(_Section):
    epochs: int = Field(200, ge=1)
    # First epoch of stage 2 (classifier re-training). == epochs: single-stage training.
    stage2_start: int = Field(180, ge=1)
    batch_size: int = Field(128, ge=1)
    # The scheduler's nominal LR is not its peak: warm-up climbs to peak_lr (SHIKE.md §3.1).
    lr: float = Field(0.05, gt=0)
    peak_lr: float = Field(0.15, gt=0)
    stage2_lr: float = Field(0.05, gt=0)
    stage2_peak_lr: float = Field(0.10, gt=0)
    warmup_epochs: int = Field(5, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False

    @model_validator(mode="after")
    def _check_stages(self) -> OptimConfig:
        if self.stage2_start > self.epochs:
            raise ValueError(
                f"optim.stage2_start ({self.stage2_start}) must be <= optim.epochs ({self.epochs})"
            )
        if self.warmup_epochs == 1:
            raise ValueError("optim.warmup_epochs must be 0 (no warm-up) or >= 2")
        # The released warm-up is linear through `lr` at epoch 1 and `peak_lr` at warmup_epochs,
        # so epoch 0 runs at lr - (peak_lr - lr) / (warmup_epochs - 1): it must stay positive.
        for base, peak, name in (
            (self.lr, self.peak_lr, "lr"),
            (self.stage2_lr, self.stage2_peak_lr, "stage2_lr"),
        ):
            if self.warmup_epochs >= 2 and base - (peak - base) / (self.warmup_epochs - 1) <= 0:
                raise ValueError(
                    f"optim.{name}={base} with peak {peak} and {self.warmup_epochs} warm-up epochs "
                    "gives a non-positive learning rate at the first epoch"
                )
        return self


class TrainConfig(_Section):
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # autocast + GradScaler; only takes effect on CUDA
    channels_last: bool = False
    # Capture the whole step as one CUDA graph (Ray-free engine; needs amp=false). Off CUDA
    # the same step runs uncaptured.
    cuda_graphs: bool = False
    threads: int | None = Field(None, ge=1)  # torch intra-op threads; None: torch default
    eval_every: int = Field(1, ge=1)
    # Also evaluate the test split after every epoch from this one (1-based) on, to compare
    # the last epoch (what a run reports) with the best of its last epochs (what some peers
    # report). None: the test split is evaluated once, after the last epoch.
    test_from_epoch: int | None = Field(None, ge=1)
    checkpoint_every: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check_graphs(self) -> TrainConfig:
        if self.cuda_graphs and self.amp:
            raise ValueError(
                "train.cuda_graphs needs train.amp=false: GradScaler's overflow check reads a "
                "flag back to the host, which a captured CUDA graph cannot do"
            )
        return self


class ClusterConfig(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: Literal["auto", "true", "false"] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    # Where Ray Train keeps checkpoints: a local folder or s3://bucket/prefix.
    storage_path: str = "./runs"
    max_failures: int = Field(0, ge=-1)
    num_to_keep: int = Field(2, ge=1)
    # CPUs that Ray Data's input tasks need beside the Train workers: every read and decode
    # task asks for 1 logical CPU (Ray's default), so below 1 no input task can run and the
    # workers starve. Checked before training and at every worker-group (re)start
    # (pipeline.distributed.capacity): a cluster too small, or one that lost a node, fails
    # with the numbers instead of stalling.
    data_cpus: float = Field(1.0, ge=1.0)
    # Seconds a worker may wait for its next training batch (the first of an epoch includes
    # Ray Data's start-up) before the run fails naming the stall; also Ray Data's own
    # no-progress limit. Ray's defaults wait 1,800 s (Ray Data, and gloo's collectives), which
    # made a lost node cost 30 minutes per retry; 300 s leaves slow storage ample room.
    stall_timeout_s: float = Field(300.0, gt=0, le=1800)

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _yaml_bool(cls, value: Any) -> Any:
        # YAML (a config file, --set cluster.use_gpu=false) reads true/false as booleans
        return str(value).lower() if isinstance(value, bool) else value


class TrackingConfig(_Section):
    # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
    tracking_uri: str | None = None
    experiment: str = "shike"
    # None: derived from the dataset, e.g. shike-cifar100-lt-if100.
    model_name: str | None = None
    register_model: bool = True


class Config(_Section):
    name: str = "shike"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    cluster: ClusterConfig = ClusterConfig()
    tracking: TrackingConfig = TrackingConfig()

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def config_hash(self) -> str:
        """Stable hash of every setting; stored in checkpoints to refuse a mismatched resume."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def recipe(self) -> dict[str, Any]:
        """The settings that decide what a run trains (all but EXECUTION_SETTINGS), dotted keys;
        a checkpoint stores them and resumes only under the same recipe."""
        return {k: v for k, v in self.flat().items() if k not in EXECUTION_SETTINGS}

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (`loss.dkt_weight`) for logging as params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{dotted}': '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` -> (key.sub, parsed value). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.subkey=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{text}': value is not valid YAML ({exc})") from exc
    return key, value


def _format_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "config"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        return f"unknown config key '{loc}'"
    if "input" in err and not isinstance(err["input"], dict):
        return f"invalid value for '{loc}': {msg} (got {err['input']!r})"
    return f"invalid config '{loc}': {msg}"


def build_config(
    tree: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> Config:
    """Validate `tree` after applying `key=value` strings, then typed `{dotted key: value}`."""
    data: dict[str, Any] = json.loads(json.dumps(tree or {}))
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
    for key, value in (values or {}).items():
        _set_dotted(data, key, value)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None


def add_override_argument(parser, example: str = "loss.dkt_weight=5") -> None:
    """The `--set key.sub=value` option every command-line entry point shares."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key, e.g. --set {example} (repeatable)",
    )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML preset (or the defaults when path is None) and apply `key=value` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    return build_config(tree, overrides)
