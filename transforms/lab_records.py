"""The koalarization record (SPEC §3) and our compact variant: encoding, TFRecord framing, and the reader.

Reference format: a `tf.train.Example` with exactly `image_name` (bytes), `image_l` (50,176 floats),
`image_ab` (100,352 floats, a and b interleaved per pixel) and `image_embedding` (1001 or 1000 floats,
absent with `--embedding none`). Compact format: the same keys, but `image_l` and `image_ab` are bytes
holding the 8-bit quantised values of `colour.quantise_l` / `colour.quantise_ab` (about 4x smaller).

The Example's wire format is written directly (a packed float list is a tag, a length and the float32
bytes), in the key order protobuf's deterministic serialisation uses, so the bytes equal
`tf.train.Example(...).SerializeToString(deterministic=True)` and encoding costs microseconds.
Encoding needs no TensorFlow; only `read_lab_records` imports it.
"""
from __future__ import annotations

import gzip
import struct
from typing import Iterator, Optional, Sequence

import numpy as np

from imagebeam.transforms import colour

RECORD_FORMATS = ("reference", "compact")
L_VALUES = colour.LAB_SIZE * colour.LAB_SIZE          # 50,176
AB_VALUES = 2 * L_VALUES                              # 100,352
FEATURE_KEYS = ("image_name", "image_l", "image_ab", "image_embedding")


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


def bytes_feature(value: bytes) -> bytes:
    """Feature{bytes_list: BytesList{value: [value]}}."""
    return _len_field(1, _len_field(1, value))


def float_feature(values: np.ndarray) -> bytes:
    """Feature{float_list: FloatList{value: values}} (packed little-endian float32)."""
    data = np.ascontiguousarray(values, dtype="<f4").tobytes()
    return _len_field(2, _len_field(1, data))


def example_bytes(features: dict) -> bytes:
    """Example{features: Features{feature: map}} from {key: encoded Feature}, keys in sorted order."""
    entries = b"".join(_len_field(1, _len_field(1, k.encode("utf-8")) + _len_field(2, v))
                       for k, v in sorted(features.items()))
    return _len_field(1, entries)


def encode_example(name: str, l_norm: np.ndarray, ab_norm: np.ndarray, embedding: Optional[np.ndarray],
                   record_format: str = "reference") -> bytes:
    """One record: L' (224, 224), ab' (224, 224, 2) float32 and the embedding (or None) as an Example."""
    if record_format == "reference":
        features = {"image_l": float_feature(l_norm.reshape(-1)), "image_ab": float_feature(ab_norm.reshape(-1))}
    elif record_format == "compact":
        features = {"image_l": bytes_feature(colour.quantise_l(l_norm).tobytes()),
                    "image_ab": bytes_feature(colour.quantise_ab(ab_norm).tobytes())}
    else:
        raise ValueError(f"unknown record format {record_format!r}; choose from {RECORD_FORMATS}")
    features["image_name"] = bytes_feature(name.encode("utf-8"))
    if embedding is not None:
        features["image_embedding"] = float_feature(np.asarray(embedding).reshape(-1))
    return example_bytes(features)


# --- TFRecord framing ----------------------------------------------------------------------------------
# Each record: uint64 length, masked CRC-32C of the length, the data, masked CRC-32C of the data.

def _crc32c(data: bytes) -> int:
    import google_crc32c  # C implementation; a dependency of imagebeam

    return google_crc32c.value(data)


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


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


# --- reading (TensorFlow) ------------------------------------------------------------------------------

def reference_feature_spec(embedding_size: int = 1001) -> dict:
    """The feature spec koalarization's training code parses with (SPEC §3)."""
    import tensorflow as tf

    spec = {
        "image_name": tf.io.FixedLenFeature([], tf.string),
        "image_l": tf.io.FixedLenFeature([L_VALUES], tf.float32),
        "image_ab": tf.io.FixedLenFeature([AB_VALUES], tf.float32),
    }
    if embedding_size:
        spec["image_embedding"] = tf.io.FixedLenFeature([embedding_size], tf.float32)
    return spec


def compact_feature_spec(embedding_size: int = 1001) -> dict:
    import tensorflow as tf

    spec = {
        "image_name": tf.io.FixedLenFeature([], tf.string),
        "image_l": tf.io.FixedLenFeature([], tf.string),
        "image_ab": tf.io.FixedLenFeature([], tf.string),
    }
    if embedding_size:
        spec["image_embedding"] = tf.io.FixedLenFeature([embedding_size], tf.float32)
    return spec


def describe_first_record(files: Sequence[str]) -> tuple:
    """(record format, embedding size, compression) of the first record of the first non-empty file."""
    import tensorflow as tf

    for path in files:
        with tf.io.gfile.GFile(path, "rb") as f:
            head = f.read(2)
        compression = "GZIP" if head == b"\x1f\x8b" else ""
        for raw in tf.data.TFRecordDataset([path], compression_type=compression).take(1):
            example = tf.train.Example.FromString(raw.numpy())
            feature = example.features.feature
            fmt = "compact" if feature["image_l"].WhichOneof("kind") == "bytes_list" else "reference"
            size = len(feature["image_embedding"].float_list.value) if "image_embedding" in feature else 0
            return fmt, size, compression
    raise ValueError(f"no records in {list(files)[:3]}…")


def read_lab_records(file_pattern: str, record_format: str = "auto", embedding_size: Optional[int] = None,
                     compression: Optional[str] = None, with_name: bool = False):
    """A tf.data.Dataset of (image_l [224, 224, 1], image_ab [224, 224, 2], embedding [E]) float32 tensors.

    Reads both formats: `record_format` "reference", "compact" or "auto" (from the first record), likewise
    `embedding_size` (0 for records written with `--embedding none`: then only (image_l, image_ab)) and
    `compression` ("GZIP" or "", from the first file's magic bytes). Compact values come back as
    L' = q/127.5 - 1 and ab' = (q - 128)/127, within half a quantisation step of the float record.
    `with_name=True` appends the image name. Files are read in sorted order.
    """
    import tensorflow as tf

    files = sorted(tf.io.gfile.glob(file_pattern))
    if not files:
        raise FileNotFoundError(f"no files match {file_pattern}")
    if record_format == "auto" or embedding_size is None or compression is None:
        found_format, found_size, found_compression = describe_first_record(files)
        record_format = found_format if record_format == "auto" else record_format
        embedding_size = found_size if embedding_size is None else embedding_size
        compression = found_compression if compression is None else compression
    if record_format not in RECORD_FORMATS:
        raise ValueError(f"unknown record format {record_format!r}; choose from {RECORD_FORMATS}")
    compact = record_format == "compact"
    spec = compact_feature_spec(embedding_size) if compact else reference_feature_spec(embedding_size)
    size = colour.LAB_SIZE

    def parse(serialized):
        f = tf.io.parse_single_example(serialized, spec)
        if compact:
            l_q = tf.io.decode_raw(f["image_l"], tf.uint8)
            ab_q = tf.io.decode_raw(f["image_ab"], tf.uint8)
            image_l = tf.cast(l_q, tf.float32) / colour.L_Q_SCALE - colour.L_Q_OFFSET
            image_ab = (tf.cast(ab_q, tf.float32) - colour.AB_Q_OFFSET) / colour.AB_Q_SCALE
        else:
            image_l, image_ab = f["image_l"], f["image_ab"]
        out = (tf.reshape(image_l, [size, size, 1]), tf.reshape(image_ab, [size, size, 2]))
        if embedding_size:
            out += (f["image_embedding"],)
        if with_name:
            out += (f["image_name"],)
        return out

    return tf.data.TFRecordDataset(files, compression_type=compression).map(
        parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
