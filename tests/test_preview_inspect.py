"""`imagebeam preview` and `imagebeam inspect` on outputs written by the real jobs (tiny inputs).

Tiles are cropped back out of the PNG with `preview.layout`'s boxes and compared with the stored samples
read independently (plain pickle / np.load, the project's TFRecord framing reader, Pillow, scikit-image).
"""
import gzip
import io
import json
import os
import pickle
import shutil
import struct

import numpy as np
import pytest
from PIL import Image

from imagebeam import preview as preview_lib
from imagebeam import sample as sample_lib
from imagebeam.inspect_outputs import inspect_main, inspect_output
from imagebeam.preview import make_preview, preview_main
from imagebeam.transforms.imaging import colour
from imagebeam.transforms.formats.example_decode import ExampleDecodeError, iter_file_records, parse_example
from imagebeam.transforms.formats.tfrecord import (bytes_feature, example_bytes, float_feature, frame_record,
                                           int64_feature, iter_records)
from spec_loader import load_npz, to_nhwc, unpickle

# the in-process local runner: no SDK worker processes to start
FAST = ["--direct_running_mode", "in_memory", "--direct_num_workers", "1"]


# --- pure pieces ------------------------------------------------------------------------------------------------

def _varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _ld(field, payload):
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def test_example_decoder_reads_packed_unpacked_and_refuses_garbage():
    data = example_bytes({"name": bytes_feature(b"a/b.jpg"), "l": float_feature(np.array([0.5, -1.25], np.float32)),
                          "ids": int64_feature([0, 7, -3, 2 ** 40])})
    parsed = parse_example(data)
    assert parsed["name"].kind == "bytes" and parsed["name"].value == [b"a/b.jpg"]
    assert parsed["l"].kind == "float" and parsed["l"].value.tolist() == [0.5, -1.25]
    assert parsed["ids"].kind == "int64" and parsed["ids"].value.tolist() == [0, 7, -3, 2 ** 40]
    # unpacked repeated values (what other writers may produce) and an unknown field are read too
    unpacked_floats = b"".join(_varint(1 << 3 | 5) + struct.pack("<f", v) for v in (1.0, 2.0))
    unpacked_ints = b"".join(_varint(1 << 3 | 0) + _varint(v) for v in (3, 4))
    feature_f = _ld(2, unpacked_floats)
    feature_i = _ld(3, unpacked_ints)
    entries = _ld(1, _ld(1, b"f") + _ld(2, feature_f)) + _ld(1, _ld(1, b"i") + _ld(2, feature_i))
    odd = _ld(1, entries) + _varint(7 << 3 | 0) + _varint(99)
    got = parse_example(odd)
    assert got["f"].value.tolist() == [1.0, 2.0] and got["i"].value.tolist() == [3, 4]
    with pytest.raises(ExampleDecodeError):
        parse_example(data[:-3])
    with pytest.raises(ExampleDecodeError):
        parse_example(b"\x0a\xff")


def test_record_stream_reader_checks_crcs_skips_and_reads_gzip():
    records = [example_bytes({"k": int64_feature([i])}) for i in range(5)]
    blob = b"".join(frame_record(r) for r in records)
    for raw in (blob, gzip.compress(blob)):
        got = list(iter_file_records(io.BytesIO(raw), wanted={1, 3}))
        assert [r.index for r in got] == [0, 1, 2, 3, 4]
        assert [r.data for r in got if r.data is not None] == [records[1], records[3]]
    flipped = bytearray(blob)
    flipped[len(frame_record(records[0])) + 14] ^= 0x40  # inside record 1's data
    with pytest.raises(ValueError, match="data CRC .*record 1"):
        list(iter_file_records(io.BytesIO(bytes(flipped))))
    with pytest.raises(ValueError, match="truncated"):
        list(iter_file_records(io.BytesIO(blob[:-2])))


def test_layout_boxes_tile_the_sheet():
    geo = preview_lib.layout(11, 64, 48)
    assert geo.columns == 8 and geo.rows == 2
    assert geo.width == preview_lib.PAD + 8 * (preview_lib.MIN_CELL_W + preview_lib.PAD)
    assert geo.height == preview_lib.HEADER_H + preview_lib.PAD + 2 * (48 + preview_lib.CAPTION_H + preview_lib.PAD)
    boxes = [t.cell for t in geo.tiles]
    for i, (a, t) in enumerate(zip(boxes, geo.tiles)):
        assert 0 <= a[0] < a[2] <= geo.width and preview_lib.HEADER_H <= a[1] < a[3] <= geo.height
        assert t.image[2] - t.image[0] == 64 and t.image[3] - t.image[1] == 48 and t.image[3] == t.caption[1]
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]  # disjoint
    wide = preview_lib.layout(32, 448, 224)
    assert wide.columns == (preview_lib.MAX_SHEET_W - preview_lib.PAD) // (448 + preview_lib.PAD)
    assert wide.tiles[0].image == (preview_lib.PAD, preview_lib.HEADER_H + preview_lib.PAD,
                                   preview_lib.PAD + 448, preview_lib.HEADER_H + preview_lib.PAD + 224)


def test_lab_reconstruction_is_skimage_lab2rgb():
    skcolor = pytest.importorskip("skimage.color")
    rgb = sample_lib.cifar_images(4, seed=2).reshape(-1, 32, 3).astype(np.float32) / 255
    lab = colour.rgb_to_lab(rgb)
    l_norm, ab_norm = lab[..., 0] / 50 - 1, lab[..., 1:] / 127
    ours = preview_lib.lab_to_rgb(l_norm, ab_norm)
    theirs = np.rint(skcolor.lab2rgb(np.dstack([(l_norm.astype(np.float64) + 1) * 50,
                                                ab_norm.astype(np.float64) * 127])) * 255)
    assert np.abs(ours.astype(int) - theirs).max() <= 1 and np.mean(ours == theirs) > 0.999
    assert np.abs(ours.astype(int) - np.rint(rgb * 255)).max() <= 1  # round trip back to the pixels
    assert preview_lib.l_to_grey(np.array([-1.0, 0.0, 1.0, 1.5])).tolist() == [0, 128, 255, 255]


def test_choose_is_seeded_and_without_replacement():
    counts = [("a", 5), ("b", 0), ("c", 7)]
    one = preview_lib.choose(counts, 6, seed=4)
    assert one == preview_lib.choose(counts, 6, seed=4) and len(set(one)) == 6
    assert all((f == "a" and i < 5) or (f == "c" and i < 7) for f, i in one)
    assert preview_lib.choose(counts, 6, seed=5) != one
    assert len(preview_lib.choose(counts, 100, seed=0)) == 12


def test_image_folder_and_download_folder(tmp_path, capsys):
    folder = tmp_path / "imgs"
    for i, data in enumerate(sample_lib.imagenet_like_jpegs(3, seed=5)):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"c{i % 2}" / f"x{i}.jpg").write_bytes(data)
    assert preview_main([str(folder), "--n", "5"]) == 0
    # beside the folder, not in it: image folders are often a later job's input
    shown = Image.open(tmp_path / "imgs-preview.png")
    assert shown.size[0] > 0 and "3 of 3" in capsys.readouterr().out and not (folder / "preview.png").exists()
    assert preview_main([str(folder), "--output", str(folder / "preview.png")]) == 0
    assert preview_main([str(folder)]) == 0  # a preview.png inside is not taken for an input image
    assert "3 of 3" in capsys.readouterr().out
    report = inspect_output(str(folder))
    assert report["kind"] == "images" and report["ok"] and report["warnings"]
    dl = tmp_path / "dl"
    dl.mkdir()
    lines = []
    for i, data in enumerate(sample_lib.imagenet_like_jpegs(2, seed=6)):
        (dl / f"{i:032x}.jpeg").write_bytes(data)
        lines.append({"url": f"http://x/{i}", "status": "ok", "file": f"{i:032x}.jpeg", "key": f"k{i}", "label": "n1"})
    lines.append({"url": "http://x/404", "status": "http_404", "file": None})
    (dl / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    got = make_preview(str(dl), n=8)
    assert got.output.kind == "download" and len(got.samples) == 2
    assert inspect_main([str(dl)]) == 0


# --- outputs of the real jobs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def jobs(ilsvrc, good_jpeg, tmp_path_factory):
    """One tiny output of every kind, written by the jobs themselves."""
    from imagebeam.pipelines import cifar, colorize, downsample

    root = tmp_path_factory.mktemp("outputs")
    out = {k: str(root / k) for k in ("train", "val", "lab", "lab_compact", "c_pickle", "c_tfrecord", "c_i32")}
    downsample.run(["--input", ilsvrc.train_tar, "--devkit", ilsvrc.devkit, "--output", out["train"], "--size", "8",
                    "--batches", "4", *FAST])
    downsample.run(["--input", ilsvrc.val_tar, "--devkit", ilsvrc.devkit, "--output", out["val"], "--size", "8",
                    "--split", "val", "--format", "npz", *FAST])
    photos = root / "photos"
    for i, data in enumerate(sample_lib.imagenet_like_jpegs(5, seed=11)):
        (photos / ("cats" if i % 2 else "dogs")).mkdir(parents=True, exist_ok=True)
        (photos / ("cats" if i % 2 else "dogs") / f"p{i}.jpg").write_bytes(data)
    (photos / "cats" / "broken.jpg").write_bytes(good_jpeg[:300])
    colorize.run(["--input", str(photos), "--output", out["lab"], "--embedding", "none", "--examples-per-file", "2",
                  "--val-fraction", "0.3", *FAST])
    colorize.run(["--input", str(photos), "--output", out["lab_compact"], "--embedding", "none",
                  "--record-format", "compact", "--compression", "gzip", *FAST])
    archive = sample_lib.write_cifar_archive(str(root / "cifar-100-python.tar.gz"), train_per_batch=20, test=8)
    for fmt, key in (("pickle", "c_pickle"), ("tfrecord", "c_tfrecord"), ("imagenet32", "c_i32")):
        cifar.run(["--input", archive["path"], "--output", out[key], "--format", fmt, "--examples-per-file", "12",
                   *FAST])
    return out


def _tiles(png_path, result):
    """(sample, image region cropped from the written PNG) per tile."""
    sheet = np.asarray(Image.open(png_path).convert("RGB"))
    assert sheet.shape == (result.layout.height, result.layout.width, 3)
    assert len(result.layout.tiles) == len(result.samples)
    for sample, box in zip(result.samples, result.layout.tiles):
        x0, y0, x1, y1 = box.image
        yield sample, sheet[y0:y1, x0:x1]


def _block(image, k):
    return np.kron(image, np.ones((k, k, 1), dtype=np.uint8))  # every pixel a k x k block


def _records(path):
    """[(image features)] of a TFRecord file, read with the project's framing reader (not the stream one)."""
    with open(path, "rb") as f:
        return [parse_example(r) for r in iter_records(f.read())]


@pytest.mark.pipeline
def test_preview_of_train_batches_shows_the_stored_rows(jobs, tmp_path, capsys):
    out = jobs["train"]
    png = str(tmp_path / "a.png")
    assert preview_main([out, "--output", png, "--n", "9", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    result = make_preview(out, n=9, seed=3)
    assert open(png, "rb").read() == result.png
    assert result.output.kind == "batches" and result.scale == 8 and len(result.samples) == 9
    classes = {int(line.split()[0]): line.split(" ", 2)[2].strip() for line in open(os.path.join(out, "classes.txt"))}
    for sample, tile in _tiles(png, result):
        batch = unpickle(os.path.join(out, sample.file))
        row = to_nhwc(batch["data"][sample.index:sample.index + 1], 8)[0]
        assert np.array_equal(tile, _block(row, 8)), sample
        assert sample.label == batch["labels"][sample.index]
        assert sample.caption[0] == f"{sample.label} {classes[sample.label]}"
        assert f"{sample.file}[{sample.index}]" in printed
    assert len({(s.file, s.index) for s in result.samples}) == 9
    # same seed: the same bytes; another seed: other samples; --scale; default path OUTPUT/preview.png
    again = str(tmp_path / "b.png")
    assert preview_main([out, "--output", again, "--n", "9", "--seed", "3"]) == 0
    assert open(png, "rb").read() == open(again, "rb").read()
    other = make_preview(out, n=9, seed=4)
    assert [(s.file, s.index) for s in other.samples] != [(s.file, s.index) for s in result.samples]
    big = make_preview(out, n=3, seed=0, scale=3)
    assert big.layout.tiles[0].image[2] - big.layout.tiles[0].image[0] == 24
    assert preview_main([out]) == 0
    assert open(os.path.join(out, "preview.png"), "rb").read() == make_preview(out).png
    capsys.readouterr()
    assert inspect_main([out]) == 0  # the preview beside the data does not disturb inspect


@pytest.mark.pipeline
def test_preview_of_npz_val_and_cifar_imagenet32(jobs, tmp_path):
    for key, loader in (("val", load_npz), ("c_i32", unpickle)):
        out = jobs[key]
        png = str(tmp_path / f"{key}.png")
        assert preview_main([out, "--output", png, "--n", "50", "--scale", "2"]) == 0
        result = make_preview(out, n=50, scale=2)
        assert result.output.kind == "batches"
        assert len(result.samples) == min(50, json.load(open(os.path.join(out, "metadata.json")))["counts"]["written"])
        for sample, tile in _tiles(png, result):
            batch = loader(os.path.join(out, sample.file))
            size = int(round((batch["data"].shape[1] // 3) ** 0.5))
            assert np.array_equal(tile, _block(to_nhwc(batch["data"][[sample.index]], size)[0], 2))
    assert "detected by metadata.json job 'cifar' (format 'imagenet32')" in \
        f"detected by {make_preview(jobs['c_i32'], n=1).output.detected_by}"


@pytest.mark.pipeline
def test_preview_of_lab_records_shows_l_and_the_rebuilt_colour(jobs, tmp_path):
    skcolor = pytest.importorskip("skimage.color")
    for key in ("lab", "lab_compact"):
        out = jobs[key]
        png = str(tmp_path / f"{key}.png")
        assert preview_main([out, "--output", png, "--n", "4", "--seed", "1"]) == 0
        result = make_preview(out, n=4, seed=1)
        assert result.output.kind == "lab_records" and result.scale == 1 and len(result.samples) == 4
        for sample, tile in _tiles(png, result):
            features = _records(os.path.join(out, sample.file))[sample.index]
            assert sample.name == features["image_name"].value[0].decode()
            if key == "lab":
                l_norm = features["image_l"].value.reshape(224, 224)
                ab_norm = features["image_ab"].value.reshape(224, 224, 2)
            else:  # compact: L' = q/127.5 - 1, ab' = (q - 128)/127
                l_norm = np.frombuffer(features["image_l"].value[0], np.uint8).reshape(224, 224) / np.float32(127.5) - 1
                ab_norm = (np.frombuffer(features["image_ab"].value[0], np.uint8).reshape(224, 224, 2)
                           - np.float32(128)) / np.float32(127)
            grey = np.rint(np.clip((l_norm.astype(np.float64) + 1) / 2, 0, 1) * 255).astype(np.uint8)
            assert np.array_equal(tile[:, :224], np.repeat(grey[..., None], 3, axis=-1))
            lab = np.dstack([(l_norm.astype(np.float64) + 1) * 50, ab_norm.astype(np.float64) * 127])
            reference = np.rint(skcolor.lab2rgb(lab) * 255).astype(int)
            right = tile[:, 224:448]
            assert np.array_equal(right, preview_lib.lab_to_rgb(l_norm, ab_norm))
            assert np.abs(right.astype(int) - reference).max() <= 1
    files = {s.file for s in make_preview(jobs["lab"], n=50).samples}
    assert any(f.startswith("val_") for f in files) and any(f.startswith("lab_") for f in files)


@pytest.mark.pipeline
def test_preview_of_cifar_pickle_and_tfrecords(jobs, tmp_path):
    out = jobs["c_pickle"]
    png = str(tmp_path / "c.png")
    assert preview_main([out, "--output", png, "--n", "10", "--seed", "2"]) == 0
    result = make_preview(out, n=10, seed=2)
    saved = unpickle(os.path.join(out, "CIFAR_100_processed.pickle"))
    assert result.output.kind == "cifar_pickle" and result.scale == 2
    for sample, tile in _tiles(png, result):
        assert np.array_equal(tile, _block(saved[f"{sample.split}_dataset"][sample.index], 2))
        label = int(saved[f"{sample.split}_labels"][sample.index])
        assert sample.caption[0] == f"{label} {saved['label_names'][label].decode()}"
    assert {s.split for s in make_preview(out, n=28).samples} == {"train", "test"}

    out = jobs["c_tfrecord"]
    png = str(tmp_path / "t.png")
    assert preview_main([out, "--output", png, "--n", "10", "--seed", "2"]) == 0
    result = make_preview(out, n=10, seed=2)
    assert result.output.kind == "cifar_tfrecord"
    for sample, tile in _tiles(png, result):
        features = _records(os.path.join(out, sample.file))[sample.index]
        stored = np.asarray(Image.open(io.BytesIO(features["image"].value[0])).convert("RGB"))
        assert np.array_equal(tile, _block(stored, 2)) and sample.label == int(features["label"].value[0])


@pytest.mark.pipeline
def test_inspect_passes_on_every_good_output(jobs, capsys):
    for key, out in jobs.items():
        assert inspect_main([out]) == 0, capsys.readouterr().out
        capsys.readouterr()
        assert inspect_main([out, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        meta = json.load(open(os.path.join(out, "metadata.json")))
        assert report["ok"] and not report["failed"] and report["rows"] == meta["counts"]["written"], key
    train = inspect_output(jobs["train"])
    names = {c["check"] for c in train["checks"]}
    assert {"mean", "batch sizes", "counts", "written", "failures", "files", "temporaries"} <= names
    assert train["labels"]["classes"] == 3 and train["image_sizes"] == {"8x8": train["rows"]}
    assert train["facts"]["failures"]["lines"] == json.load(open(os.path.join(jobs["train"], "metadata.json")))[
        "counts"]["failed"] > 0
    lab = inspect_output(jobs["lab"])
    assert lab["rows_by_split"]["train"] + lab["rows_by_split"].get("val", 0) == 5
    assert lab["image_sizes"] == {"224x224": 5} and lab["labels"]["classes"] == 2  # cats/, dogs/


def _copy(src, tmp_path, name):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def _fails(out, capsys, check):
    assert inspect_main([out]) == 1
    text = capsys.readouterr().out
    assert f"FAIL {check}" in text and "FAILED:" in text, text
    report = inspect_output(out)
    assert check in report["failed"], report["failed"]
    return report


@pytest.mark.pipeline
def test_inspect_fails_on_damaged_outputs(jobs, tmp_path, capsys):
    # a truncated batch file
    out = _copy(jobs["train"], tmp_path, "trunc")
    path = os.path.join(out, "train_data_batch_2")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    _fails(out, capsys, "read:train_data_batch_2")
    # a batch rewritten with the wrong dtype and an unknown label
    out = _copy(jobs["train"], tmp_path, "dtype")
    path = os.path.join(out, "train_data_batch_3")
    batch = unpickle(path)
    batch["data"] = batch["data"].astype(np.int16)
    batch["labels"][0] = 999
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=4)
    report = _fails(out, capsys, "data:train_data_batch_3")
    assert "labels:train_data_batch_3" in report["failed"]
    # a changed mean
    out = _copy(jobs["train"], tmp_path, "mean")
    path = os.path.join(out, "train_data_batch_1")
    batch = unpickle(path)
    batch["mean"] = batch["mean"] + 0.5
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=4)
    _fails(out, capsys, "mean:train_data_batch_1")
    # a missing batch file
    out = _copy(jobs["train"], tmp_path, "missing")
    os.remove(os.path.join(out, "train_data_batch_4"))
    report = _fails(out, capsys, "files")
    assert "batch sizes" in report["failed"] and "written" in report["failed"]
    # a truncated npz
    out = _copy(jobs["val"], tmp_path, "npz")
    path = os.path.join(out, "val_data.npz")
    open(path, "wb").write(open(path, "rb").read()[:-40])
    _fails(out, capsys, "read:val_data.npz")
    # metadata counts edited
    out = _copy(jobs["train"], tmp_path, "meta")
    meta_path = os.path.join(out, "metadata.json")
    meta = json.load(open(meta_path))
    meta["counts"]["written"] += 1
    meta["files"][0]["rows"] += 1
    json.dump(meta, open(meta_path, "w"))
    report = _fails(out, capsys, "counts")
    assert {"written", f"rows:{meta['files'][0]['file']}"} <= set(report["failed"])
    # failures.jsonl with a line more than metadata's failed, and a temporary left behind
    out = _copy(jobs["val"], tmp_path, "failures")
    with open(os.path.join(out, "failures.jsonl"), "a") as f:
        f.write(json.dumps({"source": "x", "member": "y", "reason": "z"}) + "\n")
    open(os.path.join(out, ".val_data.npz.inprogress-abc"), "wb").close()
    report = _fails(out, capsys, "failures")
    assert "temporaries" in report["failed"]


@pytest.mark.pipeline
def test_inspect_fails_on_flipped_record_bytes_and_edited_record_metadata(jobs, tmp_path, capsys):
    out = _copy(jobs["lab"], tmp_path, "flip")
    path = os.path.join(out, "lab_images_0.tfrecord")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))
    report = _fails(out, capsys, "records:lab_images_0.tfrecord")
    assert "CRC" in next(c["detail"] for c in report["checks"] if c["check"] == "records:lab_images_0.tfrecord")
    with pytest.raises(ValueError):  # and preview will not show a corrupt record
        make_preview(out, n=50)

    out = _copy(jobs["lab_compact"], tmp_path, "gz")
    path = os.path.join(out, "lab_images_0.tfrecord")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    _fails(out, capsys, "records:lab_images_0.tfrecord")

    out = _copy(jobs["lab"], tmp_path, "emb")
    meta_path = os.path.join(out, "metadata.json")
    meta = json.load(open(meta_path))
    meta["embedding_size"] = 1001
    meta["counts"]["read"] -= 1
    json.dump(meta, open(meta_path, "w"))
    report = _fails(out, capsys, "counts")
    assert any(f.startswith("features:") for f in report["failed"])

    out = _copy(jobs["c_tfrecord"], tmp_path, "ctf")
    name = sorted(n for n in os.listdir(out) if "-train.tfrecord-" in n)[0]
    data = bytearray(open(os.path.join(out, name), "rb").read())
    data[40] ^= 0x10
    open(os.path.join(out, name), "wb").write(bytes(data))
    _fails(out, capsys, f"records:{name}")

    out = _copy(jobs["c_pickle"], tmp_path, "cp")
    path = os.path.join(out, "CIFAR_100_processed.pickle")
    saved = unpickle(path)
    saved["train_labels"] = saved["train_labels"].astype(np.int32)
    with open(path, "wb") as f:
        pickle.dump(saved, f)
    _fails(out, capsys, "shapes:CIFAR_100_processed.pickle")
    open(path, "wb").write(open(os.path.join(jobs["c_pickle"], "CIFAR_100_processed.pickle"), "rb").read()[:5000])
    _fails(out, capsys, "read:CIFAR_100_processed.pickle")


@pytest.mark.pipeline
def test_decoder_agrees_with_tensorflow(jobs):
    """Last in the file: the only test that imports TensorFlow."""
    tf = pytest.importorskip("tensorflow")
    from imagebeam.transforms.formats import lab_records

    path = os.path.join(jobs["lab"], "lab_images_0.tfrecord")
    spec = lab_records.reference_feature_spec(0)
    ours = _records(path)
    for raw, mine in zip(tf.data.TFRecordDataset(path), ours):
        theirs = tf.io.parse_single_example(raw, spec)
        assert theirs["image_name"].numpy() == mine["image_name"].value[0]
        assert np.array_equal(theirs["image_l"].numpy(), mine["image_l"].value)
        assert np.array_equal(theirs["image_ab"].numpy(), mine["image_ab"].value)
