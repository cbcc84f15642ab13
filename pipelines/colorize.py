"""imagebeam colorize: images -> deep-koalarization's Lab + Inception-ResNet-v2 TFRecords (SPEC §3).

    IndexInputs (tars, folders, URL lists) -> StageImages (per work unit: header check, sorted run on disk)
        -> MergeChunks (per key bucket: merge the runs, cut into chunks in the seeded order)
        -> Letterbox (the one decode of each image, 299 on white)
        -> EmbedChunks (RunInference: grey -> [-1, 1] -> Inception-ResNet-v2 logits, one chunk per call)
        -> WriteRecordFiles (a staged piece per chunk; ranks placed from the pieces' rows; per file:
           224 bilinear -> Lab -> L' = 2L/100 - 1, ab' = ab/127 -> tf.train.Example)
    failures of every step -> failures.jsonl; counts + files -> metadata.json (written last)

No image data crosses a runner's shuffle (transforms/bookkeeping/staging.py), so memory does not grow with the
dataset; a killed run started again with the same command skips finished units, chunks and files.

Writes `lab_images_K.tfrecord` (and `val_lab_images_K.tfrecord` with --val-fraction), `--examples-per-file`
records each, in the order of a seeded hash of the image name, so reruns and any worker count give the
same bytes.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Sequence, Tuple

import apache_beam as beam
from apache_beam.options.pipeline_options import StandardOptions

from imagebeam.runners import checks, network_options
from imagebeam.runners import options as job_options
from imagebeam.transforms.bookkeeping import fileutil
from imagebeam.transforms.model import inception
from imagebeam.transforms.model.inception import PRECISIONS
from imagebeam.transforms.bookkeeping import staging as stage
from imagebeam.transforms.imaging.decode import DEFAULT_MAX_PIXELS
from imagebeam.transforms.model.embedding_backends import BACKENDS, COMPILE_MODES, check_available
from imagebeam.transforms.formats.lab_records import RECORD_FORMATS
from imagebeam.transforms.formats.lab_shards import (DONE, DONE_FAILURES, FILE_PREFIX, STAGING_LAYOUT,
                                                     BucketCount, ChunkMerger, FitParams, FittedChunk, LabEntryFn,
                                                     WriteRecordFiles, fit_chunk)
from imagebeam.transforms.bookkeeping.progress import ReportTotal
from imagebeam.transforms.bookkeeping.report import (WriteFailures, WriteMetadata, conclude, dataset_problems,
                                                      read_json, rows_per_split, summary_table)
from imagebeam.transforms.imaging.resize import FIT_MODES
from imagebeam.transforms.inputs.all_inputs import IndexAllInputs, StageFromIndex
from imagebeam.runners.checks import OneLineParser

_LOG = logging.getLogger(__name__)
STAGING = ".staging"
EMBEDDINGS = ("inception_resnet_v2", "none")


def make_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="imagebeam colorize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True,
                   help="image folder, tar, glob of tar shards, or URL list (as for downsample); repeat for several")
    p.add_argument("--output", required=True, help="output folder (local or any Beam filesystem)")
    p.add_argument("--embedding", choices=EMBEDDINGS, default="inception_resnet_v2",
                   help="'none' writes records without image_embedding (the CPU side alone)")
    p.add_argument("--inception-weights", default="imagenet",
                   help="imagenet (Keras' published weights, cached by Keras), a Keras weights file "
                        "(.h5/.weights.h5/.keras), the TF-slim checkpoint inception_resnet_v2_2016_08_30.ckpt "
                        "(1001 logits, as koalarization), its .npz conversion (`imagebeam convert-weights`), or random (untrained: tests and demos only)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call (default 64)")
    p.add_argument("--model-copies", type=int, default=None,
                   help="models per worker machine, shared by its processes (GPU workers); default: one "
                        "per process")
    p.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help="bfloat16 / mixed_float16: Keras' mixed policies (float32 weights and logits)")
    p.add_argument("--embedding-backend", choices=BACKENDS, default="tensorflow",
                   help="Keras backend that runs the model: tensorflow, jax or torch (the same weights and "
                        "logits on each; jax and torch need `pip install 'imagebeam[jax]'` / `[torch]`)")
    p.add_argument("--embedding-compile", choices=COMPILE_MODES, default="auto",
                   help="auto: XLA for jax, torch.compile for torch on a GPU, a graph function for "
                        "tensorflow; on / off force it (on = XLA jit_compile for tensorflow)")
    p.add_argument("--embedding-accelerator", default=None, metavar="HINT",
                   help="Beam accelerator resource hint for the embedding step only, e.g. "
                        "'type:nvidia-tesla-t4;count:1;install-nvidia-driver': on Dataflow only that step "
                        "runs on GPU workers (other runners may ignore it); default: none")
    p.add_argument("--record-format", choices=RECORD_FORMATS, default="reference",
                   help="reference: float features as koalarization reads them; compact: L and ab as "
                        "8-bit bytes (about 4x smaller; read with imagebeam's read_lab_records)")
    p.add_argument("--examples-per-file", type=int, default=500)
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="share of images written to val_lab_images_K.tfrecord (seeded hash of the name)")
    p.add_argument("--seed", type=int, default=0, help="seed of the record order and the val split")
    p.add_argument("--compression", choices=("none", "gzip"), default="none",
                   help="none (the reference reads uncompressed) or gzip (TFRecordDataset "
                        "compression_type='GZIP')")
    p.add_argument("--mode", choices=sorted(FIT_MODES), default="letterbox",
                   help="how images become 299x299 (letterbox on white, as the reference)")
    p.add_argument("--buckets", type=int, default=None,
                   help="shuffle buckets per split (default: about one per 512 images)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--exif-transpose", action="store_true")
    p.add_argument("--fast-decode", action="store_true",
                   help="decode JPEGs with libjpeg's DCT scaling (1/2, 1/4, 1/8) down to the letterboxed "
                        "size before the Lanczos: faster on large photos, not bit-exact (the pixel error is "
                        "in README); what the reference's thumbnail did in the Pillow it pinned")
    job_options.add_stage_memory_argument(p)
    job_options.add_failure_rate_argument(p)
    network_options.add_arguments(p)
    return p


def check_args(args: argparse.Namespace, runner: str | None = None) -> None:
    """Everything checkable before a pipeline starts (one line and exit 2 from the command otherwise)."""
    network_options.fetch_config(args)
    job_options.check_stage_memory(args)
    checks.check_positive(args, "batch_size", "examples_per_file", "model_copies", "buckets")
    if not 0.0 <= args.val_fraction < 1.0:
        raise checks.UsageError(f"--val-fraction must be in [0, 1), not {args.val_fraction}")
    checks.check_rate(args.max_failure_rate, "--max-failure-rate")
    checks.check_inputs(args.input)
    checks.check_output(args.output, inputs=args.input)
    if args.embedding == "none":
        given = [flag for flag, value, default in (
            ("--embedding-backend", args.embedding_backend, "tensorflow"), ("--precision", args.precision, "float32"),
            ("--embedding-accelerator", args.embedding_accelerator, None), ("--model-copies", args.model_copies, None))
            if value != default]
        if given:
            raise checks.UsageError(f"{given[0]} has no effect with --embedding none (nothing runs the model); "
                                    "drop one of the two")
        return
    try:
        kind = inception.weights_kind(args.inception_weights)
    except ValueError as exc:
        raise checks.UsageError(f"--inception-weights: {exc}") from None
    if job_options.is_local_runner(runner):
        try:  # remote workers bring their own packages and caches; a local run can be checked here
            check_available(args.embedding_backend)
        except ValueError as exc:
            raise checks.UsageError(f"--embedding-backend: {exc}") from None
        if kind == inception.IMAGENET:
            try:
                inception.check_imagenet_weights()
            except ValueError as exc:
                raise checks.UsageError(f"--inception-weights imagenet: {exc}") from None


def build(p: beam.Pipeline, args: argparse.Namespace) -> None:
    staging = fileutil.join(args.output, STAGING)
    progress = getattr(args, "progress", None)
    fetch_config = network_options.fetch_config(args)
    indexed = p | "IndexInputs" >> IndexAllInputs(args.input, fetch_config, network_options.list_columns(args))
    n_buckets = indexed.estimates | "BucketCount" >> BucketCount(args.buckets)
    _ = indexed.estimates | "ProgressTotal" >> ReportTotal(progress)
    params = FitParams(args.mode, args.max_pixels, args.exif_transpose, getattr(args, "fast_decode", False))
    summaries, stage_failures = p | "StageImages" >> StageFromIndex(
        indexed, staging, LabEntryFn(args.seed, args.val_fraction, params), getattr(args, "fingerprint", ""), [n_buckets],
        fetch_config, None, args.stage_memory)  # progress is ticked when records are written
    merged = summaries | "MergeChunks" >> stage.MergeBuckets(
        staging, ChunkMerger(args.batch_size, staging), resumable=False, tags=[DONE, DONE_FAILURES])
    # Typed: FittedChunk's registered coder sizes its pixels without pickling them (Beam samples sizes).
    chunks = merged.main | "Letterbox" >> beam.Map(fit_chunk, params).with_output_types(FittedChunk)

    failure_sets = [*stage_failures, merged[DONE_FAILURES]]
    if args.embedding == "none":
        embedded = chunks | "NoEmbedding" >> beam.Map(lambda chunk: (chunk, None)).with_output_types(
            Tuple[FittedChunk, Any])
    else:
        # Imported here: Beam's RunInference module imports PyTorch wherever it is installed (its model
        # manager), about 0.4 GiB in every process; `--embedding none` workers never need it.
        from imagebeam.transforms.model.embedding import EmbedChunks

        embed = EmbedChunks(args.inception_weights, args.precision, args.model_copies, args.embedding_backend,
                            args.embedding_compile, args.batch_size)
        if args.embedding_accelerator:
            embed = embed.with_resource_hints(accelerator=args.embedding_accelerator)
        embedded, embed_failures = chunks | "EmbedChunks" >> embed
        failure_sets.append(embed_failures)
    files, fit_failures = embedded | "WriteRecordFiles" >> WriteRecordFiles(
        args.output, staging, args.record_format, args.examples_per_file, args.compression, progress,
        done=merged[DONE])
    failure_sets.append(fit_failures)

    n_failed = tuple(failure_sets) | "WriteFailures" >> WriteFailures(args.output)
    units = summaries | "CountUnits" >> stage.UnitCounts()
    n_read = units | "ReadCount" >> beam.Map(lambda c: c["read"])
    sizes = (files
             | "EmbeddingSizes" >> beam.Map(lambda f: f["embedding_size"])
             | "LargestSize" >> beam.CombineGlobally(largest_size))
    _ = p | "WriteMetadata" >> WriteMetadata(
        args.output, counts={"read": n_read, "failed": n_failed}, files=files, extra=job_facts(args),
        extra_side={"embedding_size": sizes, "run": units}, cleanup=(staging,))


def largest_size(sizes) -> int | None:
    """The embedding size of the records (0: no embedding, None: no records); a combiner, so it may see
    its own outputs."""
    return max((s for s in sizes if s is not None), default=None)


def job_facts(args: argparse.Namespace) -> dict:
    facts = {
        "job": "colorize", "inputs": list(args.input), "mode": args.mode, "size": 299, "lab_size": 224,
        "record_format": args.record_format, "compression": args.compression,
        "examples_per_file": args.examples_per_file, "val_fraction": args.val_fraction, "seed": args.seed,
        "embedding": args.embedding,
        "features": {"image_name": "bytes", "image_l": "50176 x float32 (L' = 2L/100 - 1)",
                     "image_ab": "100352 x float32 (ab' = ab/127, a and b interleaved)",
                     "image_embedding": "float32, Inception-ResNet-v2 pre-softmax logits"},
    }
    if args.record_format == "compact":
        facts["features"].update(image_l="bytes: 50176 x uint8 q, L' = q/127.5 - 1",
                                 image_ab="bytes: 100352 x uint8 q, ab' = (q - 128)/127")
    if args.embedding == "none":
        facts["features"].pop("image_embedding")
    else:
        kind = inception.weights_kind(args.inception_weights)
        facts.update(inception_weights=args.inception_weights, weights_kind=kind, precision=args.precision,
                     batch_size=args.batch_size, embedding_backend=args.embedding_backend)
        if kind == "random":
            facts["warning"] = ("RANDOM, UNTRAINED Inception weights: the embeddings are meaningless; "
                                "for tests and demos only")
    return facts


def remove_previous_outputs(output: str) -> None:
    """Record files of an earlier, different run (which may have had more files)."""
    records = fileutil.matching(fileutil.join(output, f"{prefix}_*.tfrecord") for prefix in FILE_PREFIX.values())
    fileutil.delete_existing(records)


def run(argv: Sequence[str] | None = None) -> dict:
    """Run the job and return the metadata it wrote."""
    args, pipeline_options = job_options.parse(make_parser(), argv)
    check_args(args, pipeline_options.view_as(StandardOptions).runner)
    if args.embedding != "none" and inception.weights_kind(args.inception_weights) == "random":
        _LOG.warning("--inception-weights random: UNTRAINED weights, the embeddings are meaningless "
                     "(tests and demos only); metadata.json says so")
    fileutil.ensure_dir(args.output)
    # A staging folder left by a killed run of this very job is resumed: finished work is not redone.
    args.fingerprint = stage.fingerprint(f"colorize/{STAGING_LAYOUT}", args, args.input)
    if not stage.prepare(fileutil.join(args.output, STAGING), args.fingerprint):
        remove_previous_outputs(args.output)
    fileutil.remove_leftover_temporaries(args.output)  # what a killed run was writing (final names are whole)
    job_options.run_job("colorize", build, pipeline_options, args)
    meta = read_json(fileutil.join(args.output, "metadata.json"))
    _LOG.info("colorize finished: %s", meta["counts"])
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    meta = run(argv)
    args, _ = make_parser().parse_known_args(argv)
    splits = rows_per_split(meta)
    required = {"train": splits.get("train", 0), **({"val": splits.get("val", 0)} if args.val_fraction > 0 else {})}
    table = summary_table(summary(meta).split(":", 1)[0], meta, args.output)
    return conclude(args.output, meta, table, dataset_problems(meta, args.max_failure_rate, required))


def summary(meta: dict) -> str:
    c = meta["counts"]
    files = ", ".join(f"{f['file']} ({f['rows']})" for f in meta["files"]) or "no files"
    emb = meta.get("embedding_size")
    what = f"embedding {emb}" if meta["embedding"] != "none" else "no embedding"
    warn = "  [RANDOM WEIGHTS: embeddings meaningless]" if meta.get("warning") else ""
    return (f"colorize ({meta['record_format']}, {what}): read {c['read']}, written {c['written']}, "
            f"failed {c['failed']} -> {files}{warn}")
