"""Raw datasets -> decoded pixels in source order (`RawDataset`).

    raw = load_raw_dataset("cifar10", "/work/shared/data/cifar10")
    raw.train.images    # uint8 (50000, 32, 32, 3), row order of train.parquet
    raw.train.labels    # int64 (50000,)

Formats, detected by content (not by name):
(a) a Parquet folder: `train.parquet` + `test.parquet` [+ `classes.json`]; columns `image`
    (PNG/JPEG bytes, or a struct with a `bytes` field), `label`; optional `coarse_label`,
    `sample_id`. Like ../shared/data/cifar10.
(b) the official python archives: `cifar-100-python.tar.gz` / `cifar-10-python.tar.gz`, their
    extracted folders (`cifar-100-python/`: train, test, meta; `cifar-10-batches-py/`:
    data_batch_1..5, test_batch, batches.meta), or a folder holding either.
(c) an image folder: `root/<split>/<class>/*.png|jpg|jpeg|bmp|webp` (class names = sorted
    folder names of train/), or with a list file `root/<split>.txt` of `relative/path label`
    lines (class names from `classes.json`/`classes.txt` when present). All images of a
    dataset must share one size.

source None: $CIFAR10_DIR / $CIFAR100_DIR, else the official archive is downloaded (md5
verified) into $SHIKE_DATA_CACHE (default ~/.cache/shike). The image folder needs a source.

Only numpy is imported at module level; pyarrow and Pillow are imported when used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import tarfile
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data import SourceFormatError

DATASETS = ("cifar10", "cifar100", "imagefolder")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
ENV_VARS = {"cifar10": "CIFAR10_DIR", "cifar100": "CIFAR100_DIR"}
# Official archives (Krizhevsky, University of Toronto) and their published md5 sums.
ARCHIVES = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
    ),
}
DOWNLOAD_TIMEOUT_S = 30.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
ACCEPTED_FORMATS = (
    "a Parquet folder with train.parquet and test.parquet (columns image, label); "
    "cifar-10-python.tar.gz / cifar-100-python.tar.gz or their extracted folders "
    "(cifar-10-batches-py/, cifar-100-python/); "
    "an image folder root/train/<class>/*.png|jpg and root/test/<class>/... "
    "(or root/train.txt, root/test.txt list files of 'path label' lines)"
)

_CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_FILES = (*_CIFAR10_TRAIN_BATCHES, "test_batch", "batches.meta")
_CIFAR100_FILES = ("train", "test", "meta")


@dataclass
class RawSplit:
    """One split of a raw dataset, in source order."""

    images: np.ndarray  # uint8 (N, H, W, 3), decoded pixels
    labels: np.ndarray  # int64 (N,)
    sample_ids: np.ndarray  # str (N,), stable ids in the source ("train/00042", a filename, ...)
    coarse_labels: np.ndarray | None = None  # int64 (N,), CIFAR-100 superclasses

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray | Sequence[int]) -> RawSplit:
        idx = np.asarray(indices, dtype=np.int64)
        return RawSplit(
            images=self.images[idx],
            labels=self.labels[idx],
            sample_ids=self.sample_ids[idx],
            coarse_labels=None if self.coarse_labels is None else self.coarse_labels[idx],
        )


@dataclass
class RawDataset:
    name: str  # "cifar10" | "cifar100" | "imagefolder"
    class_names: list[str]
    train: RawSplit
    test: RawSplit
    source: str  # where it came from (a local path)
    checksum: str  # "sha256:<hex>" of the source file(s); stable across runs and machines
    coarse_class_names: list[str] | None = None
    source_format: str = ""  # "parquet" | "cifar-python" | "imagefolder"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --------------------------------------------------------------------------------------
# image decoding (shared with the shard reader)


def decode_images(blobs: Sequence[bytes], what: str = "images") -> np.ndarray:
    """Decode encoded images (PNG/JPEG/...) into one uint8 (N, H, W, 3) RGB array.

    All images must share one size; `what` names the source in errors ("train.parquet"), and
    the row number is appended. Plain sequential Pillow decoding: for 32x32 images threads do
    not help (the per-image cost is Python overhead under the GIL); 60k CIFAR PNGs take ~3 s.
    """
    from PIL import Image

    n = len(blobs)
    out: np.ndarray | None = None
    for i, blob in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(blob)) as im:
                if im.mode != "RGB":
                    im = im.convert("RGB")
                arr = np.asarray(im)
        except Exception as exc:  # PIL raises several types for bad bytes
            raise SourceFormatError(f"{what}: row {i} is not a decodable image ({exc})") from None
        if out is None:
            out = np.empty((n, *arr.shape), dtype=np.uint8)
        elif arr.shape != out.shape[1:]:
            raise SourceFormatError(
                f"{what}: row {i} is {arr.shape[1]}x{arr.shape[0]} but earlier images are "
                f"{out.shape[2]}x{out.shape[1]}; all images must share one size"
            )
        out[i] = arr
    if out is None:
        return np.empty((0, 0, 0, 3), dtype=np.uint8)
    return out


def _decode_files(paths: Sequence[Path], what: str) -> np.ndarray:
    blobs = []
    for p in paths:
        try:
            blobs.append(p.read_bytes())
        except OSError as exc:
            raise SourceFormatError(f"{what}: cannot read {p}: {exc.strerror or exc}") from None
    try:
        return decode_images(blobs, what)
    except SourceFormatError as exc:
        m = re.search(r"row (\d+)", str(exc))
        if m:  # name the file rather than the row
            raise SourceFormatError(
                str(exc).replace(f"row {m.group(1)}", str(paths[int(m.group(1))]), 1)
            ) from None
        raise


# --------------------------------------------------------------------------------------
# checksums


def _sha256_file(path: Path, h: hashlib._Hash | None = None) -> hashlib._Hash:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


def _checksum_files(root: Path, files: Iterable[Path]) -> str:
    """sha256 of one file, or of the sorted (relative path, sha256) list of several files."""
    files = sorted(files, key=lambda p: p.relative_to(root).as_posix())
    if len(files) == 1 and files[0] == root:
        return "sha256:" + _sha256_file(root).hexdigest()
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(_sha256_file(p).hexdigest().encode() + b"\n")
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------------------
# validation


def _validate_split(split: RawSplit, num_classes: int, split_name: str, where: str) -> None:
    n = len(split.labels)
    if split.images.dtype != np.uint8 or split.images.ndim != 4 or split.images.shape[-1] != 3:
        raise SourceFormatError(
            f"{where}: {split_name} images must be uint8 (N, H, W, 3), got "
            f"{split.images.dtype} {split.images.shape}"
        )
    if split.images.shape[0] != n or len(split.sample_ids) != n:
        raise SourceFormatError(
            f"{where}: {split_name} has {split.images.shape[0]} images, {n} labels and "
            f"{len(split.sample_ids)} sample ids"
        )
    bad = np.flatnonzero((split.labels < 0) | (split.labels >= num_classes))
    if bad.size:
        row = int(bad[0])
        raise SourceFormatError(
            f"{where}: {split_name} split row {row} has label {int(split.labels[row])}, out of "
            f"range 0..{num_classes - 1} for {num_classes} classes"
        )
    if split.coarse_labels is not None and len(split.coarse_labels) != n:
        raise SourceFormatError(f"{where}: {split_name} coarse labels do not match the image count")


def _finish(
    dataset: str,
    fmt: str,
    source: Path,
    class_names: list[str] | None,
    train: RawSplit,
    test: RawSplit,
    checksum: str,
    coarse_class_names: list[str] | None = None,
) -> RawDataset:
    expected = NUM_CLASSES.get(dataset)
    if class_names is None:
        top = max(int(train.labels.max(initial=-1)), int(test.labels.max(initial=-1)))
        n = expected if expected is not None else top + 1
        class_names = [str(i) for i in range(n)]
    if expected is not None and len(class_names) != expected:
        raise SourceFormatError(
            f"{source}: has {len(class_names)} classes but {dataset} has {expected}; "
            f"is this the right dataset?"
        )
    if len(class_names) == 0:
        raise SourceFormatError(f"{source}: no classes found")
    for split, name in ((train, "train"), (test, "test")):
        _validate_split(split, len(class_names), name, str(source))
        if split.coarse_labels is not None and coarse_class_names is not None:
            bad = np.flatnonzero(
                (split.coarse_labels < 0) | (split.coarse_labels >= len(coarse_class_names))
            )
            if bad.size:
                row = int(bad[0])
                raise SourceFormatError(
                    f"{source}: {name} split row {row} has coarse label "
                    f"{int(split.coarse_labels[row])}, out of range 0..{len(coarse_class_names) - 1}"
                )
    if train.images.shape[1:] != test.images.shape[1:] and len(train) and len(test):
        raise SourceFormatError(
            f"{source}: train images are {train.images.shape[1:3]} but test images are "
            f"{test.images.shape[1:3]}"
        )
    return RawDataset(
        name=dataset,
        class_names=list(class_names),
        train=train,
        test=test,
        source=str(source),
        checksum=checksum,
        coarse_class_names=list(coarse_class_names) if coarse_class_names else None,
        source_format=fmt,
    )


# --------------------------------------------------------------------------------------
# (a) Parquet folder


def _is_parquet_folder(p: Path) -> bool:
    return p.is_dir() and (p / "train.parquet").is_file() and (p / "test.parquet").is_file()


def _read_class_file(root: Path) -> tuple[list[str] | None, list[str] | None]:
    """classes.json (a list, or {"label_names"|"class_names"|"classes": [...],
    "coarse_label_names": [...]}) or classes.txt (one name a line)."""
    cj, ct = root / "classes.json", root / "classes.txt"
    if cj.is_file():
        try:
            data = json.loads(cj.read_text())
        except (OSError, ValueError) as exc:
            raise SourceFormatError(f"{cj}: not valid JSON ({exc})") from None
        if isinstance(data, list):
            return [str(x) for x in data], None
        if isinstance(data, dict):
            names = next(
                (
                    data[k]
                    for k in ("label_names", "class_names", "classes", "fine_label_names")
                    if k in data
                ),
                None,
            )
            coarse = data.get("coarse_label_names")
            if isinstance(names, list):
                return [str(x) for x in names], [str(x) for x in coarse] if isinstance(
                    coarse, list
                ) else None
        raise SourceFormatError(
            f"{cj}: expected a list of class names or an object with 'label_names'"
        )
    if ct.is_file():
        names = [line.strip() for line in ct.read_text().splitlines() if line.strip()]
        return names, None
    return None, None


def _read_parquet_split(path: Path, split: str) -> RawSplit:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise SourceFormatError(f"{path}: not a readable Parquet file ({exc})") from None
    cols = set(table.column_names)
    missing = {"image", "label"} - cols
    if missing:
        raise SourceFormatError(
            f"{path}: missing column(s) {sorted(missing)}; found {sorted(cols)} "
            f"(expected image=encoded bytes, label=int)"
        )
    image_col = table.column("image")
    if pa.types.is_struct(image_col.type):  # Hugging Face style {"bytes": ..., "path": ...}
        image_col = pa.chunked_array([c.field("bytes") for c in image_col.chunks])
    if not (pa.types.is_binary(image_col.type) or pa.types.is_large_binary(image_col.type)):
        raise SourceFormatError(
            f"{path}: column 'image' must hold encoded image bytes, got {image_col.type}"
        )

    def ints(name: str) -> np.ndarray:
        col = table.column(name)
        if not pa.types.is_integer(col.type):
            raise SourceFormatError(f"{path}: column '{name}' must be integers, got {col.type}")
        if col.null_count:
            raise SourceFormatError(f"{path}: column '{name}' has {col.null_count} null value(s)")
        return col.to_numpy().astype(np.int64)

    labels = ints("label")
    coarse = ints("coarse_label") if "coarse_label" in cols else None
    if "sample_id" in cols:
        sample_ids = np.array([str(s) for s in table.column("sample_id").to_pylist()])
    else:
        sample_ids = np.array([f"{split}/{i:05d}" for i in range(len(labels))])
    images = decode_images(image_col.to_pylist(), str(path))
    return RawSplit(images=images, labels=labels, sample_ids=sample_ids, coarse_labels=coarse)


def _load_parquet_folder(root: Path, dataset: str) -> RawDataset:
    names, coarse_names = _read_class_file(root)
    train = _read_parquet_split(root / "train.parquet", "train")
    test = _read_parquet_split(root / "test.parquet", "test")
    files = [root / "train.parquet", root / "test.parquet"]
    files += [p for p in (root / "classes.json", root / "classes.txt") if p.is_file()]
    return _finish(
        dataset, "parquet", root, names, train, test, _checksum_files(root, files), coarse_names
    )


# --------------------------------------------------------------------------------------
# (b) official cifar python archives


class _CifarUnpickler(pickle.Unpickler):
    """Loads the CIFAR pickles (dicts of lists, bytes and numpy arrays) and nothing else: a
    pickle can run arbitrary code, so only numpy's array reconstruction is allowed."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol <= 2
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self._ALLOWED:
            if module.startswith("numpy.core"):  # numpy 1.x pickles; avoid numpy 2's shim
                module = "numpy._core" + module[len("numpy.core") :]
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR pickle")


def _unpickle(blob: bytes, what: str) -> dict[str, object]:
    try:
        obj = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    except Exception as exc:
        raise SourceFormatError(f"{what}: not a CIFAR python pickle ({exc})") from None
    if not isinstance(obj, dict):
        raise SourceFormatError(
            f"{what}: expected a dict in the CIFAR pickle, got {type(obj).__name__}"
        )
    return {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _texts(values: object) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]  # type: ignore[union-attr]


def _cifar_split(
    d: dict[str, object], label_key: str, what: str, split: str, coarse_key: str | None = None
) -> RawSplit:
    for k in ("data", label_key, *([coarse_key] if coarse_key else [])):
        if k not in d:
            raise SourceFormatError(f"{what}: key '{k}' missing; found {sorted(d)}")
    data = np.asarray(d["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise SourceFormatError(
            f"{what}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}"
        )
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels = np.asarray(d[label_key], dtype=np.int64)
    if len(labels) != len(images):
        raise SourceFormatError(f"{what}: {len(images)} images but {len(labels)} labels")
    coarse = np.asarray(d[coarse_key], dtype=np.int64) if coarse_key else None
    if "filenames" in d:
        ids = np.array(_texts(d["filenames"]))
    else:
        ids = np.array([f"{split}/{i:05d}" for i in range(len(labels))])
    return RawSplit(images=images, labels=labels, sample_ids=ids, coarse_labels=coarse)


def _cifar_kind(names: Iterable[str]) -> str | None:
    base = set(names)
    if set(_CIFAR100_FILES) <= base:
        return "cifar100"
    if set(_CIFAR10_FILES) <= base:
        return "cifar10"
    return None


def _build_cifar(
    kind: str, read: Callable[[str], bytes], where: str, dataset: str, checksum: str
) -> RawDataset:
    if dataset in NUM_CLASSES and dataset != kind:
        raise SourceFormatError(f"{where}: is a {kind} archive but the dataset is {dataset}")
    if kind == "cifar100":
        meta = _unpickle(read("meta"), f"{where}: meta")
        tr = _unpickle(read("train"), f"{where}: train")
        te = _unpickle(read("test"), f"{where}: test")
        for k in ("fine_label_names", "coarse_label_names"):
            if k not in meta:
                raise SourceFormatError(f"{where}: meta: key '{k}' missing")
        train = _cifar_split(tr, "fine_labels", f"{where}: train", "train", "coarse_labels")
        test = _cifar_split(te, "fine_labels", f"{where}: test", "test", "coarse_labels")
        names = _texts(meta["fine_label_names"])
        coarse = _texts(meta["coarse_label_names"])
    else:
        meta = _unpickle(read("batches.meta"), f"{where}: batches.meta")
        if "label_names" not in meta:
            raise SourceFormatError(f"{where}: batches.meta: key 'label_names' missing")
        parts = [
            _cifar_split(_unpickle(read(b), f"{where}: {b}"), "labels", f"{where}: {b}", "train")
            for b in _CIFAR10_TRAIN_BATCHES
        ]
        train = RawSplit(
            images=np.concatenate([p.images for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            sample_ids=np.concatenate([p.sample_ids for p in parts]),
        )
        test = _cifar_split(
            _unpickle(read("test_batch"), f"{where}: test_batch"),
            "labels",
            f"{where}: test_batch",
            "test",
        )
        names, coarse = _texts(meta["label_names"]), None
    name = dataset if dataset != "imagefolder" else kind
    return _finish(name, "cifar-python", Path(where), names, train, test, checksum, coarse)


def _tar_kind(path: Path) -> str | None:
    """ "cifar100" / "cifar10" when `path` is a tar archive whose first entries live under
    cifar-100-python/ or cifar-10-batches-py/ (a peek: the load checks the members)."""
    try:
        if not tarfile.is_tarfile(path):
            return None
        with tarfile.open(path, "r|*") as tf:
            for _, m in zip(range(4), tf, strict=False):
                top = m.name.lstrip("./").split("/", 1)[0]
                base = m.name.rsplit("/", 1)[-1]
                if top == "cifar-100-python" or base in _CIFAR100_FILES:
                    return "cifar100"
                if top == "cifar-10-batches-py" or base in _CIFAR10_FILES:
                    return "cifar10"
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        return None
    return None


def _load_cifar_tar(path: Path, dataset: str) -> RawDataset:
    kind = _tar_kind(path)
    assert kind is not None
    wanted = set(_CIFAR100_FILES if kind == "cifar100" else _CIFAR10_FILES)
    checksum = "sha256:" + _sha256_file(path).hexdigest()
    blobs: dict[str, bytes] = {}
    try:  # one sequential pass: seeking backwards in a .tar.gz decompresses it again
        with tarfile.open(path, "r|*") as tf:
            for m in tf:
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in wanted and base not in blobs:
                    f = tf.extractfile(m)
                    assert f is not None
                    blobs[base] = f.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise SourceFormatError(f"{path}: damaged archive ({exc})") from None
    missing = wanted - set(blobs)
    if missing:
        raise SourceFormatError(f"{path}: damaged archive (missing {sorted(missing)})")
    return _build_cifar(kind, blobs.pop, str(path), dataset, checksum)


def _load_cifar_dir(root: Path, dataset: str) -> RawDataset:
    kind = _cifar_kind(p.name for p in root.iterdir() if p.is_file())
    assert kind is not None
    files = _CIFAR100_FILES if kind == "cifar100" else _CIFAR10_FILES
    checksum = _checksum_files(root, [root / f for f in files])
    return _build_cifar(kind, lambda n: (root / n).read_bytes(), str(root), dataset, checksum)


# --------------------------------------------------------------------------------------
# (c) image folder


def _natural_key(s: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _is_image_folder(root: Path) -> bool:
    if not root.is_dir():
        return False
    if (root / "train.txt").is_file() and (root / "test.txt").is_file():
        return True
    return (
        (root / "train").is_dir()
        and (root / "test").is_dir()
        and any(d.is_dir() for d in (root / "train").iterdir())
    )


def _image_folder_split(
    root: Path, split: str, class_names: list[str] | None
) -> tuple[list[Path], list[int], list[str]]:
    lst = root / f"{split}.txt"
    if lst.is_file():
        paths, labels, ids = [], [], []
        for n, line in enumerate(lst.read_text().splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not re.fullmatch(r"-?\d+", parts[1]):
                raise SourceFormatError(
                    f"{lst}: line {n} must be 'relative/path label', got {line!r}"
                )
            rel = parts[0].strip()
            p = root / rel
            if not p.is_file():
                raise SourceFormatError(f"{lst}: line {n}: image {p} does not exist")
            paths.append(p)
            labels.append(int(parts[1]))
            ids.append(rel)
        return paths, labels, ids
    base = root / split
    if not base.is_dir():
        raise SourceFormatError(f"{root}: no {split}/ folder and no {split}.txt list file")
    assert class_names is not None
    known = set(class_names)
    extra = sorted(d.name for d in base.iterdir() if d.is_dir() and d.name not in known)
    if extra:
        raise SourceFormatError(f"{base}: class folder(s) {extra[:5]} are not classes of train/")
    paths, labels, ids = [], [], []
    for c, name in enumerate(class_names):
        d = base / name
        if not d.is_dir():
            continue
        files = sorted(
            (p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda p: _natural_key(p.name),
        )
        paths += files
        labels += [c] * len(files)
        ids += [f"{split}/{name}/{p.name}" for p in files]
    return paths, labels, ids


def _load_image_folder(root: Path, dataset: str) -> RawDataset:
    names, _ = _read_class_file(root)
    uses_lists = (root / "train.txt").is_file()
    if names is None and not uses_lists:
        names = sorted((d.name for d in (root / "train").iterdir() if d.is_dir()), key=_natural_key)
    splits = {}
    all_files: list[Path] = []
    for split in ("train", "test"):
        paths, labels, ids = _image_folder_split(root, split, names)
        if not paths:
            raise SourceFormatError(
                f"{root}: the {split} split has no image ({', '.join(IMAGE_SUFFIXES)})"
            )
        images = _decode_files(paths, f"{root} ({split})")
        splits[split] = RawSplit(
            images=images, labels=np.asarray(labels, np.int64), sample_ids=np.array(ids)
        )
        all_files += paths
    list_files = [
        p
        for p in (
            root / "train.txt",
            root / "test.txt",
            root / "classes.json",
            root / "classes.txt",
        )
        if p.is_file()
    ]
    checksum = _checksum_files(root, sorted(set(all_files + list_files)))
    return _finish(dataset, "imagefolder", root, names, splits["train"], splits["test"], checksum)


# --------------------------------------------------------------------------------------
# download


def _cache_dir() -> Path:
    return Path(os.environ.get("SHIKE_DATA_CACHE") or Path.home() / ".cache" / "shike")


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_archive(dataset: str, dest_dir: Path | None = None) -> Path:
    """The official archive for cifar10/cifar100 in the cache (downloaded if absent), md5 verified."""
    url, filename, md5 = ARCHIVES[dataset]
    dest_dir = Path(dest_dir or _cache_dir())
    dest = dest_dir / filename
    if dest.is_file() and _md5(dest) == md5:
        return dest
    hint = f"pass --source <path to {filename} or a prepared folder> or set ${ENV_VARS[dataset]}"
    tmp = dest.with_name(dest.name + f".part-{os.getpid()}")
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        with (
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp,
            open(tmp, "wb") as out,
        ):
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
    except Exception as exc:  # URLError, socket timeouts, OSError, ...
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise SourceFormatError(
            f"no {dataset} source given and downloading {url} failed ({reason}); {hint}"
        ) from None
    got = _md5(tmp)
    if got != md5:
        tmp.unlink(missing_ok=True)
        raise SourceFormatError(f"downloaded {url} has md5 {got}, expected {md5}; {hint}")
    os.replace(tmp, dest)
    return dest


# --------------------------------------------------------------------------------------
# entry point


def resolve_source(dataset: str, source: str | os.PathLike | None) -> Path:
    """The local path to read: `source`, else $CIFAR10_DIR / $CIFAR100_DIR, else a download."""
    if dataset not in DATASETS:
        raise SourceFormatError(
            f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}"
        )
    if source is not None and str(source) != "":
        s = str(source)
        if s.startswith("file://"):
            s = s[len("file://") :]
        elif "://" in s:
            raise SourceFormatError(
                f"source {source}: only local paths are read (download it first)"
            )
        return Path(s).expanduser()
    if dataset == "imagefolder":
        raise SourceFormatError("the imagefolder dataset needs a source: pass --source <folder>")
    env = os.environ.get(ENV_VARS[dataset])
    if env:
        return Path(env).expanduser()
    return download_archive(dataset)


def detect_format(path: Path) -> tuple[str, Path]:
    """(format, path to read) for a source path; SourceFormatError naming it when unknown."""
    if not path.exists():
        raise SourceFormatError(f"source {path} does not exist")
    if path.is_file():
        if _tar_kind(path):
            return "cifar-tar", path
        raise SourceFormatError(f"source {path}: unknown format; accepted: {ACCEPTED_FORMATS}")
    if _is_parquet_folder(path):
        return "parquet", path
    names = {p.name for p in path.iterdir()}
    if _cifar_kind(n for n in names if (path / n).is_file()):
        return "cifar-dir", path
    for sub in ("cifar-100-python", "cifar-10-batches-py"):
        if (
            sub in names
            and (path / sub).is_dir()
            and _cifar_kind(p.name for p in (path / sub).iterdir())
        ):
            return "cifar-dir", path / sub
    for arch in ("cifar-100-python.tar.gz", "cifar-10-python.tar.gz"):
        if arch in names and (path / arch).is_file() and _tar_kind(path / arch):
            return "cifar-tar", path / arch
    if _is_image_folder(path):
        return "imagefolder", path
    raise SourceFormatError(f"source {path}: unknown format; accepted: {ACCEPTED_FORMATS}")


def load_raw_dataset(dataset: str, source: str | os.PathLike | None = None) -> RawDataset:
    """Read a raw dataset (train + official test split) as decoded uint8 pixels in source order.

    dataset: "cifar10" (10 classes), "cifar100" (100 classes) or "imagefolder" (any class
    count). Raises SourceFormatError (a DataError) with one line naming the path for unknown
    formats, unreadable files, wrong class counts and out-of-range labels (split, row, value).
    """
    path = resolve_source(dataset, source)
    fmt, target = detect_format(path)
    if fmt == "parquet":
        return _load_parquet_folder(target, dataset)
    if fmt == "cifar-tar":
        return _load_cifar_tar(target, dataset)
    if fmt == "cifar-dir":
        return _load_cifar_dir(target, dataset)
    return _load_image_folder(target, dataset)
