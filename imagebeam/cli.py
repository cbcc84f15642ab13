"""The `imagebeam` command: one sub-command per job, each a `run(argv)` in imagebeam.pipelines."""
from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import List, Optional

JOBS = {
    "downsample": ("imagebeam.pipelines.downsample", "ImageNet tars/folders -> Imagenet8/16/32/64 batches"),
    "colorize": ("imagebeam.pipelines.colorize",
                 "images -> koalarization Lab + Inception-ResNet-v2 TFRecords (SPEC §3)"),
    "download": ("imagebeam.pipelines.download",
                 "URL lists -> md5(url).jpeg files + manifest.jsonl (restartable, polite, deduplicated)"),
    "cifar": ("imagebeam.pipelines.cifar",
              "CIFAR-10/100 python archives -> processed pickle (sharpened, shuffled), TFRecords or Imagenet32 batches"),
    "fetch": ("imagebeam.pipelines.fetch_archive:fetch_main",
              "download an archive (CIFAR, ILSVRC2012 by name, or --url) with resume and md5 check"),
    "verify": ("imagebeam.pipelines.fetch_archive:verify_main", "check the md5 of archives on disk"),
    "imagenet-layout": ("imagebeam.pipelines.imagenet_layout",
                        "ILSVRC2012 train/val/test tars + devkit -> ROOT/{train,val}/<wnid>/, ROOT/test/"),
    "preview": ("imagebeam.preview:preview_main", "PNG contact sheet of random samples from any imagebeam output"),
    "inspect": ("imagebeam.inspect_outputs:inspect_main",
                "counts, labels, sizes and format checks of an output (exit 1 on a failed check)"),
    "resize": ("imagebeam.pipelines.resize", "images -> 299x299 letterboxed image files (koalarization's resize)"),
    "convert-weights": ("imagebeam.convert_weights",
                        "TF-slim Inception checkpoint -> .npz weights for --embedding-backend jax/torch (needs TF)"),
    "demo": ("imagebeam.pipelines.demo", "build the bundled sample from real photos and run the jobs on it"),
}


def usage() -> str:
    lines = ["usage: imagebeam <job> [options] [beam pipeline options]", "", "jobs:"]
    lines += [f"  {name:<12} {about}" for name, (_, about) in JOBS.items()]
    lines += ["", "`imagebeam <job> --help` lists a job's options; other --flags go to Beam (e.g. --runner)."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    job, rest = argv[0], argv[1:]
    if job not in JOBS:
        print(f"imagebeam: unknown job {job!r}\n\n{usage()}", file=sys.stderr)
        return 2
    # TensorFlow's C++ INFO/WARNING lines drown the job's own output; inherited by the SDK workers.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # The local job service relays every SDK worker's start-up warnings; keep its errors only.
    logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(logging.ERROR)
    module_name, _, function = JOBS[job][0].partition(":")
    module = importlib.import_module(module_name)
    entry = getattr(module, function or ("main" if hasattr(module, "main") else "run"))
    result = entry(rest)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
