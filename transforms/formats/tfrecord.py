"""tf.train.Example and TFRecord files without TensorFlow: the protobuf wire format and the framing.

An Example is written directly (a packed list is a tag, a length and the values), map entries in the
key order protobuf's deterministic serialisation uses, so the bytes equal
`tf.train.Example(...).SerializeToString(deterministic=True)`. Records are framed as TFRecord files
are: uint64 length, masked CRC-32C of the length, the data, masked CRC-32C of the data.
"""
from __future__ import annotations

import gzip
import struct
from typing import Dict, Iterable, Iterator, List

import numpy as np


# --- protobuf wire format ------------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


# A message can also be kept as its parts, a list of byte strings whose concatenation is its bytes: the
# headers of nested fields are prepended to the list instead of copying the payload into each level (a
# 400 KB float list was copied five times on its way into a framed record).

def _size(parts: List[bytes]) -> int:
    return sum(len(p) for p in parts)


def _len_field_parts(field: int, parts: List[bytes]) -> List[bytes]:
    """`_len_field` of the concatenation of `parts`, as parts."""
    return [_varint(field << 3 | 2) + _varint(_size(parts))] + parts


def bytes_feature_parts(value: bytes) -> List[bytes]:
    return _len_field_parts(1, _len_field_parts(1, [value]))


def float_feature_parts(values: np.ndarray) -> List[bytes]:
    return _len_field_parts(2, _len_field_parts(1, [np.ascontiguousarray(values, dtype="<f4").tobytes()]))


def example_parts(features: Dict[str, List[bytes]]) -> List[bytes]:
    """`example_bytes` of features given as parts, as parts."""
    entries: List[bytes] = []
    for k, v in sorted(features.items()):
        entries += _len_field_parts(1, _len_field_parts(1, [k.encode("utf-8")]) + _len_field_parts(2, v))
    return _len_field_parts(1, entries)


def bytes_feature(value: bytes) -> bytes:
    """Feature{bytes_list: BytesList{value: [value]}}."""
    return b"".join(bytes_feature_parts(value))


def float_feature(values: np.ndarray) -> bytes:
    """Feature{float_list: FloatList{value: values}} (packed little-endian float32)."""
    return b"".join(float_feature_parts(values))


def example_bytes(features: dict) -> bytes:
    """Example{features: Features{feature: map}} from {key: encoded Feature}, keys in sorted order."""
    return b"".join(example_parts({k: [v] for k, v in features.items()}))


def int64_feature(values: Iterable[int]) -> bytes:
    """Feature{int64_list: Int64List{value: values}} (packed varints, two's complement for negatives)."""
    payload = b"".join(_varint(int(v) & 0xFFFFFFFFFFFFFFFF) for v in values)
    return _len_field(3, _len_field(1, payload))


# --- TFRecord framing ----------------------------------------------------------------------------------
# Each record: uint64 length, masked CRC-32C of the length, the data, masked CRC-32C of the data.

def _crc32c(data: bytes) -> int:
    import google_crc32c  # C implementation; a dependency of imagebeam

    return google_crc32c.value(data)


def _masked_crc(data: bytes) -> int:
    return _mask(_crc32c(data))


def _mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    return b"".join(frame_parts([data]))


def frame_parts(parts: List[bytes]) -> List[bytes]:
    """`frame_record` of the concatenation of `parts`, as parts (the CRC extended part by part)."""
    import google_crc32c

    length = struct.pack("<Q", _size(parts))
    crc = 0
    for part in parts:
        crc = google_crc32c.extend(crc, part)
    return [length + struct.pack("<I", _masked_crc(length))] + parts + [struct.pack("<I", _mask(crc))]


def iter_records(blob: bytes) -> Iterator[bytes]:
    """The records of a TFRecord file's bytes (gzip is recognised by its magic), CRCs checked."""
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    at = 0
    while at < len(blob):
        if at + 12 > len(blob):
            raise ValueError(f"truncated TFRecord header at byte {at}")
        length_bytes = blob[at:at + 8]
        (length,) = struct.unpack("<Q", length_bytes)
        (length_crc,) = struct.unpack("<I", blob[at + 8:at + 12])
        if length_crc != _masked_crc(length_bytes):
            raise ValueError(f"corrupt TFRecord length at byte {at}")
        data = blob[at + 12:at + 12 + length]
        if len(data) != length or at + 16 + length > len(blob):
            raise ValueError(f"truncated TFRecord at byte {at}")
        (data_crc,) = struct.unpack("<I", blob[at + 12 + length:at + 16 + length])
        if data_crc != _masked_crc(data):
            raise ValueError(f"corrupt TFRecord data at byte {at}")
        yield data
        at += 16 + length
