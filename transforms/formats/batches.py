"""Imagenet32/64 batch files (SPEC §2): seeded global shuffle, exact batch sizes, pickle and npz sinks.

Determinism: the shuffle is the order of a keyed hash of (seed, image name), so it depends only on the
set of images and the seed, never on bundle boundaries, worker count or runner. Batch k holds the rows
of ranks [k*q, (k+1)*q) with q = N // batches, the last batch the remainder. Rows are packed bytes,
staged to disk in sorted runs (transforms/bookkeeping/staging.py) under buckets that partition the key range in
order; a bucket's global ranks follow from the row counts of the buckets before it (known from the runs'
indexes), so each merged bucket is cut into per-batch pieces without any shuffle of the rows.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import struct
import types
import zipfile
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from imagebeam.transforms.bookkeeping.fileutil import join, write_with
from imagebeam.transforms.inputs.labels import LabelMap
from imagebeam.transforms.imaging.rows import ROW_ERRORS, Row, RowMaker
from imagebeam.transforms.inputs.sources import Failure, ImageBlob

PICKLE_PROTOCOL = 4  # Python 3 readers, objects over 4 GB allowed; the seed's loader is plain pickle.load
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed npz member timestamps: same rows => same bytes

KEY_BYTES = 16
_HEADER = struct.Struct("<16sIHH")  # shuffle key, label, len(name), len(source); then name, source, pixels


def shuffle_key(seed: int, name: str) -> bytes:
    """The row's place in the seeded permutation: a 128-bit keyed BLAKE2 hash of its name."""
    return hashlib.blake2b(name.encode("utf-8"), digest_size=KEY_BYTES, key=str(int(seed)).encode()).digest()


def batch_sizes(n: int, batches: int) -> List[int]:
    """Batches 1..B-1 get N // B rows, batch B the remainder (128,116 x 9 + 128,123 for ImageNet)."""
    q = n // batches
    return [q] * (batches - 1) + [n - q * (batches - 1)]


def batch_of_rank(rank: int, n: int, batches: int) -> int:
    """The batch (0-based) of the row at global position `rank` of n."""
    q = n // batches
    return batches - 1 if q == 0 else min(rank // q, batches - 1)


def pack_row(key: bytes, row: Row) -> bytes:
    """A row as one bytes value: cheap for Beam to move (no pickling); sorts by key first."""
    name, source = row.name.encode("utf-8"), row.source.encode("utf-8")
    return _HEADER.pack(key, row.label, len(name), len(source)) + name + source + row.pixels


def unpack_row(packed: bytes) -> Tuple[bytes, str, str, int, bytes]:
    key, label, n_name, n_source = _HEADER.unpack_from(packed)
    at = _HEADER.size
    name = packed[at:at + n_name].decode("utf-8")
    source = packed[at + n_name:at + n_name + n_source].decode("utf-8")
    return key, name, source, label, packed[at + n_name + n_source:]


def bucket_of(key: bytes, buckets: int) -> int:
    """Buckets partition the key range in order, so bucket order is shuffle order."""
    return (int.from_bytes(key[:4], "big") * buckets) >> 32


def _name_key(name: str) -> bytes:
    """Val order (file name, then path) squeezed into the 16-byte key slot; ties fall to name/source."""
    base = name.rsplit("/", 1)[-1].encode("utf-8")
    return base[:KEY_BYTES].ljust(KEY_BYTES, b"\0")


def row_sort_key(key: bytes, row: Row) -> bytes:
    """The order of rows: the 16-byte key, then file name, path and source (NUL-separated, so bytes
    order is the order of the tuple)."""
    base = row.name.rsplit("/", 1)[-1]
    return b"\0".join((key + base.encode("utf-8"), row.name.encode("utf-8"), row.source.encode("utf-8")))


class RowEntryFn:
    """ImageBlob -> the staged entry of its row: (bucket, sort key, packed row), or a Failure.

    Train (`seed` given): the seeded key and `buckets` key-range buckets. Val (`seed` None): one bucket,
    rows in file-name order.
    """

    def __init__(self, maker: RowMaker, seed: Optional[int], buckets: int):
        self._maker, self._seed, self._buckets = maker, seed, buckets

    def __call__(self, blob: ImageBlob, label_map: LabelMap):
        try:
            row = self._maker(blob, label_map)
        except ROW_ERRORS as exc:
            return Failure(blob.source, blob.member, str(exc))
        if self._seed is None:
            key, bucket = _name_key(row.name), 0
        else:
            key = shuffle_key(self._seed, row.name)
            bucket = bucket_of(key, self._buckets)
        return bucket, row_sort_key(key, row), pack_row(key, row)


def split_bucket(offset: int, n: int, packed_rows: List[bytes], batches: int) -> List[Tuple[int, List[bytes]]]:
    """A sorted bucket whose first row has global rank `offset` (of n) -> [(batch, rows)]."""
    pieces: Dict[int, List[bytes]] = {}
    for i, packed in enumerate(packed_rows):
        pieces.setdefault(batch_of_rank(offset + i, n, batches), []).append(packed)
    return sorted(pieces.items())


def batch_dict(data: np.ndarray, labels, mean: Optional[np.ndarray]) -> Dict[str, object]:
    """The dict of SPEC §2: data uint8 (n, 3*S*S), labels list of int, mean float64 (train only)."""
    out: Dict[str, object] = {"data": np.ascontiguousarray(data, dtype=np.uint8),
                              "labels": [int(v) for v in labels]}
    if mean is not None:
        out["mean"] = np.asarray(mean, dtype=np.float64)
    return out


def rows_to_arrays(packed_rows: List[bytes], row_size: int) -> Tuple[np.ndarray, List[int]]:
    unpacked = [unpack_row(p) for p in packed_rows]
    data = np.frombuffer(b"".join(u[4] for u in unpacked), dtype=np.uint8).reshape(len(unpacked), row_size)
    return data, [u[3] for u in unpacked]


def write_pickle(f, batch: Dict[str, object]) -> None:
    """`pickle.dump(batch, f, protocol=4)`, byte for byte, without the copy of the array's bytes that
    numpy's pickling makes (an Imagenet64 batch is 1.57 GB): the pixels go to `f` from the array itself."""
    _StreamingPickler(f, protocol=PICKLE_PROTOCOL).dump(batch)


class _ArrayBytes:
    """The raw bytes of a C-contiguous array, pickled as the bytes object numpy's reduce would make."""
    __slots__ = ("view",)

    def __init__(self, array: np.ndarray):
        self.view = memoryview(array).cast("B") if array.size else memoryview(b"")

    def __len__(self) -> int:
        return self.view.nbytes


class _StreamingPickler(pickle._Pickler):  # the Python pickler: its byte output is the C pickler's
    """Pickles numpy arrays with numpy's own protocol-2..4 reduce (`_reconstruct`, then the state
    `(1, shape, dtype, is_fortran, raw bytes)`), the raw bytes written straight from the array."""

    # The Python pickler's own save methods for what a batch holds. Not `pickle._Pickler.dispatch`: dill
    # (imported by Beam) re-registers some of its entries with functions of its own.
    dispatch = {t: getattr(pickle._Pickler, name) for t, name in (
        (type(None), "save_none"), (bool, "save_bool"), (int, "save_long"), (float, "save_float"),
        (bytes, "save_bytes"), (str, "save_str"), (tuple, "save_tuple"), (list, "save_list"),
        (dict, "save_dict"), (type, "save_type"), (types.FunctionType, "save_global"))}

    def reducer_override(self, obj):
        if type(obj) is not np.ndarray or obj.dtype.hasobject or not obj.flags.c_contiguous or obj.ndim == 0:
            return NotImplemented
        func, args, state = np.empty((0,) + obj.shape[1:], obj.dtype).__reduce_ex__(self.proto)
        return func, args, (state[0], obj.shape, state[2], state[3], _ArrayBytes(obj))

    def _save_array_bytes(self, obj: _ArrayBytes) -> None:  # pickle._Pickler.save_bytes, from a view
        n = len(obj)
        if n <= 0xFF:
            self.write(pickle.SHORT_BINBYTES + struct.pack("<B", n) + obj.view.tobytes())
        elif n > 0xFFFFFFFF:
            self._write_large_bytes(pickle.BINBYTES8 + struct.pack("<Q", n), obj.view)
        elif n >= self.framer._FRAME_SIZE_TARGET:
            self._write_large_bytes(pickle.BINBYTES + struct.pack("<I", n), obj.view)
        else:
            self.write(pickle.BINBYTES + struct.pack("<I", n) + obj.view.tobytes())
        self.memoize(obj)

    dispatch[_ArrayBytes] = _save_array_bytes


def write_npz(f, batch: Dict[str, object]) -> None:
    """An .npz readable with np.load(allow_pickle=False): plain arrays, fixed timestamps, stored."""
    # zipfile copes with unseekable writers (gs://) by writing data descriptors; local files seek.
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key in ("data", "labels", "mean"):
            if key not in batch:
                continue
            value = batch[key]
            array = np.asarray(value, dtype=np.int64) if key == "labels" else np.asarray(value)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


WRITERS = {"pickle": (write_pickle, ""), "npz": (write_npz, ".npz")}


def batch_file_name(index: int, train: bool, fmt: str) -> str:
    base = f"train_data_batch_{index + 1}" if train else "val_data"
    return base + WRITERS[fmt][1]


def write_batch(path: str, fmt: str, batch: Dict[str, object]) -> None:
    write_with(path, lambda f: WRITERS[fmt][0](f, batch))


class BatchMerger:
    """The merge step of downsample (staging.MergeBuckets): a bucket's sorted rows -> files.

    Val (one bucket): the final `val_data` file in `fmt`. Train: the bucket is cut at the batch
    boundaries (global ranks from the task's offset) and each piece is written to `output` as
    `piece-BBBBB-KKKKK.npz` (batch, bucket); FinalizeBatches joins the pieces of a batch in bucket
    order, which is the shuffle order. Yields {"file", "rows", "batch"} per file written.
    """

    def __init__(self, output: str, fmt: str, size: int, train: bool, batches: int = 1):
        if fmt not in WRITERS:
            raise ValueError(f"unknown format {fmt!r}; choose from {sorted(WRITERS)}")
        self._output, self._fmt, self._row_size, self._train = output, fmt, 3 * size * size, train
        self._batches = batches

    def __call__(self, task, entries: List[Tuple[bytes, bytes]]) -> Iterator[dict]:
        rows = [payload for _, payload in entries]
        if not self._train:
            name = batch_file_name(0, False, self._fmt)
            write_batch(join(self._output, name), self._fmt, batch_dict(*rows_to_arrays(rows, self._row_size), None))
            yield {"file": name, "rows": len(rows), "batch": 0}
            return
        for batch, piece in split_bucket(task.offset, task.total, rows, self._batches):
            name = piece_name(batch, task.bucket)
            write_batch(join(self._output, name), "npz", batch_dict(*rows_to_arrays(piece, self._row_size), None))
            yield {"file": name, "rows": len(piece), "batch": batch}


def piece_name(batch: int, bucket: int) -> str:
    return f"piece-{batch:05d}-{bucket:05d}.npz"


def pieces_per_batch(names: Iterable[str], directory: str, batches: int) -> List[Tuple[int, List[str]]]:
    """Staged piece names -> [(batch, [paths in bucket order])] for every batch, empty ones included."""
    pieces: Dict[int, List[str]] = {b: [] for b in range(batches)}
    for name in sorted(n for n in names if n.startswith("piece-")):  # zero-padded: bucket order
        pieces[int(name.split("-")[1])].append(join(directory, name))
    return sorted(pieces.items())


def read_staged(path: str) -> Dict[str, np.ndarray]:
    """A staged piece (npz written by BatchMerger) as plain arrays."""
    with FileSystems.open(path) as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def join_pieces(paths: List[str], row_size: int) -> Tuple[np.ndarray, List[int]]:
    """A batch's staged pieces (in order) as one uint8 array: one array the size of the batch, filled a
    piece at a time (sizes from the npz headers), so the batch is in memory once, not twice."""
    counts = [staged_rows(p) for p in paths]
    data = np.empty((sum(counts), row_size), np.uint8)
    labels: List[int] = []
    at = 0
    for path, n in zip(paths, counts):
        piece = read_staged(path)
        data[at:at + n] = piece["data"]
        labels += [int(v) for v in piece["labels"]]
        at += n
    return data, labels


def staged_rows(path: str) -> int:
    """The row count of a staged piece, from its labels array (small) without reading its pixels."""
    with FileSystems.open(path) as f, zipfile.ZipFile(f) as z, z.open("labels.npy") as member:
        version = np.lib.format.read_magic(member)
        shape = (np.lib.format.read_array_header_1_0(member) if version == (1, 0)
                 else np.lib.format.read_array_header_2_0(member))[0]
    return int(shape[0])


class FinalizeBatches(beam.PTransform):
    """(batch, [staged piece paths in order]) -> the final batch files in `fmt` with the mean added.

    Every batch index must be present (empty ones with no pieces); emits {"file", "rows"}.
    """

    def __init__(self, output: str, fmt: str, mean: beam.PCollection):
        super().__init__()
        self._output, self._fmt, self._mean = output, fmt, mean

    def expand(self, batch_pieces):
        output, fmt = self._output, self._fmt

        def finalize(element, mean: np.ndarray) -> dict:
            batch, paths = element
            data, labels = join_pieces(paths, mean.shape[0])
            name = batch_file_name(batch, True, fmt)
            write_batch(join(output, name), fmt, batch_dict(data, labels, mean))
            return {"file": name, "rows": len(labels)}

        return batch_pieces | "WriteFinal" >> beam.Map(finalize, beam.pvalue.AsSingleton(self._mean))
