"""Regression: no row may vanish between decoding and the files at a scale where Beam buffers a lot.

Beam 2.77's FnApiRunner silently lost a few percent of 100,000 rows when TensorFlow was loaded in the
runner's process (the launcher), which building a TFT analysis does. The train job now keeps TensorFlow
out of every multi-process pipeline's launcher (options.run_pipeline). This drives both phases of the
train job at that scale (100,000 rows of 32x32x3) from this pytest process, which by now has usually
imported TensorFlow itself, and checks every row and the mean.
"""
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.util import assert_that, equal_to

from imagebeam.pipelines import options
from imagebeam.transforms.batches import (FinalizeBatches, ShuffleIntoBuckets, WriteBatches, batch_sizes,
                                          pieces_per_batch)
from imagebeam.transforms.rows import Row
from imagebeam.transforms.stats import AnalyzeMean, MeanMismatch, checked_mean
from spec_loader import load_npz

N = 100_000
SIZE = 32


def test_checked_mean_refuses_a_mean_that_does_not_fit_the_rows():
    exact = np.array([100.0, 50.0])
    np.testing.assert_array_equal(checked_mean(exact * (1 + 1e-8), exact), exact * (1 + 1e-8))
    with pytest.raises(MeanMismatch, match="rows were lost"):
        checked_mean(np.array([100.0, 50.1]), exact)
    with pytest.raises(MeanMismatch, match="no training rows"):
        checked_mean(exact, None)


def make_row(i: int) -> Row:
    pixels = ((np.arange(3 * SIZE * SIZE) + i) % 251).astype(np.uint8)
    return Row(f"c{i % 10}/img{i}", "src", i % 10 + 1, pixels.tobytes())


def build_rows_to_staging(p, staging: str) -> None:
    rows = p | beam.Create(list(range(N)), reshuffle=False) | beam.Reshuffle() | beam.Map(make_row)
    buckets, counts = rows | ShuffleIntoBuckets(seed=0, buckets=80)
    files = buckets | WriteBatches(staging, "npz", SIZE, True, 10, counts)
    per_batch = files | beam.Map(lambda f: (f["batch"], f["rows"])) | beam.CombinePerKey(sum)
    assert_that(per_batch, equal_to(list(enumerate(batch_sizes(N, 10)))))


def build_mean_phase(p, staging: str, final: str) -> None:
    pieces = pieces_per_batch(os.listdir(staging), staging, 10)
    staged = p | "Paths" >> beam.Create([path for _, paths in pieces for path in paths])
    mean = staged | AnalyzeMean(final, SIZE)
    _ = p | "Pieces" >> beam.Create(pieces) | FinalizeBatches(final, "npz", mean)


@pytest.mark.pipeline
def test_hundred_thousand_rows_all_arrive(tmp_path):
    import tensorflow  # noqa: F401  the launcher has TensorFlow loaded, as after any TFT phase

    staging, final = str(tmp_path / "staging"), str(tmp_path / "final")
    opts = PipelineOptions(options.beam_args_with_defaults(["--direct_num_workers", "2"]))
    options.run_pipeline(build_rows_to_staging, opts, staging)
    options.run_pipeline(build_mean_phase, options.in_process(opts), staging, final, isolate=True)

    batches = [load_npz(os.path.join(final, f"train_data_batch_{k}.npz")) for k in range(1, 11)]
    assert [len(b["labels"]) for b in batches] == batch_sizes(N, 10)
    first = np.concatenate([b["data"][:, 0] for b in batches]).astype(np.int64)
    assert np.bincount(first, minlength=251).tolist() == np.bincount(np.arange(N) % 251).tolist()
    idx = (np.arange(3 * SIZE * SIZE)[None, :] + np.arange(N)[:, None]) % 251
    np.testing.assert_allclose(batches[0]["mean"], idx.mean(axis=0), rtol=1e-6)


@pytest.mark.pipeline
def test_downsample_keeps_tensorflow_out_of_the_launcher(ilsvrc, tmp_path):
    """A fresh interpreter runs a whole train job: afterwards TensorFlow must not be loaded in it."""
    import subprocess
    import sys

    code = (
        "import sys; from imagebeam.pipelines import downsample\n"
        f"downsample.run(['--input', {ilsvrc.train_tar!r}, '--devkit', {ilsvrc.devkit!r}, "
        f"'--output', {str(tmp_path / 'out')!r}, '--size', '8', '--direct_num_workers', '2'])\n"
        "print('TF_LOADED', 'tensorflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "TF_LOADED False" in out.stdout
    assert os.path.exists(tmp_path / "out" / "transform_fn")
