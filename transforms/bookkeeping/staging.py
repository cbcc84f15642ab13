"""Staging, ordering and merging for every image job: sorted runs on disk, small keys in the shuffle.

No job moves the dataset's bytes through a shuffle that a runner holds in memory. Instead:

1. **Stage** (`StageUnits`, `StageStream`): each work unit (a member tar, a run of tar members or of
   folder files; for inputs that cannot be re-read, a bundle of fetched images) turns its images into
   entries `(bucket, sort key, payload)` with a job's `item_fn`, sorts them and writes ONE run file under
   the staging folder, then a JSON marker with the run's index (byte range and count per bucket), its read
   count and its failures. Only that small summary travels on.
2. **Plan** (`plan_buckets`): from the summaries alone (counts per bucket, nothing else), every bucket gets
   its slices of every run and its global rank offset within its group (a split).
3. **Merge** (`MergeBuckets`): a bucket's entries are read from the runs (one contiguous read per run)
   and merged by key; the job's `merge_fn` writes outputs from them. Memory: at most `--stage-memory`
   of entries per worker while staging (a larger unit is written as several runs), one
   bucket while merging.

Resume: a unit whose marker exists (written last, with the same job fingerprint) is not read again, and
a bucket whose marker exists is not merged again; both re-emit what their marker recorded, so a re-run
after a kill produces the same bytes. `prepare` keeps the staging folder only for the very same job
(options and input files): anything else starts afresh.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import struct
import uuid
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from imagebeam.transforms.bookkeeping import fileutil
from imagebeam.transforms.bookkeeping.progress import ProgressTicker
from imagebeam.transforms.inputs.sources import Failure, ImageBlob, Indexed, WorkUnit, read_unit

FAILURES = "failures"
JOB_FILE = "job.json"
UNITS, MERGED = "units", "merged"
# A worker holds at most about this many bytes of staged entries before it writes them out as a sorted
# run: a unit larger than that (an ILSVRC member tar of 1,300 JPEGs is ~140 MB) becomes several runs,
# and a bundle of fetched images is flushed at that size.
# `--stage-memory` sets it; the merged order is the same whatever it is (runs are merged by key).
DEFAULT_STAGE_MEMORY_MB = 128

_ENTRY = struct.Struct("<III")  # bucket, key length, payload length; then key, payload

Entry = Tuple[int, bytes, bytes]                  # (bucket, sort key, payload)
ItemFn = Callable[..., Union[Entry, Failure]]      # (ImageBlob, *side values) -> entry or failure
# What a held entry costs beyond its key and payload bytes: a 3-tuple, two bytes objects, a list slot.
# Counted against the budget, so that small entries (URL-list lines: ~100 bytes of payload) are held
# within --stage-memory too, not at several times it.
_HELD_OVERHEAD = 140


def held_size(entry: Entry) -> int:
    """The memory an entry takes while a worker holds it (for the --stage-memory budget)."""
    return _HELD_OVERHEAD + len(entry[1]) + len(entry[2])


# --- the staging folder of one job ---------------------------------------------------------------------

# Options that do not change what is staged: a re-run with another --stage-memory (say, after a kill for
# lack of memory) resumes the same staging folder.
VOLATILE_ARGS = ("progress", "fingerprint", "stage_memory")


def fingerprint(job: str, args: Any, inputs: Sequence[str]) -> str:
    """What the staged data depends on: the job, its options and each input file's size and mtime."""
    facts = {k: v for k, v in sorted(vars(args).items()) if k not in VOLATILE_ARGS}
    stats = []
    for spec in inputs:
        patterns = [spec] if any(c in spec for c in "*?[") else [spec, FileSystems.join(spec.rstrip("/"), "**")]
        found = []
        for pattern in patterns:  # a file, a glob, or a folder's files
            try:
                found += FileSystems.match([pattern])[0].metadata_list
            except Exception:  # noqa: BLE001 - matches nothing: nothing to fingerprint
                pass
        stats.append(sorted((m.path, m.size_in_bytes, getattr(m, "last_updated_in_seconds", 0)) for m in found))
    blob = json.dumps({"job": job, "facts": facts, "inputs": stats}, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode("utf-8"), digest_size=16).hexdigest()


def read_marker(path: str) -> Optional[Any]:
    """A marker's JSON, or None when there is none (or it cannot be read: then its work is redone)."""
    if not FileSystems.exists(path):
        return None
    try:
        return fileutil.read_json(path)
    except (OSError, ValueError):
        return None


def prepare(staging: str, job_fingerprint: str) -> bool:
    """Keep `staging` if an earlier run of this very job left it (True: resuming); else start it afresh."""
    path = fileutil.join(staging, JOB_FILE)
    if (read_marker(path) or {}).get("fingerprint") == job_fingerprint:
        return True
    fileutil.delete_existing([staging])
    fileutil.write_atomically(path, json.dumps({"fingerprint": job_fingerprint}).encode("utf-8"))
    return False
    return False


# --- run files -----------------------------------------------------------------------------------------

def write_run(path: str, entries: List[Entry]) -> List[List[int]]:
    """Sort `entries` by (bucket, key), write them to `path`; returns [[bucket, offset, length, count]]."""
    entries.sort(key=lambda e: (e[0], e[1]))
    index: List[List[int]] = []
    at = 0

    def write(f):
        nonlocal at
        for bucket, key, payload in entries:
            if not index or index[-1][0] != bucket:
                index.append([bucket, at, 0, 0])
            f.write(_ENTRY.pack(bucket, len(key), len(payload)))
            f.write(key)
            f.write(payload)
            n = _ENTRY.size + len(key) + len(payload)
            index[-1][2] += n
            index[-1][3] += 1
            at += n

    fileutil.write_with(path, write)
    return index


def read_slice(path: str, offset: int, length: int) -> List[Tuple[bytes, bytes]]:
    """The (key, payload) entries of one bucket of one run, in key order (one read)."""
    with FileSystems.open(path) as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise IOError(f"staged run {path} is shorter than its index says ({len(data)} of {length} bytes)")
    out, at = [], 0
    view = memoryview(data)
    while at < length:
        _, n_key, n_payload = _ENTRY.unpack_from(data, at)
        at += _ENTRY.size
        out.append((bytes(view[at:at + n_key]), bytes(view[at + n_key:at + n_key + n_payload])))
        at += n_key + n_payload
    return out


def at_bundle_end(value: Any) -> WindowedValue:
    """`value` as a DoFn's finish_bundle must yield it (in the global window)."""
    return WindowedValue(value, GlobalWindow().max_timestamp(), [GlobalWindow()])


def iter_run(path: str) -> Iterator[Tuple[bytes, bytes]]:
    """A whole run's (key, payload) entries in file order, read as a stream (any size, bounded memory)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        while header := f.read(_ENTRY.size):
            if len(header) != _ENTRY.size:
                raise IOError(f"staged run {path} ends inside an entry")
            _, n_key, n_payload = _ENTRY.unpack(header)
            body = f.read(n_key + n_payload)
            if len(body) != n_key + n_payload:
                raise IOError(f"staged run {path} ends inside an entry")
            yield body[:n_key], body[n_key:]


def merge_runs(paths: Sequence[str]) -> Iterator[Tuple[bytes, bytes]]:
    """The entries of whole runs merged by key (equal keys in the order of `paths`), one entry per run
    held at a time: the merge of an external sort."""
    return heapq.merge(*(iter_run(p) for p in paths), key=lambda e: e[0])


def order_key(*fields: str) -> bytes:
    """Bytes that sort as the tuple of strings does (code point order, a shorter prefix first): UTF-8
    keeps code point order; each field ends with 00 00 and its own 00 bytes become 00 01."""
    return b"".join(f.encode("utf-8", "surrogatepass").replace(b"\0", b"\0\1") + b"\0\0" for f in fields)


class _SortToRunsFn(beam.DoFn):
    """Elements -> entries (`entry_fn`) -> sorted runs `PREFIX<uuid>.run[.NNNNN]` of about `memory_mb`
    each; one {"run", "count"} per run at the end of the bundle (the elements themselves go no further)."""

    def __init__(self, prefix: str, entry_fn: Callable[[Any], Entry], memory_mb: int):
        self._prefix, self._entry_fn, self._budget = prefix, entry_fn, max(1, memory_mb) << 20

    def start_bundle(self):
        self._runs = _BoundedRuns(self._prefix + uuid.uuid4().hex, self._budget)

    def process(self, element):
        self._runs.append(self._entry_fn(element))

    def finish_bundle(self):
        for path, index in self._runs.flush():
            yield at_bundle_end({"run": path, "count": sum(n for _, _, _, n in index)})


class SortToRuns(beam.PTransform):
    """Elements -> descriptors {"run", "count"} of sorted runs on disk, written by the worker that holds
    the elements (fused with their producer, so the elements are never gathered in one place). With
    `merge_runs` over every descriptor's run, this is an external sort in bounded memory: used for
    outputs that every job writes in one sorted file (failures.jsonl) whatever their number."""

    def __init__(self, prefix: str, entry_fn: Callable[[Any], Entry], memory_mb: int = 16):
        super().__init__()
        self._fn = _SortToRunsFn(prefix, entry_fn, memory_mb)

    def expand(self, elements):
        return elements | "SortToRuns" >> beam.ParDo(self._fn)


# --- stage: units -> runs + markers --------------------------------------------------------------------

def unit_id(unit: WorkUnit) -> str:
    """A stable name for a work unit (the same input gives the same units in the same order)."""
    return hashlib.blake2b(repr(tuple(unit)).encode("utf-8"), digest_size=16).hexdigest()


def failure_from_json(d: dict) -> Failure:
    return Failure(d["source"], d.get("member"), d["reason"])


def _summary(run: Optional[str], index: List[List[int]], read: int, failures: List[Failure],
             unit: bool = True) -> dict:
    """What a staged unit tells the rest of the job (`unit`: a resumable work unit, not a stream run).
    Its failures travel on their own output, not in the summary: every summary is gathered in one place
    to plan the merge, so it must stay small however many inputs fail."""
    return {"run": run, "buckets": index, "read": read, "failed": len(failures), "unit": unit, "reused": False}


class _BoundedRuns:
    """A unit's entries, written out as sorted runs of at most `budget` bytes each (a list-like sink
    for _UnitStager): `base.run`, then `base.run.00001`, ...: names that sort in the order written, so
    equal keys merge in input order as they would from one run. flush() returns [(path, index)]."""

    def __init__(self, base: str, budget: int):
        self._base, self._budget = base, budget
        self._entries: List[Entry] = []
        self._size = 0
        self.runs: List[Tuple[str, List[List[int]]]] = []

    def append(self, entry: Entry) -> None:
        self._entries.append(entry)
        self._size += held_size(entry)
        if self._size >= self._budget:
            self.flush()

    def flush(self) -> List[Tuple[str, List[List[int]]]]:
        if self._entries:
            path = f"{self._base}.run" + (f".{len(self.runs):05d}" if self.runs else "")
            self.runs.append((path, write_run(path, self._entries)))
            self._entries, self._size = [], 0
        return self.runs


class _UnitStager:
    """Shared by both stagers: item_fn over blobs, failures kept, progress ticks."""

    def __init__(self, item_fn: ItemFn, progress: Optional[str]):
        self._item_fn, self._progress = item_fn, ProgressTicker(progress)

    def entries(self, blobs: Iterable[Union[ImageBlob, Failure]], side: tuple,
                entries: Union[List[Entry], _BoundedRuns], failures: List[Failure]) -> int:
        read = 0
        for blob in blobs:
            read += 1
            out = blob if isinstance(blob, Failure) else self._item_fn(blob, *side)
            if isinstance(out, Failure):
                failures.append(out)
                self._progress.tick(failed=1)
            else:
                entries.append(out)
                self._progress.tick(ok=1)
        return read

    def flush(self) -> None:
        self._progress.flush()


class _StageUnitFn(beam.DoFn):
    def __init__(self, staging: str, params: str, item_fn: ItemFn, progress: Optional[str],
                 memory_mb: int = DEFAULT_STAGE_MEMORY_MB):
        self._staging, self._params, self._budget = staging, params, max(1, memory_mb) << 20
        self._stager = _UnitStager(item_fn, progress)
        self._staged = beam.metrics.Metrics.counter("imagebeam", "units_staged")
        self._reused = beam.metrics.Metrics.counter("imagebeam", "units_reused")

    def process(self, item: Indexed, *side):
        if isinstance(item, Failure):  # the index itself failed somewhere: one input, not read
            yield _summary(None, [], 1, [item], unit=False)
            yield pvalue.TaggedOutput(FAILURES, item)
            return
        name = unit_id(item)
        marker = fileutil.join(self._staging, UNITS, name + ".json")
        recorded = _load_marker(marker, self._params)
        if recorded is not None:
            self._reused.inc()
            summaries = _unit_summaries(recorded, reused=True)
        else:
            runs = _BoundedRuns(fileutil.join(self._staging, UNITS, name), self._budget)
            failures: List[Failure] = []
            read = self._stager.entries(read_unit(item), side, runs, failures)
            recorded = {"runs": runs.flush(), "read": read, "failures": [f.to_json() for f in failures]}
            fileutil.write_atomically(marker, json.dumps(dict(recorded, params=self._params)).encode("utf-8"))
            self._staged.inc()
            summaries = _unit_summaries(recorded, reused=False)
        yield from summaries
        for f in recorded["failures"]:
            yield pvalue.TaggedOutput(FAILURES, failure_from_json(f))

    def finish_bundle(self):
        self._stager.flush()


def _unit_summaries(recorded: dict, reused: bool) -> List[dict]:
    """A unit's marker -> one summary per run; the unit's counts (read, failures, unit, reused) go on the
    first only, so they are counted once."""
    runs = recorded["runs"] or [(None, [])]
    out = [_summary(path, index, 0, [], unit=False) for path, index in runs]
    out[0].update(read=recorded["read"], failed=len(recorded["failures"]), unit=True, reused=reused)
    return out


def _load_marker(path: str, params: str) -> Optional[dict]:
    summary = read_marker(path)
    if summary is None or summary.pop("params", None) != params:
        return None
    return summary


def _side_args(side_inputs: Sequence[Any]) -> list:
    return [pvalue.AsSingleton(s) if isinstance(s, pvalue.PCollection) else s for s in side_inputs]


class StageUnits(beam.PTransform):
    """Indexed work units (and index failures) -> (summaries, failures); runs and markers in `staging`.

    `item_fn(blob, *side)` returns an Entry or a Failure; `side_inputs` are singleton PCollections (or
    plain values) passed to it. `params` (a string) must change whenever entries would: a marker made
    with other params is not reused. `memory_mb`: a worker writes a run whenever it holds this much.
    """

    def __init__(self, staging: str, item_fn: ItemFn, params: str, side_inputs: Sequence[Any] = (),
                 progress: Optional[str] = None, memory_mb: int = DEFAULT_STAGE_MEMORY_MB):
        super().__init__()
        self._fn = _StageUnitFn(staging, params, item_fn, progress, memory_mb)
        self._side = list(side_inputs)

    def expand(self, indexed):
        out = (indexed
               | "SpreadUnits" >> beam.Reshuffle()
               | "StageUnit" >> beam.ParDo(self._fn, *_side_args(self._side)).with_outputs(FAILURES, main="summaries"))
        return out.summaries, out[FAILURES]


class _StageStreamFn(beam.DoFn):
    """Blobs that cannot be read again (fetched from URL lists) -> runs of about `memory_mb` each."""

    def __init__(self, staging: str, item_fn: ItemFn, progress: Optional[str],
                 memory_mb: int = DEFAULT_STAGE_MEMORY_MB):
        self._staging, self._budget = staging, max(1, memory_mb) << 20
        self._stager = _UnitStager(item_fn, progress)

    def start_bundle(self):
        self._entries: List[Entry] = []
        self._read = self._bytes = self._failed = 0

    def process(self, blob: Union[ImageBlob, Failure], *side):
        before = len(self._entries)
        failures: List[Failure] = []
        self._read += self._stager.entries([blob], side, self._entries, failures)
        self._failed += len(failures)
        for f in failures:  # at once: a list of dead links must not pile up in memory
            yield pvalue.TaggedOutput(FAILURES, f)
        self._bytes += sum(held_size(e) for e in self._entries[before:])
        if self._bytes >= self._budget:
            yield from self._flush()

    def finish_bundle(self):
        for summary in self._flush():  # summaries only: failures went out as they came
            yield at_bundle_end(summary)
        self._stager.flush()

    def _flush(self):
        if not self._read:
            return
        run = fileutil.join(self._staging, UNITS, f"stream-{uuid.uuid4().hex}.run") if self._entries else None
        index = write_run(run, self._entries) if run else []
        yield dict(_summary(run, index, self._read, [], unit=False), failed=self._failed)
        self.start_bundle()


class StageStream(beam.PTransform):
    """Blobs and read failures -> (summaries, failures), like StageUnits (runs are not resumable)."""

    def __init__(self, staging: str, item_fn: ItemFn, side_inputs: Sequence[Any] = (),
                 progress: Optional[str] = None, memory_mb: int = DEFAULT_STAGE_MEMORY_MB):
        super().__init__()
        self._fn = _StageStreamFn(staging, item_fn, progress, memory_mb)
        self._side = list(side_inputs)

    def expand(self, blobs):
        out = blobs | "StageStream" >> beam.ParDo(self._fn, *_side_args(self._side)).with_outputs(
            FAILURES, main="summaries")
        return out.summaries, out[FAILURES]


# --- plan and merge ------------------------------------------------------------------------------------

class BucketTask(NamedTuple):
    """One bucket to merge: its slices of the runs, its entries and its place in its group (split)."""
    bucket: int
    slices: Tuple[Tuple[str, int, int], ...]   # (run path, offset, length)
    count: int
    offset: int          # entries of the same group in lower buckets: the global rank of the first entry
    total: int           # entries of the group


def _slices_and_counts(summaries: Iterable[dict]) -> Tuple[Dict[int, List[Tuple[str, int, int]]], Dict[int, int]]:
    """Summaries -> ({bucket: [(run, offset, length)] in summary order}, {bucket: entries})."""
    slices: Dict[int, List[Tuple[str, int, int]]] = {}
    counts: Dict[int, int] = {}
    for s in summaries:
        for bucket, offset, length, n in s["buckets"]:
            slices.setdefault(bucket, []).append((s["run"], offset, length))
            counts[bucket] = counts.get(bucket, 0) + n
    return slices, counts


def plan_buckets(summaries: Iterable[dict], group_size: int = 0) -> List[BucketTask]:
    """Summaries -> a task per non-empty bucket. Groups are `bucket // group_size` (0: one group)."""
    slices, counts = _slices_and_counts(summaries)
    group = (lambda b: b // group_size) if group_size else (lambda b: 0)
    totals: Dict[int, int] = {}
    for b, n in counts.items():
        totals[group(b)] = totals.get(group(b), 0) + n
    tasks, seen = [], {}
    for b in sorted(counts):
        g = group(b)
        tasks.append(BucketTask(b, tuple(sorted(slices[b])), counts[b], seen.get(g, 0), totals[g]))
        seen[g] = seen.get(g, 0) + counts[b]
    return tasks


def read_bucket(task: BucketTask) -> List[Tuple[bytes, bytes]]:
    """A bucket's (key, payload) entries from every run, merged in key order."""
    return list(heapq.merge(*(read_slice(*s) for s in task.slices), key=lambda e: e[0]))


class _MergeFn(beam.DoFn):
    def __init__(self, staging: str, merge_fn: Callable[..., Iterator[Any]], resumable: bool):
        self._staging, self._merge_fn, self._resumable = staging, merge_fn, resumable
        self._merged = beam.metrics.Metrics.counter("imagebeam", "buckets_merged")

    def process(self, task: BucketTask, *side):
        marker = fileutil.join(self._staging, MERGED, f"bucket-{task.bucket:06d}.json")
        recorded = read_marker(marker) if self._resumable else None
        if recorded is not None:
            yield from recorded["outputs"]
            return
        finished = getattr(self._merge_fn, "finished", None)
        done = finished(task, *side) if finished else None
        if done is not None:  # everything this bucket makes was made by an earlier run: nothing to read
            yield from done
            return
        outputs = []
        for out in self._merge_fn(task, read_bucket(task), *side):
            if self._resumable:
                outputs.append(out)
            yield out
        self._merged.inc()
        if self._resumable:
            fileutil.write_atomically(marker, json.dumps({"outputs": outputs}).encode("utf-8"))


class MergeBuckets(beam.PTransform):
    """Summaries -> what `merge_fn(task, entries, *side)` yields for every bucket.

    `resumable`: the outputs are JSON values (file descriptions) recorded in a per-bucket marker, and a
    bucket with a marker is not merged again. A `merge_fn` with a `finished(task, *side)` method that
    returns a list (what an earlier run recorded for the whole bucket) instead of None is not given the
    bucket's entries: they are not read. `tags`: extra tagged outputs of `merge_fn` (returned as
    the ParDo's DoOutputsTuple then).
    """

    def __init__(self, staging: str, merge_fn: Callable[..., Iterator[Any]], group_size: int = 0,
                 resumable: bool = True, side_inputs: Sequence[Any] = (), tags: Sequence[str] = ()):
        super().__init__()
        self._fn = _MergeFn(staging, merge_fn, resumable)
        self._group_size, self._side, self._tags = group_size, list(side_inputs), tuple(tags)

    def expand(self, summaries):
        group_size = self._group_size
        tasks = (summaries
                 | "AllSummaries" >> beam.combiners.ToList()
                 | "PlanBuckets" >> beam.FlatMap(lambda s: plan_buckets(s, group_size))
                 | "SpreadBuckets" >> beam.Reshuffle())
        merge = beam.ParDo(self._fn, *_side_args(self._side))
        if self._tags:
            return tasks | "MergeBucket" >> merge.with_outputs(*self._tags, main="main")
        return tasks | "MergeBucket" >> merge


class UnitCounts(beam.PTransform):
    """Summaries -> singleton {"read", "units", "units_reused"}: `read` for the counts, the rest for the
    "run" section of metadata.json (how much of the work an earlier, killed run had already done)."""

    def expand(self, summaries):
        return summaries | "UnitCounts" >> beam.CombineGlobally(_DictSum())


class _DictSum(beam.CombineFn):
    KEYS = ("read", "units", "units_reused")

    def create_accumulator(self):
        return dict.fromkeys(self.KEYS, 0)

    def add_input(self, acc, s):
        acc = dict(acc)
        acc["read"] += s["read"]
        acc["units"] += 1 if s.get("unit") else 0
        acc["units_reused"] += 1 if s.get("reused") else 0
        return acc

    def merge_accumulators(self, accs):
        out = self.create_accumulator()
        for a in accs:
            for k in self.KEYS:
                out[k] += a[k]
        return out

    def extract_output(self, acc):
        return acc


# --- merging ranges of buckets (many small buckets, one task) -----------------------------------------

def plan_bucket_ranges(summaries: Iterable[dict], max_entries: int) -> List[BucketTask]:
    """Summaries -> tasks of consecutive buckets holding about `max_entries` entries (at least one bucket).

    A task reads one contiguous slice per run (a run holds its buckets in order, so a range of buckets
    is one byte range). The entries of a task must sort by key alone as they do by (bucket, key): true
    when the bucket is a prefix of the key (hash-prefix buckets). `bucket` is the range's first bucket,
    so tasks (and their markers) are the same for the same summaries.
    """
    per_bucket, counts = _slices_and_counts(summaries)
    total = sum(counts.values())
    tasks: List[BucketTask] = []
    group: List[int] = []

    def close() -> None:
        spans: Dict[str, List[int]] = {}
        for b in group:
            for run, offset, length in per_bucket[b]:
                span = spans.setdefault(run, [offset, offset])
                span[0], span[1] = min(span[0], offset), max(span[1], offset + length)
        slices = tuple(sorted((run, lo, hi - lo) for run, (lo, hi) in spans.items()))
        tasks.append(BucketTask(group[0], slices, sum(counts[b] for b in group), 0, total))

    held = 0
    for b in sorted(counts):
        if group and held + counts[b] > max_entries:
            close()
            group, held = [], 0
        group.append(b)
        held += counts[b]
    if group:
        close()
    return tasks


class MergeBucketRanges(MergeBuckets):
    """MergeBuckets over ranges of consecutive buckets (`plan_bucket_ranges`): few tasks for a small
    dataset, about `max_entries` entries per task for a large one. The summaries are gathered under one
    key (no output for none: nothing to merge), a third of ToList's transforms and stages."""

    def __init__(self, staging: str, merge_fn: Callable[..., Iterator[Any]], max_entries: int,
                 resumable: bool = True, side_inputs: Sequence[Any] = ()):
        super().__init__(staging, merge_fn, resumable=resumable, side_inputs=side_inputs)
        self._max_entries = max_entries

    def expand(self, summaries):
        max_entries = self._max_entries
        return (summaries
                | "OneKey" >> beam.Map(lambda s: (None, s))
                | "AllSummaries" >> beam.GroupByKey()
                | "PlanRanges" >> beam.FlatMapTuple(lambda _, s: plan_bucket_ranges(s, max_entries))
                | "SpreadRanges" >> beam.Reshuffle()
                | "MergeRange" >> beam.ParDo(self._fn, *_side_args(self._side)))
