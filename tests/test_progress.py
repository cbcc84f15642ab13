"""Live progress: tickers in workers, one monitor in the launcher; best effort, never in the way."""
import io
import os
import pickle
import time

import pytest

from imagebeam import sample as sample_lib
from imagebeam.pipelines import cifar as cifar_job
from imagebeam.runners import options as job_options
from imagebeam.transforms.bookkeeping.progress import ProgressMonitor, ProgressTicker


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)
    return predicate()


def test_monitor_sums_ticks_and_draws_a_line():
    stream = io.StringIO()
    with ProgressMonitor("job", enabled=True, stream=stream, every=0.0) as monitor:
        ticker = pickle.loads(pickle.dumps(ProgressTicker(monitor.address)))  # as a DoFn ships it
        ticker.total(40)
        for _ in range(30):
            ticker.tick(ok=1)
        ticker.tick(failed=2)
        ticker.flush()
        assert wait_for(lambda: monitor.ok + monitor.failed == 32 and monitor.total == 40)
        line = monitor.line()
    assert "32 done, 2 failed" in line and "of ~40" in line and "ETA" in line
    assert stream.getvalue().endswith("\n") and "[job]" in stream.getvalue()


def test_disabled_monitor_and_ticker_do_nothing():
    with ProgressMonitor("job", enabled=False) as monitor:
        assert monitor.address is None
    ticker = ProgressTicker(None)
    ticker.tick(ok=5)
    ticker.flush()  # no socket, no error


@pytest.mark.pipeline
def test_a_local_job_reports_every_image(tmp_path, monkeypatch):
    archive = sample_lib.write_cifar_archive(str(tmp_path / "cifar-10-python.tar.gz"), "cifar10", 6, 8)
    seen = []

    def recording(job, options):
        monitor = ProgressMonitor(job, enabled=True, stream=io.StringIO(), every=0.0)
        seen.append(monitor)
        return monitor

    monkeypatch.setattr(job_options, "progress_monitor", recording)
    cifar_job.run(["--input", archive["path"], "--output", str(tmp_path / "out")])
    monitor = seen[0]
    assert monitor.ok == 6 * 5 + 8 and monitor.failed == 0
    assert os.path.exists(tmp_path / "out" / "metadata.json")


def test_list_size_estimates_the_total_without_reading_the_list(tmp_path):
    """Plain lists: size over the first MiB's bytes per line; Parquet: its row count; compressed: none."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    from imagebeam.transforms.inputs.url_lists import estimated_lines

    big = tmp_path / "big.txt"
    big.write_text("".join(f"n{i:08d}_{i}\thttp://example.org/{'x' * (i % 40)}/{i}.jpg\n" for i in range(60_000)))
    assert big.stat().st_size > 2 << 20  # beyond the sample
    assert abs(estimated_lines([str(big)]) - 60_000) < 60_000 * 0.05
    small = tmp_path / "small.csv"
    small.write_text("url,label\nhttp://a/1.jpg,x\nhttp://a/2.jpg,y\n")
    table = tmp_path / "t.parquet"
    pq.write_table(pa.table({"url": [f"http://b/{i}" for i in range(123)]}), table)
    assert estimated_lines([str(small), str(table)]) == 2 + 123
    upper = tmp_path / "URLS.TXT"  # a suffix in capitals is no compression
    upper.write_bytes(big.read_bytes())
    assert abs(estimated_lines([str(upper)]) - 60_000) < 60_000 * 0.05
    packed = tmp_path / "l.txt.gz"
    packed.write_bytes(gzip.compress(big.read_bytes()))
    assert estimated_lines([str(small), str(packed)]) is None


@pytest.mark.pipeline
def test_the_download_job_tells_the_monitor_its_total(tmp_path, monkeypatch):
    from imagebeam.pipelines import download

    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"http://10.0.0.{i}/{i}.jpg\n" for i in range(30)))  # refused: no traffic
    seen = []

    def recording(job, options):
        seen.append(ProgressMonitor(job, enabled=True, stream=io.StringIO(), every=0.0))
        return seen[-1]

    monkeypatch.setattr(job_options, "progress_monitor", recording)
    download.run(["--input", str(listing), "--output", str(tmp_path / "out")])
    assert seen[0].total == 30 and seen[0].failed == 30
