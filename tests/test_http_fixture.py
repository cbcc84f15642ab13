"""imagebeam.http_fixture: each route type, keep-alive, accounting, concurrency and the -m entry point."""
import http.client
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from imagebeam.http_fixture import JPEG_SOI, PhotoServer

JPEG = JPEG_SOI + bytes(range(256)) * 40 + b"\xff\xd9"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def server():
    with PhotoServer() as srv:
        yield srv


def _conn(srv, timeout=5.0):
    return http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)


def _get(srv, path, method="GET"):
    """(status, headers, body) of one request on a fresh connection; redirects are not followed."""
    conn = _conn(srv)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def test_urls_and_lifecycle():
    srv = PhotoServer()
    url = srv.add_file("/a.jpg", JPEG)  # URLs are known before start(): the port is bound on demand
    assert url == f"http://127.0.0.1:{srv.port}/a.jpg" == srv.url("a.jpg")
    assert srv.base_url == f"http://127.0.0.1:{srv.port}"
    with srv:
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.read() == JPEG
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)
    PhotoServer().stop()  # never started: a no-op


def test_file_body_and_headers(server):
    url = server.add_file("/img/cat.jpg", JPEG, headers={"X-Robots-Tag": "noai"})
    png = server.add_file("/img/dog.png", b"\x89PNG\r\n\x1a\n" + b"x" * 100, content_type="image/png")
    with urllib.request.urlopen(url + "?size=large", timeout=5) as resp:
        assert resp.status == 200
        assert resp.read() == JPEG
        assert resp.headers["Content-Type"] == "image/jpeg"
        assert resp.headers["Content-Length"] == str(len(JPEG))
        assert resp.headers["X-Robots-Tag"] == "noai"
    with urllib.request.urlopen(png, timeout=5) as resp:
        assert resp.headers["Content-Type"] == "image/png"
        assert resp.read().startswith(b"\x89PNG")
    status, headers, body = _get(server, "/img/cat.jpg", "HEAD")
    assert (status, headers["Content-Length"], body) == (200, str(len(JPEG)), b"")


def test_status_and_unknown(server):
    url = server.add_status("/gone.jpg", 410, b"gone", {"X-Why": "deleted"})
    for _ in range(2):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=5)
        assert err.value.code == 410
        assert err.value.read() == b"gone"
        assert err.value.headers["X-Why"] == "deleted"
    status, _, body = _get(server, "/nope.jpg")
    assert status == 404 and body
    assert server.requests("/nope.jpg") == 1


def test_sequence_steps_in_order(server):
    server.add_sequence("/flaky.jpg", [(500, b"oops", {}), (200, JPEG, {})])
    server.add_sequence("/limited.jpg", [(429, b"", {"Retry-After": "1"}), (503, b"", {"Retry-After": "2"}),
                                         (200, JPEG, {"X-Step": "last"})])
    assert [_get(server, "/flaky.jpg")[0] for _ in range(3)] == [500, 200, 200]
    assert _get(server, "/flaky.jpg")[2] == JPEG
    got = [_get(server, "/limited.jpg") for _ in range(4)]
    assert [s for s, _, _ in got] == [429, 503, 200, 200]
    assert [h["Retry-After"] for _, h, _ in got[:2]] == ["1", "2"]
    assert got[2][1]["X-Step"] == "last" and got[2][1]["Content-Type"] == "image/jpeg"
    assert got[3][2] == JPEG


@pytest.mark.parametrize("location, code", [
    ("/img/target.jpg", 302), ("http://example.invalid/x.jpg", 301), ("file:///etc/passwd", 302),
    ("../other.jpg", 307),
])
def test_redirect_location(server, location, code):
    server.add_redirect("/r", location, code=code)
    status, headers, body = _get(server, "/r")
    assert (status, headers["Location"], body) == (code, location, b"")


def test_redirect_followed_by_urllib(server):
    target = server.add_file("/target.jpg", JPEG)
    server.add_redirect("/hop.jpg", "/target.jpg")
    with urllib.request.urlopen(server.url("/hop.jpg"), timeout=5) as resp:
        assert resp.geturl() == target and resp.read() == JPEG


def test_slow_route_exceeds_client_timeout(server):
    server.add_slow("/slow.jpg", 1.0, JPEG)
    conn = _conn(server, timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises((socket.timeout, TimeoutError)):
        conn.request("GET", "/slow.jpg")
        conn.getresponse()
    conn.close()
    assert time.monotonic() - t0 < 0.9
    assert server.requests("/slow.jpg") == 1


def test_endless_without_length_streams_until_client_leaves(server):
    server.add_endless("/huge.jpg")
    server.add_file("/ok.jpg", JPEG)
    conn = _conn(server)
    conn.request("GET", "/huge.jpg")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.headers["Content-Length"] is None
    assert resp.headers["Connection"] == "close"
    head = resp.read(4)
    assert head == JPEG_SOI
    got = len(head)
    while got <= 1 << 20:
        piece = resp.read(65536)
        assert piece and piece.count(0) == len(piece)
        got += len(piece)
    conn.close()
    assert _get(server, "/ok.jpg")[2] == JPEG  # the server shrugs off the dropped connection


def test_endless_limit_and_announce(server):
    server.add_endless("/small.jpg", chunk=1000, limit=10_000)
    body = _get(server, "/small.jpg")[2]
    assert len(body) == 10_000 and body.startswith(JPEG_SOI) and body[4:] == bytes(9_996)
    server.add_endless("/announced.jpg", announce=True)
    conn = _conn(server)
    conn.request("GET", "/announced.jpg")
    resp = conn.getresponse()
    assert resp.headers["Content-Length"] == str(256 << 20)
    assert resp.read(100_000)[:4] == JPEG_SOI
    conn.close()


def test_counts_and_times(server):
    server.add_file("/a.jpg", JPEG)
    server.add_status("/b.jpg", 500)
    t0 = time.monotonic()
    for path in ("/a.jpg", "/a.jpg?x=1", "/b.jpg", "/missing"):
        _get(server, path)
    t1 = time.monotonic()
    assert server.requests("/a.jpg") == 2 and server.requests("/b.jpg") == 1
    assert server.requests("/never") == 0 and server.request_times("/never") == []
    times = server.request_times("/a.jpg")
    assert len(times) == 2 and t0 <= times[0] <= times[1] <= t1
    assert server.total_requests() == 4
    server.reset_counts()
    assert server.total_requests() == 0 and server.requests("/a.jpg") == 0


def test_counted_on_arrival_before_latency():
    with PhotoServer(latency=0.3) as srv:
        srv.add_file("/a.jpg", JPEG)
        t0 = time.monotonic()
        assert _get(srv, "/a.jpg")[2] == JPEG
        elapsed = time.monotonic() - t0
        assert elapsed >= 0.3
        assert srv.request_times("/a.jpg")[0] - t0 < elapsed - 0.25


def test_keep_alive_reuses_connection(server):
    server.add_file("/a.jpg", JPEG)
    server.add_status("/missing.jpg", 404, b"no")
    conn = _conn(server)
    try:
        conn.request("GET", "/a.jpg")
        resp = conn.getresponse()
        assert resp.read() == JPEG and not resp.will_close
        sock = conn.sock
        for path in ("/missing.jpg", "/a.jpg"):
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            assert conn.sock is sock  # same TCP connection
        assert resp.status == 200
    finally:
        conn.close()
    assert server.total_requests() == 3


def test_concurrent_requests_with_latency():
    with PhotoServer(latency=0.1) as srv:
        url = srv.add_file("/a.jpg", JPEG)

        def fetch(_):
            with urllib.request.urlopen(url, timeout=10) as resp:
                return resp.status, resp.read()

        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(fetch, range(50)))
        assert results == [(200, JPEG)] * 50
        assert srv.requests("/a.jpg") == 50


def test_module_entry_point_serves_a_directory(tmp_path):
    root = tmp_path / "root"
    (root / "cls").mkdir(parents=True)
    (root / "cls" / "a.jpg").write_bytes(JPEG)
    (root / "b c.png").write_bytes(b"\x89PNG-ish")
    (root / "notes.zzz").write_bytes(b"?")
    port_file = tmp_path / "port"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagebeam.http_fixture", "--root", str(root), "--latency", "0.01",
         "--port-file", str(port_file)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while not port_file.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "port file never appeared"
            time.sleep(0.02)
        base = f"http://127.0.0.1:{int(port_file.read_text())}"
        with urllib.request.urlopen(base + "/cls/a.jpg", timeout=5) as resp:
            assert resp.read() == JPEG and resp.headers["Content-Type"] == "image/jpeg"
        with urllib.request.urlopen(base + "/b%20c.png", timeout=5) as resp:
            assert resp.read() == b"\x89PNG-ish" and resp.headers["Content-Type"] == "image/png"
        with urllib.request.urlopen(base + "/notes.zzz", timeout=5) as resp:
            assert resp.headers["Content-Type"] == "application/octet-stream"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/nope.jpg", timeout=5)
        assert err.value.code == 404
    finally:
        proc.terminate()
        _, err_out = proc.communicate(timeout=10)
    assert proc.returncode == 0, err_out
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
