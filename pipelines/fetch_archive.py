"""imagebeam fetch / imagebeam verify: download one dataset archive resumably and check its md5.

    imagebeam fetch (--url URL | NAME) --output FILE [--md5 HEX] [--size BYTES] [--allow-private-networks]
                    [--timeout S] [--retries N] [--quiet]
    imagebeam verify FILE... [--md5 HEX]

fetch writes FILE.part, resuming an existing one with an HTTP Range request; interrupted transfers
(connection reset, timeout, short body) are retried with backoff, each time from the bytes already on disk.
Then the size and md5 are checked: on success FILE.part is renamed to FILE; on a mismatch FILE.part is
deleted, no FILE is left and the exit status is 1. A FILE already present with the right md5 is not
downloaded again. Only http and https; hosts on loopback/private/link-local addresses are refused unless
--allow-private-networks (cloud metadata addresses always). The output is a local file (the .part is
appended to); `verify` reads any Beam filesystem.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import random
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, TextIO, Tuple
from urllib.parse import urljoin, urlsplit

from imagebeam.transforms.inputs import archives
from imagebeam.transforms.inputs.fetch import REDIRECT_CODES, USER_AGENT, Refused, check_url, open_connection
from imagebeam.runners.checks import OneLineParser

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None

CHUNK = 1 << 20
MAX_REDIRECTS = 10
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".gz", ".zip", ".bz2", ".xz", ".zst", ".7z", ".npz")
LOGIN_HINT = ("ImageNet archives need an image-net.org account: download it with your browser, pass your "
              "session cookie with --header 'Cookie: ...', or give a mirror you can use with --url")


class Failed(Exception):
    """The download cannot succeed (HTTP 4xx, wrong size offered, bad certificate); not retried."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


class Interrupted(Exception):
    """The transfer stopped before its end (short body, reset, timeout, 5xx): retried."""


# --- progress -------------------------------------------------------------------------------------


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A one-line progress bar on `stream`: percent, MB, MB/s, ETA.

    Redrawn at most every `interval` seconds, and only when `stream` is a terminal; otherwise (and always
    at `finish`) a single final line is written. Nothing at all when `quiet`.
    """

    def __init__(self, label: str, total: Optional[int], stream: Optional[TextIO] = None, quiet: bool = False,
                 interval: float = 0.25, start: int = 0):
        self.label, self.total = label, total
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.live = not quiet and _isatty(self.stream)
        self.interval = interval
        self.started = time.monotonic()
        self.base = start          # bytes already there when we started (a resumed .part): not speed
        self.done = start
        self._drawn = 0.0
        self._width = 0

    def restart(self, done: int) -> None:
        """Bytes already present changed (resumed or started over): speed counts from here."""
        self.base = self.done = done
        self.started = time.monotonic()

    def update(self, done: int, total: Optional[int] = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        if self.live:
            now = time.monotonic()
            if now - self._drawn >= self.interval:
                self._drawn = now
                self._draw(self.line(now), end="")

    def finish(self, note: str = "") -> None:
        if self.quiet:
            return
        self._draw(self.line(time.monotonic()) + (f"  {note}" if note else ""), end="\n")

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = (self.done - self.base) / elapsed
        mb = self.done / 1e6
        parts = [self.label]
        if self.total:
            parts.append(f"{100.0 * self.done / self.total:5.1f}%")
            parts.append(f"{mb:,.1f}/{self.total / 1e6:,.1f} MB")
        else:
            parts.append(f"{mb:,.1f} MB")
        parts.append(f"{rate / 1e6:,.1f} MB/s")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        elif self.done and self.done - self.base > 0:
            parts.append(f"in {_clock(elapsed)}")
        return "  ".join(parts)

    def clear_line(self) -> None:
        """Erase a live bar so that a message can be printed; the next update draws it again."""
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
            self._drawn = 0.0

    def _draw(self, text: str, end: str) -> None:
        if self.live:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad + end)
            self._width = 0 if end else len(text)
        else:
            self.stream.write(text + end)
        self.stream.flush()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# --- one download ---------------------------------------------------------------------------------


@dataclass
class Transfer:
    """What `download` knows about the resource and what it did (for messages and tests)."""
    url: str
    expected_size: Optional[int] = None
    total: Optional[int] = None        # the size the server announced
    requests: int = 0
    received: int = 0                  # body bytes received over the network by this run
    resumed_from: List[int] = field(default_factory=list)
    validator: Optional[str] = None    # strong ETag or Last-Modified, sent as If-Range when resuming
    refuse_html: bool = False          # an archive is expected: an HTML page is a login or error page


class Downloader:
    """Streams one URL into an open .part file (append mode), following redirects safely."""

    def __init__(self, timeout: float, allow_private: bool, headers: Dict[str, str]):
        self.timeout = timeout
        self.allow_private = allow_private
        self.headers = headers
        self._tls = ssl.create_default_context()

    def _connection(self, parts) -> http.client.HTTPConnection:
        return open_connection(parts, self.timeout, self.allow_private, self._tls)

    def open(self, transfer: Transfer, have: int):
        """GET the URL (Range from `have` when > 0) after redirects: (connection, response)."""
        url, first = transfer.url, urlsplit(transfer.url)
        for hop in range(MAX_REDIRECTS + 1):
            parts = check_url(url, self.allow_private, hop)
            headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", "Accept": "*/*"}
            same_host = (parts.hostname or "").lower() == (first.hostname or "").lower()
            downgraded = first.scheme.lower() == "https" and parts.scheme.lower() == "http"
            if same_host and not downgraded:
                headers.update(self.headers)  # the user's headers (a cookie) go to the host they were meant for
            if have:
                headers["Range"] = f"bytes={have}-"
                if transfer.validator:
                    headers["If-Range"] = transfer.validator
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn = self._connection(parts)
            try:
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
            except BaseException:
                conn.close()
                raise
            transfer.requests += 1
            location = response.getheader("location")
            if response.status in REDIRECT_CODES and location:
                conn.close()
                url = urljoin(url, location.strip())
                continue
            return conn, response
        raise Failed(f"more than {MAX_REDIRECTS} redirects (the last to {url[:200]})")


def _content_range(value: Optional[str]) -> Tuple[Optional[int], Optional[int]]:
    """(first byte, total) of `bytes A-B/T` or `bytes */T`; None for what is absent or `*`."""
    if not value or not value.strip().lower().startswith("bytes"):
        return None, None
    spec = value.strip()[5:].strip()
    span, _, total = spec.partition("/")
    first = span.split("-", 1)[0].strip()
    return (int(first) if first.isdigit() else None,
            int(total) if total.strip().isdigit() else None)


def _declared_length(response) -> Optional[int]:
    value = response.getheader("content-length")
    return int(value) if value and value.strip().isdigit() else None


def _validator(response) -> Optional[str]:
    etag = response.getheader("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.getheader("last-modified")


def _attempt(dl: Downloader, transfer: Transfer, part, state: "_PartState", progress: Progress) -> None:
    """One request: append the body to `part`; raises Interrupted/Failed, returns when the part is complete."""
    have = state.size
    conn, response = dl.open(transfer, have)
    try:
        code = response.status
        if code == 416 and have:
            _, total = _content_range(response.getheader("content-range"))
            if total is not None and total < have:
                state.truncate(part)  # the part is longer than the file: start over
                raise Interrupted(f"the server's file has {total} bytes, fewer than the {have} in the .part: "
                                  "starting over")
            if (total is not None and total != have) or (transfer.expected_size or have) != have:
                raise Failed(f"the server refuses bytes from {have} (HTTP 416, Content-Range "
                             f"{response.getheader('content-range')!r})", code)
            transfer.total = have
            return  # the part already holds the whole file: the md5 will tell
        if code == 206 and have:
            first, total = _content_range(response.getheader("content-range"))
            if first != have:
                state.truncate(part)
                raise Interrupted(f"asked for bytes from {have}, got Content-Range "
                                  f"{response.getheader('content-range')!r}: starting over")
            transfer.total = total if total is not None else transfer.total
            transfer.resumed_from.append(have)
            length = _declared_length(response)
            end = have + length if length is not None else transfer.total
        elif code == 200:
            transfer.total = _declared_length(response)
            end = transfer.total
        elif code in (408, 429) or code >= 500:
            raise Interrupted(f"HTTP {code} {response.reason}".strip())
        else:
            raise Failed(f"HTTP {code} {response.reason}".strip(), code)
        if transfer.refuse_html and (response.getheader("content-type") or "").lower().startswith("text/html"):
            raise Failed("the server sent an HTML page, not the archive (a login or error page?)", code)
        if transfer.expected_size is not None and transfer.total is not None \
                and transfer.total != transfer.expected_size:
            raise Failed(f"the server offers {transfer.total} bytes, expected {transfer.expected_size} "
                         f"(wrong URL, or a login page?)")
        if code == 200 and have:
            state.truncate(part)  # Range ignored (or the file changed): the body is the whole file
        if transfer.validator is None:
            transfer.validator = _validator(response)
        progress.restart(state.size)
        progress.update(state.size, transfer.total or transfer.expected_size)
        while True:
            chunk = response.read(CHUNK)
            if not chunk:
                break
            state.append(part, chunk)
            transfer.received += len(chunk)
            progress.update(state.size)
        if end is not None and state.size < end:
            raise Interrupted(f"connection closed after {state.size} of {end} bytes")
        if end is not None and state.size > end:
            raise Interrupted(f"the server sent more than the {end} bytes it announced")
    finally:
        conn.close()


class _PartState:
    """Size and running md5 of the .part as written by this process (md5 kept while appends are in order)."""

    def __init__(self, part):
        part.seek(0, os.SEEK_END)
        self.size = part.tell()
        self.digest = None if self.size else hashlib.md5()

    def append(self, part, data: bytes) -> None:
        try:
            part.write(data)
        except OSError as exc:  # disk full, quota: retrying the network would not help
            raise Failed(f"cannot write {part.name}: {exc.strerror or exc}") from exc
        self.size += len(data)
        if self.digest is not None:
            self.digest.update(data)

    def truncate(self, part) -> None:
        part.flush()
        part.truncate(0)
        self.size = 0
        self.digest = hashlib.md5()


def download(url: str, part_path: str, *, expected_size: Optional[int], timeout: float, retries: int,
             backoff: float, allow_private: bool, headers: Dict[str, str], progress: Progress,
             log=None, refuse_html: bool = False) -> Tuple[Transfer, Optional[str]]:
    """Bring `part_path` to the complete file; returns (transfer, md5 if known from streaming, else None).

    `retries` counts consecutive attempts that added nothing to the part: a transfer that keeps making
    progress is resumed as often as it is interrupted.
    """
    say = log or (lambda text: print(text, file=sys.stderr))

    def log(text: str) -> None:
        progress.clear_line()
        say(text)
    dl = Downloader(timeout, allow_private, headers)
    transfer = Transfer(url, expected_size=expected_size, refuse_html=refuse_html)
    with open(part_path, "ab") as part:
        if fcntl is not None:
            try:
                fcntl.flock(part.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise Failed(f"{part_path} is being written by another process") from None
        state = _PartState(part)
        if expected_size is not None and state.size > expected_size:
            log(f"{part_path} has {state.size} bytes, more than the {expected_size} expected: starting over")
            state.truncate(part)
        failures = 0
        while True:
            if expected_size is not None and state.size == expected_size:
                break
            before = state.size
            try:
                _attempt(dl, transfer, part, state, progress)
                break
            except (Interrupted, socket.timeout, TimeoutError, ConnectionError, http.client.HTTPException,
                    ssl.SSLError, OSError) as exc:
                if isinstance(exc, ssl.SSLCertVerificationError):
                    raise Failed(_describe(exc)) from None
                part.flush()
                failures = 0 if state.size > before else failures + 1
                if failures > retries:
                    again = f"; run again to resume from byte {state.size}" if state.size else ""
                    raise Interrupted(f"{_describe(exc)} (gave up after {retries} retries without progress"
                                      f"{again})") from None
                delay = min(30.0, backoff * 2 ** max(0, failures - 1)) * (0.5 + random.random()) \
                    if failures else 0.0
                log(f"{_describe(exc)}; resuming from byte {state.size}"
                    + (f" in {delay:.1f} s" if delay else ""))
                time.sleep(delay)
        part.flush()
        md5 = state.digest.hexdigest() if state.digest is not None else None
    return transfer, md5


def _describe(exc: BaseException) -> str:
    if isinstance(exc, Interrupted):
        return str(exc)
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"timed out ({exc})" if str(exc) else "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- fetch ----------------------------------------------------------------------------------------


def fetch_parser() -> argparse.ArgumentParser:
    names = ", ".join(archives.KNOWN)
    p = OneLineParser(
        prog="imagebeam fetch",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Download one archive resumably (FILE.part, HTTP Range) and check its size and md5.\n\n"
                    f"Known archives (NAME): {names}.\n\n"
                    "ImageNet (ILSVRC2012_*) archives need an image-net.org login. Download them with your\n"
                    "account (browser, or --header 'Cookie: ...' with your session cookie), or from a mirror\n"
                    "you may use: imagebeam fetch ILSVRC2012_img_val --url MIRROR_URL --output DIR.\n"
                    "`imagebeam verify FILE` checks archives you already have.",
        epilog="FILE.part is kept between runs: run the same command again to resume. The output must be a "
               "local path (the .part is appended to). Exit status: 0 OK, 1 failed (wrong md5/size, HTTP "
               "error, refused URL, gave up), 2 usage.")
    p.add_argument("name", nargs="?", metavar="NAME", help="a known archive (table name or file name)")
    p.add_argument("--url", help="URL to download (http/https); with NAME, overrides its URL (a mirror)")
    p.add_argument("--output", required=True, metavar="FILE",
                   help="local file to write, or an existing directory (the file name is NAME's or the URL's)")
    p.add_argument("--md5", metavar="HEX", help="expected md5; NAME supplies one")
    p.add_argument("--size", type=int, metavar="BYTES", help="expected size; NAME may supply one")
    p.add_argument("--allow-private-networks", action="store_true",
                   help="allow hosts on loopback, private and link-local addresses (cloud metadata stays refused)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="seconds to connect and per read (default 30)")
    p.add_argument("--retries", type=int, default=5, metavar="N",
                   help="retries in a row without progress before giving up (default 5); interrupted transfers "
                        "that made progress are always resumed")
    p.add_argument("--backoff", type=float, default=1.0, metavar="S", help="first wait before a retry in seconds (doubles)")
    p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                   help="extra request header, e.g. a login cookie; not sent to other hosts after a redirect")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _resolve(args: argparse.Namespace, p: argparse.ArgumentParser):
    """(url, output file, md5, size, known archive or None)."""
    entry = None
    if args.name:
        entry = archives.known(args.name)
        if entry is None:
            p.error(f"unknown archive {args.name!r}; known: {', '.join(archives.KNOWN)} (or give --url)")
    elif not args.url:
        p.error("give a known archive NAME or --url URL")
    url = args.url or entry.url
    md5 = (args.md5 or (entry.md5 if entry else None))
    if md5 is not None and not archives.is_md5(md5):
        p.error(f"--md5 {args.md5!r} is not 32 hex digits")
    md5 = md5.lower() if md5 else None
    size = args.size if args.size is not None else (entry.size if entry else None)
    if size is not None and size < 0:
        p.error("--size must be >= 0")
    if "://" in args.output:
        p.error(f"--output must be a local path (the .part file is appended to), not {args.output!r}")
    output = os.path.expanduser(args.output)
    if os.path.isdir(output) or output.endswith(os.sep):
        name = entry.file_name if entry else os.path.basename(urlsplit(url).path.rstrip("/"))
        if not name:
            p.error(f"--output {args.output} is a directory and the URL has no file name: give a file")
        output = os.path.join(output, name)
    return url, output, md5, size, entry


def _headers(values: Sequence[str], p: argparse.ArgumentParser) -> Dict[str, str]:
    headers = {}
    for value in values:
        name, sep, text = value.partition(":")
        if not sep or not name.strip() or any(c in value for c in "\r\n"):
            p.error(f"--header {value!r}: expected 'Name: value'")
        headers[name.strip()] = text.strip()
    return headers


def fetch_main(argv: Optional[Sequence[str]] = None) -> int:
    p = fetch_parser()
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.retries < 0 or args.timeout <= 0 or args.backoff < 0:
        p.error("--retries and --backoff must be >= 0, --timeout positive")
    url, output, md5, size, entry = _resolve(args, p)
    headers = _headers(args.header, p)
    err = sys.stderr

    def say(text: str) -> None:
        print(text, file=err, flush=True)

    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)

    if os.path.isfile(output):
        present = os.path.getsize(output)
        if size is not None and present != size:
            say(f"{output} exists with {present} bytes, expected {size}: downloading again")
        elif md5 is None:
            print(f"{output}: already present (md5 not checked: no --md5 given); not downloaded again")
            return 0
        else:
            got = _md5(output, present, f"checking {os.path.basename(output)}", args.quiet)
            if got == md5:
                print(f"{output}: OK (md5 {got}), already present")
                return 0
            say(f"{output} exists but its md5 is {got}, expected {md5}: downloading again")

    part_path = output + ".part"
    progress = Progress(os.path.basename(output), size, quiet=args.quiet)
    try:
        transfer, streamed = download(url, part_path, expected_size=size, timeout=args.timeout,
                                      retries=args.retries, backoff=args.backoff,
                                      allow_private=args.allow_private_networks, headers=headers,
                                      progress=progress, log=say,
                                      refuse_html=output.lower().endswith(ARCHIVE_SUFFIXES))
    except Refused as exc:
        _drop_if_empty(part_path)
        say(f"imagebeam fetch: refused: {exc}")
        return 1
    except (Failed, Interrupted) as exc:
        _drop_if_empty(part_path)
        progress.finish("failed")
        say(f"imagebeam fetch: {url}: {exc}")
        if isinstance(exc, Failed) and exc.status in (401, 403) and (
                (entry is not None and entry.login) or (urlsplit(url).hostname or "").endswith("image-net.org")):
            say(LOGIN_HINT)
        if os.path.exists(part_path):
            say(f"the partial download is kept in {part_path}; run the same command again to resume")
        return 1
    except KeyboardInterrupt:
        say(f"\ninterrupted; {part_path} is kept: run the same command again to resume")
        return 130
    progress.finish()

    got_size = os.path.getsize(part_path)
    if size is not None and got_size != size:
        os.remove(part_path)
        say(f"{output}: FAILED: expected size {size} bytes, got {got_size}; deleted {part_path}")
        return 1
    if streamed is None:  # resumed: the earlier bytes were hashed by no one yet
        streamed = _md5(part_path, got_size, f"checking {os.path.basename(output)}", args.quiet)
    if md5 is not None and streamed != md5:
        os.remove(part_path)
        say(f"{output}: FAILED: expected md5 {md5}, got {streamed}; deleted {part_path}")
        if entry is not None and entry.login and not args.url:
            say(LOGIN_HINT)
        return 1
    os.replace(part_path, output)
    if md5 is None:
        print(f"{output}: saved (md5 {streamed}; not verified: no --md5 given)")
    else:
        print(f"{output}: OK (md5 {streamed})")
    return 0


def _md5(path: str, size: Optional[int], label: str, quiet: bool) -> str:
    progress = Progress(label, size, quiet=quiet)
    digest = archives.md5_of(path, progress.update)
    progress.finish()
    return digest


def _drop_if_empty(path: str) -> None:
    try:
        if os.path.getsize(path) == 0:
            os.remove(path)
    except OSError:
        pass


# --- verify ---------------------------------------------------------------------------------------


def verify_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="imagebeam verify",
        description="Check files' md5 against --md5 or the known-archive table (by file name); "
                    "local paths or any Beam filesystem (gs://, s3://, ...).",
        epilog="Prints 'FILE: OK', 'FILE: FAILED (expected X, got Y)' or 'FILE: no known md5 (md5 is Y)'. "
               "Exit status 1 when any file failed or does not exist; a file with no known md5 is not a "
               "failure.")
    p.add_argument("files", nargs="+", metavar="FILE", help="files to check (local or gs://, s3://, ...)")
    p.add_argument("--md5", metavar="HEX", help="expected md5; only with a single FILE")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def verify_main(argv: Optional[Sequence[str]] = None) -> int:
    p = verify_parser()
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.md5 is not None:
        if len(args.files) != 1:
            p.error("--md5 applies to a single FILE")
        if not archives.is_md5(args.md5):
            p.error(f"--md5 {args.md5!r} is not 32 hex digits")
    bad = 0
    for path in args.files:
        entry = archives.known_by_file_name(path)
        expected = args.md5.lower() if args.md5 else (entry.md5 if entry else None)
        size = archives.file_size(path)
        if size is None:
            print(f"{path}: MISSING (no such file)")
            bad += 1
            continue
        if args.md5 is None and entry is not None and entry.size is not None and size != entry.size:
            print(f"{path}: FAILED (expected size {entry.size} bytes, got {size})")
            bad += 1
            continue
        got = _md5(path, size, f"md5 {os.path.basename(path)}", args.quiet)
        if expected is None:
            print(f"{path}: no known md5 (md5 is {got})")
        elif got == expected:
            print(f"{path}: OK")
        else:
            print(f"{path}: FAILED (expected {expected}, got {got})")
            bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(fetch_main())
