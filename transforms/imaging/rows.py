"""ImageBlob -> labelled Imagenet32-style rows (RowMaker), and the sorted-class label map.

Labelling runs before decoding so an unknown class costs no decode. With no label map given, labels are
1 + the index of the sorted class keys of everything indexed or listed (failed images included, so a bad file
never renumbers the classes).
"""
from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam

from imagebeam.transforms.imaging.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_rgb
from imagebeam.transforms.inputs.labels import LabelError, LabelMap, sorted_class_map
from imagebeam.transforms.imaging.resize import fast_draft_size, planar_row, squash
from imagebeam.transforms.inputs.sources import ImageBlob



class Row(NamedTuple):
    """One output row: the image's stable name, its label and 3*S*S channel-planar uint8 pixels."""
    name: str
    source: str
    label: int
    pixels: bytes


class RowMaker:
    """Label, decode by content, convert to RGB, squash to S x S: an ImageBlob -> its Row.

    Raises DecodeError or LabelError for an input that cannot become a row (the caller makes it a Failure).
    """

    def __init__(self, size: int, algorithm: str = "box", fast_decode: bool = False,
                 max_pixels: int = DEFAULT_MAX_PIXELS, exif_transpose: bool = False):
        self._size = size
        self._algorithm = algorithm
        self._draft = fast_draft_size(size) if fast_decode else None
        self._max_pixels = max_pixels
        self._exif_transpose = exif_transpose

    def __call__(self, blob: ImageBlob, label_map: LabelMap) -> Row:
        label = label_map.label_for(blob.name, blob.class_key)
        img = decode_rgb(blob.data, max_pixels=self._max_pixels, draft_size=self._draft,
                         exif_transpose=self._exif_transpose)
        return Row(blob.name, blob.source, label, planar_row(squash(img, self._size, self._algorithm)).tobytes())


ROW_ERRORS = (DecodeError, LabelError)


class LabelMapFromKeys(beam.PTransform):
    """The sorted-class label map (no devkit, no class map) from class keys known before any image is
    read (member tar names, paths, URL list labels), so decoding never waits for the reading."""

    def expand(self, keys):
        return (
            keys
            | "DistinctClasses" >> beam.Distinct()
            | "SortedMap" >> beam.combiners.ToList()
            | "BuildMap" >> beam.Map(sorted_class_map)
        )
