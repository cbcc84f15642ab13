"""imagebeam cifar: CIFAR-10/100 python archives -> the seed's processed pickle, TFRecords or Imagenet32 batches.

    Batches (folder: a work unit per pickle; archive: one unit, one pass) -> ReadBatches (safe unpickler,
    NHWC chunks of 2,000 images) -> Sharpen (the seed's 5x5 kernel on every image)
    -> GroupBySplit / AllChunks -> order (train: seeded permutation; test: original order) -> WriteOutputs
    unreadable batches -> failures.jsonl; counts + files -> metadata.json (written last)

`--format pickle` (default) writes `CIFAR_100_processed.pickle` (or `CIFAR_10_…`) with the seed's keys:
train_dataset / test_dataset uint8 (n, 32, 32, 3), train_labels / test_labels int64 (fine labels),
label_names (bytes, as the seed keeps them). `--format tfrecord` writes sharded
`cifar100-train.tfrecord-0000K-of-0000N` files (features image: PNG, label, coarse_label, id), and
`--format imagenet32` the batches of the downsample job (`train_data_batch_1..B`, `val_data`: rows
channel-planar, labels 1-based, train mean).
"""
from __future__ import annotations

import argparse
import io
import logging
import pickle
import tarfile
from typing import Dict, List, NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from PIL import Image

from imagebeam.runners import checks
from imagebeam.runners import options as job_options
from imagebeam.transforms.formats import cifar, safe_pickle
from imagebeam.transforms.bookkeeping import fileutil
from imagebeam.transforms.formats.batches import batch_dict, batch_file_name, batch_sizes, shuffle_key, write_batch
from imagebeam.transforms.bookkeeping.progress import ProgressTicker
from imagebeam.transforms.bookkeeping.report import (WriteFailures, WriteMetadata, conclude, dataset_problems,
                                                      read_json, rows_per_split, summary_table)
from imagebeam.transforms.formats.safe_pickle import UnsafePickleError
from imagebeam.transforms.inputs.sources import Failure
from imagebeam.transforms.formats.tfrecord import bytes_feature, example_bytes, frame_record, int64_feature
from imagebeam.runners.checks import OneLineParser

_LOG = logging.getLogger(__name__)
FORMATS = ("pickle", "tfrecord", "imagenet32")
FAILURES = "failures"


def make_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="imagebeam cifar", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="cifar-100-python.tar.gz / cifar-10-python.tar.gz, or the extracted folder")
    p.add_argument("--output", required=True, help="output folder (local or any Beam filesystem)")
    p.add_argument("--format", choices=FORMATS, default="pickle")
    p.add_argument("--seed", type=int, default=0, help="seed of the train shuffle")
    p.add_argument("--no-sharpen", action="store_true", help="skip the seed's sharpening kernel")
    p.add_argument("--examples-per-file", type=int, default=10_000, help="tfrecord: records per file")
    p.add_argument("--batches", type=int, default=5, help="imagenet32: number of train batch files")
    job_options.add_failure_rate_argument(p)
    return p


class _ReadBatchesFn(beam.DoFn):
    """A unit of (split, batch index, member) batches -> CifarChunks; each batch that is unreadable, refused
    or missing -> one Failure (the unit's other batches are still read)."""

    def __init__(self, layout: cifar.CifarLayout, progress: Optional[str] = None):
        self._layout = layout
        self._progress = ProgressTicker(progress)

    def process(self, unit):
        places = {member: (split, index) for split, index, member in unit}
        pending = dict(places)
        try:
            for member, data in cifar.member_bytes(self._layout, list(places)):
                del pending[member]
                yield from self._batch(member, *places[member], data)
        except (OSError, EOFError, ValueError, tarfile.TarError) as exc:
            for member in pending:
                yield self._failure(member, f"unreadable CIFAR batch: {exc}")
            return
        for member in pending:
            yield self._failure(member, f"unreadable CIFAR batch: {cifar.no_member(self._layout, member)}")

    def _batch(self, member: str, split: str, index: int, data: bytes):
        try:
            chunks = list(cifar.batch_chunks(self._layout, split, index, safe_pickle.loads(data, encoding="bytes")))
        except (UnsafePickleError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as exc:
            yield self._failure(member, f"unreadable CIFAR batch: {exc}")
            return
        self._progress.tick(ok=sum(len(c.labels) for c in chunks))
        yield from chunks

    def _failure(self, member: str, reason: str) -> pvalue.TaggedOutput:
        self._progress.tick(failed=1)
        return pvalue.TaggedOutput(FAILURES, Failure(self._layout.root, member, reason))

    def finish_bundle(self):
        self._progress.flush()


def sharpen_chunk(chunk: cifar.CifarChunk) -> cifar.CifarChunk:
    """The seed's kernel on every image of the chunk (vectorised over the chunk, per image maths)."""
    return chunk._replace(pixels=cifar.sharpen(chunk.pixels))


class Gathered(NamedTuple):
    """One split's images in output order."""
    pixels: np.ndarray
    labels: np.ndarray
    coarse: Optional[np.ndarray]
    ids: List[str]


def gather(chunks: List[cifar.CifarChunk], split: str, seed: int) -> Gathered:
    """Train: the seeded permutation (keyed BLAKE2 of each image's batch/index); test: the original order."""
    chunks = sorted((c for c in chunks if c.split == split), key=lambda c: (c.batch, c.start))
    if not chunks:
        return Gathered(np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int64), None, [])
    places = [(c.batch, c.start + i) for c in chunks for i in range(len(c.labels))]
    ids = []
    for c in chunks:
        ids += [name or f"{split}_{c.batch}_{c.start + i}" for i, name in enumerate(c.filenames)]
    pixels = np.concatenate([c.pixels for c in chunks])
    labels = np.concatenate([c.labels for c in chunks])
    coarse = None if chunks[0].coarse is None else np.concatenate([c.coarse for c in chunks])
    if split == "train":
        keys = [shuffle_key(seed, f"{b}/{i}") for b, i in places]
        order = np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)
        pixels, labels = pixels[order], labels[order]
        coarse = None if coarse is None else coarse[order]
        ids = [ids[k] for k in order]
    return Gathered(np.ascontiguousarray(pixels), labels, coarse, ids)


def processed_file_name(variant: str) -> str:
    return "CIFAR_100_processed.pickle" if variant == "cifar100" else "CIFAR_10_processed.pickle"


def write_processed_pickle(output: str, variant: str, names: List[bytes], seed: int,
                           chunks: List[cifar.CifarChunk]) -> List[dict]:
    """The seed's single pickle (HIGHEST_PROTOCOL, as the seed saves it)."""
    train, test = gather(chunks, "train", seed), gather(chunks, "test", seed)
    save = {"train_dataset": train.pixels, "train_labels": train.labels,
            "test_dataset": test.pixels, "test_labels": test.labels, "label_names": list(names)}
    name = processed_file_name(variant)
    fileutil.write_with(fileutil.join(output, name), lambda f: pickle.dump(save, f, pickle.HIGHEST_PROTOCOL))
    return [{"file": name, "rows": len(train.labels) + len(test.labels),
             "splits": {"train": len(train.labels), "test": len(test.labels)}}]


def png_bytes(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "PNG", optimize=False, compress_level=6)
    return out.getvalue()


def cifar_example(pixels: np.ndarray, label: int, coarse: Optional[int], image_id: str) -> bytes:
    features = {"image": bytes_feature(png_bytes(pixels)), "label": int64_feature([label]),
                "id": bytes_feature(image_id.encode())}
    if coarse is not None:
        features["coarse_label"] = int64_feature([coarse])
    return example_bytes(features)


def write_tfrecords(output: str, variant: str, per_file: int, seed: int, element) -> List[dict]:
    split, chunks = element
    g = gather(list(chunks), split, seed)
    n = len(g.labels)
    n_files = max(1, -(-n // per_file))
    files = []
    for k in range(n_files):
        rows = range(k * per_file, min(n, (k + 1) * per_file))
        name = f"{variant}-{split}.tfrecord-{k:05d}-of-{n_files:05d}"
        records = (frame_record(cifar_example(g.pixels[i], int(g.labels[i]),
                                              None if g.coarse is None else int(g.coarse[i]), g.ids[i]))
                   for i in rows)
        fileutil.write_atomically(fileutil.join(output, name), b"".join(records))
        files.append({"file": name, "rows": len(rows), "split": split})
    return files


def planar_rows(pixels: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2).reshape(len(pixels), 3072))


def write_imagenet32(output: str, batches: int, seed: int, element) -> List[dict]:
    """Imagenet32-style batches: channel-planar rows, labels + 1 (1-based), the exact train mean."""
    split, chunks = element
    g = gather(list(chunks), split, seed)
    rows = planar_rows(g.pixels)
    labels = [int(label) + 1 for label in g.labels]
    files = []
    if split == "train":
        mean = rows.astype(np.float64).mean(axis=0) if len(labels) else np.zeros(3072)
        start = 0
        for index, size in enumerate(batch_sizes(len(labels), batches)):
            name = batch_file_name(index, True, "pickle")
            write_batch(fileutil.join(output, name), "pickle", batch_dict(rows[start:start + size],
                                                                          labels[start:start + size], mean))
            files.append({"file": name, "rows": size, "split": split})
            start += size
    else:
        name = batch_file_name(0, False, "pickle")
        write_batch(fileutil.join(output, name), "pickle", batch_dict(rows, labels, None))
        files.append({"file": name, "rows": len(labels), "split": split})
    return files


def write_classes(output: str, names: List[bytes], one_based: bool) -> None:
    lines = "".join(f"{i + (1 if one_based else 0)} {n.decode('utf-8', 'replace')}\n" for i, n in enumerate(names))
    fileutil.write_atomically(fileutil.join(output, "classes.txt"), lines.encode("utf-8"))


def build(p: beam.Pipeline, args: argparse.Namespace, layout: cifar.CifarLayout, names: List[bytes]) -> None:
    batches = [(split, i, member) for split in ("train", "test") for i, member in enumerate(layout.batches(split))]
    # A folder's batches are read in parallel; an archive is one gzip stream, read once in one pass.
    units = [tuple(batches)] if layout.archive else [(b,) for b in batches]
    read = (p
            | "Batches" >> beam.Create(units)
            | "SpreadBatches" >> beam.Reshuffle()
            | "ReadBatches" >> beam.ParDo(_ReadBatchesFn(layout, getattr(args, "progress", None)))
            .with_outputs(FAILURES, main="chunks"))
    images = read.chunks if args.no_sharpen else read.chunks | "Sharpen" >> beam.Map(sharpen_chunk)
    if args.format == "pickle":
        files = (images
                 | "AllChunks" >> beam.combiners.ToList()
                 | "WritePickle" >> beam.FlatMap(lambda ims: write_processed_pickle(
                     args.output, layout.variant, names, args.seed, ims)))
    else:
        by_split = images | "KeyBySplit" >> beam.Map(lambda c: (c.split, c)) | "GroupBySplit" >> beam.GroupByKey()
        if args.format == "tfrecord":
            writer = beam.FlatMap(lambda e: write_tfrecords(args.output, layout.variant, args.examples_per_file,
                                                            args.seed, e))
        else:
            writer = beam.FlatMap(lambda e: write_imagenet32(args.output, args.batches, args.seed, e))
        files = by_split | "WriteFiles" >> writer
    n_failed = read[FAILURES] | "WriteFailures" >> WriteFailures(args.output)
    n_read = ((read.chunks | "ImagesPerChunk" >> beam.Map(lambda c: len(c.labels)),
               read[FAILURES] | "OnePerFailure" >> beam.Map(lambda _: 1))
              | "AllRead" >> beam.Flatten() | "SumRead" >> beam.CombineGlobally(sum))
    _ = p | "WriteMetadata" >> WriteMetadata(args.output, counts={"read": n_read, "failed": n_failed}, files=files,
                                             extra=job_facts(args, layout, names))


def job_facts(args: argparse.Namespace, layout: cifar.CifarLayout, names: List[bytes]) -> Dict[str, object]:
    return {"job": "cifar", "input": args.input, "variant": layout.variant, "format": args.format,
            "seed": args.seed, "sharpen": None if args.no_sharpen else
            "cv2.filter2D(img, -1, (-1/256) * [[1,4,6,4,1],[4,16,24,16,4],[6,24,-476,24,6],[4,16,24,16,4],"
            "[1,4,6,4,1]]), uint8 saturated, reflect-101 borders",
            "classes": len(names), "train_order": "seeded permutation (keyed BLAKE2 of batch/index)",
            "test_order": "original", "labels": ("1-based (label + 1), as Imagenet32" if args.format == "imagenet32"
                                                 else "0-based fine labels")}


def run(argv: Sequence[str] | None = None) -> dict:
    """Run the job and return the metadata it wrote."""
    # In-process on the local runner unless told otherwise: the job moves ~180 MB of pixels through a
    # few stages, and SDK worker processes double its time (the gRPC hops cost more than the numpy work).
    args, pipeline_options = job_options.parse(make_parser(), argv, local_mode="in_memory")
    checks.check_positive(args, "examples_per_file", "batches")
    checks.check_rate(args.max_failure_rate, "--max-failure-rate")
    checks.check_inputs([args.input])
    checks.check_output(args.output, inputs=[args.input])
    try:
        layout, names = cifar.open_input(args.input)
    except (ValueError, UnsafePickleError, OSError) as exc:
        raise checks.UsageError(f"--input {args.input!r}: {exc}") from None
    fileutil.ensure_dir(args.output)
    write_classes(args.output, names, one_based=args.format == "imagenet32")
    job_options.run_job("cifar", build, pipeline_options, args, layout, names)
    meta = read_json(fileutil.join(args.output, "metadata.json"))
    _LOG.info("cifar finished: %s", meta["counts"])
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    meta = run(argv)
    args, _ = make_parser().parse_known_args(argv)
    table = summary_table(f"cifar {meta['variant']} ({meta['format']})", meta, args.output)
    splits = rows_per_split(meta)
    required = {split: splits.get(split, 0) for split in ("train", "test")}
    return conclude(args.output, meta, table, dataset_problems(meta, args.max_failure_rate, required))
