"""Image sources: ILSVRC nested train tars, flat tar shards and image folders, local or on any Beam filesystem.

A source is read in two steps so that no big file is read by a single worker:
1. `index_input` (cheap, headers only) turns an input path or glob into work units: one per member tar of
   a nested tar (ILSVRC2012_img_train.tar holds 1000 `n########.tar`), contiguous runs of members of a
   flat tar, or runs of consecutive files of a folder or glob;
2. after a Reshuffle spreads the units over workers, `read_unit` seeks to each unit's bytes.
Every regular file found is an input: it ends up as an `ImageBlob` or as a `Failure` with its reason.
"""
from __future__ import annotations

import io
import posixpath
import tarfile
from typing import Iterator, List, NamedTuple, Optional, Tuple, Union

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from imagebeam.transforms.bookkeeping import fileutil
from imagebeam.transforms.inputs.labels import class_of

# A flat tar (or a folder) is cut into units of at most this many members or bytes (one seek, then
# sequential reads); a unit is also what a restarted job skips when it was finished before.
UNIT_MAX_MEMBERS = 256
UNIT_MAX_BYTES = 64 << 20

_TAR_SUFFIXES = (".tar",)
_STREAM_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_GLOB_CHARS = set("*?[")


class ImageBlob(NamedTuple):
    """Encoded bytes of one input image and where they came from."""
    source: str               # the file read (tar or image file)
    member: Optional[str]     # the member path inside the tar(s), None for a plain file
    name: str                 # stable relative name: the shuffle key and the val sort key
    class_key: Optional[str]  # WNID / class folder, None when the path has no class
    data: bytes


class Failure(NamedTuple):
    """An input that is not in the output, and why."""
    source: str
    member: Optional[str]
    reason: str

    def to_json(self) -> dict:
        return {"source": self.source, "member": self.member, "reason": self.reason}


class WorkUnit(NamedTuple):
    """A piece of one input file that one worker reads."""
    kind: str                 # "file" | "files" | "members" | "member_tar" | "stream_tar"
    source: str               # the file (tar or image); files: the folder or glob
    name: str = ""            # file: relative name; member_tar: the member tar's path in the outer tar
    members: Tuple[Tuple[str, int, int], ...] = ()  # members: (name, data offset, size); files: (name, 0, size)
    paths: Tuple[str, ...] = ()  # files: the path of each of `members`
    offset: int = 0           # member_tar: data offset of the member tar in the outer tar
    size: int = 0


Indexed = Union[WorkUnit, Failure]


def _is_glob(path: str) -> bool:
    return any(c in _GLOB_CHARS for c in path)


def _is_tar(path: str) -> bool:
    return path.lower().endswith(_TAR_SUFFIXES + _STREAM_TAR_SUFFIXES)


def normalise_member(name: str) -> str:
    """Tar member names as stable relative paths ('./a/b.JPEG' -> 'a/b.JPEG')."""
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    return "/".join(parts)


def unsafe_member_reason(raw_name: str) -> Optional[str]:
    """Why a tar member name is refused (absolute, or climbing out with '..'), or None when it is safe."""
    name = raw_name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return f"unsafe member name {raw_name!r}: absolute path"
    if ".." in name.split("/"):
        return f"unsafe member name {raw_name!r}: '..' would leave the extraction folder"
    return None


def index_input(spec: str) -> Iterator[Indexed]:
    """Expand one `--input` (tar, glob of tars or files, or folder) into work units and failures."""
    if _is_glob(spec):
        matched = fileutil.matching([spec])
        if not matched:
            raise ValueError(f"--input {spec!r} matches no file")
        files = []
        for path in matched:
            if _is_tar(path):
                yield from index_tar(path)
            else:
                files.append((posixpath.basename(path), path))
        yield from _file_units(spec, files)
        return
    if _is_tar(spec):
        if not FileSystems.exists(spec):
            raise ValueError(f"--input {spec!r} does not exist")
        yield from index_tar(spec)
        return
    yield from index_folder(spec)


def index_folder(root: str) -> Iterator[Indexed]:
    """Every file below `root`; class = first folder below the root (`root/<class>/...`)."""
    root = root.rstrip("/")
    result = FileSystems.match([FileSystems.join(root, "**")])[0]
    paths = sorted(m.path for m in result.metadata_list)
    if not paths:
        raise ValueError(f"--input {root!r} is neither a tar nor a folder with files")
    prefix = root + "/"
    yield from _file_units(root, [(path[len(prefix):] if path.startswith(prefix) else posixpath.basename(path), path)
                                  for path in paths])


def _file_units(source: str, files: List[Tuple[str, str]]) -> Iterator[WorkUnit]:
    """(relative name, path) pairs in order -> one unit per run of UNIT_MAX_MEMBERS files ("files")."""
    for start in range(0, len(files), UNIT_MAX_MEMBERS):
        run = files[start:start + UNIT_MAX_MEMBERS]
        yield WorkUnit("files", source, members=tuple((name, 0, 0) for name, _ in run),
                       paths=tuple(path for _, path in run))


def index_tar(path: str) -> Iterator[Indexed]:
    """Read only the headers of a tar: member tars become one unit each, other members are grouped."""
    if path.lower().endswith(_STREAM_TAR_SUFFIXES):
        # Compressed tars cannot be entered at an offset: one worker streams the whole shard. Its
        # member names are still listed here (one decompression pass) so classes are known up front.
        try:
            with FileSystems.open(path) as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
                names = tuple((normalise_member(m.name), -1, m.size) for m in tar if m.isfile())
        except (tarfile.TarError, OSError, EOFError) as exc:
            names = ()
            yield Failure(path, None, f"unreadable compressed tar: {exc}")
        if names:
            yield WorkUnit("stream_tar", path, members=names)
        return
    group: List[Tuple[str, int, int]] = []
    group_bytes = 0
    try:
        with FileSystems.open(path) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for info in _iter_members(tar):
                name = normalise_member(info.name)
                if info.isdir():
                    continue
                if not info.isfile():
                    yield Failure(path, info.name, f"tar member is {_kind(info)}, not a regular file")
                    continue
                unsafe = unsafe_member_reason(info.name)
                if unsafe:
                    yield Failure(path, info.name, unsafe)
                    continue
                if name.lower().endswith(".tar"):
                    yield WorkUnit("member_tar", path, name=name, offset=info.offset_data, size=info.size)
                    continue
                group.append((name, info.offset_data, info.size))
                group_bytes += info.size
                if len(group) >= UNIT_MAX_MEMBERS or group_bytes >= UNIT_MAX_BYTES:
                    yield WorkUnit("members", path, members=tuple(group))
                    group, group_bytes = [], 0
            raw.seek(tar.offset)
            if not _is_end_marker(raw):
                yield Failure(path, None, f"unreadable tar after {len(tar.members)} members: what follows the "
                                          "last member is neither a member nor the end of the archive")
    except _TarIndexError as exc:
        # The rest of the tar is lost: one failure for it (the members indexed so far are still read).
        yield Failure(path, None, f"unreadable tar after {exc.count} members (last {exc.member!r}): {exc.cause}")
    except (tarfile.TarError, OSError) as exc:
        yield Failure(path, None, f"unreadable tar: {exc}")
    if group:
        yield WorkUnit("members", path, members=tuple(group))


class _TarIndexError(Exception):
    def __init__(self, member: Optional[str], count: int, cause: Exception):
        super().__init__(str(cause))
        self.member, self.count, self.cause = member, count, cause


def _iter_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """Members one by one, turning a broken header mid-way into one error that says where."""
    count, last = 0, None
    while True:
        try:
            info = tar.next()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise _TarIndexError(last, count, exc) from None
        if info is None:
            return
        count, last = count + 1, info.name
        yield info


def _is_end_marker(f, limit: int = 1 << 20) -> bool:
    """tarfile silently stops at a truncated or garbled header; a real end is only zero blocks."""
    tail = f.read(limit + 1)
    return len(tail) <= limit and not tail.strip(b"\0")


def _kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return f"a symbolic link (-> {info.linkname})"
    if info.islnk():
        return f"a hard link (-> {info.linkname})"
    if info.ischr() or info.isblk():
        return "a device"
    if info.isfifo():
        return "a FIFO"
    return f"of type {info.type!r}"


class _Window(io.RawIOBase):
    """A read-only, seekable view of `size` bytes of `raw` from `offset` (a member tar inside a tar)."""

    def __init__(self, raw, offset: int, size: int):
        self._raw, self._start, self._size, self._pos = raw, offset, size, 0
        self.short = False  # the underlying file ended before the window did

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, min(self._size, base + pos))
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        self._raw.seek(self._start + self._pos)
        data = self._raw.read(n)
        self.short = self.short or len(data) < n
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


class _PlainTar:
    """Plain ustar members of an uncompressed tar stream, without tarfile's per-member overhead.

    Reads regular files and skips directories; at any other header (pax or GNU long names, links,
    base-256 sizes, a bad checksum) it stops and records where, so tarfile takes over from there.
    """

    def __init__(self, stream):
        self._stream, self.position = stream, 0
        self.stopped_at: Optional[int] = None  # offset of a header left to tarfile
        self.clean_end = False

    def __iter__(self) -> Iterator[Tuple[str, bytes]]:
        while True:
            header = self._stream.read(512)
            if len(header) < 512:
                if not header.strip(b"\0"):
                    self.clean_end = True  # end of data after a member: tolerated, as tarfile does
                    return
                raise tarfile.ReadError("unexpected end of data")
            if not header.strip(b"\0"):
                self.clean_end = _is_end_marker(self._stream)
                return
            kind = header[156:157]
            if kind not in (b"0", b"\0", b"5") or header[124] & 0x80 or not _checksum_ok(header):
                self.stopped_at = self.position
                return
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            name = header[:100].split(b"\0", 1)[0]
            if header[257:262] == b"ustar" and header[345] != 0:
                name = header[345:500].split(b"\0", 1)[0] + b"/" + name
            padded = (size + 511) // 512 * 512
            data = self._stream.read(padded)
            if len(data) < size:
                raise tarfile.ReadError(f"truncated member {name.decode('utf-8', 'replace')!r}")
            self.position += 512 + padded
            if kind != b"5":
                yield name.decode("utf-8", "surrogateescape"), data[:size]


def _buffered_window(raw, unit: WorkUnit) -> Tuple["_Window", io.BufferedReader]:
    """A member tar's bytes, buffered: tar readers read 512-byte headers and seek between members."""
    window = _Window(raw, unit.offset, unit.size)
    return window, io.BufferedReader(window, buffer_size=4 << 20)


def _truncated(unit: WorkUnit, where: Optional[str], count: int) -> Failure:
    return Failure(unit.source, where, f"unreadable tar after {count} members: truncated, or garbage where "
                                       "the next member header should be")


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(header[:148]) + 256 + sum(header[156:])


def read_unit(unit: WorkUnit) -> Iterator[Union[ImageBlob, Failure]]:
    """The images of one work unit; broken pieces become failures, the rest is still read."""
    if unit.kind == "file":
        try:
            with FileSystems.open(unit.source) as f:
                data = f.read()
        except OSError as exc:
            yield Failure(unit.source, None, f"cannot read file: {exc}")
            return
        yield ImageBlob(unit.source, None, unit.name, class_of(unit.name), data)
    elif unit.kind == "files":
        for (name, _, _), path in zip(unit.members, unit.paths):
            yield from read_unit(WorkUnit("file", path, name=name))
    elif unit.kind == "members":
        yield from _read_members(unit)
    elif unit.kind == "member_tar":
        yield from _read_member_tar(unit)
    elif unit.kind == "stream_tar":
        yield from _read_tar_stream(unit, prefix="", class_key=None)
    else:
        raise ValueError(f"unknown work unit kind {unit.kind!r}")


def _stem(name: str) -> str:
    return posixpath.basename(name)[: -len(".tar")]


def _read_members(unit: WorkUnit) -> Iterator[Union[ImageBlob, Failure]]:
    with FileSystems.open(unit.source) as f:
        for name, offset, size in unit.members:
            try:
                f.seek(offset)
                data = f.read(size)
            except OSError as exc:
                yield Failure(unit.source, name, f"cannot read tar member: {exc}")
                continue
            if len(data) != size:
                yield Failure(unit.source, name, f"truncated tar: member has {len(data)} of its {size} bytes")
                continue
            yield ImageBlob(unit.source, name, name, class_of(name), data)


def _read_member_tar(unit: WorkUnit) -> Iterator[Union[ImageBlob, Failure]]:
    """A member tar of a nested tar (ILSVRC2012_img_train.tar): the plain reader, tarfile if needed."""
    prefix, class_key = unit.name[: -len(".tar")], _stem(unit.name)
    count = 0
    try:
        with FileSystems.open(unit.source) as raw:
            window, stream = _buffered_window(raw, unit)
            plain = _PlainTar(stream)
            for raw_name, data in plain:
                count += 1
                unsafe = unsafe_member_reason(raw_name)
                if unsafe:
                    yield Failure(unit.source, f"{unit.name}/{raw_name}", unsafe)
                    continue
                name = normalise_member(raw_name)
                yield ImageBlob(unit.source, f"{unit.name}/{name}", f"{prefix}/{posixpath.basename(name)}",
                                class_key, data)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        yield Failure(unit.source, unit.name, f"unreadable tar after {count} members: {exc}")
        return
    if plain.stopped_at is not None:
        rest = unit._replace(offset=unit.offset + plain.stopped_at, size=unit.size - plain.stopped_at)
        yield from _read_tar_stream(rest, prefix=prefix, class_key=class_key, counted=count)
    elif not plain.clean_end or window.short:
        yield _truncated(unit, unit.name, count)


def _read_tar_stream(unit: WorkUnit, prefix: str, class_key: Optional[str],
                     counted: int = 0) -> Iterator[Union[ImageBlob, Failure]]:
    """Read a tar (a member tar by offset, or a compressed shard) member by member, in order.

    Random-access mode, not stream mode: tarfile's stream mode silently ends at a truncated or garbled
    header, while here the bytes after the last member are checked to be the archive's end marker.
    """
    where = unit.name or None
    count = counted
    try:
        with FileSystems.open(unit.source) as raw:
            window, stream = _buffered_window(raw, unit) if unit.kind == "member_tar" else (None, raw)
            with tarfile.open(fileobj=stream, mode="r:*") as tar:
                for info in tar:
                    name = normalise_member(info.name)
                    member = f"{where}/{name}" if where else name
                    if info.isdir():
                        continue
                    if not info.isfile():
                        yield Failure(unit.source, member, f"tar member is {_kind(info)}, not a regular file")
                        continue
                    unsafe = unsafe_member_reason(info.name)
                    if unsafe:
                        yield Failure(unit.source, member, unsafe)
                        continue
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        yield Failure(unit.source, member,
                                      f"truncated tar: member has {len(data)} of its {info.size} bytes")
                        continue
                    count += 1
                    rel = f"{prefix}/{posixpath.basename(name)}" if prefix else name
                    yield ImageBlob(unit.source, member, rel, class_key or class_of(rel), data)
                tar.fileobj.seek(tar.offset)
                ended_cleanly = _is_end_marker(tar.fileobj)
            if not ended_cleanly or (window is not None and window.short):
                yield _truncated(unit, where, count)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        yield Failure(unit.source, where, f"unreadable tar after {count} members: {exc}")


def class_keys(item: Indexed) -> Iterator[str]:
    """The classes a work unit holds, known from the index alone (no image is read)."""
    if isinstance(item, Failure):
        return
    if item.kind == "member_tar":
        yield _stem(item.name)
    elif item.kind == "file":
        key = class_of(item.name)
        if key is not None:
            yield key
    else:
        for key in {class_of(name) for name, _, _ in item.members}:
            if key is not None:
                yield key


AVERAGE_IMAGE_BYTES = 110_000  # an ILSVRC2012 JPEG; only for sizing work where a tar's count is unknown


def estimated_images(item: Indexed) -> int:
    """How many images a work unit holds, from the index alone (member tars: estimated from bytes)."""
    if isinstance(item, Failure):
        return 0
    if item.kind == "file":
        return 1
    if item.kind == "member_tar":
        return max(1, item.size // AVERAGE_IMAGE_BYTES)
    return len(item.members)


class IndexInputs(beam.PTransform):
    """Input paths -> work units and failures (headers only, cheap)."""

    def __init__(self, inputs: List[str]):
        super().__init__()
        self._inputs = list(inputs)

    def expand(self, pbegin):
        return pbegin | "Inputs" >> beam.Create(self._inputs) | "Index" >> beam.FlatMap(index_input)


class ReadImages(beam.PTransform):
    """Indexed work units -> (ImageBlob, Failure) PCollections, the reading spread over workers.

    Nothing downstream should make the runner hold the blobs (raw image bytes) between stages: keep
    the consumers of `blobs` free of side inputs computed from the blobs themselves, so reading and
    decoding fuse into one stage.
    """

    FAILURES = "failures"

    def expand(self, indexed):
        out = (
            indexed
            | "SpreadUnits" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_ReadUnitFn()).with_outputs(self.FAILURES, main="blobs")
        )
        return out.blobs, out[self.FAILURES]


class _ReadUnitFn(beam.DoFn):
    def process(self, item: Indexed):
        if isinstance(item, Failure):
            yield beam.pvalue.TaggedOutput(ReadImages.FAILURES, item)
            return
        for out in read_unit(item):
            if isinstance(out, Failure):
                yield beam.pvalue.TaggedOutput(ReadImages.FAILURES, out)
            else:
                yield out
