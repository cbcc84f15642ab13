"""sha256 digests of job outputs on the test fixtures, to hold the output bytes fixed across redesigns.

`tests/output_digests.json` holds the digests the code produced before the bounded-memory redesign
(issue 13); `tests/test_output_digests.py` checks that every runner and worker count still produces
them, with one change made on purpose: since colorize decodes each image once, after the
merge (issue 16), a JPEG that is truncated fails there, inside its embedding batch, instead of before
the batches are cut, so in colorize-train-random one batch of `--batch-size 4` holds 3 images and the
embedding of n01751748_1002.JPEG in lab_images_7.tfrecord moved by at most 4.8e-8 (its name, L and ab,
and every other record and failures.jsonl are the bytes they were). Paths inside outputs (failures.jsonl names the input files) are written relative to the fixture
root first, so the digests do not depend on where pytest puts its temporary folders.

    python tests/output_digests.py --record   # prints the digests of the current code's outputs
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
RECORDED = os.path.join(HERE, "output_digests.json")
# metadata.json holds versions and absolute paths; transform_fn/ is a SavedModel that differs between
# any two runs (its mean is checked by the tests instead).
SKIP_FILES = {"metadata.json"}
# The fixture holds bad files on purpose (they must land in failures.jsonl): more than the jobs' default
# --max-failure-rate, which would make the command exit 1 for an unusable dataset.
TOLERATE_BAD_INPUTS = ("--max-failure-rate", "1")
SKIP_DIRS = {"transform_fn", "transformed_metadata"}


def cases(sample) -> Dict[str, List[str]]:
    """Case name -> job argv (without --output) on the `ilsvrc` fixture of conftest.py."""
    train = ["--input", sample.train_tar, "--devkit", sample.devkit, "--size", "16", "--batches", "3"]
    val = ["--input", sample.val_tar, "--devkit", sample.devkit, "--split", "val", "--size", "16"]
    colorize = ["--inception-weights", "random", "--batch-size", "4", "--examples-per-file", "5"]
    return {
        "downsample-train-pickle": ["downsample", *train],
        "downsample-train-npz": ["downsample", *train, "--format", "npz", "--seed", "3"],
        "downsample-val-pickle": ["downsample", *val],
        "downsample-val-npz": ["downsample", *val, "--format", "npz", "--size", "8"],
        "colorize-val-random": ["colorize", "--input", sample.val_tar, *colorize, "--val-fraction", "0.3"],
        "colorize-train-random": ["colorize", "--input", sample.train_tar, *colorize, "--seed", "5"],
    }


def digests(output: str, root: str) -> Dict[str, str]:
    """Relative path -> sha256 of every output file (fixture paths made relative to `root`)."""
    out = {}
    for dirpath, dirnames, names in os.walk(output):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in sorted(names):
            if name in SKIP_FILES:
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                data = f.read()
            if name == "failures.jsonl":
                data = data.replace(json.dumps(root.rstrip("/"))[1:-1].encode() + b"/", b"ROOT/")
            out[os.path.relpath(path, output)] = hashlib.sha256(data).hexdigest()
    return out


def recorded() -> Dict[str, Dict[str, str]]:
    with open(RECORDED) as f:
        return json.load(f)["cases"]


def main(argv: List[str]) -> int:
    """Build the fixture as conftest.py does, run every case with the current code, print the digests."""
    import tempfile

    sys.path.insert(0, HERE)
    from imagebeam import sample as sample_lib
    from imagebeam.cli import main as cli_main

    work = tempfile.mkdtemp(prefix="digests-")
    good = next(sample_lib.imagenet_like_jpegs(1, seed=7))
    sample = sample_lib.build_ilsvrc_sample(
        os.path.join(work, "ilsvrc"), per_class=9, val_per_class=4,
        extra_train={"n01440764": sample_lib.oddities(), "n01751748": sample_lib.bad_inputs(good)})
    result = {}
    only = os.environ.get("DIGEST_CASES", "")
    for name, args in cases(sample).items():
        if only and not any(name.startswith(o) for o in only.split(",")):
            continue
        out = os.path.join(work, name)
        assert cli_main([*args, "--output", out, *TOLERATE_BAD_INPUTS, *argv]) in (0, None)
        result[name] = digests(out, sample.root)
    print(json.dumps({"cases": result}, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main([a for a in sys.argv[1:] if a != "--record"]))
