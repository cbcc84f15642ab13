"""CIFAR-10/100 python archives (SPEC §4): finding the batches, reading them safely, the seed's sharpening.

Archives: `cifar-100-python.tar.gz` holds `cifar-100-python/{train,test,meta}`, `cifar-10-python.tar.gz`
holds `cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`; the extracted folders work too.
The batches are Python-2 pickles read with `safe_pickle` (numpy and builtin types only) and
encoding="bytes": keys are bytes (b"data", b"fine_labels", ...).

The sharpening is the seed's `cv2.filter2D(img, -1, kernel)` with the 5x5 kernel
(-1/256) * [[1,4,6,4,1],[4,16,24,16,4],[6,24,-476,24,6],[4,16,24,16,4],[1,4,6,4,1]], computed here without
OpenCV: every product and sum is a multiple of 1/256 well inside float precision, so the exact
correlation over reflect-101 borders (done in integers, as a separable blur: see `sharpen`), rounded half to
even and saturated to uint8, is exactly what OpenCV computes.
"""
from __future__ import annotations

import contextlib
import tarfile
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Set, Tuple

import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from imagebeam.transforms.formats import safe_pickle

SHARPEN_WEIGHTS = -np.array([[1, 4, 6, 4, 1],
                             [4, 16, 24, 16, 4],
                             [6, 24, -476, 24, 6],
                             [4, 16, 24, 16, 4],
                             [1, 4, 6, 4, 1]], dtype=np.int32)   # the kernel times 256
SHARPEN_KERNEL = SHARPEN_WEIGHTS / 256.0                           # the seed's float kernel

VARIANTS = {
    # variant: (folder in the archive, train members, test member, meta member, label key, names key)
    "cifar100": ("cifar-100-python", ("train",), "test", "meta", b"fine_labels", b"fine_label_names"),
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
                "batches.meta", b"labels", b"label_names"),
}


class CifarLayout(NamedTuple):
    """Where one CIFAR variant's batches are: inside an archive (`archive` set) or in a folder."""
    variant: str
    root: str                      # the archive path, or the folder holding the batch files
    archive: bool
    prefix: str                    # member folder inside the archive ("cifar-100-python/") or ""

    def batches(self, split: str) -> Tuple[str, ...]:
        _, train, test, _, _, _ = VARIANTS[self.variant]
        return train if split == "train" else (test,)

    @property
    def meta(self) -> str:
        return VARIANTS[self.variant][3]

    @property
    def label_key(self) -> bytes:
        return VARIANTS[self.variant][4]

    @property
    def names_key(self) -> bytes:
        return VARIANTS[self.variant][5]


@contextlib.contextmanager
def _open_archive(path: str) -> Iterator[tarfile.TarFile]:
    """The archive as a tar stream that tarfile decompresses itself, in 1 MiB reads (Beam's own gzip layer
    and tarfile's default 10 KiB reads take 1.7x as long on the 60,000-image archive)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw, \
            tarfile.open(fileobj=raw, mode="r|*", bufsize=1 << 20) as tar:
        yield tar


def _scan_archive(path: str) -> Tuple[Set[str], Dict[str, bytes]]:
    """One pass over an archive: its file names, and the bytes of any meta file (small) on the way."""
    metas = {f"{folder}/{meta}" for folder, _, _, meta, _, _ in VARIANTS.values()}
    names: Set[str] = set()
    small: Dict[str, bytes] = {}
    with _open_archive(path) as tar:
        for member in tar:
            if member.isfile():
                names.add(member.name)
                if member.name in metas:
                    small[member.name] = tar.extractfile(member).read()
    return names, small


def _looks_like(variant: str, present) -> bool:
    """The variant's meta file and at least one of its batches are there (a missing one fails on reading)."""
    _, train, test, meta, _, _ = VARIANTS[variant]
    return present(meta) and any(present(m) for m in (*train, test))


def _find(path: str) -> Tuple[CifarLayout, Optional[bytes]]:
    """The layout, and the meta file's bytes when finding it read them already (an archive)."""
    if path.lower().endswith((".tar.gz", ".tgz", ".tar")):
        if not FileSystems.exists(path):
            raise ValueError(f"--input {path!r} does not exist")
        names, small = _scan_archive(path)
        for variant, (folder, train, test, meta, _, _) in VARIANTS.items():
            if _looks_like(variant, lambda m, folder=folder: f"{folder}/{m}" in names):
                return CifarLayout(variant, path, True, folder + "/"), small.get(f"{folder}/{meta}")
        raise ValueError(f"{path} is not a CIFAR-10/100 python archive: expected cifar-100-python/{{train,test,"
                         "meta}} or cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}")
    root = path.rstrip("/")
    for variant, (folder, train, test, meta, _, _) in VARIANTS.items():
        for base in (root, FileSystems.join(root, folder)):
            if _looks_like(variant, lambda m, base=base: FileSystems.exists(FileSystems.join(base, m))):
                return CifarLayout(variant, base, False, ""), None
    raise ValueError(f"{path} holds no CIFAR-10/100 python batches (train/test/meta or data_batch_1..5)")


def find_layout(path: str) -> CifarLayout:
    """Recognise a CIFAR-10/100 python archive or extracted folder; a clear error otherwise."""
    return _find(path)[0]


def open_input(path: str) -> Tuple[CifarLayout, List[bytes]]:
    """`find_layout` and `label_names` with one pass over an archive instead of two."""
    layout, meta = _find(path)
    if meta is None:
        return layout, label_names(layout)
    return layout, _names(layout, safe_pickle.loads(meta, encoding="bytes"))


def member_bytes(layout: CifarLayout, names: Sequence[str]) -> Iterator[Tuple[str, bytes]]:
    """(name, bytes) of the wanted batch or meta files: in archive order in one pass over an archive, in the
    given order from a folder. A member the archive lacks is simply not yielded (the caller counts)."""
    if not layout.archive:
        for name in names:
            with FileSystems.open(FileSystems.join(layout.root, name),
                                  compression_type=CompressionTypes.UNCOMPRESSED) as f:
                yield name, f.read()
        return
    wanted = {layout.prefix + name: name for name in names}
    with _open_archive(layout.root) as tar:
        for member in tar:
            if member.isfile() and member.name in wanted:
                yield wanted.pop(member.name), tar.extractfile(member).read()
                if not wanted:
                    return


def no_member(layout: CifarLayout, name: str) -> str:
    return f"{layout.root} has no member {layout.prefix}{name}"


def read_members(layout: CifarLayout, names) -> Dict[str, dict]:
    """Batch (or meta) dicts by member name, unpickled safely with bytes keys (an archive in one pass)."""
    names = list(names)
    found = {name: safe_pickle.loads(data, encoding="bytes") for name, data in member_bytes(layout, names)}
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(no_member(layout, missing[0]))
    return found


def read_member(layout: CifarLayout, name: str) -> dict:
    return read_members(layout, [name])[name]


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _names(layout: CifarLayout, meta: dict) -> List[bytes]:
    return [n if isinstance(n, bytes) else str(n).encode() for n in meta[layout.names_key]]


def label_names(layout: CifarLayout) -> List[bytes]:
    """The class names as the seed keeps them (bytes, from the meta file)."""
    return _names(layout, read_member(layout, layout.meta))


class CifarImage(NamedTuple):
    """One image: its split, place in the original order (batch, index), pixels HWC, labels, file name."""
    split: str
    batch: int
    index: int
    pixels: bytes                 # 32*32*3 uint8, HWC (NHWC row)
    label: int
    coarse_label: Optional[int]
    filename: str


def batch_arrays(layout: CifarLayout, split: str, batch_index: int, batch: dict
                 ) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Tuple[str, ...]]:
    """One batch dict checked and as arrays: (images NHWC uint8, labels int64, coarse labels or None, names)."""
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"batch {layout.batches(split)[batch_index]}: data has shape {data.shape}, "
                         "expected (n, 3072)")
    labels = batch[layout.label_key]
    coarse = batch.get(b"coarse_labels")
    names = batch.get(b"filenames") or [b""] * len(labels)
    if not len(labels) == len(names) == data.shape[0] or (coarse is not None and len(coarse) != len(labels)):
        raise ValueError(f"batch {layout.batches(split)[batch_index]}: data, labels and file names disagree "
                         "in length")
    return (to_nhwc(data), np.asarray(labels, dtype=np.int64),
            None if coarse is None else np.asarray(coarse, dtype=np.int64), tuple(_text(n) for n in names))


def batch_images(layout: CifarLayout, split: str, batch_index: int, batch: dict) -> Iterator[CifarImage]:
    """The images of one batch dict, HWC, numbered in the split's original order."""
    hwc, labels, coarse, names = batch_arrays(layout, split, batch_index, batch)
    for i in range(len(labels)):
        yield CifarImage(split, batch_index, i, hwc[i].tobytes(), int(labels[i]),
                         None if coarse is None else int(coarse[i]), names[i])


class CifarChunk(NamedTuple):
    """Consecutive images of one batch as arrays: the unit the CIFAR job moves between workers."""
    split: str
    batch: int
    start: int                    # index of the first image in its batch
    pixels: np.ndarray            # (n, 32, 32, 3) uint8
    labels: np.ndarray            # (n,) int64
    coarse: Optional[np.ndarray]  # (n,) int64, CIFAR-100 only
    filenames: Tuple[str, ...]


def batch_chunks(layout: CifarLayout, split: str, batch_index: int, batch: dict,
                 size: int = 2000) -> Iterator[CifarChunk]:
    """One batch dict as chunks of at most `size` images (NHWC), checked by `batch_arrays`."""
    hwc, labels, coarse, names = batch_arrays(layout, split, batch_index, batch)
    for start in range(0, len(labels), size):
        stop = start + size
        yield CifarChunk(split, batch_index, start, hwc[start:stop], labels[start:stop],
                         None if coarse is None else coarse[start:stop], names[start:stop])


def to_nhwc(data: np.ndarray) -> np.ndarray:
    """(n, 3072) channel-planar rows -> (n, 32, 32, 3), the seed's reshape."""
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def sharpen(images: np.ndarray) -> np.ndarray:
    """The seed's sharpening of one HWC image or a batch NHWC, uint8 in and out (see module docstring).

    256 * kernel = 512 * identity - v v^T with v = [1, 4, 6, 4, 1], so the correlation is 2 * image minus a
    separable binomial blur / 256: one 5-tap pass along rows and one along columns, in uint16 (at most
    255 * 16 * 16 = 65280), then (512 * x - blur) / 256 in float32, exact (integers below 2**24 divided by a
    power of two), rounded half to even and saturated as OpenCV does. About 10x the 25-tap int32 loop.
    """
    images = np.asarray(images, dtype=np.uint8)
    single = images.ndim == 3
    batch = images[None] if single else images
    h, w = batch.shape[1:3]
    padded = np.pad(batch, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect").astype(np.uint16)
    rows = padded[:, :, 0:w] + padded[:, :, 4:w + 4]
    rows += 4 * (padded[:, :, 1:w + 1] + padded[:, :, 3:w + 3])
    rows += 6 * padded[:, :, 2:w + 2]
    blur = rows[:, 0:h] + rows[:, 4:h + 4]
    blur += 4 * (rows[:, 1:h + 1] + rows[:, 3:h + 3])
    blur += 6 * rows[:, 2:h + 2]
    acc = batch.astype(np.float32) * 512.0
    acc -= blur
    acc *= 1.0 / 256.0
    np.rint(acc, out=acc)
    out = np.clip(acc, 0, 255).astype(np.uint8)
    return out[0] if single else out
