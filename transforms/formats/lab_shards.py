"""The colorize job's data path: decode check, a seeded order, chunks, and ordered TFRecord files.

Order and split are functions of the image name only: the place of a record is the order of a keyed
BLAKE2 hash of (seed, name), and an image goes to the val files when a second keyed hash falls below
`--val-fraction`. Each work unit decodes its images once to sort failures out and stages their encoded
bytes (not pixels: less disk) in a sorted run on disk, under key-range buckets (transforms/bookkeeping/staging.py);
each bucket is merged from the runs and cut into chunks of `--batch-size` consecutive items, which are
decoded and letterboxed again. A chunk is the unit of the embedding (one model call, the same images in
it whatever the runner or worker count, so the float results repeat bit for bit) and of writing: its
images (299 pixels, name, embedding) go to staged pieces, one per output file it touches (global ranks
follow from the per-bucket counts), then a chunk marker; each output file is written once from its
pieces in (bucket, chunk) order, the Lab target and record of each image made as it is written, then a
file marker. A re-run skips finished units, chunks and files.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import struct
from typing import Any, Iterator, List, NamedTuple, Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from imagebeam.transforms.imaging import colour
from imagebeam.transforms.formats.batches import bucket_of, shuffle_key
from imagebeam.transforms.imaging.decode import CHECK_DRAFT, DEFAULT_MAX_PIXELS, DecodeError, DraftSize, decode_rgb
from imagebeam.transforms.bookkeeping.heap import keep_heap
from imagebeam.transforms.bookkeeping.fileutil import (compressed_writer, copy_file_into, delete_existing, join,
                                                    write_atomically, write_with)
from imagebeam.transforms.formats.lab_records import encode_example_parts
from imagebeam.transforms.bookkeeping.progress import ProgressTicker
from imagebeam.transforms.bookkeeping.staging import read_marker
from imagebeam.transforms.formats.tfrecord import frame_parts
from imagebeam.transforms.imaging.resize import fit_array, fit_draft_size
from imagebeam.transforms.inputs.sources import Failure, ImageBlob

TRAIN, VAL = "train", "val"
FILE_PREFIX = {TRAIN: "lab_images", VAL: "val_lab_images"}
IMAGES_PER_BUCKET = 512   # about 60 MB of ILSVRC JPEGs to sort per bucket
MAX_BUCKETS = 1 << 14
SIZE = colour.INCEPTION_SIZE


class LabItem(NamedTuple):
    """One image on its way to a record: its encoded bytes, already known to decode."""
    item_id: bytes            # shuffle key + name + source: the sort key, unique per input
    name: str                 # stored as image_name
    source: str
    member: Optional[str]
    data: bytes               # the input file's bytes (smaller to shuffle than pixels)


class Chunk(NamedTuple):
    """Consecutive items of one bucket: one embedding batch, one write."""
    split: str
    bucket: int
    index: int                # chunk number inside the bucket
    first_rank: int           # rank of items[0] among all records of the split
    items: Tuple[LabItem, ...]


class FittedChunk(NamedTuple):
    """A chunk with its images decoded and fitted to 299 x 299 (made and used inside one fused stage)."""
    chunk: Chunk
    rgb: np.ndarray           # (n, 299, 299, 3) uint8


class FitParams(NamedTuple):
    """How input bytes become the 299 RGB image; the same before and after the shuffle."""
    mode: str = "letterbox"
    max_pixels: int = DEFAULT_MAX_PIXELS
    exif_transpose: bool = False
    fast_decode: bool = False   # JPEGs decoded with DCT scaling down to the fitted size (not exact)

    def decode(self, data: bytes, draft_size: Optional[DraftSize] = None):
        return decode_rgb(data, max_pixels=self.max_pixels, exif_transpose=self.exif_transpose,
                          draft_size=draft_size)

    def check(self, data: bytes) -> None:
        """Raise DecodeError where `fitted` would: JPEGs are read whole but decoded at 1/8 scale."""
        self.decode(data, CHECK_DRAFT)

    @property
    def draft(self) -> Optional[DraftSize]:
        """The JPEG draft request of `fitted`: None on the exact path."""
        return functools.partial(fit_draft_size, size=SIZE, mode=self.mode) if self.fast_decode else None

    def fitted(self, data: bytes) -> np.ndarray:
        return fit_array(self.decode(data, self.draft), SIZE, self.mode)


def val_draw(seed: int, name: str) -> float:
    """A uniform number in [0, 1) from the name, independent of the order hash."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8, key=f"val:{int(seed)}".encode()).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def split_of(seed: int, name: str, val_fraction: float) -> str:
    return VAL if val_fraction > 0 and val_draw(seed, name) < val_fraction else TRAIN


def buckets_for(n_images: int, per_bucket: int = IMAGES_PER_BUCKET) -> int:
    return int(min(MAX_BUCKETS, max(1, math.ceil(n_images / per_bucket))))


def item_id(seed: int, name: str, source: str) -> bytes:
    return shuffle_key(seed, name) + name.encode("utf-8") + b"\0" + source.encode("utf-8")


def record_file_name(split: str, index: int) -> str:
    return f"{FILE_PREFIX[split]}_{index}.tfrecord"


def file_spans(first_rank: int, n: int, per_file: int) -> Iterator[Tuple[int, int, int]]:
    """(file index, start, end) of positions [0, n) of a run starting at global rank `first_rank`."""
    start = 0
    while start < n:
        file_index = (first_rank + start) // per_file
        end = min(n, (file_index + 1) * per_file - first_rank)
        yield file_index, start, end
        start = end


def piece_name(split: str, file_index: int, bucket: int, chunk: int) -> str:
    return f"{split}-{file_index:06d}-{bucket:05d}-{chunk:05d}.pixels"


# --- decode check + staging ---------------------------------------------------------------------------

SPLITS = (TRAIN, VAL)
_ITEM = struct.Struct("<III")  # len(name), len(source), len(member) + 1 (0: no member); then data


def staged_bucket(split: str, bucket: int) -> int:
    """(split, bucket) as one staging bucket number: splits never share a bucket, and rank separately."""
    return SPLITS.index(split) * MAX_BUCKETS + bucket


def pack_item(item: LabItem) -> bytes:
    name, source = item.name.encode("utf-8"), item.source.encode("utf-8")
    member = b"" if item.member is None else item.member.encode("utf-8")
    return (_ITEM.pack(len(name), len(source), 0 if item.member is None else len(member) + 1)
            + name + source + member + item.data)


def unpack_item(item_id_: bytes, packed: bytes) -> LabItem:
    n_name, n_source, n_member = _ITEM.unpack_from(packed)
    at = _ITEM.size
    name = packed[at:at + n_name].decode("utf-8")
    at += n_name
    source = packed[at:at + n_source].decode("utf-8")
    at += n_source
    member = None if n_member == 0 else packed[at:at + n_member - 1].decode("utf-8")
    at += max(0, n_member - 1)
    return LabItem(item_id_, name, source, member, packed[at:])


class LabEntryFn:
    """ImageBlob -> its staged entry (bucket, item id, packed item), or a Failure if it does not decode.

    Checked here (FitParams.check: a JPEG is read whole but decoded at 1/8 scale, 0.3 instead of 0.5 ms)
    to sort failures out before the order is fixed; the pixels are made after the merge (`fit_chunk`):
    staging the encoded file (about 110 KB for an ILSVRC JPEG) instead of 268 KB of pixels costs that check.
    """

    def __init__(self, seed: int, val_fraction: float, params: FitParams):
        self._seed, self._val_fraction, self._params = seed, val_fraction, params

    def __call__(self, blob: ImageBlob, n_buckets: int):
        keep_heap()
        try:
            self._params.check(blob.data)
        except DecodeError as exc:
            return Failure(blob.source, blob.member, str(exc))
        ident = item_id(self._seed, blob.name, blob.source)
        split = split_of(self._seed, blob.name, self._val_fraction)
        item = LabItem(ident, blob.name, blob.source, blob.member, blob.data)
        return staged_bucket(split, bucket_of(ident[:16], n_buckets)), ident, pack_item(item)


def fit_chunk(chunk: Chunk, params: FitParams) -> FittedChunk:
    return FittedChunk(chunk, np.stack([params.fitted(item.data) for item in chunk.items]))


class BucketCount(beam.PTransform):
    """Estimated images per work unit -> singleton: buckets for about IMAGES_PER_BUCKET images each
    (or `fixed`). Known from the index alone, before any image is read, so decoding never waits for it.
    """

    def __init__(self, fixed: Optional[int] = None):
        super().__init__()
        self._fixed = fixed

    def expand(self, estimates):
        fixed = self._fixed
        return (estimates
                | "TotalImages" >> beam.CombineGlobally(sum)
                | "Buckets" >> beam.Map(lambda n: fixed if fixed else buckets_for(n)))


# --- ordered chunks ------------------------------------------------------------------------------------

DONE = "done"  # tagged output of ChunkMerger: the recorded pieces of chunks finished by an earlier run


def chunk_marker(staging: str, split: str, bucket: int, index: int) -> str:
    return join(staging, "chunks", f"{split}-{bucket:05d}-{index:05d}.json")


class ChunkMerger:
    """The merge step of colorize (staging.MergeBuckets): a bucket's sorted items -> Chunks of at most
    `chunk_size` items; a chunk whose marker exists yields its recorded pieces on DONE instead."""

    def __init__(self, chunk_size: int, staging: str):
        self._chunk_size, self._staging = chunk_size, staging

    def __call__(self, task, entries) -> Iterator[Any]:
        split, bucket = SPLITS[task.bucket // MAX_BUCKETS], task.bucket % MAX_BUCKETS
        for index, start in enumerate(range(0, len(entries), self._chunk_size)):
            recorded = read_marker(chunk_marker(self._staging, split, bucket, index))
            if recorded is not None:
                for key, value in recorded:
                    yield pvalue.TaggedOutput(DONE, (tuple(key), tuple(value)))
                continue
            items = tuple(unpack_item(k, v) for k, v in entries[start:start + self._chunk_size])
            yield Chunk(split, bucket, index, task.offset + start, items)


# --- records, pieces and files -------------------------------------------------------------------------

def record_parts(name: str, rgb: np.ndarray, embedding: Optional[np.ndarray], record_format: str) -> List[bytes]:
    """The framed TFRecord of one 299 RGB image as parts (Lab computed here, after the shuffle)."""
    l_norm, ab_norm = colour.lab_target(rgb)
    return frame_parts(encode_example_parts(name, l_norm, ab_norm, embedding, record_format))


def chunk_records(fitted: FittedChunk, embeddings: Optional[np.ndarray], record_format: str) -> List[bytes]:
    """The framed TFRecords of a chunk, in order."""
    return [b"".join(record_parts(item.name, fitted.rgb[i], None if embeddings is None else embeddings[i],
                                  record_format))
            for i, item in enumerate(fitted.chunk.items)]


# A piece holds its images, not their records: per image a header (name length, embedding length or -1),
# the name, the float32 embedding and the 299 x 299 x 3 pixels (268 KB, against 606 KB for the record).
# The records are made as their file is written (`write_record_file`), so each is written once: staging
# whole records as pieces and copying them into their file cost ~0.2 ms an image more (606 KB written,
# read and written again). Pieces of a run before this (`.piece`, whole records) are still copied as they are.
_PIECE_ITEM = struct.Struct("<Ii")
PIXELS_PIECE, RECORDS_PIECE = ".pixels", ".piece"


def _write_images(fitted: FittedChunk, embeddings: Optional[np.ndarray], start: int, end: int, f) -> None:
    for i in range(start, end):
        name = fitted.chunk.items[i].name.encode("utf-8")
        emb = b"" if embeddings is None else np.ascontiguousarray(embeddings[i], dtype="<f4").tobytes()
        f.write(_PIECE_ITEM.pack(len(name), -1 if embeddings is None else len(emb) // 4) + name + emb)
        f.write(np.ascontiguousarray(fitted.rgb[i]).data)


def _read_exact(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise IOError(f"staged piece ends inside an image ({len(data)} of {n} bytes)")
    return data


def _read_into(f, view: memoryview, path: str) -> None:
    """Fill `view` from `f` (into the reused pixel buffer: no 268 KB object an image)."""
    at = 0
    while at < len(view):
        n = f.readinto(view[at:]) if hasattr(f, "readinto") else None
        if n is None:
            data = f.read(len(view) - at)
            view[at:at + len(data)] = data
            n = len(data)
        if not n:
            raise IOError(f"staged piece {path} ends inside an image")
        at += n


def _piece_records(path: str, record_format: str) -> Iterator[List[bytes]]:
    """The records of an image piece, each as parts, made one at a time."""
    rgb = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        while header := f.read(_PIECE_ITEM.size):
            if len(header) != _PIECE_ITEM.size:
                raise IOError(f"staged piece {path} ends inside an image header")
            n_name, n_emb = _PIECE_ITEM.unpack(header)
            name = _read_exact(f, n_name).decode("utf-8")
            embedding = None if n_emb < 0 else np.frombuffer(_read_exact(f, 4 * n_emb), dtype="<f4")
            _read_into(f, memoryview(rgb).cast("B"), path)
            yield record_parts(name, rgb, embedding, record_format)


def write_record_file(path: str, pieces: List[str], record_format: str, compression: str = "none") -> None:
    """The record file `path` from its pieces in order, written once (gzip: one deflate stream, no file
    name, mtime 0, as concat_files writes it)."""
    buffer = bytearray(1 << 20)
    with compressed_writer(path, compression) as write:
        for piece in pieces:
            if piece.endswith(RECORDS_PIECE):
                copy_file_into(piece, write, buffer)
                continue
            for parts in _piece_records(piece, record_format):
                for part in parts:
                    write(part)


class _WritePiecesFn(beam.DoFn):
    """A chunk's images (pixels, name, embedding) -> one piece per output file it touches, then the
    chunk's marker."""

    def __init__(self, staging: str, per_file: int, progress: Optional[str] = None):
        self._staging, self._per_file = staging, per_file
        self._progress = ProgressTicker(progress)

    def setup(self):
        keep_heap()

    def finish_bundle(self):
        self._progress.flush()

    def process(self, element: Tuple[FittedChunk, Optional[np.ndarray]]):
        fitted, embeddings = element
        chunk = fitted.chunk
        n = len(chunk.items)
        size = 0 if embeddings is None else int(embeddings.shape[1])
        pieces = []
        for file_index, start, end in file_spans(chunk.first_rank, n, self._per_file):
            path = join(self._staging, piece_name(chunk.split, file_index, chunk.bucket, chunk.index))
            write_with(path, functools.partial(_write_images, fitted, embeddings, start, end))
            pieces.append(((chunk.split, file_index), (chunk.bucket, chunk.index, path, end - start, size)))
        write_atomically(chunk_marker(self._staging, chunk.split, chunk.bucket, chunk.index),
                         json.dumps(pieces).encode("utf-8"))
        yield from pieces
        self._progress.tick(ok=n)


class WriteRecordFiles(beam.PTransform):
    """(FittedChunk, embeddings or None) -> `lab_images_K.tfrecord` / `val_lab_images_K.tfrecord` files.

    Emits {"file", "rows", "split", "embedding_size"} per file. Pieces go to `staging`, which the caller
    removes; `done` holds the pieces of chunks an earlier run finished (ChunkMerger's DONE output).
    """

    def __init__(self, output: str, staging: str, record_format: str = "reference", per_file: int = 500,
                 compression: str = "none", progress: Optional[str] = None, done=None):
        super().__init__()
        self._done = done
        if compression not in ("none", "gzip"):
            raise ValueError(f"unknown compression {compression!r}; choose none or gzip")
        self._output, self._staging, self._format = output, staging, record_format
        self._per_file, self._compression = per_file, compression
        self._progress = progress

    def expand(self, chunks_with_embeddings):
        output, staging, compression, record_format = self._output, self._staging, self._compression, self._format

        def write_file(element) -> dict:
            (split, file_index), pieces = element
            name = record_file_name(split, file_index)
            marker = join(staging, "files", name + ".json")
            recorded = read_marker(marker)
            if recorded is not None and FileSystems.exists(join(output, name)):
                return recorded
            ordered = sorted(tuple(p) for p in pieces)
            write_record_file(join(output, name), [p[2] for p in ordered], record_format, compression)
            sizes = {p[4] for p in ordered}
            done = {"file": name, "rows": sum(p[3] for p in ordered), "split": split,
                    "embedding_size": max(sizes)}
            write_atomically(marker, json.dumps(done).encode("utf-8"))
            delete_existing([p[2] for p in ordered])
            return done

        written = chunks_with_embeddings | "WritePieces" >> beam.ParDo(
            _WritePiecesFn(self._staging, self._per_file, self._progress))
        pieces = (written, self._done) | "AllPieces" >> beam.Flatten() if self._done is not None else written
        return (pieces
                | "KeyByFile" >> beam.MapTuple(lambda key, piece: (tuple(key), tuple(piece)))
                | "GroupPiecesByFile" >> beam.GroupByKey()
                | "ConcatPieces" >> beam.Map(write_file))
