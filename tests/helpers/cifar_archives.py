"""Generated stand-ins for the raw datasets, in their real on-disk formats.

- `write_cifar100_archive`: `cifar-100-python.tar.gz` (or its extracted folder) in the official
  pickle layout: train/test dicts with b"data" (uint8 N x 3072, channel-planar), b"fine_labels",
  b"coarse_labels", b"filenames", b"batch_label"; meta with fine/coarse label names.
- `write_cifar10_archive`: `cifar-10-python.tar.gz` (data_batch_1..5, test_batch, batches.meta).
- `write_parquet_folder`: a folder like ../shared/data/cifar10 (train/test.parquet with PNG
  bytes + label, classes.json).
- `write_image_folder`: root/<split>/<class>/NNNN.png.

Pickles default to protocol 4 (fast for 150 MB of pixels); protocol=2 writes them the way
Python 3 writes Python-2-compatible pickles (bytes as _codecs.encode calls); protocol="py2"
writes the opcodes Python 2's cPickle wrote for the official files (`py2_pickle`). The reader
accepts all of these.

Images are random but blocky (random 8x8 upscaled to 32x32) so they compress and encode fast.
Rows are in a seeded random class order (like the official pickles), so "first n per class in
source order" is not the same as "the first rows". Every function returns what it wrote,
including the generated pixels and labels, for exact comparisons.
"""

from __future__ import annotations

import io
import json
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CIFAR100_FINE_NAMES = [f"fine{i:02d}" for i in range(100)]
CIFAR100_COARSE_NAMES = [f"coarse{i:02d}" for i in range(20)]
CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


@dataclass
class GeneratedSplit:
    images: np.ndarray  # uint8 (N, 32, 32, 3), in file order
    labels: np.ndarray  # int64 (N,)
    coarse_labels: np.ndarray | None
    filenames: list[str]


@dataclass
class Generated:
    path: Path
    class_names: list[str]
    train: GeneratedSplit
    test: GeneratedSplit
    coarse_class_names: list[str] | None = None


def random_images(n: int, rng: np.random.Generator, size: int = 32, block: int = 4) -> np.ndarray:
    small = rng.integers(0, 256, (n, size // block, size // block, 3), dtype=np.uint8)
    return np.ascontiguousarray(small.repeat(block, axis=1).repeat(block, axis=2))


def _labels(num_classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    rng.shuffle(labels)
    return labels


def _split(num_classes, per_class, rng, prefix, coarse_of=None) -> GeneratedSplit:
    labels = _labels(num_classes, per_class, rng)
    images = random_images(len(labels), rng)
    coarse = (
        None if coarse_of is None else np.asarray([coarse_of(int(c)) for c in labels], np.int64)
    )
    names = [f"{prefix}_s_{i:06d}.png" for i in range(len(labels))]
    return GeneratedSplit(images, labels, coarse, names)


def _planar(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def _dump(obj, protocol: int | str) -> bytes:
    if protocol == "py2":
        return py2_pickle(obj)
    return pickle.dumps(obj, protocol=protocol)


def _write_tree(
    files: dict[str, bytes], out: Path, top: str, extracted: bool, compresslevel: int
) -> Path:
    if extracted:
        d = out / top
        d.mkdir(parents=True, exist_ok=True)
        for name, blob in files.items():
            (d / name).write_bytes(blob)
        return d
    out.mkdir(parents=True, exist_ok=True)
    path = out / (top.replace("-batches-py", "-python") + ".tar.gz")
    with tarfile.open(path, "w:gz", compresslevel=compresslevel) as tf:
        info = tarfile.TarInfo(top)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
        tf.addfile(info)
        for name, blob in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode, info.mtime = len(blob), 0o644, 0
            tf.addfile(info, io.BytesIO(blob))
    return path


def write_cifar100_archive(
    out_dir: str | Path,
    train_per_class: int = 5,
    test_per_class: int = 2,
    *,
    seed: int = 0,
    extracted: bool = False,
    compresslevel: int = 1,
    protocol: int | str = 4,
    bad_label: tuple[str, int, int] | None = None,
) -> Generated:
    """Write `out_dir/cifar-100-python.tar.gz` (or the folder `out_dir/cifar-100-python/` when
    extracted). bad_label=("train", row, value) plants an out-of-range fine label."""
    rng = np.random.default_rng(seed)
    coarse_of = lambda c: c // 5  # noqa: E731  synthetic superclass map
    train = _split(100, train_per_class, rng, "train", coarse_of)
    test = _split(100, test_per_class, rng, "test", coarse_of)
    files = {}
    for key, sp in (("train", train), ("test", test)):
        fine = [int(x) for x in sp.labels]
        if bad_label and bad_label[0] == key:
            fine[bad_label[1]] = bad_label[2]
        files[key] = _dump(
            protocol=protocol,
            obj={
                b"filenames": [f.encode() for f in sp.filenames],
                b"batch_label": f"{key}ing batch 1 of 1".encode(),
                b"fine_labels": fine,
                b"coarse_labels": [int(x) for x in sp.coarse_labels],
                b"data": _planar(sp.images),
            },
        )
    files["meta"] = _dump(
        protocol=protocol,
        obj={
            b"fine_label_names": [n.encode() for n in CIFAR100_FINE_NAMES],
            b"coarse_label_names": [n.encode() for n in CIFAR100_COARSE_NAMES],
        },
    )
    path = _write_tree(files, Path(out_dir), "cifar-100-python", extracted, compresslevel)
    return Generated(path, list(CIFAR100_FINE_NAMES), train, test, list(CIFAR100_COARSE_NAMES))


def write_cifar10_archive(
    out_dir: str | Path,
    train_per_class: int = 5,
    test_per_class: int = 2,
    *,
    seed: int = 0,
    extracted: bool = False,
    compresslevel: int = 1,
    protocol: int | str = 4,
) -> Generated:
    """Write `out_dir/cifar-10-python.tar.gz` (or `out_dir/cifar-10-batches-py/`): five train
    batches (the train rows split in order) + test_batch + batches.meta."""
    rng = np.random.default_rng(seed)
    train = _split(10, train_per_class, rng, "train")
    test = _split(10, test_per_class, rng, "test")
    files = {}
    parts = np.array_split(np.arange(len(train.labels)), 5)
    for b, idx in enumerate(parts, 1):
        files[f"data_batch_{b}"] = _dump(
            protocol=protocol,
            obj={
                b"batch_label": f"training batch {b} of 5".encode(),
                b"labels": [int(x) for x in train.labels[idx]],
                b"data": _planar(train.images[idx]),
                b"filenames": [train.filenames[i].encode() for i in idx],
            },
        )
    files["test_batch"] = _dump(
        protocol=protocol,
        obj={
            b"batch_label": b"testing batch 1 of 1",
            b"labels": [int(x) for x in test.labels],
            b"data": _planar(test.images),
            b"filenames": [f.encode() for f in test.filenames],
        },
    )
    files["batches.meta"] = _dump(
        protocol=protocol,
        obj={
            b"label_names": [n.encode() for n in CIFAR10_NAMES],
            b"num_cases_per_batch": 10000,
            b"num_vis": 3072,
        },
    )
    path = _write_tree(files, Path(out_dir), "cifar-10-batches-py", extracted, compresslevel)
    return Generated(path, list(CIFAR10_NAMES), train, test)


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet_folder(
    root: str | Path,
    train_per_class: int = 5,
    test_per_class: int = 2,
    *,
    num_classes: int = 10,
    seed: int = 0,
    class_names: list[str] | None = None,
    classes_json: bool = True,
    sorted_by_class: bool = True,
    bad_label: tuple[str, int, int] | None = None,
    label_type: str = "int16",
) -> Generated:
    """A folder like ../shared/data/cifar10: train.parquet / test.parquet with columns image
    (PNG bytes) and label (int16), rows by class then number; classes.json with label_names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = class_names or (
        CIFAR10_NAMES if num_classes == 10 else [f"c{i}" for i in range(num_classes)]
    )
    splits = {}
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        sp = _split(num_classes, per, rng, split)
        if sorted_by_class:
            order = np.argsort(sp.labels, kind="stable")
            sp = GeneratedSplit(
                sp.images[order], sp.labels[order], None, [sp.filenames[i] for i in order]
            )
        labels = sp.labels.copy()
        if bad_label and bad_label[0] == split:
            labels[bad_label[1]] = bad_label[2]
        table = pa.table(
            {
                "image": pa.array([_png(a) for a in sp.images], pa.binary()),
                "label": pa.array(labels, getattr(pa, label_type)()),
            }
        )
        pq.write_table(table, root / f"{split}.parquet", compression="zstd")
        splits[split] = sp
    if classes_json:
        (root / "classes.json").write_text(
            json.dumps({"label_names": list(names), "coarse_label_names": None})
        )
    return Generated(root, list(names), splits["train"], splits["test"])


def write_image_folder(
    root: str | Path,
    train_per_class: int = 3,
    test_per_class: int = 2,
    *,
    num_classes: int = 3,
    seed: int = 0,
    suffix: str = ".png",
) -> Generated:
    """root/<split>/<class>/<n>.png with class folders cls_a, cls_b, ... (sorted = label order)."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    names = [f"cls_{chr(ord('a') + i)}" for i in range(num_classes)]
    splits = {}
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(num_classes, dtype=np.int64), per)
        images = random_images(len(labels), rng)
        files = []
        for i, (c, img) in enumerate(zip(labels, images, strict=True)):
            d = root / split / names[c]
            d.mkdir(parents=True, exist_ok=True)
            fn = f"{i % per + 1}{suffix}"  # 1.png, 2.png, ... 10.png: natural order
            Image.fromarray(img).save(d / fn)
            files.append(f"{split}/{names[c]}/{fn}")
        splits[split] = GeneratedSplit(images, labels, None, files)
    return Generated(root, names, splits["train"], splits["test"])


# --------------------------------------------------------------------------------------
# Python 2 cPickle bytes, as in the official archives (written opcode by opcode)


def py2_pickle(obj) -> bytes:
    """Pickle `obj` the way Python 2's cPickle (protocol 2) writes the official CIFAR files:
    str as BINSTRING, numpy arrays through numpy.core.multiarray._reconstruct with a
    numpy.dtype('u1') state. Supports dict, list, tuple, bytes/str, int, None, bool and
    2-D uint8 arrays."""
    import struct

    out = bytearray(b"\x80\x02")

    def string(b: bytes) -> None:
        if len(b) < 256:
            out.extend(b"U" + bytes([len(b)]) + b)
        else:
            out.extend(b"T" + struct.pack("<i", len(b)) + b)

    def integer(i: int) -> None:
        if 0 <= i < 256:
            out.extend(b"K" + bytes([i]))
        elif 0 <= i < 65536:
            out.extend(b"M" + struct.pack("<H", i))
        else:
            out.extend(b"J" + struct.pack("<i", i))

    def glob(module: str, name: str) -> None:
        out.extend(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def emit(o) -> None:
        if o is None:
            out.extend(b"N")
        elif isinstance(o, bool):
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, (int, np.integer)):
            integer(int(o))
        elif isinstance(o, str):
            string(o.encode())
        elif isinstance(o, bytes):
            string(o)
        elif isinstance(o, (list, tuple)):
            out.extend(b"]" if isinstance(o, list) else b"")
            out.extend(b"(")
            for v in o:
                emit(v)
            out.extend(b"e" if isinstance(o, list) else b"t")
        elif isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                emit(k)
                emit(v)
            out.extend(b"u")
        elif isinstance(o, np.ndarray):
            assert o.dtype == np.uint8
            glob("numpy.core.multiarray", "_reconstruct")
            glob("numpy", "ndarray")
            out.extend(b"K\x00\x85")  # (0,)
            string(b"b")
            out.extend(b"\x87R")  # _reconstruct(ndarray, (0,), 'b')
            out.extend(b"(K\x01")
            emit(tuple(int(s) for s in o.shape))
            glob("numpy", "dtype")
            string(b"u1")
            out.extend(b"K\x00K\x01\x87R")  # dtype('u1', 0, 1)
            out.extend(b"(K\x03")
            string(b"|")
            out.extend(
                b"NNN" + b"J" + struct.pack("<i", -1) + b"J" + struct.pack("<i", -1) + b"K\x00tb"
            )
            out.extend(b"\x89")
            string(np.ascontiguousarray(o).tobytes())
            out.extend(b"tb")
        else:
            raise TypeError(f"py2_pickle: unsupported {type(o).__name__}")

    emit(obj)
    out.extend(b".")
    return bytes(out)
