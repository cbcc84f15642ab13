"""The colorize job's data path: decode + letterbox, a seeded order, chunks, and ordered TFRecord files.

Order and split are functions of the image name only: the place of a record is the order of a keyed
BLAKE2 hash of (seed, name), and an image goes to the val files when a second keyed hash falls below
`--val-fraction`. Images are decoded once to sort failures out, then grouped once into key-range
buckets with their encoded bytes (not pixels: less to move); each bucket is sorted and cut into chunks
of `--batch-size` consecutive items, which are decoded and letterboxed again. A chunk is the unit of the embedding (one model call, the same
images in it whatever the runner or worker count, so the float results repeat bit for bit) and of
writing: its records go to staged pieces, one per output file it touches (global ranks follow from the
per-bucket counts, a small side input), and each output file is the concatenation of its pieces in
(bucket, chunk) order.
"""
from __future__ import annotations

import hashlib
import math
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam import pvalue

from imagebeam.transforms import colour
from imagebeam.transforms.batches import bucket_of, shuffle_key
from imagebeam.transforms.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_rgb
from imagebeam.transforms.fileutil import concat_files, join, write_atomically
from imagebeam.transforms.lab_records import encode_example
from imagebeam.transforms.progress import ProgressTicker
from imagebeam.transforms.tfrecord import frame_record
from imagebeam.transforms.resize import fit
from imagebeam.transforms.sources import Failure, ImageBlob

TRAIN, VAL = "train", "val"
FILE_PREFIX = {TRAIN: "lab_images", VAL: "val_lab_images"}
IMAGES_PER_BUCKET = 512   # about 60 MB of ILSVRC JPEGs to sort per bucket
MAX_BUCKETS = 1 << 14
FAILURES = "failures"
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

    def decode(self, data: bytes):
        return decode_rgb(data, max_pixels=self.max_pixels, exif_transpose=self.exif_transpose)

    def fitted(self, data: bytes) -> np.ndarray:
        return np.asarray(fit(self.decode(data), SIZE, self.mode), dtype=np.uint8)


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
    return f"{split}-{file_index:06d}-{bucket:05d}-{chunk:05d}.piece"


# --- decode + letterbox --------------------------------------------------------------------------------

class _CheckDecodeFn(beam.DoFn):
    """Decode once to sort failures out before the order is fixed; key the bytes for the shuffle.

    The pixels are made again after the shuffle (`fit_chunk`): shipping the encoded file (about 110 KB
    for an ILSVRC JPEG) instead of 268 KB of pixels costs a second JPEG decode (under 1 ms) and saves
    the runner more than that in moving bytes.
    """

    def __init__(self, seed: int, val_fraction: float, params: FitParams):
        self._seed, self._val_fraction, self._params = seed, val_fraction, params
        self._decoded = beam.metrics.Metrics.counter("imagebeam", "decoded")
        self._failed = beam.metrics.Metrics.counter("imagebeam", "decode_failed")

    def process(self, blob: ImageBlob, n_buckets: int):
        try:
            self._params.decode(blob.data)
        except DecodeError as exc:
            self._failed.inc()
            yield pvalue.TaggedOutput(FAILURES, Failure(blob.source, blob.member, str(exc)))
            return
        self._decoded.inc()
        ident = item_id(self._seed, blob.name, blob.source)
        split = split_of(self._seed, blob.name, self._val_fraction)
        yield (split, bucket_of(ident[:16], n_buckets)), LabItem(ident, blob.name, blob.source, blob.member, blob.data)


class CheckDecode(beam.PTransform):
    """blobs -> ((split, bucket), LabItem) and failures. `n_buckets`: singleton PCollection of an int."""

    def __init__(self, n_buckets, seed: int = 0, val_fraction: float = 0.0, params: FitParams = FitParams()):
        super().__init__()
        self._n_buckets = n_buckets
        self._fn = _CheckDecodeFn(seed, val_fraction, params)

    def expand(self, blobs):
        out = blobs | "CheckDecode" >> beam.ParDo(
            self._fn, pvalue.AsSingleton(self._n_buckets)).with_outputs(FAILURES, main="items")
        return out.items, out[FAILURES]


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

def chunk_bucket(element, chunk_size: int, counts: Dict[Tuple[str, int], int]) -> Iterator[Chunk]:
    (split, bucket), items = element
    ordered = sorted(items, key=lambda item: item.item_id)
    offset = sum(n for (s, b), n in counts.items() if s == split and b < bucket)
    for index, start in enumerate(range(0, len(ordered), chunk_size)):
        yield Chunk(split, bucket, index, offset + start, tuple(ordered[start:start + chunk_size]))


class OrderedChunks(beam.PTransform):
    """((split, bucket), LabItem) -> Chunks of at most `chunk_size` items in the seeded order."""

    def __init__(self, chunk_size: int):
        super().__init__()
        self._chunk_size = chunk_size

    def expand(self, keyed_items):
        counts = (keyed_items
                  | "OnePerItem" >> beam.MapTuple(lambda key, _: (key, 1))
                  | "ItemsPerBucket" >> beam.CombinePerKey(sum)
                  | "CountsDict" >> beam.combiners.ToDict())
        return (keyed_items
                | "GroupBucket" >> beam.GroupByKey()
                | "SortAndCut" >> beam.FlatMap(chunk_bucket, self._chunk_size, pvalue.AsSingleton(counts)))


# --- records, pieces and files -------------------------------------------------------------------------

def chunk_records(fitted: FittedChunk, embeddings: Optional[np.ndarray], record_format: str) -> List[bytes]:
    """The framed TFRecords of a chunk, in order (Lab computed here, after the shuffle)."""
    out = []
    for i, item in enumerate(fitted.chunk.items):
        l_norm, ab_norm = colour.lab_target(fitted.rgb[i])
        embedding = None if embeddings is None else embeddings[i]
        out.append(frame_record(encode_example(item.name, l_norm, ab_norm, embedding, record_format)))
    return out


class _WritePiecesFn(beam.DoFn):
    def __init__(self, staging: str, record_format: str, per_file: int, progress: Optional[str] = None):
        self._staging, self._format, self._per_file = staging, record_format, per_file
        self._progress = ProgressTicker(progress)

    def finish_bundle(self):
        self._progress.flush()

    def process(self, element: Tuple[FittedChunk, Optional[np.ndarray]]):
        fitted, embeddings = element
        chunk = fitted.chunk
        records = chunk_records(fitted, embeddings, self._format)
        for file_index, start, end in file_spans(chunk.first_rank, len(records), self._per_file):
            path = join(self._staging, piece_name(chunk.split, file_index, chunk.bucket, chunk.index))
            write_atomically(path, b"".join(records[start:end]))
            yield (chunk.split, file_index), (chunk.bucket, chunk.index, path, end - start)
        self._progress.tick(ok=len(records))


class WriteRecordFiles(beam.PTransform):
    """(FittedChunk, embeddings or None) -> `lab_images_K.tfrecord` / `val_lab_images_K.tfrecord` files.

    Emits {"file", "rows", "split"} per file. Pieces go to `staging`, which the caller removes.
    """

    def __init__(self, output: str, staging: str, record_format: str = "reference", per_file: int = 500,
                 compression: str = "none", progress: Optional[str] = None):
        super().__init__()
        if compression not in ("none", "gzip"):
            raise ValueError(f"unknown compression {compression!r}; choose none or gzip")
        self._output, self._staging, self._format = output, staging, record_format
        self._per_file, self._compression = per_file, compression
        self._progress = progress

    def expand(self, chunks_with_embeddings):
        output, compression = self._output, self._compression

        def write_file(element) -> dict:
            (split, file_index), pieces = element
            ordered = sorted(pieces)
            name = record_file_name(split, file_index)
            concat_files(join(output, name), [p[2] for p in ordered], compression)
            return {"file": name, "rows": sum(p[3] for p in ordered), "split": split}

        return (chunks_with_embeddings
                | "WritePieces" >> beam.ParDo(_WritePiecesFn(self._staging, self._format, self._per_file,
                                                             self._progress))
                | "GroupPiecesByFile" >> beam.GroupByKey()
                | "ConcatPieces" >> beam.Map(write_file))
