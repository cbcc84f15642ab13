"""imagebeam downsample: ImageNet tars, tar shards or folders -> Imagenet8/16/32/64 batch files (SPEC §2).

    phase 1: IndexInputs (tars, folders, URL lists) -> StageRows (per work unit: read, decode, resize,
             sort by key -> one run file + marker) -> MergeBatches (per key bucket: merge the runs ->
             batch pieces); failures of every step -> WriteFailures; counts + files -> WriteMetadata
    phase 2 (train): batch pieces -> AnalyzeMean (TFT) -> FinalizeBatches (+mean) -> metadata.json

Train: seeded global shuffle into `train_data_batch_1..B`; phase 1 writes them to a hidden staging
folder, phase 2 computes the mean with a TFT analyzer (writing `transform_fn/`), checks it against exact
sums and writes the final files with it. Val: one `val_data` file in file-name order, in one phase.
No image data crosses a runner's shuffle: rows are staged on disk in sorted runs and merged
(transforms/bookkeeping/staging.py), so memory does not grow with the dataset, and a killed run started again with
the same command skips every finished work unit and merged bucket.
"""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from imagebeam.runners import checks, network_options
from imagebeam.runners import options as job_options
from imagebeam.transforms.bookkeeping import fileutil
from imagebeam.transforms.bookkeeping import staging as stage
from imagebeam.transforms.formats.batches import BatchMerger, FinalizeBatches, RowEntryFn, pieces_per_batch
from imagebeam.transforms.imaging.decode import DEFAULT_MAX_PIXELS
from imagebeam.transforms.inputs.labels import LabelMap, load_label_map
from imagebeam.transforms.bookkeeping.report import (WriteFailures, WriteMetadata, conclude, dataset_problems,
                                                      read_json, summary_table, write_metadata)
from imagebeam.transforms.imaging.resize import RESAMPLE_FILTERS, SIZES
from imagebeam.transforms.inputs.all_inputs import IndexAllInputs, StageFromIndex
from imagebeam.transforms.bookkeeping.progress import ReportTotal
from imagebeam.transforms.imaging.rows import LabelMapFromKeys, RowMaker
from imagebeam.transforms.formats.mean_image import AnalyzeMean
from imagebeam.runners.checks import OneLineParser

_LOG = logging.getLogger(__name__)


def make_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="imagebeam downsample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True,
                   help="ILSVRC2012_img_train.tar, a val/flat tar, a glob of tar shards, an image folder "
                        "(root/<class>/*.jpg or flat), or a URL list (fetched, nothing stored); repeat for several")
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
    job_options.add_stage_memory_argument(p)
    job_options.add_failure_rate_argument(p)
    network_options.add_arguments(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Everything checkable before a pipeline starts (one line and exit 2 from the command otherwise)."""
    network_options.fetch_config(args)
    job_options.check_stage_memory(args)
    checks.check_positive(args, "batches")
    checks.check_rate(args.max_failure_rate, "--max-failure-rate")
    checks.check_inputs(args.input)
    checks.check_file(args.devkit, "--devkit")
    checks.check_file(args.class_map, "--class-map")
    checks.check_output(args.output, inputs=args.input)


def write_classes(label_map: LabelMap, output: str) -> str:
    """classes.txt (`label WNID name` per line) beside the data; returns the label order's name."""
    fileutil.write_atomically(fileutil.join(output, "classes.txt"), label_map.class_lines().encode())
    return label_map.order


STAGING = ".staging"
BUCKETS_PER_BATCH = 8  # shuffle buckets per output batch: parallelism of the sort/write step


def build(p: beam.Pipeline, args: argparse.Namespace) -> None:
    """Phase 1: stage every image's row in sorted runs, merge them into batches (train: pieces, no mean)."""
    train = args.split == "train"
    label_map = load_label_map(args.devkit, args.class_map)
    staging = fileutil.join(args.output, STAGING)
    progress = getattr(args, "progress", None)

    fetch_config = network_options.fetch_config(args)
    indexed = p | "IndexInputs" >> IndexAllInputs(args.input, fetch_config, network_options.list_columns(args))
    labels = label_map if label_map is not None else indexed.class_keys | "LabelMap" >> LabelMapFromKeys()
    _ = indexed.estimates | "ProgressTotal" >> ReportTotal(progress)
    rows = RowEntryFn(RowMaker(args.size, args.algorithm, args.fast_decode, args.max_pixels, args.exif_transpose),
                      args.seed if train else None, BUCKETS_PER_BATCH * args.batches if train else 1)
    summaries, failures = p | "StageRows" >> StageFromIndex(
        indexed, staging, rows, getattr(args, "fingerprint", ""), [labels], fetch_config, progress,
        args.stage_memory)

    batch_dir = staging if train else args.output
    files = summaries | "MergeBatches" >> stage.MergeBuckets(
        staging, BatchMerger(batch_dir, args.format, args.size, train, args.batches))

    n_failed = failures | "WriteFailures" >> WriteFailures(args.output)
    units = summaries | "CountUnits" >> stage.UnitCounts()
    n_read = units | "ReadCount" >> beam.Map(lambda c: c["read"])

    label_side = labels if isinstance(labels, beam.PCollection) else p | "StaticLabels" >> beam.Create([labels])
    classes_written = label_side | "WriteClasses" >> beam.Map(write_classes, args.output)
    _ = p | "WriteMetadata" >> WriteMetadata(
        batch_dir, counts={"read": n_read, "failed": n_failed}, files=files, extra=job_facts(args, label_map),
        extra_side={"label_order": classes_written, "run": units}, cleanup=() if train else (staging,))


def build_mean(p: beam.Pipeline, args: argparse.Namespace, staged: dict) -> None:
    """Phase 2 (train): TFT mean over the staged rows, transform_fn, final files, metadata.json."""
    staging = fileutil.join(args.output, STAGING)
    pieces = pieces_per_batch((f["file"] for f in staged["files"]), staging, args.batches)
    staged_paths = p | "StagedFiles" >> beam.Create([path for _, paths in pieces for path in paths])
    analyze = AnalyzeMean(args.output, args.size)
    mean = staged_paths | "AnalyzeMean" >> analyze
    files = (p | "PiecesPerBatch" >> beam.Create(pieces)
             | "FinalizeBatches" >> FinalizeBatches(args.output, args.format, mean))
    _ = (p | "Once" >> beam.Create([None])
         | "WriteMetadata" >> beam.Map(
             lambda _, files: write_final_metadata(args, staged, files, (staging, analyze.temp_dir)),
             beam.pvalue.AsList(files)))


def write_final_metadata(args: argparse.Namespace, staged: dict, files: list, cleanup: tuple) -> dict:
    """metadata.json of a train split: phase 1's facts and counts, the final files."""
    base = {k: v for k, v in staged.items() if k not in ("counts", "files", "versions")}
    counts = {k: v for k, v in staged["counts"].items() if k != "written"}
    return write_metadata(args.output, base, counts, files, cleanup)


def job_facts(args: argparse.Namespace, label_map) -> dict:
    facts = {
        "job": "downsample", "split": args.split, "size": args.size, "algorithm": args.algorithm,
        "fast_decode": args.fast_decode, "format": args.format, "inputs": list(args.input),
        "row_layout": f"uint8 channel-planar RGB, {3 * args.size * args.size} values per row",
        "label_source": (label_map.origin if label_map else "sorted class folder names (classes.txt)"),
        "exif_transpose": args.exif_transpose,
    }
    if args.split == "train":
        facts.update(seed=args.seed, batches=args.batches, transform_fn="transform_fn",
                     mean="tft.mean over all train rows (float64), checked against exact float64 sums")
    return facts


def run(argv: Sequence[str] | None = None, isolate: bool = True) -> dict:
    """Run the job and return the metadata it wrote.

    `isolate`: run phase 2 (TensorFlow) in a child process, keeping TensorFlow out of the caller, whose
    later local pipelines it would otherwise force into child processes (options.run_pipeline). The
    command line does not need it (its process ends with the job) and saves the child's start-up.
    """
    args, pipeline_options = job_options.parse(make_parser(), argv)
    check_args(args)
    fileutil.ensure_dir(args.output)
    staging = fileutil.join(args.output, STAGING)
    # A staging folder left by a killed run of this very job is resumed: finished units are not redone.
    args.fingerprint = stage.fingerprint("downsample", args, [*args.input, *filter(None, (args.devkit, args.class_map))])
    stage.prepare(staging, args.fingerprint)
    fileutil.remove_leftover_temporaries(args.output)  # what a killed run was writing (final names are whole)
    phase1_done = fileutil.join(staging, "metadata.json")
    phase1_reused = args.split == "train" and FileSystems.exists(phase1_done)
    if not phase1_reused:
        job_options.run_job("downsample", build, pipeline_options, args)
    if args.split == "train":
        staged = read_json(phase1_done)
        if phase1_reused:  # every unit of phase 1 was reused: say so in metadata.json's "run"
            staged["run"] = dict(staged.get("run") or {}, phase1_reused=True,
                                 units_reused=(staged.get("run") or {}).get("units", 0))
        if staged["counts"]["written"] == 0:  # no row, no mean: an empty split, which the verdict names
            write_final_metadata(args, staged, [], (fileutil.join(args.output, STAGING),))
        else:
            # TensorFlow (TFT) stays out of local multi-process pipelines; see options.run_pipeline.
            job_options.run_pipeline(build_mean, job_options.in_process(pipeline_options), args, staged,
                                     isolate=isolate, loads_tensorflow=True)
    meta = read_json(fileutil.join(args.output, "metadata.json"))
    _LOG.info("downsample finished: %s", meta["counts"])
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    meta = run(argv, isolate=False)
    args, _ = make_parser().parse_known_args(argv)
    table = summary_table(f"downsample {meta['split']} {meta['size']}x{meta['size']}", meta, args.output)
    problems = dataset_problems(meta, args.max_failure_rate, {meta["split"]: meta["counts"]["written"]})
    return conclude(args.output, meta, table, problems)


def summary(meta: dict) -> str:
    c = meta["counts"]
    files = ", ".join(f"{f['file']} ({f['rows']})" for f in meta["files"])
    return (f"{meta['job']} {meta['split']} {meta['size']}x{meta['size']}: read {c['read']}, "
            f"written {c['written']}, failed {c['failed']} -> {files}")
