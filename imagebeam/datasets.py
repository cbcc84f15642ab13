"""Loaders for training code: Imagenet32/64 batches, CIFAR processed pickles, original CIFAR python files.

Every pickle is read with `imagebeam.transforms.formats.safe_pickle` (plain data and numpy arrays only, never
code), every file through Beam's `FileSystems` so local paths, gs:// and s3:// all work.

- `load_imagenet_batch`: one `train_data_batch_K` / `val_data` file (pickle or `.npz`, SPEC §2), reshaped
  from channel-planar rows to images, labels made 0-based, optionally mean-subtracted and mirrored the way
  the Imagenet32 reference loader does it (seed 000).
- `load_cifar_processed`: `CIFAR_100_processed.pickle` / `CIFAR_10_processed.pickle` (SPEC §4).
- `load_cifar_python`: the original `cifar-100-python` / `cifar-10-batches-py` files, from a folder or
  straight from the `.tar.gz`.
- `ImageNet(root, split)`: the folders `imagebeam imagenet-layout` writes, as (PIL RGB image, label) pairs.
"""
from __future__ import annotations

import io
import math
import os
from typing import IO, Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from imagebeam.transforms.formats import cifar, safe_pickle
from imagebeam.transforms.imaging.decode import decode_rgb

__all__ = ["load_imagenet_batch", "load_cifar_processed", "load_cifar_python", "ImageNet"]

_NPZ_MAGIC = b"PK\x03\x04"
_LAYOUTS = ("NHWC", "NCHW")


def _open(path: str) -> IO[bytes]:
    """A binary reader for `path` on any Beam filesystem, bytes as stored (no automatic gunzip)."""
    return FileSystems.open(path, mime_type="application/octet-stream",
                            compression_type=CompressionTypes.UNCOMPRESSED)


def _get(d: Mapping[Any, Any], key: str) -> Any:
    """d[key] whether the pickle's keys are str (Python 3, latin1) or bytes (Python 2 read as bytes)."""
    if key in d:
        return d[key]
    return d[key.encode("ascii")]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)


def _planar_to_images(data: np.ndarray, size: int, layout: str) -> np.ndarray:
    """(n, 3*S*S) channel-planar rows (all R, all G, all B) -> (n, S, S, 3) or (n, 3, S, S)."""
    x = data.reshape(data.shape[0], 3, size, size)
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" else x


def _image_size(row_length: int, size: Optional[int]) -> int:
    inferred = math.isqrt(row_length // 3)
    if 3 * inferred * inferred != row_length:
        raise ValueError(f"rows of {row_length} values are not 3*S*S channel-planar images")
    if size is not None and int(size) != inferred:
        raise ValueError(f"size={size} does not match rows of {row_length} values (3*{inferred}*{inferred})")
    return inferred


def _read_batch_file(path: str) -> Dict[str, Any]:
    """The dict in an Imagenet32/64 batch file: `.npz` (allow_pickle=False) or a pickle (safe_pickle)."""
    with _open(path) as f:
        if not f.seekable():
            f = io.BytesIO(f.read())
        head = f.read(len(_NPZ_MAGIC))
        f.seek(0)
        if head == _NPZ_MAGIC:
            with np.load(f, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        batch = safe_pickle.load(f, encoding="latin1")
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict with 'data' and 'labels', got {type(batch).__name__}")
    return {_text(k): v for k, v in batch.items()}


def load_imagenet_batch(path: str, *, size: Optional[int] = None, mirror: bool = False,
                        subtract_mean: bool = False, layout: str = "NHWC",
                        mean: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
    """Read one Imagenet32/64-style batch file (`train_data_batch_K`, `val_data`, or their `.npz`).

    Returns a dict of numpy arrays:

    - "x": uint8 images, (n, S, S, 3) for layout "NHWC" or (n, 3, S, S) for "NCHW"; with
      `subtract_mean=True` float32 `x/255 - mean/255` instead (the reference loader's preprocessing,
      computed like it: float32 x/255, minus the float64 mean/255, kept float32);
    - "y": int64 labels, 0-based (the file's ILSVRC2012_ID labels 1..1000, minus 1);
    - "mean": the file's mean image as stored (float64, (3*S*S,), 0..255 scale), when the file has one.

    `size` (S) is inferred from the row length (3*S*S) and, if given, checked against it.
    `mean` supplies the train mean for files without one (`val_data`) when `subtract_mean=True`; it
    overrides the file's mean for the subtraction only.
    `mirror=True` appends horizontally flipped copies of every image (after mean subtraction, as the
    reference does) and repeats the labels: 2n images, the first n as stored.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    batch = _read_batch_file(path)
    for key in ("data", "labels"):
        if key not in batch:
            raise ValueError(f"{path}: batch file has no {key!r} (keys: {sorted(batch)})")
    data = np.asarray(batch["data"])
    if data.ndim != 2 or data.dtype != np.uint8:
        raise ValueError(f"{path}: 'data' must be uint8 (n, 3*S*S), got {data.dtype} {data.shape}")
    s = _image_size(data.shape[1], size)
    labels = np.asarray(batch["labels"], dtype=np.int64).reshape(-1)
    if labels.shape[0] != data.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} rows but {labels.shape[0]} labels")
    if labels.size and labels.min() < 1:
        raise ValueError(f"{path}: labels must be 1-based ILSVRC2012_IDs (1..1000), found {labels.min()}")
    out: Dict[str, np.ndarray] = {}
    file_mean = np.asarray(batch["mean"], dtype=np.float64) if "mean" in batch else None
    if file_mean is not None:
        out["mean"] = file_mean
    rows: np.ndarray = data
    if subtract_mean:
        m = np.asarray(mean, dtype=np.float64) if mean is not None else file_mean
        if m is None:
            raise ValueError(f"{path}: subtract_mean=True but the file has no 'mean' (val_data has none): "
                             "pass mean= (the train batches' mean)")
        m = m.reshape(-1)
        if m.shape[0] != data.shape[1]:
            raise ValueError(f"{path}: mean has {m.shape[0]} values, rows have {data.shape[1]}")
        rows = data / np.float32(255)      # float32, as the reference loader
        rows -= m / np.float32(255)        # float64 mean/255, subtracted in place: stays float32
    x = _planar_to_images(rows, s, layout)
    y = labels - 1
    if mirror:
        flipped = x[:, :, ::-1, :] if layout == "NHWC" else x[:, :, :, ::-1]
        x = np.concatenate((x, flipped), axis=0)
        y = np.concatenate((y, y), axis=0)
    out["x"], out["y"] = x, y
    return out


def load_cifar_processed(path: str, *, mirror: bool = False) -> Dict[str, Any]:
    """Read `CIFAR_100_processed.pickle` / `CIFAR_10_processed.pickle` (SPEC §4) with safe_pickle.

    Returns {"train_dataset": uint8 (n, 32, 32, 3), "train_labels": int64 (n,), "test_dataset",
    "test_labels", "label_names": list of str} (bytes names, as the seed's script stored them, are
    decoded). `mirror=True` appends horizontally flipped train images and repeats their labels.
    """
    with _open(path) as f:
        saved = safe_pickle.load(f, encoding="latin1")
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: expected a dict, got {type(saved).__name__}")
    saved = {_text(k): v for k, v in saved.items()}
    out: Dict[str, Any] = dict(saved)
    for split in ("train", "test"):
        images, labels = f"{split}_dataset", f"{split}_labels"
        if images not in saved or labels not in saved:
            raise ValueError(f"{path}: missing {images!r} or {labels!r} (keys: {sorted(saved)})")
        out[images] = np.asarray(saved[images])
        out[labels] = np.asarray(saved[labels], dtype=np.int64).reshape(-1)
        if out[images].shape[0] != out[labels].shape[0]:
            raise ValueError(f"{path}: {out[images].shape[0]} {split} images but {out[labels].shape[0]} labels")
    if "label_names" in saved:
        out["label_names"] = [_text(n) for n in saved["label_names"]]
    if mirror:
        train = out["train_dataset"]
        out["train_dataset"] = np.concatenate((train, train[:, :, ::-1, ...]), axis=0)
        out["train_labels"] = np.concatenate((out["train_labels"], out["train_labels"]), axis=0)
    return out


# CIFAR python layouts: folder name in the archive, files per split, label key, label-name file and key.
def load_cifar_python(path_or_dir: str, split: str = "train"
                      ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], List[str]]:
    """Read the original CIFAR-100 or CIFAR-10 python files (Python 2 pickles, SPEC §4).

    `path_or_dir`: `cifar-100-python.tar.gz` / `cifar-10-python.tar.gz` (read in memory in one pass, never
    extracted to disk), the extracted `cifar-100-python/` or `cifar-10-batches-py/` folder, or the folder
    containing it. `split`: "train" (CIFAR-10: data_batch_1..5 in order) or "test".

    Returns (x uint8 (n, 32, 32, 3), fine labels int64 (n,), coarse labels int64 (n,) for CIFAR-100 or
    None for CIFAR-10, label names list of str (CIFAR-100: the 100 fine names)).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    layout = cifar.find_layout(path_or_dir)
    batches = layout.batches(split)
    members = cifar.read_members(layout, (*batches, layout.meta))
    arrays = [cifar.batch_arrays(layout, split, i, members[name]) for i, name in enumerate(batches)]
    x = np.concatenate([a[0] for a in arrays])
    fine = np.concatenate([a[1] for a in arrays])
    coarse = (np.concatenate([a[2] for a in arrays])
              if layout.variant == "cifar100" and all(a[2] is not None for a in arrays) else None)
    names = [_text(n) for n in _get(members[layout.meta], layout.names_key.decode())]
    return x, fine, coarse, names


# --- ImageNet folder reader (imagenet-layout) ---


class ImageNet:
    """The folder layout of `imagebeam imagenet-layout` as a dataset: `len()` and `[i]` -> (PIL RGB, label).

    Labels are 0..N-1 in sorted-WNID order (torchvision, Keras and TFDS use it; 0 = n01440764 tench),
    None for the test split. `wnids` are the class folders, `classes` their names from
    ROOT/LOC_synset_mapping.txt (the WNIDs themselves when the file is missing). Images are decoded by
    content and converted to RGB (ImageNet holds CMYK and greyscale JPEGs). `transform` (optional) is
    applied to the image.
    """

    SPLITS = {"train": "train", "valid": "val", "val": "val", "test": "test"}

    def __init__(self, root: str, split: str = "train", transform=None):
        if split not in self.SPLITS:
            raise ValueError(f"split must be one of train, valid, test; not {split!r}")
        self.root, self.split, self.transform = root, split, transform
        folder = os.path.join(root, self.SPLITS[split])
        if not os.path.isdir(folder):
            raise ValueError(f"{folder} does not exist; run imagebeam imagenet-layout first")
        names = _synset_names(os.path.join(root, "LOC_synset_mapping.txt"))
        if split == "test":
            self.wnids = sorted(names) if names else []
            self.samples = [(os.path.join(folder, f), None) for f in sorted(os.listdir(folder))
                            if not f.startswith(".")]
        else:
            self.wnids = sorted(names) if names else sorted(
                d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
            index = {wnid: i for i, wnid in enumerate(self.wnids)}
            self.samples = []
            for wnid in sorted(os.listdir(folder)):
                class_dir = os.path.join(folder, wnid)
                if not os.path.isdir(class_dir) or wnid.startswith("."):
                    continue
                if wnid not in index:
                    raise ValueError(f"{class_dir}: {wnid} is not among the {len(index)} classes")
                self.samples += [(os.path.join(class_dir, f), index[wnid]) for f in sorted(os.listdir(class_dir))
                                 if not f.startswith(".")]
        self.classes = [names.get(w, w) for w in self.wnids]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        with open(path, "rb") as f:
            image = decode_rgb(f.read())
        return (self.transform(image) if self.transform else image), label


def _synset_names(path: str) -> Dict[str, str]:
    """WNID -> words from LOC_synset_mapping.txt (`n01440764 tench, Tinca tinca`), {} when absent."""
    if not os.path.exists(path):
        return {}
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            wnid, _, words = line.strip().partition(" ")
            if wnid:
                out[wnid] = words or wnid
    return out
