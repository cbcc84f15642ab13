"""The colorize job's data path: a seeded order, chunks decoded once, and ordered TFRecord files.

Order and split are functions of the image name only: the place of a record is the order of a keyed
BLAKE2 hash of (seed, name), and an image goes to the val files when a second keyed hash falls below
`--val-fraction`. Each work unit identifies its images from their headers (what is not an image is a
failure there) and stages their encoded bytes (not pixels: less disk) in a sorted run on disk, under
key-range buckets (transforms/bookkeeping/staging.py); each bucket is merged from the runs and cut into
chunks of `--batch-size` consecutive items, which are decoded and letterboxed: the one decode of an
image, where a truncated or corrupt file becomes a failure. A chunk is the unit of the embedding (one
model call, the same images in it whatever the runner or worker count, so the float results repeat bit
for bit) and of staging: its images (299 pixels, name, embedding) go to one staged piece, then a chunk
marker with the piece and the chunk's failures. Ranks are placed from the pieces' row counts (per bucket,
then bucket offsets: small numbers only), each output file is written once from its share of the pieces
in (bucket, chunk) order, the Lab target and record of each image made as it is written, then a file
marker. A re-run skips finished units, chunks and files.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import pickle
import struct
from typing import Any, Iterator, List, NamedTuple, Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from imagebeam.transforms.imaging import colour
from imagebeam.transforms.formats.batches import bucket_of, shuffle_key
from imagebeam.transforms.imaging.decode import DEFAULT_MAX_PIXELS, DecodeError, DraftSize, decode_rgb, probe_image
from imagebeam.transforms.bookkeeping.heap import keep_heap
from imagebeam.transforms.bookkeeping.fileutil import (compressed_writer, delete_existing, join,
                                                    write_atomically, write_with)
from imagebeam.transforms.formats.lab_records import encode_example_parts
from imagebeam.transforms.bookkeeping.progress import ProgressTicker
from imagebeam.transforms.bookkeeping.staging import FAILURES, failure_from_json, read_marker
from imagebeam.transforms.formats.tfrecord import frame_parts
from imagebeam.transforms.imaging.resize import fit_array, fit_draft_size
from imagebeam.transforms.inputs.sources import Failure, ImageBlob

TRAIN, VAL = "train", "val"
FILE_PREFIX = {TRAIN: "lab_images", VAL: "val_lab_images"}
IMAGES_PER_BUCKET = 512   # about 60 MB of ILSVRC JPEGs to sort per bucket
MAX_BUCKETS = 1 << 14
SIZE = colour.INCEPTION_SIZE
# What the staging folder holds (part of the job fingerprint): a staging folder of another layout is not
# resumed but started afresh. 2: decode once after the merge, one piece per chunk, ranks placed from pieces.
STAGING_LAYOUT = 2


class LabItem(NamedTuple):
    """One image on its way to a record: its encoded bytes (identified as an image, not yet decoded)."""
    item_id: bytes            # shuffle key + name + source: the sort key, unique per input
    name: str                 # stored as image_name
    source: str
    member: Optional[str]
    data: bytes               # the input file's bytes (smaller to shuffle than pixels)


class Chunk(NamedTuple):
    """Consecutive items of one bucket: one embedding batch, one staged piece."""
    split: str
    bucket: int
    index: int                # chunk number inside the bucket
    items: Tuple[LabItem, ...]


class FittedChunk(NamedTuple):
    """A chunk with its images decoded and fitted to 299 x 299 (made and used inside one fused stage):
    the items that decoded, their pixels, and the others as failures."""
    chunk: Chunk
    items: Tuple[LabItem, ...]    # the chunk's items that decoded, in order
    rgb: np.ndarray               # (len(items), 299, 299, 3) uint8
    failures: Tuple[Failure, ...]


class FittedChunkCoder(beam.coders.Coder):
    """FittedChunk's coder: the small fields pickled, the pixels as raw bytes; its size estimate is the
    pixels' size, not a pickling of them.

    Beam's counters estimate the size of sampled elements of every PCollection (all of the first ten,
    then about ten in each N) by encoding them; with the default coder that pickled every chunk's
    pixels (67 MB for 256 images, about 30 ms: as long as the model's call on a GPU) several times
    over between the letterbox and the writer. Registered for FittedChunk, and the steps that carry
    one declare it (`with_output_types`).
    """

    def encode(self, value: FittedChunk) -> bytes:
        rgb = np.ascontiguousarray(value.rgb, dtype=np.uint8)
        head = pickle.dumps((value.chunk, value.items, value.failures, rgb.shape), pickle.HIGHEST_PROTOCOL)
        return struct.pack("<Q", len(head)) + head + rgb.tobytes()

    def decode(self, encoded: bytes) -> FittedChunk:
        (n,) = struct.unpack_from("<Q", encoded)
        chunk, items, failures, shape = pickle.loads(encoded[8:8 + n])
        rgb = np.frombuffer(encoded, dtype=np.uint8, offset=8 + n).reshape(shape).copy()
        return FittedChunk(chunk, items, rgb, failures)

    def estimate_size(self, value: FittedChunk) -> int:
        return 8 + value.rgb.nbytes + sum(len(item.data) + 64 for item in value.items)

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self):
        return FittedChunk


beam.coders.registry.register_coder(FittedChunk, FittedChunkCoder)


class Piece(NamedTuple):
    """A chunk's staged images (`rows` of them, none: no file) as its marker records it."""
    split: str
    bucket: int
    chunk: int
    path: str
    rows: int
    embedding_size: int       # 0: records without an embedding


class PlacedPiece(NamedTuple):
    """The rows [start, end) of a piece that go to one output file; the piece's rows go to the files
    first_file..last_file (the last of those to finish removes it)."""
    bucket: int
    chunk: int
    path: str
    start: int
    end: int
    rows: int
    first_file: int
    last_file: int
    embedding_size: int


class FitParams(NamedTuple):
    """How input bytes become the 299 RGB image; the same before and after the shuffle."""
    mode: str = "letterbox"
    max_pixels: int = DEFAULT_MAX_PIXELS
    exif_transpose: bool = False
    fast_decode: bool = False   # JPEGs decoded with DCT scaling down to the fitted size (not exact)

    def decode(self, data: bytes, draft_size: Optional[DraftSize] = None):
        return decode_rgb(data, max_pixels=self.max_pixels, exif_transpose=self.exif_transpose,
                          draft_size=draft_size)

    def identify(self, data: bytes) -> None:
        """Raise DecodeError for what is not an image at all (unknown content, no pixels, over
        --max-pixels) from its header alone; whether it decodes is found where it is decoded (fit_chunk)."""
        probe_image(data, max_pixels=self.max_pixels, full_decode=False)

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


def piece_name(split: str, bucket: int, chunk: int) -> str:
    return f"{split}-{bucket:05d}-{chunk:05d}.pixels"


# --- identification + staging ---------------------------------------------------------------------------

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
    """ImageBlob -> its staged entry (bucket, item id, packed item), or a Failure if it is not an image.

    Only the header is read here (FitParams.identify, about 15 us): the image is decoded once, after the
    merge (`fit_chunk`), and the ranks of the records are placed after that (`PlaceRows`), so a file that
    does not decode costs no hole. Checking each JPEG here as well (a 1/8-scale decode, 0.3 ms) was 15% of
    the job's CPU. The encoded file is staged (about 110 KB for an ILSVRC JPEG), not 268 KB of pixels.
    """

    def __init__(self, seed: int, val_fraction: float, params: FitParams):
        self._seed, self._val_fraction, self._params = seed, val_fraction, params

    def __call__(self, blob: ImageBlob, n_buckets: int):
        keep_heap()
        try:
            self._params.identify(blob.data)
        except DecodeError as exc:
            return Failure(blob.source, blob.member, str(exc))
        ident = item_id(self._seed, blob.name, blob.source)
        split = split_of(self._seed, blob.name, self._val_fraction)
        item = LabItem(ident, blob.name, blob.source, blob.member, blob.data)
        return staged_bucket(split, bucket_of(ident[:16], n_buckets)), ident, pack_item(item)


def fit_chunk(chunk: Chunk, params: FitParams) -> FittedChunk:
    """Decode and fit a chunk's images: the one decode of each image; those that fail become failures."""
    items, images, failures = [], [], []
    for item in chunk.items:
        try:
            images.append(params.fitted(item.data))
        except DecodeError as exc:
            failures.append(Failure(item.source, item.member, str(exc)))
            continue
        items.append(item)
    rgb = np.stack(images) if images else np.empty((0, SIZE, SIZE, 3), dtype=np.uint8)
    return FittedChunk(chunk, tuple(items), rgb, tuple(failures))


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

# Tagged outputs of ChunkMerger: the recorded pieces and failures of chunks finished by an earlier run.
DONE, DONE_FAILURES = "done", "done_failures"


def chunk_marker(staging: str, split: str, bucket: int, index: int) -> str:
    return join(staging, "chunks", f"{split}-{bucket:05d}-{index:05d}.json")


class ChunkMerger:
    """The merge step of colorize (staging.MergeBuckets): a bucket's sorted items -> Chunks of at most
    `chunk_size` items; a chunk whose marker exists yields its recorded Piece on DONE and its failures
    on DONE_FAILURES instead."""

    def __init__(self, chunk_size: int, staging: str):
        self._chunk_size, self._staging = chunk_size, staging

    def _recorded(self, split: str, bucket: int, index: int) -> Optional[List[Any]]:
        """A finished chunk's outputs (its Piece on DONE, its failures on DONE_FAILURES), or None."""
        recorded = read_marker(chunk_marker(self._staging, split, bucket, index))
        if recorded is None:
            return None
        return [pvalue.TaggedOutput(DONE, Piece(*recorded["piece"]))] + [
            pvalue.TaggedOutput(DONE_FAILURES, failure_from_json(f)) for f in recorded["failures"]]

    def finished(self, task) -> Optional[List[Any]]:
        """The recorded outputs of every chunk of the bucket when all are finished (a re-run then does not
        read the bucket's staged images again), else None."""
        split, bucket = SPLITS[task.bucket // MAX_BUCKETS], task.bucket % MAX_BUCKETS
        outputs = []
        for index in range(math.ceil(task.count / self._chunk_size)):
            recorded = self._recorded(split, bucket, index)
            if recorded is None:
                return None
            outputs += recorded
        return outputs

    def __call__(self, task, entries) -> Iterator[Any]:
        split, bucket = SPLITS[task.bucket // MAX_BUCKETS], task.bucket % MAX_BUCKETS
        for index, start in enumerate(range(0, len(entries), self._chunk_size)):
            recorded = self._recorded(split, bucket, index)
            if recorded is not None:
                yield from recorded
                continue
            items = tuple(unpack_item(k, v) for k, v in entries[start:start + self._chunk_size])
            yield Chunk(split, bucket, index, items)


# --- records, pieces and files -------------------------------------------------------------------------

def record_parts(name: str, rgb: np.ndarray, embedding: Optional[np.ndarray], record_format: str) -> List[bytes]:
    """The framed TFRecord of one 299 RGB image as parts (Lab computed here, after the shuffle)."""
    l_norm, ab_norm = colour.lab_target(rgb)
    return frame_parts(encode_example_parts(name, l_norm, ab_norm, embedding, record_format))


def chunk_records(fitted: FittedChunk, embeddings: Optional[np.ndarray], record_format: str) -> List[bytes]:
    """The framed TFRecords of a chunk's fitted images, in order."""
    return [b"".join(record_parts(item.name, fitted.rgb[i], None if embeddings is None else embeddings[i],
                                  record_format))
            for i, item in enumerate(fitted.items)]


# A piece holds its images, not their records: per image a header (name length, embedding length or -1),
# the name, the float32 embedding and the 299 x 299 x 3 pixels (268 KB, against 606 KB for the record).
# The records are made as their file is written (`write_record_file`), so each is written once: staging
# whole records as pieces and copying them into their file cost ~0.2 ms an image more (606 KB written,
# read and written again).
_PIECE_ITEM = struct.Struct("<Ii")


def write_images(fitted: FittedChunk, embeddings: Optional[np.ndarray], f) -> None:
    """A chunk's fitted images as a piece, into the binary file `f`."""
    for i, item in enumerate(fitted.items):
        name = item.name.encode("utf-8")
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


def _skip(f, n: int, path: str) -> None:
    """Move `n` bytes on in `f` (a seek where the file can, reads where it cannot)."""
    if getattr(f, "seekable", lambda: False)():
        f.seek(n, 1)
        return
    while n > 0:
        data = f.read(min(n, 1 << 20))
        if not data:
            raise IOError(f"staged piece {path} ends inside an image")
        n -= len(data)


def _piece_records(path: str, record_format: str, start: int = 0, end: Optional[int] = None
                   ) -> Iterator[List[bytes]]:
    """The records of images [start, end) of a piece (end None: to its end), each as parts, made one at a
    time."""
    rgb = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    index = 0
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        while end is None or index < end:
            header = f.read(_PIECE_ITEM.size)
            if not header:
                if end is not None:
                    raise IOError(f"staged piece {path} holds {index} images, not {end}")
                return
            if len(header) != _PIECE_ITEM.size:
                raise IOError(f"staged piece {path} ends inside an image header")
            n_name, n_emb = _PIECE_ITEM.unpack(header)
            if index < start:
                _skip(f, n_name + 4 * max(n_emb, 0) + rgb.nbytes, path)
            else:
                name = _read_exact(f, n_name).decode("utf-8")
                embedding = None if n_emb < 0 else np.frombuffer(_read_exact(f, 4 * n_emb), dtype="<f4")
                _read_into(f, memoryview(rgb).cast("B"), path)
                yield record_parts(name, rgb, embedding, record_format)
            index += 1


PieceRange = Tuple[str, int, int]   # (piece path, first image, end)


def write_record_file(path: str, pieces: List[PieceRange], record_format: str, compression: str = "none") -> None:
    """The record file `path` from its ranges of pieces in order, written once (gzip: one deflate stream,
    no file name, mtime 0, as concat_files writes it)."""
    with compressed_writer(path, compression) as write:
        for piece, start, end in pieces:
            for parts in _piece_records(piece, record_format, start, end):
                for part in parts:
                    write(part)


class _WritePiecesFn(beam.DoFn):
    """A chunk's fitted images (pixels, name, embedding) -> one piece, then the chunk's marker (the piece
    and the chunk's failures). Emits the Piece, and the failures on FAILURES."""

    def __init__(self, staging: str, progress: Optional[str] = None):
        self._staging = staging
        self._progress = ProgressTicker(progress)

    def setup(self):
        keep_heap()

    def finish_bundle(self):
        self._progress.flush()

    def process(self, element: Tuple[FittedChunk, Optional[np.ndarray]]):
        fitted, embeddings = element
        chunk = fitted.chunk
        n = len(fitted.items)
        size = 0 if embeddings is None or not n else int(embeddings.shape[1])
        path = join(self._staging, piece_name(chunk.split, chunk.bucket, chunk.index))
        if n:
            write_with(path, functools.partial(write_images, fitted, embeddings))
        piece = Piece(chunk.split, chunk.bucket, chunk.index, path, n, size)
        write_atomically(chunk_marker(self._staging, chunk.split, chunk.bucket, chunk.index), json.dumps(
            {"piece": list(piece), "failures": [f.to_json() for f in fitted.failures]}).encode("utf-8"))
        yield piece
        for failure in fitted.failures:
            yield pvalue.TaggedOutput(FAILURES, failure)
        self._progress.tick(ok=n, failed=len(fitted.failures))


def bucket_offsets(rows: List[Tuple[Tuple[str, int], int]]) -> dict:
    """[((split, bucket), rows)] -> {(split, bucket): rank of its first row}: each split ranks its
    buckets in order."""
    offsets, seen = {}, {}
    for (split, bucket), n in sorted(rows):
        offsets[(split, bucket)] = seen.get(split, 0)
        seen[split] = seen.get(split, 0) + n
    return offsets


def place_pieces(key: Tuple[str, int], pieces, per_file: int, offsets: dict
                 ) -> Iterator[Tuple[Tuple[str, int], PlacedPiece]]:
    """A bucket's pieces -> ((split, file index), PlacedPiece) for every file their rows go to."""
    split, _ = key
    rank = offsets[tuple(key)]
    for p in sorted((Piece(*p) for p in pieces), key=lambda p: p.chunk):
        if not p.rows:
            continue
        first_file, last_file = rank // per_file, (rank + p.rows - 1) // per_file
        for file_index, start, end in file_spans(rank, p.rows, per_file):
            yield (split, file_index), PlacedPiece(p.bucket, p.chunk, p.path, start, end, p.rows, first_file,
                                                   last_file, p.embedding_size)
        rank += p.rows


class PlaceRows(beam.PTransform):
    """Pieces -> ((split, file index), PlacedPiece): the records' ranks from the pieces' row counts.

    Grouped by bucket (a bucket's few pieces), then every bucket's row count in one list (at most
    2 x MAX_BUCKETS numbers, whatever the dataset's size) gives the bucket offsets, a side input.
    """

    def __init__(self, per_file: int):
        super().__init__()
        self._per_file = per_file

    def expand(self, pieces):
        per_file = self._per_file
        per_bucket = (pieces
                      | "KeyByBucket" >> beam.Map(lambda p: ((p.split, p.bucket), Piece(*p)))
                      | "GroupByBucket" >> beam.GroupByKey())
        offsets = (per_bucket
                   | "BucketRows" >> beam.MapTuple(lambda key, ps: (tuple(key), sum(Piece(*p).rows for p in ps)))
                   | "AllBucketRows" >> beam.combiners.ToList()
                   | "BucketOffsets" >> beam.Map(bucket_offsets))
        return per_bucket | "PlaceRows" >> beam.FlatMap(
            lambda bucket, offsets: place_pieces(*bucket, per_file, offsets), beam.pvalue.AsSingleton(offsets))


class WriteRecordFiles(beam.PTransform):
    """(FittedChunk, embeddings or None) -> (files, failures): `lab_images_K.tfrecord` /
    `val_lab_images_K.tfrecord` files, and the images that did not decode.

    Emits {"file", "rows", "split", "embedding_size"} per file. Pieces go to `staging`, which the caller
    removes; `done` holds the Pieces of chunks an earlier run finished (ChunkMerger's DONE output).
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

        def marker_of(split: str, file_index: int) -> str:
            return join(staging, "files", record_file_name(split, file_index) + ".json")

        def write_file(element) -> dict:
            (split, file_index), placed = element
            name = record_file_name(split, file_index)
            marker = marker_of(split, file_index)
            recorded = read_marker(marker)
            if recorded is not None and FileSystems.exists(join(output, name)):
                return recorded
            ordered = sorted(PlacedPiece(*p) for p in placed)
            write_record_file(join(output, name), [(p.path, p.start, p.end) for p in ordered], record_format,
                              compression)
            done = {"file": name, "rows": sum(p.end - p.start for p in ordered), "split": split,
                    "embedding_size": max(p.embedding_size for p in ordered)}
            write_atomically(marker, json.dumps(done).encode("utf-8"))
            # A piece shared by several files goes with the last of them to finish (each checks the
            # others' markers after writing its own, so one of them always sees all).
            delete_existing([p.path for p in ordered if all(
                i == file_index or FileSystems.exists(marker_of(split, i))
                for i in range(p.first_file, p.last_file + 1))])
            return done

        written = chunks_with_embeddings | "WritePieces" >> beam.ParDo(
            _WritePiecesFn(self._staging, self._progress)).with_outputs(FAILURES, main="pieces")
        pieces = ((written.pieces, self._done) | "AllPieces" >> beam.Flatten() if self._done is not None
                  else written.pieces)
        files = (pieces
                 | "PlaceRows" >> PlaceRows(self._per_file)
                 | "GroupPiecesByFile" >> beam.GroupByKey()
                 | "WriteFile" >> beam.Map(write_file))
        return files, written[FAILURES]
