"""The ImageNet layout: which files make up a split, and their labels.

Reads (never writes) a dataset root, local or on an object store, laid out as ImageNet is
distributed:

    train/<wnid>/<wnid>_<n>.JPEG
    val/<wnid>/*.JPEG                       (class folders), or
    val/ILSVRC2012_val_<n>.JPEG + LOC_val_solution.csv   (flat; the CSV's first wnid is the label)
    LOC_synset_mapping.txt                  (one wnid per line, in label order)

Labels follow `LOC_synset_mapping.txt`; without it, the sorted wnids of the split's class
folders. A source key is a file's path relative to the root (`train/n01440764/x.JPEG`):
the manifest records keys, so a dataset that moves keeps its identity.

The listing is one recursive list of the split (one paginated ListObjects on S3), done in
the driver; the bytes are read later inside Ray Data tasks (pipelines.data.preprocess).
"""

from __future__ import annotations

import csv
import io
import logging
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field

from pipelines.core import storage
from pipelines.core.errors import SarError

log = logging.getLogger(__name__)

SYNSET_MAPPING = "LOC_synset_mapping.txt"
VAL_SOLUTION = "LOC_val_solution.csv"
# What torchvision's ImageFolder calls images; anything else in a class folder is ignored.
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclass(frozen=True)
class SourceListing:
    """The files of one split: (key, label) pairs sorted by key, and the label names."""

    root: str
    split: str
    wnids: list[str]  # label -> wnid, after the `classes` subset
    items: list[tuple[str, int]] = field(repr=False)

    @property
    def keys(self) -> list[str]:
        return [k for k, _ in self.items]


def read_synset_mapping(root: str, storage_options: dict | None = None) -> list[str] | None:
    """The wnids in label order from LOC_synset_mapping.txt, or None when the file is absent."""
    url = storage.join(root, SYNSET_MAPPING)
    if not storage.exists(url, storage_options):
        return None
    wnids = [line.split()[0] for line in storage.read_text(url, storage_options).splitlines() if line.strip()]
    if len(set(wnids)) != len(wnids):
        raise SarError(f"{storage.redact(url)}: a wnid is listed twice")
    return wnids


def _read_val_solution(root: str, storage_options: dict | None) -> dict[str, str]:
    """ImageId -> wnid from LOC_val_solution.csv (the first box's wnid is the image's class)."""
    url = storage.join(root, VAL_SOLUTION)
    if not storage.exists(url, storage_options):
        raise SarError(f"data.source: val/ is flat but {storage.redact(url)} is missing, so it has no labels")
    labels = {}
    for row in csv.DictReader(io.StringIO(storage.read_text(url, storage_options))):
        try:
            labels[row["ImageId"]] = row["PredictionString"].split()[0]
        except (KeyError, IndexError):
            raise SarError(f"{storage.redact(url)}: expected columns ImageId,PredictionString; got {row}") from None
    return labels


def _is_image(name: str) -> bool:
    base = posixpath.basename(name)
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def list_imagenet(
    root: str,
    split: str = "train",
    classes: int | None = None,
    per_class: int | None = None,
    storage_options: dict | None = None,
) -> SourceListing:
    """List a split of an ImageNet-layout root; `classes`/`per_class` take the first N / M.

    The subset is stable under growth: the first N classes in label order and the first M
    keys in sorted order, so raising either only adds files (and `sar encode` only encodes
    those). A storage failure comes out as one StorageError naming data.source and the URL.
    """
    with storage.field("data.source"), storage.translate_errors(root, storage_options):
        return _list_split(root, split, classes, per_class, storage_options)


def _list_split(root: str, split: str, classes: int | None, per_class: int | None,
                storage_options: dict | None) -> SourceListing:
    fs, root_path = storage.filesystem(root, storage_options)
    root_path = root_path.rstrip("/")
    split_path = f"{root_path}/{split}"
    fs.invalidate_cache(split_path)  # a grown source must be listed afresh, not from a cache
    if not fs.isdir(split_path):
        storage.listdir(root, storage_options)  # a missing bucket says so, rather than "no train/ folder"
        raise SarError(f"data.source: no {split}/ folder under {storage.redact(root)}")

    files = sorted(p for p in fs.find(split_path) if _is_image(p))
    by_class: dict[str, list[str]] = defaultdict(list)
    flat: list[str] = []
    for path in files:
        key = path[len(root_path) + 1:]
        parts = key.split("/")
        if len(parts) == 3:
            by_class[parts[1]].append(key)
        elif len(parts) == 2:
            flat.append(key)
        else:
            log.warning("ignoring %s: not at <split>/<wnid>/<file> or <split>/<file>", key)

    if split == "val" and flat:
        # Flat val: the labels come from the CSV, keyed by the file's stem.
        solution = _read_val_solution(root, storage_options)
        for key in flat:
            image_id = posixpath.splitext(posixpath.basename(key))[0]
            if image_id not in solution:
                raise SarError(f"data.source: {key} has no row in {VAL_SOLUTION}")
            by_class[solution[image_id]].append(key)
    elif flat:
        log.warning("ignoring %d files directly under %s/ (not in a class folder), e.g. %s", len(flat), split, flat[0])

    wnids = read_synset_mapping(root, storage_options)
    if wnids is None:
        wnids = sorted(by_class)
    else:
        unknown = sorted(set(by_class) - set(wnids))
        if unknown:
            raise SarError(
                f"data.source: class folder {split}/{unknown[0]} is not in {SYNSET_MAPPING} "
                f"({len(unknown)} unknown wnids)"
            )
    if classes is not None:
        wnids = wnids[:classes]
    items = []
    for label, wnid in enumerate(wnids):
        keys = sorted(by_class.get(wnid, []))
        items.extend((k, label) for k in keys[:per_class])
    items.sort()
    if not items:
        raise SarError(f"data.source: no images found under {storage.redact(root)}/{split}")
    return SourceListing(root=root, split=split, wnids=list(wnids), items=items)
