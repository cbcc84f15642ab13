"""Crash safety: a job killed with SIGKILL at a random point, then re-run, writes what an uninterrupted run
writes; no partial file is ever visible under a final name."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from imagebeam.transforms.fileutil import TEMP_MARK

pytestmark = [pytest.mark.pipeline, pytest.mark.faults]


def tree(root, skip=("transform_fn",)):
    out = {}
    for dirpath, dirnames, names in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, name), root)] = f.read()
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
