"""imagebeam resize: images -> 299x299 image files, deep-koalarization's persisted resize step (SPEC §3).

    IndexInputs -> SpreadUnits -> FitAndWrite (per work unit: read, decode, fit (letterbox on white |
        stretch | center-crop, Lanczos), write with the same relative name and format; then a marker)
    failures -> failures.jsonl; counts -> metadata.json (written last)

A killed run started again with the same command skips every work unit whose marker exists.

For users who keep the step-by-step workflow (resize, then records). Every output keeps its input's
relative name (`root/<class>/x.JPEG` -> `OUT/<class>/x.JPEG`; tar members keep their path inside the
tar), so flat folders stay flat as in the reference. The format follows the extension (JPEG at
`--quality`, PNG, TIFF, ...); a name without a known image extension gets `.png` appended.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import posixpath
from typing import Dict, Optional, Sequence, Tuple

import apache_beam as beam
from PIL import Image

from imagebeam.runners import checks
from imagebeam.runners import options as job_options
from imagebeam.transforms.bookkeeping import fileutil
from imagebeam.transforms.bookkeeping import staging as stage
from imagebeam.transforms.imaging.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_rgb
from imagebeam.transforms.bookkeeping.progress import ProgressTicker
from imagebeam.transforms.bookkeeping.report import (WriteFailures, WriteMetadata, conclude,
                                                      dataset_problems, read_json, summary_table)
from imagebeam.transforms.imaging.resize import FIT_MODES, fit
from imagebeam.transforms.inputs.sources import Failure, ImageBlob, IndexInputs, read_unit
from imagebeam.runners.checks import OneLineParser

_LOG = logging.getLogger(__name__)


def make_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="imagebeam resize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True,
                   help="image folder, tar, or glob of tar shards; repeat for several")
    p.add_argument("--output", required=True, help="output folder (local or any Beam filesystem)")
    p.add_argument("--size", type=int, default=299)
    p.add_argument("--mode", choices=sorted(FIT_MODES), default="letterbox",
                   help="letterbox: whole image on white, aspect kept (the reference); stretch; center-crop")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of JPEG outputs")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--exif-transpose", action="store_true")
    job_options.add_failure_rate_argument(p)
    return p


_RGB_FORMATS = {"JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF", "PPM"}


def output_name_and_format(name: str) -> Tuple[str, str]:
    """The output's relative name and Pillow format: from the extension, else PNG with `.png` added."""
    ext = posixpath.splitext(name)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt in _RGB_FORMATS:
        return name, fmt
    return name + ".png", "PNG"


def encode_image(img: Image.Image, fmt: str, quality: int) -> bytes:
    out = io.BytesIO()
    if fmt == "JPEG":
        img.save(out, "JPEG", quality=quality)
    else:
        img.save(out, fmt)
    return out.getvalue()


class _FitAndWriteUnitFn(beam.DoFn):
    """A work unit -> its images fitted and written, then a marker: {"read", "folders" (images written
    per top-level folder), "failures"}. A re-run skips a unit whose marker exists and re-emits what it
    recorded, so a killed job started again with the same command redoes only unfinished units."""

    def __init__(self, output: str, staging: str, size: int, mode: str, quality: int, max_pixels: int,
                 exif_transpose: bool, progress: Optional[str] = None):
        self._output, self._staging, self._size, self._mode, self._quality = output, staging, size, mode, quality
        self._max_pixels, self._exif_transpose = max_pixels, exif_transpose
        self._progress = ProgressTicker(progress)

    def process(self, item):
        if isinstance(item, Failure):  # the index itself failed somewhere: one input, not read
            yield {"read": 1, "folders": {}, "failures": [item.to_json()], "unit": False, "reused": False}
            return
        marker = fileutil.join(self._staging, stage.UNITS, stage.unit_id(item) + ".json")
        recorded = stage.read_marker(marker)
        if recorded is not None:
            yield dict(recorded, unit=True, reused=True)
            return
        folders: Dict[str, int] = {}
        failures = []
        read = 0
        for blob in read_unit(item):
            read += 1
            reason = blob.reason if isinstance(blob, Failure) else self._fit_and_write(blob)
            if reason is None:
                folder = folder_of(output_name_and_format(blob.name)[0])
                folders[folder] = folders.get(folder, 0) + 1
                self._progress.tick(ok=1)
            else:
                failures.append(Failure(blob.source, blob.member, reason).to_json())
                self._progress.tick(failed=1)
        recorded = {"read": read, "folders": folders, "failures": failures}
        fileutil.write_atomically(marker, json.dumps(recorded).encode("utf-8"))
        yield dict(recorded, unit=True, reused=False)

    def _fit_and_write(self, blob: ImageBlob) -> Optional[str]:
        """Write one image; the reason it could not be, or None."""
        try:
            img = decode_rgb(blob.data, max_pixels=self._max_pixels, exif_transpose=self._exif_transpose)
            name, fmt = output_name_and_format(blob.name)
            data = encode_image(fit(img, self._size, self._mode), fmt, self._quality)
        except (DecodeError, OSError, ValueError) as exc:
            return str(exc)
        fileutil.write_atomically(fileutil.join(self._output, name), data)
        return None

    def finish_bundle(self):
        self._progress.flush()


def folder_of(name: str) -> str:
    """The first folder of a relative name (the class folder), or './' for a top-level file."""
    return name.split("/", 1)[0] + "/" if "/" in name else "./"


STAGING = ".staging"  # unit markers of this run, removed when the job succeeds


def build(p: beam.Pipeline, args: argparse.Namespace) -> None:
    staging = fileutil.join(args.output, STAGING)
    units = (p
             | "IndexInputs" >> IndexInputs(args.input)
             | "SpreadUnits" >> beam.Reshuffle()
             | "FitAndWrite" >> beam.ParDo(_FitAndWriteUnitFn(
                 args.output, staging, args.size, args.mode, args.quality, args.max_pixels, args.exif_transpose,
                 getattr(args, "progress", None))))
    # metadata lists images per top-level folder (one entry per class), not one line per image
    files = (units
             | "Folders" >> beam.FlatMap(lambda u: u["folders"].items())
             | "ImagesPerFolder" >> beam.CombinePerKey(sum)
             | "AsEntry" >> beam.MapTuple(lambda folder, n: {"file": folder, "rows": n}))
    failures = units | "Failures" >> beam.FlatMap(lambda u: [stage.failure_from_json(f) for f in u["failures"]])
    n_failed = failures | "WriteFailures" >> WriteFailures(args.output)
    counted = units | "CountUnits" >> stage.UnitCounts()
    _ = p | "WriteMetadata" >> WriteMetadata(
        args.output, counts={"read": counted | "ReadCount" >> beam.Map(lambda c: c["read"]), "failed": n_failed},
        files=files, extra={"job": "resize", "inputs": list(args.input), "size": args.size, "mode": args.mode,
                            "jpeg_quality": args.quality, "resample": "lanczos", "background": "white",
                            "files_are": "images written per top-level folder"},
        extra_side={"run": counted}, cleanup=(staging,))


def run(argv: Sequence[str] | None = None) -> dict:
    args, pipeline_options = job_options.parse(make_parser(), argv)
    check_args(args)
    fileutil.ensure_dir(args.output)
    # Unit markers left by a killed run of this very job are reused: finished units are not redone, and
    # the temporary files the killed run was writing are removed.
    if stage.prepare(fileutil.join(args.output, STAGING), stage.fingerprint("resize", args, args.input)):
        fileutil.remove_leftover_temporaries(args.output)
    job_options.run_job("resize", build, pipeline_options, args)
    meta = read_json(fileutil.join(args.output, "metadata.json"))
    _LOG.info("resize finished: %s", meta["counts"])
    return meta


def check_args(args: argparse.Namespace) -> None:
    """Everything checkable before a pipeline starts (one line and exit 2 from the command otherwise)."""
    checks.check_positive(args, "size", "max_pixels")
    if not 1 <= args.quality <= 100:
        raise checks.UsageError(f"--quality must be in 1..100, not {args.quality}")
    checks.check_rate(args.max_failure_rate, "--max-failure-rate")
    checks.check_inputs(args.input)
    checks.check_output(args.output, inputs=args.input)


def main(argv: Sequence[str] | None = None) -> int:
    meta = run(argv)
    args, _ = make_parser().parse_known_args(argv)
    table = summary_table(f"resize {meta['size']}x{meta['size']} ({meta['mode']})", meta, args.output)
    problems = dataset_problems(meta, args.max_failure_rate, {"images": meta["counts"]["written"]})
    return conclude(args.output, meta, table, problems)

