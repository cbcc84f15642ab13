"""Batch sizes, seeded shuffle keys and the npz/pickle sinks, without a pipeline."""
import io
import pickle

import numpy as np
import pytest

from imagebeam.transforms import batches
from imagebeam.transforms.rows import Row


def test_imagenet_batch_sizes_from_spec():
    sizes = batches.batch_sizes(1_281_167, 10)
    assert sizes[:9] == [128_116] * 9 and sizes[9] == 128_123 and sum(sizes) == 1_281_167
    assert batches.batch_sizes(7, 10) == [0] * 9 + [7]


@pytest.mark.parametrize("n", [0, 3, 10, 57, 1000])
def test_boundaries_give_exact_batch_sizes(n):
    keys = sorted(batches.shuffle_key(0, f"img{i}", "src") for i in range(n))
    bounds = batches.boundaries(keys, 10)
    counts = np.bincount([min(len(bounds), __import__("bisect").bisect_right(bounds, k)) for k in keys],
                         minlength=10)
    assert list(counts) == batches.batch_sizes(n, 10)


def test_shuffle_key_depends_on_seed_and_name_only():
    a = batches.shuffle_key(0, "n1/x.JPEG", "/a/train.tar")
    assert a == batches.shuffle_key(0, "n1/x.JPEG", "/a/train.tar")
    assert a[0] == batches.shuffle_key(0, "n1/x.JPEG", "/elsewhere/train.tar")[0]
    assert a[0] != batches.shuffle_key(1, "n1/x.JPEG", "/a/train.tar")[0]
    order0 = sorted(range(100), key=lambda i: batches.shuffle_key(0, str(i), ""))
    order1 = sorted(range(100), key=lambda i: batches.shuffle_key(1, str(i), ""))
    assert order0 != order1 and order0 != list(range(100))


def _rows(n, size=8):
    rng = np.random.default_rng(0)
    return [Row(f"r{i}", "s", int(i % 5) + 1, rng.integers(0, 256, 3 * size * size, dtype=np.uint8).tobytes())
            for i in range(n)]


def test_npz_is_plain_arrays_and_byte_stable():
    rows = _rows(6)
    d = batches.batch_dict(*batches.rows_to_arrays(rows, 192), np.arange(192, dtype=np.float64))
    out1, out2 = io.BytesIO(), io.BytesIO()
    batches.write_npz(out1, d)
    batches.write_npz(out2, d)
    assert out1.getvalue() == out2.getvalue()
    out1.seek(0)
    with np.load(out1, allow_pickle=False) as z:
        assert sorted(z.files) == ["data", "labels", "mean"]
        assert z["data"].dtype == np.uint8 and z["data"].shape == (6, 192)
        assert z["labels"].tolist() == [1, 2, 3, 4, 5, 1]
        assert z["mean"].dtype == np.float64


def test_pickle_holds_spec_types():
    d = batches.batch_dict(*batches.rows_to_arrays(_rows(3), 192), None)
    buf = io.BytesIO()
    batches.write_pickle(buf, d)
    loaded = pickle.loads(buf.getvalue())
    assert set(loaded) == {"data", "labels"}
    assert isinstance(loaded["labels"], list) and all(type(v) is int for v in loaded["labels"])
    assert loaded["data"].dtype == np.uint8
