"""Batch sizes, seeded shuffle keys and the npz/pickle sinks, without a pipeline."""
import io
import pickle

import numpy as np
import pytest

from imagebeam.transforms.formats import batches
from imagebeam.transforms.bookkeeping import staging
from imagebeam.transforms.imaging.rows import Row


def test_imagenet_batch_sizes_from_spec():
    sizes = batches.batch_sizes(1_281_167, 10)
    assert sizes[:9] == [128_116] * 9 and sizes[9] == 128_123 and sum(sizes) == 1_281_167
    assert batches.batch_sizes(7, 10) == [0] * 9 + [7]
    assert batches.batch_of_rank(128_116 * 9, 1_281_167, 10) == 9
    assert batches.batch_of_rank(1_281_166, 1_281_167, 10) == 9


@pytest.mark.parametrize("n", [0, 3, 10, 57, 1000])
def test_bucket_pieces_give_exact_batch_sizes_in_key_order(n, tmp_path):
    """Rows staged in three sorted runs, planned and merged per bucket: exact batch sizes, one permutation."""
    rows = [Row(f"img{i}", "src", 1, bytes([i % 256]) * 3) for i in range(n)]
    runs = [[], [], []]
    for i, r in enumerate(rows):
        key = batches.shuffle_key(0, r.name)
        runs[i % 3].append((batches.bucket_of(key, 16), batches.row_sort_key(key, r), batches.pack_row(key, r)))
    summaries = []
    for k, entries in enumerate(runs):
        path = str(tmp_path / f"run{k}")
        summaries.append({"run": path, "buckets": staging.write_run(path, entries) if entries else []})
    sizes = [0] * 10
    order = []
    for task in staging.plan_buckets(summaries):
        packed = [payload for _, payload in staging.read_bucket(task)]
        for batch, piece in batches.split_bucket(task.offset, task.total, packed, 10):
            sizes[batch] += len(piece)
            order += [(batch, batches.unpack_row(p)[0]) for p in piece]
    assert sizes == batches.batch_sizes(n, 10)
    assert order == sorted(order) and len(order) == n  # batches in order, keys ascending: one permutation


def test_row_sort_key_orders_like_key_then_file_name_path_source():
    rows = [Row("b/x.JPEG", "s2", 1, b""), Row("a/x.JPEG", "s2", 1, b""), Row("a/x.JPEG", "s1", 1, b""),
            Row("a/xa.JPEG", "s1", 1, b""), Row("z/w.JPEG", "s1", 1, b"")]
    key = b"k" * 16
    by_bytes = sorted(rows, key=lambda r: batches.row_sort_key(key, r))
    by_tuple = sorted(rows, key=lambda r: (key, r.name.rsplit("/", 1)[-1], r.name, r.source))
    assert by_bytes == by_tuple


def test_packed_rows_round_trip():
    row = Row("n01440764/ü.JPEG", "/data/train.tar", 449, bytes(range(12)))
    key = batches.shuffle_key(3, row.name)
    assert batches.unpack_row(batches.pack_row(key, row)) == (key, row.name, row.source, 449, row.pixels)


def test_shuffle_key_depends_on_seed_and_name_only():
    a = batches.shuffle_key(0, "n1/x.JPEG")
    assert a == batches.shuffle_key(0, "n1/x.JPEG") and len(a) == 16
    assert a != batches.shuffle_key(1, "n1/x.JPEG")
    order0 = sorted(range(100), key=lambda i: batches.shuffle_key(0, str(i)))
    order1 = sorted(range(100), key=lambda i: batches.shuffle_key(1, str(i)))
    assert order0 != order1 and order0 != list(range(100))


def _rows(n, size=8):
    rng = np.random.default_rng(0)
    return [batches.pack_row(b"k" * 16, Row(f"r{i}", "s", int(i % 5) + 1,
                                            rng.integers(0, 256, 3 * size * size, dtype=np.uint8).tobytes()))
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


@pytest.mark.parametrize("rows,size", [(0, 3072), (1, 12), (3, 80), (5, 12288), (100, 3072), (2500, 192)])
def test_streamed_pickle_is_byte_for_byte_pickle_dump(rows, size):
    """Short, framed and large (unframed) byte strings, labels over APPENDS' 1000-item batches."""
    import apache_beam  # noqa: F401 - dill is loaded, as in a job, and re-registers pickler functions

    rng = np.random.default_rng(rows)
    data = rng.integers(0, 256, (rows, size), dtype=np.uint8)
    for mean in (None, rng.random(size)):
        batch = batches.batch_dict(data, [int(v) for v in rng.integers(0, 1000, rows)], mean)
        f = io.BytesIO()
        batches.write_pickle(f, batch)
        assert f.getvalue() == pickle.dumps(batch, protocol=4)


def test_streamed_pickle_does_not_copy_the_pixels():
    """numpy's own pickling copies the array into one bytes object (1.57 GB for an Imagenet64 batch)."""
    import tracemalloc

    class Sink(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            return len(memoryview(b))

    data = np.ones((2000, 12288), np.uint8)  # 24.6 MB
    batch = batches.batch_dict(data, [1] * 2000, np.zeros(12288))
    tracemalloc.start()
    try:
        batches.write_pickle(Sink(), batch)
        streamed = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        pickle.dump(batch, Sink(), protocol=4)
        copied = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert copied > data.nbytes  # the reference does copy (so this measure sees copies)
    assert streamed < data.nbytes // 10
