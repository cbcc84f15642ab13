"""Label maps: the three ImageNet label orders of SPEC §1 and how an image gets its label.

Imagenet32/64 use ILSVRC2012_ID (1..1000), read from the devkit's `data/meta.mat` or from
`map_clsloc.txt`. Validation images carry no class in their path; their label comes from the devkit's
ground truth by file number. Without a map, labels are 1 + the index of the sorted class names.
Classes are keyed by WNID, never by name (names repeat: two `crane`s).
"""
from __future__ import annotations

import io
import re
import tarfile
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Tuple

import numpy as np
from apache_beam.io.filesystems import FileSystems

ORDER_ILSVRC = "ILSVRC2012_ID"          # 1..1000, map_clsloc.txt order (Imagenet32/64)
ORDER_SORTED = "sorted_class_index_1"   # 1 + index of sorted class names (classes.txt)

_VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.", re.IGNORECASE)
_WNID = re.compile(r"^n\d{8}$")


class LabelError(ValueError):
    """An image whose label cannot be determined; the message is the reason."""


@dataclass(frozen=True)
class LabelMap:
    """class key (WNID) -> label, plus the val ground truth by file number (1-based)."""
    labels: Dict[str, int]
    order: str
    origin: str
    names: Dict[str, str]
    val_ground_truth: Optional[Tuple[int, ...]] = None

    def label_for(self, name: str, class_key: Optional[str]) -> int:
        """The label of the image called `name` (its path inside the source) found under `class_key`."""
        if self.val_ground_truth is not None:
            match = _VAL_NAME.search(name.rsplit("/", 1)[-1])
            if match:
                index = int(match.group(1))
                if 1 <= index <= len(self.val_ground_truth):
                    return self.val_ground_truth[index - 1]
                raise LabelError(
                    f"validation image number {index} is beyond the {len(self.val_ground_truth)} lines "
                    f"of the ground truth in {self.origin}")
        if class_key is None:
            hint = "" if self.val_ground_truth is not None else " (pass --devkit to label validation files by name)"
            raise LabelError(f"no label: {name!r} is not inside a class folder or class tar{hint}")
        try:
            return self.labels[class_key]
        except KeyError:
            what = "WNID" if _WNID.match(class_key) else "class"
            raise LabelError(
                f"unknown {what} {class_key!r}: not among the {len(self.labels)} classes of {self.origin}"
            ) from None

    def class_lines(self) -> str:
        """`label class_key name` lines, by label: the classes.txt users keep beside the data."""
        rows = sorted((label, key) for key, label in self.labels.items())
        return "".join(f"{label} {key} {self.names.get(key, key)}\n" for label, key in rows)


def sorted_class_map(class_keys: Iterable[str]) -> LabelMap:
    """Labels 1 + index of the sorted class names, for inputs without a devkit or class map."""
    keys = sorted(set(class_keys))
    return LabelMap({k: i + 1 for i, k in enumerate(keys)}, ORDER_SORTED, "the sorted class folders", {})


def read_bytes(path: str) -> bytes:
    with FileSystems.open(path) as f:
        return f.read()


def parse_class_map(text: str, origin: str = "map_clsloc.txt") -> LabelMap:
    """`WNID ID name` lines (map_clsloc.txt) -> ILSVRC2012_ID labels."""
    labels: Dict[str, int] = {}
    names: Dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts or line.lstrip().startswith("#"):
            continue
        if len(parts) < 2 or not parts[1].isdigit():
            raise ValueError(f"{origin}:{lineno}: expected 'WNID ID name', got {line!r}")
        wnid, cid = parts[0], int(parts[1])
        if wnid in labels and labels[wnid] != cid:
            raise ValueError(f"{origin}:{lineno}: WNID {wnid} listed twice with IDs {labels[wnid]} and {cid}")
        labels[wnid] = cid
        names[wnid] = " ".join(parts[2:]) or wnid
    if not labels:
        raise ValueError(f"{origin}: no classes found")
    return LabelMap(labels, ORDER_ILSVRC, origin, names)


def _synsets_rows(synsets: np.ndarray) -> Iterable[Tuple[int, str, str, int]]:
    for s in np.ravel(synsets):
        def field(name):
            v = s[name]
            while isinstance(v, np.ndarray) and v.size == 1:
                v = v.item() if v.dtype != object else v.ravel()[0]
            return v
        yield int(field("ILSVRC2012_ID")), str(field("WNID")), str(field("words")), int(field("num_children"))


def parse_devkit(data: bytes, origin: str = "ILSVRC2012_devkit_t12.tar.gz") -> LabelMap:
    """The devkit tar.gz: leaf synsets of data/meta.mat (IDs 1..1000) and the val ground truth."""
    from scipy.io import loadmat

    meta = gt = None
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith("data/meta.mat"):
                meta = tar.extractfile(member).read()
            elif member.isfile() and member.name.endswith("data/ILSVRC2012_validation_ground_truth.txt"):
                gt = tar.extractfile(member).read()
    if meta is None:
        raise ValueError(f"{origin}: no data/meta.mat inside; is this ILSVRC2012_devkit_t12.tar.gz?")
    mat = loadmat(io.BytesIO(meta), squeeze_me=False, struct_as_record=True)
    if "synsets" not in mat:
        raise ValueError(f"{origin}: data/meta.mat has no 'synsets' struct")
    labels: Dict[str, int] = {}
    names: Dict[str, str] = {}
    for cid, wnid, words, children in _synsets_rows(mat["synsets"]):
        if children == 0:
            labels[wnid] = cid
            names[wnid] = words
    ground_truth = None
    if gt is not None:
        ground_truth = tuple(int(line) for line in gt.decode().split())
        unknown = sorted(set(ground_truth) - set(labels.values()))
        if unknown:
            raise ValueError(f"{origin}: validation ground truth uses IDs not in meta.mat: {unknown[:5]}")
    return LabelMap(labels, ORDER_ILSVRC, origin, names, ground_truth)


def load_label_map(devkit: Optional[str] = None, class_map: Optional[str] = None) -> Optional[LabelMap]:
    """The map given on the command line (devkit wins for val ground truth), or None."""
    if devkit:
        label_map = parse_devkit(read_bytes(devkit), origin=devkit)
        if class_map:
            other = parse_class_map(read_bytes(class_map).decode(), origin=class_map)
            if other.labels != label_map.labels:
                raise ValueError(f"{class_map} and {devkit} disagree on the class IDs")
        return label_map
    if class_map:
        return parse_class_map(read_bytes(class_map).decode(), origin=class_map)
    return None


def class_of(relative_name: str) -> Optional[str]:
    """The class of an image by its path inside a source: the first folder (ImageFolder convention)."""
    parts = [p for p in relative_name.split("/") if p not in ("", ".", "..")]
    return parts[0] if len(parts) >= 2 else None
