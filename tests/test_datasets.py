"""imagebeam.datasets on small files written here in the project's formats (no pipelines)."""
import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from imagebeam import datasets
from imagebeam.transforms.formats import batches
from imagebeam.transforms.formats.safe_pickle import UnsafePickleError
from spec_loader import normalise, to_nhwc
from test_safe_pickle import py2_dumps


def make_batch(n=5, size=8, seed=0, with_mean=True):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(1, 1001, n)]
    labels[0] = 1  # smallest ILSVRC2012_ID
    mean = rng.random(3 * size * size) * 255 if with_mean else None
    return batches.batch_dict(data, labels, mean)


def write(tmp_path, batch, fmt, name="train_data_batch_1"):
    """The batch file as the project writes it (FinalizeBatches' writers)."""
    writer, ext = batches.WRITERS[fmt]
    path = str(tmp_path / (name + ext))
    with open(path, "wb") as f:
        writer(f, batch)
    return path


@pytest.fixture(params=["pickle", "npz"])
def fmt(request):
    return request.param


def test_shapes_labels_and_mean(tmp_path, fmt):
    batch = make_batch(n=5, size=8)
    out = datasets.load_imagenet_batch(write(tmp_path, batch, fmt))
    assert set(out) == {"x", "y", "mean"}
    assert out["x"].dtype == np.uint8 and out["x"].shape == (5, 8, 8, 3)
    assert out["y"].dtype == np.int64
    np.testing.assert_array_equal(out["y"], np.asarray(batch["labels"]) - 1)
    assert out["y"][0] == 0
    assert out["mean"].dtype == np.float64 and out["mean"].shape == (192,)
    np.testing.assert_array_equal(out["mean"], batch["mean"])
    np.testing.assert_array_equal(out["x"], to_nhwc(batch["data"], 8))  # the seed's np.dstack reshape

    nchw = datasets.load_imagenet_batch(write(tmp_path, batch, fmt), layout="NCHW", size=8)
    assert nchw["x"].shape == (5, 3, 8, 8)
    np.testing.assert_array_equal(nchw["x"], out["x"].transpose(0, 3, 1, 2))


def test_plain_python3_pickle_and_size_32(tmp_path):
    batch = make_batch(n=3, size=32, seed=1)
    path = str(tmp_path / "train_data_batch_2")
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=5)
    out = datasets.load_imagenet_batch(path)
    assert out["x"].shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(out["x"], to_nhwc(batch["data"], 32))


def test_channel_planar_pixel(tmp_path, fmt):
    s = 4
    data = np.zeros((2, 3 * s * s), np.uint8)
    i, j = 1, 3  # row 1, column 3 of image 1
    for c, value in enumerate((10, 20, 30)):
        data[1, c * s * s + i * s + j] = value
    path = write(tmp_path, batches.batch_dict(data, [7, 8], None), fmt, name="val_data")
    x = datasets.load_imagenet_batch(path)["x"]
    assert x[1, i, j].tolist() == [10, 20, 30]
    assert int(x.sum()) == 60 and x[1, j, i].tolist() == [0, 0, 0]
    x = datasets.load_imagenet_batch(path, layout="NCHW")["x"]
    assert x[1, :, i, j].tolist() == [10, 20, 30]


def test_val_file_has_no_mean(tmp_path, fmt):
    batch = make_batch(n=4, with_mean=False)
    path = write(tmp_path, batch, fmt, name="val_data")
    out = datasets.load_imagenet_batch(path)
    assert set(out) == {"x", "y"}
    with pytest.raises(ValueError, match="mean"):
        datasets.load_imagenet_batch(path, subtract_mean=True)
    train_mean = make_batch(n=1)["mean"]
    got = datasets.load_imagenet_batch(path, subtract_mean=True, mean=train_mean)["x"]
    want, _ = normalise(dict(batch, mean=train_mean))
    np.testing.assert_array_equal(got, to_nhwc(want, 8))


def test_mirror_doubles_with_flipped_pixels(tmp_path, fmt):
    batch = make_batch(n=3, size=8)
    path = write(tmp_path, batch, fmt)
    plain = datasets.load_imagenet_batch(path)
    out = datasets.load_imagenet_batch(path, mirror=True)
    x, y = out["x"], out["y"]
    assert x.shape == (6, 8, 8, 3) and y.shape == (6,)
    np.testing.assert_array_equal(x[:3], plain["x"])
    np.testing.assert_array_equal(y, np.concatenate([plain["y"], plain["y"]]))
    for k in range(3):
        for col in range(8):
            np.testing.assert_array_equal(x[3 + k, :, col], plain["x"][k, :, 7 - col])
    nchw = datasets.load_imagenet_batch(path, mirror=True, layout="NCHW")["x"]
    np.testing.assert_array_equal(nchw, x.transpose(0, 3, 1, 2))


def test_subtract_mean_matches_the_seed_loader(tmp_path, fmt):
    batch = make_batch(n=4, size=8, seed=3)
    out = datasets.load_imagenet_batch(write(tmp_path, batch, fmt), subtract_mean=True)
    want_rows, want_y = normalise(batch)  # x/255 - mean/255, float32, in place like the seed
    assert out["x"].dtype == np.float32
    np.testing.assert_array_equal(out["x"], to_nhwc(want_rows, 8))
    np.testing.assert_array_equal(out["y"], want_y)
    pixel = batch["data"][2, 5] / np.float32(255) - batch["mean"][5] / np.float32(255)
    assert out["x"][2, 0, 5, 0] == np.float32(pixel)

    # mirrored after the subtraction, like the seed: flip(x - mean), not flip(x) - mean
    both = datasets.load_imagenet_batch(write(tmp_path, batch, fmt), subtract_mean=True, mirror=True)["x"]
    np.testing.assert_array_equal(both[4:], out["x"][:, :, ::-1, :])


def test_size_is_checked(tmp_path):
    path = write(tmp_path, make_batch(size=8), "pickle")
    assert datasets.load_imagenet_batch(path, size=8)["x"].shape[1:] == (8, 8, 3)
    with pytest.raises(ValueError, match="size=16"):
        datasets.load_imagenet_batch(path, size=16)
    with pytest.raises(ValueError, match="layout"):
        datasets.load_imagenet_batch(path, layout="HWC")
    bad = str(tmp_path / "bad")
    with open(bad, "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [1, 2]}, f)
    with pytest.raises(ValueError, match="3\\*S\\*S"):
        datasets.load_imagenet_batch(bad)


def test_malicious_batch_file_is_refused(tmp_path):
    sentinel = str(tmp_path / "SENTINEL")

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {sentinel}",)

    path = str(tmp_path / "train_data_batch_1")
    with open(path, "wb") as f:
        pickle.dump({"data": np.zeros((1, 192), np.uint8), "labels": [1], "mean": Evil()}, f, protocol=4)
    with pytest.raises(UnsafePickleError):
        datasets.load_imagenet_batch(path)
    assert not os.path.exists(sentinel)


# --- CIFAR -------------------------------------------------------------------------------------------


def test_cifar_processed_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    saved = {  # as seed 003 saves it: NHWC uint8, np.array labels, bytes names, HIGHEST_PROTOCOL
        "train_dataset": rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
        "train_labels": np.array([3, 1, 4, 1, 5, 9]),
        "test_dataset": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
        "test_labels": np.array([2, 6]),
        "label_names": [b"apple", b"aquarium_fish"] + [f"class_{i}".encode() for i in range(98)],
    }
    path = str(tmp_path / "CIFAR_100_processed.pickle")
    with open(path, "wb") as f:
        pickle.dump(saved, f, pickle.HIGHEST_PROTOCOL)
    out = datasets.load_cifar_processed(path)
    assert set(out) == set(saved)
    for key in ("train_dataset", "test_dataset", "train_labels", "test_labels"):
        np.testing.assert_array_equal(out[key], saved[key])
    assert out["train_dataset"].dtype == np.uint8 and out["train_labels"].dtype == np.int64
    assert out["label_names"][:2] == ["apple", "aquarium_fish"] and len(out["label_names"]) == 100

    mirrored = datasets.load_cifar_processed(path, mirror=True)
    assert mirrored["train_dataset"].shape == (12, 32, 32, 3)
    np.testing.assert_array_equal(mirrored["train_dataset"][6:], saved["train_dataset"][:, :, ::-1, :])
    np.testing.assert_array_equal(mirrored["train_labels"], np.tile(saved["train_labels"], 2))
    np.testing.assert_array_equal(mirrored["test_dataset"], saved["test_dataset"])


def cifar100_files(rng, n_train=7, n_test=3):
    def part(n, label):
        return {b"filenames": [f"img_{i}.png".encode() for i in range(n)], b"batch_label": label,
                b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
                b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
    meta = {b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]}
    return {"train": part(n_train, b"training batch 1 of 1"), "test": part(n_test, b"testing batch 1 of 1"),
            "meta": meta}


def cifar10_files(rng):
    files = {}
    for i in range(1, 6):
        n = 2 + i % 2
        files[f"data_batch_{i}"] = {b"batch_label": f"training batch {i} of 5".encode(),
                                    b"labels": [int(v) for v in rng.integers(0, 10, n)],
                                    b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                    b"filenames": [b"x.png"] * n}
    files["test_batch"] = {b"batch_label": b"testing batch 1 of 1", b"labels": [1, 2],
                           b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"filenames": [b"y.png"] * 2}
    files["batches.meta"] = {b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog",
                                              b"frog", b"horse", b"ship", b"truck"],
                             b"num_cases_per_batch": 10000, b"num_vis": 3072}
    return files


def cifar_images(data):
    """The reference reshape (seed 003): (-1, 3, 32, 32) then (0, 2, 3, 1)."""
    return np.reshape(data, (-1, 3, 32, 32)).transpose((0, 2, 3, 1))


def write_tar_gz(path, folder, files):
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(folder)
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, obj in list(files.items()) + [("file.txt~", None)]:
            data = py2_dumps(obj) if obj is not None else b"notes"
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_dir(root, folder, files):
    os.makedirs(os.path.join(root, folder))
    for name, obj in files.items():
        with open(os.path.join(root, folder, name), "wb") as f:
            f.write(py2_dumps(obj))


def test_cifar100_tar_gz(tmp_path):
    files = cifar100_files(np.random.default_rng(11))
    path = str(tmp_path / "cifar-100-python.tar.gz")
    write_tar_gz(path, "cifar-100-python", files)
    for split in ("train", "test"):
        x, fine, coarse, names = datasets.load_cifar_python(path, split)
        part = files[split]
        assert x.dtype == np.uint8 and x.shape == (len(part[b"fine_labels"]), 32, 32, 3)
        np.testing.assert_array_equal(x, cifar_images(part[b"data"]))
        assert fine.dtype == np.int64 and fine.tolist() == part[b"fine_labels"]
        assert coarse.dtype == np.int64 and coarse.tolist() == part[b"coarse_labels"]
        assert names == [f"fine_{i}" for i in range(100)]
    pixel = files["train"][b"data"][4]  # image 4, row 2, column 9, by hand from the R, G, B planes
    assert datasets.load_cifar_python(path)[0][4, 2, 9].tolist() == [
        pixel[2 * 32 + 9], pixel[1024 + 2 * 32 + 9], pixel[2048 + 2 * 32 + 9]]


def test_cifar100_directory(tmp_path):
    files = cifar100_files(np.random.default_rng(12))
    write_dir(str(tmp_path), "cifar-100-python", files)
    for where in (str(tmp_path), str(tmp_path / "cifar-100-python")):
        x, fine, coarse, names = datasets.load_cifar_python(where, "train")
        np.testing.assert_array_equal(x, cifar_images(files["train"][b"data"]))
        assert coarse.tolist() == files["train"][b"coarse_labels"]


def test_cifar10_directory_and_tar_gz(tmp_path):
    files = cifar10_files(np.random.default_rng(13))
    write_dir(str(tmp_path), "cifar-10-batches-py", files)
    archive = str(tmp_path / "cifar-10-python.tar.gz")
    write_tar_gz(archive, "cifar-10-batches-py", files)
    train_parts = [files[f"data_batch_{i}"] for i in range(1, 6)]  # in order 1..5
    want_x = cifar_images(np.concatenate([p[b"data"] for p in train_parts]))
    want_y = [v for p in train_parts for v in p[b"labels"]]
    for where in (str(tmp_path), str(tmp_path / "cifar-10-batches-py"), archive):
        x, labels, coarse, names = datasets.load_cifar_python(where)
        np.testing.assert_array_equal(x, want_x)
        assert labels.dtype == np.int64 and labels.tolist() == want_y
        assert coarse is None
        assert names[:3] == ["airplane", "automobile", "bird"] and len(names) == 10
        x, labels, _, _ = datasets.load_cifar_python(where, split="test")
        np.testing.assert_array_equal(x, cifar_images(files["test_batch"][b"data"]))
        assert labels.tolist() == [1, 2]


def test_cifar_errors(tmp_path):
    with pytest.raises(ValueError, match="split"):
        datasets.load_cifar_python(str(tmp_path), split="val")
    with pytest.raises(ValueError, match="no CIFAR"):
        datasets.load_cifar_python(str(tmp_path))
    evil_dir = tmp_path / "cifar-100-python"
    evil_dir.mkdir()
    sentinel = str(tmp_path / "SENTINEL")
    (evil_dir / "meta").write_bytes(f"cposix\nsystem\n(Vtouch {sentinel}\ntR.".encode())
    (evil_dir / "train").write_bytes(py2_dumps(cifar100_files(np.random.default_rng(0))["train"]))
    with pytest.raises(UnsafePickleError):
        datasets.load_cifar_python(str(tmp_path))
    assert not os.path.exists(sentinel)

