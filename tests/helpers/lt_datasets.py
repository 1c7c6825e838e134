"""Small datasets in the exact on-disk formats of ImageNet-LT, Places-LT and iNaturalist 2018
(list files or COCO-style JSON beside real JPEGs), for tests and benchmarks.

    root = write_imagenet_lt(tmp_path / "imagenet")        # ROOT/ImageNet_LT_{train,val,test}.txt
    root = write_places_lt(tmp_path / "places")            # ROOT/Places_LT_{train,val,test}.txt
    root = write_inat2018_json(tmp_path / "inat")          # ROOT/train2018.json, val2018.json
    root = write_inat2018_txt(tmp_path / "inat-txt")       # ROOT/iNaturalist18_{train,val}.txt

Each function returns ROOT (the folder to pass as `--source`). The training list is long-tailed:
class c has `train_counts(num_classes, n_max, n_min)[c]` images (n_max for class 0 down to n_min
for the last, exponentially); val and test are balanced, `eval_per_class` images per class
(iNat: val only). Images are JPEGs of random height and width in `sides` (so aspect ratios vary
too): a class colour with a gradient, plus pixel noise of standard deviation `noise` (the
default 12 gives ~50 kB at 400x350; 40 ~100 kB, about ImageNet's weight; 120 is mostly noise,
for tests that need bytes). Everything depends only on `seed`.

Layouts (as the real datasets'):
- ImageNet-LT: train/<synset>/<synset>_<k>.JPEG (train and val lists), val/<synset>/
  ILSVRC2012_val_<8 digits>.JPEG (test list); labels in sorted synset order.
- Places-LT: data_256/<letter>/<category>/<8 digits>.jpg (train, val), val_256/
  Places365_val_<8 digits>.jpg (test: one flat folder, as Places-365's val set).
- iNaturalist 2018: train_val2018/<supercategory>/<category id>/<32 hex>.jpg; JSON with
  images [id, file_name, width, height], annotations [id, image_id, category_id], categories
  [id, name, supercategory]; the txt lists' labels are the category ids.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

PLACES_CATEGORIES = [
    "a/abbey", "a/airfield", "a/apartment_building/outdoor", "b/bakery/shop", "b/beach",
    "c/campsite", "c/canyon", "d/desert/sand", "f/forest_path", "h/harbor", "l/lighthouse",
    "m/mountain",
]  # fmt: skip
INAT_SPECIES = [
    ("Quercus robur", "Plantae"), ("Amanita muscaria", "Fungi"), ("Danaus plexippus", "Insecta"),
    ("Parus major", "Aves"), ("Vulpes vulpes", "Mammalia"), ("Bufo bufo", "Amphibia"),
    ("Helix pomatia", "Mollusca"), ("Pinus sylvestris", "Plantae"), ("Ursus arctos", "Mammalia"),
    ("Apis mellifera", "Insecta"), ("Salmo trutta", "Actinopterygii"), ("Falco peregrinus", "Aves"),
]  # fmt: skip


def train_counts(num_classes: int, n_max: int, n_min: int) -> list[int]:
    """Training images per class: n_max for class 0 down to n_min for the last."""
    if num_classes == 1:
        return [n_max]
    ratio = n_min / n_max
    return [round(n_max * ratio ** (c / (num_classes - 1))) for c in range(num_classes)]


def _jpeg(rng: np.random.Generator, label: int, sides: tuple[int, int], noise: float) -> bytes:
    h, w = (int(v) for v in rng.integers(sides[0], sides[1] + 1, size=2))
    colour = np.array([(label * 67) % 256, (label * 151 + 80) % 256, (label * 29 + 160) % 256])
    ramp = np.linspace(0.6, 1.2, w)[None, :, None]
    pixels = colour * ramp + rng.normal(0.0, noise, size=(h, w, 3))
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


class _Writer:
    """Writes the images of one dataset under ROOT and remembers what it wrote."""

    def __init__(self, root: Path, sides: tuple[int, int], noise: float, seed: int) -> None:
        self.root, self.sides, self.noise = root, sides, noise
        self.rng = np.random.default_rng(seed)
        self.sizes: dict[str, tuple[int, int]] = {}  # rel path -> (width, height)

    def image(self, rel: str, label: int) -> str:
        data = _jpeg(self.rng, label, self.sides, self.noise)
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        with Image.open(io.BytesIO(data)) as im:
            self.sizes[rel] = im.size
        return rel


def _write_list(path: Path, rows: list[tuple[str, int]]) -> None:
    path.write_text("".join(f"{rel} {label}\n" for rel, label in rows))


def write_imagenet_lt(
    root: Path,
    *,
    num_classes: int = 10,
    n_max: int = 30,
    n_min: int = 2,
    eval_per_class: int = 3,
    sides: tuple[int, int] = (24, 96),
    noise: float = 12.0,
    seed: int = 0,
) -> Path:
    """ImageNet_LT_{train,val,test}.txt beside train/ and val/ folders of JPEGs."""
    out = _Writer(root, sides, noise, seed)
    synsets = [f"n{1440764 + 7919 * c:08d}" for c in range(num_classes)]  # sorted, like WordNet ids
    train, val, test = [], [], []
    counts = train_counts(num_classes, n_max, n_min)
    for c, syn in enumerate(synsets):
        # The val list takes further images of the class's train folder, as ImageNet-LT's does.
        files = [
            out.image(f"train/{syn}/{syn}_{k}.JPEG", c) for k in range(counts[c] + eval_per_class)
        ]
        train += [(f, c) for f in files[: counts[c]]]
        val += [(f, c) for f in files[counts[c] :]]
        for k in range(eval_per_class):
            test.append((out.image(f"val/{syn}/ILSVRC2012_val_{c * 100 + k + 1:08d}.JPEG", c), c))
    for name, rows in (("train", train), ("val", val), ("test", test)):
        _write_list(root / f"ImageNet_LT_{name}.txt", rows)
    return root


def _places_category(c: int) -> str:
    if c < len(PLACES_CATEGORIES):
        return PLACES_CATEGORIES[c]
    return f"{'abcdefghijklmnopqrstuvwxyz'[c % 26]}/scene_{c}"


def write_places_lt(
    root: Path,
    *,
    num_classes: int = 10,
    n_max: int = 30,
    n_min: int = 2,
    eval_per_class: int = 3,
    sides: tuple[int, int] = (24, 96),
    noise: float = 12.0,
    seed: int = 0,
) -> Path:
    """Places_LT_{train,val,test}.txt beside data_256/ (train, val) and val_256/ (test)."""
    out = _Writer(root, sides, noise, seed)
    train, val, test = [], [], []
    counts = train_counts(num_classes, n_max, n_min)
    serial = 0
    for c in range(num_classes):
        category = _places_category(c)
        files = [
            out.image(f"data_256/{category}/{k + 1:08d}.jpg", c)
            for k in range(counts[c] + eval_per_class)
        ]
        train += [(f, c) for f in files[: counts[c]]]
        val += [(f, c) for f in files[counts[c] :]]
        for _ in range(eval_per_class):
            serial += 1
            test.append((out.image(f"val_256/Places365_val_{serial:08d}.jpg", c), c))
    for name, rows in (("train", train), ("val", val), ("test", test)):
        _write_list(root / f"Places_LT_{name}.txt", rows)
    return root


def _species(c: int) -> tuple[str, str]:
    if c < len(INAT_SPECIES):
        return INAT_SPECIES[c]
    return f"Taxon {c}", "Plantae"


def _inat_images(
    out: _Writer, num_classes: int, n_max: int, n_min: int, eval_per_class: int
) -> dict[str, list[tuple[str, int]]]:
    counts = train_counts(num_classes, n_max, n_min)
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "val": []}
    for c in range(num_classes):
        kingdom = _species(c)[1]
        for k in range(counts[c] + eval_per_class):
            name = hashlib.md5(f"{c}-{k}".encode()).hexdigest()
            rel = out.image(f"train_val2018/{kingdom}/{c}/{name}.jpg", c)
            splits["train" if k < counts[c] else "val"].append((rel, c))
    return splits


def write_inat2018_json(
    root: Path,
    *,
    num_classes: int = 10,
    n_max: int = 30,
    n_min: int = 2,
    eval_per_class: int = 3,
    sides: tuple[int, int] = (24, 96),
    noise: float = 12.0,
    seed: int = 0,
) -> Path:
    """The official train2018.json / val2018.json beside train_val2018/."""
    out = _Writer(root, sides, noise, seed)
    splits = _inat_images(out, num_classes, n_max, n_min, eval_per_class)
    categories = [
        {"id": c, "name": _species(c)[0], "supercategory": _species(c)[1]}
        for c in range(num_classes)
    ]
    first_id = {"train": 0, "val": 1_000_000}  # the official files number val images apart too
    for split, rows in splits.items():
        images, annotations = [], []
        for i, (rel, c) in enumerate(rows):
            width, height = out.sizes[rel]
            image_id = first_id[split] + i
            images.append({"id": image_id, "file_name": rel, "width": width, "height": height})
            annotations.append({"id": image_id, "image_id": image_id, "category_id": c})
        doc = {
            "info": {"year": 2018, "description": "generated in the iNaturalist 2018 format"},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        (root / f"{split}2018.json").write_text(json.dumps(doc))
    return root


def write_inat2018_txt(
    root: Path,
    *,
    num_classes: int = 10,
    n_max: int = 30,
    n_min: int = 2,
    eval_per_class: int = 3,
    sides: tuple[int, int] = (24, 96),
    noise: float = 12.0,
    seed: int = 0,
) -> Path:
    """The decoupling/RIDE code bases' iNaturalist18_{train,val}.txt beside train_val2018/."""
    out = _Writer(root, sides, noise, seed)
    for split, rows in _inat_images(out, num_classes, n_max, n_min, eval_per_class).items():
        _write_list(root / f"iNaturalist18_{split}.txt", rows)
    return root
