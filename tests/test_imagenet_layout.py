"""`imagebeam imagenet-layout` on ILSVRC-style archives built from real photos, and the ImageNet reader."""
import io
import json
import os
import tarfile

import pytest
from PIL import Image

from imagebeam import sample as sample_lib
from imagebeam.pipelines import imagenet_layout
from imagebeam.transforms.inputs.sources import unsafe_member_reason

pytestmark = pytest.mark.pipeline


def hostile_val_tar(path, members):
    """The val members plus what must never be extracted: '..', absolute, a symlink, a hard link, a device."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            sample_lib.add_bytes(tar, name, data)
        sample_lib.add_bytes(tar, "../../escaped.JPEG", b"x")
        sample_lib.add_bytes(tar, "/etc/absolute.JPEG", b"x")
        link = tarfile.TarInfo("ILSVRC2012_val_99999998.JPEG")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        hard = tarfile.TarInfo("hard.JPEG")
        hard.type, hard.linkname = tarfile.LNKTYPE, members[0][0]
        tar.addfile(hard)
        dev = tarfile.TarInfo("dev.JPEG")
        dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
        tar.addfile(dev)
    return str(path)


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    root = tmp_path_factory.mktemp("ilsvrc-layout")
    sample = sample_lib.build_ilsvrc_sample(str(root / "src"), per_class=5, val_per_class=3)
    with tarfile.open(sample.val_tar) as tar:
        val_members = [(m.name, tar.extractfile(m).read()) for m in tar]
    hostile = hostile_val_tar(root / "val_hostile.tar", val_members)
    test_members = [(f"ILSVRC2012_test_{i:08d}.JPEG", data)
                    for i, data in enumerate(sample_lib.imagenet_like_jpegs(4, seed=8), start=1)]
    test_tar = sample_lib.write_tar(str(root / "ILSVRC2012_img_test_v10102019.tar"), test_members)
    return sample, hostile, test_tar, dict(test_members)


def tree(root):
    out = {}
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if "/" in rel:
                with open(path, "rb") as f:
                    out[rel] = f.read()
    return out


def test_unsafe_names():
    assert unsafe_member_reason("../x.JPEG") and unsafe_member_reason("a/../../x") and unsafe_member_reason("/etc/x")
    assert unsafe_member_reason("./n01440764/x.JPEG") is None and unsafe_member_reason("a..b/c.JPEG") is None


def test_layout_every_image_in_place_then_no_work(archives, workdir):
    sample, hostile_val, test_tar, test_members = archives
    out = os.path.join(workdir, "imagenet")
    args = ["--train", sample.train_tar, "--val", hostile_val, "--test", test_tar, "--devkit", sample.devkit,
            "--output", out]
    meta = imagenet_layout.run(args)
    wnid_of_id = {cid: wnid for cid, wnid, _ in sample_lib.SAMPLE_CLASSES}
    expected = {f"train/{key}": data for key, (data, _) in sample.train.items()}
    expected.update({f"val/{wnid_of_id[cid]}/{name}": data for name, (data, cid) in sample.val.items()})
    expected.update({f"test/{name}": data for name, data in test_members.items()})
    got = tree(out)
    assert got == expected  # every image in its folder, byte-identical; nothing else (the hostile members)
    assert not os.path.exists(os.path.join(workdir, "escaped.JPEG"))
    with open(os.path.join(out, "failures.jsonl")) as f:
        reasons = {json.loads(line)["member"]: json.loads(line)["reason"] for line in f}
    assert set(reasons) == {"../../escaped.JPEG", "/etc/absolute.JPEG", "ILSVRC2012_val_99999998.JPEG",
                            "hard.JPEG", "dev.JPEG"}
    assert "'..'" in reasons["../../escaped.JPEG"] and "absolute" in reasons["/etc/absolute.JPEG"]
    assert "symbolic link" in reasons["ILSVRC2012_val_99999998.JPEG"] and "device" in reasons["dev.JPEG"]
    assert meta["counts"] == {"read": len(expected) + 5, "written": len(expected), "failed": 5}
    assert meta["units_extracted"] > 0 and meta["units_skipped"] == 0
    with open(os.path.join(out, "LOC_synset_mapping.txt")) as f:
        assert f.readline().split()[0] == sorted(wnid_of_id.values())[0]

    # a second run does no work: nothing rewritten, same metadata counts and failures
    mtimes = {rel: os.stat(os.path.join(out, rel)).st_mtime_ns for rel in got}
    again = imagenet_layout.run(args)
    assert again["units_extracted"] == 0 and again["units_skipped"] == meta["units_extracted"]
    assert again["counts"] == meta["counts"] and again["files"] == meta["files"]
    assert {rel: os.stat(os.path.join(out, rel)).st_mtime_ns for rel in got} == mtimes

    # an interrupted run (one class's marker and files gone) redoes only that unit
    state = os.path.join(out, imagenet_layout.STATE)
    marker = next(n for n in sorted(os.listdir(state)) if n.startswith("train-"))
    wnid = marker[len("train-"):-len(".done")]
    os.remove(os.path.join(state, marker))
    for name in os.listdir(os.path.join(out, "train", wnid)):
        os.remove(os.path.join(out, "train", wnid, name))
    third = imagenet_layout.run(args)
    assert third["units_extracted"] == 1 and tree(out) == expected


def test_reader_labels_agree_with_devkit(archives, workdir):
    from imagebeam.datasets import ImageNet

    sample, _, test_tar, test_members = archives
    out = os.path.join(workdir, "imagenet")
    imagenet_layout.run(["--train", sample.train_tar, "--val", sample.val_tar, "--test", test_tar,
                         "--devkit", sample.devkit, "--output", out])
    wnids = sorted(w for _, w, _ in sample_lib.SAMPLE_CLASSES)
    words = {w: n for _, w, n in sample_lib.SAMPLE_CLASSES}
    wnid_of_id = {cid: w for cid, w, _ in sample_lib.SAMPLE_CLASSES}
    train = ImageNet(out, split="train")
    assert train.wnids == wnids and train.classes == [words[w] for w in wnids]
    assert len(train) == len(sample.train)
    for i in range(len(train)):
        image, label = train[i]
        assert image.mode == "RGB" and wnids[label] == train.samples[i][0].split(os.sep)[-2]
    valid = ImageNet(out, split="valid")
    assert len(valid) == len(sample.val)
    for path, label in valid.samples:
        cid = sample.val[os.path.basename(path)][1]
        assert wnids[label] == wnid_of_id[cid]  # sorted-WNID label 0..N-1 agrees with the devkit's ILSVRC ID
    image, label = valid[0]
    assert isinstance(image, Image.Image) and image.size == Image.open(io.BytesIO(
        sample.val[os.path.basename(valid.samples[0][0])][0])).size
    test = ImageNet(out, split="test")
    assert len(test) == len(test_members) and test[0][1] is None
    with pytest.raises(ValueError):
        ImageNet(out, split="bogus")
