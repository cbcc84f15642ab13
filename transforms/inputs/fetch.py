"""Fetching one URL politely and safely: retries, per-host limits, redirects re-checked, size caps.

Pure Python on `http.client` (no Beam here): a `Fetcher` is shared by the threads of one worker and keeps
one keep-alive connection per host and thread. What it guarantees, per URL:
- only http and https, on every hop of a redirect chain (anything else is `blocked`);
- the host's addresses are checked *before* connecting, and the socket connects to the checked address
  (no second DNS lookup to rebind): loopback, private, link-local, multicast, reserved and cloud metadata
  addresses are refused unless `allow_private_networks` (metadata endpoints are refused always);
- `timeout` bounds connecting and every read, `deadline` the whole response;
- timeouts, connection errors, 429 and 5xx are retried with exponential backoff and jitter; `Retry-After`
  is honoured and holds back every request to that host;
- at most `per_host` requests to one host at a time;
- bodies over `max_bytes` are abandoned as soon as that is known;
- `X-Robots-Tag: noai` / `noimageai` responses are refused unless `respect_robots_tag` is off.
"""
from __future__ import annotations

import email.utils
import http.client
import ipaddress
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Optional, Tuple
from urllib.parse import urljoin, urlsplit

from imagebeam import __version__

USER_AGENT = (f"imagebeam/{__version__} (image dataset downloader; "
              "+https://github.com/imagebeam/imagebeam; honours X-Robots-Tag noai)")

REDIRECT_CODES = (301, 302, 303, 307, 308)
ROBOTS_DIRECTIVES = frozenset({"noai", "noimageai"})
# Instance metadata services: never an image source, refused even with allow_private_networks.
METADATA_ADDRESSES = frozenset({"169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200"})

# Manifest statuses besides "ok" and "http_NNN".
TRANSIENT = ("timeout", "connection")
PERMANENT = ("not_image", "too_large", "too_small", "placeholder", "duplicate", "blocked", "robots")


def is_transient(status: str) -> bool:
    """Worth retrying on a later run: timeouts, connection errors, 429 and 5xx."""
    return status in TRANSIENT or status == "http_429" or (status.startswith("http_5") and len(status) == 8)


@dataclass(frozen=True)
class FetchConfig:
    """Network and safety settings; immutable and picklable (it travels to every worker)."""
    timeout: float = 10.0
    deadline: float = 60.0
    retries: int = 3
    backoff: float = 1.0
    max_backoff: float = 30.0
    max_retry_after: float = 120.0
    per_host: int = 16
    threads: int = 128
    max_bytes: int = 32 << 20
    max_redirects: int = 5
    min_size: int = 10
    max_pixels: int = 2 * 89_478_485
    placeholders: FrozenSet[str] = field(default_factory=frozenset)
    allow_private_networks: bool = False
    respect_robots_tag: bool = True
    user_agent: str = USER_AGENT


class Refused(Exception):
    """A URL we will not fetch (`status` blocked or robots); the message is the reason."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status


class TooLarge(Exception):
    pass


class Unresolvable(ConnectionError):
    """The host name does not resolve."""


@dataclass
class Fetched:
    """The outcome of fetching one URL (after redirects and retries)."""
    status: str                      # ok | http_NNN | timeout | connection | too_large | blocked | robots
    reason: str = ""
    data: Optional[bytes] = None
    final_url: str = ""
    content_type: str = ""
    attempts: int = 0
    throttled: float = 0.0           # seconds spent waiting: host limit, Retry-After, backoff
    retry_delay: Optional[float] = None  # set by an attempt: None = back off, inf = do not retry


def refused_address(address: str, allow_private: bool) -> Optional[str]:
    """Why a peer address is refused, or None when it may be contacted."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if str(ip) in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if allow_private:
        return None
    allow = " (--allow-private-networks allows it)"
    for kind in ("loopback", "link_local", "private", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address{allow}"
    if not ip.is_global:
        return f"not a public address{allow}"
    return None


def robots_refusal(values) -> Optional[str]:
    """The X-Robots-Tag directive that forbids AI use of the image, if any applies to us.

    Directives may be addressed to one crawler (`otherbot: noai`); those for other crawlers are ignored.
    """
    for value in values:
        scope, _, rest = value.partition(":")
        if rest and " " not in scope.strip() and scope.strip().lower() not in ("unavailable_after",
                                                                             "max-image-preview",
                                                                             "max-snippet",
                                                                             "max-video-preview"):
            if scope.strip().lower() not in ("imagebeam", "*"):
                continue
            value = rest
        for directive in value.split(","):
            if directive.strip().lower() in ROBOTS_DIRECTIVES:
                return f"X-Robots-Tag: {directive.strip()}"
    return None


def retry_after_seconds(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Retry-After as seconds from now (delta-seconds or an HTTP date); None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _HostGate:
    """At most `limit` concurrent requests to one host, and nothing before `not_before` (Retry-After)."""

    def __init__(self, limit: int):
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self.not_before = 0.0

    def enter(self) -> float:
        start = time.monotonic()
        self._slots.acquire()
        while True:
            with self._lock:
                wait = self.not_before - time.monotonic()
            if wait <= 0:
                return time.monotonic() - start
            time.sleep(wait)

    def leave(self) -> None:
        self._slots.release()

    def hold_until(self, until: float) -> None:
        with self._lock:
            self.not_before = max(self.not_before, until)


def check_url(url: str, allow_private: bool, hop: int = 0):
    """The URL's parts if it may be fetched: http(s), a host, and (for an IP literal) an allowed address.

    Host names are judged later, on every address they resolve to (`guarded_connector`). Raises Refused.
    """
    parts = urlsplit(url)
    where = "" if hop == 0 else f" (redirected to {url[:200]})"
    if not parts.scheme and not parts.netloc:
        raise Refused("blocked", f"not a URL: {url[:200]!r}")
    if parts.scheme.lower() not in ("http", "https"):
        raise Refused("blocked", f"only http and https are fetched, not {parts.scheme or 'no scheme'!r}{where}")
    if not parts.hostname:
        raise Refused("blocked", f"no host in URL {url[:200]!r}")
    host = parts.hostname.split("%", 1)[0]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return parts  # a name: checked on every address it resolves to, when connecting
    reason = refused_address(host, allow_private)
    if reason:
        raise Refused("blocked", f"{parts.hostname} is {reason}{where}")
    return parts


def open_connection(parts, timeout: float, allow_private: bool, tls: Optional[ssl.SSLContext] = None):
    """An unconnected http.client connection whose socket only ever reaches checked addresses."""
    if parts.scheme.lower() == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                           context=tls or ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    conn._create_connection = guarded_connector(allow_private)
    return conn


def guarded_connector(allow_private: bool):
    """`socket.create_connection` that checks every address of the host first, then connects to one."""

    def create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **_):
        host, port = address
        try:
            infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise Unresolvable(f"cannot resolve {host}: {exc.strerror or exc}") from None
        for info in infos:
            reason = refused_address(info[4][0], allow_private)
            if reason:
                raise Refused("blocked", f"{host} resolves to {info[4][0]}, {reason}")
        error: Optional[OSError] = None
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as exc:
                error = exc
                sock.close()
        raise error if error else ConnectionError(f"no address for {host}")

    return create_connection


class Fetcher:
    """Fetches URLs for the threads of one worker; thread-safe."""

    def __init__(self, config: FetchConfig):
        self.config = config
        self._gates: Dict[str, _HostGate] = {}
        self._gates_lock = threading.Lock()
        self._local = threading.local()
        self._tls = ssl.create_default_context()

    # --- public ---------------------------------------------------------------------------------

    def fetch(self, url: str) -> Fetched:
        cfg = self.config
        result = Fetched("connection", final_url=url)
        for attempt in range(cfg.retries + 1):
            result.attempts = attempt + 1
            delay = self._attempt(url, result)
            if delay is None or attempt == cfg.retries:
                break
            result.throttled += delay
            time.sleep(delay)
        return result

    def close(self) -> None:
        for conn in getattr(self._local, "conns", {}).values():
            conn.close()
        self._local.conns = {}

    # --- one attempt ----------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        base = min(self.config.max_backoff, self.config.backoff * (2 ** (attempt - 1)))
        return base * (0.5 + random.random())

    def _attempt(self, url: str, result: Fetched) -> Optional[float]:
        """Fill `result`; return the delay before retrying, or None when done (success or permanent)."""
        try:
            self._follow(url, result)
        except Refused as exc:
            result.status, result.reason = exc.status, str(exc)
            return None
        except TooLarge as exc:
            result.status, result.reason = "too_large", str(exc)
            return None
        except (socket.timeout, TimeoutError) as exc:
            result.status, result.reason = "timeout", f"no response within {self.config.timeout:g} s ({exc})"
            return self._backoff(result.attempts)
        except Unresolvable as exc:  # a dead domain: retried by a later run, not now
            result.status, result.reason = "connection", str(exc)
            return None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            result.status = "connection"
            result.reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
            return self._backoff(result.attempts)
        if result.status == "ok" or not is_transient(result.status) or result.retry_delay == float("inf"):
            return None
        return result.retry_delay if result.retry_delay is not None else self._backoff(result.attempts)

    def _follow(self, url: str, result: Fetched) -> None:
        cfg = self.config
        result.retry_delay = None
        for hop in range(cfg.max_redirects + 1):
            parts = check_url(url, cfg.allow_private_networks, hop)
            gate = self._gate(parts.hostname.lower())
            result.throttled += gate.enter()
            try:  # the host's slot is held until the body is read
                result.final_url = url
                location = self._exchange(parts, gate, result)
            finally:
                gate.leave()
            if location is None:
                return
            url = urljoin(url, location)
        result.reason = f"more than {cfg.max_redirects} redirects (the last to {url[:200]})"

    def _exchange(self, parts, gate: "_HostGate", result: Fetched) -> Optional[str]:
        """One request: fills `result`, or returns the Location to follow."""
        cfg = self.config
        code, headers, body = self._request(parts, time.monotonic())
        if code in REDIRECT_CODES and headers.get("location"):
            body(discard=True)
            result.status = f"http_{code}"
            return headers["location"].strip()
        if code == 200:
            refusal = robots_refusal(headers.get_all("x-robots-tag") or []) if cfg.respect_robots_tag else None
            if refusal:
                body(discard=True)
                raise Refused("robots", f"the server forbids AI use: {refusal} (--ignore-robots-tag overrides it)")
            result.data = body()
            result.status, result.reason = "ok", ""
            result.content_type = headers.get("content-type", "")
            return None
        body(discard=True)
        result.status = f"http_{code}"
        result.reason = f"HTTP {code} {http.client.responses.get(code, '')}".strip()
        after = retry_after_seconds(headers.get("retry-after")) if code in (429, 503) else None
        if after is not None:
            if after > cfg.max_retry_after:
                result.reason += f" (Retry-After {after:g} s exceeds --max-retry-after {cfg.max_retry_after:g})"
                result.retry_delay = float("inf")
            else:
                gate.hold_until(time.monotonic() + after)  # every request to this host waits
                result.reason += f" (Retry-After {after:g} s)"
                result.retry_delay = 0.0
        return None

    def _gate(self, host: str) -> _HostGate:
        with self._gates_lock:
            gate = self._gates.get(host)
            if gate is None:
                gate = self._gates[host] = _HostGate(self.config.per_host)
            return gate

    def _connection(self, parts) -> Tuple[Tuple, http.client.HTTPConnection]:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        scheme = parts.scheme.lower()
        key = (scheme, parts.hostname.lower(), parts.port)
        conn = conns.get(key)
        if conn is None:
            conn = conns[key] = open_connection(parts, self.config.timeout, self.config.allow_private_networks,
                                                self._tls)
        return key, conn

    def _request(self, parts, started: float):
        """GET one URL (no redirects followed); returns (code, headers, body reader)."""
        cfg = self.config
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        key, conn = self._connection(parts)
        headers = {"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity"}
        for attempt in (0, 1):
            try:
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A kept-alive connection the server had closed: once more on a fresh one.
                conn.close()
                if attempt:
                    raise
            except BaseException:
                conn.close()
                raise

        def body(discard: bool = False) -> Optional[bytes]:
            try:
                return self._read_body(response, discard, started)
            except BaseException:
                conn.close()
                raise
            finally:
                if response.will_close:
                    conn.close()

        return response.status, response.headers, body

    def _read_body(self, response: http.client.HTTPResponse, discard: bool, started: float) -> Optional[bytes]:
        cfg = self.config
        limit = 1 << 16 if discard else cfg.max_bytes
        declared = response.getheader("content-length")
        if declared and declared.strip().isdigit() and int(declared) > limit:
            response.close()
            if discard:
                return None
            raise TooLarge(f"Content-Length {int(declared)} exceeds --max-bytes {cfg.max_bytes}")
        chunks, total = [], 0
        while True:
            chunk = response.read(min(1 << 16, limit + 1 - total))
            if not chunk:
                break
            total += len(chunk)
            if total > limit:
                response.close()
                if discard:
                    return None
                raise TooLarge(f"body exceeds --max-bytes {cfg.max_bytes}")
            if time.monotonic() - started > cfg.deadline:
                response.close()
                raise TimeoutError(f"response not complete within --deadline {cfg.deadline:g} s")
            if not discard:
                chunks.append(chunk)
        return None if discard else b"".join(chunks)
