"""`imagebeam cifar` on CIFAR-format archives built from real photos; OpenCV is the sharpening oracle."""
import io
import json
import os
import pickle
import tarfile

import cv2
import numpy as np
import pytest

from imagebeam import sample as sample_lib
from imagebeam.pipelines import cifar as cifar_job
from imagebeam.transforms.formats import cifar

SEED_KERNEL = (-1 / 256.0) * np.array([[1, 4, 6, 4, 1], [4, 16, 24, 16, 4], [6, 24, -476, 24, 6],
                                       [4, 16, 24, 16, 4], [1, 4, 6, 4, 1]])


def oracle(images: np.ndarray) -> np.ndarray:
    return np.stack([cv2.filter2D(img, -1, SEED_KERNEL) for img in images])


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    return sample_lib.write_cifar_archive(str(tmp_path_factory.mktemp("c100") / "cifar-100-python.tar.gz"))


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("c10")
    info = sample_lib.write_cifar_archive(str(root / "cifar-10-python.tar.gz"), "cifar10", 8, 10, seed=4)
    with tarfile.open(info["path"]) as tar:
        tar.extractall(root / "extracted", filter="data")
    info["dir"] = str(root / "extracted")
    return info


# --- pure functions --------------------------------------------------------------------------------------

def test_sharpen_equals_opencv_exactly():
    real = sample_lib.cifar_images(40, seed=9)
    noise = np.random.default_rng(1).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    extremes = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    extremes[0, ::2] = 255  # stripes: saturation both ways
    extremes[1] = 255
    binary = np.random.default_rng(2).choice(np.array([0, 255], np.uint8), (40, 32, 32, 3))  # blur at its bounds
    for images in (real, noise, extremes, binary):
        assert np.array_equal(cifar.sharpen(images), oracle(images))
    for shape in ((7, 9, 3), (3, 3, 3), (64, 48, 3)):  # other sizes: the borders are reflected the same way
        image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
        assert np.array_equal(cifar.sharpen(image), cv2.filter2D(image, -1, SEED_KERNEL))
    assert np.array_equal(cifar.sharpen(real[0]), oracle(real[:1])[0])
    assert np.allclose(cifar.SHARPEN_KERNEL, SEED_KERNEL)


def test_layouts_and_safe_reading(cifar100, cifar10_dir):
    layout = cifar.find_layout(cifar100["path"])
    assert layout.variant == "cifar100" and layout.archive and layout.batches("train") == ("train",)
    assert cifar.label_names(layout) == cifar100["label_names"]
    images = list(cifar.batch_images(layout, "train", 0, cifar.read_member(layout, "train")))
    assert np.array_equal(np.stack([np.frombuffer(i.pixels, np.uint8).reshape(32, 32, 3) for i in images]),
                          cifar100["train_images"])
    assert [i.label for i in images] == cifar100["train_labels"]
    folder = cifar.find_layout(cifar10_dir["dir"])
    assert folder.variant == "cifar10" and not folder.archive and len(folder.batches("train")) == 5
    with pytest.raises(ValueError, match="no CIFAR"):
        cifar.find_layout(os.path.dirname(cifar10_dir["dir"]) + "/nowhere")


# --- the job -----------------------------------------------------------------------------------------------

def load(path):
    with open(path, "rb") as f:
        return pickle.load(f)


@pytest.mark.pipeline
def test_cifar100_processed_pickle(cifar100, workdir):
    out = os.path.join(workdir, "a")
    meta = cifar_job.run(["--input", cifar100["path"], "--output", out, "--seed", "3"])
    got = load(os.path.join(out, "CIFAR_100_processed.pickle"))
    assert set(got) == {"train_dataset", "train_labels", "test_dataset", "test_labels", "label_names"}
    n_train, n_test = len(cifar100["train_labels"]), len(cifar100["test_labels"])
    assert got["train_dataset"].shape == (n_train, 32, 32, 3) and got["train_dataset"].dtype == np.uint8
    assert got["test_dataset"].shape == (n_test, 32, 32, 3) and got["label_names"] == cifar100["label_names"]
    # test: original order, sharpened exactly as cv2.filter2D
    assert np.array_equal(got["test_dataset"], oracle(cifar100["test_images"]))
    assert got["test_labels"].tolist() == cifar100["test_labels"]
    # train: a permutation of (sharpened image, label) pairs, not the original order
    sharpened = oracle(cifar100["train_images"])
    original = {sharpened[i].tobytes(): cifar100["train_labels"][i] for i in range(n_train)}
    pairs = [(img.tobytes(), int(lab)) for img, lab in zip(got["train_dataset"], got["train_labels"])]
    assert sorted(pairs) == sorted(original.items())
    assert [p[0] for p in pairs] != [sharpened[i].tobytes() for i in range(n_train)]
    assert meta["counts"] == {"read": n_train + n_test, "written": n_train + n_test, "failed": 0}

    # the same seed gives the same bytes; another seed another order; --no-sharpen keeps the pixels
    again = os.path.join(workdir, "b")
    cifar_job.run(["--input", cifar100["path"], "--output", again, "--seed", "3",  # 2 processes, not in-process
                   "--direct_running_mode", "multi_processing", "--direct_num_workers", "2"])
    with open(os.path.join(out, "CIFAR_100_processed.pickle"), "rb") as a, \
            open(os.path.join(again, "CIFAR_100_processed.pickle"), "rb") as b:
        assert a.read() == b.read()
    other = os.path.join(workdir, "c")
    cifar_job.run(["--input", cifar100["path"], "--output", other, "--seed", "4", "--no-sharpen"])
    plain = load(os.path.join(other, "CIFAR_100_processed.pickle"))
    assert plain["train_labels"].tolist() != got["train_labels"].tolist()
    assert sorted(i.tobytes() for i in plain["train_dataset"]) == sorted(i.tobytes() for i in cifar100["train_images"])


@pytest.mark.pipeline
def test_cifar10_folder_to_tfrecords(cifar10_dir, workdir):
    tf = pytest.importorskip("tensorflow")
    out = os.path.join(workdir, "tfr")
    meta = cifar_job.run(["--input", cifar10_dir["dir"], "--output", out, "--format", "tfrecord",
                          "--examples-per-file", "15"])
    train_files = sorted(f["file"] for f in meta["files"] if f["split"] == "train")
    assert train_files == [f"cifar10-train.tfrecord-{k:05d}-of-00003" for k in range(3)]
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64),
            "id": tf.io.FixedLenFeature([], tf.string)}
    records = []
    for name in train_files:
        for raw in tf.data.TFRecordDataset(os.path.join(out, name)):
            ex = tf.io.parse_single_example(raw, spec)
            records.append((tf.io.decode_png(ex["image"]).numpy().tobytes(), int(ex["label"]), ex["id"].numpy()))
    sharpened = oracle(cifar10_dir["train_images"])
    expected = sorted((sharpened[i].tobytes(), cifar10_dir["train_labels"][i], cifar10_dir["filenames"][i])
                      for i in range(len(sharpened)))
    assert sorted(records) == expected
    test_name = [f["file"] for f in meta["files"] if f["split"] == "test"]
    assert test_name == ["cifar10-test.tfrecord-00000-of-00001"]


@pytest.mark.pipeline
def test_cifar100_as_imagenet32_batches(cifar100, workdir):
    out = os.path.join(workdir, "i32")
    cifar_job.run(["--input", cifar100["path"], "--output", out, "--format", "imagenet32", "--batches", "2"])
    b1, b2, val = (load(os.path.join(out, n)) for n in ("train_data_batch_1", "train_data_batch_2", "val_data"))
    rows = np.concatenate([b1["data"], b2["data"]])
    sharpened = oracle(cifar100["train_images"])
    planar = sharpened.transpose(0, 3, 1, 2).reshape(-1, 3072)
    assert sorted(r.tobytes() for r in rows) == sorted(r.tobytes() for r in planar)
    assert np.array_equal(b1["mean"], planar.astype(np.float64).mean(axis=0))
    assert sorted(b1["labels"] + b2["labels"]) == sorted(l + 1 for l in cifar100["train_labels"])
    assert val["labels"] == [l + 1 for l in cifar100["test_labels"]] and "mean" not in val
    with open(os.path.join(out, "classes.txt")) as f:
        assert f.readline() == "1 class_000\n"


@pytest.mark.pipeline
def test_malicious_batch_is_refused_and_the_rest_written(cifar10_dir, workdir):
    sentinel = os.path.join(workdir, "PWNED")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    folder = os.path.join(workdir, "cifar-10-batches-py")
    os.makedirs(folder)
    for name in os.listdir(os.path.join(cifar10_dir["dir"], "cifar-10-batches-py")):
        with open(os.path.join(cifar10_dir["dir"], "cifar-10-batches-py", name), "rb") as src, \
                open(os.path.join(folder, name), "wb") as dst:
            dst.write(src.read())
    with open(os.path.join(folder, "data_batch_3"), "wb") as f:
        pickle.dump({b"data": Payload()}, f, protocol=2)
    out = os.path.join(workdir, "out")
    meta = cifar_job.run(["--input", folder, "--output", out])
    assert not os.path.exists(sentinel), "the pickle's payload ran"
    with open(os.path.join(out, "failures.jsonl")) as f:
        failures = [json.loads(line) for line in f]
    assert len(failures) == 1 and failures[0]["member"] == "data_batch_3"
    assert "refused" in failures[0]["reason"] and "system" in failures[0]["reason"]
    got = load(os.path.join(out, "CIFAR_10_processed.pickle"))
    assert got["train_dataset"].shape[0] == 4 * 8 and got["test_dataset"].shape[0] == 10
    assert meta["counts"] == {"read": 4 * 8 + 10 + 1, "written": 42, "failed": 1}


def test_archive_read_in_one_pass_reports_each_bad_batch(cifar10_dir, workdir):
    """An archive is one work unit: a refused batch and a missing one are each a failure, the rest is written."""
    sentinel = os.path.join(workdir, "PWNED")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    source = os.path.join(cifar10_dir["dir"], "cifar-10-batches-py")
    archive = os.path.join(workdir, "cifar-10-python.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        for name in sorted(os.listdir(source)):
            if name == "data_batch_5":
                continue  # missing
            if name == "data_batch_2":
                payload = pickle.dumps({b"data": Payload()}, protocol=2)
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                tar.add(os.path.join(source, name), f"cifar-10-batches-py/{name}")
    out = os.path.join(workdir, "out")
    meta = cifar_job.run(["--input", archive, "--output", out, "--format", "imagenet32", "--batches", "2"])
    assert not os.path.exists(sentinel), "the pickle's payload ran"
    with open(os.path.join(out, "failures.jsonl")) as f:
        failures = {json.loads(line)["member"]: json.loads(line)["reason"] for line in f}
    assert set(failures) == {"data_batch_2", "data_batch_5"}
    assert "refused" in failures["data_batch_2"] and "no member" in failures["data_batch_5"]
    assert meta["counts"] == {"read": 3 * 8 + 10 + 2, "written": 3 * 8 + 10, "failed": 2}
    train = [load(os.path.join(out, f"train_data_batch_{i}")) for i in (1, 2)]
    rows = np.concatenate([b["data"] for b in train])
    labels = sum((b["labels"] for b in train), [])
    # the train rows are exactly batches 1, 3 and 4, sharpened, channel-planar, labels 1-based
    kept = [0, 2, 3]
    images = np.concatenate([cifar10_dir["train_images"][8 * k:8 * k + 8] for k in kept])
    want = oracle(images).transpose(0, 3, 1, 2).reshape(len(images), 3072)
    want_labels = [cifar10_dir["train_labels"][8 * k + i] + 1 for k in kept for i in range(8)]
    assert sorted(map(bytes, rows)) == sorted(map(bytes, want))
    assert sorted(zip(map(bytes, rows), labels)) == sorted(zip(map(bytes, want), want_labels))
