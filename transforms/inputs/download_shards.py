"""The download job in bounded memory: list shards fetched as they are read, then bounded merges.

A list is cut into byte ranges that any worker may take (`url_lists.list_ranges`), each range into shards
of consecutive lines as it is read (`url_lists.cut_shards`); each shard is
fetched on the worker's thread pool (shards overlap, so the pool never drains between them) and ends as
ONE run file of its records, sorted by (md5 of the URL, URL) and indexed by md5-prefix bucket, plus a
completion marker. Nothing per URL crosses the runner; only shard summaries do. Then three bounded merges
(`staging.MergeBucketRanges`: about MERGE_ENTRIES entries in memory per task):

1. MergeUrls, by md5 bucket: a URL listed in several shards is one record (the first entry in
   `entry_order` gives key and label; the best outcome wins: final before transient, ok first); records
   kept from a finished earlier run are read from its manifest; content keys go to sha256 buckets;
2. DedupeContent, by sha256 bucket: the first URL (in sort order) with the bytes keeps the file, the
   others become duplicates (a decision keyed by the loser's md5);
3. WritePieces, by md5 bucket: records with their decisions applied -> ordered manifest pieces.

Resume: a shard whose marker exists is not fetched again (its records count as kept); in an unfinished
shard, records journaled by the killed run are kept and files it stored without a record (in flight
when it died) are validated instead of fetched. A finished run's manifest.jsonl is indexed once
(PreviousIndex: 17 bytes per final record, memory-mapped) so that its final URLs are not fetched again
and their files are not read. Repeats across shards are settled by the file name md5(url).jpeg (validated,
not fetched), or by the download already in flight in the worker.
"""
from __future__ import annotations

import array
import contextlib
import itertools
import json
import os
import queue
from collections import Counter, OrderedDict
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from imagebeam.transforms.bookkeeping import fileutil
from imagebeam.transforms.bookkeeping.staging import BucketTask, read_marker, write_run
from imagebeam.transforms.imaging.decode import EXTENSIONS
from imagebeam.transforms.inputs.downloads import (JOURNAL, Downloaded, FetchingDoFn, Journal, as_duplicate,
                                                   download_one, entry_order, make_record, read_records,
                                                   record_line)
from imagebeam.transforms.inputs.fetch import FetchConfig, Refused, check_url, is_transient
from imagebeam.transforms.inputs.url_lists import Shard, UrlEntry, url_md5

STATE = ".shards"               # the job's working state under DIR, removed when it finishes
SHARDS, PREVIOUS = "shards", "previous"
URLS, CONTENT, PIECES = "urls", "content", "pieces"   # the three merges' staging folders
MERGE_ENTRIES = 40_000          # entries a merge task holds in memory
OPEN_SHARDS = 4                 # shards a worker has in flight at once (a slow URL holds its shard open)
KNOWN_EXTENSIONS = sorted(set(EXTENSIONS.values()))
_OTHER_EXTENSION = 255


def md5_bucket(md5: str) -> int:
    """256 buckets by the first byte of the digest: the bucket order is the manifest's order."""
    return int(md5[:2], 16)


def sort_key(md5: str, url: str) -> bytes:
    """The manifest's order, (md5, url), as bytes (md5 has a fixed width)."""
    return (md5 + url).encode("utf-8", "surrogateescape")


def state_path(output: str, *names: str) -> str:
    return fileutil.join(output, STATE, *names)


# --- a finished run's manifest, indexed ------------------------------------------------------------------

class PreviousIndex:
    """The final records of an earlier run's manifest.jsonl: 64-bit md5 prefix, what is needed to keep the
    record without reading anything (0: a final failure or duplicate; k: ok, stored as KNOWN_EXTENSIONS[k-1];
    255: ok, another extension) and the record's byte offset in the manifest (read back when merging).

    The manifest is sorted by md5, so the index is written in one pass without sorting. Local indexes are
    memory-mapped (pages the OS can drop), others read whole.
    """

    def __init__(self, folder: str):
        self._folder = folder
        self.keys = self._array("keys", np.uint64)
        self.flags = self._array("flags", np.uint8)
        self.offsets = self._array("offsets", np.uint64)

    def _array(self, name: str, dtype) -> np.ndarray:
        path = fileutil.join(self._folder, name)
        if "://" not in path:  # np.memmap refuses an empty file
            return np.memmap(path, dtype=dtype, mode="r") if os.path.getsize(path) else np.zeros(0, dtype)
        with FileSystems.open(path) as f:
            return np.frombuffer(f.read(), dtype=dtype)

    @staticmethod
    def exists(folder: str) -> bool:
        return FileSystems.exists(fileutil.join(folder, "offsets"))

    @staticmethod
    def build(manifest: str, folder: str) -> int:
        """Index `manifest`'s final records into `folder`, streamed (a chunk at a time); returns how many."""
        # Entered first, renamed into place last (ExitStack unwinds in reverse): the offsets file's presence
        # says the index is complete.
        names = ("offsets", "keys", "flags")
        columns = {name: array.array(code) for name, code in zip(names, "QQB")}
        found = at = 0
        with contextlib.ExitStack() as stack:
            files = {name: stack.enter_context(fileutil.atomic_writer(fileutil.join(folder, name))) for name in names}

            def flush() -> None:
                for name, column in columns.items():
                    files[name].write(column.tobytes())
                    del column[:]

            with FileSystems.open(manifest) as f:
                for line in iter(f.readline, b""):
                    try:
                        record = json.loads(line)
                        final = not is_transient(record["status"])
                    except (ValueError, KeyError, TypeError):
                        final = False
                    if final:
                        columns["keys"].append(int(url_md5(record["url"])[:16], 16))
                        columns["flags"].append(_flag(record))
                        columns["offsets"].append(at)
                        found += 1
                        if len(columns["flags"]) >= 1 << 16:
                            flush()
                    at += len(line)
            flush()
        return found

    def find(self, md5s: List[str]) -> List[Optional[Tuple[int, int]]]:
        """(flag, offset) of each md5's final record, or None."""
        if not md5s or not len(self.keys):
            return [None] * len(md5s)
        wanted = np.array([int(m[:16], 16) for m in md5s], dtype=np.uint64)
        at = np.minimum(np.searchsorted(self.keys, wanted), len(self.keys) - 1)
        hit = self.keys[at] == wanted
        return [(int(self.flags[i]), int(self.offsets[i])) if h else None for i, h in zip(at.tolist(), hit.tolist())]


def _flag(record: dict) -> int:
    if record["status"] != "ok":
        return 0
    ext = "." + (record.get("file") or "").split(".", 1)[-1]
    return KNOWN_EXTENSIONS.index(ext) + 1 if ext in KNOWN_EXTENSIONS else _OTHER_EXTENSION


def read_record_at(manifest, offset: int) -> Optional[dict]:
    """The manifest record at a byte offset (`manifest`: an open file)."""
    manifest.seek(offset)
    try:
        return json.loads(manifest.readline())
    except ValueError:
        return None


# --- fetching shards ---------------------------------------------------------------------------------------

class _OpenShard:
    """A shard being fetched: its results so far and how many are still in flight."""

    def __init__(self, shard_id: str, listed: int, repeated: int, journal: Optional[Journal]):
        self.id, self.listed, self.repeated, self.journal = shard_id, listed, repeated, journal
        self.results: List[Tuple[UrlEntry, Optional[dict], str]] = []   # (entry, record or None = kept, by)
        self.pending = 0
        self.sealed = False   # every URL of the shard has been started (only then can it close)


def first_entries(entries: Iterable[UrlEntry]) -> "OrderedDict[str, UrlEntry]":
    """url -> its first entry in `entry_order` (the one whose key and label are kept), in list order."""
    firsts: "OrderedDict[str, UrlEntry]" = OrderedDict()
    for entry in entries:
        known = firsts.get(entry.url)
        if known is None or entry_order(entry) < entry_order(known):
            firsts[entry.url] = entry
    return firsts


def refused(entry: UrlEntry, config: FetchConfig) -> Optional[dict]:
    """The `blocked` record of a URL that would be refused before any traffic, else None (same record as
    `download_one` makes: decided here without a thread)."""
    if entry.problem:
        return make_record(entry, "blocked", entry.problem)
    try:
        check_url(entry.url, config.allow_private_networks)
    except Refused as exc:
        return make_record(entry, exc.status, str(exc))
    return None


class FetchShardsFn(FetchingDoFn):
    """Shard -> its summary {"run", "buckets", "listed", "repeated", "shard"} once all its URLs are done.

    Up to 2 x `threads` downloads in flight, across up to OPEN_SHARDS shards; a shard with a marker is
    not fetched again. Each shard's records are journaled every few seconds (DIR/.journal/part-<shard>-*),
    so a killed shard resumes without refetching what it finished.
    """

    def __init__(self, config: FetchConfig, output: str, run_id: str, progress: Optional[str] = None):
        super().__init__(config, output, True, progress)
        self._run_id = run_id

    def setup(self):
        super().setup()
        folder = state_path(self._output, PREVIOUS)
        self._previous = PreviousIndex(folder) if PreviousIndex.exists(folder) else None

    def start_bundle(self):
        self._in_flight = 0
        self._done: "queue.SimpleQueue" = queue.SimpleQueue()
        self._open: "OrderedDict[str, _OpenShard]" = OrderedDict()
        self._waiting: Dict[str, List[Tuple[_OpenShard, UrlEntry]]] = {}   # url in flight -> its repeats
        self._finished: List[dict] = []

    # -- per shard --

    def process(self, shard: Shard):
        marker = read_marker(self._marker(shard.id))
        if marker is not None:
            yield marker
            return
        firsts = first_entries(shard.entries)
        started = state_path(self._output, SHARDS, shard.id + ".started")
        resumed = FileSystems.exists(started)
        if not resumed:
            fileutil.write_atomically(started, b"")
        journaled = self._journaled(shard.id) if resumed else {}
        entry_list = list(firsts.values())
        previous = self._previous.find([url_md5(e.url) for e in entry_list]) if self._previous else \
            [None] * len(entry_list)
        shard_state = _OpenShard(shard.id, len(shard.entries), len(shard.entries) - len(firsts),
                                 Journal(fileutil.join(self._output, JOURNAL), shard.id))
        self._open[shard.id] = shard_state
        for entry, found in zip(entry_list, previous):
            self._start(shard_state, entry, journaled.get(entry.url), found, resumed)
            while self._in_flight >= 2 * self._config.threads:
                self._take(block=True)
            yield from self._emit()
        shard_state.sealed = True
        self._close_if_done(shard_state)
        while len(self._open) > OPEN_SHARDS:
            self._take(block=True)
        self._take(block=False)
        yield from self._emit()

    def _start(self, shard: _OpenShard, entry: UrlEntry, journaled: Optional[dict],
               previous: Optional[Tuple[int, int]], resumed: bool) -> None:
        """Settle one URL now (kept, refused) or put it in flight. Nothing here waits on the file system:
        a syscall on this thread gives the GIL to the pool's threads, and the pool then starves."""
        if journaled is not None:
            shard.results.append((entry, journaled, ""))
            return
        if previous is not None and previous[0] == 0:   # a final failure of a finished run: kept as it is
            shard.results.append((entry, None, ""))
            return
        record = refused(entry, self._config)
        if record is not None:
            self._count(Downloaded(entry, record))
            shard.results.append((entry, record, self._run_id))
            return
        shard.pending += 1
        if entry.url in self._waiting:   # the same URL from an earlier shard is in flight: share its result
            self._waiting[entry.url].append((shard, entry))
            return
        self._waiting[entry.url] = []
        future = self._pool.submit(self._work, shard.journal, entry, previous, resumed)
        future.add_done_callback(lambda f, s=shard: self._done.put((s, f)))
        self._in_flight += 1

    def _work(self, journal: Journal, entry: UrlEntry, previous: Optional[Tuple[int, int]],
              resumed: bool) -> Tuple[UrlEntry, Optional[Downloaded]]:
        """(entry, None) when a finished run's ok record still holds (its file is there), else the download."""
        md5 = url_md5(entry.url)
        if previous is not None and self._previous_still_final(md5, *previous):
            return entry, None
        result = download_one(entry, self._fetcher, self._output, self._stored(md5, resumed), self._full_decode)
        journal.add(result.record)
        return entry, result

    def _take(self, block: bool) -> None:
        """Record finished downloads: all that are ready, waiting for one first when `block`."""
        while self._in_flight:
            try:
                shard, future = self._done.get(block=block)
            except queue.Empty:
                return
            block = False
            self._in_flight -= 1
            entry, result = future.result()
            if result is None:
                self._finish_one(shard, entry, None, "")
            else:
                self._finish_one(shard, entry, self._count(result).record, self._run_id)
            for other, repeat in self._waiting.pop(entry.url, []):
                record = None if result is None else dict(result.record, key=repeat.key, label=repeat.label)
                self._finish_one(other, repeat, record, "" if result is None else self._run_id)

    def _finish_one(self, shard: _OpenShard, entry: UrlEntry, record: Optional[dict], by: str) -> None:
        shard.results.append((entry, record, by))
        shard.pending -= 1
        self._close_if_done(shard)

    def _close_if_done(self, shard: _OpenShard) -> None:
        """A shard with nothing in flight: its run file, then its marker; its journal is no longer needed."""
        if shard.pending or not shard.sealed or shard.id not in self._open:
            return
        del self._open[shard.id]
        entries = []
        for entry, record, by in shard.results:
            md5 = url_md5(entry.url)
            payload = json.dumps({"e": list(entry), "r": record, "by": by}, sort_keys=True)
            entries.append((md5_bucket(md5), sort_key(md5, entry.url), payload.encode("utf-8")))
        run = state_path(self._output, SHARDS, shard.id + ".run")
        summary = {"run": run, "buckets": write_run(run, entries), "listed": shard.listed,
                   "repeated": shard.repeated, "shard": shard.id}
        fileutil.write_atomically(self._marker(shard.id), json.dumps(summary).encode("utf-8"))
        fileutil.delete_existing(fileutil.matching([fileutil.join(self._output, JOURNAL, f"part-{shard.id}-*")]))
        self._finished.append(summary)

    def _emit(self) -> Iterator[dict]:
        finished, self._finished = self._finished, []
        yield from finished

    def finish_bundle(self):
        while self._in_flight:
            self._take(block=True)
        for summary in self._emit():
            yield WindowedValue(summary, MIN_TIMESTAMP, [GlobalWindow()])
        self._progress.flush()

    # -- what earlier runs left --

    def _marker(self, shard_id: str) -> str:
        return state_path(self._output, SHARDS, shard_id + ".json")

    def _journaled(self, shard_id: str) -> Dict[str, dict]:
        """url -> final record journaled by a killed run of this shard (ok only with its file present)."""
        out = {}
        for path in fileutil.matching([fileutil.join(self._output, JOURNAL, f"part-{shard_id}-*.jsonl")]):
            for record in read_records(path):
                if is_transient(record["status"]):
                    continue
                if record["status"] == "ok" and not FileSystems.exists(fileutil.join(self._output, record["file"])):
                    continue
                out[record["url"]] = record
        return out

    def _previous_still_final(self, md5: str, flag: int, offset: int) -> bool:
        """A finished run's final record is kept: a failure as is, ok while its file is there."""
        if flag == 0:
            return True
        if flag == _OTHER_EXTENSION:
            with FileSystems.open(fileutil.join(self._output, "manifest.jsonl")) as f:
                name = (read_record_at(f, offset) or {}).get("file") or ""
        else:
            name = md5 + KNOWN_EXTENSIONS[flag - 1]
        return bool(name) and FileSystems.exists(fileutil.join(self._output, name))

    def _stored(self, md5: str, every_extension: bool) -> Optional[str]:
        """A file already stored for this URL: by an earlier shard (the usual .jpeg) or, in a resumed shard,
        by a download that was in flight when the run died (any extension)."""
        for ext in (KNOWN_EXTENSIONS if every_extension else [".jpeg"]):
            if FileSystems.exists(fileutil.join(self._output, md5 + ext)):
                return md5 + ext
        return None


# --- merge 1: one record per URL ---------------------------------------------------------------------------

def _rank(candidate: Tuple[dict, str]) -> tuple:
    record = candidate[0]
    return is_transient(record["status"]), record["status"] != "ok", record_line(record)


def lost_record(entry: UrlEntry) -> dict:
    """A kept record the earlier manifest no longer has (edited by hand): a later run fetches the URL."""
    return make_record(entry, "connection", "the earlier run's record was not found; fetched by the next run")


def merge_urls(task: BucketTask, entries: List[Tuple[bytes, bytes]], output: str, run_id: str) -> Iterator[dict]:
    """Shard records of a range of md5 buckets -> one record per URL (a records run) and the content keys
    of stored images (a run by sha256 bucket), with counts."""
    records, content = [], []
    counts: Counter = Counter()
    with _PreviousRecords(output) as previous:
        for key, group in itertools.groupby(entries, key=lambda e: e[0]):
            items = [json.loads(payload) for _, payload in group]
            entry = min((UrlEntry(*item["e"]) for item in items), key=entry_order)
            candidates = [(dict(item["r"], key=entry.key, label=entry.label), item["by"]) if item["r"] is not None
                          else (previous.record(entry) or lost_record(entry), "") for item in items]
            record, by = min(candidates, key=_rank)
            counts["urls"] += 1
            counts["repeated"] += len(items) - 1
            counts["processed" if by == run_id else "kept"] += 1
            records.append((md5_bucket(key[:2].decode()), key,
                            (record["status"] + "\n" + record_line(record)).encode("utf-8")))
            if record["status"] in ("ok", "duplicate") and record.get("sha256"):
                sha = record["sha256"]
                content.append((md5_bucket(sha), sort_key(sha, record["url"]),
                                json.dumps({"status": record["status"], "file": record["file"]}).encode("utf-8")))
    folder = state_path(output, URLS)
    yield dict(counts, records=_run(fileutil.join(folder, f"records-{task.bucket:03d}.run"), records),
               content=_run(fileutil.join(folder, f"content-{task.bucket:03d}.run"), content))


class _PreviousRecords:
    """Records of a finished run's manifest, read by offset through its PreviousIndex (opened on first use)."""

    def __init__(self, output: str):
        self._output, self._index, self._file = output, None, None

    def __enter__(self) -> "_PreviousRecords":
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()

    def record(self, entry: UrlEntry) -> Optional[dict]:
        if self._file is None:
            folder = state_path(self._output, PREVIOUS)
            if not PreviousIndex.exists(folder):
                return None
            self._index = PreviousIndex(folder)
            self._file = FileSystems.open(fileutil.join(self._output, "manifest.jsonl"))
        found = self._index.find([url_md5(entry.url)])[0]
        record = read_record_at(self._file, found[1]) if found else None
        return record if record and record.get("url") == entry.url else None


def _run(path: str, entries: list) -> dict:
    return {"run": path, "buckets": write_run(path, entries) if entries else []}


# --- merge 2: content dedupe --------------------------------------------------------------------------------

def decide_duplicates(task: BucketTask, entries: List[Tuple[bytes, bytes]], output: str) -> Iterator[dict]:
    """Content keys of a range of sha256 buckets -> decisions keyed by the losing URL's md5: the first URL
    (in sort order) holding the bytes keeps its file, as `resolve_duplicates` decides."""
    decisions = []
    for sha, group in itertools.groupby(entries, key=lambda e: e[0][:64]):
        items = [(key[64:].decode("utf-8", "surrogateescape"), json.loads(payload)) for key, payload in group]
        holders = [(url, item) for url, item in items if item["status"] == "ok"]
        if not holders or len(items) < 2:
            continue
        winner_url, winner = holders[0]
        for url, _ in items:
            if url != winner_url:
                md5 = url_md5(url)
                payload = json.dumps({"winner": winner_url, "file": winner["file"]})
                decisions.append((md5_bucket(md5), sort_key(md5, url), b"D" + payload.encode("utf-8")))
    yield _run(state_path(output, CONTENT, f"decisions-{task.bucket:03d}.run"), decisions)


# --- merge 3: the manifest pieces ---------------------------------------------------------------------------

def write_piece(task: BucketTask, entries: List[Tuple[bytes, bytes]], output: str) -> Iterator[dict]:
    """Records (with their dedupe decisions) of a range of md5 buckets -> one ordered manifest piece;
    the files duplicates had stored are deleted."""
    lines, statuses, delete = [], Counter(), []
    for _, group in itertools.groupby(entries, key=lambda e: e[0]):
        payloads = [payload for _, payload in group]
        decision = next((json.loads(p[1:]) for p in payloads if p[:1] == b"D"), None)
        status, line = next(p for p in payloads if p[:1] != b"D").decode("utf-8").split("\n", 1)
        if decision is not None:
            record = as_duplicate(json.loads(line), decision["winner"], decision["file"])
            if "_delete" in record:
                delete.append(fileutil.join(output, record.pop("_delete")))
            status, line = record["status"], record_line(record)
        statuses[status] += 1
        lines.append(line)
    fileutil.delete_existing(delete)
    path = state_path(output, PIECES, f"piece-{task.bucket:03d}.jsonl")
    fileutil.write_atomically(path, "".join(lines).encode("utf-8"))
    yield {"bucket": task.bucket, "path": path, "statuses": dict(statuses)}


def counts_only(part: dict) -> dict:
    """The numeric fields of a shard summary or merge output (what the final counts add up)."""
    return {k: v for k, v in part.items() if isinstance(v, int) and not isinstance(v, bool)}


def sum_counts(parts: Iterable[dict]) -> dict:
    """Numeric fields summed over dicts (shard summaries, merge outputs); other fields are ignored."""
    total: Counter = Counter()
    for part in parts:
        total.update(counts_only(part))
    return dict(total)
