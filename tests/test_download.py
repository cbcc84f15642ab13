"""`imagebeam download` and URL lists inside downsample/colorize, against a real server on 127.0.0.1."""
import glob
import gzip
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from imagebeam import sample as sample_lib
from imagebeam.http_fixture import PhotoServer
from imagebeam.pipelines import colorize, download, downsample
from imagebeam.transforms.inputs.url_lists import url_md5

pytestmark = pytest.mark.pipeline

NET = ["--allow-private-networks", "--timeout", "0.5", "--retries", "2", "--backoff", "0.02",
       "--max-bytes", "2000000", "--threads", "8"]
PROCESSES = ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]


@pytest.fixture(scope="module")
def photos():
    return list(sample_lib.imagenet_like_jpegs(12, seed=21))


@pytest.fixture
def server():
    with PhotoServer() as srv:
        yield srv


def scenario(server: PhotoServer, photos, placeholder: bytes):
    """Every case of the issue; returns {url: expected status} and {url: served bytes} of good ones."""
    expected, served = {}, {}
    for i in range(6):
        url = server.add_file(f"/good{i}.jpg", photos[i])
        expected[url], served[url] = "ok", photos[i]
    expected[server.add_status("/missing.jpg", 404)] = "http_404"
    url = server.add_sequence("/flaky.jpg", [(500, b"", {}), (200, photos[6], {})])
    expected[url], served[url] = "ok", photos[6]
    url = server.add_sequence("/busy.jpg", [(429, b"", {"Retry-After": "1"}), (200, photos[7], {})])
    expected[url], served[url] = "ok", photos[7]
    expected[server.add_slow("/slow.jpg", 3.0, photos[8])] = "timeout"
    server.add_file("/moved/final.jpg", photos[9])
    server.add_redirect("/r2", "/moved/final.jpg", 301)
    url = server.add_redirect("/r1", server.url("/r2"))
    expected[url], served[url] = "ok", photos[9]
    expected[server.add_file("/page.jpg", b"<!DOCTYPE html><html><body>Not here</body></html>")] = "not_image"
    expected[server.add_file("/truncated.jpg", photos[10][: len(photos[10]) // 2])] = "not_image"
    expected[server.add_endless("/huge.jpg")] = "too_large"
    expected[server.add_file("/unavailable.jpg", placeholder)] = "placeholder"
    expected[server.add_file("/copy-of-good0.jpg", photos[0])] = "duplicate"  # sorts before /good0.jpg
    expected[server.add_file("/noai.jpg", photos[11], headers={"X-Robots-Tag": "noai"})] = "robots"
    expected[server.add_redirect("/to-file", "file:///etc/passwd")] = "blocked"
    for url in ("file:///etc/passwd", "ftp://ftp.example.org/pub/a.jpg", "http://169.254.169.254/latest/meta-data/"):
        expected[url] = "blocked"
    # copy-of-good0 sorts first: it keeps the file and good0 becomes its duplicate
    good0 = server.url("/good0.jpg")
    copy = server.url("/copy-of-good0.jpg")
    expected[good0], expected[copy] = "duplicate", "ok"
    served[copy] = served.pop(good0)
    return expected, served


def write_list(path, urls, extra_lines=()):
    lines = ["# an ImageNet-style list", ""]
    lines += [f"img{i:04d}\t{u}" for i, u in enumerate(urls)]
    lines += list(extra_lines)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def manifest(out):
    with open(os.path.join(out, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_download_every_case_and_resume(server, photos, workdir):
    placeholder = next(sample_lib.imagenet_like_jpegs(1, seed=99))
    expected, served = scenario(server, photos, placeholder)
    urls = list(expected)
    listing = write_list(os.path.join(workdir, "urls.txt"), urls, [urls[1], "   # indented comment", "garbage-token"])
    expected["garbage-token"] = "blocked"
    digests = os.path.join(workdir, "placeholders.txt")
    with open(digests, "w") as f:
        f.write(f"# Flickr-style 'photo unavailable'\n{hashlib.sha256(placeholder).hexdigest()}\n")
    out = os.path.join(workdir, "dl")
    meta = download.run(["--input", listing, "--output", out, "--placeholders", digests, *NET])

    records = manifest(out)
    got = {r["url"]: r["status"] for r in records}
    assert got == expected
    assert len(records) == len(expected)
    # one record per URL, ordered by file name, every key present
    assert [url_md5(r["url"]) for r in records] == sorted(url_md5(r["url"]) for r in records)
    assert all(set(download_keys()) <= set(r) for r in records)
    c = meta["counts"]
    assert c["listed"] == len(expected) + 1 and c["repeated_lines"] == 1 and c["urls"] == len(expected)
    assert c["ok"] + c["failed"] == c["urls"] and sum(meta["statuses"].values()) == c["urls"]
    assert meta["statuses"]["ok"] == len(served) and meta["success_rate"] == round(len(served) / len(expected), 6)
    # the good images are byte-identical to the served ones, under md5(url).jpeg, and nothing else is stored
    by_url = {r["url"]: r for r in records}
    for url, data in served.items():
        r = by_url[url]
        assert r["file"] == url_md5(url) + ".jpeg"
        assert r["sha256"] == hashlib.sha256(data).hexdigest() and r["bytes"] == len(data) and r["width"] > 0
        with open(os.path.join(out, r["file"]), "rb") as f:
            assert f.read() == data
    assert by_url[server.url("/good0.jpg")]["file"] == by_url[server.url("/copy-of-good0.jpg")]["file"]
    assert by_url[server.url("/good0.jpg")]["duplicate_of"] == server.url("/copy-of-good0.jpg")
    assert sorted(os.listdir(out)) == sorted([url_md5(u) + ".jpeg" for u in served] + ["manifest.jsonl", "metadata.json"])
    assert set(os.listdir(workdir)) == {"urls.txt", "placeholders.txt", "dl"}  # nothing written outside DIR
    assert server.requests("/slow.jpg") == 3 and server.requests("/flaky.jpg") == 2
    assert server.requests("/good1.jpg") == 1  # the repeated line was fetched once
    # Beam counters: per status (before content dedupe), bytes, waiting
    counted = meta["counters"]
    assert counted["ok"] == len(served) + 1 and counted["failed_robots"] == 1 and counted["failed_blocked"] == 5
    assert counted["bytes"] >= sum(len(d) for d in served.values()) and counted["throttled_ms"] >= 900

    # re-run: finished URLs are not fetched again, the transient timeout is retried
    before = {path: server.requests(path) for path in ("/good1.jpg", "/missing.jpg", "/page.jpg", "/noai.jpg",
                                                        "/flaky.jpg", "/huge.jpg", "/copy-of-good0.jpg")}
    again = download.run(["--input", listing, "--output", out, "--placeholders", digests, *NET])
    assert {path: server.requests(path) for path in before} == before
    assert server.requests("/slow.jpg") == 6
    assert again["counts"]["kept_from_earlier_runs"] == len(expected) - 1
    assert again["counts"]["processed_this_run"] == 1
    assert manifest(out) == records


def download_keys():
    return ("url", "status", "reason", "bytes", "sha256", "width", "height", "file", "key", "label")


def test_refused_by_default(server, photos, workdir):
    local = server.add_file("/local.jpg", photos[0])
    listing = write_list(os.path.join(workdir, "urls.txt"),
                         [local, "file:///etc/passwd", "ftp://ftp.example.org/a.jpg",
                          "http://169.254.169.254/latest/meta-data/", "http://[::ffff:169.254.169.254]/"])
    out = os.path.join(workdir, "dl")
    meta = download.run(["--input", listing, "--output", out, "--timeout", "0.5", "--retries", "0"])
    records = manifest(out)
    assert {r["status"] for r in records} == {"blocked"} and len(records) == 5
    assert "loopback" in {r["url"]: r for r in records}[local]["reason"]
    assert server.total_requests() == 0 and meta["counts"]["ok"] == 0
    assert sorted(os.listdir(out)) == ["manifest.jsonl", "metadata.json"]


def test_killed_download_resumes_without_refetching(photos, workdir):
    with PhotoServer(latency=0.05) as server:
        urls = [server.add_file(f"/p{i}.jpg", photos[i % len(photos)] + b"\0" * (i + 1)) for i in range(160)]
        listing = write_list(os.path.join(workdir, "urls.txt"), urls)
        out = os.path.join(workdir, "dl")
        args = [sys.executable, "-m", "imagebeam.cli", "download", "--input", listing, "--output", out,
                "--allow-private-networks", "--threads", "2", "--per-host", "2"]
        proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and len(glob.glob(os.path.join(out, ".journal", "part-*.jsonl"))) < 2:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        served = {server.url(f"/p{i}.jpg"): photos[i % len(photos)] + b"\0" * (i + 1) for i in range(160)}
        first_counts = {u: server.requests(u[len(server.base_url):]) for u in urls}
        journaled = set()
        for part in glob.glob(os.path.join(out, ".journal", "part-*.jsonl")):
            with open(part) as f:
                journaled |= {json.loads(line)["url"] for line in f}
        assert 0 < len(journaled) < len(urls), "the kill should land mid-job"
        assert not os.path.exists(os.path.join(out, "manifest.jsonl"))
        # no partial file under a final name
        stored = set()
        for name in os.listdir(out):
            if not name.startswith("."):
                url = next(u for u in urls if url_md5(u) == name.split(".")[0])
                with open(os.path.join(out, name), "rb") as f:
                    assert f.read() == served[url]
                stored.add(url)
        finished = journaled | stored

        meta = download.run(["--input", listing, "--output", out, "--allow-private-networks", "--threads", "8",
                             "--per-host", "8", *PROCESSES])
        counts = {u: server.requests(u[len(server.base_url):]) for u in urls}
    assert meta["counts"]["ok"] == 160 and meta["counts"]["kept_from_earlier_runs"] >= len(journaled)
    # finished URLs (journaled, or stored with the record lost) are never fetched again; the few that were
    # in flight at the kill are fetched once more; none twice by the second run
    assert all(counts[u] == first_counts[u] == 1 for u in finished)
    assert all(counts[u] - first_counts[u] == (0 if first_counts[u] and u in finished else 1) for u in urls)
    for r in manifest(out):
        with open(os.path.join(out, r["file"]), "rb") as f:
            assert f.read() == served[r["url"]]
    assert sorted(os.listdir(out)) == sorted([url_md5(u) + ".jpeg" for u in urls] + ["manifest.jsonl", "metadata.json"])


def test_list_formats_through_the_job(server, photos, workdir):
    urls = [server.add_file(f"/f{i}.jpg", photos[i]) for i in range(5)]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    lists = []
    with gzip.open(os.path.join(workdir, "a.txt.gz"), "wt") as f:
        f.write(f"n01440764_1 {urls[0]}\n")
    lists.append(os.path.join(workdir, "a.txt.gz"))
    with open(os.path.join(workdir, "b.csv"), "w") as f:
        f.write(f'id,image_url\n7,"{urls[1]}"\n8,\n')
    lists.append(os.path.join(workdir, "b.csv"))
    with open(os.path.join(workdir, "c.jsonl"), "w") as f:
        f.write(json.dumps({"image_url": urls[2], "id": "x"}) + "\n{broken\n")
    lists.append(os.path.join(workdir, "c.jsonl"))
    pq.write_table(pa.table({"image_url": [urls[3]], "id": ["p"]}), os.path.join(workdir, "d.parquet"))
    lists.append(os.path.join(workdir, "d.parquet"))
    with tarfile.open(os.path.join(workdir, "e.tgz"), "w:gz") as tar:
        sample_lib.add_bytes(tar, "urls/fall11_urls.txt", f"n01443537_5\t{urls[4]}\n".encode())
    lists.append(os.path.join(workdir, "e.tgz"))
    out = os.path.join(workdir, "dl")
    args = ["--output", out, "--url-column", "image_url", "--key-column", "id", *NET]
    for path in lists:
        args += ["--input", path]
    meta = download.run(args)
    by_url = {r["url"]: r for r in manifest(out)}
    # the same bytes with two SDK worker processes instead of the in-process default
    other = os.path.join(workdir, "dl2")
    download.run([a if a != out else other for a in args] + PROCESSES)
    for name in sorted(os.listdir(out)):
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(other, name), "rb") as b:
            assert a.read() == b.read(), name
    assert sorted(os.listdir(out)) == sorted(os.listdir(other))
    assert all(by_url[u]["status"] == "ok" for u in urls)
    assert by_url[urls[0]]["label"] == "n01440764" and by_url[urls[4]]["key"] == "n01443537_5"
    assert by_url[urls[1]]["key"] == "7" and by_url[urls[3]]["key"] == "p"
    problems = [r for r in by_url.values() if r["status"] == "blocked"]
    assert len(problems) == 2 and meta["counts"]["urls"] == 7  # the empty CSV cell and the broken JSON line


def test_url_list_feeds_downsample_and_colorize(server, photos, workdir):
    lines = []
    for i in range(8):
        wnid = ("n01440764", "n01443537")[i % 2]
        lines.append(f"{wnid}_{i + 1}\t{server.add_file(f'/{wnid}_{i}.jpg', photos[i])}")
    lines.append(f"n01440764_99\t{server.add_status('/gone.jpg', 404)}")
    lines.append(lines[0])  # a repeated line
    listing = os.path.join(workdir, "fall11_urls.txt")
    with open(listing, "w") as f:
        f.write("\n".join(lines) + "\n")
    net = ["--allow-private-networks", "--retries", "0", "--direct_num_workers", "2"]
    out = os.path.join(workdir, "ds")
    meta = downsample.run(["--input", listing, "--output", out, "--split", "train", "--batches", "1",
                           "--size", "8", *net])
    assert meta["counts"] == {"read": 10, "written": 8, "failed": 2}
    with open(os.path.join(out, "train_data_batch_1"), "rb") as f:
        batch = pickle.load(f)
    assert sorted(batch["labels"]) == [1, 1, 1, 1, 2, 2, 2, 2]
    with open(os.path.join(out, "failures.jsonl")) as f:
        reasons = sorted(json.loads(line)["reason"] for line in f)
    assert reasons[0].startswith("http_404") and reasons[1].startswith("repeated URL")
    assert sum(server.requests(f"/{('n01440764', 'n01443537')[i % 2]}_{i}.jpg") for i in range(8)) == 8

    out = os.path.join(workdir, "col")
    meta = colorize.run(["--input", listing, "--output", out, "--embedding", "none", *net])
    assert meta["counts"] == {"read": 10, "written": 8, "failed": 2}
    import tensorflow as tf
    names = sorted(tf.train.Example.FromString(r).features.feature["image_name"].bytes_list.value[0].decode()
                   for r in tf.data.TFRecordDataset(os.path.join(out, "lab_images_0.tfrecord")).as_numpy_iterator())
    assert names == sorted(line.split("\t")[0] for line in lines[:8])


def test_first_of_each_url_through_staged_runs_keeps_the_first_line_in_entry_order(tmp_path):
    """URL-list inputs of downsample/colorize find repeats by a sort-merge of runs on disk (bounded
    memory): per URL the first line in entry order is fetched, every other line is a counted repeat."""
    from imagebeam.transforms.bookkeeping import staging
    from imagebeam.transforms.inputs.downloads import entry_order, first_of_each_url, url_entry_item
    from imagebeam.transforms.inputs.url_lists import UrlEntry

    entries = [UrlEntry(f"http://h/{i % 7}.jpg", key=f"k{(i * 5) % 11}", label=None if i % 3 else "n0",
                        source=f"list{i % 2}.txt") for i in range(40)]
    entries.append(UrlEntry("http://h/ü.jpg", key=None, label="n1", source="x"))
    fn = staging._StageStreamFn(str(tmp_path), url_entry_item, None, memory_mb=1)
    fn.start_bundle()
    summaries = []
    for i, entry in enumerate(entries):
        summaries += list(fn.process(entry))
        if i % 9 == 8:  # several runs, as from several bundles
            summaries += [w.value for w in fn.finish_bundle() if not isinstance(w.value, staging.Failure)]
    summaries += [w.value for w in fn.finish_bundle() if not isinstance(w.value, staging.Failure)]
    firsts, repeats = [], []
    for task in staging.plan_buckets([s for s in summaries if isinstance(s, dict)]):
        for out in first_of_each_url(task, staging.read_bucket(task)):
            (repeats if isinstance(out, staging.Failure) else firsts).append(out)
    expected = {}
    for entry in entries:
        expected.setdefault(entry.url, []).append(entry)
    assert sorted(e for e, _ in firsts) == sorted(min(group, key=entry_order) for group in expected.values())
    assert len(repeats) == len(entries) - len(expected)
    assert {r.reason for r in repeats} >= {"repeated URL: listed 6 times, fetched once"}
