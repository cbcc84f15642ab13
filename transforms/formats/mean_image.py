"""The Imagenet32 mean image, computed with tensorflow-transform analyzers inside the job.

The analysis writes `transform_fn/` (a TFT SavedModel) that normalises a row the way the seed's loader
does, `x/255 - mean/255`, so training code can apply it with `tft.TFTransformOutput(DIR)`. The mean put
into the batch files is read back from that same graph, so files and graph can never disagree.

It runs over the staged pieces of the downsample job's first phase, in a pipeline of its own: building
a TFT analysis loads TensorFlow into the launching process, and Beam 2.77's FnApiRunner loses rows when
its multi-process data plane runs in such a process (see pipelines/options.run_pipeline). The result is
checked against exact float64 sums of the same rows, taken in the same read.
"""
from __future__ import annotations

from typing import Optional

import apache_beam as beam
import numpy as np
from imagebeam.transforms.formats.batches import read_staged
from imagebeam.transforms.bookkeeping.fileutil import join

IMAGE_KEY = "image"
TFT_TEMP = ".tft-tmp"


def make_preprocessing_fn():
    """`x/255 - mean/255` with the per-position mean over all train rows, accumulated in float64."""
    import tensorflow as tf
    import tensorflow_transform as tft

    def preprocessing_fn(inputs):
        x = tf.cast(inputs[IMAGE_KEY], tf.float64)
        mean = tft.mean(x, reduce_instance_dims=False, output_dtype=tf.float64)
        return {IMAGE_KEY: tf.cast(x / 255.0 - mean / 255.0, tf.float32)}

    return preprocessing_fn


def publish_transform_fn(written: str, output: str) -> None:
    """Move `transform_fn/` and `transformed_metadata/` from where TFT wrote them into `output` (each a
    single rename of a complete folder; through TensorFlow's filesystems, as TFT's own publishing)."""
    import tensorflow as tf
    import tensorflow_transform as tft

    for name in (tft.TFTransformOutput.TRANSFORMED_METADATA_DIR, tft.TFTransformOutput.TRANSFORM_FN_DIR):
        target = join(output, name)
        if tf.io.gfile.exists(target):
            tf.io.gfile.rmtree(target)
        tf.io.gfile.rename(join(written, name), target, overwrite=True)


def mean_from_transform_fn(transform_output_dir: str, row_size: int) -> np.ndarray:
    """Apply the written graph as users do to an all-zero row: out = -mean/255, so mean = -255 * out."""
    import tensorflow as tf
    import tensorflow_transform as tft

    out = tft.TFTransformOutput(transform_output_dir).transform_raw_features(
        {IMAGE_KEY: tf.zeros([1, row_size], tf.int64)})
    normalised = np.asarray(out[IMAGE_KEY], dtype=np.float64)[0]
    return -255.0 * normalised


SUMS = "sums"


# TFT's analysis holds several copies of a record batch (the int64 Arrow column, its tensor, float64
# casts), so a record batch is bounded in bytes, not only in rows: ~4 MiB of int64 pixels (42 rows at
# 64x64, 170 at 32x32, at most 1024). A fixed figure, not a user knob: how rows are cut into record
# batches is part of how TFT accumulates the float64 mean, so it must not vary between runs.
RECORD_BATCH_BYTES = 4 << 20
MAX_RECORD_BATCH_ROWS = 1024


def record_batch_rows(row_size: int) -> int:
    """Rows per Arrow record batch fed to TFT for rows of `row_size` uint8 values."""
    return max(1, min(MAX_RECORD_BATCH_ROWS, RECORD_BATCH_BYTES // (8 * row_size)))


class _ReadStagedFn(beam.DoFn):
    """A staged piece -> Arrow record batches of int64 pixels (TFT's native input), plus its exact
    float64 column sums and row count on the `sums` output: one read serves both."""

    def __init__(self, row_size: int):
        self._row_size, self._batch_rows = row_size, record_batch_rows(row_size)

    def process(self, path: str):
        import pyarrow as pa

        data = read_staged(path)["data"]
        yield beam.pvalue.TaggedOutput(SUMS, (data.sum(axis=0, dtype=np.float64), len(data)))
        for start in range(0, len(data), self._batch_rows):
            chunk = data[start:start + self._batch_rows].astype(np.int64)
            offsets = pa.array(np.arange(0, (len(chunk) + 1) * self._row_size, self._row_size, dtype=np.int32))
            yield pa.RecordBatch.from_arrays([pa.ListArray.from_arrays(offsets, pa.array(chunk.reshape(-1)))],
                                             [IMAGE_KEY])


class _ExactMeanFn(beam.CombineFn):
    def create_accumulator(self):
        return (None, 0)

    def add_input(self, acc, item):
        total, n = acc
        s, k = item
        return (s if total is None else total + s, n + k)

    def merge_accumulators(self, accs):
        total, n = None, 0
        for s, k in accs:
            if s is not None:
                total = s if total is None else total + s
            n += k
        return (total, n)

    def extract_output(self, acc):
        total, n = acc
        return None if total is None or n == 0 else total / n


class AnalyzeMean(beam.PTransform):
    """Staged batch files -> singleton PCollection of the float64 mean row, from a TFT analyzer.

    Writes `output/transform_fn` + `output/transformed_metadata` (`tft.TFTransformOutput(output)`), reads
    the mean back from that graph, and checks it against exact float64 sums of the same rows (1e-6
    relative): a mean that does not describe the rows in the files is an error, never written.
    """

    def __init__(self, output: str, size: int):
        super().__init__()
        self._output = output
        self._row_size = 3 * size * size
        # TFT's scratch space; the job's last step (write_metadata) removes it. One fixed name per output:
        # a run after a killed one reuses the folder and removes it at the end (a random name per run left
        # the killed run's folder behind for good). TFT writes below it in folders of its own per run.
        self.temp_dir = join(output, TFT_TEMP)

    def expand(self, staged_paths):
        import tensorflow_transform.beam as tft_beam
        from tfx_bsl.tfxio import tensor_adapter

        row_size, output = self._row_size, self._output
        adapter_config = tensor_adapter.TensorAdapterConfig(
            arrow_schema=_arrow_schema(), tensor_representations=_tensor_representations(row_size))
        staged = staged_paths | "ReadStaged" >> beam.ParDo(_ReadStagedFn(row_size)).with_outputs(
            SUMS, main="record_batches")
        record_batches = staged.record_batches
        with tft_beam.Context(temp_dir=self.temp_dir, force_tf_compat_v1=False):
            transform_fn = ((record_batches, adapter_config)
                            | "AnalyzeMean" >> tft_beam.AnalyzeDataset(make_preprocessing_fn()))
            # TFT writes below its path in a visible `transform_tmp/` first: a kill there would leave it in
            # the output. So it writes inside the hidden scratch folder, and the result is moved in after.
            published = join(self.temp_dir, "published")
            written = (transform_fn
                       | "WriteTransformFn" >> tft_beam.WriteTransformFn(published)
                       | "PublishTransformFn" >> beam.Map(lambda _: publish_transform_fn(published, output)))
        exact = staged[SUMS] | "ExactMean" >> beam.CombineGlobally(_ExactMeanFn())
        # Read the mean back from the published graph, the one users will load.
        return written | "ReadMeanBack" >> beam.Map(
            lambda _, exact_mean: checked_mean(mean_from_transform_fn(output, row_size), exact_mean),
            beam.pvalue.AsSingleton(exact))


class MeanMismatch(RuntimeError):
    pass


def checked_mean(tft_mean: np.ndarray, exact_mean: Optional[np.ndarray], rtol: float = 1e-6) -> np.ndarray:
    if exact_mean is None:
        raise MeanMismatch("no training rows: there is no mean to compute")
    worst = float(np.max(np.abs(tft_mean - exact_mean) / np.maximum(np.abs(exact_mean), 1e-12)))
    if worst > rtol:
        raise MeanMismatch(f"the TFT mean differs from the exact float64 mean of the rows by {worst:.3g} "
                           f"(relative), more than {rtol}: rows were lost or corrupted on the way")
    return tft_mean


def _arrow_schema():
    import pyarrow as pa

    return pa.schema([pa.field(IMAGE_KEY, pa.list_(pa.int64()))])


def _tensor_representations(row_size: int):
    from tensorflow_metadata.proto.v0 import schema_pb2

    rep = schema_pb2.TensorRepresentation()
    rep.dense_tensor.column_name = IMAGE_KEY
    rep.dense_tensor.shape.dim.add().size = row_size
    return {IMAGE_KEY: rep}
