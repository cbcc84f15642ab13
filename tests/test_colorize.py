"""imagebeam colorize and resize end to end on real photos: records parse with the reference spec, Lab and
embeddings match their oracles, failures are accounted for, and the bytes repeat across runs and workers."""
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image
from skimage import color as skcolor
from skimage import transform as sktransform

from imagebeam import sample as sample_lib
from imagebeam.pipelines import colorize
from imagebeam.pipelines import resize as resize_job
from imagebeam.transforms.formats import lab_records
from imagebeam.transforms.imaging.decode import decode_rgb
from imagebeam.transforms.imaging.resize import letterbox

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory, good_jpeg):
    """Real photos of several sizes and encodings in class folders, plus broken files."""
    root = tmp_path_factory.mktemp("photos")
    jpegs = list(sample_lib.imagenet_like_jpegs(7, seed=11))
    for i, data in enumerate(jpegs):
        cls = root / ("cats" if i % 2 else "dogs")
        cls.mkdir(exist_ok=True)
        (cls / f"p{i:02d}.jpg").write_bytes(data)
    odd = sample_lib.oddities()
    for name in sorted(odd)[:3]:  # e.g. CMYK, grey, PNG named .JPEG
        (root / "dogs" / name.replace("/", "_")).write_bytes(odd[name])
    bad = sample_lib.bad_inputs(good_jpeg)
    for name in sorted(bad)[:2]:
        (root / "cats" / name).write_bytes(bad[name])
    return str(root)


def _inputs(photo_dir):
    out = {}
    for dirpath, _, names in os.walk(photo_dir):
        for n in names:
            path = os.path.join(dirpath, n)
            out[os.path.relpath(path, photo_dir)] = open(path, "rb").read()
    return out


def _run(photo_dir, out, *extra, workers=2):
    return colorize.run(["--input", photo_dir, "--output", str(out), "--examples-per-file", "4",
                         "--direct_num_workers", str(workers), *extra])


def _files(out):
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n.endswith(".tfrecord")}


def _parse_all(out, pattern, embedding_size):
    import tensorflow as tf

    spec = lab_records.reference_feature_spec(embedding_size)
    records = []
    for path in sorted(tf.io.gfile.glob(os.path.join(out, pattern))):
        for raw in tf.data.TFRecordDataset(path):
            parsed = tf.io.parse_single_example(raw, spec)
            assert set(tf.train.Example.FromString(raw.numpy()).features.feature) == set(spec)
            records.append({k: v.numpy() for k, v in parsed.items()})
    return records


@pytest.fixture(scope="module")
def embedded(photo_dir, tmp_path_factory):
    """Random-weight embeddings, a val split, 2 workers and 1 worker."""
    outs = []
    for workers in (2, 1):
        out = tmp_path_factory.mktemp(f"emb{workers}")
        meta = _run(photo_dir, out, "--inception-weights", "random", "--batch-size", "3",
                    "--val-fraction", "0.3", workers=workers)
        outs.append((str(out), meta))
    return outs


def test_records_parse_and_match_oracles(embedded, photo_dir):
    from imagebeam.transforms.model import inception
    from imagebeam.transforms.model.embedding import embed_direct

    out, meta = embedded[0]
    train = _parse_all(out, "lab_images_*.tfrecord", 1001)
    val = _parse_all(out, "val_lab_images_*.tfrecord", 1001)
    assert len(train) + len(val) == meta["counts"]["written"] == 10
    assert train and val
    assert meta["embedding_size"] == 1001 and "RANDOM" in meta["warning"]
    inputs = _inputs(photo_dir)
    records = train + val
    rgb = []
    for rec in records:
        image = np.asarray(letterbox(decode_rgb(inputs[rec["image_name"].decode()])))
        rgb.append(image)
        small = sktransform.resize(image, (224, 224), order=1, mode="constant", anti_aliasing=False)
        lab = skcolor.rgb2lab(small)
        assert np.abs((rec["image_l"].reshape(224, 224) + 1) * 50 - lab[..., 0]).max() < 1e-3
        assert np.abs(rec["image_ab"].reshape(224, 224, 2) * 127 - lab[..., 1:]).max() < 1e-3
    model = inception.build_model("random")
    direct = embed_direct(model, np.stack(rgb))
    stored = np.stack([r["image_embedding"] for r in records])
    assert np.abs(stored - direct).max() < 1e-4 * max(1.0, np.abs(direct).max())
    assert np.abs(direct).max() > 0  # not a trivial embedding


def test_order_files_and_metadata(embedded):
    out, meta = embedded[0]
    names = [f["file"] for f in meta["files"]]
    assert names == sorted(_files(out), key=lambda n: (n.startswith("val"), n))
    for f in meta["files"]:
        assert f["rows"] <= 4
    train_rows = [f["rows"] for f in meta["files"] if f["split"] == "train"]
    assert all(r == 4 for r in train_rows[:-1])
    assert not os.path.exists(os.path.join(out, ".staging"))
    failures = [json.loads(line) for line in open(os.path.join(out, "failures.jsonl"))]
    assert len(failures) == meta["counts"]["failed"] == 2
    assert meta["counts"]["read"] == meta["counts"]["written"] + meta["counts"]["failed"]


def test_one_and_two_workers_give_identical_bytes(embedded):
    (out2, _), (out1, _) = embedded
    assert _files(out2) == _files(out1)
    assert open(os.path.join(out2, "failures.jsonl")).read() == open(os.path.join(out1, "failures.jsonl")).read()


@pytest.fixture(scope="module")
def plain(photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain")
    return str(out), _run(photo_dir, out, "--embedding", "none")


def test_no_embedding_records_and_reruns(plain, photo_dir, tmp_path):
    out, meta = plain
    records = _parse_all(out, "lab_images_*.tfrecord", 0)
    assert len(records) == 10 and meta["embedding_size"] == 0
    again = tmp_path / "again"
    _run(photo_dir, again, "--embedding", "none", workers=1)
    assert _files(out) == _files(str(again))


def test_compact_and_gzip_read_back_like_the_reference(plain, photo_dir, tmp_path):
    out, _ = plain
    compact = tmp_path / "compact"
    gz = tmp_path / "gzip"
    _run(photo_dir, compact, "--embedding", "none", "--record-format", "compact")
    _run(photo_dir, gz, "--embedding", "none", "--compression", "gzip")
    ref = list(lab_records.read_lab_records(os.path.join(out, "lab_images_*.tfrecord"), with_name=True))
    small = list(lab_records.read_lab_records(str(compact / "lab_images_*.tfrecord"), with_name=True))
    zipped = list(lab_records.read_lab_records(str(gz / "lab_images_*.tfrecord"), with_name=True))
    assert len(ref) == len(small) == len(zipped) == 10
    for (l_ref, ab_ref, name), (l_q, ab_q, name_q), (l_z, ab_z, name_z) in zip(ref, small, zipped):
        assert name == name_q == name_z
        assert l_ref.shape == (224, 224, 1) and ab_ref.shape == (224, 224, 2)
        assert np.abs(l_q.numpy() - l_ref.numpy()).max() <= 1 / 127.5 + 1e-6
        assert np.abs(ab_q.numpy() - ab_ref.numpy()).max() <= 1 / 127 + 1e-6
        np.testing.assert_array_equal(l_z.numpy(), l_ref.numpy())
    ref_bytes = sum(len(b) for b in _files(out).values())
    compact_bytes = sum(len(b) for b in _files(str(compact)).values())
    assert ref_bytes >= 3 * compact_bytes


def test_resize_job_writes_letterboxed_files(photo_dir, tmp_path):
    tar_path = tmp_path / "shard-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in sorted(_inputs(photo_dir).items()):
            sample_lib.add_bytes(tar, name, data)
    out = tmp_path / "resized"
    meta = resize_job.run(["--input", str(tar_path), "--output", str(out), "--direct_num_workers", "1"])
    assert meta["counts"] == {"read": 12, "written": 10, "failed": 2}
    inputs = _inputs(photo_dir)
    for rel, data in inputs.items():
        path = out / rel
        try:
            expected = np.asarray(letterbox(decode_rgb(data)), dtype=np.int16)
        except Exception:
            assert not path.exists()
            continue
        written = path if path.exists() else out / (rel + ".png")
        with Image.open(written) as img:
            assert img.size == (299, 299)
            got = np.asarray(img.convert("RGB"), dtype=np.int16)
        assert np.abs(got - expected).mean() < 2.0  # JPEG at quality 95


def test_images_that_do_not_decode_fail_after_the_merge(plain, photo_dir, good_jpeg, tmp_path):
    """A truncated JPEG has a valid header, so it is staged and fails at its one decode after the merge;
    with --batch-size 1 its chunk has no image left (nothing to embed, no piece, no rank): the other
    records are those of the --embedding none run, and the counts add up."""
    import shutil

    inputs = tmp_path / "in"
    shutil.copytree(photo_dir, inputs)
    (inputs / "cats" / "truncated.JPEG").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    out = tmp_path / "batch1"
    meta = _run(str(inputs), out, "--inception-weights", "random", "--batch-size", "1")
    assert meta["counts"]["written"] == 10 and meta["counts"]["failed"] == 3
    assert meta["counts"]["read"] == meta["counts"]["written"] + meta["counts"]["failed"]
    failures = {os.path.basename(f["source"]): f["reason"]
                for f in map(json.loads, open(out / "failures.jsonl"))}
    assert sorted(failures) == ["corrupt.JPEG", "empty.JPEG", "truncated.JPEG"]
    assert failures["truncated.JPEG"].startswith("truncated image data")
    names = [r["image_name"] for r in _parse_all(str(out), "lab_images_*.tfrecord", 1001)]
    assert names == [r["image_name"] for r in _parse_all(plain[0], "lab_images_*.tfrecord", 0)]
    assert not os.path.exists(out / ".staging")
