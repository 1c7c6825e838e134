"""Raw source (b): the official CIFAR python archives, and their download.

`cifar-100-python.tar.gz` / `cifar-10-python.tar.gz`, or their extracted folders
(`cifar-100-python/`: train, test, meta; `cifar-10-batches-py/`: data_batch_1..5, test_batch,
batches.meta). Without a source they are downloaded (md5 verified) into $SHIKE_DATA_CACHE
(default ~/.cache/shike).
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tarfile
import urllib.request
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from pipeline.data import SourceFormatError
from pipeline.data.sources.raw import (
    NUM_CLASSES,
    RawDataset,
    RawSplit,
    build_raw_dataset,
    checksum_files,
    file_hexdigest,
)

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

_CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_FILES = (*_CIFAR10_TRAIN_BATCHES, "test_batch", "batches.meta")
_CIFAR100_FILES = ("train", "test", "meta")


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


def cifar_kind(file_names: Iterable[str]) -> str | None:
    """ "cifar100" / "cifar10" when the names include every file of an extracted archive."""
    names = set(file_names)
    if set(_CIFAR100_FILES) <= names:
        return "cifar100"
    if set(_CIFAR10_FILES) <= names:
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
    return build_raw_dataset(
        name, "cifar-python", Path(where), names, train, test, checksum, coarse
    )


def tar_kind(path: Path) -> str | None:
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


def load_cifar_tar(path: Path, dataset: str) -> RawDataset:
    kind = tar_kind(path)
    assert kind is not None
    wanted = set(_CIFAR100_FILES if kind == "cifar100" else _CIFAR10_FILES)
    checksum = "sha256:" + file_hexdigest(path)
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


def load_cifar_folder(root: Path, dataset: str) -> RawDataset:
    kind = cifar_kind(p.name for p in root.iterdir() if p.is_file())
    assert kind is not None
    files = _CIFAR100_FILES if kind == "cifar100" else _CIFAR10_FILES
    checksum = checksum_files(root, [root / f for f in files])
    return _build_cifar(kind, lambda n: (root / n).read_bytes(), str(root), dataset, checksum)


def download_archive(dataset: str, dest_dir: Path | None = None) -> Path:
    """The official archive for cifar10/cifar100 in the cache (downloaded if absent), md5 verified."""
    url, filename, md5 = ARCHIVES[dataset]
    dest_dir = Path(
        dest_dir or os.environ.get("SHIKE_DATA_CACHE") or Path.home() / ".cache" / "shike"
    )
    dest = dest_dir / filename
    if dest.is_file() and file_hexdigest(dest, "md5") == md5:
        return dest
    hint = f"pass --source <path to {filename} or a prepared folder> or set ${ENV_VARS[dataset]}"
    tmp = dest.with_name(dest.name + f".part-{os.getpid()}")
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        with (
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp,
            open(tmp, "wb") as out,
        ):
            shutil.copyfileobj(resp, out)
    except Exception as exc:  # URLError, socket timeouts, OSError, ...
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise SourceFormatError(
            f"no {dataset} source given and downloading {url} failed ({reason}); {hint}"
        ) from None
    got = file_hexdigest(tmp, "md5")
    if got != md5:
        tmp.unlink(missing_ok=True)
        raise SourceFormatError(f"downloaded {url} has md5 {got}, expected {md5}; {hint}")
    os.replace(tmp, dest)
    return dest
