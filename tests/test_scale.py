"""At scale: 100,000 small real-photo images through the downsample job in a subprocess, its whole process
tree's RSS sampled, every row accounted for and the peak within the memory goal (issue 13): under 3 GiB
plus the largest output file, whatever the number of inputs, since no image data crosses a runner shuffle.

Also the TensorFlow guard: Beam 2.77's FnApiRunner silently lost rows when TensorFlow was loaded in the
runner's process (the launcher), which building a TFT analysis does, so the train job keeps TensorFlow
out of every multi-process pipeline's launcher (options.run_pipeline).
"""
import os

import numpy as np
import pytest

from imagebeam.transforms.formats.batches import batch_sizes
from imagebeam.transforms.formats.mean_image import MeanMismatch, checked_mean
from spec_loader import unpickle

N = 100_000
SIZE = 8


def test_checked_mean_refuses_a_mean_that_does_not_fit_the_rows():
    exact = np.array([100.0, 50.0])
    np.testing.assert_array_equal(checked_mean(exact * (1 + 1e-8), exact), exact * (1 + 1e-8))
    with pytest.raises(MeanMismatch, match="rows were lost"):
        checked_mean(np.array([100.0, 50.1]), exact)
    with pytest.raises(MeanMismatch, match="no training rows"):
        checked_mean(exact, None)


def build_small_images_tar(path: str, classes: int, per_class: int) -> None:
    """An ILSVRC-style nested tar of `classes` member tars of distinct 16x16 JPEG crops of real photos."""
    import io
    import random
    import tarfile

    from PIL import Image

    from imagebeam import sample as sample_lib

    photos = [p.convert("RGB") for p in sample_lib.load_photos()]
    rng = random.Random(0)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as outer:
        for c in range(classes):
            inner_buf = io.BytesIO()
            with tarfile.open(fileobj=inner_buf, mode="w", format=tarfile.USTAR_FORMAT) as inner:
                for i in range(per_class):
                    photo = photos[rng.randrange(len(photos))]
                    x, y = rng.randrange(photo.width - 48), rng.randrange(photo.height - 48)
                    side = rng.choice((16, 24, 32, 48))
                    buf = io.BytesIO()
                    photo.crop((x, y, x + side, y + side)).resize((16, 16), Image.BOX).save(buf, "JPEG", quality=90)
                    sample_lib.add_bytes(inner, f"n{c:08d}_{i}.JPEG", buf.getvalue())
            sample_lib.add_bytes(outer, f"n{c:08d}.tar", inner_buf.getvalue())


@pytest.mark.pipeline
def test_hundred_thousand_images_in_bounded_memory(tmp_path):
    import json
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "benchmarks"))
    from common import run_measured

    tar, out = str(tmp_path / "train.tar"), str(tmp_path / "out")
    build_small_images_tar(tar, classes=100, per_class=N // 100)
    measured = run_measured([sys.executable, "-m", "imagebeam.cli", "downsample", "--input", tar, "--output", out,
                             "--size", str(SIZE), "--batches", "10", "--direct_num_workers", "2"])
    with open(os.path.join(out, "metadata.json")) as f:
        meta = json.load(f)
    assert meta["counts"] == {"read": N, "written": N, "failed": 0}
    batches = [unpickle(os.path.join(out, f"train_data_batch_{k}")) for k in range(1, 11)]
    assert [len(b["labels"]) for b in batches] == batch_sizes(N, 10)
    labels = np.concatenate([b["labels"] for b in batches])
    assert np.bincount(labels).tolist() == [0] + [N // 100] * 100  # every image once, labels 1..100
    data = np.concatenate([b["data"] for b in batches])
    np.testing.assert_allclose(batches[0]["mean"], data.mean(axis=0, dtype=np.float64), rtol=1e-6)  # as the job checks
    largest = max(os.path.getsize(os.path.join(out, f"train_data_batch_{k}")) for k in range(1, 11))
    goal = 3 * 2 ** 30 + largest
    print(f"100,000 images: peak RSS of the process tree {measured.peak_rss / 2 ** 30:.2f} GiB "
          f"(goal < {goal / 2 ** 30:.2f} GiB), {measured.wall:.0f} s")
    assert measured.peak_rss < goal


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
