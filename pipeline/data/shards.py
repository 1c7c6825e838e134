"""Long-tailed splits as Parquet shards + `manifest.json`, and the verifying reader.

Layout under the output URI (a local folder or s3://bucket/prefix):

    manifest.json                                   written last: the dataset exists once it does
    train/part-00000-<sha256[:16]>.parquet          zstd; columns image (PNG bytes), label (int64),
    val/part-00000-<sha256[:16]>.parquet            sample_id (string), [coarse_label (int64)]
    test/part-00000-<sha256[:16]>.parquet

Writing (`prepare_dataset`, `write_dataset`): every split is encoded and cut into shards of
about `shard_mb` MB; each shard is serialised in memory, named by its content hash, and
uploaded (skipped when an identical file is already there); the manifest is published last and
then shards of earlier versions are removed. The bytes depend only on the inputs (no
timestamps; PNG and Parquet output is deterministic for a given Pillow/pyarrow), so a re-run
with the same inputs is a no-op. A failure before the manifest is written publishes nothing:
readers still see the previous manifest (if any) and every shard it lists.

Reading (`read_manifest`, `load_split`, `read_split_table`, `verify_split`): each shard is
checked against the manifest (exists, byte size, sha256, Parquet schema, row count) before use;
any mismatch is an IntegrityError naming the file. For Ray Data, `Manifest.filesystem` and
`Manifest.shard_paths(split)` give the pyarrow filesystem and paths (`verify_split` first).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.data import DataError, IntegrityError, SourceFormatError
from pipeline.data.storage import (
    S3Options,
    check_access,
    display,
    file_size,
    join,
    read_bytes,
    resolve,
    write_bytes,
)

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.fs as pafs

    from pipeline.data.longtail import LongTailSplits
    from pipeline.data.sources import RawDataset, RawSplit

SCHEMA_VERSION = 1
# Training rows are written in one seeded random order, not class by class: streaming readers
# (Ray Data) shuffle only within a local buffer of about a thousand rows, which cannot mix a
# split stored as 5,000 head-class rows followed by the next class's. Manifests written before
# this have no "train_row_order" and read as "class".
TRAIN_ROW_ORDER = "shuffled"
TRAIN_ROW_ORDER_SEED = 0
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")
DEFAULT_SHARD_MB = 64.0
ROW_GROUP_ROWS = 4096
ZSTD_LEVEL = 3
PNG_COMPRESS_LEVEL = 6
_SHARD_RE = re.compile(r"^part-\d{5}-[0-9a-f]{16}\.parquet$")
_TMP_RE = re.compile(r"\.tmp-[0-9a-f]{12}$")

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# --------------------------------------------------------------------------------------
# schema


def shard_schema(with_coarse: bool) -> pa.Schema:
    import pyarrow as pa

    fields = [
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=False),
    ]
    if with_coarse:
        fields.append(pa.field("coarse_label", pa.int64(), nullable=False))
    return pa.schema(fields)


def _schema_text(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}{'' if f.nullable else ' not null'}" for f in schema)


# --------------------------------------------------------------------------------------
# manifest


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


@dataclass
class ShardInfo:
    path: str  # relative to the dataset root, "train/part-00000-<hash>.parquet"
    num_rows: int
    bytes: int
    sha256: str


@dataclass
class SplitInfo:
    num_rows: int
    class_counts: list[int]
    shards: list[ShardInfo]


@dataclass
class Manifest:
    """What `manifest.json` vouches for, plus where it was read from (`uri`, `filesystem`,
    `root`: the pyarrow filesystem and the dataset folder's path inside it)."""

    dataset: str
    class_names: list[str]
    class_counts: list[int]  # training images per class
    groups: dict[str, list[int]]  # many / medium / few
    splits: dict[str, SplitInfo]
    imbalance_factor: float
    n_max: int
    selection: str
    selection_seed: int
    val_per_class: int
    test_per_class: int | None
    source: dict[str, str]  # path, format, checksum
    image_shape: list[int]  # [H, W, 3]
    coarse_class_names: list[str] | None = None
    train_row_order: str = "class"  # how the training rows are ordered in the shards
    schema_version: int = SCHEMA_VERSION
    uri: str = ""
    filesystem: Any = field(default=None, repr=False, compare=False)
    root: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def has_coarse(self) -> bool:
        return self.coarse_class_names is not None

    @property
    def schema(self) -> pa.Schema:
        return shard_schema(self.has_coarse)

    def shard_paths(self, split: str) -> list[str]:
        """Filesystem paths (for `self.filesystem`) of the split's shards, in order."""
        return [join(self.root, s.path) for s in self._split(split).shards]

    def shard_uris(self, split: str) -> list[str]:
        fs = self.filesystem
        return [display(fs, p) if fs is not None else p for p in self.shard_paths(split)]

    def _split(self, split: str) -> SplitInfo:
        if split not in self.splits:
            raise DataError(f"{self.uri}: no split '{split}' (has {', '.join(self.splits)})")
        return self.splits[split]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "dataset": self.dataset,
            "source": dict(self.source),
            "imbalance_factor": float(self.imbalance_factor),
            "n_max": int(self.n_max),
            "selection": {"rule": self.selection, "seed": int(self.selection_seed)},
            "val_per_class": int(self.val_per_class),
            "test_per_class": self.test_per_class,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "coarse_class_names": None
            if self.coarse_class_names is None
            else list(self.coarse_class_names),
            "class_counts": [int(c) for c in self.class_counts],
            "train_row_order": {"order": self.train_row_order, "seed": TRAIN_ROW_ORDER_SEED}
            if self.train_row_order == TRAIN_ROW_ORDER
            else {"order": self.train_row_order},
            "class_groups": {k: [int(c) for c in v] for k, v in self.groups.items()},
            "class_group_thresholds": {"many": "> 100", "medium": "20..100", "few": "< 20"},
            "image": {
                "height": self.image_shape[0],
                "width": self.image_shape[1],
                "channels": 3,
                "encoding": "png",
            },
            "columns": [
                {"name": f.name, "type": str(f.type)} for f in shard_schema(self.has_coarse)
            ],
            "splits": {
                name: {
                    "num_rows": s.num_rows,
                    "class_counts": [int(c) for c in s.class_counts],
                    "shards": [
                        {
                            "path": sh.path,
                            "num_rows": sh.num_rows,
                            "bytes": sh.bytes,
                            "sha256": sh.sha256,
                        }
                        for sh in s.shards
                    ],
                }
                for name, s in self.splits.items()
            },
        }

    def to_json(self) -> bytes:
        return (_dumps(self.to_dict()) + "\n").encode()

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> Manifest:
        def bad(msg: str) -> IntegrityError:
            return IntegrityError(f"{where}: invalid manifest: {msg}")

        if not isinstance(d, dict):
            raise bad("not a JSON object")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise bad(
                f"schema_version {version!r} is not supported (this code reads {SCHEMA_VERSION})"
            )
        try:
            splits = {}
            for name, s in d["splits"].items():
                shards = [
                    ShardInfo(str(x["path"]), int(x["num_rows"]), int(x["bytes"]), str(x["sha256"]))
                    for x in s["shards"]
                ]
                for sh in shards:
                    if sh.path.startswith("/") or ".." in sh.path.split("/") or "://" in sh.path:
                        raise bad(f"shard path {sh.path!r} must be relative to the dataset")
                    if not re.fullmatch(r"[0-9a-f]{64}", sh.sha256):
                        raise bad(f"shard {sh.path} has no valid sha256")
                info = SplitInfo(int(s["num_rows"]), [int(c) for c in s["class_counts"]], shards)
                if sum(sh.num_rows for sh in shards) != info.num_rows:
                    raise bad(f"split {name}: shard rows do not add up to num_rows {info.num_rows}")
                if sum(info.class_counts) != info.num_rows:
                    raise bad(
                        f"split {name}: class_counts do not add up to num_rows {info.num_rows}"
                    )
                splits[name] = info
            sel = d["selection"]
            image = d["image"]
            m = cls(
                dataset=str(d["dataset"]),
                class_names=[str(x) for x in d["class_names"]],
                class_counts=[int(x) for x in d["class_counts"]],
                groups={str(k): [int(c) for c in v] for k, v in d["class_groups"].items()},
                splits=splits,
                imbalance_factor=float(d["imbalance_factor"]),
                n_max=int(d["n_max"]),
                selection=str(sel["rule"]),
                selection_seed=int(sel["seed"]),
                val_per_class=int(d["val_per_class"]),
                test_per_class=None
                if d.get("test_per_class") is None
                else int(d["test_per_class"]),
                source={str(k): str(v) for k, v in d["source"].items()},
                image_shape=[int(image["height"]), int(image["width"]), 3],
                coarse_class_names=None
                if d.get("coarse_class_names") is None
                else [str(x) for x in d["coarse_class_names"]],
                train_row_order=str(d.get("train_row_order", {"order": "class"})["order"]),
                schema_version=int(version),
            )
        except IntegrityError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise bad(f"missing or malformed field ({type(exc).__name__}: {exc})") from None
        for name, s in m.splits.items():
            if len(s.class_counts) != m.num_classes:
                raise bad(
                    f"split {name}: class_counts has {len(s.class_counts)} entries for {m.num_classes} classes"
                )
        return m


# --------------------------------------------------------------------------------------
# writing


def encode_png(images: np.ndarray, log: Log = _quiet, what: str = "") -> list[bytes]:
    """Lossless PNG bytes of each uint8 (H, W, 3) image (deterministic: no time chunks)."""
    from PIL import Image

    out = []
    n = len(images)
    step = max(1, math.ceil(n / 4))
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(images[i]).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        out.append(buf.getvalue())
        if what and n >= 4000 and (i + 1) % step == 0 and i + 1 < n:
            log(f"{what}: encoded {i + 1:,}/{n:,} images")
    return out


def _shard_ranges(sizes: Sequence[int], target_bytes: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) row ranges of about target_bytes of image data each."""
    ranges, start, acc = [], 0, 0
    for i, s in enumerate(sizes):
        acc += s
        if acc >= target_bytes:
            ranges.append((start, i + 1))
            start, acc = i + 1, 0
    if start < len(sizes):
        ranges.append((start, len(sizes)))
    return ranges


def _serialize(table: pa.Table) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    cols = [c for c in ("label", "coarse_label") if c in table.column_names]
    pq.write_table(
        table,
        sink,
        row_group_size=ROW_GROUP_ROWS,
        compression="zstd",
        compression_level=ZSTD_LEVEL,
        use_dictionary=cols,
        write_statistics=cols,
        write_page_index=False,
        store_schema=True,
    )
    return sink.getvalue().to_pybytes()


def _same_file(fs: pafs.FileSystem, path: str, size: int, sha: str) -> bool:
    """True when `path` already holds exactly these bytes (so the write can be skipped)."""
    if file_size(fs, path) != size:
        return False
    try:
        return hashlib.sha256(read_bytes(fs, path)).hexdigest() == sha
    except FileNotFoundError:
        return False


def _write_split(
    fs: pafs.FileSystem,
    root: str,
    name: str,
    split: RawSplit,
    with_coarse: bool,
    target_bytes: int,
    log: Log,
) -> list[ShardInfo]:
    import pyarrow as pa

    n = len(split.labels)
    if n == 0:
        log(f"{name}: 0 images, no shard")
        return []
    log(f"{name}: encoding {n:,} images as PNG")
    pngs = encode_png(split.images, log, name)
    ranges = _shard_ranges([len(b) for b in pngs], target_bytes)
    shards = []
    for k, (a, b) in enumerate(ranges):
        arrays = {
            "image": pa.array(pngs[a:b], pa.binary()),
            "label": pa.array(split.labels[a:b].astype(np.int64), pa.int64()),
            "sample_id": pa.array([str(s) for s in split.sample_ids[a:b]], pa.string()),
        }
        if with_coarse:
            assert split.coarse_labels is not None
            arrays["coarse_label"] = pa.array(split.coarse_labels[a:b].astype(np.int64), pa.int64())
        table = pa.Table.from_pydict(arrays, schema=shard_schema(with_coarse))
        data = _serialize(table)
        sha = hashlib.sha256(data).hexdigest()
        rel = f"{name}/part-{k:05d}-{sha[:16]}.parquet"
        path = join(root, rel)
        if _same_file(fs, path, len(data), sha):
            verb = "unchanged"
        else:
            write_bytes(fs, path, data)
            verb = "wrote"
        log(
            f"{name}: {verb} shard {k + 1}/{len(ranges)} {rel} ({b - a:,} rows, {len(data) / 1e6:.1f} MB)"
        )
        shards.append(ShardInfo(rel, b - a, len(data), sha))
    return shards


def _remove_stale(fs: pafs.FileSystem, root: str, manifest: Manifest, log: Log) -> None:
    """After publishing: delete shard files (and temp files) of earlier versions."""
    import pyarrow.fs as pafs

    keep = {s.path for info in manifest.splits.values() for s in info.shards}
    for name in SPLITS:
        try:
            infos = fs.get_file_info(pafs.FileSelector(join(root, name), allow_not_found=True))
        except OSError:
            continue
        for info in infos:
            base = info.path.rsplit("/", 1)[-1]
            rel = f"{name}/{base}"
            if (
                info.type == pafs.FileType.File
                and rel not in keep
                and (_SHARD_RE.match(base) or _TMP_RE.search(base))
            ):
                try:
                    fs.delete_file(info.path)
                    log(f"removed stale {rel}")
                except OSError:
                    pass


def write_dataset(
    splits: LongTailSplits,
    raw: RawDataset,
    output: str,
    *,
    imbalance_factor: float,
    selection: str,
    selection_seed: int,
    val_per_class: int,
    test_per_class: int | None = None,
    shard_mb: float = DEFAULT_SHARD_MB,
    s3: S3Options | None = None,
    log: Log = _quiet,
) -> Manifest:
    """Write the splits as shards under `output`, then publish `manifest.json` (last)."""
    if not shard_mb > 0 or not math.isfinite(shard_mb):
        raise DataError(f"shard size must be a positive number of MB, got {shard_mb}")
    fs, root = resolve(output, s3)
    with_coarse = raw.train.coarse_labels is not None and raw.test.coarse_labels is not None
    target = max(1, int(shard_mb * 1e6))
    from pipeline.data.longtail import class_counts_of

    order = np.random.default_rng(TRAIN_ROW_ORDER_SEED).permutation(len(splits.train.labels))
    infos = {}
    for name, split in (
        ("train", splits.train.take(order)),
        ("val", splits.val),
        ("test", splits.test),
    ):
        shards = _write_split(fs, root, name, split, with_coarse, target, log)
        infos[name] = SplitInfo(
            len(split.labels), class_counts_of(split.labels, raw.num_classes), shards
        )
    shape = list(raw.train.images.shape[1:3]) + [3]
    manifest = Manifest(
        dataset=raw.name,
        class_names=list(raw.class_names),
        class_counts=list(splits.class_counts),
        groups=splits.groups,
        splits=infos,
        imbalance_factor=float(imbalance_factor),
        n_max=splits.n_max,
        selection=selection,
        selection_seed=int(selection_seed),
        val_per_class=int(val_per_class),
        test_per_class=test_per_class,
        source={"path": raw.source, "format": raw.source_format, "checksum": raw.checksum},
        image_shape=shape,
        coarse_class_names=raw.coarse_class_names if with_coarse else None,
        train_row_order=TRAIN_ROW_ORDER,
        uri=str(output),
        filesystem=fs,
        root=root,
    )
    blob = manifest.to_json()
    mpath = join(root, MANIFEST_NAME)
    if _same_file(fs, mpath, len(blob), hashlib.sha256(blob).hexdigest()):
        log(f"manifest unchanged: {display(fs, mpath)}")
    else:
        write_bytes(fs, mpath, blob)
        log(f"published {display(fs, mpath)}")
    _remove_stale(fs, root, manifest, log)
    return manifest


def prepare_from_raw(
    raw: RawDataset,
    output: str,
    imbalance_factor: float = 100.0,
    *,
    n_max: int | None = None,
    selection: str = "first",
    selection_seed: int = 0,
    val_per_class: int = 20,
    test_per_class: int | None = None,
    shard_mb: float = DEFAULT_SHARD_MB,
    s3: S3Options | None = None,
    log: Log = _quiet,
) -> Manifest:
    """Long-tailed split of an already loaded RawDataset -> shards + manifest at `output`."""
    from pipeline.data.longtail import build_longtail_splits

    fs, root = resolve(output, s3)
    check_access(fs, root, "write to")
    try:
        splits = build_longtail_splits(
            raw,
            imbalance_factor,
            n_max=n_max,
            selection=selection,
            selection_seed=selection_seed,
            val_per_class=val_per_class,
            test_per_class=test_per_class,
        )
    except ValueError as exc:
        raise DataError(f"{raw.source}: {exc}") from None
    log(
        f"long-tailed split: train {len(splits.train):,} images (IF {imbalance_factor:g}, "
        f"n_max {splits.n_max}, {selection} rule), val {len(splits.val):,}, test {len(splits.test):,}"
    )
    from pipeline.data.longtail import class_counts_of

    short = [
        c
        for c, n in enumerate(class_counts_of(splits.val.labels, raw.num_classes))
        if n < val_per_class
    ]
    if short:
        log(
            f"note: val has fewer than {val_per_class} images for {len(short)} class(es) "
            f"{short[:10]}{'...' if len(short) > 10 else ''}: the long-tailed subset uses (almost) "
            f"all of their training images"
        )
    return write_dataset(
        splits,
        raw,
        output,
        imbalance_factor=imbalance_factor,
        selection=selection,
        selection_seed=selection_seed,
        val_per_class=val_per_class,
        test_per_class=test_per_class,
        shard_mb=shard_mb,
        s3=s3,
        log=log,
    )


def prepare_dataset(
    dataset: str,
    source: str | None,
    output: str,
    imbalance_factor: float = 100.0,
    *,
    n_max: int | None = None,
    selection: str = "first",
    selection_seed: int = 0,
    val_per_class: int = 20,
    test_per_class: int | None = None,
    shard_mb: float = DEFAULT_SHARD_MB,
    s3: S3Options | None = None,
    log: Log = _quiet,
) -> Manifest:
    """Raw dataset -> long-tailed Parquet shards + manifest at `output` (what prepare_data runs).

    Checks that `output` is reachable first (one request), then reads and validates the source,
    draws the splits, writes shards and publishes the manifest. Raises DataError (one line,
    naming the culprit) for anything the user can fix; nothing is published in that case.
    """
    from pipeline.data.longtail import SELECTION_RULES
    from pipeline.data.sources import load_raw_dataset

    if selection not in SELECTION_RULES:
        raise DataError(
            f"unknown selection rule {selection!r}; expected one of {', '.join(SELECTION_RULES)}"
        )
    if not imbalance_factor >= 1:
        raise DataError(f"imbalance factor must be >= 1, got {imbalance_factor}")
    if val_per_class < 0:
        raise DataError(f"val per class must be >= 0, got {val_per_class}")
    if not shard_mb > 0:
        raise DataError(f"shard size must be a positive number of MB, got {shard_mb}")
    fs, root = resolve(output, s3)
    check_access(fs, root, "write to")
    t0 = time.perf_counter()
    log(f"reading {dataset} from {source or 'the default source'}")
    raw = load_raw_dataset(dataset, source)
    log(
        f"read {raw.name} ({raw.source_format}) from {raw.source}: {len(raw.train):,} train + "
        f"{len(raw.test):,} test images, {raw.num_classes} classes, in {time.perf_counter() - t0:.1f} s"
    )
    return prepare_from_raw(
        raw,
        output,
        imbalance_factor,
        n_max=n_max,
        selection=selection,
        selection_seed=selection_seed,
        val_per_class=val_per_class,
        test_per_class=test_per_class,
        shard_mb=shard_mb,
        s3=s3,
        log=log,
    )


# --------------------------------------------------------------------------------------
# reading


def read_manifest(uri: str, s3: S3Options | None = None) -> Manifest:
    """Read and check `manifest.json` at `uri` (the dataset folder, or the manifest file)."""
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
        data = json.loads(blob)
    except ValueError as exc:
        raise IntegrityError(f"{where}: not valid JSON ({exc})") from None
    m = Manifest.from_dict(data, where)
    m.uri, m.filesystem, m.root = str(uri), fs, root
    return m


def _as_manifest(uri_or_manifest: str | Manifest, s3: S3Options | None) -> Manifest:
    if isinstance(uri_or_manifest, Manifest):
        return uri_or_manifest
    return read_manifest(uri_or_manifest, s3)


def read_shard(manifest: Manifest, shard: ShardInfo) -> pa.Table:
    """One shard, verified against the manifest (exists, size, sha256, schema, rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs = manifest.filesystem
    path = join(manifest.root, shard.path)
    where = display(fs, path)
    try:
        data = read_bytes(fs, path)
    except FileNotFoundError:
        raise IntegrityError(f"shard {where} listed in the manifest is missing") from None
    if len(data) != shard.bytes:
        raise IntegrityError(
            f"shard {where} is {len(data):,} bytes but the manifest says {shard.bytes:,} "
            f"(truncated or replaced)"
        )
    sha = hashlib.sha256(data).hexdigest()
    if sha != shard.sha256:
        raise IntegrityError(
            f"shard {where} has sha256 {sha[:16]}... but the manifest says {shard.sha256[:16]}... (altered or corrupt)"
        )
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError) as exc:
        raise IntegrityError(f"shard {where} is not a readable Parquet file ({exc})") from None
    expected = manifest.schema
    if not table.schema.equals(expected, check_metadata=False):
        raise IntegrityError(
            f"shard {where} has schema [{_schema_text(table.schema)}] but expected [{_schema_text(expected)}]"
        )
    if table.num_rows != shard.num_rows:
        raise IntegrityError(
            f"shard {where} has {table.num_rows:,} rows but the manifest says {shard.num_rows:,}"
        )
    return table


def verify_split(
    uri_or_manifest: str | Manifest, split: str, s3: S3Options | None = None
) -> Manifest:
    """Check every shard of a split (reads each once); use before handing paths to Ray Data."""
    m = _as_manifest(uri_or_manifest, s3)
    for shard in m._split(split).shards:
        read_shard(m, shard)
    return m


def read_split_table(
    uri_or_manifest: str | Manifest, split: str, s3: S3Options | None = None
) -> pa.Table:
    """All verified shards of a split as one Arrow table (images still PNG-encoded)."""
    m = _as_manifest(uri_or_manifest, s3)
    info = m._split(split)
    tables = [read_shard(m, s) for s in info.shards]
    if not tables:
        return m.schema.empty_table()
    import pyarrow as pa

    return pa.concat_tables(tables)


def load_split(
    uri_or_manifest: str | Manifest, split: str, s3: S3Options | None = None
) -> RawSplit:
    """A split decoded to uint8 pixels (RawSplit: images, labels, sample_ids, coarse_labels),
    every shard verified first; the label histogram must match the manifest's class_counts."""
    from pipeline.data.longtail import class_counts_of
    from pipeline.data.sources import RawSplit, decode_images

    m = _as_manifest(uri_or_manifest, s3)
    info = m._split(split)
    table = read_split_table(m, split)
    labels = table.column("label").to_numpy().astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= m.num_classes):
        raise IntegrityError(f"{m.uri}: split {split} holds labels outside 0..{m.num_classes - 1}")
    if class_counts_of(labels, m.num_classes) != info.class_counts:
        raise IntegrityError(
            f"{m.uri}: split {split} labels do not match the manifest's class_counts"
        )
    h, w, _ = m.image_shape
    try:
        images = decode_images(table.column("image").to_pylist(), f"{m.uri} ({split})")
    except SourceFormatError as exc:
        raise IntegrityError(str(exc)) from None
    if not len(labels):
        images = np.empty((0, h, w, 3), np.uint8)
    elif images.shape[1:] != (h, w, 3):
        raise IntegrityError(
            f"{m.uri}: split {split} images are {images.shape[1:]}, manifest says {(h, w, 3)}"
        )
    coarse = table.column("coarse_label").to_numpy().astype(np.int64) if m.has_coarse else None
    ids = np.array(table.column("sample_id").to_pylist(), dtype=str)
    return RawSplit(images=images, labels=labels, sample_ids=ids, coarse_labels=coarse)


def shard_files(
    uri_or_manifest: str | Manifest, split: str, s3: S3Options | None = None
) -> tuple[pafs.FileSystem, list[str]]:
    """(pyarrow filesystem, shard paths) of a split, e.g. for `ray.data.read_parquet(paths,
    filesystem=fs)`; the shards are not read here (call `verify_split` to check them)."""
    m = _as_manifest(uri_or_manifest, s3)
    return m.filesystem, m.shard_paths(split)


__all__ = [
    "DEFAULT_SHARD_MB",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "Manifest",
    "ShardInfo",
    "SplitInfo",
    "load_split",
    "prepare_dataset",
    "prepare_from_raw",
    "read_manifest",
    "read_shard",
    "read_split_table",
    "shard_files",
    "shard_schema",
    "verify_split",
    "write_dataset",
]
