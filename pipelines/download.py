"""imagebeam download: URL lists -> DIR/md5(url).ext files and DIR/manifest.jsonl, restartable (SPEC §3).

    ReadUrlLists --+
    PreviousRecords (manifest.jsonl + journal of a killed run) --+--> CoGroupByKey(md5 of the URL) -> Plan
    FilesOnDisk ---+
    Plan -> kept (finished earlier, not fetched again) | Fetch (threads per worker, per-host limit,
            retries, validation by decoding, atomic writes; journal flushed every few seconds)
         -> DedupeContent (same sha256: the first URL keeps the file) -> WriteManifest -> metadata.json

Re-running resumes: URLs with a final record (ok with its file present, or a permanent failure) are
kept; transient failures (timeout, connection, 429, 5xx) are tried again; a file already on disk without
a record is validated instead of fetched. The manifest has one record per listed URL, ordered by file
name (md5 of the URL).
"""
from __future__ import annotations

import argparse
import json
import logging
from typing import Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from imagebeam.runners import network_options
from imagebeam.runners import options as job_options
from imagebeam.transforms.bookkeeping import fileutil
from imagebeam.transforms.inputs.downloads import (JOURNAL, FetchFn, PreviousRecords, WriteManifestPieces,
                                            downloaded_files, merge_statuses, plan_url, resolve_duplicates)
from imagebeam.transforms.bookkeeping.progress import ReportTotal
from imagebeam.transforms.bookkeeping.report import read_json, versions
from imagebeam.transforms.inputs.url_lists import ReadUrlLists, url_md5

_LOG = logging.getLogger(__name__)
PIECES = ".manifest-pieces"
MANIFEST = "manifest.jsonl"


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imagebeam download", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True,
                   help="URL list: text (URL = last token per line), CSV, JSONL or Parquet, optionally .gz, "
                        "or a .tgz holding a text list; globs allowed; repeat for several")
    p.add_argument("--output", required=True, help="download folder (local or any Beam filesystem)")
    network_options.add_arguments(p)
    return p


def build(p: beam.Pipeline, args: argparse.Namespace) -> None:
    config = network_options.fetch_config(args)
    output = args.output
    entries = p | "ReadUrlLists" >> ReadUrlLists(args.input, *network_options.list_columns(args))
    planned = (
        {"entries": entries | "KeyByUrl" >> beam.Map(lambda e: (url_md5(e.url), e)),
         "previous": p | "PreviousRecords" >> PreviousRecords(output),
         "files": p | "FilesOnDisk" >> beam.Create([output]) | "List" >> beam.FlatMap(downloaded_files)}
        | "JoinByUrl" >> beam.CoGroupByKey()
        | "Plan" >> beam.FlatMap(plan_url).with_outputs("kept", "repeated", main="fetch"))
    fetched = (planned.fetch
               | "Fetch" >> beam.ParDo(FetchFn(config, output, full_decode=True,
                                              progress=getattr(args, "progress", None)))
               | "Records" >> beam.Map(lambda d: d.record))
    records = (fetched, planned.kept) | "AllRecords" >> beam.Flatten()
    with_content = records | "SplitByContent" >> beam.Partition(
        lambda r, _: 0 if r["status"] in ("ok", "duplicate") and r.get("sha256") else 1, 2)
    deduped = (with_content[0]
               | "KeyBySha256" >> beam.Map(lambda r: (r["sha256"], r))
               | "GroupContent" >> beam.GroupByKey()
               | "DedupeContent" >> beam.FlatMap(resolve_duplicates))
    pieces = ((deduped, with_content[1]) | "FinalRecords" >> beam.Flatten()
              | "WriteManifestPieces" >> WriteManifestPieces(output, fileutil.join(output, PIECES)))
    counts = {
        "listed": entries | "CountListed" >> beam.combiners.Count.Globally(),
        "repeated": planned.repeated | "CountRepeated" >> beam.CombineGlobally(sum),
        "kept": planned.kept | "CountKept" >> beam.combiners.Count.Globally(),
        "fetched": planned.fetch | "CountFetched" >> beam.combiners.Count.Globally(),
    }
    sides = {name: beam.pvalue.AsSingleton(pc) for name, pc in counts.items()}
    _ = planned.fetch | "ProgressTotal" >> beam.Map(lambda _: 1) | ReportTotal(getattr(args, "progress", None))
    _ = (p | "Once" >> beam.Create([None])
         | "WriteManifest" >> beam.Map(finish, output, job_facts(args), beam.pvalue.AsList(pieces), **sides))


class CountsDontAddUp(RuntimeError):
    pass


def finish(_, output: str, facts: dict, pieces: list, listed: int, repeated: int, kept: int, fetched: int) -> dict:
    """manifest.jsonl from the pieces (in bucket order), then metadata.json; the journal goes last."""
    statuses = merge_statuses(pieces)
    urls = sum(statuses.values())
    counts = {"listed": listed, "repeated_lines": repeated, "urls": urls, "kept_from_earlier_runs": kept,
              "processed_this_run": fetched, "ok": statuses.get("ok", 0), "failed": urls - statuses.get("ok", 0)}
    if urls != listed - repeated or urls != kept + fetched:
        raise CountsDontAddUp(f"counts do not add up: {counts}, statuses {statuses}")
    paths = [piece["path"] for piece in sorted(pieces, key=lambda piece: piece["bucket"])]
    if paths:
        fileutil.concat_files(fileutil.join(output, MANIFEST), paths)
    else:
        fileutil.write_atomically(fileutil.join(output, MANIFEST), b"")
    meta = dict(facts, counts=counts, statuses=statuses,
                success_rate=round(statuses.get("ok", 0) / urls, 6) if urls else None,
                manifest=MANIFEST, versions=versions())
    fileutil.write_atomically(fileutil.join(output, "metadata.json"),
                              (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    fileutil.delete_existing(fileutil.join(output, d) for d in (PIECES, JOURNAL))
    return meta


def job_facts(args: argparse.Namespace) -> dict:
    return {"job": "download", "inputs": list(args.input), "file_names": "md5(url).hexdigest() + extension",
            "network": {"timeout": args.timeout, "deadline": args.deadline, "retries": args.retries,
                        "threads_per_worker": args.threads, "per_host_per_worker": args.per_host,
                        "max_bytes": args.max_bytes, "min_size": args.min_size,
                        "respect_robots_tag": not args.ignore_robots_tag,
                        "allow_private_networks": args.allow_private_networks,
                        "placeholders": args.placeholders}}


def remove_leftovers(output: str) -> None:
    """Temporaries a killed run left: hidden in-progress files and manifest pieces (not the journal)."""
    temporaries = fileutil.matching([fileutil.join(output, f".*{fileutil.TEMP_MARK}*"),
                                     fileutil.join(output, JOURNAL, f".*{fileutil.TEMP_MARK}*")])
    fileutil.delete_existing([*temporaries, fileutil.join(output, PIECES)])


def run(argv: Sequence[str] | None = None) -> dict:
    """Run the job and return the metadata it wrote."""
    # Local runs are in-process: the job is network I/O on FetchFn's own thread pool (see options).
    args, pipeline_options = job_options.parse(make_parser(), argv, local_mode="in_memory")
    network_options.fetch_config(args)  # fail on bad options before any pipeline starts
    fileutil.ensure_dir(args.output)
    remove_leftovers(args.output)
    metadata = fileutil.join(args.output, "metadata.json")
    if FileSystems.exists(metadata):
        FileSystems.delete([metadata])  # present only once this run has finished
    found = job_options.run_job("download", build, pipeline_options, args)
    meta = read_json(metadata)
    _LOG.info("download finished: %s", meta["counts"])
    # Beam's counters of this run (runner-dependent, not in metadata.json): ok, failed_<status>, bytes,
    # throttled_ms, retries.
    meta["counters"] = {k.split(":", 1)[1]: v for k, v in found.items() if k.startswith("download:")}
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    print(summary(run(argv)))
    return 0


def summary(meta: dict) -> str:
    c = meta["counts"]
    failed = ", ".join(f"{k} {v}" for k, v in meta["statuses"].items() if k != "ok") or "none"
    rate = f"{100 * meta['success_rate']:.1f}%" if meta["success_rate"] is not None else "n/a"
    line = (f"download: {c['urls']} URLs ({c['listed']} listed, {c['repeated_lines']} repeated): ok {c['ok']} "
            f"({rate}), failed {c['failed']} [{failed}]; {c['kept_from_earlier_runs']} kept from earlier runs, "
            f"{c['processed_this_run']} processed now -> {meta['manifest']}")
    counted = meta.get("counters")
    if counted:
        line += (f"\n  this run: {counted.get('bytes', 0) / 1e6:.1f} MB fetched, {counted.get('retries', 0)} retries, "
                 f"{counted.get('throttled_ms', 0) / 1000:.1f} s waiting on host limits, Retry-After and backoff")
    return line
