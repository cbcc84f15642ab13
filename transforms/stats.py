"""The Imagenet32 mean image, computed with tensorflow-transform analyzers inside the pipeline.

The analysis writes `transform_fn/` (a TFT SavedModel) that normalises a row the way the seed's loader
does, `x/255 - mean/255`, so training code can apply it with `tft.TFTransformOutput(DIR)`. The mean put
into the batch files is read back from that same graph, so files and graph can never disagree.
"""
from __future__ import annotations

import uuid

import apache_beam as beam
import numpy as np
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from imagebeam.transforms.fileutil import join

IMAGE_KEY = "image"
TFT_TEMP_PREFIX = ".tft-tmp-"


def make_preprocessing_fn():
    """`x/255 - mean/255` with the per-position mean over all train rows, accumulated in float64."""
    import tensorflow as tf
    import tensorflow_transform as tft

    def preprocessing_fn(inputs):
        x = tf.cast(inputs[IMAGE_KEY], tf.float64)
        mean = tft.mean(x, reduce_instance_dims=False, output_dtype=tf.float64)
        return {IMAGE_KEY: tf.cast(x / 255.0 - mean / 255.0, tf.float32)}

    return preprocessing_fn


def mean_from_transform_fn(transform_output_dir: str, row_size: int) -> np.ndarray:
    """Apply the written graph as users do to an all-zero row: out = -mean/255, so mean = -255 * out."""
    import tensorflow as tf
    import tensorflow_transform as tft

    out = tft.TFTransformOutput(transform_output_dir).transform_raw_features(
        {IMAGE_KEY: tf.zeros([1, row_size], tf.int64)})
    normalised = np.asarray(out[IMAGE_KEY], dtype=np.float64)[0]
    return -255.0 * normalised


class _RowsToRecordBatches(beam.DoFn):
    """Rows -> Arrow record batches of int64 pixels: TFT's native input, far cheaper than instance dicts."""

    def __init__(self, row_size: int, batch_rows: int = 1024):
        self._row_size, self._batch_rows = row_size, batch_rows

    def start_bundle(self):
        self._buffer = []

    def process(self, row):
        self._buffer.append(row.pixels)
        if len(self._buffer) >= self._batch_rows:
            yield self._flush()

    def finish_bundle(self):
        if self._buffer:
            yield WindowedValue(self._flush(), GlobalWindow().max_timestamp(), [GlobalWindow()])

    def _flush(self):
        import pyarrow as pa

        pixels = np.frombuffer(b"".join(self._buffer), dtype=np.uint8).astype(np.int64)
        n = len(self._buffer)
        self._buffer = []
        offsets = pa.array(np.arange(0, (n + 1) * self._row_size, self._row_size, dtype=np.int32))
        column = pa.ListArray.from_arrays(offsets, pa.array(pixels))
        return pa.RecordBatch.from_arrays([column], [IMAGE_KEY])


class AnalyzeMean(beam.PTransform):
    """(batch index, (key, row)) -> singleton PCollection holding the float64 mean row.

    Also writes `output/transform_fn` + `output/transformed_metadata` (tft.TFTransformOutput(output)).
    It consumes the rows after batch assignment, in the same fused stage as the grouping: with Beam
    2.77's FnApiRunner in multi-process mode, giving a large buffered PCollection a second consumer
    stage next to TFT's analyzer stages was seen to drop elements (see tests/test_downsample.py).
    """

    def __init__(self, output: str, size: int):
        super().__init__()
        self._output = output
        self._row_size = 3 * size * size
        # TFT's scratch space; the job's last step (WriteMetadata) removes it.
        self.temp_dir = join(output, f"{TFT_TEMP_PREFIX}{uuid.uuid4().hex}")

    def expand(self, assigned):
        import tensorflow_transform.beam as tft_beam
        from tfx_bsl.tfxio import tensor_adapter

        row_size = self._row_size
        adapter_config = tensor_adapter.TensorAdapterConfig(
            arrow_schema=_arrow_schema(), tensor_representations=_tensor_representations(row_size))
        record_batches = (assigned
                          | "Rows" >> beam.Map(lambda item: item[1][1])
                          | "ToRecordBatches" >> beam.ParDo(_RowsToRecordBatches(row_size)))
        with tft_beam.Context(temp_dir=self.temp_dir, force_tf_compat_v1=False):
            transform_fn = ((record_batches, adapter_config)
                            | "AnalyzeMean" >> tft_beam.AnalyzeDataset(make_preprocessing_fn()))
            written = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(self._output)
        # Read the mean back from the published graph, the one users will load.
        output = self._output
        return written | "ReadMeanBack" >> beam.Map(lambda _: mean_from_transform_fn(output, row_size))


def _arrow_schema():
    import pyarrow as pa

    return pa.schema([pa.field(IMAGE_KEY, pa.list_(pa.int64()))])


def _tensor_representations(row_size: int):
    from tensorflow_metadata.proto.v0 import schema_pb2

    rep = schema_pb2.TensorRepresentation()
    rep.dense_tensor.column_name = IMAGE_KEY
    rep.dense_tensor.shape.dim.add().size = row_size
    return {IMAGE_KEY: rep}
