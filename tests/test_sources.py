"""Tar and folder sources: indexing spreads work, reading by offset, broken pieces become failures."""
import io
import os
import tarfile

from imagebeam import sample as sample_lib
from imagebeam.transforms.inputs import sources


def read_all(spec):
    blobs, failures = [], []
    for item in sources.index_input(spec):
        if isinstance(item, sources.Failure):
            failures.append(item)
            continue
        for out in sources.read_unit(item):
            (failures if isinstance(out, sources.Failure) else blobs).append(out)
    return blobs, failures


def test_nested_train_tar_is_one_unit_per_member_tar(ilsvrc):
    units = list(sources.index_input(ilsvrc.train_tar))
    assert [u.kind for u in units] == ["member_tar"] * 3
    assert sorted(u.name for u in units) == ["n01440764.tar", "n01751748.tar", "n02119789.tar"]
    blobs, failures = read_all(ilsvrc.train_tar)
    assert not failures
    by_name = {b.name: b for b in blobs}
    for name, (data, _) in ilsvrc.train.items():
        assert by_name[name].data == data
        assert by_name[name].class_key == name.split("/")[0]


def test_flat_tar_is_split_into_units(tmp_path, monkeypatch):
    jpegs = list(sample_lib.imagenet_like_jpegs(7))
    path = sample_lib.write_tar(str(tmp_path / "shard-0.tar"), [(f"d/x{i}.jpg", d) for i, d in enumerate(jpegs)])
    monkeypatch.setattr(sources, "UNIT_MAX_MEMBERS", 3)
    units = list(sources.index_input(path))
    assert [len(u.members) for u in units] == [3, 3, 1]
    blobs, failures = read_all(str(tmp_path / "shard-*.tar"))
    assert not failures and [b.data for b in sorted(blobs, key=lambda b: int(b.name[3:-4]))] == jpegs
    assert {b.class_key for b in blobs} == {"d"}


def test_links_and_truncated_tars_become_failures(tmp_path, good_jpeg):
    path = str(tmp_path / "hostile.tar")
    with tarfile.open(path, "w") as tar:
        sample_lib.add_bytes(tar, "ok.jpg", good_jpeg)
        link = tarfile.TarInfo("evil.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        sample_lib.add_bytes(tar, "../escape.jpg", good_jpeg)
    blobs, failures = read_all(path)
    # a name climbing out with ".." is refused by every source (imagenet-layout writes member names to disk)
    assert sorted((b.name, b.class_key) for b in blobs) == [("ok.jpg", None)]
    reasons = sorted(f.reason for f in failures)
    assert len(reasons) == 2 and "symbolic link" in reasons[0] and "'..'" in reasons[1]

    raw = open(path, "rb").read()
    cut = str(tmp_path / "cut.tar")
    with open(cut, "wb") as f:
        f.write(raw[: 512 + len(good_jpeg) // 2])
    blobs, failures = read_all(cut)
    reasons = {f.member: f.reason for f in failures}
    assert not blobs
    assert reasons["ok.jpg"] == f"truncated tar: member has {len(good_jpeg) // 2} of its {len(good_jpeg)} bytes"
    assert "unreadable tar after 1 members" in reasons[None]


def test_truncated_member_tar_keeps_what_it_could_read(tmp_path, good_jpeg):
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w") as tar:
        for i in range(3):
            sample_lib.add_bytes(tar, f"n00000001_{i}.JPEG", good_jpeg)
    broken = inner.getvalue()[: 2 * (512 + len(good_jpeg)) + 1024]
    outer = sample_lib.write_tar(str(tmp_path / "train.tar"), [("n00000001.tar", broken)])
    blobs, failures = read_all(outer)
    assert len(blobs) >= 1 and len(failures) == 1
    assert failures[0].member == "n00000001.tar" and "unreadable tar" in failures[0].reason


def test_folder_and_gz_stream(image_folder, tmp_path, good_jpeg):
    blobs, failures = read_all(image_folder)
    assert len(blobs) == 10 and not failures
    assert {b.class_key for b in blobs} == {"zebra", "apple", "mango"}
    gz = str(tmp_path / "shard.tar.gz")
    with tarfile.open(gz, "w:gz") as tar:
        sample_lib.add_bytes(tar, "a/1.jpg", good_jpeg)
    blobs, failures = read_all(gz)
    assert [(b.name, b.class_key) for b in blobs] == [("a/1.jpg", "a")] and not failures
    assert os.path.exists(gz)


def test_member_tar_with_long_names_and_links_hands_over_to_tarfile(tmp_path, good_jpeg):
    long_name = "n00000002_" + "x" * 120 + ".JPEG"  # needs a pax header: the plain reader stops there
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w", format=tarfile.PAX_FORMAT) as tar:
        sample_lib.add_bytes(tar, "n00000002_1.JPEG", good_jpeg)
        sample_lib.add_bytes(tar, long_name, good_jpeg[::-1])
        link = tarfile.TarInfo("n00000002_link.JPEG")
        link.type, link.linkname = tarfile.SYMTYPE, "n00000002_1.JPEG"
        tar.addfile(link)
        sample_lib.add_bytes(tar, "n00000002_3.JPEG", good_jpeg[:100])
    outer = sample_lib.write_tar(str(tmp_path / "train.tar"), [("n00000002.tar", inner.getvalue())])
    blobs, failures = read_all(outer)
    got = {b.name: b.data for b in blobs}
    assert got == {"n00000002/n00000002_1.JPEG": good_jpeg, f"n00000002/{long_name}": good_jpeg[::-1],
                   "n00000002/n00000002_3.JPEG": good_jpeg[:100]}
    assert {b.class_key for b in blobs} == {"n00000002"}
    assert [(f.member, "symbolic link" in f.reason) for f in failures] == [
        ("n00000002.tar/n00000002_link.JPEG", True)]


def test_plain_reader_matches_tarfile_on_the_sample(ilsvrc):
    """Every member tar of the sample read by the plain reader equals what tarfile extracts."""
    with tarfile.open(ilsvrc.train_tar) as outer:
        expected = {}
        for member in outer:
            with tarfile.open(fileobj=outer.extractfile(member)) as inner:
                for m in inner:
                    expected[f"{member.name[:-4]}/{m.name}"] = inner.extractfile(m).read()
    blobs, failures = read_all(ilsvrc.train_tar)
    assert not failures and {b.name: b.data for b in blobs} == expected
