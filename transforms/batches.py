"""Imagenet32/64 batch files (SPEC §2): seeded global shuffle, exact batch sizes, pickle and npz sinks.

Determinism: the shuffle is the order of a keyed hash of (seed, image name), so it depends only on the
set of images and the seed, never on bundle boundaries, worker count or runner. Batch k holds the rows
of ranks [k*q, (k+1)*q) with q = N // batches, the last batch the remainder. Rows travel as packed
bytes and are grouped once, into buckets that partition the key range in order; a bucket's global
ranks follow from the row counts of the buckets before it (a small side input), so each sorted bucket
is cut into per-batch pieces without a second shuffle.
"""
from __future__ import annotations

import hashlib
import io
import pickle
import struct
import zipfile
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from imagebeam.transforms.fileutil import join, write_with
from imagebeam.transforms.rows import Row

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


def _row_order(packed: bytes):
    key, name, source, _, _ = unpack_row(packed)
    return key, name.rsplit("/", 1)[-1], name, source


def bucket_of(key: bytes, buckets: int) -> int:
    """Buckets partition the key range in order, so bucket order is shuffle order."""
    return (int.from_bytes(key[:4], "big") * buckets) >> 32


class ShuffleIntoBuckets(beam.PTransform):
    """rows -> (bucket, [packed rows in file order]) plus a singleton {bucket: count}.

    Train (`seed` given): rows keyed by the seeded hash, grouped once into `buckets` key ranges.
    Val (`seed` None): one bucket, rows keyed by file name for a stable order. Rows cross the shuffle
    in chunks (many packed rows of one bucket per element), so the runner's work per image is tiny.
    """

    def __init__(self, seed: Optional[int], buckets: int, chunk_bytes: int = 256 << 10):
        super().__init__()
        self._seed, self._buckets = seed, (buckets if seed is not None else 1)
        self._chunk_bytes = chunk_bytes

    def expand(self, rows):
        chunks = rows | "PackIntoChunks" >> beam.ParDo(
            _ChunkRowsFn(self._seed, self._buckets, self._chunk_bytes)).with_output_types(Tuple[int, bytes])
        counts = (chunks
                  | "RowsPerChunk" >> beam.MapTuple(lambda bucket, chunk: (bucket, rows_in_chunk(chunk)))
                  | "RowsPerBucket" >> beam.CombinePerKey(sum)
                  | "CountsDict" >> beam.combiners.ToDict())
        grouped = (chunks
                   | "GroupBucket" >> beam.GroupByKey()
                   | "SortBucket" >> beam.MapTuple(
                       lambda b, cs: (b, sorted((r for c in cs for r in split_chunk(c)), key=_row_order))))
        return grouped, counts


_LENGTH = struct.Struct("<I")


def join_chunk(packed_rows: List[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(p)) + p for p in packed_rows)


def _chunk_spans(chunk: bytes) -> Iterator[Tuple[int, int]]:
    at = 0
    while at < len(chunk):
        (n,) = _LENGTH.unpack_from(chunk, at)
        yield at + 4, at + 4 + n
        at += 4 + n


def split_chunk(chunk: bytes) -> List[bytes]:
    return [chunk[start:end] for start, end in _chunk_spans(chunk)]


def rows_in_chunk(chunk: bytes) -> int:
    """How many rows a chunk holds, without copying them out."""
    return sum(1 for _ in _chunk_spans(chunk))


class _ChunkRowsFn(beam.DoFn):
    """Rows -> (bucket, chunk of packed rows), flushed at `chunk_bytes` and at the end of a bundle."""

    def __init__(self, seed: Optional[int], buckets: int, chunk_bytes: int):
        self._seed, self._buckets, self._chunk_bytes = seed, buckets, chunk_bytes

    def start_bundle(self):
        self._pending: Dict[int, List[bytes]] = {}
        self._sizes: Dict[int, int] = {}

    def process(self, row: Row):
        if self._seed is None:
            bucket, packed = 0, pack_row(_name_key(row.name), row)
        else:
            bucket, packed = _bucketed(row, self._seed, self._buckets)
        self._pending.setdefault(bucket, []).append(packed)
        self._sizes[bucket] = self._sizes.get(bucket, 0) + len(packed)
        if self._sizes[bucket] >= self._chunk_bytes:
            self._sizes[bucket] = 0
            yield bucket, join_chunk(self._pending.pop(bucket))

    def finish_bundle(self):
        for bucket, rows in sorted(self._pending.items()):
            yield WindowedValue((bucket, join_chunk(rows)), GlobalWindow().max_timestamp(), [GlobalWindow()])
        self._pending, self._sizes = {}, {}


def _bucketed(row: Row, seed: int, buckets: int) -> Tuple[int, bytes]:
    key = shuffle_key(seed, row.name)
    return bucket_of(key, buckets), pack_row(key, row)


def _name_key(name: str) -> bytes:
    """Val order (file name, then path) squeezed into the 16-byte key slot; ties fall to name/source."""
    base = name.rsplit("/", 1)[-1].encode("utf-8")
    return base[:KEY_BYTES].ljust(KEY_BYTES, b"\0")


def split_bucket(bucket: int, packed_rows: List[bytes], counts: Dict[int, int],
                 batches: int) -> List[Tuple[int, List[bytes]]]:
    """A sorted bucket -> [(batch, rows)]: global ranks follow from the counts of earlier buckets."""
    n = sum(counts.values())
    offset = sum(c for b, c in counts.items() if b < bucket)
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
    pickle.dump(batch, f, protocol=PICKLE_PROTOCOL)


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


class WriteBatches(beam.PTransform):
    """(bucket, sorted packed rows) -> files; emits {"file", "rows", "batch"} per file written.

    Val (one bucket): the final `val_data` file in `fmt`. Train: the bucket is cut at the batch
    boundaries (global ranks from `counts`, a singleton {bucket: rows}) and each piece is written to
    `output` as `piece-BBBBB-KKKKK.npz` (batch, bucket); FinalizeBatches joins the pieces of a batch in
    bucket order, which is the shuffle order.
    """

    def __init__(self, output: str, fmt: str, size: int, train: bool, batches: int = 1, counts=None):
        super().__init__()
        if fmt not in WRITERS:
            raise ValueError(f"unknown format {fmt!r}; choose from {sorted(WRITERS)}")
        self._output, self._fmt, self._row_size, self._train = output, fmt, 3 * size * size, train
        self._batches, self._counts = batches, counts

    def expand(self, buckets):
        output, fmt, row_size, batches = self._output, self._fmt, self._row_size, self._batches

        def write_val(element):
            _, rows = element
            name = batch_file_name(0, False, fmt)
            write_batch(join(output, name), fmt, batch_dict(*rows_to_arrays(rows, row_size), None))
            return [{"file": name, "rows": len(rows), "batch": 0}]

        def write_pieces(element, counts):
            bucket, rows = element
            out = []
            for batch, piece in split_bucket(bucket, rows, counts, batches):
                name = piece_name(batch, bucket)
                write_batch(join(output, name), "npz", batch_dict(*rows_to_arrays(piece, row_size), None))
                out.append({"file": name, "rows": len(piece), "batch": batch})
            return out

        if not self._train:
            return buckets | "WriteFile" >> beam.FlatMap(write_val)
        return buckets | "WritePieces" >> beam.FlatMap(write_pieces, beam.pvalue.AsSingleton(self._counts))


def piece_name(batch: int, bucket: int) -> str:
    return f"piece-{batch:05d}-{bucket:05d}.npz"


def pieces_per_batch(names: Iterable[str], directory: str, batches: int) -> List[Tuple[int, List[str]]]:
    """Staged piece names -> [(batch, [paths in bucket order])] for every batch, empty ones included."""
    pieces: Dict[int, List[str]] = {b: [] for b in range(batches)}
    for name in sorted(n for n in names if n.startswith("piece-")):  # zero-padded: bucket order
        pieces[int(name.split("-")[1])].append(join(directory, name))
    return sorted(pieces.items())


def read_staged(path: str) -> Dict[str, np.ndarray]:
    """A staged piece (npz written by WriteBatches) as plain arrays."""
    with FileSystems.open(path) as f, np.load(io.BytesIO(f.read()), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


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
            staged = [read_staged(p) for p in paths]
            data = (np.concatenate([s["data"] for s in staged]) if staged
                    else np.zeros((0, mean.shape[0]), np.uint8))
            labels = [int(v) for s in staged for v in s["labels"]]
            name = batch_file_name(batch, True, fmt)
            write_batch(join(output, name), fmt, batch_dict(data, labels, mean))
            return {"file": name, "rows": len(labels)}

        return batch_pieces | "WriteFinal" >> beam.Map(finalize, beam.pvalue.AsSingleton(self._mean))
