"""imagebeam downsample: ImageNet tars, tar shards or folders -> Imagenet8/16/32/64 batch files (SPEC §2).

    IndexInputs -> ReadImages -> DecodeResize -> AssignBatches -> GroupBatches -> WriteBatches
                                                             \\-> AnalyzeMean (TFT) --mean--/
    failures of every step -> WriteFailures;   counts + files -> WriteMetadata (last)

Train: seeded global shuffle into `train_data_batch_1..B` with the TFT mean and `transform_fn/`.
Val: one `val_data` file in file-name order, labelled from the devkit's ground truth.
"""
from __future__ import annotations

import argparse
import json
import logging
from typing import Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from imagebeam.pipelines import options as job_options
from imagebeam.transforms import fileutil
from imagebeam.transforms.batches import AssignBatches, GroupBatches, WriteBatches
from imagebeam.transforms.decode import DEFAULT_MAX_PIXELS
from imagebeam.transforms.labels import LabelMap, load_label_map
from imagebeam.transforms.report import WriteFailures, WriteMetadata
from imagebeam.transforms.resize import RESAMPLE_FILTERS, SIZES
from imagebeam.transforms.rows import DecodeToRows, LabelMapFromIndex
from imagebeam.transforms.sources import IndexInputs, ReadImages
from imagebeam.transforms.stats import AnalyzeMean

_LOG = logging.getLogger(__name__)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagebeam downsample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True,
                   help="ILSVRC2012_img_train.tar, a val/flat tar, a glob of tar shards, or an image folder "
                        "(root/<class>/*.jpg or flat); repeat for several")
    p.add_argument("--output", required=True, help="output folder (local or any Beam filesystem, e.g. gs://)")
    p.add_argument("--split", choices=("train", "val"), default="train")
    p.add_argument("--size", type=int, choices=SIZES, default=32)
    p.add_argument("--batches", type=int, default=10, help="number of train files (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (train)")
    p.add_argument("--format", choices=("pickle", "npz"), default="pickle")
    p.add_argument("--algorithm", choices=sorted(RESAMPLE_FILTERS), default="box",
                   help="Pillow resampling filter (the published Imagenet32/64 used box)")
    p.add_argument("--fast-decode", action="store_true",
                   help="JPEG DCT-domain downscaling before the resize: about 2x faster, not pixel-exact")
    p.add_argument("--devkit", help="ILSVRC2012_devkit_t12.tar.gz: ILSVRC2012_ID labels + val ground truth")
    p.add_argument("--class-map", help="map_clsloc.txt (WNID ID name): ILSVRC2012_ID labels")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="images declaring more pixels are refused as decompression bombs")
    p.add_argument("--exif-transpose", action="store_true",
                   help="apply EXIF orientation (off by default: the reference resizer ignores it)")
    return p


def check_args(args: argparse.Namespace) -> None:
    if args.batches < 1:
        raise SystemExit("--batches must be at least 1")
    for path in (args.devkit, args.class_map):
        if path and not FileSystems.exists(path):
            raise SystemExit(f"no such file: {path}")


def write_classes(label_map: LabelMap, output: str) -> str:
    """classes.txt (`label WNID name` per line) beside the data; returns the label order's name."""
    fileutil.write_atomically(fileutil.join(output, "classes.txt"), label_map.class_lines().encode())
    return label_map.order


def build(p: beam.Pipeline, args: argparse.Namespace) -> None:
    train = args.split == "train"
    label_map = load_label_map(args.devkit, args.class_map)

    indexed = p | "IndexInputs" >> IndexInputs(args.input)
    labels = label_map if label_map is not None else indexed | "ClassesFromIndex" >> LabelMapFromIndex()
    blobs, read_failures = indexed | "ReadImages" >> ReadImages()
    rows, decode_failures = blobs | "DecodeResize" >> DecodeToRows(
        labels, args.size, args.algorithm, args.fast_decode, args.max_pixels, args.exif_transpose)

    assign = AssignBatches(args.batches, args.seed if train else None)
    assigned = rows | "AssignBatches" >> assign
    mean, cleanup = None, ()
    if train:
        analyze = AnalyzeMean(args.output, args.size)
        mean, cleanup = assigned | "AnalyzeMean" >> analyze, (analyze.temp_dir,)
    files = (assigned
             | "GroupBatches" >> GroupBatches(assign.batches)
             | "WriteBatches" >> WriteBatches(args.output, args.format, args.size, train, mean))

    failures = (read_failures, decode_failures) | "AllFailures" >> beam.Flatten()
    n_failed = failures | "WriteFailures" >> WriteFailures(args.output)
    n_read = ((blobs | "OnePerImage" >> beam.Map(lambda _: 1),
               read_failures | "OnePerUnreadable" >> beam.Map(lambda _: 1))
              | "AllRead" >> beam.Flatten() | "CountRead" >> beam.CombineGlobally(sum))

    label_side = labels if isinstance(labels, beam.PCollection) else p | "StaticLabels" >> beam.Create([labels])
    classes_written = label_side | "WriteClasses" >> beam.Map(write_classes, args.output)

    extra = {
        "job": "downsample", "split": args.split, "size": args.size, "algorithm": args.algorithm,
        "fast_decode": args.fast_decode, "format": args.format, "inputs": list(args.input),
        "row_layout": f"uint8 channel-planar RGB, {3 * args.size * args.size} values per row",
        "label_source": (label_map.origin if label_map else "sorted class folder names (classes.txt)"),
        "exif_transpose": args.exif_transpose,
    }
    if train:
        extra.update(seed=args.seed, batches=args.batches, transform_fn="transform_fn")
    _ = p | "WriteMetadata" >> WriteMetadata(
        args.output, counts={"read": n_read, "failed": n_failed}, files=files, extra=extra,
        extra_side={"label_order": classes_written}, cleanup_paths=cleanup)


def run(argv: Sequence[str] | None = None) -> dict:
    """Run the job and return the metadata it wrote."""
    args, pipeline_options = job_options.parse(make_parser(), argv)
    check_args(args)
    fileutil.ensure_dir(args.output)
    with beam.Pipeline(options=pipeline_options) as p:
        build(p, args)
    with FileSystems.open(fileutil.join(args.output, "metadata.json")) as f:
        meta = json.load(f)
    _LOG.info("downsample finished: %s", meta["counts"])
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    meta = run(argv)
    print(summary(meta))
    return 0


def summary(meta: dict) -> str:
    c = meta["counts"]
    files = ", ".join(f"{f['file']} ({f['rows']})" for f in meta["files"])
    return (f"{meta['job']} {meta['split']} {meta['size']}x{meta['size']}: read {c['read']}, "
            f"written {c['written']}, failed {c['failed']} -> {files}")
