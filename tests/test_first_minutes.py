"""The first ten minutes of a new user: every mistake is one short line, exit 2, and nothing left behind;
a failed pipeline says its cause, its step and where the traceback is; an unusable dataset is never a
success. Each case runs the real `imagebeam` command in a fresh interpreter."""
import io
import json
import os
import pickle
import re
import socket
import subprocess
import sys
import tarfile

import pytest

from imagebeam import sample as sample_lib
from imagebeam.runners.console import CHATTER


def imagebeam(args, tmp_path, timeout=300, env=None):
    """Run `python -m imagebeam.cli ARGS` from tmp_path with TMPDIR inside it (to see temporary files)."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir(exist_ok=True)
    full_env = dict(os.environ, TMPDIR=str(tmp), IMAGEBEAM_PROGRESS="0", **(env or {}))
    full_env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the command's own default, as for a user
    return subprocess.run([sys.executable, "-m", "imagebeam.cli", *args], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mistakes(ilsvrc, tmp):
    """(name, argv, words the message must hold). `OUT` is the output folder that must not appear."""
    out = str(tmp / "OUT")
    a_file = tmp / "a_file.txt"
    a_file.write_text("not a folder\n")
    empty = tmp / "empty_folder"
    empty.mkdir(exist_ok=True)
    tar = ilsvrc.val_tar
    return [
        ("input missing", ["downsample", "--input", "nope.tar", "--output", out], ["--input", "nope.tar"]),
        ("glob matches nothing", ["downsample", "--input", str(tmp / "shards" / "*.tar"), "--output", out],
         ["--input", "matches no file"]),
        ("input folder empty", ["resize", "--input", str(empty), "--output", out], ["--input", "empty_folder"]),
        ("devkit missing", ["downsample", "--input", tar, "--devkit", "devkit.tar.gz", "--output", out],
         ["--devkit", "devkit.tar.gz"]),
        ("class map missing", ["downsample", "--input", tar, "--class-map", "map_clsloc.txt", "--output", out],
         ["--class-map", "map_clsloc.txt"]),
        ("output is a file", ["downsample", "--input", tar, "--output", str(a_file)], ["--output", "a_file.txt"]),
        ("output is the input", ["resize", "--input", str(tmp), "--output", str(tmp)], ["--output", "--input"]),
        ("bad size", ["downsample", "--input", tar, "--output", out, "--size", "13"], ["--size", "13"]),
        ("no input option", ["downsample", "--output", out], ["--input"]),
        ("unknown option value", ["downsample", "--input", tar, "--output", out, "--format", "hdf5"],
         ["--format", "hdf5"]),
        ("batches zero", ["downsample", "--input", tar, "--output", out, "--batches", "0"], ["--batches"]),
        ("stage memory zero", ["colorize", "--input", tar, "--output", out, "--embedding", "none",
                               "--stage-memory", "0"], ["--stage-memory"]),
        ("failure rate above 1", ["downsample", "--input", tar, "--output", out, "--max-failure-rate", "2"],
         ["--max-failure-rate"]),
        ("weights file missing", ["colorize", "--input", tar, "--output", out, "--inception-weights",
                                  "irv2.weights.h5"], ["--inception-weights", "irv2.weights.h5"]),
        ("conflicting options", ["colorize", "--input", tar, "--output", out, "--embedding", "none",
                                 "--precision", "bfloat16"], ["--precision", "--embedding none"]),
        ("val fraction", ["colorize", "--input", tar, "--output", out, "--val-fraction", "1.5"],
         ["--val-fraction"]),
        ("quality", ["resize", "--input", tar, "--output", out, "--quality", "0"], ["--quality"]),
        ("cifar archive missing", ["cifar", "--input", "cifar-100-python.tar.gz", "--output", out],
         ["--input", "cifar-100-python.tar.gz"]),
        ("layout without a split", ["imagenet-layout", "--devkit", ilsvrc.devkit, "--output", out],
         ["--train", "--val"]),
        ("layout devkit missing", ["imagenet-layout", "--val", tar, "--devkit", "dk.tar.gz", "--output", out],
         ["--devkit", "dk.tar.gz"]),
        ("dask nobody listens", ["resize", "--input", tar, "--output", out, "--runner", "dask",
                                 "--dask-address", f"127.0.0.1:{_free_port()}"], ["--dask-address"]),
        ("unknown job", ["downsampel", "--input", tar, "--output", out], ["downsampel"]),
        ("multi_threading refused", ["resize", "--input", tar, "--output", out, "--direct_running_mode",
                                     "multi_threading"], ["multi_threading"]),
        ("url list missing", ["download", "--input", "nope.txt", "--output", out], ["--input", "nope.txt"]),
        ("shard size zero", ["download", "--input", str(a_file), "--output", out, "--shard-size", "0"],
         ["--shard-size"]),
    ]


@pytest.mark.parametrize("case", range(25))
def test_a_mistake_is_one_line_exit_2_and_leaves_nothing(case, ilsvrc, tmp_path):
    name, argv, words = _mistakes(ilsvrc, tmp_path)[case]
    proc = imagebeam(argv, tmp_path, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (name, proc.returncode, proc.stderr[-2000:])
    assert 1 <= len(lines) <= 3, (name, proc.stderr)
    for word in words:
        assert word in proc.stderr, (name, word, proc.stderr)
    assert "Traceback" not in proc.stderr and not proc.stdout.strip(), (name, proc.stdout)
    assert not os.path.exists(tmp_path / "OUT"), name
    assert not os.listdir(tmp_path / "tmpdir"), (name, os.listdir(tmp_path / "tmpdir"))


def test_the_mistake_list_covers_at_least_15_cases(ilsvrc, tmp_path):
    assert len(_mistakes(ilsvrc, tmp_path)) == 25 >= 15


def test_refusal_names_the_switch_that_allows_it(tmp_path):
    proc = imagebeam(["fetch", "--url", "http://10.1.2.3/ILSVRC2012_img_val.tar", "--output",
                      str(tmp_path / "val.tar")], tmp_path, timeout=60)
    assert proc.returncode != 0 and "--allow-private-networks" in proc.stderr, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) <= 3


def test_imagenet_weights_neither_cached_nor_reachable_fail_at_once(tmp_path, monkeypatch):
    """The launcher's check, not a worker 23 s later (the host is pointed at a port nobody listens on)."""
    from imagebeam.transforms.model import inception

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr(inception, "_KERAS_WEIGHTS_HOST", ("127.0.0.1", _free_port()))
    with pytest.raises(ValueError, match="not cached") as exc:
        inception.check_imagenet_weights()
    assert str(tmp_path / "keras") in str(exc.value) and "--inception-weights" in str(exc.value)
    cached = tmp_path / "keras" / "models" / inception._IMAGENET_WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    inception.check_imagenet_weights()  # cached: nothing to fetch, no network needed


def test_version(tmp_path):
    from imagebeam import __version__

    proc = imagebeam(["--version"], tmp_path, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"imagebeam {__version__}"


@pytest.mark.pipeline
def test_a_failing_step_shows_cause_step_and_log(ilsvrc, tmp_path):
    """A step that raises: the last lines name the cause and the step and point at a log that holds
    the whole traceback; runner internals stay off the terminal."""
    out = tmp_path / "out"
    code = ("import sys\n"
            "from imagebeam.transforms.formats import batches\n"
            "def boom(self, task, entries):\n"
            "    raise ZeroDivisionError('the merge step broke on purpose')\n"
            "batches.BatchMerger.__call__ = boom\n"
            f"sys.argv = ['imagebeam', 'downsample', '--input', {ilsvrc.val_tar!r}, '--devkit', {ilsvrc.devkit!r},"
            f" '--split', 'val', '--size', '8', '--output', {str(out)!r}, '--direct_running_mode', 'in_memory']\n"
            "from imagebeam.cli import main\n"
            "sys.exit(main())\n")
    env = dict(os.environ, TMPDIR=str(tmp_path), IMAGEBEAM_PROGRESS="0")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) <= 6, proc.stderr  # the short error, and nothing of Beam's
    tail = "\n".join(lines[-3:])
    assert "ZeroDivisionError: the merge step broke on purpose" in tail
    assert "MergeBatches" in tail, tail
    log = re.search(r"the full traceback is in (\S+)", tail).group(1)
    assert log.startswith(str(out)), log
    with open(log) as f:
        text = f.read()
    assert "Traceback (most recent call last)" in text
    assert 'line 4, in boom' in text and "ZeroDivisionError: the merge step broke on purpose" in text
    assert "Traceback" not in proc.stderr


def _all_bad_folder(root, n):
    os.makedirs(root / "n01440764", exist_ok=True)
    for i in range(n):
        (root / "n01440764" / f"bad_{i}.JPEG").write_bytes(b"<html>not an image</html>")


@pytest.mark.pipeline
@pytest.mark.parametrize("job,split", [("resize", "images"), ("downsample", "train")])
def test_every_image_failing_is_not_a_success(tmp_path, job, split):
    """Not a failing step either: downsample has no row to average, and says so as its verdict."""
    photos = tmp_path / "photos"
    _all_bad_folder(photos, 5)
    out = tmp_path / "out"
    proc = imagebeam([job, "--input", str(photos), "--output", str(out), "--size", "16"], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "failed in step" not in proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert "NOT USABLE" in last and "5 of 5 inputs failed" in last and f"{split} split is empty" in last
    with open(out / "metadata.json") as f:
        meta = json.load(f)
    assert meta["verdict"]["usable"] is False and meta["counts"]["failed"] == 5
    assert sum(1 for _ in open(out / "failures.jsonl")) == 5


@pytest.mark.pipeline
def test_one_bad_image_in_a_thousand_still_succeeds(tmp_path):
    photos = tmp_path / "photos" / "n01440764"
    photos.mkdir(parents=True)
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(next(sample_lib.imagenet_like_jpegs(1, seed=5)))).resize((24, 18)).save(buf, "JPEG")
    jpeg = buf.getvalue()
    for i in range(999):
        (photos / f"img_{i:04d}.JPEG").write_bytes(jpeg)
    (photos / "img_bad.JPEG").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    proc = imagebeam(["downsample", "--input", str(tmp_path / "photos"), "--output", str(out), "--size", "8",
                      "--split", "val"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "NOT USABLE" not in proc.stdout
    with open(out / "metadata.json") as f:
        meta = json.load(f)
    assert meta["counts"] == {"read": 1000, "written": 999, "failed": 1} and meta["verdict"]["usable"]


@pytest.mark.pipeline
def test_malicious_cifar_train_pickle_is_not_a_success(tmp_path):
    sentinel = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    info = sample_lib.write_cifar_archive(str(tmp_path / "good.tar.gz"))
    archive = tmp_path / "cifar-100-python.tar.gz"
    with tarfile.open(info["path"]) as src, tarfile.open(archive, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name.endswith("/train"):
                data = pickle.dumps({b"data": Payload()}, protocol=2)
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    out = tmp_path / "out"
    proc = imagebeam(["cifar", "--input", str(archive), "--output", str(out)], tmp_path)
    assert not sentinel.exists()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "train split is empty" in proc.stdout.strip().splitlines()[-1]
    assert os.path.exists(out / "failures.jsonl") and os.path.exists(out / "metadata.json")


@pytest.mark.pipeline
def test_demo_output_has_no_tensorflow_start_up_lines(tmp_path):
    proc = imagebeam(["demo", "--workdir", str(tmp_path / "demo"), "--size", "8", "--per-class", "3"], tmp_path,
                     timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    chatter = [line for line in text.splitlines() if CHATTER.match(line) or re.search(
        r"oneDNN|cuda|cuInit|absl::|TF-TRT|tensorflow/core|XLA", line)]
    assert not chatter, chatter[:5]
    assert "outputs:" in proc.stdout


@pytest.mark.pipeline
def test_a_download_where_every_url_fails_the_same_way_is_not_a_success(tmp_path):
    """Dead links are normal; every URL refused (here: private addresses, no traffic) is not."""
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"http://10.9.8.{i}/img{i}.jpg\n" for i in range(1, 6)))
    proc = imagebeam(["download", "--input", str(listing), "--output", str(tmp_path / "dl")], tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert "NOT USABLE" in last and "every one of 5 URLs failed, the same way: blocked" in last, last
