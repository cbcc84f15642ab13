"""Downloading URL lists in Beam: concurrent fetching per worker, the manifest, resume and dedupe.

Two uses share one DoFn:
- `FetchImages`, a source inside downsample/colorize: URL entries -> ImageBlobs (kept in memory) and
  Failures, so one pipeline goes from a URL list to records;
- the `download` job: files `DIR/md5(url).ext` written atomically, one manifest record per URL, a
  journal of finished records flushed every few seconds so a killed run resumes without refetching.

Every record has the same keys: url, status, reason, bytes, sha256, width, height, file, key, label
(plus duplicate_of for duplicates). Statuses: ok, http_NNN, timeout, connection, not_image, too_large,
too_small, placeholder, duplicate, blocked, robots.
"""
from __future__ import annotations

import concurrent.futures as futures
import hashlib
import itertools
import json
import queue
import threading
import time
import uuid
from typing import Iterator, List, NamedTuple, Optional, Tuple, Union

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from imagebeam.transforms.imaging.decode import DecodeError, probe_image
from imagebeam.transforms.inputs.fetch import FetchConfig, Fetcher
from imagebeam.transforms.bookkeeping.fileutil import join, write_atomically
from imagebeam.transforms.bookkeeping.progress import ProgressTicker
from imagebeam.transforms.bookkeeping.staging import MergeBuckets, StageStream
from imagebeam.transforms.inputs.sources import Failure, ImageBlob
from imagebeam.transforms.inputs.url_lists import UrlEntry, url_md5

RECORD_KEYS = ("url", "status", "reason", "bytes", "sha256", "width", "height", "file", "key", "label")
JOURNAL = ".journal"
JOURNAL_EVERY_S = 2.0
JOURNAL_EVERY_RECORDS = 500


class Downloaded(NamedTuple):
    """A URL's manifest record, its bytes when kept in memory (source mode), and what it cost."""
    entry: UrlEntry
    record: dict
    data: Optional[bytes] = None
    attempts: int = 0
    throttled: float = 0.0


def make_record(entry: UrlEntry, status: str, reason: Optional[str] = None, data: Optional[bytes] = None,
                width: Optional[int] = None, height: Optional[int] = None, file: Optional[str] = None) -> dict:
    return {"url": entry.url, "status": status, "reason": reason or None,
            "bytes": None if data is None else len(data),
            "sha256": None if data is None else hashlib.sha256(data).hexdigest(),
            "width": width, "height": height, "file": file, "key": entry.key, "label": entry.label}


def entry_order(entry: UrlEntry) -> tuple:
    """A total order on entries (fields may be None): which of a URL's repeated lines is kept."""
    return tuple("" if value is None else value for value in entry)


def record_line(record: dict) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n"


def check_image(entry: UrlEntry, data: bytes, config: FetchConfig, full_decode: bool) -> Tuple[dict, Optional[str]]:
    """Classify fetched bytes: (record, file extension) with status ok, placeholder, not_image, too_large
    (a decompression bomb) or too_small. The record's `file` is left for the caller."""
    record = make_record(entry, "ok", data=data)
    if record["sha256"] in config.placeholders:
        record.update(status="placeholder", reason="a known placeholder image (--placeholders)")
        return record, None
    try:
        facts = probe_image(data, max_pixels=config.max_pixels, full_decode=full_decode)
    except DecodeError as exc:
        status = "too_large" if str(exc).startswith("decompression bomb") else "not_image"
        record.update(status=status, reason=str(exc))
        return record, None
    record.update(width=facts.width, height=facts.height)
    if min(facts.width, facts.height) < config.min_size:
        record.update(status="too_small", reason=f"{facts.width}x{facts.height} is below --min-size {config.min_size}")
        return record, None
    return record, facts.extension


def download_one(entry: UrlEntry, fetcher: Fetcher, output_dir: Optional[str], existing: Optional[str] = None,
                 full_decode: bool = True) -> Downloaded:
    """Fetch, validate and (with `output_dir`) store one URL. Never raises for a bad URL or response.

    `existing`: a file already in `output_dir` for this URL (an earlier run finished it but its record
    was lost): it is validated and recorded instead of fetched.
    """
    config = fetcher.config
    if entry.problem:
        return Downloaded(entry, make_record(entry, "blocked", entry.problem))
    if existing and output_dir:
        path = join(output_dir, existing)
        with FileSystems.open(path) as f:
            data = f.read()
        record, extension = check_image(entry, data, config, full_decode)
        if record["status"] == "ok" and existing == url_md5(entry.url) + extension:
            record["file"] = existing
            return Downloaded(entry, record)
        FileSystems.delete([path])  # not what this run would keep: fetch again
    fetched = fetcher.fetch(entry.url)
    if fetched.status != "ok":
        return Downloaded(entry, make_record(entry, fetched.status, fetched.reason), None,
                          fetched.attempts, fetched.throttled)
    record, extension = check_image(entry, fetched.data, config, full_decode)
    data = fetched.data
    if record["status"] == "ok":
        record["file"] = url_md5(entry.url) + extension
        if output_dir:
            write_atomically(join(output_dir, record["file"]), data)
            data = None
    else:
        data = None
    return Downloaded(entry, record, data, fetched.attempts, fetched.throttled)


class Journal:
    """Finished records, flushed to `DIR/.journal/part-[NAME-]*.jsonl` every few seconds (thread-safe)."""

    def __init__(self, directory: str, name: str = ""):
        self._dir, self._lines, self._lock = directory, [], threading.Lock()
        self._last = time.monotonic()
        self._prefix = f"{name}-{uuid.uuid4().hex}" if name else uuid.uuid4().hex
        self._parts = 0

    def add(self, record: dict) -> None:
        with self._lock:
            self._lines.append(record_line(record))
            if len(self._lines) >= JOURNAL_EVERY_RECORDS or time.monotonic() - self._last >= JOURNAL_EVERY_S:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        self._last = time.monotonic()
        if not self._lines:
            return
        self._parts += 1
        write_atomically(join(self._dir, f"part-{self._prefix}-{self._parts:06d}.jsonl"),
                         "".join(self._lines).encode("utf-8"))
        self._lines = []


class FetchingDoFn(beam.DoFn):
    """What every fetching DoFn shares: a Fetcher and a thread pool per worker, Beam counters, progress.

    Counters: download/ok, download/failed_<status>, download/bytes, download/throttled_ms, download/retries.
    """

    def __init__(self, config: FetchConfig, output_dir: Optional[str] = None, full_decode: bool = True,
                 progress: Optional[str] = None):
        self._config, self._output, self._full_decode = config, output_dir, full_decode
        self._progress = ProgressTicker(progress)
        self._bytes = beam.metrics.Metrics.counter("download", "bytes")
        self._throttled = beam.metrics.Metrics.counter("download", "throttled_ms")
        self._retries = beam.metrics.Metrics.counter("download", "retries")

    def setup(self):
        self._fetcher = Fetcher(self._config)
        self._pool = futures.ThreadPoolExecutor(self._config.threads, thread_name_prefix="fetch")
        # Start every thread now, while nothing else runs: started on demand, each start waits for the
        # GIL behind the busy ones (a few ms apiece with 128 threads).
        ready = threading.Event()
        for _ in range(self._config.threads):
            self._pool.submit(ready.wait)
        ready.set()

    def _count(self, result: Downloaded) -> Downloaded:
        """Counters are updated here, on the bundle's thread (Beam's metrics are per thread)."""
        status = result.record["status"]
        beam.metrics.Metrics.counter("download", "ok" if status == "ok" else f"failed_{status}").inc()
        self._progress.tick(ok=status == "ok", failed=status != "ok")
        self._bytes.inc(result.record["bytes"] or 0)
        self._throttled.inc(int(result.throttled * 1000))
        self._retries.inc(max(0, result.attempts - 1))
        return result

    def teardown(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


class FetchFn(FetchingDoFn):
    """(UrlEntry, existing file or None) -> Downloaded, `config.threads` downloads in flight per worker.

    Results are emitted as they complete; the rest at the end of the bundle.
    """

    def start_bundle(self):
        self._in_flight = 0
        self._done: "queue.SimpleQueue[futures.Future]" = queue.SimpleQueue()
        self._journal = Journal(join(self._output, JOURNAL)) if self._output else None

    def _work(self, entry: UrlEntry, existing: Optional[str]) -> Downloaded:
        result = download_one(entry, self._fetcher, self._output, existing, self._full_decode)
        if self._journal is not None:
            self._journal.add(result.record)
        return result

    def _collect(self, block: bool) -> Iterator[Downloaded]:
        """Finished downloads: all that are ready, waiting for one first when `block`."""
        while self._in_flight:
            try:
                future = self._done.get(block=block)
            except queue.Empty:
                return
            self._in_flight -= 1
            block = False
            yield self._count(future.result())

    def process(self, element):
        if isinstance(element, Failure):  # source mode: a repeated URL, accounted for upstream
            yield element
            return
        entry, existing = element
        self._pool.submit(self._work, entry, existing).add_done_callback(self._done.put)
        self._in_flight += 1
        yield from self._collect(block=self._in_flight >= 2 * self._config.threads)

    def finish_bundle(self):
        while self._in_flight:
            for result in self._collect(block=True):
                yield WindowedValue(result, MIN_TIMESTAMP, [GlobalWindow()])
        if self._journal is not None:
            self._journal.flush()
        self._progress.flush()


# --- source mode: URL list -> ImageBlobs ---------------------------------------------------------------

def url_entry_item(entry: UrlEntry):
    """A listed entry as a staged entry: bucket = first byte of the URL's md5, sort key = the entry's
    fields in `entry_order` (the URL first, so a URL's lines are adjacent and its first line leads)."""
    fields = ["" if value is None else value for value in entry]
    key = "\0".join(fields).encode("utf-8", "surrogateescape")
    return int(url_md5(entry.url)[:2], 16), key, json.dumps(fields).encode("utf-8", "surrogateescape")


def first_of_each_url(task, entries) -> Iterator:
    """A merged bucket of staged entries (sorted by `url_entry_item`'s key) -> (first entry, no file) of
    every URL to fetch, and a Failure for every repeat of it (on the same output: FetchFn passes it on)."""
    def entry_of(payload: bytes) -> UrlEntry:
        fields = [None if v == "" else v for v in json.loads(payload.decode("utf-8", "surrogateescape"))]
        return UrlEntry(fields[0] or "", *fields[1:])

    for _, group in itertools.groupby((entry_of(payload) for _, payload in entries), key=lambda e: e.url):
        group = list(group)
        yield group[0], None
        for repeat in group[1:]:
            yield Failure(repeat.source, repeat.url, f"repeated URL: listed {len(group)} times, fetched once")


def to_blob(result: Union[Downloaded, Failure]) -> Union[ImageBlob, Failure]:
    """ok -> ImageBlob named by its key or file name; anything else -> Failure."""
    if isinstance(result, Failure):
        return result
    record, entry = result.record, result.entry
    if record["status"] == "ok":
        return ImageBlob(entry.source, entry.url, entry.key or record["file"], entry.label, result.data)
    reason = f"{record['status']}: {record['reason'] or ''}".rstrip(": ")
    return Failure(entry.source, entry.url, reason)


# The listed entries a worker holds before writing them as a sorted run: lines are small, so a list
# reaches this within ~100,000 lines per worker and memory is flat from there (more runs, not more memory).
URL_STAGE_MEMORY_MB = 32


class FetchImages(beam.PTransform):
    """UrlEntry -> ImageBlob or Failure: a URL list as an image source (no image stored on disk; the
    list's entries are staged under `staging` to find repeated URLs in bounded memory).

    One output, not two: a stager consumes both, fused with the fetch, so neither the images nor the
    failures are ever gathered by the runner (a Flatten of two outputs would be).

    Each URL is fetched once (repeats become failures, so every listed line is accounted for); the
    image's name is its key (fall11 id, --key-column) or `md5(url).ext`, its class the entry's label.
    """

    def __init__(self, config: FetchConfig, staging: str):
        super().__init__()
        self._config, self._staging = config, staging

    def expand(self, entries):
        # Repeats are found by a sort-merge of the entries staged on disk (bucketed by the URL's md5), not
        # by a GroupByKey that would hold every listed URL (14 M for fall11) in the runner's memory.
        summaries, _ = entries | "StageUrls" >> StageStream(self._staging, url_entry_item,
                                                            memory_mb=URL_STAGE_MEMORY_MB)
        return (summaries
                | "FirstOfEach" >> MergeBuckets(self._staging, first_of_each_url, resumable=False)
                | "Fetch" >> beam.ParDo(FetchFn(self._config, None, full_decode=False))
                | "ToBlobs" >> beam.Map(to_blob))


# --- download job: content dedupe ------------------------------------------------------------------

def resolve_duplicates(element) -> List[dict]:
    """sha256 -> records with that content: the first URL keeps its file, the others are duplicates.

    A duplicate that had stored its own copy is marked `_delete` (the manifest writer removes the file).
    """
    _, records = element
    records = sorted(records, key=lambda r: r["url"])
    holders = [r for r in records if r["status"] == "ok"]
    if not holders:
        return records
    winner = holders[0]
    return [winner] + [as_duplicate(r, winner["url"], winner["file"]) for r in records if r is not winner]


def as_duplicate(record: dict, winner_url: str, winner_file: str) -> dict:
    """`record` as a duplicate of the URL that keeps the content; its own copy, if any, is marked `_delete`."""
    duplicate = dict(record, status="duplicate", reason=f"same content as {winner_url}", file=winner_file,
                     duplicate_of=winner_url)
    if record["status"] == "ok" and record["file"] != winner_file:
        duplicate["_delete"] = record["file"]
    return duplicate


def read_records(path: str) -> Iterator[dict]:
    """The JSON lines of a manifest or journal part (a torn last line of a killed writer is skipped)."""
    with FileSystems.open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "url" in record and "status" in record:
                yield record


