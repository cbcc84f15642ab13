"""`imagebeam download` in shards: repeats across shards, content duplicates, a kill between shards, memory."""
import glob
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from imagebeam import sample as sample_lib
from imagebeam.http_fixture import PhotoServer
from imagebeam.pipelines import download
from imagebeam.transforms.bookkeeping.staging import plan_bucket_ranges
from imagebeam.transforms.inputs.download_shards import PreviousIndex, first_entries, sum_counts
from imagebeam.transforms.inputs import url_lists
from imagebeam.transforms.inputs.url_lists import UrlEntry, cut_shards, list_ranges, stream_list, url_md5

NET = ["--allow-private-networks", "--timeout", "0.5", "--retries", "0", "--threads", "8"]


@pytest.fixture(scope="module")
def photos():
    return list(sample_lib.imagenet_like_jpegs(8, seed=33))


def read(path):
    with open(path, "rb") as f:
        return f.read()


# --- pure parts -------------------------------------------------------------------------------------------

def test_cut_shards_streams_consecutive_lines(tmp_path):
    path = str(tmp_path / "urls.txt.gz")
    with gzip.open(path, "wt") as f:
        f.write("# header\n\n" + "".join(f"n01440764_{i}\thttp://h/{i}.jpg\n" for i in range(7)))
    shards = [s for r in list_ranges(3, path) for s in cut_shards(r, 3)]
    assert [s.id for s in shards] == ["0003-0000-0000000", "0003-0000-0000001", "0003-0000-0000002"]
    assert [[e.url for e in s.entries] for s in shards] == [[f"http://h/{i}.jpg" for i in r]
                                                             for r in ([0, 1, 2], [3, 4, 5], [6])]
    assert shards[0].entries[0].label == "n01440764" and shards[0].entries[0].source == path


@pytest.mark.parametrize("name,header,line", [
    ("urls.txt", "", "n01440764_{i}\thttp://h/{i}{pad}.jpg"),
    ("urls.csv", "key,url\n", "k{i},http://h/{i}{pad}.jpg"),
    ("urls.jsonl", "", '{{"url": "http://h/{i}{pad}.jpg", "key": "k{i}"}}')])
@pytest.mark.parametrize("range_bytes", [1, 7, 37, 64, 4096])
def test_byte_ranges_of_a_list_hold_each_line_once_in_order(tmp_path, name, header, line, range_bytes):
    """Any worker may read any range: together they give the list's entries once each, in file order,
    wherever the cuts fall (inside a line, on a line start, in the header), a last line without newline too."""
    path = tmp_path / name
    body = "\n".join(line.format(i=i, pad="x" * (i * 7 % 23)) for i in range(60))
    path.write_text(header + body + ("" if range_bytes == 37 else "\n"))
    ranges = list_ranges(2, str(path), range_bytes)
    assert len(ranges) == -(-path.stat().st_size // range_bytes)
    key = "url" if name != "urls.txt" else None
    whole = list(stream_list(str(path), key_column=key and "key"))
    cut = [e for r in ranges for s in cut_shards(r, 4, key_column=key and "key") for e in s.entries]
    assert cut == whole and len(whole) == 60
    assert len({s.id for r in ranges for s in cut_shards(r, 4)}) == sum(1 for r in ranges for _ in cut_shards(r, 4))


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz"])
def test_compressed_lists_are_inflated_a_block_at_a_time(tmp_path, suffix, monkeypatch):
    """Python's streaming readers, not Beam's (which inflates a whole 16 MiB read at once): the same
    lines as the plain list, concatenated gzip members included."""
    import bz2
    import lzma

    from imagebeam.transforms.inputs import url_lists

    text = "".join(f"n01440764_{i}\thttp://h/{i}.jpg\n" for i in range(5000)).encode()
    pack = {".gz": lambda b: gzip.compress(b[:1000]) + gzip.compress(b[1000:]), ".bz2": bz2.compress,
            ".xz": lzma.compress}[suffix]
    path = tmp_path / f"urls.txt{suffix}"
    path.write_bytes(pack(text))
    monkeypatch.setattr(url_lists.FileSystems, "open", _only_raw(url_lists.FileSystems.open))
    assert b"".join(url_lists._lines(str(path))) == text
    assert [e.url for r in list_ranges(0, str(path)) for s in cut_shards(r, 1000) for e in s.entries] == [
        f"http://h/{i}.jpg" for i in range(5000)]


def _only_raw(open_):
    def opened(path, *args, compression_type=None, **kwargs):
        from apache_beam.io.filesystem import CompressionTypes

        assert compression_type == CompressionTypes.UNCOMPRESSED, "Beam's decompressing reader was used"
        return open_(path, *args, compression_type=compression_type, **kwargs)
    return staticmethod(opened)


def test_first_entries_keeps_the_first_in_entry_order():
    a, b = UrlEntry("http://h/a", "k2"), UrlEntry("http://h/a", "k1")
    firsts = first_entries([UrlEntry("http://h/z"), a, b])
    assert list(firsts) == ["http://h/z", "http://h/a"] and firsts["http://h/a"] is b


def test_bucket_ranges_cover_every_entry_once():
    summaries = [{"run": "r1", "buckets": [[0, 0, 10, 2], [1, 10, 5, 1], [7, 15, 5, 3]]},
                 {"run": "r2", "buckets": [[1, 0, 4, 4], [7, 4, 6, 1]]}]
    tasks = plan_bucket_ranges(summaries, max_entries=5)
    assert [t.bucket for t in tasks] == [0, 1, 7] and [t.count for t in tasks] == [2, 5, 4]
    assert plan_bucket_ranges(summaries, 100)[0].slices == (("r1", 0, 20), ("r2", 0, 10))
    assert sum_counts([{"a": 1, "x": [1]}, {"a": 2, "b": 3}]) == {"a": 3, "b": 3}


def test_previous_index_finds_final_records(tmp_path):
    records = [{"url": f"http://h/{i}", "status": s, "file": f"{url_md5(f'http://h/{i}')}.png" if s == "ok" else None}
               for i, s in enumerate(["ok", "http_404", "timeout", "duplicate"])]
    records.sort(key=lambda r: url_md5(r["url"]))
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert PreviousIndex.build(str(manifest), str(tmp_path / "idx")) == 3
    index = PreviousIndex(str(tmp_path / "idx"))
    found = index.find([url_md5(f"http://h/{i}") for i in range(5)])
    assert found[2] is None and found[4] is None  # transient, unknown
    assert found[1][0] == 0 and found[3][0] == 0 and found[0][0] > 0  # failures; ok with its extension
    with open(manifest, "rb") as f:
        f.seek(found[0][1])
        assert json.loads(f.readline())["url"] == "http://h/0"


# --- the job ----------------------------------------------------------------------------------------------

def shard_scenario(server, photos):
    """List lines: the same URL in different shards (ok, 404, blocked), the same image at two URLs."""
    good = [server.add_file(f"/g{i}.jpg", photos[i]) for i in range(6)]
    copy = server.add_file("/a-copy.jpg", photos[1])         # the same bytes as g1, at another URL
    gone = server.add_status("/gone.jpg", 404)
    lines = [f"n01440764_{i}\t{u}" for i, u in enumerate(good)]
    lines[3:3] = [f"n09999999_1\t{good[4]}", f"x\t{gone}", "ftp://example.org/a.jpg", f"n01443537_9\t{copy}"]
    lines += [f"n00000001_1\t{good[4]}", f"y\t{gone}", "ftp://example.org/a.jpg", f"n01440764_0\t{good[0]}"]
    return lines, good, copy, gone


@pytest.mark.pipeline
def test_repeats_across_shards_give_the_one_shard_manifest(photos, tmp_path):
    with PhotoServer() as server:
        lines, good, copy, gone = shard_scenario(server, photos)
        listing = tmp_path / "urls.txt"
        listing.write_text("\n".join(lines) + "\n")
        runs = {}
        for name, extra in (("one", []), ("three", ["--shard-size", "3"]),
                            ("three-2proc", ["--shard-size", "3", "--direct_running_mode", "multi_processing",
                                             "--direct_num_workers", "2"])):
            out = str(tmp_path / name)
            runs[name] = (download.run(["--input", str(listing), "--output", out, *NET, *extra]), out)
        with pytest.MonkeyPatch.context() as patch:  # the list cut into ~6 byte ranges, spread on 2 workers
            patch.setattr(url_lists, "LIST_RANGE_BYTES", 100)
            out = str(tmp_path / "ranges-2proc")
            runs["ranges-2proc"] = (download.run(["--input", str(listing), "--output", out, *NET, "--shard-size", "2",
                                                  "--direct_running_mode", "multi_processing",
                                                  "--direct_num_workers", "2"]), out)
    manifests = {name: read(os.path.join(out, "manifest.jsonl")) for name, (_, out) in runs.items()}
    assert manifests["three"] == manifests["one"] == manifests["three-2proc"] == manifests["ranges-2proc"]
    assert runs["ranges-2proc"][0]["counts"]["listed"] == len(lines)
    assert read(os.path.join(runs["three"][1], "metadata.json")) == read(os.path.join(runs["one"][1], "metadata.json"))
    meta, out = runs["three"]
    assert meta["counts"]["listed"] == len(lines) and meta["counts"]["repeated_lines"] == 5
    by_url = {r["url"]: r for r in map(json.loads, manifests["three"].decode().splitlines())}
    assert len(by_url) == meta["counts"]["urls"] == 9
    # key and label of a repeated URL: its first line in entry order, wherever the shards put it
    assert (by_url[good[4]]["key"], by_url[good[4]]["label"]) == ("n00000001_1", "n00000001")
    assert by_url[gone]["status"] == "http_404" and by_url[gone]["key"] == "x"
    assert by_url[copy]["status"] == "ok" and by_url[good[1]]["status"] == "duplicate"  # /a-copy sorts first
    assert by_url[good[1]]["file"] == by_url[copy]["file"] and by_url[good[1]]["duplicate_of"] == copy
    assert sorted(n for n in os.listdir(out) if not n.endswith("json") and not n.endswith("jsonl")) == \
        sorted(url_md5(u) + ".jpeg" for u in [copy] + good[:1] + good[2:])


@pytest.mark.pipeline
def test_kill_between_shards_refetches_only_what_was_in_flight(photos, tmp_path):
    n = 200
    with PhotoServer(latency=0.05) as server:
        urls = [server.add_file(f"/p{i}.jpg", photos[i % len(photos)] + b"\0" * (i + 1)) for i in range(n)]
        listing = tmp_path / "urls.txt"
        listing.write_text("".join(f"{u}\n" for u in urls))
        out = str(tmp_path / "dl")
        args = ["--input", str(listing), "--output", out, "--allow-private-networks", "--shard-size", "20"]
        proc = subprocess.Popen([sys.executable, "-m", "imagebeam.cli", "download", *args, "--threads", "2",
                                 "--per-host", "2"], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and len(glob.glob(os.path.join(out, ".shards", "shards", "*.json"))) < 3:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        first = {u: server.requests(u[len(server.base_url):]) for u in urls}
        stored = {u for u in urls if os.path.exists(os.path.join(out, url_md5(u) + ".jpeg"))}
        done_shards = len(glob.glob(os.path.join(out, ".shards", "shards", "*.json")))
        assert 3 <= done_shards < n // 20 and not os.path.exists(os.path.join(out, "manifest.jsonl"))

        meta = download.run([*args, "--threads", "8", "--per-host", "8"])
        again = {u: server.requests(u[len(server.base_url):]) for u in urls}
    # stored images (finished, or written but not yet recorded) are never fetched again; what was in flight
    # without its file is fetched once more, the rest once
    assert all(again[u] == 1 for u in stored)
    assert all(again[u] == first[u] + 1 for u in urls if u not in stored)
    in_flight = [u for u in urls if first[u] and u not in stored]
    assert len(in_flight) <= 2 * 2  # at most 2 x --threads downloads were in flight
    c = meta["counts"]
    assert c["ok"] == n and c["kept_from_earlier_runs"] >= 20 * done_shards
    assert c["kept_from_earlier_runs"] + c["processed_this_run"] == n
    assert sorted(os.listdir(out)) == sorted([url_md5(u) + ".jpeg" for u in urls] + ["manifest.jsonl", "metadata.json"])


@pytest.mark.pipeline
def test_memory_bound_on_a_half_million_line_refused_list(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "benchmarks"))
    from bench_download_memory import GOAL_BYTES, measure

    run = measure(500_000, str(tmp_path))
    print(f"500,000 refused lines: peak RSS {run.peak_rss / 2 ** 20:.0f} MiB, {run.wall:.0f} s")
    assert run.counts["listed"] == run.counts["urls"] == 500_000 and run.counts["ok"] == 0
    assert run.peak_rss < GOAL_BYTES


@pytest.mark.pipeline
def test_rerun_of_a_finished_list_fetches_and_reads_nothing(photos, tmp_path, monkeypatch):
    from imagebeam.transforms.inputs import download_shards

    with PhotoServer() as server:
        urls = [server.add_file(f"/q{i}.jpg", photos[i % len(photos)] + b"\0" * i) for i in range(50)]
        urls.append(server.add_status("/gone.jpg", 404))
        listing = tmp_path / "urls.txt"
        listing.write_text("".join(f"{u}\n" for u in urls))
        args = ["--input", str(listing), "--output", str(tmp_path / "dl"), "--shard-size", "20", *NET]
        first = download.run(args)
        before = server.total_requests()
        calls = []
        real = download_shards.download_one
        monkeypatch.setattr(download_shards, "download_one", lambda *a, **k: calls.append(a) or real(*a, **k))
        again = download.run(args)
        assert server.total_requests() == before
        # every URL kept from the finished run's manifest: no image file opened (download_one reads them)
        assert calls == [] and again["counts"]["kept_from_earlier_runs"] == len(urls) == first["counts"]["urls"]
        assert again["statuses"] == first["statuses"] == {"ok": 50, "http_404": 1}
        os.remove(tmp_path / "dl" / (url_md5(urls[7]) + ".jpeg"))  # an ok record whose file went: fetched again
        third = download.run(args)
        assert len(calls) == 1 and server.total_requests() == before + 1 and server.requests("/q7.jpg") == 2
        assert third["counts"]["processed_this_run"] == 1 and third["statuses"] == first["statuses"]


@pytest.mark.pipeline
def test_memory_bound_on_a_refused_list_given_as_colorize_input(tmp_path):
    """The same bound when the list is an image job's --input: every line is a failure, sorted into
    failures.jsonl on disk (2.2 GiB at 400,000 lines when failures were gathered in memory)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "benchmarks"))
    from bench_download_memory import GOAL_BYTES, measure

    run = measure(400_000, str(tmp_path), job="colorize")
    print(f"400,000 refused lines as colorize --input: peak RSS {run.peak_rss / 2 ** 20:.0f} MiB, {run.wall:.0f} s")
    assert run.counts["read"] == run.counts["failed"] == 400_000 and run.counts["written"] == 0
    assert run.peak_rss < GOAL_BYTES
