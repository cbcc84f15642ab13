"""The koalarization record (SPEC §3) and our compact variant: encoding, TFRecord framing, and the reader.

Reference format: a `tf.train.Example` with exactly `image_name` (bytes), `image_l` (50,176 floats),
`image_ab` (100,352 floats, a and b interleaved per pixel) and `image_embedding` (1001 or 1000 floats,
absent with `--embedding none`). Compact format: the same keys, but `image_l` and `image_ab` are bytes
holding the 8-bit quantised values of `colour.quantise_l` / `colour.quantise_ab` (about 4x smaller).

The Example's wire format is written directly (`tfrecord.py`), byte-identical to
`tf.train.Example(...).SerializeToString(deterministic=True)`, so encoding costs microseconds and needs no
TensorFlow; only `read_lab_records` imports it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from imagebeam.transforms.imaging import colour
from imagebeam.transforms.formats.tfrecord import bytes_feature_parts, example_parts, float_feature_parts

RECORD_FORMATS = ("reference", "compact")
L_VALUES = colour.LAB_SIZE * colour.LAB_SIZE          # 50,176
AB_VALUES = 2 * L_VALUES                              # 100,352
FEATURE_KEYS = ("image_name", "image_l", "image_ab", "image_embedding")


def encode_example(name: str, l_norm: np.ndarray, ab_norm: np.ndarray, embedding: Optional[np.ndarray],
                   record_format: str = "reference") -> bytes:
    """One record: L' (224, 224), ab' (224, 224, 2) float32 and the embedding (or None) as an Example."""
    return b"".join(encode_example_parts(name, l_norm, ab_norm, embedding, record_format))


def encode_example_parts(name: str, l_norm: np.ndarray, ab_norm: np.ndarray, embedding: Optional[np.ndarray],
                         record_format: str = "reference") -> List[bytes]:
    """`encode_example` as parts whose concatenation is its bytes (each value array copied once)."""
    if record_format == "reference":
        features = {"image_l": float_feature_parts(l_norm.reshape(-1)),
                    "image_ab": float_feature_parts(ab_norm.reshape(-1))}
    elif record_format == "compact":
        features = {"image_l": bytes_feature_parts(colour.quantise_l(l_norm).tobytes()),
                    "image_ab": bytes_feature_parts(colour.quantise_ab(ab_norm).tobytes())}
    else:
        raise ValueError(f"unknown record format {record_format!r}; choose from {RECORD_FORMATS}")
    features["image_name"] = bytes_feature_parts(name.encode("utf-8"))
    if embedding is not None:
        features["image_embedding"] = float_feature_parts(np.asarray(embedding).reshape(-1))
    return example_parts(features)


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
