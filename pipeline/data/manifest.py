"""`manifest.json`: what a prepared dataset vouches for (the `Manifest` model), its file form,
and `read_manifest`, which checks it before anything trusts it.

The model mirrors the JSON file key for key (schema version 1), so pydantic both validates
what is read and writes it back unchanged. Bad manifests are an IntegrityError naming the
file and the field.

The manifest vouches for itself too: publishing seals it (`Manifest.seal`) with
`manifest_sha256`, the sha256 of its canonical JSON without that key (`content_checksum`), so a
hand edit that keeps the file valid (two class counts swapped, their sum unchanged) is refused
on read instead of silently changing class priors. Manifests published before the seal have no
`manifest_sha256` and are still read (prepared datasets and the fixtures under tests/fixtures
stay usable); for them, and against a re-sealed edit, `pipeline.data.integrity.verify_dataset`
counts the shards' labels against the manifest.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import pyarrow as pa
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

from pipeline.data import DataError, IntegrityError
from pipeline.data.longtail import FEW_MAX_EXCLUSIVE, MANY_MIN_EXCLUSIVE
from pipeline.storage import S3Options, display, join, read_bytes, resolve

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")
# The manifest's own checksum: sha256 (hex) of its canonical JSON without this key.
CHECKSUM_KEY = "manifest_sha256"
# Training rows are written in one seeded random order, not class by class: streaming readers
# (Ray Data) shuffle only within a local buffer of about a thousand rows, which cannot mix a
# split stored as 5,000 head-class rows followed by the next class's. Manifests written before
# this have no "train_row_order" and read as "class".
TRAIN_ROW_ORDER = "shuffled"
TRAIN_ROW_ORDER_SEED = 0
# Training images per class of the many / medium / few class_groups (longtail.lt_group).
GROUP_THRESHOLDS = {
    "many": f"> {MANY_MIN_EXCLUSIVE}",
    "medium": f"{FEW_MAX_EXCLUSIVE}..{MANY_MIN_EXCLUSIVE}",
    "few": f"< {FEW_MAX_EXCLUSIVE}",
}


def shard_schema(with_coarse: bool) -> pa.Schema:
    """The Arrow schema of every shard (the data contract's columns)."""
    fields = [
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
    ]
    if with_coarse:
        fields.append(pa.field("coarse_label", pa.int64(), nullable=False))
    return pa.schema(fields)


class ShardInfo(BaseModel):
    path: str  # relative to the dataset root, "train/part-00000-<hash>.parquet"
    num_rows: int
    bytes: int
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

    @field_validator("path")
    @classmethod
    def _inside_the_dataset(cls, path: str) -> str:
        if path.startswith("/") or ".." in path.split("/") or "://" in path:
            raise ValueError(f"shard path {path!r} must be relative to the dataset")
        return path


class SplitInfo(BaseModel):
    num_rows: int
    class_counts: list[int]
    shards: list[ShardInfo]

    @model_validator(mode="after")
    def _rows_add_up(self) -> SplitInfo:
        if sum(s.num_rows for s in self.shards) != self.num_rows:
            raise ValueError(f"shard rows do not add up to num_rows {self.num_rows}")
        if sum(self.class_counts) != self.num_rows:
            raise ValueError(f"class_counts do not add up to num_rows {self.num_rows}")
        return self


class Selection(BaseModel):
    rule: str  # longtail.SELECTION_RULES
    seed: int


class SizeStats(BaseModel):
    min: int
    median: int
    max: int


class ImageInfo(BaseModel):
    """The shards' images. CIFAR-style datasets: every image `height` x `width`, PNG-encoded.
    Large benchmarks (ImageNet-LT, iNaturalist 2018, Places-LT): the source files' own encoded
    bytes (`encoding` "source", mostly JPEG), sizes varying (`height`/`width` None) and
    described by `sizes` (the training split's min / median / max height and width)."""

    height: int | None
    width: int | None
    channels: int = 3
    encoding: Literal["png", "source"] = "png"
    sizes: dict[str, SizeStats] | None = None  # {"height": ..., "width": ...}
    # "source" shards prepared with --max-side: images whose longer side exceeded it were
    # shrunk to it and re-encoded as JPEG (the others keep their bytes); None: no image changed.
    max_side: int | None = None

    @model_validator(mode="after")
    def _fixed_or_described(self) -> ImageInfo:
        if (self.height is None) != (self.width is None):
            raise ValueError("height and width are both set (fixed size) or both null (varying)")
        if self.height is None and self.sizes is None:
            raise ValueError("images of varying size need 'sizes' (min/median/max)")
        return self

    @property
    def fixed_size(self) -> bool:
        return self.height is not None

    @model_serializer(mode="wrap")
    def _without_absent_sizes(self, handler: Any) -> dict[str, Any]:
        # Fixed-size manifests keep the layout they always had: no "sizes" / "max_side" key.
        data = handler(self)
        for key in ("sizes", "max_side"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class Column(BaseModel):
    name: str
    type: str  # the Arrow type as text, "int64"


def _dumps(obj: Any, indent: str = "") -> str:
    """Indented JSON with lists of scalars kept on one line (readable for 100 classes)."""
    inner = indent + "  "
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {_dumps(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + _dumps(v, inner) for v in obj) + "\n" + indent + "]"
    return json.dumps(obj, ensure_ascii=False)


def content_checksum(doc: Mapping[str, Any]) -> str:
    """The manifest checksum of `doc` (the manifest as plain JSON types): sha256 hex of
    `json.dumps(doc without "manifest_sha256", sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)` encoded as UTF-8. Canonical, so the file's layout does not matter,
    only its content."""
    body = {key: value for key, value in doc.items() if key != CHECKSUM_KEY}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def seal_document(doc: Mapping[str, Any]) -> dict[str, Any]:
    """`doc` with its `manifest_sha256` (re)computed: what publishing writes. For tools that
    rewrite a manifest on purpose; a sealed edit still has to match the shards' labels
    (`pipeline.data.integrity.verify_dataset`)."""
    return {**doc, CHECKSUM_KEY: content_checksum(doc)}


class Manifest(BaseModel):
    """What `manifest.json` vouches for (fields in file order), plus where it was read from
    (`uri`, `filesystem`, `root`: the pyarrow filesystem and the dataset folder's path in it)."""

    schema_version: int
    dataset: str
    source: dict[str, str]  # path, format, checksum
    # How the long-tailed subset was drawn (CIFAR-style datasets). Benchmarks that ship their
    # own long-tailed lists (ImageNet-LT, iNaturalist 2018, Places-LT) record their
    # imbalance factor (max / min training images per class) and head size, and no rule.
    imbalance_factor: float
    n_max: int
    selection: Selection | None = None
    val_per_class: int | None = None
    test_per_class: int | None = None
    num_classes: int
    class_names: list[str]
    coarse_class_names: list[str] | None = None
    class_counts: list[int]  # training images per class
    # How the training rows are ordered in the shards; the file holds {"order": ..., "seed": ...}.
    train_row_order: str = "class"
    class_groups: dict[str, list[int]]  # many / medium / few
    class_group_thresholds: dict[str, str] = Field(default_factory=lambda: dict(GROUP_THRESHOLDS))
    image: ImageInfo
    columns: list[Column]
    splits: dict[str, SplitInfo]
    # Splits stored once and listed under two names, {"test": "val"}: iNaturalist 2018 has no
    # held-out split besides its val set, which the literature reports as its test set, so
    # "test" lists the very shard files of "val". Absent from the file when None.
    split_aliases: dict[str, str] | None = None
    # `content_checksum` of the published file; None in manifests published before the seal
    # (accepted: see the module docstring). Absent from the file when None.
    manifest_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    uri: str = Field("", exclude=True)
    filesystem: Any = Field(None, exclude=True, repr=False)
    root: str = Field("", exclude=True)

    @field_validator("schema_version")
    @classmethod
    def _supported_version(cls, version: int) -> int:
        if version != SCHEMA_VERSION:
            raise ValueError(f"{version} is not supported (this code reads {SCHEMA_VERSION})")
        return version

    @field_validator("train_row_order", mode="before")
    @classmethod
    def _order_of(cls, value: Any) -> Any:
        return value.get("order") if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _consistent_class_count(self) -> Manifest:
        if self.num_classes != len(self.class_names):
            raise ValueError(
                f"num_classes is {self.num_classes} but there are {len(self.class_names)} class_names"
            )
        for name, split in self.splits.items():
            if len(split.class_counts) != self.num_classes:
                raise ValueError(
                    f"splits.{name}.class_counts has {len(split.class_counts)} entries for "
                    f"{self.num_classes} classes"
                )
        if len(self.class_counts) != self.num_classes:
            raise ValueError(
                f"class_counts has {len(self.class_counts)} entries for {self.num_classes} classes"
            )
        return self

    @model_validator(mode="after")
    def _priors_are_the_training_split(self) -> Manifest:
        # `class_counts` are the class priors of training (balanced softmax, logit adjustment,
        # many/medium/few): they must be the training split's own counts.
        train = self.splits.get("train")
        if train is not None and train.class_counts != self.class_counts:
            c = next(
                i
                for i, (a, b) in enumerate(zip(self.class_counts, train.class_counts, strict=True))
                if a != b
            )
            raise ValueError(
                f"class_counts[{c}] is {self.class_counts[c]} but splits.train.class_counts[{c}] "
                f"is {train.class_counts[c]}"
            )
        return self

    @model_validator(mode="after")
    def _aliases_share_shards(self) -> Manifest:
        for alias, target in (self.split_aliases or {}).items():
            if alias not in self.splits or target not in self.splits:
                raise ValueError(f"split_aliases: {alias} -> {target} names a split not in splits")
            if self.splits[alias] != self.splits[target]:
                raise ValueError(f"split_aliases: splits.{alias} must list the shards of {target}")
        return self

    @model_serializer(mode="wrap")
    def _without_absent_optionals(self, handler: Any) -> dict[str, Any]:
        # Manifests without aliases or seal keep the layout they always had (fixtures round-trip).
        data = handler(self)
        for key in ("split_aliases", CHECKSUM_KEY):
            if data.get(key) is None:
                data.pop(key, None)
        return data

    @property
    def has_coarse(self) -> bool:
        return self.coarse_class_names is not None

    @property
    def image_shape(self) -> list[int]:
        """[H, W, 3] of every image; only for fixed-size datasets (see `ImageInfo`)."""
        if not self.image.fixed_size:
            raise DataError(f"{self.uri}: the images of {self.dataset} vary in size")
        return [self.image.height, self.image.width, 3]

    @property
    def arrow_schema(self) -> pa.Schema:
        return shard_schema(self.has_coarse)

    def split_info(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise DataError(f"{self.uri}: no split '{split}' (has {', '.join(self.splits)})")
        return self.splits[split]

    def shard_paths(self, split: str) -> list[str]:
        """Filesystem paths (for `self.filesystem`) of the split's shards, in order."""
        return [join(self.root, s.path) for s in self.split_info(split).shards]

    def shard_uris(self, split: str) -> list[str]:
        fs = self.filesystem
        return [display(fs, p) if fs is not None else p for p in self.shard_paths(split)]

    @field_serializer("train_row_order")
    def _order_as_stored(self, order: str) -> dict[str, Any]:
        if order == TRAIN_ROW_ORDER:
            return {"order": order, "seed": TRAIN_ROW_ORDER_SEED}
        return {"order": order}

    def to_dict(self) -> dict[str, Any]:
        """The manifest as stored in `manifest.json` (plain JSON types)."""
        return self.model_dump(mode="json")

    def to_json(self) -> bytes:
        return (_dumps(self.to_dict()) + "\n").encode()

    def seal(self) -> Manifest:
        """Set `manifest_sha256` to the checksum of the current content (publishing does it
        last, just before writing the file); returns self."""
        self.manifest_sha256 = content_checksum(self.to_dict())
        return self


def _integrity_error(where: str, exc: ValidationError) -> IntegrityError:
    """The first problem pydantic found, as one line naming the file and the field."""
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return IntegrityError(f"{where}: not valid JSON ({err['msg']})")
    field = ".".join(str(part) for part in err["loc"])
    problem = err["msg"].removeprefix("Value error, ")
    return IntegrityError(f"{where}: invalid manifest: {field + ': ' if field else ''}{problem}")


def read_manifest(uri: str, s3: S3Options | None = None) -> Manifest:
    """Read and check `manifest.json` at `uri` (the dataset folder, or the manifest file): its
    fields, then its seal (`manifest_sha256`, when it has one). The shards are not opened here
    (`pipeline.data.integrity.verify_dataset` counts their labels, `shards` checks their bytes)."""
    fs, root = resolve(uri, s3)
    if root.rsplit("/", 1)[-1] == MANIFEST_NAME:
        root = root.rsplit("/", 1)[0] if "/" in root else ""
        uri = str(uri)[: -len(MANIFEST_NAME)].rstrip("/")
    mpath = join(root, MANIFEST_NAME)
    where = display(fs, mpath)
    try:
        blob = read_bytes(fs, mpath)
    except FileNotFoundError:
        raise IntegrityError(
            f"no {MANIFEST_NAME} at {where}: not a prepared dataset, or it was never published "
            f"(run jobs/prepare_data.py)"
        ) from None
    try:
        manifest = Manifest.model_validate_json(blob)
    except ValidationError as exc:
        raise _integrity_error(where, exc) from None
    if manifest.manifest_sha256 is not None:
        found = content_checksum(json.loads(blob))
        if found != manifest.manifest_sha256:
            raise IntegrityError(
                f"{where}: manifest_sha256 is {manifest.manifest_sha256[:16]}... but the content "
                f"hashes to {found[:16]}...: {MANIFEST_NAME} was edited after publication; run "
                f"jobs.prepare_data again to publish the dataset"
            )
    manifest.uri, manifest.filesystem, manifest.root = str(uri), fs, root
    return manifest


# ---- what identifies a run's data ------------------------------------------------------------


def manifest_hash(manifest: Mapping[str, Any] | Manifest) -> str:
    """Stable 16-hex hash of a manifest's content (a `Manifest` or the plain dict): where it
    is read from does not enter, so the same data moved elsewhere keeps its hash. The MLflow
    tag `shike.dataset_manifest_hash`, a run's data record and its checkpoints all carry it."""
    data = manifest.to_dict() if isinstance(manifest, Manifest) else dict(manifest)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def data_identity(manifest: Manifest) -> dict[str, Any]:
    """What a run records of the data it trains, in its storage folder and every checkpoint:
    the manifest's hash (what must match on resume) and, to name it in messages, the dataset,
    its imbalance factor and the URI it was read from. Plain types: it travels in Ray's loop
    config and in a weights-only checkpoint."""
    return {
        "dataset": manifest.dataset,
        "imbalance_factor": float(manifest.imbalance_factor),
        "manifest_hash": manifest_hash(manifest),
        "uri": manifest.uri,
    }


def same_data(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Whether two `data_identity` records are one dataset: the manifest hash decides (the
    URI may differ: data moved between launches is the same data)."""
    return recorded.get("manifest_hash") == current.get("manifest_hash")


def describe_data(identity: Mapping[str, Any]) -> str:
    """`cifar10 IF 100 (manifest 1a2b3c4d5e6f) from s3://data/c10-if100`."""
    factor = identity.get("imbalance_factor")
    shown = f" IF {float(factor):g}" if factor is not None else ""
    digest = str(identity.get("manifest_hash", "?"))[:12]
    where = f" from {identity['uri']}" if identity.get("uri") else ""
    return f"{identity.get('dataset', '?')}{shown} (manifest {digest}){where}"


def data_refusal(what: str, recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """The one line refusing to continue on `current` what was started on `recorded`, and the
    two ways out. `what`: "run 'x' was started on", "checkpoint <path> was trained on"."""
    original = f" (--set data.uri={recorded['uri']})" if recorded.get("uri") else ""
    return (
        f"{what} {describe_data(recorded)}, but this launch reads {describe_data(current)}: a "
        f"run continues on the data it started with; relaunch with the original data{original} "
        "or use a new run name"
    )


def data_settings(manifest: Manifest) -> dict[str, Any]:
    """The training config's `data.*` keys that describe what was prepared, as the manifest
    records them (`{"data.imbalance_factor": 10.0, ...}`; keys it leaves unset are left out).
    A training job takes them from here, not from its config file: the data is what it is."""
    settings: dict[str, Any] = {
        "data.dataset": manifest.dataset,
        "data.imbalance_factor": float(manifest.imbalance_factor),
        "data.n_max": manifest.n_max,
        "data.val_per_class": manifest.val_per_class,
        "data.test_per_class": manifest.test_per_class,
    }
    if manifest.selection is not None:
        settings["data.selection"] = manifest.selection.rule
        settings["data.selection_seed"] = manifest.selection.seed
    return {k: v for k, v in settings.items() if v is not None}
