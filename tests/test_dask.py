"""imagebeam's jobs on Beam's DaskRunner (with imagebeam's fixes, runners/dask_runner.py) against a real
dask.distributed cluster - a scheduler and two single-threaded workers on 127.0.0.1, started here as
processes - give byte-identical files to the local runner, also when a worker is killed mid-job."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from spec_loader import comparable  # noqa: E402

distributed = pytest.importorskip("distributed")

import apache_beam as beam  # noqa: E402
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402
from apache_beam.testing.util import assert_that, equal_to  # noqa: E402

from imagebeam import sample as sample_lib  # noqa: E402
from imagebeam.pipelines import colorize, downsample  # noqa: E402
from imagebeam.runners import options as job_options  # noqa: E402

pytestmark = [pytest.mark.dask, pytest.mark.pipeline]

# transform_fn/saved_model.pb names its traced functions with TensorFlow's process-wide counter
# (`__inference_signature_wrapper_61` in a long-lived dask worker, `_513` in the local runner's fresh
# process) and holds the float64 mean, whose last bits depend on the order TFT merged partial means in
# (Beam's hot-key fan-out groups bundles by a random nonce); fingerprint.pb hashes it and differs between
# two local runs already. The graphs are compared by what they compute instead (`assert_same_transform`).
GRAPH_FILES = {os.path.join("transform_fn", "saved_model.pb"), os.path.join("transform_fn", "fingerprint.pb")}


class Cluster:
    """A dask scheduler and `dask worker` processes (each its own process group: nanny + worker)."""

    def __init__(self, root: str):
        self.root = root
        self.scheduler_file = os.path.join(root, "scheduler.json")
        self.scheduler = None
        self.workers = []
        self._n = 0

    def _spawn(self, args, log):
        return subprocess.Popen([sys.executable, "-m", *args], stdout=open(os.path.join(self.root, log), "wb"),
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def start(self, n_workers: int = 2):
        self.scheduler = self._spawn(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                                      "--no-dashboard", "--scheduler-file", self.scheduler_file], "scheduler.log")
        deadline = time.monotonic() + 60
        while True:
            try:
                with open(self.scheduler_file) as f:
                    self.address = json.load(f)["address"]
                break
            except (OSError, ValueError, KeyError):
                if self.scheduler.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the dask scheduler did not start; see scheduler.log")
                time.sleep(0.1)
        for _ in range(n_workers):
            self.add_worker()
        self.wait_for_workers(n_workers)

    def add_worker(self):
        self._n += 1
        self.workers.append(self._spawn(
            ["distributed.cli.dask_worker", "--scheduler-file", self.scheduler_file, "--host", "127.0.0.1",
             "--nworkers", "1", "--nthreads", "1", "--no-dashboard", "--name", f"worker-{self._n}",
             "--local-directory", os.path.join(self.root, f"worker-{self._n}")], f"worker-{self._n}.log"))

    def client(self):
        return distributed.Client(self.address, timeout=30, set_as_default=False)

    def wait_for_workers(self, n: int):
        with self.client() as client:
            client.wait_for_workers(n, timeout=120)
            deadline = time.monotonic() + 60
            while len(client.nthreads()) != n:  # also after a kill: until the scheduler has dropped it
                assert time.monotonic() < deadline, client.nthreads()
                time.sleep(0.1)

    def kill(self, worker_pid: int):
        """SIGKILL the `dask worker` process group that runs the worker process `worker_pid`."""
        group = os.getpgid(worker_pid)
        (proc,) = [p for p in self.workers if p.pid == group]
        os.killpg(group, signal.SIGKILL)
        proc.wait(30)
        self.workers.remove(proc)

    def stop(self):
        for proc in self.workers + [self.scheduler]:
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.workers + [self.scheduler]:
            if proc is None:
                continue
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(str(tmp_path_factory.mktemp("dask")))
    try:
        c.start(2)
        yield c
    finally:
        c.stop()


def dask_args(cluster):
    return ["--runner", "dask", "--dask-address", cluster.address]


def files_of(out: str) -> dict:
    found = {}
    for dirpath, _, names in os.walk(out):
        for name in names:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, out)] = comparable(name, open(path, "rb").read())
    return found


def assert_identical(got: str, expected: str, skip=()):
    a, b = files_of(got), files_of(expected)
    assert sorted(a) == sorted(b)
    different = sorted(name for name in a if name not in skip and a[name] != b[name])
    assert not different, f"differ from the local runner's: {different}"


def train_args(ilsvrc, out):
    return ["--input", ilsvrc.train_tar, "--devkit", ilsvrc.devkit, "--output", out, "--size", "16"]


# ------------------------------------------------------------------------------------------------------
# The Beam features our jobs use, each checked on the cluster (these broke on Beam's own DaskRunner).


class _SplitOddEven(beam.DoFn):
    def setup(self):
        self.ready = True

    def start_bundle(self):
        self.seen = 0

    def process(self, x):
        assert self.ready
        self.seen += 1
        beam.metrics.Metrics.counter("test", "elements").inc()
        if x % 2:
            yield beam.pvalue.TaggedOutput("odd", x)
        else:
            yield x

    def finish_bundle(self):
        yield beam.transforms.window.GlobalWindows.windowed_value(("bundle", self.seen))


def _features(p, text_path):
    numbers = p | "Numbers" >> beam.Create(range(20)) | "Spread" >> beam.Reshuffle()
    split = numbers | "Split" >> beam.ParDo(_SplitOddEven()).with_outputs("odd", main="even")
    evens = split.even | "OnlyNumbers" >> beam.Filter(lambda x: not isinstance(x, tuple))
    bundles = split.even | "BundleCounts" >> beam.Filter(lambda x: isinstance(x, tuple)) | beam.Values()
    assert_that(evens, equal_to(list(range(0, 20, 2))), label="EvenOnly")
    assert_that(split.odd, equal_to(list(range(1, 20, 2))), label="OddOnly")
    assert_that(bundles | "SumBundles" >> beam.CombineGlobally(sum), equal_to([20]), label="FinishBundle")
    keyed = p | "Keyed" >> beam.Create([("a", i) for i in range(50)] + [("b", 1)])
    fanned = keyed | "Fanout" >> beam.CombinePerKey(sum).with_hot_key_fanout(3)
    assert_that(fanned, equal_to([("a", 1225), ("b", 1)]), label="HotKeyFanout")
    factor = p | "Factor" >> beam.Create([3])
    table = p | "Table" >> beam.Create([("one", 1), ("two", 2)])
    scaled = split.odd | "Scale" >> beam.Map(lambda x, k, all_, d: x * k + len(all_) + d["two"],
                                             beam.pvalue.AsSingleton(factor), beam.pvalue.AsList(factor),
                                             beam.pvalue.AsDict(table))
    assert_that(scaled, equal_to([3 * x + 3 for x in range(1, 20, 2)]), label="SideInputs")
    big = (p | "BigValues" >> beam.Create(range(6))
           | "FourMB" >> beam.Map(lambda i: (i % 2, bytes([i]) * (4 << 20)))
           | "GroupBig" >> beam.GroupByKey()
           | "Sizes" >> beam.MapTuple(lambda k, vs: (k, sorted((len(v), v[0]) for v in vs))))
    assert_that(big, equal_to([(0, [(4 << 20, 0), (4 << 20, 2), (4 << 20, 4)]),
                               (1, [(4 << 20, 1), (4 << 20, 3), (4 << 20, 5)])]), label="LargeValues")
    parts = numbers | "Parts" >> beam.Partition(lambda x, n: x % n, 3)
    joined = ({"p0": parts[0] | "K0" >> beam.Map(lambda x: (x % 5, x)),
               "p1": parts[1] | "K1" >> beam.Map(lambda x: (x % 5, x))}
              | "Join" >> beam.CoGroupByKey()
              | "Sorted" >> beam.MapTuple(lambda k, v: (k, sorted(v["p0"]), sorted(v["p1"]))))
    assert_that(joined, equal_to([(k, [x for x in range(0, 20, 3) if x % 5 == k],
                                   [x for x in range(1, 20, 3) if x % 5 == k]) for k in range(5)]),
                label="PartitionCoGroupByKey")
    lines = p | "ReadText" >> beam.io.ReadFromText(text_path)
    assert_that(lines, equal_to([f"line {i}" for i in range(100)]), label="ReadFromText")


def test_beam_features_and_counters(cluster, tmp_path):
    text = tmp_path / "lines.txt"
    text.write_text("".join(f"line {i}\n" for i in range(100)))
    opts = PipelineOptions(job_options.beam_args_with_defaults(dask_args(cluster)))
    counters = job_options.run_pipeline(_features, opts, str(text))
    assert counters["test:elements"] == 20


# ------------------------------------------------------------------------------------------------------
# The jobs: Dask vs the local runner.


@pytest.fixture(scope="module")
def train_runs(ilsvrc, cluster, tmp_path_factory):
    local = str(tmp_path_factory.mktemp("train_local"))
    on_dask = str(tmp_path_factory.mktemp("train_dask"))
    downsample.run(train_args(ilsvrc, local) + ["--direct_num_workers", "2"])
    downsample.run(train_args(ilsvrc, on_dask) + dask_args(cluster))
    return local, on_dask


def transformed(out: str, rows: np.ndarray) -> np.ndarray:
    import tensorflow as tf
    import tensorflow_transform as tft

    result = tft.TFTransformOutput(out).transform_raw_features({"image": tf.constant(rows, tf.int64)})
    return np.asarray(result["image"])


def test_downsample_train_is_identical(train_runs):
    local, on_dask = train_runs
    assert_identical(on_dask, local, skip=GRAPH_FILES)
    assert_same_transform(on_dask, local)


def assert_same_transform(got: str, expected: str):
    """Both transform_fn graphs normalise the rows of a batch file alike, and an all-zero row (-mean/255,
    the mean the batch files carry) identically."""
    from spec_loader import unpickle

    data = unpickle(os.path.join(expected, "train_data_batch_1"))["data"].astype(np.int64)
    rows = np.concatenate([data, np.zeros((1, data.shape[1]), np.int64)])
    a, b = transformed(got, rows), transformed(expected, rows)
    assert a[-1].tobytes() == b[-1].tobytes()
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_downsample_val_is_identical(ilsvrc, cluster, tmp_path):
    args = ["--input", ilsvrc.val_tar, "--devkit", ilsvrc.devkit, "--split", "val", "--size", "16",
            "--format", "npz"]
    local, on_dask = str(tmp_path / "local"), str(tmp_path / "dask")
    downsample.run(args + ["--output", local, "--direct_num_workers", "2"])
    meta = downsample.run(args + ["--output", on_dask] + dask_args(cluster))
    assert meta["counts"]["written"] == len(ilsvrc.val) and meta["counts"]["failed"] == 0
    assert_identical(on_dask, local)


@pytest.fixture(scope="module")
def photos(tmp_path_factory, good_jpeg):
    root = tmp_path_factory.mktemp("photos")
    for i, data in enumerate(sample_lib.imagenet_like_jpegs(6, seed=11)):
        cls = root / ("cats" if i % 2 else "dogs")
        cls.mkdir(exist_ok=True)
        (cls / f"p{i:02d}.jpg").write_bytes(data)
    odd = sample_lib.oddities()
    for name in sorted(odd)[:2]:  # e.g. CMYK, grey
        (root / "dogs" / name.replace("/", "_")).write_bytes(odd[name])
    (root / "cats" / "broken.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 3])
    return str(root)


@pytest.mark.parametrize("embedding", [
    ["--embedding", "inception_resnet_v2", "--inception-weights", "random", "--val-fraction", "0.3"],
    ["--embedding", "none"],
], ids=["inception_random", "none"])
def test_colorize_is_identical(photos, cluster, tmp_path, embedding):
    args = ["--input", photos, "--examples-per-file", "3", "--batch-size", "4", *embedding]
    local, on_dask = str(tmp_path / "local"), str(tmp_path / "dask")
    colorize.run(args + ["--output", local, "--direct_num_workers", "2"])
    meta = colorize.run(args + ["--output", on_dask] + dask_args(cluster))
    assert meta["counts"] == {"read": 9, "written": 8, "failed": 1}
    assert sum(name.endswith(".tfrecord") for name in files_of(on_dask)) >= 3
    assert_identical(on_dask, local)


# ------------------------------------------------------------------------------------------------------
# A worker killed in the middle of a job: dask recomputes what it held, the survivor finishes the job.


def test_worker_killed_mid_job_changes_nothing(ilsvrc, cluster, train_runs, tmp_path):
    local, _ = train_runs
    out = str(tmp_path / "killed")
    outcome = {}

    def job():
        try:
            outcome["meta"] = downsample.run(train_args(ilsvrc, out) + dask_args(cluster))
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    with cluster.client() as client:
        pids = client.run(os.getpid)  # worker address -> worker process id
        runner = threading.Thread(target=job)
        runner.start()
        victim = None
        deadline = time.monotonic() + 120
        while victim is None and runner.is_alive() and time.monotonic() < deadline:
            for address, keys in client.processing().items():
                if any("StageUnit" in str(key) for key in keys):  # phase 1's heavy step is under way
                    victim = address
                    break
            else:
                time.sleep(0.01)
        assert victim is not None and runner.is_alive(), "the job finished before a worker could be killed"
        cluster.kill(pids[victim])
        cluster.wait_for_workers(1)  # the scheduler has dropped it; the job goes on on the survivor
        runner.join(300)
    try:
        assert not runner.is_alive()
        assert "error" not in outcome, outcome.get("error")
        with open(os.path.join(local, "metadata.json")) as f:
            assert outcome["meta"]["counts"] == json.load(f)["counts"]
        assert_identical(out, local, skip=GRAPH_FILES)
        assert_same_transform(out, local)
    finally:
        cluster.add_worker()  # back to two workers for anything that runs after this test
        cluster.wait_for_workers(2)


@pytest.mark.parametrize("name", ["downsample-train-pickle", "downsample-val-npz", "colorize-val-random"])
def test_dask_outputs_equal_recorded_digests(name, ilsvrc, cluster, tmp_path):
    from test_output_digests import check_case

    check_case(name, ilsvrc, str(tmp_path / "out"), dask_args(cluster))
