"""Benchmark of `imagebeam cifar` (pickle format) against the seed's method, measured side by side.

Workload: CIFAR-100-format archives (`cifar-100-python.tar.gz` layout: train, test, meta pickles, protocol 2,
channel-planar rows) built by `imagebeam.sample.write_cifar_archive` from 32x32 crops of the real photos
scikit-image and scikit-learn ship, at two sizes N1 < N2 (5/6 train, 1/6 test, as CIFAR's 50,000/10,000;
the default N2 is the real archive's 60,000 images). Building them takes about 1.7 ms per image.

1. reference, the seed's method (seeds/003) as written, in this process (imports excluded): the
   extraction (tarfile.extractall), unpickle train/test/meta (encoding="bytes"), np.reshape + transpose to
   NHWC, np.random.seed(SEED) + np.random.permutation shuffle of the train set, a Python loop of
   cv2.filter2D(img, -1, kernel) per image (train and test), pickle.dump(HIGHEST_PROTOCOL); images/s at N2
   (best of --repeat);
2. ours: `imagebeam cifar --input ARCHIVE --output DIR` (pickle format, the seed's keys) as a real command,
   in-process (its local default), then with 1 and with 2 SDK worker processes, at N1 and N2, each
   `--repeat` times (the fastest counts). Beam's start-up
   (several seconds) is a large share of a small run, so the figure that counts is the steady-state rate
   (N2-N1)/(t2-t1); the end-to-end rates are printed too. Peak memory: the summed RSS of the job's whole
   process tree (runner + SDK workers), sampled every 0.1 s.
   The outputs are checked against the seed's at N1: test set identical, train set the same images.

    python tests/benchmarks/bench_cifar.py [--n1 6000] [--n2 60000] [--repeat 2] [--json PATH]

--json PATH writes the summary bench_all.py tabulates (see common.summary): ours = the in-process steady-state
rate, per that one process; reference = the seed's method, one core; 1->2 scaling = 2-worker / 1-worker
steady rate (worker processes); peak RSS = the in-process runs' largest.
"""
from __future__ import annotations

import argparse
import os
import pickle
import shutil
import sys
import tarfile
import tempfile
import time

import common
import numpy as np

from imagebeam import sample as sample_lib

SEED = 0


# --- the seed's method (seeds/003), as written ---------------------------------------------------------
def seed_method(archive: str, work: str, seed: int = SEED) -> str:
    import cv2

    data_root = os.path.join(work, "extracted")
    tar = tarfile.open(archive)                       # maybe_extract
    tar.extractall(data_root)
    tar.close()

    def unpickle(file):
        with open(file, "rb") as fo:
            dict = pickle.load(fo, encoding="bytes")  # noqa: A001 - the seed's name
        return dict

    train_dec = unpickle(os.path.join(data_root, "cifar-100-python/train"))
    test_dec = unpickle(os.path.join(data_root, "cifar-100-python/test"))
    meta = unpickle(os.path.join(data_root, "cifar-100-python/meta"))
    train_data = train_dec[b"data"]
    train_labels = np.array(train_dec[b"fine_labels"])
    test_data = test_dec[b"data"]
    test_labels = np.array(test_dec[b"fine_labels"])
    label_names = meta[b"fine_label_names"]

    def reshape(dataset):
        return np.reshape(dataset, (-1, 3, 32, 32)).transpose((0, 2, 3, 1))

    def randomize(dataset, labels):
        permutation = np.random.permutation(dataset.shape[0])
        shuffled_dataset = dataset[permutation, :, :]
        shuffled_labels = labels[permutation]
        return shuffled_dataset, shuffled_labels

    np.random.seed(seed)
    train_data = reshape(train_data)
    test_data = reshape(test_data)
    train_data, train_labels = randomize(train_data, train_labels)

    def sharpen(dataset):
        kernel = (-1 / 256.0) * np.array(
            np.asarray([[1, 4, 6, 4, 1], [4, 16, 24, 16, 4], [6, 24, -476, 24, 6], [4, 16, 24, 16, 4],
                        [1, 4, 6, 4, 1]]))
        for i in range(dataset.shape[0]):
            dataset[i] = cv2.filter2D(dataset[i], -1, kernel)
        return dataset

    train_data = sharpen(train_data)
    test_data = sharpen(test_data)

    pickle_file = os.path.join(work, "CIFAR_100_processed.pickle")
    f = open(pickle_file, "wb")
    save = {"train_dataset": train_data, "train_labels": train_labels, "test_dataset": test_data,
            "test_labels": test_labels, "label_names": label_names}
    pickle.dump(save, f, pickle.HIGHEST_PROTOCOL)
    f.close()
    return pickle_file
# --------------------------------------------------------------------------------------------------------


def split(n: int) -> tuple:
    """(train, test) for n images: 5/6 train, as CIFAR-100's 50,000 / 10,000."""
    train = n * 5 // 6
    return train, n - train


def build_archive(path: str, n: int) -> str:
    train, test = split(n)
    sample_lib.write_cifar_archive(path, "cifar100", train_per_batch=train, test=test, seed=1)
    return path


def reference_rate(archive: str, n: int, work: str, repeat: int) -> tuple:
    """(images/s, seconds of the extraction in the fastest run)."""
    best, extract = float("inf"), 0.0
    for r in range(max(1, repeat)):
        run_dir = os.path.join(work, f"seed-{n}-{r}")
        os.makedirs(run_dir)
        t = time.perf_counter()
        with tarfile.open(archive) as tar:  # the extraction alone, timed apart for the print-out
            tar.extractall(os.path.join(run_dir, "probe"))
        t_extract = time.perf_counter() - t
        shutil.rmtree(os.path.join(run_dir, "probe"))
        t = time.perf_counter()
        seed_method(archive, run_dir)
        wall = time.perf_counter() - t
        shutil.rmtree(run_dir)
        if wall < best:
            best, extract = wall, t_extract
    return n / best, extract


# configuration: the extra flags (the default is in-process; worker processes for the 1->2 scaling)
CONFIGS = {"in-process": [],
           "1 worker": ["--direct_running_mode", "multi_processing", "--direct_num_workers", "1"],
           "2 workers": ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]}


def run_job(archive: str, out: str, config: str) -> common.Measurement:
    return common.run_measured([sys.executable, "-m", "imagebeam.cli", "cifar", "--input", archive,
                                "--output", out, "--seed", str(SEED), *CONFIGS[config]])


def check_same(seed_pickle: str, ours_pickle: str) -> str:
    """The seed's output and ours hold the same data: test set identical, train set the same images."""
    with open(seed_pickle, "rb") as f:
        a = pickle.load(f)
    with open(ours_pickle, "rb") as f:
        b = pickle.load(f)
    assert np.array_equal(a["test_dataset"], b["test_dataset"]), "test sets differ"
    assert np.array_equal(a["test_labels"], b["test_labels"]), "test labels differ"
    assert list(a["label_names"]) == list(b["label_names"]), "label names differ"

    def rows(d, l):
        flat = d.reshape(len(d), -1)
        return sorted(zip((r.tobytes() for r in flat), l.tolist()))

    assert rows(a["train_dataset"], a["train_labels"]) == rows(b["train_dataset"], b["train_labels"]), \
        "train sets differ (as sets of (image, label))"
    return (f"outputs agree: test set identical ({len(a['test_dataset'])} images), train set the same "
            f"{len(a['train_dataset'])} (image, label) pairs in a different seeded order")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n1", type=int, default=6000, help="images in the small archive (train + test)")
    ap.add_argument("--n2", type=int, default=60000,
                    help="images in the large archive (train + test); 60000 is CIFAR-100's real size")
    ap.add_argument("--repeat", type=int, default=2, help="runs per configuration and size; the fastest counts")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, metavar="PATH", help="write a summary dict (for bench_all.py)")
    args = ap.parse_args(argv)
    if not 6 <= args.n1 < args.n2:
        raise SystemExit("need 6 <= --n1 < --n2")
    work = args.workdir or tempfile.mkdtemp(prefix="imagebeam-bench-cifar-")
    os.makedirs(work, exist_ok=True)
    try:
        bench(args, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def bench(args, work: str) -> None:
    machine = common.machine()
    print(common.machine_line(machine))
    t = time.perf_counter()
    archives = {n: build_archive(os.path.join(work, f"cifar-100-python-{n}.tar.gz"), n)
                for n in (args.n1, args.n2)}
    print(f"workload: CIFAR-100-format archives of {args.n1} and {args.n2} real-photo 32x32 crops "
          f"({' and '.join('%d+%d' % split(n) for n in (args.n1, args.n2))} train+test, "
          f"{os.path.getsize(archives[args.n2]) / common.MIB:.1f} MiB at {args.n2}), made in "
          f"{time.perf_counter() - t:.0f} s")

    ref, extract = reference_rate(archives[args.n2], args.n2, work, args.repeat)
    print(f"reference, the seed's method (1 process, extraction included), {args.n2} images: "
          f"{ref:8.1f} images/s (extraction {extract:.2f} s of {args.n2 / ref:.2f} s)")

    states = {}
    for k, config in enumerate(CONFIGS):
        st = common.two_sizes(lambda n, r: run_job(archives[n], os.path.join(work, f"out-{k}-{n}-{r}"),
                                                   config), args.n1, args.n2, args.repeat)
        states[config] = st
        print(f"ours, imagebeam cifar, {config:<10}: steady {st.rate:8.1f} images/s | end-to-end "
              f"{args.n1}: {st.end_to_end(args.n1):7.1f}/s ({st.walls[args.n1]:.1f} s), "
              f"{args.n2}: {st.end_to_end(args.n2):7.1f}/s ({st.walls[args.n2]:.1f} s) | peak RSS "
              f"{st.peaks[args.n1] / common.MIB:.0f} MiB @ {args.n1}, {st.peaks[args.n2] / common.MIB:.0f} MiB @ "
              f"{args.n2} | CPU {st.cores_busy:.2f} cores busy (steady)")

    seed_small = os.path.join(work, "seed-check")
    os.makedirs(seed_small)
    agree = check_same(seed_method(archives[args.n1], seed_small),
                       os.path.join(work, f"out-0-{args.n1}-0", "CIFAR_100_processed.pickle"))
    ours, one, two = states["in-process"].rate, states["1 worker"].rate, states["2 workers"].rate
    st0 = states["in-process"]
    startup = st0.walls[args.n1] - args.n1 / ours if ours == ours else float("nan")
    share = startup / st0.walls[args.n1]
    print()
    print(f"ours in-process (steady) / seed's method : {ours / ref:.3f}x")
    print(f"ours in-process / 1 worker process       : {ours / one:.2f}x  (the hops to and from a worker "
          "process cost more than the numpy work)")
    print(f"ours 2 workers / 1 worker (steady)       : {two / one:.2f}x  (an archive is one gzip stream, read "
          "in one pass: one work unit)")
    print(f"start-up share of the {args.n1}-image in-process run: about {common.fmt(startup, '.1f')} s of "
          f"{st0.walls[args.n1]:.1f} s ({common.fmt(share * 100, '.0f')}%)")
    print(agree)

    common.write_json(args.json, common.summary(
        "cifar", ours=ours, cores_used=1,
        how=(f"steady-state rate (N2-N1)/(t2-t1) of `imagebeam cifar` (pickle format; in-process, its local "
             f"default) on CIFAR-100-format archives of N1={args.n1}, N2={args.n2} images (fastest of "
             f"{args.repeat} run(s) per size), divided by its 1 process; start-up (about "
             f"{common.fmt(startup, '.0f')} s) is {common.fmt(share * 100, '.0f')}% of the N1 run, hence two "
             "sizes; cores_busy_steady says how many cores that process kept busy"),
        reference_rate=ref,
        reference=("the seed's method (seeds/003) in one process: tar extractall, unpickle, np.reshape/"
                   "transpose, np.random.seed + permutation, Python loop of cv2.filter2D per image, "
                   f"pickle.dump; {args.n2} images"),
        scaling=common.ratio(two, one), peak_rss=st0.peak,
        peak_rss_how=(f"largest RSS of the in-process job, sampled every {common.SAMPLE_S} s, at N1 and N2 "
                      "(the worker-process runs: peak_rss_mib_by_run)"),
        steady_images_per_s={c: st.rate for c, st in states.items()},
        end_to_end_images_per_s={c: {str(n): st.end_to_end(n) for n in (args.n1, args.n2)}
                                 for c, st in states.items()},
        peak_rss_mib_by_run={c: {str(n): st.peaks[n] / common.MIB for n in (args.n1, args.n2)}
                             for c, st in states.items()},
        cores_busy_steady=st0.cores_busy, images_per_cpu_s_steady=st0.per_cpu_s,
        reference_extract_s=extract, startup_s=startup, outputs_agree=agree,
        notes="; ".join(filter(None, (
            "pickle format; in-process (the local default)",
            f"{common.fmt(ours / one if one else None)}x one worker process",
            "1->2 workers: worker processes, an archive is one unit (one gzip stream)",
            f"kept {common.fmt(st0.cores_busy)} cores busy", f"start-up ~{common.fmt(startup, '.0f')} s",
            f"N={args.n1}/{args.n2}",
            common.unmeasurable(states))))))


if __name__ == "__main__":
    main()
