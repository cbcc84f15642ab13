"""failures.jsonl and metadata.json: every input is accounted for, and the counts must add up.

`read` counts what the sources produced (images and unreadable pieces), `written` the rows in the
output files, `failed` the lines of failures.jsonl. metadata.json is written last, after every other
file, so its presence marks a finished job.
"""
from __future__ import annotations

import json
import re
import platform
from typing import Callable, Dict, List, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from imagebeam.transforms.bookkeeping import staging
from imagebeam.transforms.bookkeeping.fileutil import (TEMP_MARK, delete_existing, join, matching,  # noqa: F401
                                                    read_json, write_atomically, write_with)
from imagebeam.transforms.inputs.sources import Failure


def failure_key(f: Failure) -> tuple:
    """failures.jsonl's order: (source, member, reason)."""
    return f.source, f.member or "", f.reason


def failure_line(f: Failure) -> bytes:
    return (json.dumps(f.to_json(), sort_keys=True) + "\n").encode("utf-8")


def failure_lines(failures: List[Failure]) -> bytes:
    """One JSON object per line, in a stable order (source, member, reason)."""
    return b"".join(failure_line(f) for f in sorted(failures, key=failure_key))


def failure_entry(f: Failure) -> tuple:
    """A failure as a staged entry: its line, under a key that sorts as `failure_key` does (equal keys
    have equal lines, so the file's bytes do not depend on which worker saw what)."""
    return 0, staging.order_key(*failure_key(f)), failure_line(f)


# Failures a worker holds before it writes them out as a sorted run (about 250 bytes each).
FAILURE_RUN_MB = 16


class WriteFailures(beam.PTransform):
    """Failures (one PCollection or several) -> DIR/failures.jsonl (written even when empty); emits the
    number of failures.

    An external sort: each worker writes the failures it produces as sorted runs (fused with the step
    that failed them: a failure set is never gathered, or flattened, in the runner's memory), and one
    step merges the runs into the file. 14 M dead links of a URL list take disk, not memory.
    """

    def __init__(self, output: str):
        super().__init__()
        self._output = output

    def expand(self, failures):
        sets = list(failures) if isinstance(failures, (tuple, list)) else [failures]
        output, prefix = self._output, join(self._output, f".failures.jsonl{TEMP_MARK}run-")
        runs = [fs | f"SortFailures{i}" >> staging.SortToRuns(prefix, failure_entry, FAILURE_RUN_MB)
                for i, fs in enumerate(sets)]
        return (tuple(runs) | "AllFailureRuns" >> beam.Flatten()
                | "GatherRuns" >> beam.combiners.ToList()
                | "WriteJsonl" >> beam.Map(merge_failure_runs, output))


def merge_failure_runs(runs: List[dict], output: str) -> int:
    """Sorted runs -> output/failures.jsonl (streamed), then the runs (and any a killed run left) go."""
    paths = sorted(r["run"] for r in runs)

    def write(f) -> None:
        block: List[bytes] = []
        held = 0
        for _, line in staging.merge_runs(paths):
            block.append(line)
            held += len(line)
            if held >= 1 << 20:
                f.write(b"".join(block))
                block, held = [], 0
        f.write(b"".join(block))

    write_with(join(output, "failures.jsonl"), write)
    delete_existing(set(paths) | set(matching([join(output, f".failures.jsonl{TEMP_MARK}run-*")])))
    return sum(r["count"] for r in runs)


class CountAll(beam.PTransform):
    """(pcoll, pcoll, ...) -> singleton: the number of elements in all of them (0 when all are empty)."""

    def expand(self, pcolls):
        ones = [pc | f"One{i}" >> beam.Map(lambda _: 1) for i, pc in enumerate(pcolls)]
        return tuple(ones) | "All" >> beam.Flatten() | "Sum" >> beam.CombineGlobally(sum)


def versions() -> Dict[str, str]:
    """Versions of what shaped the output, read from package metadata (importing TF costs seconds)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("imagebeam", "apache-beam", "numpy", "pillow", "tensorflow", "tensorflow-transform"):
        try:
            out[dist.replace("-", "_")] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover
            pass
    return out


class CountsDontAddUp(RuntimeError):
    pass


class WriteMetadata(beam.PTransform):
    """Writes DIR/metadata.json once every file is written (see `write_metadata`).

    `counts`: name -> singleton PCollection of an int. `files`: PCollection of {"file", "rows"} dicts.
    `extra`: static facts (size, algorithm, seed, label order, ...). `extra_side`: name -> singleton
    PCollection of a JSON-able value computed in the pipeline.
    """

    def __init__(self, output: str, counts: Dict[str, beam.PCollection], files: beam.PCollection,
                 extra: dict, extra_side: Dict[str, beam.PCollection] | None = None, cleanup: tuple = ()):
        super().__init__()
        self._output, self._counts, self._files = output, counts, files
        self._extra, self._extra_side = extra, dict(extra_side or {})
        self._cleanup = tuple(cleanup)

    def expand(self, pbegin):
        count_names = sorted(self._counts)
        side_names = sorted(self._extra_side)
        sides = {f"count_{k}": beam.pvalue.AsSingleton(self._counts[k]) for k in count_names}
        sides.update({f"side_{k}": beam.pvalue.AsSingleton(self._extra_side[k]) for k in side_names})
        sides["files"] = beam.pvalue.AsList(self._files)
        return (pbegin
                | "Once" >> beam.Create([None])
                | "WriteMetadataJson" >> beam.Map(_metadata_writer(self._output, self._extra, self._cleanup),
                                                 **sides))


def _metadata_writer(output: str, extra: dict, cleanup: tuple = ()) -> Callable:
    def write(_, files, **sides) -> dict:
        counts = {k[len("count_"):]: int(v) for k, v in sides.items() if k.startswith("count_")}
        meta = dict(extra)
        meta.update({k[len("side_"):]: v for k, v in sides.items() if k.startswith("side_")})
        return write_metadata(output, meta, counts, files, cleanup)
    return write


def write_metadata(output: str, meta: dict, counts: Dict[str, int], files: List[dict],
                   cleanup: tuple = ()) -> dict:
    """Check the counts, remove temporaries, then write `output/metadata.json` (the job's last file)."""
    meta = dict(meta)
    files = sorted(files, key=lambda f: natural_key(f["file"]))
    counts = dict(counts, written=sum(f["rows"] for f in files))
    meta.update(counts=counts, files=files, versions=versions())
    if counts.get("read") != counts["written"] + counts.get("failed", 0):
        raise CountsDontAddUp(f"counts do not add up: {counts}")
    if cleanup:  # what this run kept on disk, removed now (a resumed run's "run" says what it reused)
        meta["run"] = dict(meta.get("run") or {}, staging_bytes=bytes_under(cleanup))
    _remove_temporaries(cleanup)
    write_atomically(join(output, "metadata.json"),
                     (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return meta


def bytes_under(paths: tuple) -> int:
    """Bytes of the files below `paths` (the job's staging and scratch folders, before removal)."""
    found = FileSystems.match([join(p, "**") for p in paths])
    return sum(m.size_in_bytes for r in found for m in r.metadata_list)


def natural_key(name: str):
    """Sort key putting train_data_batch_2 before train_data_batch_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _remove_temporaries(paths: tuple) -> None:
    delete_existing(paths)


def failure_reasons(output: str, top: int = 5) -> List[tuple]:
    """The commonest failure reasons in output/failures.jsonl (the text before the first ':')."""
    path = join(output, "failures.jsonl")
    if not FileSystems.exists(path):
        return []
    counts: Dict[str, int] = {}
    with FileSystems.open(path) as f:
        for line in f:
            reason = json.loads(line).get("reason", "")
            key = reason.split(":", 1)[0][:60]
            counts[key] = counts.get(key, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]


def summary_table(title: str, meta: dict, output: str, extra: Dict[str, str] | None = None) -> str:
    """The table a job prints when it ends: counts, files, top failure reasons, where metadata.json is."""
    c = meta["counts"]
    rows = [("read", str(c.get("read", ""))), ("written", str(c.get("written", ""))),
            ("failed", f"{c.get('failed', 0)}  (failures.jsonl)")]
    for reason, n in failure_reasons(output):
        rows.append(("  " + reason, str(n)))
    files = meta.get("files", [])
    shown = ", ".join(f"{f['file']} ({f['rows']})" for f in files[:6]) + (f", … {len(files)} files" if len(files) > 6 else "")
    rows.append(("files", shown or "none"))
    run = meta.get("run") or {}
    if "staging_bytes" in run:
        resumed = f"; resumed: {run['units_reused']} of {run['units']} work units reused" if run.get("units_reused") else ""
        rows.append(("staging", f"{run['staging_bytes'] / 1e6:.1f} MB on disk, removed{resumed}"))
    rows += list((extra or {}).items())
    rows.append(("metadata", join(output, "metadata.json")))
    width = max(len(k) for k, _ in rows)
    return "\n".join([title] + [f"  {k:<{width}}  {v}" for k, v in rows])


# --- is the dataset usable? ----------------------------------------------------------------------------

DEFAULT_MAX_FAILURE_RATE = 0.01  # ImageNet-style image jobs expect almost no failures (1 in 1,000 is fine)


def rows_per_split(meta: dict) -> Dict[str, int]:
    """Rows written per split, from metadata.json's file list: a file's "split", or its "splits" counts
    (a file holding several, like CIFAR's processed pickle); files with neither count as "all"."""
    out: Dict[str, int] = {}
    for f in meta.get("files", []):
        for split, n in (f.get("splits") or {f.get("split") or "all": f.get("rows", 0)}).items():
            out[split] = out.get(split, 0) + int(n)
    return out


def dataset_problems(meta: dict, max_failure_rate: Optional[float], required: Dict[str, int]) -> List[str]:
    """Why the output is not a usable dataset (empty when it is): a split that was asked for and holds
    nothing, or more failed inputs than `--max-failure-rate` allows (None: no rate rule)."""
    problems = [f"the {split} split is empty (nothing was written for it)" for split, n in required.items() if n == 0]
    counts = meta.get("counts", {})
    read, failed = int(counts.get("read", 0)), int(counts.get("failed", 0))
    if max_failure_rate is not None and read and failed / read > max_failure_rate:
        problems.append(f"{failed} of {read} inputs failed ({failed / read:.1%}), more than --max-failure-rate "
                        f"{max_failure_rate:g} allows (failures.jsonl says why)")
    return problems


def conclude(output: str, meta: dict, table: str, problems: List[str]) -> int:
    """Print the job's summary table; record and name the failed rule when the dataset is not usable.

    The verdict goes into metadata.json (`verdict`), and the table's last line says which rule failed.
    Returns the exit status: 0 usable, 1 not.
    """
    verdict = {"usable": not problems, "problems": problems}
    path = join(output, "metadata.json")
    if FileSystems.exists(path):
        recorded = dict(read_json(path), verdict=verdict)
        write_atomically(path, (json.dumps(recorded, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    print(table)
    if problems:
        print(f"  NOT USABLE: {'; '.join(problems)}")
        return 1
    return 0
