"""imagebeam download: URL lists -> DIR/md5(url).ext files and DIR/manifest.jsonl, restartable (SPEC §3).

Memory does not grow with the list (transforms/inputs/download_shards.py):

    Lists -> CutShards (consecutive lines, as the list is read) -> FetchShards (threads per worker,
             per-host limit, retries, validation by decoding, atomic writes; a run file + marker per shard)
          -> MergeUrls (md5 buckets: one record per URL, earlier runs' records)
          -> DedupeContent (sha256 buckets: the first URL keeps the file)
          -> WritePieces (md5 buckets: ordered manifest pieces) -> WriteManifest -> metadata.json

Re-running resumes: finished shards are not fetched again; in a killed shard, journaled records are kept
and files stored without a record are validated instead of fetched; after a finished run, URLs with a
final record in manifest.jsonl (ok with its file present, or a permanent failure) are kept and transient
failures (timeout, connection, 429, 5xx) are tried again. The manifest has one record per listed URL,
ordered by file name (md5 of the URL).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import uuid
from typing import List, Sequence

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from imagebeam.runners import checks, network_options
from imagebeam.runners import options as job_options
from imagebeam.transforms.bookkeeping import fileutil, staging
from imagebeam.transforms.bookkeeping.report import conclude, read_json, versions
from imagebeam.transforms.inputs import download_shards as shards
from imagebeam.transforms.inputs import url_lists
from imagebeam.transforms.inputs.downloads import JOURNAL
from imagebeam.transforms.bookkeeping.progress import ProgressTicker
from imagebeam.transforms.inputs.url_lists import DEFAULT_SHARD_SIZE, cut_shards, estimated_lines, list_ranges
from imagebeam.runners.checks import OneLineParser

_LOG = logging.getLogger(__name__)
MANIFEST = "manifest.jsonl"
OLD_PIECES = ".manifest-pieces"  # an older version's temporaries


def make_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="imagebeam download", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", action="append", required=True,
                   help="URL list: text (URL = last token per line), CSV, JSONL or Parquet, optionally .gz, "
                        "or a .tgz holding a text list; globs allowed; repeat for several")
    p.add_argument("--output", required=True, help="download folder (local or any Beam filesystem)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help="consecutive list lines per unit of work (its own run file and completion marker)")
    network_options.add_arguments(p)
    return p


def build(p: beam.Pipeline, args: argparse.Namespace) -> None:
    config = network_options.fetch_config(args)
    output, columns = args.output, network_options.list_columns(args)
    progress = getattr(args, "progress", None)
    listed = estimated_lines(args.input) if progress else None
    if listed:  # the progress line's "of ~N, ETA" (no pass over the lists: see estimated_lines)
        ProgressTicker(progress).total(listed)
    summaries = (p
                 | "Lists" >> beam.Create(list(enumerate(args.input)))
                 | "ListRanges" >> beam.FlatMapTuple(list_ranges, url_lists.LIST_RANGE_BYTES)
                 | "SpreadRanges" >> beam.Reshuffle()   # a few small tuples: every worker takes ranges
                 | "CutShards" >> beam.FlatMap(cut_shards, args.shard_size, *columns)
                 | "FetchShards" >> beam.ParDo(shards.FetchShardsFn(config, output, args.run_id, progress)))
    merged = summaries | "MergeUrls" >> staging.MergeBucketRanges(
        shards.state_path(output, shards.URLS),
        functools.partial(shards.merge_urls, output=output, run_id=args.run_id), shards.MERGE_ENTRIES)
    decisions = (merged
                 | "ContentKeys" >> beam.Map(lambda m: m["content"])
                 | "DedupeContent" >> staging.MergeBucketRanges(
                     shards.state_path(output, shards.CONTENT),
                     functools.partial(shards.decide_duplicates, output=output), shards.MERGE_ENTRIES))
    pieces = ((merged | "Records" >> beam.Map(lambda m: m["records"]), decisions)
              | "RecordsAndDecisions" >> beam.Flatten()
              | "WritePieces" >> staging.MergeBucketRanges(
                  shards.state_path(output, shards.PIECES),
                  functools.partial(shards.write_piece, output=output), shards.MERGE_ENTRIES))
    counts = {"lists": summaries | "LineCounts" >> beam.Map(shards.counts_only),
              "urls": merged | "UrlCounts" >> beam.Map(shards.counts_only)}
    _ = (p | "Once" >> beam.Create([None])
         | "WriteManifest" >> beam.Map(finish, output, job_facts(args), beam.pvalue.AsList(pieces),
                                       **{k: beam.pvalue.AsList(v) for k, v in counts.items()}))


class CountsDontAddUp(RuntimeError):
    pass


def finish(_, output: str, facts: dict, pieces: list, lists: list, urls: list) -> dict:
    """manifest.jsonl from the pieces (in bucket order), then metadata.json; the job's state goes last."""
    lists, urls = shards.sum_counts(lists), shards.sum_counts(urls)
    statuses = dict(sorted(shards.sum_counts(piece["statuses"] for piece in pieces).items()))
    n_urls = sum(statuses.values())
    listed, repeated = lists.get("listed", 0), lists.get("repeated", 0) + urls.get("repeated", 0)
    kept, processed = urls.get("kept", 0), urls.get("processed", 0)
    counts = {"listed": listed, "repeated_lines": repeated, "urls": n_urls, "kept_from_earlier_runs": kept,
              "processed_this_run": processed, "ok": statuses.get("ok", 0), "failed": n_urls - statuses.get("ok", 0)}
    if n_urls != listed - repeated or n_urls != kept + processed or n_urls != urls.get("urls", 0):
        raise CountsDontAddUp(f"counts do not add up: {counts}, statuses {statuses}")
    # The runs the merges read are done with (a re-run after a kill from here on finds every merge's marker):
    # the disk holds the pieces and the manifest, not also each record twice more.
    fileutil.delete_existing(fileutil.matching([shards.state_path(output, d, "*.run")
                                                for d in (shards.SHARDS, shards.URLS, shards.CONTENT)]))
    paths = [piece["path"] for piece in sorted(pieces, key=lambda piece: piece["bucket"])]
    if paths:  # pieces are kept until the job's state goes: a re-run after a kill here re-emits them
        fileutil.concat_files(fileutil.join(output, MANIFEST), paths, move_single=False)
    else:
        fileutil.write_atomically(fileutil.join(output, MANIFEST), b"")
    meta = dict(facts, counts=counts, statuses=statuses,
                success_rate=round(statuses.get("ok", 0) / n_urls, 6) if n_urls else None,
                manifest=MANIFEST, versions=versions())
    fileutil.write_atomically(fileutil.join(output, "metadata.json"),
                              (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    fileutil.delete_existing(fileutil.join(output, d) for d in (shards.STATE, JOURNAL, OLD_PIECES))
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
    """Temporaries a killed run left: hidden in-progress files (the journal and the job's state stay)."""
    fileutil.delete_existing(fileutil.matching([fileutil.join(output, f".*{fileutil.TEMP_MARK}*"),
                                                fileutil.join(output, JOURNAL, f".*{fileutil.TEMP_MARK}*")]))


def prepare_state(args: argparse.Namespace) -> bool:
    """Keep the job's state (shards, merges, journal) if a killed run of the very same lists left it
    (True: resuming); otherwise start it afresh, indexing a finished run's manifest if there is one."""
    facts = argparse.Namespace(columns=network_options.list_columns(args), shard_size=args.shard_size,
                               range_bytes=url_lists.LIST_RANGE_BYTES)
    state = fileutil.join(args.output, shards.STATE)
    resuming = staging.prepare(state, staging.fingerprint("download", facts, args.input))
    if not resuming:
        fileutil.delete_existing([fileutil.join(args.output, JOURNAL)])
    manifest, index = fileutil.join(args.output, MANIFEST), shards.state_path(args.output, shards.PREVIOUS)
    if FileSystems.exists(manifest) and not shards.PreviousIndex.exists(index):  # (a kill may have cut it short)
        found = shards.PreviousIndex.build(manifest, index)
        _LOG.info("indexed %d final records of the earlier run's manifest", found)
    return resuming


def run(argv: Sequence[str] | None = None) -> dict:
    """Run the job and return the metadata it wrote."""
    # Local runs are in-process: the job is network I/O on FetchShardsFn's own thread pool (see options).
    args, pipeline_options = job_options.parse(make_parser(), argv, local_mode="in_memory")
    network_options.fetch_config(args)  # fail on bad options before any pipeline starts
    checks.check_positive(args, "shard_size")
    checks.check_inputs(args.input)
    checks.check_output(args.output, inputs=args.input)
    fileutil.ensure_dir(args.output)
    remove_leftovers(args.output)
    metadata = fileutil.join(args.output, "metadata.json")
    if FileSystems.exists(metadata):
        FileSystems.delete([metadata])  # present only once this run has finished
    prepare_state(args)
    args.run_id = uuid.uuid4().hex  # records fetched by this run (the rest are kept from earlier ones)
    found = job_options.run_job("download", build, pipeline_options, args)
    meta = read_json(metadata)
    _LOG.info("download finished: %s", meta["counts"])
    # Beam's counters of this run (runner-dependent, not in metadata.json): ok, failed_<status>, bytes,
    # throttled_ms, retries.
    meta["counters"] = {k.split(":", 1)[1]: v for k, v in found.items() if k.startswith("download:")}
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    meta = run(argv)
    args, _ = make_parser().parse_known_args(argv)
    return conclude(args.output, meta, summary(meta), download_problems(meta))


def download_problems(meta: dict) -> List[str]:
    """Dead links are normal in a URL list; a download that got nothing at all is not (an empty list, or
    every URL failing, which is nearly always one cause: the network, a proxy, a blocked range)."""
    statuses = {k: v for k, v in meta["statuses"].items() if k != "ok"}
    if not meta["counts"]["urls"]:
        return ["the lists hold no URL"]
    if meta["counts"]["ok"]:
        return []
    status, n = max(statuses.items(), key=lambda kv: kv[1])
    how = "the same way" if len(statuses) == 1 else f"mostly the same way ({n} of them)"
    return [f"every one of {meta['counts']['urls']} URLs failed, {how}: {status} (failures in manifest.jsonl)"]


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
