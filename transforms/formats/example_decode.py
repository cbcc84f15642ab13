"""Reading TFRecord files and `tf.train.Example`s without TensorFlow (the reverse of `tfrecord.py`).

- `iter_file_records(f)`: the records of an open TFRecord file, streamed (a gzip file is recognised by its
  magic bytes), every length and data CRC-32C checked (`check_crc=False` skips the data CRC); records
  not in `wanted` are skipped without being kept (`data` is None).
- `parse_example(data)`: an Example's features as {key: Feature(kind, value)}: kind "bytes" (a list
  of bytes), "float" (float32 ndarray) or "int64" (int64 ndarray), or None for a feature with no list.
  Packed and unpacked repeated fields are both read; unknown fields are skipped; malformed bytes raise
  `ExampleDecodeError` (a ValueError).

Only the protobuf wire format is needed: Example{features = 1: Features{feature = 1: map<string,
Feature>}}, Feature{oneof bytes_list = 1, float_list = 2, int64_list = 3}, each list {repeated value = 1}.
"""
from __future__ import annotations

import gzip
import struct
from typing import BinaryIO, Container, Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np

from imagebeam.transforms.formats.tfrecord import _masked_crc

__all__ = ["ExampleDecodeError", "Feature", "Record", "parse_example", "iter_file_records", "open_records",
           "is_gzip"]

GZIP_MAGIC = b"\x1f\x8b"


class ExampleDecodeError(ValueError):
    """The bytes are not a well-formed tf.train.Example / TFRecord."""


class Feature(NamedTuple):
    kind: Optional[str]   # "bytes", "float", "int64", or None (a Feature with no list set)
    value: object         # List[bytes], float32 ndarray, int64 ndarray, or None

    @property
    def size(self) -> int:
        """How many values the list holds (0 for an unset Feature)."""
        return 0 if self.value is None else len(self.value)


# --- protobuf wire format --------------------------------------------------------------------------------

def _varint(buf: memoryview, at: int, end: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if at >= end:
            raise ExampleDecodeError("truncated varint")
        byte = buf[at]
        at += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, at
        shift += 7
        if shift > 63:
            raise ExampleDecodeError("varint longer than 10 bytes")


def _fields(buf: memoryview, at: int, end: int) -> Iterator[Tuple[int, int, object]]:
    """(field number, wire type, value) of a message in buf[at:end]: value is an int for varints, a
    (start, stop) span for length-delimited fields and the raw bytes' span for fixed32/64."""
    while at < end:
        key, at = _varint(buf, at, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ExampleDecodeError("field number 0")
        if wire == 0:
            value, at = _varint(buf, at, end)
            yield field, wire, value
        elif wire == 2:
            n, at = _varint(buf, at, end)
            if at + n > end:
                raise ExampleDecodeError("length-delimited field runs past its message")
            yield field, wire, (at, at + n)
            at += n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            if at + n > end:
                raise ExampleDecodeError("truncated fixed-width field")
            yield field, wire, (at, at + n)
            at += n
        else:
            raise ExampleDecodeError(f"unsupported wire type {wire}")


def _floats(buf: memoryview, start: int, stop: int, out: List[np.ndarray]) -> None:
    for field, wire, value in _fields(buf, start, stop):
        if field != 1:
            continue
        if wire == 2:  # packed
            a, b = value
            if (b - a) % 4:
                raise ExampleDecodeError("packed float list length is not a multiple of 4")
            out.append(np.frombuffer(buf[a:b], dtype="<f4"))
        elif wire == 5:
            a, b = value
            out.append(np.frombuffer(buf[a:b], dtype="<f4"))
        else:
            raise ExampleDecodeError(f"float_list value with wire type {wire}")


def _int64s(buf: memoryview, start: int, stop: int, out: List[int]) -> None:
    for field, wire, value in _fields(buf, start, stop):
        if field != 1:
            continue
        if wire == 2:  # packed varints
            a, b = value
            while a < b:
                v, a = _varint(buf, a, b)
                out.append(v)
        elif wire == 0:
            out.append(value)
        else:
            raise ExampleDecodeError(f"int64_list value with wire type {wire}")


def _feature(buf: memoryview, start: int, stop: int) -> Feature:
    kind: Optional[str] = None
    chunks: list = []
    for field, wire, value in _fields(buf, start, stop):
        if field not in (1, 2, 3):
            continue
        if wire != 2:
            raise ExampleDecodeError(f"Feature field {field} with wire type {wire}")
        new_kind = ("bytes", "float", "int64")[field - 1]
        if kind is not None and new_kind != kind:  # a oneof: the last one set wins
            chunks = []
        kind = new_kind
        a, b = value
        if kind == "bytes":
            chunks += [bytes(buf[x:y]) for f, w, (x, y) in _spans(buf, a, b) if f == 1]
        elif kind == "float":
            _floats(buf, a, b, chunks)
        else:
            _int64s(buf, a, b, chunks)
    if kind is None:
        return Feature(None, None)
    if kind == "bytes":
        return Feature(kind, chunks)
    if kind == "float":
        return Feature(kind, np.concatenate(chunks) if chunks else np.zeros(0, np.float32))
    return Feature(kind, np.array(chunks, dtype=np.uint64).astype(np.int64))


def _spans(buf: memoryview, start: int, stop: int) -> Iterator[Tuple[int, int, Tuple[int, int]]]:
    for field, wire, value in _fields(buf, start, stop):
        if wire != 2:
            raise ExampleDecodeError(f"bytes_list value with wire type {wire}")
        yield field, wire, value


def parse_example(data: bytes) -> Dict[str, Feature]:
    """{feature key: Feature} of a serialised tf.train.Example (map entries: the last one of a key wins)."""
    buf = memoryview(data)
    out: Dict[str, Feature] = {}
    for field, wire, value in _fields(buf, 0, len(buf)):
        if field != 1:
            continue
        if wire != 2:
            raise ExampleDecodeError("Example.features is not a message")
        for f2, w2, entry in _fields(buf, *value):
            if f2 != 1:
                continue
            if w2 != 2:
                raise ExampleDecodeError("Features.feature entry is not a message")
            key, feature = "", Feature(None, None)
            for f3, w3, span in _fields(buf, *entry):
                if w3 != 2:
                    continue
                if f3 == 1:
                    try:
                        key = bytes(buf[span[0]:span[1]]).decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise ExampleDecodeError(f"feature key is not UTF-8: {exc}") from None
                elif f3 == 2:
                    feature = _feature(buf, *span)
            out[key] = feature
    return out


# --- TFRecord files ----------------------------------------------------------------------------------------

class Record(NamedTuple):
    index: int            # 0-based position in the file
    offset: int           # byte offset of its header in the (decompressed) stream
    length: int
    data: Optional[bytes]  # None when skipped (not in `wanted`)


def is_gzip(f: BinaryIO) -> bool:
    """Whether the seekable file starts with the gzip magic (position restored to 0)."""
    f.seek(0)
    head = f.read(2)
    f.seek(0)
    return head == GZIP_MAGIC


def open_records(f: BinaryIO) -> BinaryIO:
    """The record stream of an open, seekable TFRecord file: itself, or a gzip reader over it."""
    return gzip.GzipFile(fileobj=f, mode="rb") if is_gzip(f) else f


def _read_exactly(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def iter_file_records(f: BinaryIO, check_crc: bool = True,
                      wanted: Optional[Container[int]] = None) -> Iterator[Record]:
    """The records of an open TFRecord file (gzip recognised), streamed; raises ValueError on a bad frame.

    The length CRC is always checked (a bad one means the framing cannot be trusted). With `check_crc`
    each kept record's data CRC is checked too; records whose index is not in `wanted` (when given) are
    skipped: their bytes are neither kept nor checked.
    """
    stream = open_records(f)
    at = index = 0
    while True:
        try:
            header = _read_exactly(stream, 12)
        except (OSError, EOFError) as exc:  # a truncated or corrupt gzip stream
            raise ValueError(f"unreadable compressed stream at byte {at}: {exc}") from None
        if not header:
            return
        if len(header) < 12:
            raise ValueError(f"truncated TFRecord header at byte {at} (record {index})")
        (length,) = struct.unpack("<Q", header[:8])
        (length_crc,) = struct.unpack("<I", header[8:12])
        if length_crc != _masked_crc(header[:8]):
            raise ValueError(f"corrupt TFRecord length CRC at byte {at} (record {index})")
        keep = wanted is None or index in wanted
        try:
            if keep or not stream.seekable():
                body = _read_exactly(stream, length + 4)
                complete = len(body) == length + 4
            else:  # skip the data, read only its CRC (to know the record is complete)
                stream.seek(length, 1)
                complete = len(_read_exactly(stream, 4)) == 4
        except (OSError, EOFError) as exc:
            raise ValueError(f"unreadable compressed stream at byte {at}: {exc}") from None
        if not complete:
            raise ValueError(f"truncated TFRecord at byte {at} (record {index})")
        data = None
        if keep:
            data = body[:length]
            if check_crc:
                (data_crc,) = struct.unpack("<I", body[length:length + 4])
                if data_crc != _masked_crc(data):
                    raise ValueError(f"corrupt TFRecord data CRC at byte {at} (record {index})")
        yield Record(index, at, length, data)
        at += 16 + length
        index += 1
