"""End-to-end downsample runs on the real-photo ILSVRC sample, read back with the SPEC §2 loader."""
import filecmp
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from imagebeam.pipelines import downsample
from spec_loader import load_npz, normalise, to_nhwc, unpickle

pytestmark = pytest.mark.pipeline

BATCH_FILES = [f"train_data_batch_{k}" for k in range(1, 11)]


def run(input_path, out, *extra, workers=2):
    return downsample.run(["--input", input_path, "--output", out, *extra,
                           "--direct_num_workers", str(workers)])


@pytest.fixture(scope="module")
def train_run(ilsvrc, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train2"))
    meta = run(ilsvrc.train_tar, out, "--devkit", ilsvrc.devkit, "--size", "16", workers=2)
    return out, meta


def oracle(data, size):
    """Pillow's reference: convert("RGB").resize((S, S), BOX); 16-bit images first scaled to 8 bits
    (convert("RGB") would clip them white), the one documented difference."""
    img = Image.open(io.BytesIO(data))
    if img.mode.startswith("I;16"):
        img = Image.fromarray((np.asarray(img).astype(np.int64) >> 8).astype(np.uint8))
    return np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BOX))


def test_train_batches_are_exact(train_run, ilsvrc):
    out, meta = train_run
    good = dict(ilsvrc.train)
    from imagebeam import sample as sample_lib
    for name, data in sample_lib.oddities().items():
        good[f"n01440764/{name}"] = (data, 449)
    batches = [unpickle(os.path.join(out, f)) for f in BATCH_FILES]
    n = sum(len(b["labels"]) for b in batches)
    assert n == len(good) == meta["counts"]["written"]
    assert [len(b["labels"]) for b in batches] == [n // 10] * 9 + [n - 9 * (n // 10)]
    data = np.concatenate([b["data"] for b in batches])
    labels = sum((b["labels"] for b in batches), [])
    assert data.dtype == np.uint8 and data.shape == (n, 3 * 16 * 16)
    assert all(type(v) is int for v in labels)
    # Every stored image is pixel-exact to Pillow's reference and carries its ILSVRC2012_ID label.
    expected = {oracle(d, 16).tobytes(): label for d, label in good.values()}
    assert len(expected) == n
    for img, label in zip(to_nhwc(data, 16), labels):
        assert expected[np.ascontiguousarray(img).tobytes()] == label
    assert sorted(set(labels)) == [1, 449, 490]
    # mean: numpy's float64 mean of all train rows, the same array in every file
    truth = data.astype(np.float64).mean(axis=0)
    for b in batches:
        assert b["mean"].dtype == np.float64 and b["mean"].shape == (768,)
        np.testing.assert_allclose(b["mean"], truth, rtol=1e-6)
    x, y = normalise(batches[0])
    assert x.dtype == np.float32 and y.min() >= 0
    # the shuffle really permutes: not grouped by class
    assert len(set(labels[:6])) > 1 or len(set(labels[-6:])) > 1


def test_failures_and_counts(train_run):
    out, meta = train_run
    lines = [json.loads(l) for l in open(os.path.join(out, "failures.jsonl"))]
    by_member = {l["member"]: l["reason"] for l in lines}
    assert set(by_member) == {f"n01751748.tar/{n}" for n in
                              ("corrupt.JPEG", "empty.JPEG", "notes.JPEG", "truncated.JPEG")}
    assert "empty file" in by_member["n01751748.tar/empty.JPEG"]
    assert "truncated" in by_member["n01751748.tar/truncated.JPEG"]
    assert "not an image" in by_member["n01751748.tar/notes.JPEG"]
    assert "corrupt" in by_member["n01751748.tar/corrupt.JPEG"]
    assert all(l["source"].endswith("ILSVRC2012_img_train.tar") for l in lines)
    c = meta["counts"]
    assert c["failed"] == len(lines) == 4 and c["read"] == c["written"] + c["failed"]
    assert meta["label_order"] == "ILSVRC2012_ID" and meta["seed"] == 0 and meta["algorithm"] == "box"
    assert {"apache_beam", "pillow", "numpy", "tensorflow_transform"} <= set(meta["versions"])
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporaries left behind


def test_transform_fn_normalises_like_users_do(train_run):
    import tensorflow as tf
    import tensorflow_transform as tft

    out, _ = train_run
    batch = unpickle(os.path.join(out, "train_data_batch_1"))
    got = tft.TFTransformOutput(out).transform_raw_features(
        {"image": tf.constant(batch["data"].astype(np.int64))})["image"].numpy()
    x, _ = normalise(batch)
    np.testing.assert_allclose(got, x, atol=1e-6)


def test_one_worker_and_reruns_are_byte_identical(train_run, ilsvrc, tmp_path):
    out2, _ = train_run
    out1 = str(tmp_path / "one")
    run(ilsvrc.train_tar, out1, "--devkit", ilsvrc.devkit, "--size", "16", workers=1)
    again = str(tmp_path / "again")
    run(ilsvrc.train_tar, again, "--devkit", ilsvrc.devkit, "--size", "16", workers=2)
    for name in BATCH_FILES + ["failures.jsonl", "classes.txt"]:
        assert filecmp.cmp(os.path.join(out1, name), os.path.join(out2, name), shallow=False), name
        assert filecmp.cmp(os.path.join(again, name), os.path.join(out2, name), shallow=False), name


def test_val_split_npz_sorted_and_labelled_from_ground_truth(ilsvrc, tmp_path):
    out = str(tmp_path / "val")
    meta = run(ilsvrc.val_tar, out, "--devkit", ilsvrc.devkit, "--split", "val", "--size", "8",
               "--format", "npz", "--algorithm", "box")
    assert sorted(os.listdir(out)) == ["classes.txt", "failures.jsonl", "metadata.json", "val_data.npz"]
    z = load_npz(os.path.join(out, "val_data.npz"))
    assert set(z) == {"data", "labels"}  # val has no mean
    names = sorted(ilsvrc.val)  # stable order: by file name, although the tar is shuffled
    assert z["labels"].tolist() == [ilsvrc.val[n][1] for n in names]
    for row, name in zip(to_nhwc(z["data"], 8), names):
        np.testing.assert_array_equal(row, oracle(ilsvrc.val[name][0], 8))
    assert meta["counts"] == {"read": len(names), "written": len(names), "failed": 0}


def test_folder_without_labels_gets_sorted_classes(image_folder, tmp_path):
    out = str(tmp_path / "folder")
    meta = run(image_folder, out, "--size", "8", "--batches", "3", "--seed", "5", "--format", "npz")
    assert meta["label_order"] == "sorted_class_index_1"
    assert open(os.path.join(out, "classes.txt")).read().splitlines() == [
        "1 apple apple", "2 mango mango", "3 zebra zebra"]
    files = [load_npz(os.path.join(out, f"train_data_batch_{k}.npz")) for k in (1, 2, 3)]
    assert [len(f["labels"]) for f in files] == [3, 3, 4]
    labels = np.concatenate([f["labels"] for f in files])
    assert np.bincount(labels).tolist() == [0, 3, 3, 4]  # apple: i%3==1 -> 3, mango 3, zebra 4


def test_unknown_wnid_is_reported(ilsvrc, tmp_path):
    path = tmp_path / "map.txt"
    path.write_text("n02119789 1 kit_fox\nn01751748 490 sea_snake\n")
    out = str(tmp_path / "unknown")
    meta = run(ilsvrc.train_tar, out, "--class-map", str(path), "--size", "8", workers=1)
    lines = [json.loads(l) for l in open(os.path.join(out, "failures.jsonl"))]
    unknown = [l for l in lines if "unknown WNID 'n01440764'" in l["reason"]]
    assert len(unknown) == len([k for k in ilsvrc.train if k.startswith("n01440764/")]) + 9
    assert meta["counts"]["read"] == meta["counts"]["written"] + meta["counts"]["failed"]
