"""A small threaded HTTP/1.1 photo server on 127.0.0.1 for the downloader's tests and benchmarks.

Routes are exact paths (query string ignored) registered with the ``add_*`` methods; every request is
counted and timestamped on arrival, then delayed by ``latency`` seconds before it is answered.
Run ``python -m imagebeam.http_fixture --root DIR`` to serve a directory from a separate process.
"""
from __future__ import annotations

import argparse
import itertools
import mimetypes
import os
import signal
import socket
import sys
import threading
import time
import urllib.parse
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

_QUIET = (ConnectionError, TimeoutError)  # client went away or stalled: not worth a traceback
JPEG_SOI = b"\xff\xd8\xff\xe0"
Step = Tuple[int, bytes, Dict[str, str]]
Route = Callable[["_Handler", bool], None]


class Served(NamedTuple):
    """One response of an ``add_download`` route: the request's Range header, the status and body bytes sent."""
    range: Optional[str]
    status: int
    sent: int
    user_agent: Optional[str]


def _range_start(header: Optional[str]) -> Optional[int]:
    """N of a single ``bytes=N-`` or ``bytes=N-M`` range (the end is ignored), else None."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, _ = header[len("bytes="):].strip().partition("-")
    return int(first) if first.isdigit() else None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024
    allow_reuse_address = True
    fixture: "PhotoServer"

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], _QUIET):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    timeout = 60  # idle keep-alive connections and stalled readers eventually free their thread
    server: _Server

    def log_message(self, format: str, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.fixture._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.fixture._track(self.connection, False)

    def handle(self) -> None:
        try:
            super().handle()
        except _QUIET:
            self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _dispatch(self, head: bool) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)  # keep the connection usable
        fixture = self.server.fixture
        path = urllib.parse.urlsplit(self.path).path
        route = fixture._arrive(path)
        if fixture.latency > 0:
            time.sleep(fixture.latency)
        if route is None:
            self.send(404, b"not found", {}, head)
        else:
            route(self, head)

    def send(self, code: int, body: bytes, headers: Dict[str, str], head: bool,
             content_type: Optional[str] = None) -> None:
        """Send a complete response; Content-Type defaults by status unless given in ``headers``."""
        self.send_response(code)
        if not any(k.lower() == "content-type" for k in headers):
            ctype = content_type or ("image/jpeg" if 200 <= code < 300 else "text/plain")
            self.send_header("Content-Type", ctype)
        for key, value in headers.items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)


class PhotoServer:
    """Threaded HTTP/1.1 server on 127.0.0.1 with scripted routes and per-path request accounting."""

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self._routes: Dict[str, Route] = {}
        self._served: Dict[str, List[Served]] = defaultdict(list)
        self._times: Dict[str, List[float]] = defaultdict(list)
        self._lock = threading.Lock()
        self._conns: set = set()
        self._httpd: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    def _bind(self) -> _Server:
        if self._httpd is None:
            self._httpd = _Server(("127.0.0.1", 0), _Handler)
            self._httpd.fixture = self
        return self._httpd

    def start(self) -> "PhotoServer":
        """Bind a free port (if not yet bound) and serve in a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._bind().serve_forever, kwargs={"poll_interval": 0.05},
                                            name=f"PhotoServer:{self.port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the listening socket and drop open connections."""
        if self._httpd is None:
            return
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
        self._httpd.server_close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd = self._thread = None

    def __enter__(self) -> "PhotoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (binding now if needed, so URLs are known before ``start()``)."""
        return self._bind().server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    def _add(self, path: str, route: Route) -> str:
        path = path if path.startswith("/") else "/" + path
        self._routes[path] = route
        return self.url(path)

    def add_file(self, path: str, data: bytes, content_type: str = "image/jpeg",
                 headers: Optional[Dict[str, str]] = None) -> str:
        """200 with ``data`` and any extra ``headers``."""
        extra = dict(headers or {})
        return self._add(path, lambda h, head: h.send(200, data, extra, head, content_type))

    def add_status(self, path: str, code: int, body: bytes = b"",
                   headers: Optional[Dict[str, str]] = None) -> str:
        """Always ``code`` with ``body``."""
        extra = dict(headers or {})
        return self._add(path, lambda h, head: h.send(code, body, extra, head))

    def add_sequence(self, path: str, steps: List[Step]) -> str:
        """The n-th request (from registration) gets ``steps[min(n, len - 1)]``: ``(code, body, headers)``."""
        if not steps:
            raise ValueError("steps must not be empty")
        steps, counter = list(steps), itertools.count()

        def route(h: _Handler, head: bool) -> None:
            code, body, extra = steps[min(next(counter), len(steps) - 1)]
            h.send(code, body, dict(extra or {}), head)
        return self._add(path, route)

    def add_redirect(self, path: str, location: str, code: int = 302) -> str:
        """Redirect to ``location`` (relative, absolute or any scheme), sent verbatim."""
        return self._add(path, lambda h, head: h.send(code, b"", {"Location": location}, head, "text/plain"))

    def add_slow(self, path: str, delay: float, data: bytes, content_type: str = "image/jpeg") -> str:
        """Sleep ``delay`` seconds before the headers, then serve ``data``."""
        def route(h: _Handler, head: bool) -> None:
            time.sleep(delay)
            h.send(200, data, {}, head, content_type)
        return self._add(path, route)

    def add_endless(self, path: str, chunk: int = 65536, limit: int = 256 << 20,
                    content_type: str = "image/jpeg", announce: bool = False) -> str:
        """A JPEG SOI then zeros up to ``limit`` bytes; without ``announce``: no Content-Length, close-delimited."""
        def route(h: _Handler, head: bool) -> None:
            h.send_response(200)
            h.send_header("Content-Type", content_type)
            if announce:
                h.send_header("Content-Length", str(limit))
            else:
                h.send_header("Connection", "close")
                h.close_connection = True
            h.end_headers()
            if head:
                return
            zeros, sent = bytes(chunk), 0
            while sent < limit:
                piece = ((JPEG_SOI + zeros)[:chunk] if sent == 0 else zeros)[:limit - sent]
                h.wfile.write(piece)
                sent += len(piece)
        return self._add(path, route)

    def add_download(self, path: str, data: bytes, ranges: bool = True, interrupt: int = 0,
                     cut: int = 0, content_type: str = "application/octet-stream",
                     headers: Optional[Dict[str, str]] = None) -> str:
        """A large file. With ``ranges``, ``Range: bytes=N-`` gets 206 + Content-Range from N (416 when N is
        past the end); without, every request gets 200 and the whole file. The first ``interrupt`` requests
        announce the full Content-Length but send only the first ``cut`` bytes of their body, then close the
        connection. Each response is logged for ``served(path)``.
        """
        extra = dict(headers or {})
        counter, key = itertools.count(), path if path.startswith("/") else "/" + path

        def route(h: _Handler, head: bool) -> None:
            number = next(counter)
            asked = h.headers.get("Range")
            start = _range_start(asked) if ranges else None
            code, body, reply = 200, data, dict(extra)
            if start is not None and start >= len(data):
                code, body = 416, b""
                reply["Content-Range"] = f"bytes */{len(data)}"
            elif start is not None:
                code, body = 206, data[start:]
                reply["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            if ranges:
                reply.setdefault("Accept-Ranges", "bytes")
            short = number < interrupt and not head and code != 416
            sent = 0 if head else (min(cut, len(body)) if short else len(body))
            with self._lock:
                self._served[key].append(Served(asked, code, sent, h.headers.get("User-Agent")))
            if not short:
                h.send(code, body, reply, head, content_type if code != 416 else "text/plain")
                return
            h.send_response(code)
            h.send_header("Content-Type", content_type)
            for name, value in reply.items():
                h.send_header(name, str(value))
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body[:sent])
            h.wfile.flush()
            h.close_connection = True  # the client sees the body end early
        return self._add(key, route)

    def served(self, path: str) -> List[Served]:
        """The responses of an ``add_download`` route, in order."""
        with self._lock:
            return list(self._served.get(path if path.startswith("/") else "/" + path, ()))

    def _arrive(self, path: str) -> Optional[Route]:
        now = time.monotonic()
        with self._lock:
            self._times[path].append(now)
        return self._routes.get(path)

    def _track(self, conn: socket.socket, alive: bool) -> None:
        with self._lock:
            (self._conns.add if alive else self._conns.discard)(conn)

    def requests(self, path: str) -> int:
        """Requests received for ``path`` (counted on arrival, before the latency)."""
        with self._lock:
            return len(self._times.get(path, ()))

    def request_times(self, path: str) -> List[float]:
        """``time.monotonic()`` at each request's arrival for ``path``."""
        with self._lock:
            return list(self._times.get(path, ()))

    def total_requests(self) -> int:
        with self._lock:
            return sum(len(t) for t in self._times.values())

    def reset_counts(self) -> None:
        """Forget all counts, times and ``served`` logs (sequences and downloads keep their position)."""
        with self._lock:
            self._times.clear()
            self._served.clear()


def main(argv: Optional[List[str]] = None) -> int:
    """Serve every file under --root at /<relative path> until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="directory whose files are served")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds slept before every response")
    parser.add_argument("--port-file", help="write the port here (atomically) once listening")
    args = parser.parse_args(argv)

    server = PhotoServer(latency=args.latency)
    root = os.path.abspath(args.root)
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            with open(full, "rb") as f:
                server.add_file("/" + urllib.parse.quote(rel), f.read(),
                                content_type=mimetypes.guess_type(name)[0] or "application/octet-stream")

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    with server.start():
        if args.port_file:
            tmp = f"{args.port_file}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(f"{server.port}\n")
            os.replace(tmp, args.port_file)
        while not done.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
