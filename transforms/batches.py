"""Imagenet32/64 batch files (SPEC §2): seeded global shuffle, exact batch sizes, pickle and npz sinks.

Determinism: the shuffle is the order of a keyed hash of (seed, image name), so it depends only on the
set of images and the seed, never on bundle boundaries, worker count or runner. Batch k holds the rows
of ranks [k*q, (k+1)*q) with q = N // batches, the last batch the remainder, found from the B-1
boundary keys of the sorted key list (one small global combine). Inside a file rows are sorted by key.
"""
from __future__ import annotations

import bisect
import hashlib
import pickle
import zipfile
from typing import Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np

from imagebeam.transforms.fileutil import join, write_with
from imagebeam.transforms.labels import val_sort_key
from imagebeam.transforms.rows import Row

PICKLE_PROTOCOL = 4  # Python 3 readers, objects over 4 GB allowed; the seed's loader is plain pickle.load
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed npz member timestamps: same rows => same bytes

ShuffleKey = Tuple[bytes, str, str]


def shuffle_key(seed: int, name: str, source: str) -> ShuffleKey:
    """The row's place in the seeded permutation: a 128-bit keyed hash, ties broken by name and source."""
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=16, key=str(int(seed)).encode()).digest()
    return (digest, name, source)


def batch_sizes(n: int, batches: int) -> List[int]:
    """Batches 1..B-1 get N // B rows, batch B the remainder (128,116 x 9 + 128,123 for ImageNet)."""
    q = n // batches
    return [q] * (batches - 1) + [n - q * (batches - 1)]


def boundaries(sorted_keys: Sequence[ShuffleKey], batches: int) -> List[ShuffleKey]:
    """The keys at ranks q, 2q, ..., (B-1)q; a key's batch is bisect_right(boundaries, key)."""
    q = len(sorted_keys) // batches
    if q == 0:
        # Fewer rows than batches: all rows go to the last batch, the others are empty.
        return [(b"", "", "")] * (batches - 1) if not sorted_keys else [sorted_keys[0]] * (batches - 1)
    return [sorted_keys[q * k] for k in range(1, batches)]


class _BoundariesFn(beam.CombineFn):
    """All shuffle keys (about 60 bytes each) -> the B-1 batch boundaries."""

    def __init__(self, batches: int):
        self._batches = batches

    def create_accumulator(self):
        return []

    def add_input(self, acc, key):
        acc.append(key)
        return acc

    def merge_accumulators(self, accs):
        merged = []
        for acc in accs:
            merged.extend(acc)
        return merged

    def extract_output(self, acc):
        acc.sort()
        return boundaries(acc, self._batches)


def _assign(keyed: Tuple[ShuffleKey, Row], bounds: List[ShuffleKey]):
    key, row = keyed
    index = bisect.bisect_right(bounds, key)
    # A row whose key equals the (B-1)q-th key must land in the last batch, not beyond it.
    return min(index, len(bounds)), (key, row)


class AssignBatches(beam.PTransform):
    """rows -> (batch index, (sort key, row)).

    Train (`seed` given): the seeded global shuffle into `batches` files, via the B-1 boundary keys.
    Val (`seed` None): everything in batch 0, keyed by file name for a stable order.
    """

    def __init__(self, batches: int, seed: Optional[int]):
        super().__init__()
        self.batches = batches if seed is not None else 1
        self._seed = seed

    def expand(self, rows):
        if self._seed is None:
            return rows | "ValOrder" >> beam.Map(lambda r: (0, (val_sort_key(r.name) + (r.source,), r)))
        seed = self._seed
        keyed = rows | "ShuffleKey" >> beam.Map(lambda r: (shuffle_key(seed, r.name, r.source), r))
        bounds = keyed | "Keys" >> beam.Keys() | "Boundaries" >> beam.CombineGlobally(_BoundariesFn(self.batches))
        return keyed | "AssignBatch" >> beam.Map(_assign, beam.pvalue.AsSingleton(bounds))


class GroupBatches(beam.PTransform):
    """(batch index, (key, row)) -> (batch index, rows in file order); indexes 0..B-1 all appear."""

    def __init__(self, batches: int):
        super().__init__()
        self._batches = batches

    def expand(self, assigned):
        empties = assigned.pipeline | "AllBatches" >> beam.Create([(b, None) for b in range(self._batches)])
        return (
            (assigned, empties)
            | "WithEmpties" >> beam.Flatten()
            | "GroupBatch" >> beam.GroupByKey()
            | "FileOrder" >> beam.MapTuple(
                lambda index, items: (index, [row for _, row in sorted(i for i in items if i is not None)]))
        )


def batch_dict(data: np.ndarray, labels, mean: Optional[np.ndarray]) -> Dict[str, object]:
    """The dict of SPEC §2: data uint8 (n, 3*S*S), labels list of int, mean float64 (train only)."""
    out: Dict[str, object] = {"data": np.ascontiguousarray(data, dtype=np.uint8),
                              "labels": [int(v) for v in labels]}
    if mean is not None:
        out["mean"] = np.asarray(mean, dtype=np.float64)
    return out


def rows_to_arrays(rows: List[Row], row_size: int) -> Tuple[np.ndarray, List[int]]:
    data = np.frombuffer(b"".join(r.pixels for r in rows), dtype=np.uint8).reshape(len(rows), row_size)
    return data, [r.label for r in rows]


def write_pickle(f, batch: Dict[str, object]) -> None:
    pickle.dump(batch, f, protocol=PICKLE_PROTOCOL)


def write_npz(f, batch: Dict[str, object]) -> None:
    """An .npz readable with np.load(allow_pickle=False): plain arrays, fixed timestamps, stored."""
    # zipfile copes with unseekable writers (gs://) by writing data descriptors; local files seek.
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key in ("data", "labels", "mean"):
            if key not in batch:
                continue
            value = batch[key]
            array = np.asarray(value, dtype=np.int64) if key == "labels" else np.asarray(value)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


WRITERS = {"pickle": (write_pickle, ""), "npz": (write_npz, ".npz")}


def batch_file_name(index: int, train: bool, fmt: str) -> str:
    base = f"train_data_batch_{index + 1}" if train else "val_data"
    return base + WRITERS[fmt][1]


def write_batch(path: str, fmt: str, batch: Dict[str, object]) -> None:
    write_with(path, lambda f: WRITERS[fmt][0](f, batch))


class WriteBatches(beam.PTransform):
    """(index, rows) -> batch files in `output`; emits {"file", "rows"} per file written.

    Train rows written with fmt "npz" and no mean are the staging files of the two-phase train job.
    """

    def __init__(self, output: str, fmt: str, size: int, train: bool):
        super().__init__()
        if fmt not in WRITERS:
            raise ValueError(f"unknown format {fmt!r}; choose from {sorted(WRITERS)}")
        self._output, self._fmt, self._row_size, self._train = output, fmt, 3 * size * size, train

    def expand(self, batches):
        output, fmt, row_size, train = self._output, self._fmt, self._row_size, self._train

        def write(element):
            index, rows = element
            name = batch_file_name(index, train, fmt)
            write_batch(join(output, name), fmt, batch_dict(*rows_to_arrays(rows, row_size), None))
            return {"file": name, "rows": len(rows)}

        return batches | "WriteFile" >> beam.Map(write)


class FinalizeBatches(beam.PTransform):
    """Staged npz batch paths -> the final files in `fmt` with the mean added; emits {"file", "rows"}."""

    def __init__(self, output: str, fmt: str, mean: beam.PCollection):
        super().__init__()
        self._output, self._fmt, self._mean = output, fmt, mean

    def expand(self, staged_paths):
        output, fmt = self._output, self._fmt

        def finalize(path: str, mean: np.ndarray) -> dict:
            from imagebeam.transforms.stats import read_staged

            staged = read_staged(path)
            name = path.rsplit("/", 1)[-1][: -len(".npz")] + WRITERS[fmt][1]
            write_batch(join(output, name), fmt, batch_dict(staged["data"], staged["labels"], mean))
            return {"file": name, "rows": int(len(staged["labels"]))}

        return staged_paths | "WriteFinal" >> beam.Map(finalize, beam.pvalue.AsSingleton(self._mean))
