"""Live progress of local runs: workers send tiny UDP datagrams, the launcher prints one status line.

Beam's counters reach the launcher only when the local runner finishes a stage, so they cannot show a
long run's progress. Instead a job's per-image DoFn holds a `ProgressTicker` (just an address; the
socket is made lazily on the worker) that sends "ok failed" at most every half second, and an
estimate of the total is sent once from the index. The launcher's `ProgressMonitor` sums them and
redraws `done, failed, rate, ETA` on stderr. Datagrams are fire-and-forget: a lost one costs a
slightly low count on screen, never the job; with no monitor (cluster runners) tickers do nothing.
"""
from __future__ import annotations

import socket
import sys
import threading
import time
from typing import Optional

import apache_beam as beam

SEND_EVERY_S = 0.5


class ProgressTicker:
    """Counts images done/failed in one DoFn instance and reports them to the monitor's address."""

    def __init__(self, address: Optional[str]):
        self._address = address
        self._sock = None
        self._ok = self._failed = 0
        self._last = 0.0

    def __getstate__(self):
        return {"_address": self._address}

    def __setstate__(self, state):
        self.__init__(state["_address"])

    def tick(self, ok: int = 0, failed: int = 0) -> None:
        if not self._address:
            return
        self._ok += ok
        self._failed += failed
        now = time.monotonic()
        if now - self._last >= SEND_EVERY_S:
            self._last = now
            self.flush()

    def flush(self) -> None:
        if self._address and (self._ok or self._failed):
            self._send(f"n {self._ok} {self._failed}")
            self._ok = self._failed = 0

    def total(self, n: int) -> None:
        if self._address:
            self._send(f"t {int(n)}")

    def _send(self, message: str) -> None:
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            host, port = self._address.rsplit(":", 1)
            self._sock.sendto(message.encode(), (host, int(port)))
        except OSError:
            pass  # progress is best effort


class ReportTotal(beam.PTransform):
    """Estimated images per unit (PCollection of int) -> the monitor learns the total (for the ETA)."""

    def __init__(self, address: Optional[str]):
        super().__init__()
        self._address = address

    def expand(self, estimates):
        address = self._address
        return (estimates
                | "Total" >> beam.CombineGlobally(sum)
                | "Send" >> beam.Map(lambda n: ProgressTicker(address).total(n)))


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressMonitor:
    """Receives the tickers' datagrams and redraws a status line on `stream` (a context manager).

    `address` is None when disabled (no terminal and not forced, or a cluster runner).
    """

    def __init__(self, job: str, enabled: bool, stream=None, every: float = 1.0):
        self.job, self.enabled, self.every = job, enabled, every
        self.stream = stream or sys.stderr
        self.ok = self.failed = 0
        self.total: Optional[int] = None
        self.address: Optional[str] = None
        self._sock = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._start = time.monotonic()
        self._drawn = False

    def __enter__(self) -> "ProgressMonitor":
        if self.enabled:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sock.bind(("127.0.0.1", 0))
            self._sock.settimeout(0.2)
            self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
            self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(2)
            self._sock.settimeout(0.05)
            while self._receive():  # what arrived after the last redraw
                pass
            self._sock.close()
            if self._drawn:
                self.stream.write("\n")
                self.stream.flush()

    def line(self) -> str:
        elapsed = max(1e-9, time.monotonic() - self._start)
        done = self.ok + self.failed
        rate = done / elapsed
        text = f"[{self.job}] {done:,} done, {self.failed:,} failed, {rate:,.1f}/s, {_clock(elapsed)} elapsed"
        if self.total and self.total >= done:
            left = max(0, self.total - done)
            eta = f", ETA {_clock(left / rate)}" if rate > 0 and left else ""
            text += f" (of ~{self.total:,}{eta})"
        return text

    def _receive(self) -> bool:
        """Take one datagram into the counts; False when none came within the socket's timeout."""
        try:
            data, _ = self._sock.recvfrom(256)
        except (socket.timeout, OSError):
            return False
        try:
            kind, *values = data.decode().split()
            if kind == "n":
                self.ok += int(values[0])
                self.failed += int(values[1])
            elif kind == "t":
                self.total = int(values[0])
        except (ValueError, IndexError, UnicodeDecodeError):
            pass
        return True

    def _loop(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            self._receive()
            now = time.monotonic()
            if now - last >= self.every and (self.ok or self.failed):
                last = now
                self.stream.write("\r" + self.line() + "\x1b[K")
                self.stream.flush()
                self._drawn = True
