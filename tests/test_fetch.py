"""The fetcher and the URL list parsers on their own: a real HTTP server on 127.0.0.1, no pipeline."""
import gzip
import io
import json
import socket
import tarfile
import time

import pytest

from imagebeam import sample as sample_lib
from imagebeam.http_fixture import PhotoServer
from imagebeam.transforms.inputs import fetch as fetch_lib
from imagebeam.transforms.imaging.decode import DecodeError, probe_image
from imagebeam.transforms.inputs.downloads import check_image, download_one, resolve_duplicates
from imagebeam.transforms.inputs.fetch import FetchConfig, Fetcher, refused_address, retry_after_seconds, robots_refusal
from imagebeam.transforms.inputs.url_lists import (UrlEntry, is_url_list, list_format, parse_csv_line, parse_json_line,
                                            parse_text_line, url_md5)

FAST = dict(timeout=0.5, retries=2, backoff=0.02, allow_private_networks=True)


@pytest.fixture(scope="module")
def photos():
    return list(sample_lib.imagenet_like_jpegs(6, seed=11))


@pytest.fixture
def server():
    with PhotoServer() as srv:
        yield srv


# --- URL lists -------------------------------------------------------------------------------------

def test_text_lines_follow_spec_section_3():
    assert parse_text_line("# a comment") is None
    assert parse_text_line("   \n") is None
    plain = parse_text_line("http://a.example/x.jpg\n", "l.txt")
    assert plain == UrlEntry("http://a.example/x.jpg", None, None, "l.txt")
    fall11 = parse_text_line("n00004475_6590\thttp://farm4.static.flickr.com/3175/2737866473_7958dc8760.jpg")
    assert fall11.url.endswith("7958dc8760.jpg") and fall11.key == "n00004475_6590" and fall11.label == "n00004475"
    other = parse_text_line("some words then https://b.example/y.png")
    assert other.url == "https://b.example/y.png" and other.key == "some" and other.label is None
    assert parse_text_line(b"\xff\xfe junk \xff").url == "\ufffd"  # undecodable bytes never crash the reader
    assert parse_text_line("x" * 5000).problem.startswith("not a URL")


def test_md5_names_match_the_reference():
    import hashlib
    url = "http://farm1.static.flickr.com/145/430300483_21e993670c.jpg"
    assert url_md5(url) == hashlib.md5(url.encode()).hexdigest()


def test_table_rows():
    header = ["id", "image_url", "cls"]
    entry = parse_csv_line('7,"http://a.example/p,q.jpg",n01440764\r\n', header, "image_url", "id", "cls")
    assert entry == UrlEntry("http://a.example/p,q.jpg", "7", "n01440764", "")
    missing = parse_csv_line("8,,n01\n", header, "image_url", "id", "cls")
    assert missing.problem == "no 'image_url' value in the row"
    assert parse_json_line('{"url": "http://a.example/z.jpg", "k": 3}', "url", "k", None).key == "3"
    assert parse_json_line("{not json", "url", None, None).problem.startswith("not a JSON object")
    assert parse_json_line("[1, 2]", "url", None, None).problem == "not a JSON object"


def test_list_formats(tmp_path):
    assert list_format("urls.txt") == list_format("fall11_urls.txt.gz") == "text"
    assert list_format("x.csv.gz") == "csv" and list_format("x.jsonl") == "jsonl"
    assert list_format("x.parquet") == "parquet" and list_format("x.JPEG") is None
    assert list_format("shard-0001.tar") is None
    lists = tmp_path / "imagenet_fall11_urls.tgz"
    with tarfile.open(lists, "w:gz") as tar:
        sample_lib.add_bytes(tar, "fall11_urls.txt", b"n1_1\thttp://a.example/1.jpg\n")
    images = tmp_path / "shard.tgz"
    with tarfile.open(images, "w:gz") as tar:
        sample_lib.add_bytes(tar, "a/b.JPEG", b"\xff\xd8")
    assert is_url_list(str(lists)) and not is_url_list(str(images))
    with gzip.open(tmp_path / "l.txt.gz", "wt") as f:
        f.write("http://a.example/1.jpg\n")
    assert is_url_list(str(tmp_path / "l.txt.gz"))


# --- safety ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("address, allowed_private", [
    ("127.0.0.1", True), ("10.1.2.3", True), ("192.168.0.9", True), ("172.16.5.5", True), ("::1", True),
    ("169.254.1.1", True), ("0.0.0.0", True), ("::ffff:127.0.0.1", True), ("fe80::1", True)])
def test_private_addresses_refused_by_default(address, allowed_private):
    assert refused_address(address, allow_private=False)
    assert (refused_address(address, allow_private=True) is None) == allowed_private


def test_metadata_addresses_always_refused_public_allowed():
    for address in ("169.254.169.254", "::ffff:169.254.169.254", "fd00:ec2::254"):
        assert "metadata" in refused_address(address, allow_private=True)
        assert refused_address(address, allow_private=False)
    assert refused_address("93.184.216.34", allow_private=False) is None
    assert refused_address("2606:2800:220:1:248:1893:25c8:1946", allow_private=False) is None


def test_robots_tag_parsing():
    assert robots_refusal(["noai"]) and robots_refusal(["noindex, NoImageAI"])
    assert robots_refusal(["imagebeam: noai"]) and robots_refusal(["*: noimageai"])
    assert robots_refusal(["otherbot: noai"]) is None
    assert robots_refusal(["noindex, nofollow"]) is None and robots_refusal([]) is None
    assert robots_refusal(["unavailable_after: 25 Jun 2030 15:00:00 PST"]) is None


def test_retry_after_forms():
    assert retry_after_seconds("3") == 3.0
    now = time.time()
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 10))
    assert 8 <= retry_after_seconds(date, now) <= 11
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


# --- the fetcher against a real server -----------------------------------------------------------------

def test_good_photo_is_byte_identical(server, photos):
    url = server.add_file("/a.jpg", photos[0])
    got = Fetcher(FetchConfig(**FAST)).fetch(url)
    assert (got.status, got.data, got.attempts) == ("ok", photos[0], 1)


def test_http_errors_permanent_and_transient(server, photos):
    fetcher = Fetcher(FetchConfig(**FAST))
    missing = fetcher.fetch(server.add_status("/missing", 404))
    assert (missing.status, missing.attempts, server.requests("/missing")) == ("http_404", 1, 1)
    flaky = fetcher.fetch(server.add_sequence("/flaky", [(500, b"", {}), (200, photos[1], {})]))
    assert (flaky.status, flaky.data, flaky.attempts) == ("ok", photos[1], 2)
    down = fetcher.fetch(server.add_status("/down", 503))
    assert (down.status, server.requests("/down")) == ("http_503", FAST["retries"] + 1)
    assert fetch_lib.is_transient("http_503") and fetch_lib.is_transient("http_429")
    assert not fetch_lib.is_transient("http_404") and not fetch_lib.is_transient("not_image")


def test_429_retry_after_is_honoured(server, photos):
    url = server.add_sequence("/busy", [(429, b"", {"Retry-After": "1"}), (200, photos[2], {})])
    got = Fetcher(FetchConfig(**FAST)).fetch(url)
    first, second = server.request_times("/busy")
    assert got.status == "ok" and got.data == photos[2]
    assert second - first >= 0.95 and got.throttled >= 0.9


def test_retry_after_beyond_the_cap_gives_up(server):
    url = server.add_status("/later", 429, headers={"Retry-After": "3600"})
    got = Fetcher(FetchConfig(**FAST)).fetch(url)
    assert got.status == "http_429" and "exceeds" in got.reason and server.requests("/later") == 1


def test_slow_response_times_out_after_retries(server, photos):
    url = server.add_slow("/slow", 2.0, photos[0])
    got = Fetcher(FetchConfig(**dict(FAST, timeout=0.2, retries=1))).fetch(url)
    assert got.status == "timeout" and server.requests("/slow") == 2


def test_redirects_followed_and_rechecked(server, photos):
    fetcher = Fetcher(FetchConfig(**FAST))
    target = server.add_file("/final.jpg", photos[3])
    server.add_redirect("/r3", target, 301)
    server.add_redirect("/r2", "/r3", 307)
    chain = fetcher.fetch(server.add_redirect("/r1", "r2"))
    assert (chain.status, chain.data, chain.final_url) == ("ok", photos[3], target)
    to_file = fetcher.fetch(server.add_redirect("/evil", "file:///etc/passwd"))
    assert to_file.status == "blocked" and "redirected" in to_file.reason
    to_metadata = fetcher.fetch(server.add_redirect("/meta", "http://169.254.169.254/latest/meta-data/"))
    assert to_metadata.status == "blocked" and "metadata" in to_metadata.reason
    server.add_redirect("/loop", "/loop")
    loop = fetcher.fetch(server.url("/loop"))
    assert loop.status == "http_302" and "redirects" in loop.reason


def test_huge_bodies_abandoned(server):
    fetcher = Fetcher(FetchConfig(**dict(FAST, max_bytes=1 << 20)))
    streamed = fetcher.fetch(server.add_endless("/endless"))
    assert streamed.status == "too_large" and "--max-bytes" in streamed.reason
    announced = fetcher.fetch(server.add_endless("/announced", announce=True))
    assert announced.status == "too_large" and "Content-Length" in announced.reason


def test_robots_tag_skipped_unless_disabled(server, photos):
    url = server.add_file("/noai.jpg", photos[4], headers={"X-Robots-Tag": "noai"})
    assert Fetcher(FetchConfig(**FAST)).fetch(url).status == "robots"
    got = Fetcher(FetchConfig(**dict(FAST, respect_robots_tag=False))).fetch(url)
    assert got.status == "ok" and got.data == photos[4]


def test_refused_urls_never_reach_the_network(server, photos, monkeypatch):
    url = server.add_file("/private.jpg", photos[0])
    strict = Fetcher(FetchConfig(timeout=0.5, retries=0))
    assert strict.fetch(url).status == "blocked"
    assert server.requests("/private.jpg") == 0
    for other in ("file:///etc/passwd", "ftp://ftp.example.org/a.jpg", "gopher://x/", "just-words"):
        assert strict.fetch(other).status == "blocked"

    connects = []
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        if host == "metadata.example.internal":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", 80))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    monkeypatch.setattr(socket.socket, "connect", lambda *a: connects.append(a))
    got = strict.fetch("http://metadata.example.internal/latest/meta-data/iam")
    assert got.status == "blocked" and "169.254.169.254" in got.reason and not connects
    allowed = Fetcher(FetchConfig(timeout=0.5, retries=0, allow_private_networks=True))
    assert allowed.fetch("http://metadata.example.internal/").status == "blocked" and not connects


def test_per_host_limit(photos):
    with PhotoServer(latency=0.2) as slow_server:
        urls = [slow_server.add_file(f"/p{i}.jpg", photos[i % 6]) for i in range(8)]
        fetcher = Fetcher(FetchConfig(**dict(FAST, per_host=2, timeout=5)))
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(fetcher.fetch, urls))
        arrivals = sorted(t for i in range(8) for t in slow_server.request_times(f"/p{i}.jpg"))
    assert all(r.status == "ok" for r in results)
    # never more than 2 in flight: the third request starts only after the first finished
    assert all(arrivals[i + 2] - arrivals[i] >= 0.18 for i in range(len(arrivals) - 2))


# --- validation and storage --------------------------------------------------------------------------

def test_probe_reads_header_size_and_catches_truncation(photos):
    facts = probe_image(photos[0])
    assert facts.format == "JPEG" and facts.extension == ".jpeg" and facts.width > 100
    with pytest.raises(DecodeError, match="truncated"):
        probe_image(photos[0][: len(photos[0]) * 2 // 3])
    with pytest.raises(DecodeError, match="not an image"):
        probe_image(b"<!DOCTYPE html><html></html>")


def test_check_image_statuses(photos):
    from PIL import Image
    entry = UrlEntry("http://a.example/x")
    config = FetchConfig(min_size=32, max_pixels=10_000_000)
    assert check_image(entry, photos[0], config, True)[0]["status"] == "ok"
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1), "red").save(tiny, "GIF")
    record, ext = check_image(entry, tiny.getvalue(), config, True)
    assert record["status"] == "too_small" and ext is None and record["width"] == 1
    bomb = io.BytesIO()
    Image.new("1", (20000, 20000)).save(bomb, "PNG")
    assert check_image(entry, bomb.getvalue(), FetchConfig(max_pixels=10_000_000), True)[0]["status"] == "too_large"
    import hashlib
    placeholder = FetchConfig(placeholders=frozenset({hashlib.sha256(photos[1]).hexdigest()}))
    assert check_image(entry, photos[1], placeholder, True)[0]["status"] == "placeholder"
    png = io.BytesIO()
    Image.new("RGB", (40, 40), "blue").save(png, "PNG")
    assert check_image(entry, png.getvalue(), config, True)[1] == ".png"


def test_download_one_writes_atomically_under_md5_name(server, photos, tmp_path):
    url = server.add_file("/d.jpg", photos[5])
    result = download_one(UrlEntry(url, "k", "n1"), Fetcher(FetchConfig(**FAST)), str(tmp_path))
    assert result.record["file"] == url_md5(url) + ".jpeg" and result.data is None
    assert (tmp_path / result.record["file"]).read_bytes() == photos[5]
    assert sorted(p.name for p in tmp_path.iterdir()) == [result.record["file"]]
    again = download_one(UrlEntry(url, "k", "n1"), Fetcher(FetchConfig(**FAST)), str(tmp_path),
                         existing=result.record["file"])
    assert again.record == result.record and server.requests("/d.jpg") == 1  # validated, not refetched
    assert json.loads(json.dumps(result.record)) == result.record


def test_duplicates_resolved_by_first_url():
    def rec(url, status="ok"):
        return {"url": url, "status": status, "file": url_md5(url) + ".jpeg", "sha256": "s"}
    out = resolve_duplicates(("s", [rec("http://b/2"), rec("http://a/1"), rec("http://c/3", "duplicate")]))
    by_url = {r["url"]: r for r in out}
    assert by_url["http://a/1"]["status"] == "ok"
    assert by_url["http://b/2"]["status"] == "duplicate" and by_url["http://b/2"]["_delete"] == url_md5("http://b/2") + ".jpeg"
    assert by_url["http://c/3"]["duplicate_of"] == "http://a/1" and "_delete" not in by_url["http://c/3"]
    assert {r["file"] for r in out} == {url_md5("http://a/1") + ".jpeg"}
