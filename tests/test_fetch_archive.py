"""imagebeam fetch / verify against a real PhotoServer on 127.0.0.1: resume, retries, md5, safety."""
import hashlib
import http.client
import io
import os
import random

import pytest

from imagebeam.http_fixture import PhotoServer
from imagebeam.pipelines import fetch_archive
from imagebeam.pipelines.fetch_archive import Progress, fetch_main, verify_main
from imagebeam.transforms.inputs import archives

DATA = random.Random(20240501).randbytes(3 << 20)  # 3 MiB, deterministic
MD5 = hashlib.md5(DATA).hexdigest()
WRONG = "0" * 32
LOCAL = ["--allow-private-networks", "--backoff", "0", "--timeout", "10"]


@pytest.fixture
def server():
    with PhotoServer() as srv:
        yield srv


def _fetch(*argv):
    return fetch_main([*argv, *LOCAL])


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_fixture_download_route(server):
    server.add_download("/d.bin", DATA[:1000], headers={"ETag": '"v1"'})
    server.add_download("/plain.bin", DATA[:1000], ranges=False)
    server.add_download("/cut.bin", DATA[:1000], interrupt=1, cut=100)

    def get(path, headers=None, method="GET"):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            conn.request(method, path, headers=headers or {})
            resp = conn.getresponse()
            body = resp.read(2000) if method == "GET" else b""
            return resp.status, resp.headers, body
        finally:
            conn.close()

    status, headers, body = get("/d.bin", {"Range": "bytes=990-"})
    assert (status, headers["Content-Range"], headers["Content-Length"], body) == \
        (206, "bytes 990-999/1000", "10", DATA[990:1000])
    assert headers["ETag"] == '"v1"' and headers["Accept-Ranges"] == "bytes"
    status, headers, body = get("/d.bin", {"Range": "bytes=1000-"})
    assert (status, headers["Content-Range"]) == (416, "bytes */1000")
    assert get("/d.bin")[0::2] == (200, DATA[:1000])
    assert get("/d.bin", method="HEAD")[:1] == (200,)
    assert get("/plain.bin", {"Range": "bytes=10-"})[0::2] == (200, DATA[:1000])
    status, headers, body = get("/cut.bin")  # full length announced, 100 bytes sent, connection closed
    assert (status, headers["Content-Length"], body) == (200, "1000", DATA[:100])
    assert get("/cut.bin")[0::2] == (200, DATA[:1000])
    assert [(s.range, s.status, s.sent) for s in server.served("/d.bin")] == \
        [("bytes=990-", 206, 10), ("bytes=1000-", 416, 0), (None, 200, 1000), (None, 200, 0)]
    assert [s.sent for s in server.served("/cut.bin")] == [100, 1000]
    server.reset_counts()
    assert server.served("/d.bin") == [] and server.requests("/d.bin") == 0


def test_clean_download(server, tmp_path, capsys):
    url = server.add_download("/data.bin", DATA)
    out = str(tmp_path / "sub" / "data.bin")
    assert _fetch("--url", url, "--output", out, "--md5", MD5, "--size", str(len(DATA))) == 0
    assert _read(out) == DATA
    assert not os.path.exists(out + ".part")
    assert f"{out}: OK (md5 {MD5})" in capsys.readouterr().out
    served = server.served("/data.bin")
    assert [(s.range, s.status, s.sent) for s in served] == [(None, 200, len(DATA))]
    assert served[0].user_agent.startswith("imagebeam/")


def test_interrupted_transfer_is_resumed_by_the_builtin_retry(server, tmp_path, capsys):
    cut = 1 << 20
    url = server.add_download("/data.bin", DATA, interrupt=1, cut=cut)
    out = str(tmp_path / "data.bin")
    assert _fetch("--url", url, "--output", out, "--md5", MD5) == 0
    assert _read(out) == DATA
    served = server.served("/data.bin")
    assert [(s.range, s.status) for s in served] == [(None, 200), (f"bytes={cut}-", 206)]
    assert sum(s.sent for s in served) == len(DATA) < 2 * len(DATA)
    assert f"resuming from byte {cut}" in capsys.readouterr().err


def test_killed_run_then_rerun_resumes(server, tmp_path, monkeypatch, capsys):
    url = server.add_download("/data.bin", DATA)
    out = str(tmp_path / "data.bin")
    update = Progress.update

    def ctrl_c(self, done, total=None):  # the user stops the first run once some bytes are on disk
        update(self, done, total)
        if done:
            raise KeyboardInterrupt
    monkeypatch.setattr(Progress, "update", ctrl_c)
    assert _fetch("--url", url, "--output", out, "--md5", MD5) == 130
    monkeypatch.setattr(Progress, "update", update)
    assert not os.path.exists(out)
    have = os.path.getsize(out + ".part")
    assert 0 < have < len(DATA)
    assert "run the same command again to resume" in capsys.readouterr().err
    assert _fetch("--url", url, "--output", out, "--md5", MD5) == 0
    assert _read(out) == DATA and not os.path.exists(out + ".part")
    served = server.served("/data.bin")
    assert served[-1].range == f"bytes={have}-" and served[-1].status == 206
    assert served[-1].sent == len(DATA) - have


def test_partial_run_that_gives_up_keeps_the_part(server, tmp_path, monkeypatch, capsys):
    first = PhotoServer().start()
    try:  # a server that cuts the transfer, then is gone: the retry makes no progress
        url = first.add_download("/data.bin", DATA, interrupt=1, cut=1_000_003)
        out = str(tmp_path / "data.bin")
        real, calls = fetch_archive._attempt, []

        def attempt(*args):
            calls.append(1)
            if len(calls) > 1:
                first.stop()
            return real(*args)
        monkeypatch.setattr(fetch_archive, "_attempt", attempt)
        assert _fetch("--url", url, "--output", out, "--md5", MD5, "--retries", "1") == 1
        monkeypatch.setattr(fetch_archive, "_attempt", real)
        assert len(calls) == 3  # the cut transfer, then two attempts without progress
    finally:
        first.stop()
    assert not os.path.exists(out) and os.path.getsize(out + ".part") == 1_000_003
    assert "run the same command again to resume" in capsys.readouterr().err
    # the same archive from another server (a mirror) continues the part
    mirror = server.add_download("/mirror.bin", DATA)
    assert _fetch("--url", mirror, "--output", out, "--md5", MD5) == 0
    assert _read(out) == DATA
    assert [(s.range, s.status) for s in server.served("/mirror.bin")] == [("bytes=1000003-", 206)]


def test_several_interruptions_keep_resuming(server, tmp_path):
    url = server.add_download("/data.bin", DATA, interrupt=3, cut=700_000)
    out = str(tmp_path / "data.bin")
    # --retries 0: every attempt made progress, so none counts against the limit
    assert _fetch("--url", url, "--output", out, "--md5", MD5, "--retries", "0") == 0
    assert _read(out) == DATA
    assert [s.range for s in server.served("/data.bin")] == [None, "bytes=700000-", "bytes=1400000-",
                                                            "bytes=2100000-"]


def test_wrong_md5_deletes_everything(server, tmp_path, capsys):
    url = server.add_download("/data.bin", DATA)
    out = str(tmp_path / "data.bin")
    assert _fetch("--url", url, "--output", out, "--md5", WRONG) == 1
    assert not os.path.exists(out) and not os.path.exists(out + ".part")
    err = capsys.readouterr().err
    assert f"expected md5 {WRONG}, got {MD5}" in err


def test_wrong_size_is_refused_before_downloading(server, tmp_path, capsys):
    url = server.add_download("/data.bin", DATA)
    out = str(tmp_path / "data.bin")
    assert _fetch("--url", url, "--output", out, "--md5", MD5, "--size", str(len(DATA) + 1)) == 1
    assert not os.path.exists(out) and not os.path.exists(out + ".part")
    assert f"the server offers {len(DATA)} bytes, expected {len(DATA) + 1}" in capsys.readouterr().err


def test_existing_correct_file_is_not_downloaded_again(server, tmp_path, capsys):
    url = server.add_download("/data.bin", DATA)
    out = str(tmp_path / "data.bin")
    with open(out, "wb") as f:
        f.write(DATA)
    assert _fetch("--url", url, "--output", out, "--md5", MD5) == 0
    assert server.requests("/data.bin") == 0
    assert f"{out}: OK (md5 {MD5}), already present" in capsys.readouterr().out


def test_existing_wrong_file_is_replaced(server, tmp_path):
    url = server.add_download("/data.bin", DATA)
    out = str(tmp_path / "data.bin")
    with open(out, "wb") as f:
        f.write(b"junk")
    assert _fetch("--url", url, "--output", out, "--md5", MD5) == 0
    assert _read(out) == DATA and server.requests("/data.bin") == 1


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    url = server.add_download("/data.bin", DATA, ranges=False)
    out = str(tmp_path / "data.bin")
    with open(out + ".part", "wb") as f:
        f.write(b"x" * 12345)  # not even the file's bytes: the 200 body must replace them
    assert _fetch("--url", url, "--output", out, "--md5", MD5) == 0
    assert _read(out) == DATA
    assert [(s.range, s.status) for s in server.served("/data.bin")] == [("bytes=12345-", 200)]


def test_interrupted_server_ignoring_range(server, tmp_path):
    url = server.add_download("/data.bin", DATA, ranges=False, interrupt=1, cut=500_000)
    out = str(tmp_path / "data.bin")
    assert _fetch("--url", url, "--output", out, "--md5", MD5) == 0
    assert _read(out) == DATA
    assert [(s.range, s.status) for s in server.served("/data.bin")] == [(None, 200), ("bytes=500000-", 200)]


def test_complete_part_without_size_gets_416_and_is_verified(server, tmp_path):
    url = server.add_download("/data.bin", DATA)
    out = str(tmp_path / "data.bin")
    with open(out + ".part", "wb") as f:
        f.write(DATA)
    assert _fetch("--url", url, "--output", out, "--md5", MD5) == 0
    assert _read(out) == DATA
    assert [(s.range, s.status, s.sent) for s in server.served("/data.bin")] == [(f"bytes={len(DATA)}-", 416, 0)]


def test_html_answer_to_a_range_keeps_the_part(server, tmp_path, capsys):
    url = server.add_file("/login", b"<html>please log in</html>", content_type="text/html")
    out = str(tmp_path / "big.tar")
    with open(out + ".part", "wb") as f:
        f.write(DATA[:5000])
    assert _fetch("--url", url, "--output", out, "--md5", MD5) == 1
    assert "HTML page" in capsys.readouterr().err
    assert _read(out + ".part") == DATA[:5000]  # a login page must not wipe a resumable part


def test_complete_part_with_known_size_needs_no_request(server, tmp_path):
    url = server.add_download("/data.bin", DATA)
    out = str(tmp_path / "data.bin")
    with open(out + ".part", "wb") as f:
        f.write(DATA)
    assert _fetch("--url", url, "--output", out, "--md5", MD5, "--size", str(len(DATA))) == 0
    assert _read(out) == DATA and server.requests("/data.bin") == 0


def test_corrupt_resumed_part_fails_md5_and_is_deleted(server, tmp_path, capsys):
    url = server.add_download("/data.bin", DATA)
    out = str(tmp_path / "data.bin")
    with open(out + ".part", "wb") as f:
        f.write(b"\0" * 1000)  # wrong bytes, but the server honours the Range from 1000
    assert _fetch("--url", url, "--output", out, "--md5", MD5) == 1
    assert not os.path.exists(out) and not os.path.exists(out + ".part")
    assert f"expected md5 {MD5}, got" in capsys.readouterr().err


def test_no_md5_saves_and_says_unverified(server, tmp_path, capsys):
    url = server.add_download("/dir/thing.tar.gz", DATA)
    assert _fetch("--url", url, "--output", str(tmp_path)) == 0  # a directory: the URL's file name
    out = str(tmp_path / "thing.tar.gz")
    assert _read(out) == DATA
    assert f"{out}: saved (md5 {MD5}; not verified" in capsys.readouterr().out


def test_redirect_is_followed_and_rechecked(server, tmp_path, capsys):
    server.add_download("/real.bin", DATA)
    url = server.add_redirect("/go", "/real.bin")
    out = str(tmp_path / "data.bin")
    assert _fetch("--url", url, "--output", out, "--md5", MD5) == 0
    assert _read(out) == DATA
    bad = server.add_redirect("/evil", "file:///etc/passwd")
    assert _fetch("--url", bad, "--output", str(tmp_path / "evil"), "--md5", MD5) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "'file'" in err and "redirected" in err
    assert not os.path.exists(tmp_path / "evil.part")


def test_http_error_fails_without_retry(server, tmp_path, capsys):
    url = server.add_status("/missing.bin", 404)
    out = str(tmp_path / "x.bin")
    assert _fetch("--url", url, "--output", out, "--md5", MD5) == 1
    assert server.requests("/missing.bin") == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert not os.path.exists(out + ".part")


def test_server_errors_are_retried(server, tmp_path):
    server.add_sequence("/flaky.bin", [(503, b"busy", {}), (200, DATA, {})])
    out = str(tmp_path / "x.bin")
    assert _fetch("--url", server.url("/flaky.bin"), "--output", out, "--md5", MD5) == 0
    assert _read(out) == DATA and server.requests("/flaky.bin") == 2


def test_gives_up_after_retries_without_progress(server, tmp_path, capsys):
    server.add_status("/down.bin", 503)
    out = str(tmp_path / "x.bin")
    assert _fetch("--url", server.url("/down.bin"), "--output", out, "--retries", "2") == 1
    assert server.requests("/down.bin") == 3
    assert "gave up after 2 retries" in capsys.readouterr().err


def test_loopback_refused_without_allow_private_networks(server, tmp_path, capsys):
    url = server.add_download("/data.bin", DATA)
    out = str(tmp_path / "data.bin")
    assert fetch_main(["--url", url, "--output", out, "--md5", MD5]) == 1
    assert server.requests("/data.bin") == 0
    err = capsys.readouterr().err
    assert "refused" in err and "loopback" in err
    assert not os.path.exists(out) and not os.path.exists(out + ".part")


def test_localhost_name_refused_when_resolved(server, tmp_path, capsys):
    url = server.add_download("/data.bin", DATA).replace("127.0.0.1", "localhost")
    assert fetch_main(["--url", url, "--output", str(tmp_path / "d"), "--md5", MD5]) == 1
    assert server.requests("/data.bin") == 0
    assert "refused" in capsys.readouterr().err


def test_file_url_refused(tmp_path, capsys):
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    out = str(tmp_path / "out.bin")
    assert fetch_main(["--url", src.as_uri(), "--output", out, "--md5", MD5, "--allow-private-networks"]) == 1
    assert "only http and https" in capsys.readouterr().err
    assert not os.path.exists(out) and not os.path.exists(out + ".part")


def test_known_name_resolves(server, tmp_path, monkeypatch, capsys):
    url = server.add_download("/kriz/cifar-10-python.tar.gz", DATA)
    entry = archives.KNOWN["cifar-10-python"]
    monkeypatch.setitem(archives.KNOWN, "cifar-10-python", entry._replace(url=url, md5=MD5, size=len(DATA)))
    assert _fetch("cifar-10-python", "--output", str(tmp_path)) == 0
    out = tmp_path / "cifar-10-python.tar.gz"
    assert out.read_bytes() == DATA
    assert f"{out}: OK (md5 {MD5})" in capsys.readouterr().out
    # the file name works as NAME too; present and correct: nothing fetched
    assert _fetch("cifar-10-python.tar.gz", "--output", str(out)) == 0
    assert server.requests("/kriz/cifar-10-python.tar.gz") == 1


def test_known_name_with_mirror_url(server, tmp_path, monkeypatch, capsys):
    entry = archives.KNOWN["ILSVRC2012_devkit_t12"]
    monkeypatch.setitem(archives.KNOWN, "ILSVRC2012_devkit_t12", entry._replace(md5=MD5))
    mirror = server.add_download("/mirror/devkit.tgz", DATA)
    assert _fetch("ILSVRC2012_devkit_t12", "--url", mirror, "--output", str(tmp_path)) == 0
    assert (tmp_path / "ILSVRC2012_devkit_t12.tar.gz").read_bytes() == DATA
    # the table's md5 still applies to a mirror
    monkeypatch.setitem(archives.KNOWN, "ILSVRC2012_devkit_t12", entry)
    assert _fetch("ILSVRC2012_devkit_t12", "--url", mirror, "--output", str(tmp_path / "again.tgz")) == 1
    assert f"expected md5 {entry.md5}, got {MD5}" in capsys.readouterr().err


def test_imagenet_login_hint(server, tmp_path, monkeypatch, capsys):
    entry = archives.KNOWN["ILSVRC2012_img_val"]
    server.add_status("/data/ILSVRC/2012/ILSVRC2012_img_val.tar", 403)
    url = server.url("/data/ILSVRC/2012/ILSVRC2012_img_val.tar")
    monkeypatch.setitem(archives.KNOWN, "ILSVRC2012_img_val", entry._replace(url=url))
    assert _fetch("ILSVRC2012_img_val", "--output", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "HTTP 403" in err and "image-net.org account" in err


def test_html_page_instead_of_an_archive(server, tmp_path, capsys):
    url = server.add_file("/login", b"<html>please log in</html>", content_type="text/html")
    out = str(tmp_path / "ILSVRC2012_img_test_v10102019.tar")
    assert _fetch("--url", url, "--output", out) == 1
    assert "HTML page" in capsys.readouterr().err
    assert not os.path.exists(out) and not os.path.exists(out + ".part")


def cookies_seen(server, path: str) -> list:
    """Serve DATA at `path` and return the list the Cookie header of each request to it is appended to."""
    seen = []
    server.add_download(path, DATA)
    route = server._routes[path]

    def spy(h, head):
        seen.append(h.headers.get("Cookie"))
        route(h, head)
    server._routes[path] = spy
    return seen


def test_header_option_is_sent(server, tmp_path):
    seen = cookies_seen(server, "/data.bin")
    assert _fetch("--url", server.url("/data.bin"), "--output", str(tmp_path / "d"), "--md5", MD5,
                  "--header", "Cookie: session=abc") == 0
    assert seen == ["session=abc"]


def test_header_not_sent_to_another_host(server, tmp_path):
    seen = cookies_seen(server, "/data.bin")
    other_host = server.url("/data.bin").replace("127.0.0.1", "localhost")
    url = server.add_redirect("/go", other_host)
    assert _fetch("--url", url, "--output", str(tmp_path / "d"), "--md5", MD5,
                  "--header", "Cookie: session=abc") == 0
    assert seen == [None]


def test_usage_errors(tmp_path, capsys):
    for argv in (["--output", str(tmp_path)],                                  # neither NAME nor --url
                 ["no-such-archive", "--output", str(tmp_path)],
                 ["--url", "http://example.com/x", "--output", "gs://bucket/x"],
                 ["--url", "http://example.com/x", "--output", str(tmp_path / "x"), "--md5", "xyz"]):
        with pytest.raises(SystemExit) as exc:
            fetch_main(argv)
        assert exc.value.code == 2
    capsys.readouterr()


def test_verify(tmp_path, capsys, monkeypatch):
    good = tmp_path / "good.bin"
    good.write_bytes(DATA)
    assert verify_main([str(good), "--md5", MD5]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: OK"

    assert verify_main([str(good), "--md5", WRONG.upper()]) == 1
    assert capsys.readouterr().out.strip() == f"{good}: FAILED (expected {WRONG}, got {MD5})"

    assert verify_main([str(good)]) == 0
    assert capsys.readouterr().out.strip() == f"{good}: no known md5 (md5 is {MD5})"

    # by file name from the table
    cifar = tmp_path / "cifar-100-python.tar.gz"
    cifar.write_bytes(DATA)
    entry = archives.KNOWN["cifar-100-python"]
    monkeypatch.setitem(archives.KNOWN, "cifar-100-python", entry._replace(md5=MD5, size=None))
    val = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    val.write_bytes(b"not the devkit")
    missing = tmp_path / "nothing.tar"
    assert verify_main([str(cifar), str(val), str(good), str(missing)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{cifar}: OK"
    assert lines[1].startswith(f"{val}: FAILED (expected fa75699e90414af021442c21a62c3abf, got ")
    assert lines[2] == f"{good}: no known md5 (md5 is {MD5})"
    assert lines[3].startswith(f"{missing}: MISSING")

    # a known size that differs fails without hashing
    monkeypatch.setitem(archives.KNOWN, "cifar-100-python", entry)
    assert verify_main([str(cifar)]) == 1
    assert f"expected size {entry.size} bytes, got {len(DATA)}" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exc:
        verify_main([str(good), str(cifar), "--md5", MD5])  # --md5 with two files
    assert exc.value.code == 2


def test_md5_of_streams_blocks_and_does_not_decompress(tmp_path, monkeypatch):
    import gzip
    path = tmp_path / "x.gz"
    raw = gzip.compress(DATA)
    path.write_bytes(raw)
    monkeypatch.setattr(archives, "BLOCK", 1 << 20)
    seen = []
    assert archives.md5_of(str(path), seen.append) == hashlib.md5(raw).hexdigest()
    assert seen[-1] == len(raw) and len(seen) == -(-len(raw) // (1 << 20))


def test_table():
    assert archives.known("cifar-10-python").md5 == "c58f30108f718f92721af3b95e74349a"
    assert archives.known("cifar-100-python.tar.gz").size == 169_001_437
    assert archives.known_by_file_name("/data/ILSVRC2012_img_train.tar").size == 147_897_477_120
    assert archives.known_by_file_name("ILSVRC2012_img_test_v10102019.tar").md5 == \
        "e1b8681fff3d63731c599df9b4b6fc02"
    assert archives.known_by_file_name("other.tar") is None
    for name, entry in archives.KNOWN.items():
        assert archives.is_md5(entry.md5) and entry.url.endswith("/" + entry.file_name)
        assert entry.login == name.startswith("ILSVRC2012")
        if entry.login:
            assert entry.url == "https://image-net.org/data/ILSVRC/2012/" + entry.file_name


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_rendering(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(fetch_archive.time, "monotonic", lambda: now[0])
    tty = _Tty()
    bar = Progress("data.bin", 200_000_000, stream=tty, start=50_000_000)
    now[0] += 10
    bar.update(100_000_000)  # 50 MB in 10 s
    assert "50.0%" in tty.getvalue() and "100.0/200.0 MB" in tty.getvalue()
    assert "5.0 MB/s" in tty.getvalue() and "ETA 0:00:20" in tty.getvalue()
    drawn = tty.getvalue()
    now[0] += 0.01
    bar.update(101_000_000)  # throttled: no redraw within the interval
    assert tty.getvalue() == drawn
    bar.finish()
    assert tty.getvalue().endswith("\n")

    plain = io.StringIO()  # not a terminal: only the final line
    bar = Progress("data.bin", None, stream=plain)
    now[0] += 1
    bar.update(3_000_000)
    assert plain.getvalue() == ""
    bar.finish()
    assert plain.getvalue().count("\n") == 1 and "3.0 MB" in plain.getvalue()

    quiet = _Tty()
    bar = Progress("data.bin", 10, stream=quiet, quiet=True)
    bar.update(5)
    bar.finish()
    assert quiet.getvalue() == ""
