"""The fault and bad-input suite: every awkward or broken input, through every image job, from a folder and
from a tar. Each input ends in the output or in failures.jsonl with its reason; the job finishes; the counts
add up; nothing is written outside the output folder."""
import io
import json
import os
import struct
import tarfile
import zlib

import pytest
from PIL import Image

from imagebeam import sample as sample_lib
from imagebeam.pipelines import colorize, downsample
from imagebeam.pipelines import resize as resize_job

pytestmark = [pytest.mark.pipeline, pytest.mark.faults]


def declared_bomb() -> bytes:
    """A PNG whose header declares 100,000 x 100,000 pixels (10 gigapixels) with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def one_pixel() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 30, 40)).save(buf, "PNG")
    return buf.getvalue()


# name -> the words the failure reason must contain (None: the image must be in the output)
@pytest.fixture(scope="module")
def cases(good_jpeg):
    good = {f"good_{i}.jpg": data for i, data in enumerate(sample_lib.imagenet_like_jpegs(3, seed=31))}
    odd = sample_lib.oddities()  # CMYK, PNG named .JPEG, grey, palette+transparency, RGBA, 16-bit, animated, ...
    bad = sample_lib.bad_inputs(good_jpeg)  # corrupt, empty, HTML, truncated
    files = {**good, **odd, "one_pixel.png": one_pixel(), **bad, "bomb.png": declared_bomb()}
    expected = {name: None for name in (*good, *odd, "one_pixel.png")}
    expected.update({"corrupt.JPEG": "corrupt", "empty.JPEG": "empty", "notes.JPEG": "not an image",
                     "truncated.JPEG": "truncated", "bomb.png": "decompression bomb"})
    assert set(files) == set(expected)
    return files, expected


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, cases):
    """The same files as a class folder, and as a flat tar with hostile members and a truncated tail."""
    files, _ = cases
    root = tmp_path_factory.mktemp("faults")
    folder = root / "folder" / "things"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    tar_path = root / "shard.tar"
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in sorted(files.items()):
            sample_lib.add_bytes(tar, f"things/{name}", data)
        sample_lib.add_bytes(tar, "../../outside.jpg", files["good_0.jpg"])
        link = tarfile.TarInfo("things/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    raw = tar_path.read_bytes()
    truncated = root / "truncated.tar"
    truncated.write_bytes(raw[:-4096])  # the last member cut and the end-of-archive blocks lost
    return {"folder": str(root / "folder"), "tar": str(tar_path), "truncated": str(truncated), "root": str(root)}


def failures_of(out):
    with open(os.path.join(out, "failures.jsonl")) as f:
        return [json.loads(line) for line in f]


def check(out, meta, expected, extra_failures=0):
    failures = failures_of(out)
    reasons = {os.path.basename(f["member"] or f["source"]): f["reason"] for f in failures}
    for name, words in expected.items():
        if words is not None:
            assert words in reasons.get(name, "").lower(), (name, reasons.get(name))
    ok = [n for n, w in expected.items() if w is None]
    assert not set(ok) & set(reasons), "good inputs reported as failures"
    c = meta["counts"]
    assert c["read"] == c["written"] + c["failed"] and c["failed"] == len(failures)
    assert c["written"] == len(ok) and c["failed"] == len(expected) - len(ok) + extra_failures
    return reasons


def snapshot(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, _, ns in os.walk(root) for n in ns)


@pytest.mark.parametrize("source", ["folder", "tar"])
def test_every_job_accounts_for_every_input(source, cases, inputs, workdir):
    _, expected = cases
    before = snapshot(inputs["root"])
    extra = 2 if source == "tar" else 0  # the '..' member and the symlink
    path = inputs[source]

    out = os.path.join(workdir, "ds")
    meta = downsample.run(["--input", path, "--output", out, "--split", "train", "--batches", "1", "--size", "8"])
    reasons = check(out, meta, expected, extra)
    if source == "tar":
        assert "'..'" in reasons["outside.jpg"] and "symbolic link" in reasons["link.jpg"]

    out = os.path.join(workdir, "col")
    meta = colorize.run(["--input", path, "--output", out, "--embedding", "none"])
    check(out, meta, expected, extra)
    import tensorflow as tf
    names = {os.path.basename(tf.train.Example.FromString(r).features.feature["image_name"].bytes_list.value[0]
                              .decode()) for r in tf.data.TFRecordDataset(os.path.join(out, "lab_images_0.tfrecord"))
             .as_numpy_iterator()}
    assert names == {n for n, w in expected.items() if w is None}

    out = os.path.join(workdir, "rs")
    meta = resize_job.run(["--input", path, "--output", out])
    check(out, meta, expected, extra)
    written = {n for _, _, ns in os.walk(os.path.join(out, "things")) for n in ns}
    assert {n.rsplit(".png", 1)[0] if n.endswith(".png") and n[:-4] in expected else n for n in written} == \
        {n for n, w in expected.items() if w is None}

    assert snapshot(inputs["root"]) == before, "a job wrote next to its inputs"
    assert sorted(os.listdir(workdir)) == ["col", "ds", "rs"], "a job wrote outside its output folder"


def test_truncated_tar_keeps_what_it_can(cases, inputs, workdir):
    files, expected = cases
    out = os.path.join(workdir, "ds")
    meta = downsample.run(["--input", inputs["truncated"], "--output", out, "--split", "train", "--batches", "1",
                           "--size", "8"])
    failures = failures_of(out)
    assert any("truncated" in f["reason"] or "unreadable tar" in f["reason"] for f in failures)
    c = meta["counts"]
    assert c["read"] == c["written"] + c["failed"] and 0 < c["written"] <= sum(w is None for w in expected.values())
