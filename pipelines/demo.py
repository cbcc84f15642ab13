"""imagebeam demo: build the bundled sample from real photos, then run the jobs on it locally.

The sample (scikit-image and scikit-learn's photos, no download) is an ILSVRC2012-style nested train
tar, a flat val tar and a tiny devkit; the demo runs `downsample` for train and val, then `colorize` on
the val tar with RANDOM (untrained) Inception weights, since no pretrained weights can be downloaded
here: its records have the reference layout but meaningless embeddings, and metadata.json says so.
Beam options (e.g. --direct_num_workers 1) pass through to every job.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Sequence

from imagebeam import sample as sample_lib
from imagebeam.pipelines import colorize, downsample
from imagebeam.transforms.bookkeeping.report import natural_key
from imagebeam.runners.checks import OneLineParser


def make_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="imagebeam demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="demo-output", help="where the sample and the outputs go")
    p.add_argument("--size", type=int, default=32, choices=(8, 16, 32, 64))
    p.add_argument("--per-class", type=int, default=12, help="train images per class in the sample")
    p.add_argument("--no-colorize", action="store_true", help="skip the colorize run (it builds Inception)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args, beam_args = make_parser().parse_known_args(argv)
    workdir = os.path.abspath(args.workdir)
    sample_dir = os.path.join(workdir, "sample")
    extra = {"n01440764": sample_lib.oddities()}  # CMYK, PNG named .JPEG, 16-bit, palette, ... all decode
    sample = sample_lib.build_ilsvrc_sample(sample_dir, per_class=args.per_class, extra_train=extra)
    print(f"sample: {sample.train_tar}\n        {sample.val_tar}\n        {sample.devkit}")
    outputs: List[str] = []
    for split, tar in (("train", sample.train_tar), ("val", sample.val_tar)):
        out = os.path.join(workdir, f"imagenet{args.size}", split)
        meta = downsample.run(["--input", tar, "--devkit", sample.devkit, "--output", out, "--split", split,
                               "--size", str(args.size), *beam_args])
        print(downsample.summary(meta))
        outputs.append(out)
    if not args.no_colorize:
        out = os.path.join(workdir, "koalarization")
        meta = colorize.run(["--input", sample.val_tar, "--output", out, "--inception-weights", "random",
                             "--val-fraction", "0.35", "--examples-per-file", "8", "--batch-size", "8",
                             *beam_args])
        print(colorize.summary(meta))
        print("  (demo only: RANDOM Inception weights, the embeddings are meaningless)")
        outputs.append(out)
    print("outputs:")
    for out in outputs:
        print(f"  {out}")
        for name in sorted(os.listdir(out), key=natural_key):
            print(f"    {name}")
    return 0
