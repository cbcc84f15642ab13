"""What every job checks before a pipeline starts, so a mistake costs one line and no output folder.

Each check raises `UsageError` (a SystemExit carrying one sentence that names the option and what to
do); the `imagebeam` command prints it as `imagebeam JOB: ...` and exits 2. Nothing here creates files.
"""
from __future__ import annotations

import argparse
import os
import socket
from typing import Iterable, Optional, Sequence

_GLOB_CHARS = set("*?[")


class UsageError(SystemExit):
    """A mistake in the command line, found before anything ran (exit status 2 from the command)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the option (`imagebeam JOB: ...`), not its usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def check_inputs(specs: Sequence[str], option: str = "--input") -> None:
    """Every input exists: a file, a folder with files, or a glob matching something."""
    from apache_beam.io.filesystems import FileSystems

    for spec in specs:
        if not spec:
            raise UsageError(f"{option} is empty")
        if any(c in spec for c in _GLOB_CHARS):
            try:
                matched = FileSystems.match([spec])[0].metadata_list
            except Exception:  # noqa: BLE001 - Beam raises for a pattern that matches nothing
                matched = []
            if not matched:
                raise UsageError(f"{option} {spec!r} matches no file; check the pattern (quote it so the shell "
                                 "does not expand it)")
            continue
        if _is_remote(spec):
            try:
                found = FileSystems.exists(spec) or FileSystems.exists(spec.rstrip("/") + "/")
            except ValueError:  # a scheme Beam has no filesystem for: the job itself says what it takes
                continue
            if not found:
                raise UsageError(f"{option} {spec!r} does not exist")
            continue
        path = _local(spec)
        if not os.path.exists(path):
            raise UsageError(f"{option} {spec!r} does not exist")
        if os.path.isdir(path) and not any(files for _, _, files in os.walk(path)):
            raise UsageError(f"{option} {spec!r} is a folder without any file")
        if os.path.isfile(path) and not os.access(path, os.R_OK):
            raise UsageError(f"{option} {spec!r} is not readable")


def check_file(path: Optional[str], option: str) -> None:
    """An optional single input file (a devkit, a class map) that must exist and be readable."""
    if not path:
        return
    from apache_beam.io.filesystems import FileSystems

    if _is_remote(path):
        if not FileSystems.exists(path):
            raise UsageError(f"{option} {path!r} does not exist")
        return
    if not os.path.isfile(path):
        raise UsageError(f"{option} {path!r} does not exist" if not os.path.exists(path)
                         else f"{option} {path!r} is not a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{option} {path!r} is not readable")


def check_output(path: str, option: str = "--output", inputs: Iterable[str] = ()) -> None:
    """The output can be a folder: not an existing file, not inside a file, not one of the inputs."""
    if not path:
        raise UsageError(f"{option} is empty")
    if _is_remote(path):
        return
    local = _local(path)
    if os.path.isfile(local):
        raise UsageError(f"{option} {path!r} is a file; give a folder (it is created if missing)")
    parent = os.path.dirname(os.path.abspath(local))
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise UsageError(f"{option} {path!r} is inside {parent!r}, which is a file")
    if parent and not os.access(parent, os.W_OK):
        raise UsageError(f"{option} {path!r}: {parent!r} is not writable")
    for spec in inputs:
        if spec and os.path.abspath(spec) == os.path.abspath(local):
            raise UsageError(f"{option} {path!r} is also an --input; write the output to another folder")


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Integer options that must be at least 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, not {value}")


def check_rate(value: float, option: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"{option} must be between 0 and 1 (a fraction of the inputs), not {value}")


def check_dask_address(address: Optional[str], timeout: float = 3.0) -> None:
    """`--dask-address HOST:PORT` must answer: a scheduler nobody listens on fails here, not in a worker."""
    if not address:
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--dask-address {address!r}: expected HOST:PORT (e.g. tcp://127.0.0.1:8786)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise UsageError(f"--dask-address {address!r}: no Dask scheduler answers there ({exc.strerror or exc}); "
                         "start one (`dask scheduler`) or fix the address") from None
