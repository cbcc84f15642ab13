"""What the terminal shows: the job's own lines, not runner internals or TensorFlow's start-up chatter.

`Console` takes over the `imagebeam` process's stderr for the length of a job. Python's `sys.stderr`
(the job's own lines, the progress line, the summary) goes to the terminal, minus TensorFlow's and
Python's start-up warnings, and to a log file. File descriptor 2 itself, which TensorFlow's C++ logging,
absl and the SDK worker processes (they inherit it) write to, goes to the log only: a worker's
traceback reaches the user as the job's short error instead. With `--verbose` nothing is held back. `short_error` turns a failed pipeline into the cause, the step it
happened in and where the full traceback is.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import traceback
from typing import List, Optional, Tuple

# Lines that only say which CPU/GPU features TensorFlow, XLA or absl found while starting up.
CHATTER = re.compile(
    r"^(?:[IWEF]\d{4} [\d:.]+\s+\d+ [\w.\-/]+:\d+\] "          # absl/glog C++ lines (I0000 00:00:...)
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] tensorflow/"   # TF's own C++ logging format
    r"|To enable the following instructions: .*rebuild TensorFlow"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|WARNING:absl:|WARNING:tensorflow:|INFO:tensorflow:"
    r"|(?:WARNING|ERROR):apache_beam\.runners\.portability\.local_job_service:Worker: severity"
    r"|\S+\.py:\d+: \w*Warning: "                              # Python warnings from libraries
    r")")


class Console:
    """Filter and log descriptor 2 until `close()` (a context manager)."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        fd, self.log_path = tempfile.mkstemp(prefix="imagebeam-", suffix=".log")
        self._log = os.fdopen(fd, "wb", buffering=0)
        sys.stderr.flush()
        self._terminal = os.dup(2)
        self._skip_indented = False
        self._lock = threading.Lock()  # before the reader starts: it writes to the log at once
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._reader = threading.Thread(target=self._pump, args=(read_end,), daemon=True)
        self._reader.start()
        self._python_stderr = sys.stderr
        sys.stderr = _TerminalStream(self)

    def _pump(self, read_end: int) -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._line(line + b"\n")
            if pending:
                self._line(pending)

    def _line(self, raw: bytes) -> None:
        """A line written to descriptor 2 (C++ logging, worker processes): the log; the terminal too
        with --verbose."""
        self._to_log(raw)
        if self.verbose:
            self._to_terminal(raw)

    def python_line(self, text: str) -> None:
        """A line of Python's sys.stderr in this process: the log, and the terminal unless chatter."""
        raw = text.encode("utf-8", "replace")
        self._to_log(raw)
        if not self.verbose:
            if self._skip_indented and text.startswith((" ", "\t")):
                return  # the source line a Python warning shows below itself
            self._skip_indented = bool(CHATTER.match(text))
            if self._skip_indented:
                return
        self._to_terminal(raw)

    def _to_log(self, raw: bytes) -> None:
        with self._lock:
            try:
                self._log.write(raw)
            except (OSError, ValueError):
                pass

    def _to_terminal(self, raw: bytes) -> None:
        try:
            os.write(self._terminal, raw)
        except OSError:
            pass

    def configure_logging(self) -> None:
        """The jobs' own INFO lines on the terminal; other libraries' records in the log only (all of
        them with --verbose). Beam logs a failing bundle's traceback at ERROR: that belongs in the log."""
        import logging

        fmt = logging.Formatter("%(levelname)s %(name)s: %(message)s")
        terminal = logging.StreamHandler(sys.stderr)
        terminal.setFormatter(fmt)
        if not self.verbose:
            terminal.addFilter(lambda r: r.name.split(".")[0] == "imagebeam" or r.levelno >= logging.CRITICAL)
        log_only = logging.StreamHandler(_LogWriter(self))
        log_only.setFormatter(fmt)
        log_only.addFilter(lambda r: not terminal.filter(r))
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        root.addHandler(terminal)
        root.addHandler(log_only)
        root.setLevel(logging.INFO)

    def write_log(self, text: str) -> None:
        """Add to the log only (e.g. the full traceback of a failure)."""
        self._to_log(text.encode("utf-8", "replace"))

    def close(self, keep_log: bool) -> Optional[str]:
        """Give stderr back; returns the log's path if kept, else removes it."""
        sys.stderr.flush()
        sys.stderr = self._python_stderr
        os.dup2(self._terminal, 2)  # the pipe's last writer in this process is gone; children may hold it
        self._reader.join(timeout=5)
        os.close(self._terminal)
        self._log.close()
        if keep_log:
            return self.log_path
        os.unlink(self.log_path)
        return None


class _TerminalStream:
    """sys.stderr while a Console is open: whole lines to Console.python_line (progress's carriage
    returns pass straight through)."""

    def __init__(self, console: Console):
        self._console, self._pending = console, ""
        self.encoding, self.errors = "utf-8", "replace"

    def write(self, text: str) -> int:
        self._pending += text
        while True:
            cut = self._pending.find("\n")
            if cut < 0:
                break
            line, self._pending = self._pending[:cut + 1], self._pending[cut + 1:]
            self._console.python_line(line)
        if "\r" in self._pending:  # a live progress line, redrawn in place
            self._console._to_terminal(self._pending.encode("utf-8", "replace"))
            self._pending = ""
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._console.python_line(self._pending)
            self._pending = ""

    def close(self) -> None:  # logging's handlers close their stream at exit: the terminal stays open
        self.flush()

    def isatty(self) -> bool:
        return os.isatty(self._console._terminal)

    def fileno(self) -> int:
        return 2


class _LogWriter:
    """A text stream that writes into the Console's log file only."""

    def __init__(self, console: Console):
        self._console = console

    def write(self, text: str) -> int:
        self._console.write_log(text)
        return len(text)

    def flush(self) -> None:
        pass


_STEP = re.compile(r"while running '([^']+)'")
_ERROR_LINE = re.compile(r"^\s*((?:[A-Za-z_][\w]*\.)*[A-Z]\w*(?:Error|Exception|Exit|Refused|Failure|Mismatch)):\s?(.*)$")
_WRAPPERS = ("RuntimeError", "Exception")


def failure_parts(exc: BaseException) -> Tuple[str, Optional[str]]:
    """(the cause as `Type: message`, the pipeline step or None) of a failed job.

    A pipeline's error arrives wrapped: in-process as a chain of exceptions, from SDK workers as one
    RuntimeError whose text holds the worker's traceback. The cause is the innermost exception line
    that is not such a wrapper; the step is the last `[while running 'Step']` Beam names.
    """
    chain: List[BaseException] = []
    seen = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = "\n".join(f"{type(x).__name__}: {x}" for x in chain)
    steps = _STEP.findall(text)
    step = steps[-1] if steps else None
    candidates = []
    for line in text.splitlines():
        m = _ERROR_LINE.match(line)
        if m:
            kind, message = m.group(1), _STEP.sub("", m.group(2)).strip().rstrip("[] ").strip()
            candidates.append((kind.rsplit(".", 1)[-1], message))
    specific = [c for c in candidates if c[0] not in _WRAPPERS and c[1]]
    kind, message = (specific or candidates or [(type(exc).__name__, str(exc))])[-1]
    first = message.splitlines()[0] if message else ""
    return f"{kind}: {first}".strip().rstrip(":"), step


def short_error(job: str, exc: BaseException, log_path: Optional[str]) -> str:
    """Three lines at most: what failed, in which step, and where the whole story is."""
    cause, step = failure_parts(exc)
    where = f" in step '{step}'" if step else ""
    tail = (f"the full traceback is in {log_path} (or run again with --verbose)" if log_path
            else "run again with --verbose for the full traceback")
    if len(cause) > 300:
        cause = cause[:297] + "..."
    return f"imagebeam {job}: failed{where}\n  {cause}\n  {tail}"


def full_traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def keep_log_with_output(log_path: str, output: Optional[str], job: str) -> str:
    """Move the log next to the outputs (a local output folder that exists), else leave it in /tmp."""
    if output and "://" not in output and os.path.isdir(output):
        dest = os.path.join(output, f"imagebeam-{job}-error.log")
        try:
            os.replace(log_path, dest)
            return dest
        except OSError:
            try:
                with open(log_path, "rb") as src, open(dest, "wb") as out:
                    out.write(src.read())
                os.unlink(log_path)
                return dest
            except OSError:
                pass
    return log_path
