"""Regression: no row may vanish between decoding and the files at a scale where Beam buffers a lot.

With an earlier layout (TFT's analyzer reading the rows PCollection beside the shuffle), Beam 2.77's
FnApiRunner in multi-process mode dropped a few percent of 100,000 rows without any error. This runs
the train tail of the downsample job (AssignBatches -> AnalyzeMean (TFT) -> GroupBatches) on 100,000
synthetic rows and checks every row and the mean.
"""
import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from imagebeam.pipelines import options
from imagebeam.transforms.batches import AssignBatches, GroupBatches, batch_sizes
from imagebeam.transforms.rows import Row
from imagebeam.transforms.stats import AnalyzeMean

pytestmark = pytest.mark.pipeline

N = 100_000
SIZE = 32


def expected_mean() -> np.ndarray:
    idx = (np.arange(3 * SIZE * SIZE)[None, :] + np.arange(N)[:, None]) % 251
    return idx.mean(axis=0)


def test_hundred_thousand_rows_all_arrive(tmp_path):
    def make_row(i: int) -> Row:  # local: shipped to the SDK workers by value
        pixels = ((np.arange(3 * SIZE * SIZE) + i) % 251).astype(np.uint8)
        return Row(f"c{i % 10}/img{i}", "src", i % 10 + 1, pixels.tobytes())

    opts = PipelineOptions(options.beam_args_with_defaults(["--direct_num_workers", "2"]))
    with beam.Pipeline(options=opts) as p:
        rows = (p | beam.Create(list(range(N)), reshuffle=False) | beam.Reshuffle()
                | beam.Map(make_row))
        assigned = rows | AssignBatches(10, seed=0)
        mean = assigned | AnalyzeMean(str(tmp_path), SIZE)
        sizes = (assigned | GroupBatches(10)
                 | beam.MapTuple(lambda index, batch: (index, len(batch), len({r.name for r in batch}))))
        assert_that(sizes, equal_to([(i, n, n) for i, n in enumerate(batch_sizes(N, 10))]), label="Sizes")
        want = expected_mean()
        assert_that(mean | beam.Map(lambda m: bool(np.allclose(m, want, rtol=1e-6))), equal_to([True]),
                    label="Mean")
