"""Crash safety: a job killed with SIGKILL at a random point, then re-run, writes what an uninterrupted run
writes; no partial file is ever visible under a final name."""
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from spec_loader import comparable  # noqa: E402

from imagebeam.transforms.bookkeeping.fileutil import TEMP_MARK
from imagebeam.transforms.formats.mean_image import TFT_TEMP

pytestmark = [pytest.mark.pipeline, pytest.mark.faults]


def tree(root, skip=("transform_fn",)):
    """Every file by relative path; metadata.json without its "run" section (what this run reused)."""
    out = {}
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, name), root)] = comparable(name, f.read())
    return out


def run_job(args, kill_after=None):
    """`imagebeam ARGS` in its own process group; SIGKILL to the whole group after `kill_after` seconds."""
    proc = subprocess.Popen([sys.executable, "-m", "imagebeam.cli", *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kill_after is None:
        assert proc.wait(600) == 0
        return True
    try:
        proc.wait(kill_after)
        return False  # finished before the kill
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def final_files_are_whole(out, reference):
    """Every file under a final name after the kill is byte-identical to the uninterrupted run's file."""
    for rel, data in tree(out).items():
        name = os.path.basename(rel)
        if rel.startswith(".") or name.startswith(".") or TEMP_MARK in name or "/." in rel:
            continue  # staging folders and temporaries: hidden, removed by the re-run
        assert rel in reference and reference[rel] == data, f"partial or stray file under a final name: {rel}"


@pytest.mark.parametrize("job", ["downsample", "colorize"])
def test_killed_job_rerun_equals_uninterrupted(job, ilsvrc, workdir):
    if job == "downsample":
        args = ["downsample", "--input", ilsvrc.train_tar, "--devkit", ilsvrc.devkit, "--size", "16",
                "--batches", "3"]
    else:
        args = ["colorize", "--input", ilsvrc.train_tar, "--embedding", "none", "--examples-per-file", "7",
                "--batch-size", "5"]
    args += ["--max-failure-rate", "1"]  # the fixture's bad files on purpose: the run is still a success
    clean = os.path.join(workdir, "clean")
    run_job([*args, "--output", clean])
    reference = tree(clean)
    assert "metadata.json" in reference

    rng = random.Random(os.environ.get("PYTEST_XDIST_WORKER", "") + job)
    out = os.path.join(workdir, "killed")
    start = time.monotonic()
    killed = run_job([*args, "--output", out], kill_after=rng.uniform(2.0, 8.0))
    if killed:
        final_files_are_whole(out, reference)
        assert not os.path.exists(os.path.join(out, "metadata.json")) or \
            tree(out)["metadata.json"] == reference["metadata.json"]
    run_job([*args, "--output", out])
    assert tree(out) == reference, f"killed after {time.monotonic() - start:.1f} s: outputs differ"
    leftovers = [n for n in os.listdir(out) if n.startswith(".")]
    assert not leftovers, leftovers


def many_images_tar(path, n, seed):
    from imagebeam import sample as sample_lib

    sample_lib.write_tar(path, [(f"c{i % 3}/img_{i:05d}.JPEG", data)
                                for i, data in enumerate(sample_lib.imagenet_like_jpegs(n, seed=seed))])
    return path


def run_until_units_staged(args, out, timeout=300, marker="units"):
    """Run the job and SIGKILL its whole process group as soon as a first work unit is staged (or a first
    marker of another kind: `marker` is the folder under .staging)."""
    proc = subprocess.Popen([sys.executable, "-m", "imagebeam.cli", *args, "--output", out], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if glob.glob(os.path.join(out, ".staging", marker, "*.json")):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    return sorted(glob.glob(os.path.join(out, ".staging", "units", "*.json")))


@pytest.mark.parametrize("job", ["downsample", "colorize", "resize"])
def test_rerun_after_kill_redoes_only_unfinished_units(job, tmp_path):
    """Killed once a first unit is staged: the re-run reuses exactly the units whose markers exist, stages
    only the others, and writes what an uninterrupted run writes."""
    tar = many_images_tar(str(tmp_path / "flat.tar"), 1100, seed=5)  # 5 work units of <= 256 members
    if job == "downsample":
        args = [job, "--input", tar, "--size", "8", "--batches", "2", "--direct_num_workers", "2"]
    elif job == "colorize":
        args = [job, "--input", tar, "--embedding", "none", "--examples-per-file", "300", "--direct_num_workers", "2"]
    else:
        args = [job, "--input", tar, "--size", "32", "--direct_num_workers", "2"]
    clean = str(tmp_path / "clean")
    run_job([*args, "--output", clean])
    reference = tree(clean)
    clean_run = json.loads(open(os.path.join(clean, "metadata.json")).read())["run"]
    assert clean_run["units"] == 5 and clean_run["units_reused"] == 0

    out = str(tmp_path / "killed")
    done = run_until_units_staged(args, out)
    assert done, "no unit was staged before the job ended"
    # What a run killed inside TFT's analysis leaves (downsample train): the re-run must remove it too.
    if job == "downsample":
        scratch = os.path.join(out, TFT_TEMP, "tftransform_tmp", "killed")
        os.makedirs(scratch)
        open(os.path.join(scratch, "part"), "wb").write(b"x")
    run_job([*args, "--output", out])
    run = json.loads(open(os.path.join(out, "metadata.json")).read())["run"]
    assert run["units"] == 5 and run["units_reused"] == len(done)  # staged again: only 5 - len(done) units
    assert tree(out) == reference
    assert not [n for n in os.listdir(out) if n.startswith(".")], os.listdir(out)


@pytest.mark.parametrize("marker", ["chunks", "files"])
def test_colorize_killed_while_writing_pieces_or_files(marker, tmp_path):
    """Killed once a first chunk (its piece) or a first record file is done: the re-run takes the chunks
    and files the markers record, redoes the rest, removes the temporary file a killed write left, and
    writes what an uninterrupted run writes."""
    tar = many_images_tar(str(tmp_path / "flat.tar"), 1100, seed=5)
    args = ["colorize", "--input", tar, "--embedding", "none", "--examples-per-file", "300",
            "--direct_num_workers", "2"]
    clean = str(tmp_path / "clean")
    run_job([*args, "--output", clean])
    out = str(tmp_path / "killed")
    proc_staged = run_until_units_staged(args, out, marker=marker)
    assert proc_staged, f"no {marker} marker was written before the job ended"
    run_job([*args, "--output", out])
    assert tree(out) == tree(clean)
    assert not [n for n in os.listdir(out) if n.startswith(".")], os.listdir(out)
