"""imagebeam cifar: CIFAR-10/100 python archives -> the seed's processed pickle, TFRecords or Imagenet32 batches.

    Batches (one work unit per pickle) -> ReadBatch (safe unpickler, NHWC) -> Sharpen (per image, the seed's
    5x5 kernel) -> OrderKey (train: seeded permutation; test: original order) -> GroupBySplit -> WriteOutputs
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
from typing import Dict, List, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam import pvalue
from PIL import Image

from imagebeam.pipelines import options as job_options
from imagebeam.transforms import cifar, fileutil
from imagebeam.transforms.batches import batch_dict, batch_file_name, batch_sizes, shuffle_key, write_batch
from imagebeam.transforms.progress import ProgressTicker
from imagebeam.transforms.report import CountAll, WriteFailures, WriteMetadata, read_json, summary_table
from imagebeam.transforms.safe_pickle import UnsafePickleError
from imagebeam.transforms.sources import Failure
from imagebeam.transforms.tfrecord import bytes_feature, example_bytes, frame_record, int64_feature

_LOG = logging.getLogger(__name__)
FORMATS = ("pickle", "tfrecord", "imagenet32")
FAILURES = "failures"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagebeam cifar", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True,
                   help="cifar-100-python.tar.gz / cifar-10-python.tar.gz, or the extracted folder")
    p.add_argument("--output", required=True, help="output folder (local or any Beam filesystem)")
    p.add_argument("--format", choices=FORMATS, default="pickle")
    p.add_argument("--seed", type=int, default=0, help="seed of the train shuffle")
    p.add_argument("--no-sharpen", action="store_true", help="skip the seed's sharpening kernel")
    p.add_argument("--examples-per-file", type=int, default=10_000, help="tfrecord: records per file")
    p.add_argument("--batches", type=int, default=5, help="imagenet32: number of train batch files")
    return p


class _ReadBatchFn(beam.DoFn):
    """(split, batch index, member) -> CifarImage per image; an unreadable batch -> one Failure."""

    def __init__(self, layout: cifar.CifarLayout, progress: Optional[str] = None):
        self._layout = layout
        self._progress = ProgressTicker(progress)

    def process(self, unit):
        split, index, member = unit
        try:
            images = list(cifar.batch_images(self._layout, split, index, cifar.read_member(self._layout, member)))
        except (UnsafePickleError, ValueError, KeyError, TypeError, EOFError, OSError, pickle.UnpicklingError) as exc:
            self._progress.tick(failed=1)
            yield pvalue.TaggedOutput(FAILURES, Failure(self._layout.root, member, f"unreadable CIFAR batch: {exc}"))
            return
        self._progress.tick(ok=len(images))
        yield from images

    def finish_bundle(self):
        self._progress.flush()


def sharpen_image(image: cifar.CifarImage) -> cifar.CifarImage:
    pixels = np.frombuffer(image.pixels, dtype=np.uint8).reshape(32, 32, 3)
    return image._replace(pixels=cifar.sharpen(pixels).tobytes())


def order_key(image: cifar.CifarImage, seed: int) -> bytes:
    """Train: the seeded permutation (keyed hash of the image's place); test: the original order."""
    if image.split == "train":
        return shuffle_key(seed, f"{image.batch}/{image.index}")
    return image.batch.to_bytes(4, "big") + image.index.to_bytes(4, "big")


def ordered(images: List[cifar.CifarImage], seed: int) -> List[cifar.CifarImage]:
    return sorted(images, key=lambda im: order_key(im, seed))


def stack(images: List[cifar.CifarImage]) -> np.ndarray:
    if not images:
        return np.zeros((0, 32, 32, 3), dtype=np.uint8)
    return np.frombuffer(b"".join(im.pixels for im in images), dtype=np.uint8).reshape(-1, 32, 32, 3)


def processed_file_name(variant: str) -> str:
    return "CIFAR_100_processed.pickle" if variant == "cifar100" else "CIFAR_10_processed.pickle"


def write_processed_pickle(output: str, variant: str, names: List[bytes], seed: int,
                           images: List[cifar.CifarImage]) -> List[dict]:
    """The seed's single pickle (HIGHEST_PROTOCOL, as the seed saves it)."""
    train = ordered([im for im in images if im.split == "train"], seed)
    test = ordered([im for im in images if im.split == "test"], seed)
    save = {"train_dataset": stack(train), "train_labels": np.array([im.label for im in train], dtype=np.int64),
            "test_dataset": stack(test), "test_labels": np.array([im.label for im in test], dtype=np.int64),
            "label_names": list(names)}
    name = processed_file_name(variant)
    fileutil.write_with(fileutil.join(output, name), lambda f: pickle.dump(save, f, pickle.HIGHEST_PROTOCOL))
    return [{"file": name, "rows": len(train) + len(test)}]


def png_bytes(pixels: bytes) -> bytes:
    out = io.BytesIO()
    Image.frombytes("RGB", (32, 32), pixels).save(out, "PNG", optimize=False, compress_level=6)
    return out.getvalue()


def cifar_example(image: cifar.CifarImage) -> bytes:
    features = {"image": bytes_feature(png_bytes(image.pixels)), "label": int64_feature([image.label]),
                "id": bytes_feature((image.filename or f"{image.split}_{image.batch}_{image.index}").encode())}
    if image.coarse_label is not None:
        features["coarse_label"] = int64_feature([image.coarse_label])
    return example_bytes(features)


def write_tfrecords(output: str, variant: str, per_file: int, seed: int, element) -> List[dict]:
    split, images = element
    images = ordered(list(images), seed)
    n_files = max(1, -(-len(images) // per_file))
    files = []
    for k in range(n_files):
        chunk = images[k * per_file:(k + 1) * per_file]
        name = f"{variant}-{split}.tfrecord-{k:05d}-of-{n_files:05d}"
        fileutil.write_atomically(fileutil.join(output, name), b"".join(frame_record(cifar_example(im)) for im in chunk))
        files.append({"file": name, "rows": len(chunk), "split": split})
    return files


def planar_rows(images: List[cifar.CifarImage]) -> np.ndarray:
    return stack(images).transpose(0, 3, 1, 2).reshape(len(images), 3072)


def write_imagenet32(output: str, batches: int, seed: int, element) -> List[dict]:
    """Imagenet32-style batches: channel-planar rows, labels + 1 (1-based), the exact train mean."""
    split, images = element
    images = ordered(list(images), seed)
    rows = planar_rows(images)
    labels = [im.label + 1 for im in images]
    files = []
    if split == "train":
        mean = rows.astype(np.float64).mean(axis=0) if len(images) else np.zeros(3072)
        start = 0
        for index, size in enumerate(batch_sizes(len(images), batches)):
            name = batch_file_name(index, True, "pickle")
            write_batch(fileutil.join(output, name), "pickle", batch_dict(rows[start:start + size],
                                                                          labels[start:start + size], mean))
            files.append({"file": name, "rows": size, "split": split})
            start += size
    else:
        name = batch_file_name(0, False, "pickle")
        write_batch(fileutil.join(output, name), "pickle", batch_dict(rows, labels, None))
        files.append({"file": name, "rows": len(images), "split": split})
    return files


def write_classes(output: str, names: List[bytes], one_based: bool) -> None:
    lines = "".join(f"{i + (1 if one_based else 0)} {n.decode('utf-8', 'replace')}\n" for i, n in enumerate(names))
    fileutil.write_atomically(fileutil.join(output, "classes.txt"), lines.encode("utf-8"))


def build(p: beam.Pipeline, args: argparse.Namespace, layout: cifar.CifarLayout, names: List[bytes]) -> None:
    units = [(split, i, member) for split in ("train", "test") for i, member in enumerate(layout.batches(split))]
    read = (p
            | "Batches" >> beam.Create(units)
            | "Spread" >> beam.Reshuffle()
            | "ReadBatch" >> beam.ParDo(_ReadBatchFn(layout, getattr(args, "progress", None)))
            .with_outputs(FAILURES, main="images"))
    images = read.images if args.no_sharpen else read.images | "Sharpen" >> beam.Map(sharpen_image)
    if args.format == "pickle":
        files = (images
                 | "AllImages" >> beam.combiners.ToList()
                 | "WritePickle" >> beam.FlatMap(lambda ims: write_processed_pickle(
                     args.output, layout.variant, names, args.seed, ims)))
    else:
        by_split = images | "KeyBySplit" >> beam.Map(lambda im: (im.split, im)) | "GroupBySplit" >> beam.GroupByKey()
        if args.format == "tfrecord":
            writer = beam.FlatMap(lambda e: write_tfrecords(args.output, layout.variant, args.examples_per_file,
                                                            args.seed, e))
        else:
            writer = beam.FlatMap(lambda e: write_imagenet32(args.output, args.batches, args.seed, e))
        files = by_split | "WriteFiles" >> writer
    n_failed = read[FAILURES] | "WriteFailures" >> WriteFailures(args.output)
    n_read = (read.images, read[FAILURES]) | "CountRead" >> CountAll()
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
    args, pipeline_options = job_options.parse(make_parser(), argv)
    if args.examples_per_file < 1 or args.batches < 1:
        raise SystemExit("--examples-per-file and --batches must be at least 1")
    try:
        layout = cifar.find_layout(args.input)
        names = cifar.label_names(layout)
    except (ValueError, UnsafePickleError, OSError) as exc:
        raise SystemExit(f"imagebeam cifar: {exc}") from None
    fileutil.ensure_dir(args.output)
    write_classes(args.output, names, one_based=args.format == "imagenet32")
    with job_options.progress_monitor("cifar", pipeline_options) as monitor:
        args.progress = monitor.address
        job_options.run_pipeline(build, pipeline_options, args, layout, names)
    meta = read_json(fileutil.join(args.output, "metadata.json"))
    _LOG.info("cifar finished: %s", meta["counts"])
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    meta = run(argv)
    args, _ = make_parser().parse_known_args(argv)
    print(summary_table(f"cifar {meta['variant']} ({meta['format']})", meta, args.output))
    return 0
