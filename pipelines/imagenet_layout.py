"""imagebeam imagenet-layout: the ILSVRC2012 archives -> ROOT/train/<wnid>/, ROOT/val/<wnid>/, ROOT/test/ (SPEC §1).

    IndexArchives (headers only: one unit per member tar of the train tar, runs of members of val/test)
      -> SkipFinished (a unit whose marker exists was extracted by an earlier run)
      -> Extract (parallel over units; val images go to the class folder of their devkit ground truth;
                  every file written atomically; the unit's marker last)
    refused or unreadable members -> failures.jsonl; counts -> metadata.json (written last)

Replaces the `tar` loops and the val-sorting shell script users pipe from the web. Only plain files
are extracted, each under its own base name in its class folder: members with absolute names, `..`,
links or devices are refused and reported. Re-running skips every finished unit, so an interrupted run
picks up where it stopped and a finished one does no work. Also writes ROOT/LOC_synset_mapping.txt
(`WNID words`, sorted by WNID), which `imagebeam.datasets.ImageNet` reads for class names.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import posixpath
import re
from typing import Dict, Iterator, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from imagebeam.runners import checks
from imagebeam.runners import options as job_options
from imagebeam.transforms.bookkeeping import fileutil
from imagebeam.transforms.inputs.labels import LabelMap, load_label_map
from imagebeam.transforms.bookkeeping.progress import ProgressTicker
from imagebeam.transforms.bookkeeping.report import (WriteFailures, WriteMetadata, conclude, dataset_problems,
                                                      read_json, summary_table)
from imagebeam.transforms.inputs.sources import Failure, ImageBlob, WorkUnit, index_tar, read_unit
from imagebeam.runners.checks import OneLineParser

_LOG = logging.getLogger(__name__)
STATE = ".imagebeam-layout"      # ROOT/.imagebeam-layout/<split>-<unit>.done markers
_VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})\.", re.IGNORECASE)


def make_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="imagebeam imagenet-layout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", help="ILSVRC2012_img_train.tar (1000 member tars n########.tar)")
    p.add_argument("--val", help="ILSVRC2012_img_val.tar (50,000 flat files, sorted by the devkit)")
    p.add_argument("--test", help="ILSVRC2012_img_test_v10102019.tar (flat, unlabelled)")
    p.add_argument("--devkit", required=True, help="ILSVRC2012_devkit_t12.tar.gz (classes, val ground truth)")
    p.add_argument("--output", required=True, help="ROOT (local or any Beam filesystem)")
    job_options.add_failure_rate_argument(p)
    return p


def unit_id(unit: WorkUnit) -> str:
    """A stable name for a work unit: the member tar's WNID, or a digest of the members it holds."""
    if unit.kind == "member_tar":
        return posixpath.basename(unit.name)[: -len(".tar")]
    digest = hashlib.sha1("\n".join(m[0] for m in unit.members).encode("utf-8", "surrogateescape")).hexdigest()
    return f"{unit.members[0][0].replace('/', '_')}-{len(unit.members)}-{digest[:12]}" if unit.members else digest


def marker_path(output: str, split: str, unit: WorkUnit) -> str:
    return fileutil.join(output, STATE, f"{split}-{unit_id(unit)}.done")


def destination(split: str, blob: ImageBlob, wnid_of_id: Dict[int, str],
                ground_truth: Optional[Tuple[int, ...]]) -> str:
    """ROOT-relative path of one image; raises ValueError with the reason when it has no place."""
    base = posixpath.basename(blob.name)
    if split == "train":
        if not blob.class_key:
            raise ValueError("not inside a class tar n########.tar")
        return f"train/{blob.class_key}/{base}"
    if split == "test":
        return f"test/{base}"
    match = _VAL_NUMBER.search(base)
    if not match:
        raise ValueError("not a validation file name (ILSVRC2012_val_########.JPEG)")
    number = int(match.group(1))
    if ground_truth is None or not 1 <= number <= len(ground_truth):
        raise ValueError(f"validation image {number} has no line in the devkit ground truth")
    return f"val/{wnid_of_id[ground_truth[number - 1]]}/{base}"


class _ExtractUnitFn(beam.DoFn):
    """(split, unit) -> the unit's record {"split", "images", "failures"}, written as its marker last."""

    def __init__(self, output: str, label_map: LabelMap, progress: Optional[str] = None):
        self._output = output
        self._progress = ProgressTicker(progress)
        self._wnid_of_id = {cid: wnid for wnid, cid in label_map.labels.items()}
        self._ground_truth = label_map.val_ground_truth
        self._extracted = beam.metrics.Metrics.counter("layout", "images")

    def process(self, element):
        split, unit = element
        written, failures = 0, []
        for item in read_unit(unit):
            if isinstance(item, Failure):
                failures.append(item.to_json())
                self._progress.tick(failed=1)
                continue
            try:
                relative = destination(split, item, self._wnid_of_id, self._ground_truth)
            except ValueError as exc:
                failures.append(Failure(item.source, item.member, str(exc)).to_json())
                self._progress.tick(failed=1)
                continue
            fileutil.write_atomically(fileutil.join(self._output, relative), item.data)
            written += 1
            self._progress.tick(ok=1)
        self._extracted.inc(written)
        record = {"split": split, "images": written, "failures": failures}
        fileutil.write_atomically(marker_path(self._output, split, unit), json.dumps(record).encode("utf-8"))
        yield record

    def finish_bundle(self):
        self._progress.flush()


def index_split(split: str, path: str) -> Iterator[Tuple[str, object]]:
    for item in index_tar(path):
        yield split, item


def triage(element, output: str):
    """Each unit once: finished by an earlier run (its marker exists) -> "finished"; else to extract."""
    split, item = element
    if isinstance(item, Failure):
        yield beam.pvalue.TaggedOutput("index_failures", item)
    elif FileSystems.exists(marker_path(output, split, item)):
        yield beam.pvalue.TaggedOutput("finished", element)
    else:
        yield element


def finished_record(element, output: str) -> dict:
    """What an earlier run recorded for a finished unit (its images and failures), without extracting."""
    split, item = element
    return read_json(marker_path(output, split, item))


def record_failures(record: dict) -> Iterator[Failure]:
    for f in record["failures"]:
        yield Failure(f["source"], f["member"], f["reason"])


def build(p: beam.Pipeline, args: argparse.Namespace, label_map: LabelMap) -> None:
    archives = [(split, path) for split, path in (("train", args.train), ("val", args.val), ("test", args.test))
                if path]
    indexed = (p
               | "Archives" >> beam.Create(archives)
               | "IndexArchives" >> beam.FlatMapTuple(index_split)
               | "Spread" >> beam.Reshuffle())
    triaged = indexed | "SkipFinished" >> beam.FlatMap(triage, args.output).with_outputs(
        "finished", "index_failures", main="todo")
    todo, finished, index_failures = triaged.todo, triaged.finished, triaged.index_failures
    extracted = todo | "Extract" >> beam.ParDo(_ExtractUnitFn(args.output, label_map, getattr(args, "progress", None)))
    records = (extracted, finished | "EarlierRecords" >> beam.Map(finished_record, args.output)) \
        | "AllUnits" >> beam.Flatten()
    failures = (index_failures, records | "UnitFailures" >> beam.FlatMap(record_failures))
    files = (records
             | "PerSplit" >> beam.Map(lambda r: (r["split"], r["images"]))
             | "ImagesPerSplit" >> beam.CombinePerKey(sum)
             | "AsEntry" >> beam.MapTuple(lambda split, n: {"file": f"{split}/", "rows": n}))
    n_failed = failures | "WriteFailures" >> WriteFailures(args.output)
    n_read = ((records | "ImagesAndFailures" >> beam.Map(lambda r: r["images"] + len(r["failures"])),
               index_failures | "OnePerIndexFailure" >> beam.Map(lambda _: 1))
              | "AllRead" >> beam.Flatten() | "SumRead" >> beam.CombineGlobally(sum))
    _ = p | "WriteMetadata" >> WriteMetadata(
        args.output, counts={"read": n_read, "failed": n_failed}, files=files,
        extra={"job": "imagenet-layout", "train": args.train, "val": args.val, "test": args.test,
               "devkit": args.devkit, "layout": "train/<wnid>/*.JPEG, val/<wnid>/*.JPEG, test/*.JPEG"},
        extra_side={"units_skipped": finished | "CountSkipped" >> beam.combiners.Count.Globally(),
                    "units_extracted": todo | "CountDone" >> beam.combiners.Count.Globally()})


def write_synsets(output: str, label_map: LabelMap) -> None:
    lines = "".join(f"{wnid} {label_map.names.get(wnid, wnid)}\n" for wnid in sorted(label_map.labels))
    fileutil.write_atomically(fileutil.join(output, "LOC_synset_mapping.txt"), lines.encode("utf-8"))


def run(argv: Sequence[str] | None = None) -> dict:
    args, pipeline_options = job_options.parse(make_parser(), argv)
    if not (args.train or args.val or args.test):
        raise checks.UsageError("give at least one of --train, --val, --test")
    for option in ("train", "val", "test"):
        if getattr(args, option):
            checks.check_inputs([getattr(args, option)], f"--{option}")
    checks.check_file(args.devkit, "--devkit")
    checks.check_rate(args.max_failure_rate, "--max-failure-rate")
    checks.check_output(args.output, inputs=[a for a in (args.train, args.val, args.test) if a])
    try:
        label_map = load_label_map(args.devkit)
    except (ValueError, OSError) as exc:
        raise checks.UsageError(f"--devkit {args.devkit!r}: {exc}") from None
    if args.val and label_map.val_ground_truth is None:
        raise checks.UsageError(f"--devkit {args.devkit!r} has no data/ILSVRC2012_validation_ground_truth.txt, "
                                "which --val needs")
    fileutil.ensure_dir(args.output)
    write_synsets(args.output, label_map)
    job_options.run_job("imagenet-layout", build, pipeline_options, args, label_map)
    meta = read_json(fileutil.join(args.output, "metadata.json"))
    _LOG.info("imagenet-layout finished: %s", meta["counts"])
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    meta = run(argv)
    args, _ = make_parser().parse_known_args(argv)
    table = summary_table("imagenet-layout", meta, args.output, {
        "units": f"{meta['units_extracted']} extracted now, {meta['units_skipped']} finished by earlier runs"})
    written = {f["file"].rstrip("/"): f["rows"] for f in meta.get("files", [])}
    required = {split: written.get(split, 0) for split in ("train", "val", "test") if getattr(args, split)}
    return conclude(args.output, meta, table, dataset_problems(meta, args.max_failure_rate, required))
