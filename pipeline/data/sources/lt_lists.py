"""The long-tail community's list files of ImageNet-LT, Places-LT and iNaturalist 2018: which
image of ROOT goes to which split with which label, and the class names.

    lists = read_benchmark_lists("imagenet_lt", Path("/data/imagenet"))
    lists.splits["train"].entries[0]     # ListEntry(path="train/n01440764/n01440764_190.JPEG", label=0, line=1)

Formats (paths are relative to ROOT, '/'-separated; they are the samples' stable ids):
- ImageNet-LT: `ImageNet_LT_{train,val,test}.txt`, one `PATH LABEL` a line (1,000 classes;
  115,846 / 20,000 / 50,000 images). Class name: the synset directory of the class's images.
- Places-LT: `Places_LT_{train,val,test}.txt`, the same line format (365 classes). Class name:
  the Places-365 category path of the class's images ("a/abbey", "a/apartment_building/outdoor"),
  i.e. their parent directory from its one-letter folder on (the whole parent directory when
  there is no such folder).
- iNaturalist 2018: the official COCO-style `train2018.json` / `val2018.json` (`images` [id,
  file_name], `annotations` [image_id, category_id], `categories` [id, name]; names from
  `categories`), or the `iNaturalist18_{train,val}.txt` lists of the decoupling/RIDE code bases
  (class name: "<supercategory>/<id>", the last two folders). JSON is used when ROOT has both.
  iNaturalist 2018 has no held-out split besides val, which the literature reports as its test
  set: there is no test list, and `aliases` says test is val (the manifest lists val's shards).

Splits: train = the long-tailed list itself, val = the *_val list, test = the *_test list.
Class range: 0..C-1 where C is one more than the largest training label (iNat JSON: the
categories), and every class has a training image in one directory of its own. Anything
else (a malformed line, a path named twice in one file, a label outside the range, a class
spread over two directories) is a SourceFormatError naming the list file and the line (JSON:
the entry, `images[i]`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from pipeline.data import SourceFormatError
from pipeline.data.sources.raw import checksum_files

LIST_FILES = {
    "imagenet_lt": {s: f"ImageNet_LT_{s}.txt" for s in ("train", "val", "test")},
    "places_lt": {s: f"Places_LT_{s}.txt" for s in ("train", "val", "test")},
}
INAT_JSON = {"train": "train2018.json", "val": "val2018.json"}
INAT_TXT = {"train": "iNaturalist18_train.txt", "val": "iNaturalist18_val.txt"}
# Class counts of the real benchmarks (a list with another count is reported, not refused:
# small lists in these formats are how the pipeline is tested).
OFFICIAL_NUM_CLASSES = {"imagenet_lt": 1000, "places_lt": 365, "inat2018": 8142}
DATASETS = tuple(OFFICIAL_NUM_CLASSES)


class ListEntry(NamedTuple):
    path: str  # relative to ROOT: the sample_id
    label: int
    line: int  # 1-based line of a txt list; 1-based position in a JSON file's `images`


@dataclass(frozen=True)
class SplitList:
    file: Path  # the list file
    entries: list[ListEntry]

    def position(self, entry: ListEntry) -> str:
        """ "line 17" in a txt list, "images[16]" in a JSON file."""
        if self.file.suffix == ".json":
            return f"images[{entry.line - 1}]"
        return f"line {entry.line}"

    def where(self, entry: ListEntry) -> str:
        """The list file and the entry's place in it, for error messages."""
        return f"{self.file} {self.position(entry)}"


@dataclass(frozen=True)
class BenchmarkLists:
    dataset: str  # imagenet_lt | places_lt | inat2018
    root: Path
    format: str  # "imagenet_lt-txt", "places_lt-txt", "inat2018-json" or "inat2018-txt"
    class_names: list[str]
    splits: dict[str, SplitList]  # train, val[, test]
    aliases: dict[str, str] = field(default_factory=dict)  # {"test": "val"} for iNat

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def checksum(self) -> str:
        """sha256 of the list files (names and contents), "sha256:<hex>"."""
        return checksum_files(self.root, [s.file for s in self.splits.values()])


def _relative_path(text: str, where: str) -> str:
    path = PurePosixPath(text)
    if path.is_absolute() or ".." in path.parts or not path.name:
        raise SourceFormatError(f"{where}: {text!r} is not a path relative to the dataset root")
    return path.as_posix()


def _check_unique(entries: list[ListEntry], split: SplitList) -> None:
    first: dict[str, ListEntry] = {}
    for entry in entries:
        earlier = first.setdefault(entry.path, entry)
        if earlier is not entry:
            raise SourceFormatError(
                f"{split.where(entry)}: {entry.path} is listed twice (first at "
                f"{split.position(earlier)})"
            )


def read_txt_list(path: Path) -> SplitList:
    """`PATH LABEL` lines (blank lines ignored)."""
    split = SplitList(path, [])
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceFormatError(f"cannot read the list file {path}: {exc}") from None
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path} line {number}"
        if len(fields) != 2:
            raise SourceFormatError(f"{where}: expected 'PATH LABEL', got {line.strip()!r}")
        try:
            label = int(fields[1])
        except ValueError:
            raise SourceFormatError(f"{where}: label {fields[1]!r} is not an integer") from None
        if label < 0:
            raise SourceFormatError(f"{where}: label {label} is negative")
        split.entries.append(ListEntry(_relative_path(fields[0], where), label, number))
    if not split.entries:
        raise SourceFormatError(f"the list file {path} lists no image")
    _check_unique(split.entries, split)
    return split


def _load_json(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise SourceFormatError(f"cannot read {path} as JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SourceFormatError(f"{path}: not a COCO-style file (no 'images' list)")
    return data


def read_inat_json(path: Path) -> tuple[SplitList, list[str] | None]:
    """(the images in `images` order with their annotation's category, category names by id
    when the file has `categories`)."""
    data = _load_json(path)
    split = SplitList(path, [])
    category_of: dict[object, int] = {}
    for i, ann in enumerate(data.get("annotations") or []):
        try:
            image_id, category = ann["image_id"], int(ann["category_id"])
        except (KeyError, TypeError, ValueError):
            raise SourceFormatError(
                f"{path} annotations[{i}]: needs 'image_id' and an integer 'category_id'"
            ) from None
        if category_of.setdefault(image_id, category) != category:
            raise SourceFormatError(
                f"{path} annotations[{i}]: image id {image_id} has two categories"
            )
    for i, image in enumerate(data["images"]):
        where = f"{path} images[{i}]"
        try:
            image_id, name = image["id"], str(image["file_name"])
        except (KeyError, TypeError):
            raise SourceFormatError(f"{where}: needs 'id' and 'file_name'") from None
        if image_id not in category_of:
            raise SourceFormatError(f"{where}: image id {image_id} ({name}) has no annotation")
        label = category_of[image_id]
        if label < 0:
            raise SourceFormatError(f"{where}: category_id {label} is negative")
        split.entries.append(ListEntry(_relative_path(name, where), label, i + 1))
    if not split.entries:
        raise SourceFormatError(f"{path} lists no image")
    _check_unique(split.entries, split)
    names = None
    if "categories" in data:
        by_id = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        if sorted(by_id) != list(range(len(by_id))):
            raise SourceFormatError(f"{path}: category ids are not 0..{len(by_id) - 1}")
        names = [by_id[i] for i in range(len(by_id))]
    return split, names


def _synset(parent: PurePosixPath) -> str:
    return parent.name


def _places_category(parent: PurePosixPath) -> str:
    # Places-365 categories sit under a one-letter folder (data_256/a/apartment_building/outdoor)
    letters = [i for i, part in enumerate(parent.parts) if len(part) == 1 and part.isalpha()]
    return "/".join(parent.parts[letters[0] :]) if letters else parent.as_posix()


def _inat_category(parent: PurePosixPath) -> str:
    return "/".join(parent.parts[-2:])  # train_val2018/Plantae/7477 -> Plantae/7477


def _class_directories(train: SplitList, num_classes: int) -> list[PurePosixPath]:
    """The one directory of each class's training images (checked for every line)."""
    folder: dict[int, tuple[PurePosixPath, ListEntry]] = {}
    owner: dict[PurePosixPath, int] = {}
    for entry in train.entries:
        parent = PurePosixPath(entry.path).parent
        first = folder.setdefault(entry.label, (parent, entry))
        if first[0] != parent:
            raise SourceFormatError(
                f"{train.where(entry)}: {entry.path} has label {entry.label}, whose images are "
                f"in {first[0]}/ ({train.position(first[1])})"
            )
        if owner.setdefault(parent, entry.label) != entry.label:
            raise SourceFormatError(
                f"{train.where(entry)}: {entry.path} has label {entry.label}, but {parent}/ holds "
                f"the images of label {owner[parent]}"
            )
    missing = [c for c in range(num_classes) if c not in folder]
    if missing:
        raise SourceFormatError(
            f"{train.file}: classes {missing[:10]}{'...' if len(missing) > 10 else ''} have no "
            f"training image (the largest label, {num_classes - 1}, makes {num_classes} classes)"
        )
    return [folder[c][0] for c in range(num_classes)]


def _check_range(split: SplitList, num_classes: int) -> None:
    for entry in split.entries:
        if entry.label >= num_classes:
            raise SourceFormatError(
                f"{split.where(entry)}: label {entry.label} of {entry.path} is outside the class "
                f"range 0..{num_classes - 1}"
            )


def _from_txt_lists(dataset: str, root: Path, files: dict[str, str], name_of) -> BenchmarkLists:
    splits = {name: read_txt_list(root / file) for name, file in files.items()}
    num_classes = 1 + max(e.label for e in splits["train"].entries)
    directories = _class_directories(splits["train"], num_classes)
    for split in splits.values():
        _check_range(split, num_classes)
    names = [name_of(d) for d in directories]
    aliases = {"test": "val"} if "test" not in splits else {}
    return BenchmarkLists(dataset, root, f"{dataset}-txt", names, splits, aliases)


def _from_inat_json(root: Path) -> BenchmarkLists:
    train, names = read_inat_json(root / INAT_JSON["train"])
    val, _ = read_inat_json(root / INAT_JSON["val"])
    if names is None:
        raise SourceFormatError(f"{train.file}: no 'categories' (the class names)")
    for split in (train, val):
        _check_range(split, len(names))
    return BenchmarkLists(
        "inat2018", root, "inat2018-json", names, {"train": train, "val": val}, {"test": "val"}
    )


def _missing(root: Path, files: dict[str, str]) -> list[str]:
    return [f for f in files.values() if not (root / f).is_file()]


def read_benchmark_lists(dataset: str, root: Path) -> BenchmarkLists:
    """The splits and class names of `dataset` from the list files in `root`."""
    if not root.is_dir():
        raise SourceFormatError(f"source {root} is not a folder")
    if dataset in LIST_FILES:
        files = LIST_FILES[dataset]
        if _missing(root, files):
            raise SourceFormatError(
                f"source {root}: no {', '.join(_missing(root, files))} (the {dataset} lists)"
            )
        name_of = _synset if dataset == "imagenet_lt" else _places_category
        return _from_txt_lists(dataset, root, files, name_of)
    if dataset == "inat2018":
        if not _missing(root, INAT_JSON):
            return _from_inat_json(root)
        if not _missing(root, INAT_TXT):
            return _from_txt_lists(dataset, root, INAT_TXT, _inat_category)
        raise SourceFormatError(
            f"source {root}: neither {' + '.join(INAT_JSON.values())} nor "
            f"{' + '.join(INAT_TXT.values())} (the iNaturalist 2018 lists)"
        )
    raise SourceFormatError(f"unknown benchmark {dataset!r}; expected one of {', '.join(DATASETS)}")
