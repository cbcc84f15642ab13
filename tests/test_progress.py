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
