"""The portable runner path (what Flink and Spark run): PortableRunner, Beam's job service, SDK workers in
their own processes from a worker pool. Same bytes as the local runner, for downsample and colorize."""
import os

import numpy as np
import pytest

from spec_loader import comparable  # noqa: E402

from imagebeam.pipelines import colorize, downsample

pytestmark = pytest.mark.pipeline


def tree(root, skip=("transform_fn",)):
    """Every file below `root` by relative path (TensorFlow's SavedModel is not byte-stable even locally)."""
    out = {}
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = comparable(name, f.read())
    return out


def assert_same_outputs(a, b):
    left, right = tree(a), tree(b)
    assert sorted(left) == sorted(right)
    different = [name for name in left if left[name] != right[name]]
    assert not different, different


def test_downsample_portable_equals_local(ilsvrc, workdir):
    for split, tar, extra in (("train", ilsvrc.train_tar, ["--batches", "2"]), ("val", ilsvrc.val_tar, [])):
        common = ["--input", tar, "--devkit", ilsvrc.devkit, "--split", split, "--size", "16", *extra]
        local, portable = os.path.join(workdir, f"{split}-local"), os.path.join(workdir, f"{split}-portable")
        downsample.run([*common, "--output", local])
        meta = downsample.run([*common, "--output", portable, "--runner", "portable"])
        assert meta["counts"]["written"] > 0 and (meta["counts"]["failed"] > 0) == (split == "train")  # bad files
        assert_same_outputs(local, portable)
    from imagebeam.transforms.formats.mean_image import mean_from_transform_fn
    means = [mean_from_transform_fn(os.path.join(workdir, f"train-{kind}"), 3 * 16 * 16)
             for kind in ("local", "portable")]
    assert np.array_equal(means[0], means[1])


def test_colorize_portable_equals_local(ilsvrc, workdir):
    common = ["--input", ilsvrc.val_tar, "--inception-weights", "random", "--batch-size", "4",
              "--examples-per-file", "5", "--val-fraction", "0.3"]
    local, portable = os.path.join(workdir, "local"), os.path.join(workdir, "portable")
    colorize.run([*common, "--output", local])
    meta = colorize.run([*common, "--output", portable, "--runner", "portable"])
    assert meta["counts"]["written"] == len(ilsvrc.val) and meta["embedding_size"] == 1001
    assert_same_outputs(local, portable)


@pytest.mark.parametrize("name", ["downsample-train-npz", "downsample-val-pickle", "colorize-val-random"])
def test_portable_outputs_equal_recorded_digests(name, ilsvrc, workdir):
    from test_output_digests import check_case

    check_case(name, ilsvrc, os.path.join(workdir, "out"), ["--runner", "portable"])
