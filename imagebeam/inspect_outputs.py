"""`imagebeam inspect OUTPUT [--json] [--verbose]`: what an output folder holds, and whether it is well-formed.

Reports the kind (detected as `imagebeam.outputs.describe` does), one row per data file (rows, bytes),
the number of rows per split, the label histogram (top 10, the rarest and the commonest class), the image
sizes, the metadata counts — and runs format checks. Exit 0 when every check passes, 1 when one fails
(each failed check is named, with what was found). `--json` prints the same as one JSON object.

Checks (a check's name is `what` or `what:file`):

- every kind: `metadata` (metadata.json readable; a folder without one is reported with a warning and
  its metadata checks are skipped), `counts` (read = written + failed), `written` (metadata's written =
  rows found in the files), `files` (metadata's file list = the files present), `rows:F` (rows of F =
  metadata's), `failures` (failures.jsonl: one JSON object per line with source/member/reason, as many
  lines as metadata's failed), `temporaries` (no `.inprogress-` file or `.staging` folder left);
- batches: `read:F` (the pickle / npz loads, safely), `keys:F` (data, labels; mean in train files and
  not in val_data), `data:F` (uint8 (n, 3*S*S), S = metadata's size and the same in every file),
  `labels:F` (one per row, integers among classes.txt's labels, else 1..1000), `mean:F` (float64
  (3*S*S,), finite, in [0, 255], equal to the float64 mean of all train rows, 1e-6 relative), `mean`
  (identical in every train file), `batch sizes` (batches 1..B-1 hold N // B rows, the last the rest;
  numbered 1..B), `format` (pickle or npz as metadata says);
- lab records: `records:F` (every record's length and data CRC-32C), `features:F` (exactly image_name,
  image_l, image_ab and, when metadata's embedding_size > 0, image_embedding; lengths 50,176 / 100,352 /
  embedding size; float lists for the reference format, bytes for compact, as metadata says),
  `values:F` (finite, L' and ab' within [-1, 1]), `compression:F` (gzip or not, as metadata says),
  `names` (image names unique across files);
- CIFAR pickle: `read:F`, `keys:F` (exactly the seed's five), `shapes:F` (uint8 (n, 32, 32, 3), int64
  (n,) labels), `labels:F` (0 <= label < number of names; 100 or 10 names);
- CIFAR tfrecord: `records:F`, `features:F` (image a 32x32 PNG, label in range, id, coarse_label for
  CIFAR-100), `shards:SPLIT` (K-of-N names complete);
- download: `manifest` (one JSON record per line, files of ok records present, counts as metadata says);
- images: `rows:FOLDER` per metadata entry.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from imagebeam import outputs as outputs_lib
from imagebeam.transforms.imaging import colour
from imagebeam.transforms.formats.example_decode import iter_file_records, parse_example
from imagebeam.transforms.bookkeeping.fileutil import TEMP_MARK
from imagebeam.runners.checks import OneLineParser

__all__ = ["inspect_main", "inspect_output"]

L_VALUES = colour.LAB_SIZE * colour.LAB_SIZE      # 50,176
AB_VALUES = 2 * L_VALUES                          # 100,352
CIFAR_KEYS = {"train_dataset", "train_labels", "test_dataset", "test_labels", "label_names"}
MAX_SIZED_IMAGES = 2000  # image folders: sizes read from the first files only
_VALUE_SLACK = 1e-3


def _label_key(label: Any) -> tuple:
    """Integer labels in numeric order, before names in text order."""
    return (0, label, "") if isinstance(label, int) else (1, 0, str(label))


class Inspection:
    """Collects file rows, facts and check results."""

    def __init__(self, out: Optional[outputs_lib.Output], path: str):
        self.out, self.path = out, path
        self.checks: List[Dict[str, Any]] = []
        self.warnings: List[str] = []
        self.files: List[Dict[str, Any]] = []
        self.labels: collections.Counter = collections.Counter()
        self.sizes: collections.Counter = collections.Counter()
        self.splits: collections.Counter = collections.Counter()
        self.facts: Dict[str, Any] = {}

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        return bool(ok)

    def fail(self, name: str, detail: str) -> bool:
        return self.check(name, False, detail)

    def add_file(self, name: str, rows: Optional[int], **extra) -> None:
        path = os.path.join(self.path, name)
        row = {"file": name, "rows": rows, "bytes": os.path.getsize(path) if os.path.isfile(path) else None}
        row.update(extra)
        self.files.append(row)

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    def label_summary(self, names: Dict[Any, str]) -> Optional[Dict[str, Any]]:
        if not self.labels:
            return None

        def entry(label, count):
            return {"label": label, "name": names.get(label), "count": count}

        ordered = sorted(self.labels.items(), key=lambda kv: (-kv[1], _label_key(kv[0])))
        rarest = min(self.labels.items(), key=lambda kv: (kv[1], _label_key(kv[0])))
        return {"classes": len(self.labels), "top": [entry(k, v) for k, v in ordered[:10]],
                "min": entry(*rarest), "max": entry(*ordered[0]),
                "histogram": {str(k): v for k, v in sorted(self.labels.items(), key=lambda kv: _label_key(kv[0]))}}

    def to_dict(self) -> Dict[str, Any]:
        out = self.out
        names: Dict[Any, str] = dict(out.classes) if out else {}
        names.update(self.facts.pop("_label_names", {}))
        failed = [c for c in self.checks if not c["ok"]]
        return {
            "output": self.path, "kind": out.kind if out else None, "detected_by": out.detected_by if out else None,
            "job": out.job if out else None, "files": self.files,
            "rows": sum(f["rows"] or 0 for f in self.files), "rows_by_split": dict(sorted(self.splits.items())),
            "labels": self.label_summary(names), "image_sizes": dict(sorted(self.sizes.items())),
            "metadata_counts": (out.meta or {}).get("counts") if out else None, "facts": self.facts,
            "checks": self.checks, "failed": [c["check"] for c in failed], "warnings": self.warnings,
            "ok": not failed,
        }


# --- common checks ---------------------------------------------------------------------------------------------

def _meta_file_rows(meta: Optional[dict]) -> Optional[Dict[str, int]]:
    if not meta or not isinstance(meta.get("files"), list):
        return None
    return {str(f.get("file")): f.get("rows") for f in meta["files"] if isinstance(f, dict)}


def _check_common(ins: Inspection, found_rows: Dict[str, int], compare_files: bool = True) -> None:
    """metadata, counts, files/rows, failures.jsonl, temporaries. `found_rows`: file -> rows on disk."""
    out = ins.out
    meta = out.meta
    if meta is None:
        if out.meta_error == "no metadata.json":
            ins.warnings.append("no metadata.json: the job did not finish, or this folder was not written by "
                                "imagebeam; metadata checks skipped")
        else:
            ins.fail("metadata", out.meta_error or "unreadable metadata.json")
    else:
        ins.check("metadata", True, f"job {meta.get('job')!r}")
        meta_rows = _meta_file_rows(meta)
        if compare_files and meta_rows is not None:
            missing = sorted(set(meta_rows) - set(found_rows))
            extra = sorted(set(found_rows) - set(meta_rows))
            ins.check("files", not missing and not extra,
                      "" if not missing and not extra else
                      f"listed in metadata.json but missing: {missing}; present but not listed: {extra}")
            for name, rows in found_rows.items():
                if name in meta_rows and rows is not None:
                    ins.check(f"rows:{name}", meta_rows[name] == rows,
                              f"{rows} rows" if meta_rows[name] == rows else
                              f"{rows} rows in the file, metadata.json says {meta_rows[name]}")
        counts = meta.get("counts") if isinstance(meta.get("counts"), dict) else None
        if out.kind != "download":
            if counts is None:
                ins.fail("counts", "metadata.json has no counts")
            else:
                read, written, failed = counts.get("read"), counts.get("written"), counts.get("failed", 0)
                ins.check("counts", isinstance(read, int) and isinstance(written, int) and read == written + failed,
                          f"read {read} = written {written} + failed {failed}" if read == written + failed
                          else f"read {read} != written {written} + failed {failed}")
                on_disk = sum(r for r in found_rows.values() if r is not None)
                if compare_files and all(r is not None for r in found_rows.values()):
                    ins.check("written", written == on_disk,
                              f"{on_disk} rows in the files" if written == on_disk else
                              f"metadata.json says written {written}, the files hold {on_disk} rows")
                _check_failures(ins, counts.get("failed", 0))
    _check_temporaries(ins)


def _check_failures(ins: Inspection, expected: Any) -> None:
    path = ins.out.join("failures.jsonl")
    if not os.path.exists(path):
        ins.fail("failures", "no failures.jsonl (every job writes one, empty when nothing failed)")
        return
    bad, lines = [], 0
    reasons: collections.Counter = collections.Counter()
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            lines += 1
            try:
                record = json.loads(line)
            except ValueError:
                bad.append(number)
                continue
            if not isinstance(record, dict) or not {"source", "reason"} <= set(record):
                bad.append(number)
            else:
                reasons[str(record["reason"]).split(":")[0][:60]] += 1
    ins.facts["failures"] = {"lines": lines, "reasons": dict(reasons.most_common(10))}
    problems = []
    if bad:
        problems.append(f"lines {bad[:5]} are not {{source, member, reason}} JSON objects")
    if lines != expected:
        problems.append(f"{lines} lines, metadata.json says failed {expected}")
    ins.check("failures", not problems, "; ".join(problems) or f"{lines} lines")


def _check_temporaries(ins: Inspection) -> None:
    left = []
    for dirpath, dirnames, names in os.walk(ins.path):
        for d in dirnames:
            if d == ".staging" or TEMP_MARK in d:
                left.append(os.path.relpath(os.path.join(dirpath, d), ins.path))
        left += [os.path.relpath(os.path.join(dirpath, n), ins.path) for n in names if TEMP_MARK in n]
        dirnames[:] = [d for d in dirnames if d != ".staging"]
    ins.check("temporaries", not left, f"left behind: {sorted(left)[:5]}" if left else "")


# --- batches ---------------------------------------------------------------------------------------------------

def _inspect_batches(ins: Inspection) -> None:
    out, meta = ins.out, ins.out.meta or {}
    meta_size = meta.get("size") if isinstance(meta.get("size"), int) else None
    valid_labels = set(out.classes) or set(range(1, 1001))
    found_rows: Dict[str, Optional[int]] = {}
    sizes_seen = set()
    train_sum, train_rows, rows_complete = None, 0, True
    train_means: List[tuple] = []
    train_files = [n for n in out.files if not n.startswith("val_data")]
    for name in out.files:
        train = name in train_files
        split = "train" if train else "val"
        try:
            batch = outputs_lib.read_batch(out.join(name))
        except Exception as exc:  # noqa: BLE001 - any reader error is the finding
            ins.fail(f"read:{name}", f"cannot be read: {type(exc).__name__}: {exc}")
            found_rows[name] = None
            ins.add_file(name, None, split=split)
            rows_complete = rows_complete and not train
            continue
        ins.check(f"read:{name}", True, "npz" if name.endswith(".npz") else "pickle")
        keys = set(batch)
        want = {"data", "labels", "mean"} if train else {"data", "labels"}
        ins.check(f"keys:{name}", keys == want,
                  "" if keys == want else f"keys {sorted(keys)}, expected {sorted(want)}")
        data = batch.get("data")
        rows = None
        data_ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
        if data_ok:
            rows, cols = data.shape
            s = math.isqrt(cols // 3)
            data_ok = 3 * s * s == cols and (meta_size is None or s == meta_size)
            sizes_seen.add(s)
            ins.check(f"data:{name}", data_ok, f"uint8 ({rows}, {cols})" if data_ok else
                      f"{cols} columns: not 3*S*S" + (f" for S = {meta_size} (metadata size)" if meta_size else ""))
            if data_ok:
                ins.sizes[f"{s}x{s}"] += rows
        else:
            desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
            ins.fail(f"data:{name}", f"'data' must be a uint8 (n, 3*S*S) array, got {desc}")
        found_rows[name] = rows
        ins.add_file(name, rows, split=split)
        if rows is not None:
            ins.splits[split] += rows
        labels = batch.get("labels")
        try:
            labels_arr = np.asarray(labels).reshape(-1)
            int_labels = labels_arr.size == 0 or np.issubdtype(labels_arr.dtype, np.integer)
        except Exception:  # noqa: BLE001
            labels_arr, int_labels = np.zeros(0), False
        problems = []
        if labels is None:
            problems.append("no labels")
        elif not int_labels:
            problems.append(f"labels are {labels_arr.dtype}, not integers")
        else:
            if rows is not None and labels_arr.size != rows:
                problems.append(f"{labels_arr.size} labels for {rows} rows")
            outside = sorted({int(v) for v in np.unique(labels_arr)} - valid_labels)
            if outside:
                problems.append(f"labels {outside[:5]} not among the {len(valid_labels)} classes" +
                                (" of classes.txt" if out.classes else " (1..1000)"))
            ins.labels.update(int(v) for v in labels_arr)
        ins.check(f"labels:{name}", not problems, "; ".join(problems))
        if train:
            mean = batch.get("mean")
            if mean is None:
                ins.fail(f"mean:{name}", "train batch without 'mean'")
            elif (isinstance(mean, np.ndarray) and mean.dtype == np.float64 and data_ok
                  and mean.shape == (data.shape[1],) and bool(np.all(np.isfinite(mean)))
                  and float(mean.min(initial=0)) >= 0 and float(mean.max(initial=0)) <= 255):
                train_means.append((name, mean))  # compared with the rows' mean below
            else:
                desc = f"{mean.dtype} {mean.shape}" if isinstance(mean, np.ndarray) else type(mean).__name__
                ins.fail(f"mean:{name}", f"'mean' must be finite float64 "
                                         f"({data.shape[1] if data_ok else '3*S*S'},) in [0, 255], got {desc}")
            if data_ok:
                part = data.astype(np.float64).sum(axis=0)
                if train_sum is None or train_sum.shape == part.shape:
                    train_sum = part if train_sum is None else train_sum + part
                else:
                    rows_complete = False
                train_rows += rows
            else:
                rows_complete = False
    if len(sizes_seen) > 1:
        ins.fail("data", f"files hold different image sizes: {sorted(sizes_seen)}")
    if train_files:
        truth = train_sum / train_rows if rows_complete and train_sum is not None and train_rows else None
        for name, mean in train_means:
            if truth is None or truth.shape != mean.shape:
                ins.check(f"mean:{name}", True, "float64 (3*S*S,); not compared: not every train row is readable")
                continue
            worst = float(np.max(np.abs(mean - truth)))
            close = bool(np.allclose(mean, truth, rtol=1e-6, atol=1e-9))
            ins.check(f"mean:{name}", close,
                      f"float64 (3*S*S,), the float64 mean of all {train_rows} train rows (max diff {worst:.3g})"
                      if close else
                      f"differs from the float64 mean of all {train_rows} train rows by up to {worst:.6g}")
        groups = collections.defaultdict(list)
        for name, mean in train_means:
            groups[mean.tobytes()].append(name)
        if groups:
            majority = max(groups.values(), key=len)
            odd = sorted((n for g in groups.values() if g is not majority for n in g), key=outputs_lib.natural_key)
            ins.check("mean", not odd, "the same in every train file" if not odd else
                      f"the mean differs between train files: {odd[:5]} differ from {majority[:3]}")
        numbers = sorted(int(outputs_lib.BATCH_RE.match(n).group(2)) for n in train_files)
        rows_by_number = {int(outputs_lib.BATCH_RE.match(n).group(2)): found_rows[n] for n in train_files}
        problems = []
        if numbers != list(range(1, len(numbers) + 1)):
            problems.append(f"batch numbers {numbers}, expected 1..{len(numbers)}")
        expected_batches = meta.get("batches") if isinstance(meta.get("batches"), int) else None
        if expected_batches is not None and expected_batches != len(numbers):
            problems.append(f"{len(numbers)} train batch files, metadata.json says {expected_batches}")
        if not problems and all(r is not None for r in rows_by_number.values()):
            total, b = sum(rows_by_number.values()), len(numbers)
            want = [total // b] * (b - 1) + [total - (total // b) * (b - 1)]
            got = [rows_by_number[k] for k in range(1, b + 1)]
            if got != want:
                problems.append(f"batch sizes {got}, expected {want} (N // B, the last the rest)")
        ins.check("batch sizes", not problems, "; ".join(problems))
    fmt = meta.get("format")
    if fmt in ("pickle", "npz") and (ins.out.job == "downsample"):
        wrong = [n for n in out.files if n.endswith(".npz") != (fmt == "npz")]
        ins.check("format", not wrong, f"{fmt}" if not wrong else f"metadata.json says {fmt}, but {wrong[:3]}")
    ins.facts["image_size"] = sorted(sizes_seen)[0] if len(sizes_seen) == 1 else sorted(sizes_seen)
    _check_common(ins, found_rows)


# --- records ---------------------------------------------------------------------------------------------------

def _scan_records(ins: Inspection, name: str, per_record) -> Optional[int]:
    """Reads every record of `name` (CRCs checked) and calls per_record(index, features) -> problem or None.
    Records `records:name` and `features:name`; returns the record count (None if the file is broken)."""
    first_problem, n_bad, count = None, 0, 0
    try:
        with open(ins.out.join(name), "rb") as f:
            for record in iter_file_records(f, check_crc=True):
                count += 1
                try:
                    features = parse_example(record.data)
                except ValueError as exc:
                    problem = f"not a tf.train.Example: {exc}"
                else:
                    try:
                        problem = per_record(record.index, features)
                    except ValueError as exc:
                        problem = str(exc)
                if problem:
                    n_bad += 1
                    first_problem = first_problem or f"record {record.index}: {problem}"
    except (ValueError, OSError, EOFError) as exc:
        ins.fail(f"records:{name}", f"{exc} (after {count} good records)")
        return None
    ins.check(f"records:{name}", True, f"{count} records, CRCs valid")
    ins.check(f"features:{name}", n_bad == 0,
              "" if not n_bad else f"{n_bad} bad record(s); first: {first_problem}")
    return count


def _inspect_lab_records(ins: Inspection) -> None:
    out, meta = ins.out, ins.out.meta or {}
    embedding_size = meta.get("embedding_size") if "embedding_size" in meta else None
    record_format = meta.get("record_format")
    compression = meta.get("compression")
    names: collections.Counter = collections.Counter()
    seen = {"embedding": None, "format": None}
    found_rows: Dict[str, Optional[int]] = {}

    for name in out.files:
        split = "val" if name.startswith("val_") else "train"
        value_problems: List[str] = []

        def per_record(index, features):
            keys = set(features)
            image_name, l_norm, ab_norm, fmt = outputs_lib.lab_arrays(features)
            names[image_name] += 1
            if "/" in image_name:
                ins.labels[image_name.split("/", 1)[0]] += 1
            emb = features.get("image_embedding")
            e_size = emb.size if emb is not None else 0
            want_keys = {"image_name", "image_l", "image_ab"}
            if e_size or embedding_size:
                want_keys.add("image_embedding")
            if keys != want_keys:
                return f"features {sorted(keys)}, expected {sorted(want_keys)}"
            if emb is not None and emb.kind != "float":
                return f"image_embedding is a {emb.kind} list"
            if embedding_size is not None and e_size != (embedding_size or 0):
                return f"image_embedding has {e_size} values, metadata.json says {embedding_size}"
            if seen["embedding"] is None:
                seen["embedding"] = e_size
            elif seen["embedding"] != e_size:
                return f"image_embedding has {e_size} values, earlier records {seen['embedding']}"
            if record_format in ("reference", "compact") and fmt != record_format:
                return f"a {fmt} record, metadata.json says {record_format}"
            seen["format"] = seen["format"] or fmt
            if fmt != seen["format"]:
                return f"a {fmt} record among {seen['format']} ones"
            if fmt == "compact":
                if len(features["image_l"].value[0]) != L_VALUES or len(features["image_ab"].value[0]) != AB_VALUES:
                    return "compact image_l / image_ab of the wrong length"
            ins.sizes[f"{colour.LAB_SIZE}x{colour.LAB_SIZE}"] += 1
            bad = []
            for what, arr in (("image_l", l_norm), ("image_ab", ab_norm)):
                if not np.all(np.isfinite(arr)) or float(np.abs(arr).max()) > 1 + _VALUE_SLACK:
                    bad.append(f"{what} outside [-1, 1] or not finite")
            if emb is not None and not np.all(np.isfinite(emb.value)):
                bad.append("image_embedding not finite")
            if bad and len(value_problems) < 3:
                value_problems.append(f"record {index}: {', '.join(bad)}")
            return None

        count = _scan_records(ins, name, per_record)
        if count is not None:
            ins.check(f"values:{name}", not value_problems, "; ".join(value_problems))
        found_rows[name] = count
        ins.add_file(name, count, split=split)
        ins.splits[split] += count or 0
        if compression in ("none", "gzip"):
            with open(out.join(name), "rb") as f:
                gz = f.read(2) == b"\x1f\x8b"
            ins.check(f"compression:{name}", gz == (compression == "gzip"),
                      compression if gz == (compression == "gzip") else
                      f"metadata.json says {compression}, the file is {'gzip' if gz else 'not gzip'}")
    dups = sorted(n for n, c in names.items() if c > 1)
    ins.check("names", not dups, f"{len(names)} distinct" if not dups else f"repeated image names: {dups[:5]}")
    ins.facts.update(record_format=seen["format"], embedding_size=seen["embedding"])
    meta_split = {str(f.get("file")): f.get("split") for f in meta.get("files", []) if isinstance(f, dict)}
    wrong = [n for n in out.files if n in meta_split and meta_split[n] != ("val" if n.startswith("val_") else "train")]
    if meta_split:
        ins.check("split", not wrong, "" if not wrong else f"metadata.json's split disagrees with the names of {wrong}")
    _check_common(ins, found_rows)


def _inspect_cifar_tfrecord(ins: Inspection) -> None:
    from PIL import Image

    out, meta = ins.out, ins.out.meta or {}
    n_classes = len(out.classes) or meta.get("classes") or None
    found_rows: Dict[str, Optional[int]] = {}
    shards: Dict[str, List[tuple]] = collections.defaultdict(list)
    for name in out.files:
        m = outputs_lib.CIFAR_TFRECORD_RE.match(name)
        variant, split = m.group(1), m.group(2)
        shards[f"{variant}-{split}"].append((int(m.group(3)), int(m.group(4))))

        def per_record(index, features, variant=variant):
            want = {"image", "label", "id"} | ({"coarse_label"} if variant == "cifar100" else set())
            if set(features) != want:
                return f"features {sorted(features)}, expected {sorted(want)}"
            image, label = features["image"], features["label"]
            if image.kind != "bytes" or image.size != 1:
                return "image is not one bytes value"
            try:
                img = Image.open(io.BytesIO(image.value[0]))
                img.load()
            except Exception as exc:  # noqa: BLE001
                return f"image does not decode: {exc}"
            if img.format != "PNG" or img.size != (32, 32) or img.mode != "RGB":
                return f"image is {img.format} {img.mode} {img.size}, expected a 32x32 RGB PNG"
            if label.kind != "int64" or label.size != 1:
                return "label is not one int64"
            value = int(label.value[0])
            if value < 0 or (n_classes and value >= n_classes):
                return f"label {value} outside 0..{(n_classes or 1) - 1}"
            if "coarse_label" in features:
                coarse = features["coarse_label"]
                if coarse.kind != "int64" or coarse.size != 1 or not 0 <= int(coarse.value[0]) < 20:
                    return "coarse_label is not one int64 in 0..19"
            ins.labels[value] += 1
            ins.sizes["32x32"] += 1
            return None

        count = _scan_records(ins, name, per_record)
        found_rows[name] = count
        ins.add_file(name, count, split=split)
        ins.splits[split] += count or 0
    for key, parts in sorted(shards.items()):
        totals = {n for _, n in parts}
        indices = sorted(k for k, _ in parts)
        ok = len(totals) == 1 and indices == list(range(next(iter(totals))))
        ins.check(f"shards:{key}", ok, f"{len(parts)} shards" if ok else
                  f"shards {indices} of {sorted(totals)}: incomplete or inconsistent")
    _check_common(ins, found_rows)


# --- CIFAR pickle ------------------------------------------------------------------------------------------------

def _inspect_cifar_pickle(ins: Inspection) -> None:
    from imagebeam.transforms.formats import safe_pickle

    out, meta = ins.out, ins.out.meta or {}
    found_rows: Dict[str, Optional[int]] = {}
    for name in out.files:
        try:
            with open(out.join(name), "rb") as f:
                saved = safe_pickle.load(f, encoding="latin1")
            if not isinstance(saved, dict):
                raise ValueError(f"a {type(saved).__name__}, not a dict")
        except Exception as exc:  # noqa: BLE001
            ins.fail(f"read:{name}", f"cannot be read: {type(exc).__name__}: {exc}")
            found_rows[name] = None
            ins.add_file(name, None)
            continue
        ins.check(f"read:{name}", True, "pickle")
        saved = {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in saved.items()}
        ins.check(f"keys:{name}", set(saved) == CIFAR_KEYS,
                  "" if set(saved) == CIFAR_KEYS else f"keys {sorted(saved)}, expected {sorted(CIFAR_KEYS)}")
        label_names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n)
                       for n in saved.get("label_names") or []]
        expected_names = 100 if "_100_" in name else 10
        problems, label_problems, total = [], [], 0
        for split in ("train", "test"):
            images, labels = saved.get(f"{split}_dataset"), saved.get(f"{split}_labels")
            if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
                    and images.shape[1:] == (32, 32, 3)):
                desc = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
                problems.append(f"{split}_dataset is {desc}, expected uint8 (n, 32, 32, 3)")
                continue
            n = images.shape[0]
            total += n
            ins.splits[split] += n
            ins.sizes["32x32"] += n
            if not (isinstance(labels, np.ndarray) and labels.dtype == np.int64 and labels.shape == (n,)):
                desc = f"{labels.dtype} {labels.shape}" if isinstance(labels, np.ndarray) else type(labels).__name__
                problems.append(f"{split}_labels is {desc}, expected int64 ({n},)")
                continue
            if n and (labels.min() < 0 or labels.max() >= len(label_names)):
                label_problems.append(f"{split} labels in {labels.min()}..{labels.max()}, "
                                      f"{len(label_names)} names")
            ins.labels.update(int(v) for v in labels)
        if len(label_names) != expected_names:
            label_problems.append(f"{len(label_names)} label names, expected {expected_names}")
        if isinstance(meta.get("classes"), int) and meta["classes"] != len(label_names):
            label_problems.append(f"{len(label_names)} label names, metadata.json says {meta['classes']} classes")
        ins.check(f"shapes:{name}", not problems, "; ".join(problems))
        ins.check(f"labels:{name}", not label_problems, "; ".join(label_problems))
        ins.facts["_label_names"] = dict(enumerate(label_names))
        found_rows[name] = total if not problems else None
        ins.add_file(name, found_rows[name])
    _check_common(ins, found_rows)


# --- download and image folders ------------------------------------------------------------------------------------

def _inspect_download(ins: Inspection) -> None:
    out, meta = ins.out, ins.out.meta or {}
    try:
        entries = outputs_lib.read_manifest(out.path)
    except (OSError, ValueError) as exc:
        ins.fail("manifest", f"manifest.jsonl unreadable: {exc}")
        entries = []
    statuses = collections.Counter(str(e.get("status")) for e in entries if isinstance(e, dict))
    ins.labels.update(statuses)
    missing = [e.get("file") for e in entries if isinstance(e, dict) and e.get("status") == "ok"
               and not (e.get("file") and os.path.exists(out.join(e["file"])))]
    ins.add_file("manifest.jsonl", len(entries))
    ins.splits["ok"] = statuses.get("ok", 0)
    problems = []
    if missing:
        problems.append(f"{len(missing)} ok records without their file, e.g. {missing[:3]}")
    counts = meta.get("counts") if isinstance(meta.get("counts"), dict) else None
    if counts:
        if counts.get("urls") != len(entries):
            problems.append(f"{len(entries)} records, metadata.json says urls {counts.get('urls')}")
        if counts.get("ok") != statuses.get("ok", 0):
            problems.append(f"{statuses.get('ok', 0)} ok records, metadata.json says ok {counts.get('ok')}")
        if counts.get("urls") != (counts.get("ok") or 0) + (counts.get("failed") or 0):
            problems.append(f"urls {counts.get('urls')} != ok {counts.get('ok')} + failed {counts.get('failed')}")
    if entries or not problems:
        ins.check("manifest", not problems, "; ".join(problems) or f"{len(entries)} records")
    _check_common(ins, {}, compare_files=False)


def _inspect_images(ins: Inspection) -> None:
    from PIL import Image

    out, meta = ins.out, ins.out.meta or {}
    per_folder: collections.Counter = collections.Counter()
    for rel in out.files:
        per_folder[rel.split("/", 1)[0] + "/" if "/" in rel else "./"] += 1
    for rel in out.files[:MAX_SIZED_IMAGES]:
        try:
            with Image.open(out.join(rel)) as img:
                ins.sizes[f"{img.width}x{img.height}"] += 1
        except Exception:  # noqa: BLE001
            ins.sizes["undecodable"] += 1
    if len(out.files) > MAX_SIZED_IMAGES:
        ins.warnings.append(f"image sizes read from the first {MAX_SIZED_IMAGES} of {len(out.files)} files")
    for folder, n in sorted(per_folder.items()):
        ins.add_file(folder, n)
        ins.labels[folder.rstrip("/")] += n
    _check_common(ins, dict(per_folder), compare_files=bool(meta))


INSPECTORS = {"batches": _inspect_batches, "lab_records": _inspect_lab_records, "cifar_pickle": _inspect_cifar_pickle,
              "cifar_tfrecord": _inspect_cifar_tfrecord, "download": _inspect_download, "images": _inspect_images}


def inspect_output(path: str) -> Dict[str, Any]:
    """The report dict (what `--json` prints): files, rows, labels, sizes, checks, failed, ok."""
    try:
        out = outputs_lib.describe(path)
    except (ValueError, OSError) as exc:
        ins = Inspection(None, path)
        ins.fail("detect", str(exc))
        return ins.to_dict()
    ins = Inspection(out, path)
    if not out.files:
        ins.fail("files", f"a {out.kind} output ({out.detected_by}) without any of its data files")
        _check_common(ins, {})
    else:
        INSPECTORS[out.kind](ins)
    return ins.to_dict()


# --- the report ------------------------------------------------------------------------------------------------

def _size(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_report(report: Dict[str, Any], verbose: bool = False) -> str:
    lines = [f"imagebeam inspect {report['output']}"]
    if report["kind"]:
        lines.append(f"  kind: {report['kind']} (detected by {report['detected_by']})"
                     + (f", job {report['job']}" if report["job"] else ""))
    if report["files"]:
        lines.append(f"files ({len(report['files'])}):")
        width = max(len(f["file"]) for f in report["files"])
        for f in report["files"]:
            rows = "?" if f["rows"] is None else f"{f['rows']:,}"
            extra = f"  {f['split']}" if f.get("split") else ""
            lines.append(f"  {f['file']:<{width}}  {rows:>10} rows  {_size(f['bytes']):>10}{extra}")
    by_split = ", ".join(f"{k} {v:,}" for k, v in report["rows_by_split"].items())
    lines.append(f"rows: {report['rows']:,}" + (f" ({by_split})" if by_split else ""))
    if report["image_sizes"]:
        lines.append("image sizes: " + ", ".join(f"{k} x{v:,}" for k, v in report["image_sizes"].items()))
    labels = report["labels"]
    if labels:
        def show(e):
            return f"{e['label']}" + (f" {e['name']}" if e["name"] else "") + f" ({e['count']:,})"
        lines.append(f"labels: {labels['classes']:,} classes; fewest: {show(labels['min'])}; "
                     f"most: {show(labels['max'])}")
        lines.append("  top 10: " + "; ".join(show(e) for e in labels["top"]))
    counts = report["metadata_counts"]
    if counts:
        lines.append("metadata counts: " + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                                                     for k, v in counts.items()))
    failures = report["facts"].get("failures")
    if failures:
        lines.append(f"failures.jsonl: {failures['lines']} lines" +
                     (" (" + "; ".join(f"{r}: {n}" for r, n in failures["reasons"].items()) + ")"
                      if failures["reasons"] else ""))
    for w in report["warnings"]:
        lines.append(f"warning: {w}")
    failed = [c for c in report["checks"] if not c["ok"]]
    lines.append(f"checks: {len(report['checks']) - len(failed)} passed, {len(failed)} failed")
    for c in report["checks"]:
        if verbose or not c["ok"]:
            detail = f": {c['detail']}" if c["detail"] else ""
            lines.append(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['check']}{detail}")
    lines.append("OK" if report["ok"] else "FAILED: " + ", ".join(report["failed"]))
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="imagebeam inspect", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", metavar="OUTPUT", help="an output folder of an imagebeam job")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.add_argument("--verbose", "-v", action="store_true", help="list every check, not only the failed ones")
    return p


def inspect_main(argv: Optional[Sequence[str]] = None) -> int:
    args = make_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    report = inspect_output(args.output)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        print(format_report(report, args.verbose))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(inspect_main())
