"""URL lists as a Beam source: text (SPEC §3), CSV, JSON lines and Parquet, read split-wise.

Text lists: `#` comments and blank lines are skipped and the URL is the last whitespace-separated token,
so ImageNet's `fall11_urls.txt` (`n00004475_6590<TAB>http://...`) keeps its first token as the image key
and the WNID as the label. Tables name their columns (`--url-column`, `--key-column`, `--label-column`).
Plain and gzip text, CSV and JSON lines go through `ReadFromText`, Parquet through `ReadFromParquet`:
large files are split across workers (gzip streams through one) and never loaded whole. A `.tgz`
holding a list is streamed by one worker, then spread out.
"""
from __future__ import annotations

import bz2
import contextlib
import csv
import gzip
import hashlib
import io
import json
import lzma
import re
import tarfile
from typing import BinaryIO, Iterator, List, NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam import coders
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from imagebeam.transforms.bookkeeping import fileutil

_FALL11_KEY = re.compile(r"^(n\d{8})_\d+$")
MAX_URL_CHARS = 4096  # a longer "URL" is garbage; it is recorded cut to this length

TEXT_SUFFIXES = (".txt", ".tsv", ".lst", ".urls")
TABLE_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
COMPRESSED = (".gz", ".bz2", ".deflate", ".zst", ".lzma", ".xz")
TGZ_SUFFIXES = (".tgz", ".tar.gz")


class UrlEntry(NamedTuple):
    """One listed URL. `problem` is set for a line that holds no usable URL (it is recorded, not dropped)."""
    url: str
    key: Optional[str] = None      # image key (fall11 id, --key-column)
    label: Optional[str] = None    # class (fall11 WNID, --label-column)
    source: str = ""               # the list it came from
    problem: Optional[str] = None


def url_md5(url: str) -> str:
    """The download's file stem (SPEC §3: md5 of the URL as written in the list)."""
    return hashlib.md5(url.encode("utf-8", "surrogateescape")).hexdigest()


def _compression(path: str) -> str:
    """The compression suffix of `path` (one of COMPRESSED), "" for none."""
    lower = path.lower()
    return next((suffix for suffix in COMPRESSED if lower.endswith(suffix)), "")


def _strip_compression(path: str) -> str:
    lower = path.lower()
    return lower[: len(lower) - len(_compression(lower))]


def _list_paths(spec: str) -> List[str]:
    """The files a list path or glob names (a plain path as it is, without listing it)."""
    return fileutil.matching([spec]) if any(c in spec for c in "*?[") else [spec]


def _sized_files(patterns: List[str]) -> List[Tuple[str, int]]:
    """(path, size in bytes) of every file the paths or globs name, sorted: one listing for both."""
    return sorted((m.path, m.size_in_bytes) for r in FileSystems.match(list(patterns)) for m in r.metadata_list)


def _splittable(path: str) -> bool:
    """A plain line-oriented list: its size says how many lines, and it can be read from any offset."""
    return list_format(path) in ("text", "csv", "jsonl") and not _compression(path)


def list_format(path: str) -> Optional[str]:
    """'text' | 'csv' | 'jsonl' | 'parquet' | 'tgz' for a URL list path or glob, None otherwise.

    A `.tgz` is only a list when it holds text files (ImageNet ships `imagenet_fall11_urls.tgz`);
    image shards are `.tgz` too, so that is decided by `tgz_holds_list`.
    """
    lower = path.lower()
    if lower.endswith(TGZ_SUFFIXES):
        return "tgz"
    bare = _strip_compression(path)
    if bare.endswith(TEXT_SUFFIXES):
        return "text"
    for suffix, kind in TABLE_SUFFIXES.items():
        if bare.endswith(suffix):
            return kind
    return None


def tgz_holds_list(path: str) -> bool:
    """True when the first regular member of a compressed tar is a text list."""
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw, \
                tarfile.open(fileobj=raw, mode="r|*") as tar:
            for info in tar:
                if info.isfile():
                    return list_format(info.name) == "text"
    except (tarfile.TarError, OSError, EOFError):
        return False
    return False


def is_url_list(path: str) -> bool:
    kind = list_format(path)
    if kind == "tgz":
        matched = _list_paths(path)
        return bool(matched) and tgz_holds_list(matched[0])
    return kind is not None


# --- parsing, one line or record at a time (pure) -------------------------------------------------------

def _clean(url: str, entry: UrlEntry) -> UrlEntry:
    if len(url) > MAX_URL_CHARS:
        return entry._replace(url=url[:MAX_URL_CHARS], problem=f"not a URL: {len(url)} characters long")
    return entry._replace(url=url)


def parse_text_line(line, source: str = "") -> Optional[UrlEntry]:
    """A list line -> UrlEntry, or None for blank lines and `#` comments."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    text = line.strip().lstrip("\ufeff")
    if not text or text.startswith("#"):
        return None
    tokens = text.split()
    key = tokens[0] if len(tokens) > 1 else None
    match = _FALL11_KEY.match(key) if key else None
    return _clean(tokens[-1], UrlEntry("", key, match.group(1) if match else None, source))


def parse_record(record: dict, url_column: str, key_column: Optional[str], label_column: Optional[str],
                 source: str = "") -> UrlEntry:
    """A table row (CSV, JSON line, Parquet) -> UrlEntry."""
    def text(column: Optional[str]) -> Optional[str]:
        if not column:
            return None
        value = record.get(column)
        return None if value is None or value == "" else str(value).strip()

    url = text(url_column)
    if url is None:
        shown = json.dumps(record, default=str, sort_keys=True)[:200]
        return UrlEntry(shown, source=source, problem=f"no {url_column!r} value in the row")
    return _clean(url, UrlEntry("", text(key_column), text(label_column), source))


def parse_json_line(line, url_column: str, key_column: Optional[str], label_column: Optional[str],
                    source: str = "") -> Optional[UrlEntry]:
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except ValueError as exc:
        return UrlEntry(line.strip()[:200], source=source, problem=f"not a JSON object: {exc}")
    if not isinstance(record, dict):
        return UrlEntry(line.strip()[:200], source=source, problem="not a JSON object")
    return parse_record(record, url_column, key_column, label_column, source)


def parse_csv_line(line, header: List[str], url_column: str, key_column: Optional[str],
                   label_column: Optional[str], source: str = "") -> Optional[UrlEntry]:
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    if not line.strip():
        return None
    try:
        values = next(csv.reader([line]))
    except (csv.Error, StopIteration) as exc:
        return UrlEntry(line.strip()[:200], source=source, problem=f"not a CSV row: {exc}")
    return parse_record(dict(zip(header, values)), url_column, key_column, label_column, source)


def csv_header(path: str) -> List[str]:
    """The header row of a CSV list (the first file of a glob)."""
    matched = fileutil.matching([path])
    if not matched:
        raise ValueError(f"--input {path!r} matches no file")
    with FileSystems.open(matched[0]) as raw:
        first = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="").readline()
    return [h.strip().lstrip("\ufeff") for h in next(csv.reader([first]), [])]


def stream_tgz_lines(path: str) -> Iterator[UrlEntry]:
    """Every entry of the text lists inside a `.tgz`, streamed (never the whole list in memory)."""
    # The raw bytes: tarfile's stream mode inflates them a block at a time (see open_decompressed).
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw, \
            tarfile.open(fileobj=raw, mode="r|*") as tar:
        for info in tar:
            if not info.isfile() or list_format(info.name) != "text":
                continue
            for line in tar.extractfile(info):  # bytes lines, decoded leniently by the parser
                entry = parse_text_line(line, f"{path}/{info.name}")
                if entry is not None:
                    yield entry


# --- the progress line's total ------------------------------------------------------------------------

_SAMPLE_BYTES = 1 << 20


def estimated_lines(paths: List[str]) -> Optional[int]:
    """About how many entries the lists hold, without reading them: a Parquet file's row count, a plain
    list's size over the bytes per line of its first MiB (exact when smaller). None when any list is
    compressed (its size says little): the progress line then has no ETA."""
    total = 0
    for path, size in _sized_files(paths):
        if list_format(path) == "parquet" and not _compression(path):
            import pyarrow.parquet as pq

            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
                total += pq.ParquetFile(f).metadata.num_rows
            continue
        if not _splittable(path):  # compressed, or a .tgz
            return None
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
            sample = f.read(_SAMPLE_BYTES)
        lines = sample.count(b"\n") + (1 if sample and not sample.endswith(b"\n") and len(sample) == size else 0)
        lines -= 1 if list_format(path) == "csv" else 0  # the header
        total += lines if len(sample) == size else round(size * lines / max(1, len(sample)))
    return total


# --- the Beam source --------------------------------------------------------------------------------------

class ReadUrlLists(beam.PTransform):
    """List paths or globs -> UrlEntry PCollection, each list read by the reader its format allows."""

    def __init__(self, inputs: List[str], url_column: str = "url", key_column: Optional[str] = None,
                 label_column: Optional[str] = None):
        super().__init__()
        self._inputs = list(inputs)
        self._columns = (url_column, key_column, label_column)

    def expand(self, pbegin):
        reads = [pbegin | f"List{i}" >> _ReadOneList(path, *self._columns) for i, path in enumerate(self._inputs)]
        if len(reads) == 1:
            return reads[0]
        return tuple(reads) | "AllLists" >> beam.Flatten()


class _ReadOneList(beam.PTransform):
    def __init__(self, path: str, url_column: str, key_column: Optional[str], label_column: Optional[str]):
        super().__init__()
        self._path, self._cols = path, (url_column, key_column, label_column)

    def expand(self, pbegin):
        path, cols = self._path, self._cols
        kind = list_format(path)
        if kind == "parquet":
            columns = [c for c in cols if c]
            return (pbegin
                    | "ReadParquet" >> beam.io.ReadFromParquet(path, columns=columns)
                    | "Parse" >> beam.Map(parse_record, *cols, source=path))
        if kind == "tgz":  # streamed by one worker into what follows (a Reshuffle would hold every line)
            return (pbegin
                    | "Path" >> beam.Create([path])
                    | "StreamTgz" >> beam.FlatMap(stream_tgz_lines))
        skip = 1 if kind == "csv" else 0
        lines = pbegin | "ReadLines" >> beam.io.ReadFromText(path, coder=coders.BytesCoder(),
                                                             skip_header_lines=skip)
        if kind == "csv":
            parse = beam.FlatMap(lambda line, header: _some(parse_csv_line(line, header, *cols, source=path)),
                                 csv_header(path))
        elif kind == "jsonl":
            parse = beam.FlatMap(lambda line: _some(parse_json_line(line, *cols, source=path)))
        else:
            parse = beam.FlatMap(lambda line: _some(parse_text_line(line, path)))
        return lines | "Parse" >> parse


def _some(entry: Optional[UrlEntry]) -> List[UrlEntry]:
    return [] if entry is None else [entry]


# --- streaming a list in shards (the download job) ---------------------------------------------------------

DEFAULT_SHARD_SIZE = 10_000


class Shard(NamedTuple):
    """`size` consecutive entries of one list: the download job's unit of work (its own run file and
    completion marker). `id` is stable for the same inputs: "<input number>-<shard number>"."""
    id: str
    entries: List[UrlEntry]


@contextlib.contextmanager
def open_decompressed(path: str) -> Iterator[BinaryIO]:
    """A list file decompressed by its extension, in bounded memory: Python's gzip/bz2/lzma readers take
    the raw stream a block at a time (Beam's own decompressing reader inflates a whole 16 MiB read at once,
    about 100 MB of text for a list). .zst and .deflate go through Beam's reader."""
    opener = _STREAM_DECOMPRESSORS.get(_compression(path))
    if opener is None:
        with FileSystems.open(path) as f:
            yield f
        return
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw, opener(raw) as f:
        yield f


_STREAM_DECOMPRESSORS = {".gz": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
                         ".bz2": lambda raw: bz2.BZ2File(raw, "rb"),
                         ".xz": lambda raw: lzma.LZMAFile(raw, "rb"), ".lzma": lambda raw: lzma.LZMAFile(raw, "rb")}


def _lines(path: str) -> Iterator[bytes]:
    """The lines of a file, decompressed by its extension (.gz, .bz2, ...), streamed."""
    with open_decompressed(path) as f:
        yield from iter(f.readline, b"")


def _parquet_records(path: str, columns: List[str]) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with FileSystems.open(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=4096, columns=columns):
            yield from batch.to_pylist()


def stream_list(spec: str, url_column: str = "url", key_column: Optional[str] = None,
                label_column: Optional[str] = None) -> Iterator[UrlEntry]:
    """Every entry of a list path or glob, in file order, parsed as `ReadUrlLists` parses it; never the
    whole list in memory. `source` is `spec` as given (a .tgz member: `spec/member`)."""
    for path in _list_paths(spec):
        yield from stream_range(ListRange(0, spec, path, 0, 0, -1), url_column, key_column, label_column)


# A plain (uncompressed) list is cut into byte ranges of this size, each read by whichever worker takes
# it: a cluster fetches one big list on all its workers. A compressed list is one range.
LIST_RANGE_BYTES = 64 << 20


class ListRange(NamedTuple):
    """Bytes [start, end) of one list file (end -1: the whole file, read as a stream); a line belongs to
    the range it starts in. `index` numbers the ranges of list `number` (shard ids: number-index-count)."""
    number: int
    spec: str
    path: str
    index: int
    start: int
    end: int


def list_ranges(number: int, spec: str, range_bytes: Optional[int] = None) -> List[ListRange]:
    """The `number`-th list (a path or glob) as ranges: sizes only, nothing of the list is read."""
    range_bytes = range_bytes or LIST_RANGE_BYTES
    if list_format(spec) not in ("text", "csv", "jsonl"):
        return [ListRange(number, spec, path, i, 0, -1) for i, path in enumerate(_list_paths(spec))]
    sized = _sized_files([spec])
    if not sized:
        raise FileNotFoundError(f"URL list {spec} matches no file")
    out: List[ListRange] = []
    for path, size in sized:
        if _compression(path):
            out.append(ListRange(number, spec, path, len(out), 0, -1))
            continue
        for start in range(0, max(size, 1), range_bytes):
            out.append(ListRange(number, spec, path, len(out), start, min(size, start + range_bytes)))
    return out


def _range_lines(path: str, start: int, end: int) -> Iterator[bytes]:
    """The lines that start in bytes [start, end) of an uncompressed file."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        at = start
        if start > 0:  # the line under way at `start` belongs to the range before
            f.seek(start - 1)
            at = start - 1 + len(f.readline())
        while at < end:
            line = f.readline()
            if not line:
                return
            at += len(line)
            yield line


def stream_range(r: ListRange, url_column: str = "url", key_column: Optional[str] = None,
                 label_column: Optional[str] = None) -> Iterator[UrlEntry]:
    """The entries of one range of a list, in file order (see stream_list)."""
    cols = (url_column, key_column, label_column)
    kind, spec, path = list_format(r.spec), r.spec, r.path
    if kind == "tgz":
        yield from (e._replace(source=spec + e.source[len(path):]) for e in stream_tgz_lines(path))
        return
    if kind == "parquet":
        yield from (parse_record(rec, *cols, source=spec) for rec in _parquet_records(path, [c for c in cols if c]))
        return
    lines = _lines(path) if r.end < 0 else _range_lines(path, r.start, r.end)
    if kind == "csv":
        header = csv_header(path)
        if r.start == 0:
            next(lines, None)
        parsed = (parse_csv_line(line, header, *cols, source=spec) for line in lines)
    elif kind == "jsonl":
        parsed = (parse_json_line(line, *cols, source=spec) for line in lines)
    else:
        parsed = (parse_text_line(line, spec) for line in lines)
    yield from (e for e in parsed if e is not None)


def cut_shards(r: ListRange, size: int = DEFAULT_SHARD_SIZE, url_column: str = "url",
               key_column: Optional[str] = None, label_column: Optional[str] = None) -> Iterator[Shard]:
    """A list range cut into shards of `size` consecutive entries as it is read: the first shard is out
    after `size` lines, whatever the list's length (no pass over the whole list first)."""
    entries: List[UrlEntry] = []
    count = 0
    for entry in stream_range(r, url_column, key_column, label_column):
        entries.append(entry)
        if len(entries) == size:
            yield Shard(f"{r.number:04d}-{r.index:04d}-{count:07d}", entries)
            entries, count = [], count + 1
    if entries:
        yield Shard(f"{r.number:04d}-{r.index:04d}-{count:07d}", entries)
