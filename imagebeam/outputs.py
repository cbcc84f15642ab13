"""What an imagebeam output folder holds: its kind, its data files, its metadata and class names.

Shared by `imagebeam preview` and `imagebeam inspect`. Folders are local paths.

Detection (`describe`): `metadata.json`'s "job" decides when present and known —

| job | kind |
|---|---|
| downsample | `batches` (Imagenet32/64 `train_data_batch_K` / `val_data`, pickle or `.npz`) |
| cifar, format imagenet32 | `batches` |
| cifar, format pickle | `cifar_pickle` (`CIFAR_100_processed.pickle` / `CIFAR_10_processed.pickle`) |
| cifar, format tfrecord | `cifar_tfrecord` (`cifar100-train.tfrecord-0000K-of-0000N`, …) |
| colorize | `lab_records` (`lab_images_K.tfrecord`, `val_lab_images_K.tfrecord`) |
| download | `download` (`manifest.jsonl` + `md5(url).jpeg`) |
| resize, imagenet-layout | `images` (image files in folders) |

otherwise (no metadata.json, or another job) the file names decide, first match wins in this order:
batch files, lab records, CIFAR processed pickle, CIFAR tfrecord shards, `manifest.jsonl`, image files
at any depth (hidden files and the top-level `preview.png` ignored).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from imagebeam.transforms.imaging import colour
from imagebeam.transforms.formats import safe_pickle
from imagebeam.transforms.formats.example_decode import Feature
from imagebeam.transforms.bookkeeping.report import natural_key

KINDS = ("batches", "lab_records", "cifar_pickle", "cifar_tfrecord", "download", "images")
PREVIEW_NAME = "preview.png"

BATCH_RE = re.compile(r"^(train_data_batch_(\d+)|val_data)(\.npz)?$")
LAB_RE = re.compile(r"^(val_)?lab_images_(\d+)\.tfrecord$")
CIFAR_PICKLE_RE = re.compile(r"^CIFAR_(100|10)_processed\.pickle$")
CIFAR_TFRECORD_RE = re.compile(r"^(cifar100|cifar10)-(train|test)\.tfrecord-(\d{5})-of-(\d{5})$")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
_NAME_RULES = (("batches", BATCH_RE), ("lab_records", LAB_RE), ("cifar_pickle", CIFAR_PICKLE_RE),
               ("cifar_tfrecord", CIFAR_TFRECORD_RE))
_JOB_KINDS = {"downsample": "batches", "colorize": "lab_records", "download": "download",
              "resize": "images", "imagenet-layout": "images"}
_CIFAR_FORMATS = {"pickle": "cifar_pickle", "tfrecord": "cifar_tfrecord", "imagenet32": "batches"}
_WNID_RE = re.compile(r"^n\d{8}$")
_NPZ_MAGIC = b"PK\x03\x04"


@dataclasses.dataclass
class Output:
    path: str
    kind: str
    detected_by: str
    files: List[str]                       # data files of the kind, relative to path, natural order
    meta: Optional[Dict[str, Any]] = None  # metadata.json, None when absent
    meta_error: Optional[str] = None       # why metadata.json could not be read
    classes: Dict[int, str] = dataclasses.field(default_factory=dict)  # label -> name (classes.txt)

    @property
    def job(self) -> Optional[str]:
        return (self.meta or {}).get("job")

    def join(self, name: str) -> str:
        return os.path.join(self.path, name)


def read_metadata(path: str) -> Tuple[Optional[dict], Optional[str]]:
    """(metadata.json as a dict, None) or (None, why not)."""
    meta_path = os.path.join(path, "metadata.json")
    if not os.path.exists(meta_path):
        return None, "no metadata.json"
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        return None, f"metadata.json is not readable JSON: {exc}"
    if not isinstance(meta, dict):
        return None, "metadata.json is not a JSON object"
    return meta, None


def read_classes(path: str) -> Dict[int, str]:
    """classes.txt: `label WNID name` (downsample) or `label name` (cifar) lines -> {label: name}.

    The name keeps the WNID only when there is no other name (`12 n01440764`)."""
    classes_path = os.path.join(path, "classes.txt")
    out: Dict[int, str] = {}
    if not os.path.exists(classes_path):
        return out
    with open(classes_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.strip().split(" ", 2)
            if not parts or not parts[0].lstrip("-").isdigit():
                continue
            rest = parts[1:]
            if len(rest) == 2 and _WNID_RE.match(rest[0]):
                rest = rest[1:]
            out[int(parts[0])] = " ".join(rest)
    return out


def _top_files(path: str) -> List[str]:
    return sorted((n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n))), key=natural_key)


def image_files(path: str) -> List[str]:
    """Image files (by extension) under path at any depth, relative, sorted; hidden files/folders and the
    top-level preview.png skipped."""
    found = []
    for dirpath, dirnames, names in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for n in names:
            if n.startswith(".") or not n.lower().endswith(IMAGE_EXTENSIONS):
                continue
            rel = os.path.relpath(os.path.join(dirpath, n), path).replace(os.sep, "/")
            if rel != PREVIEW_NAME:
                found.append(rel)
    return sorted(found, key=natural_key)


def kind_files(path: str, kind: str) -> List[str]:
    """The data files of `kind` in the folder (natural order: batch 2 before batch 10)."""
    if kind == "download":
        return ["manifest.jsonl"] if os.path.exists(os.path.join(path, "manifest.jsonl")) else []
    if kind == "images":
        return image_files(path)
    rule = dict(_NAME_RULES)[kind]
    names = [n for n in _top_files(path) if rule.match(n)]
    if kind == "batches":  # train batches in order, then val_data
        names.sort(key=lambda n: (n.startswith("val_data"), natural_key(n)))
    elif kind == "lab_records":  # train records, then val records
        names.sort(key=lambda n: (n.startswith("val_"), natural_key(n)))
    return names


def describe(path: str) -> Output:
    """Detect the kind of output in `path` (see the module docstring); ValueError if none is recognised."""
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a folder")
    meta, meta_error = read_metadata(path)
    job = (meta or {}).get("job")
    kind = None
    if job == "cifar":
        kind = _CIFAR_FORMATS.get((meta or {}).get("format", "pickle"))
    elif job in _JOB_KINDS:
        kind = _JOB_KINDS[job]
    if kind is not None:
        detected_by = f"metadata.json job {job!r}" + (f" (format {meta.get('format')!r})" if job == "cifar" else "")
        return Output(path, kind, detected_by, kind_files(path, kind), meta, meta_error, read_classes(path))
    top = _top_files(path)
    for name, rule in _NAME_RULES:
        if any(rule.match(n) for n in top):
            return Output(path, name, "file names", kind_files(path, name), meta, meta_error, read_classes(path))
    if "manifest.jsonl" in top:
        return Output(path, "download", "file names", ["manifest.jsonl"], meta, meta_error, read_classes(path))
    images = image_files(path)
    if images:
        return Output(path, "images", "file names", images, meta, meta_error, read_classes(path))
    raise ValueError(f"{path}: no imagebeam output recognised (no metadata.json job, no batch files, "
                     "records, CIFAR pickle/tfrecords, manifest.jsonl or images)")


# --- batches -----------------------------------------------------------------------------------------------

def is_npz(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _NPZ_MAGIC


def read_batch(path: str) -> Dict[str, Any]:
    """The dict of a batch file as stored: `.npz` (allow_pickle=False) or a pickle (safe_pickle, latin1)."""
    if is_npz(path):
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    with open(path, "rb") as f:
        batch = safe_pickle.load(f, encoding="latin1")
    if not isinstance(batch, dict):
        raise ValueError(f"expected a dict with 'data' and 'labels', got {type(batch).__name__}")
    return {(k.decode("utf-8") if isinstance(k, bytes) else str(k)): v for k, v in batch.items()}


def npz_rows(path: str) -> Optional[int]:
    """Rows of an `.npz` batch from the header of its data.npy (no data read); None if unknown."""
    if not is_npz(path):
        return None
    with zipfile.ZipFile(path) as zf, zf.open("data.npy") as f:
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            return None
        shape, _, _ = readers[version](f)
    return int(shape[0]) if shape else None


def planar_to_hwc(row: np.ndarray) -> np.ndarray:
    """One channel-planar row (3*S*S: all R, all G, all B) -> (S, S, 3) uint8."""
    s = int(round((row.size // 3) ** 0.5))
    return np.ascontiguousarray(np.asarray(row, np.uint8).reshape(3, s, s).transpose(1, 2, 0))


# --- lab records -------------------------------------------------------------------------------------------

def lab_arrays(features: Dict[str, Feature]) -> Tuple[str, np.ndarray, np.ndarray, str]:
    """(image name, L' (224, 224) float32, ab' (224, 224, 2) float32, record format) of a parsed record.

    Reference records hold the floats; compact ones the 8-bit q values, dequantised as the reader does
    (L' = q/127.5 - 1, ab' = (q - 128)/127)."""
    size = colour.LAB_SIZE
    name_f, l_f, ab_f = features.get("image_name"), features.get("image_l"), features.get("image_ab")
    if name_f is None or l_f is None or ab_f is None:
        raise ValueError(f"record lacks image_name/image_l/image_ab (features: {sorted(features)})")
    name = name_f.value[0].decode("utf-8", "replace") if name_f.kind == "bytes" and name_f.value else "?"
    if l_f.kind == "bytes" and ab_f.kind == "bytes":
        fmt = "compact"
        l_norm = colour.dequantise_l(np.frombuffer(l_f.value[0], np.uint8))
        ab_norm = colour.dequantise_ab(np.frombuffer(ab_f.value[0], np.uint8))
    elif l_f.kind == "float" and ab_f.kind == "float":
        fmt = "reference"
        l_norm, ab_norm = l_f.value, ab_f.value
    else:
        raise ValueError(f"image_l is {l_f.kind}, image_ab is {ab_f.kind}: neither format")
    if l_norm.size != size * size or ab_norm.size != 2 * size * size:
        raise ValueError(f"image_l has {l_norm.size} values, image_ab {ab_norm.size}; expected "
                         f"{size * size} and {2 * size * size}")
    return name, l_norm.reshape(size, size), ab_norm.reshape(size, size, 2), fmt


# --- download ------------------------------------------------------------------------------------------------

def read_manifest(path: str) -> List[dict]:
    with open(os.path.join(path, "manifest.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
