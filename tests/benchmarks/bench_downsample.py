"""Benchmark of `imagebeam downsample` against a bare single-process loop, measured side by side.

Workload: ImageNet-like JPEGs made from the real photos scikit-image and scikit-learn ship (random crops
scaled to about 500x375, quality 90), packed as an ILSVRC2012-style nested train tar (10 member tars).

Figures printed:
- bare loop: Image.open + convert("RGB") + resize((32, 32), BOX) over the same bytes, one process;
- the pipeline (1 worker, 2 workers, 1 worker with --fast-decode), each run as a real `imagebeam
  downsample` command at two input sizes N1 < N2, each run `--repeat` times (the fastest counts:
  start-up alone varies by seconds). The end-to-end rate N/wall includes Beam's and TensorFlow's
  start-up (10-20 s); the steady-state rate (N2-N1)/(t2-t1) is what a long job gets and is what the
  ratios use;
- peak memory: the summed RSS of the job's whole process tree (runner + SDK workers), sampled every
  0.1 s, for both input sizes;
- --fast-decode's mean absolute pixel difference to the exact path, over the unique photos.

    python tests/benchmarks/bench_downsample.py [--n1 1000] [--n2 16000] [--repeat 2] [--size 32]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

from imagebeam import sample as sample_lib
from imagebeam.transforms import decode, resize

N_CLASSES = 10


def build_tar(path: str, jpegs: List[bytes], n: int) -> str:
    """ILSVRC-style nested tar with n images (the unique JPEGs repeated under distinct names)."""
    per_class = [[] for _ in range(N_CLASSES)]
    for i in range(n):
        per_class[i % N_CLASSES].append(jpegs[i % len(jpegs)])
    with tarfile.open(path, "w") as outer:
        for c, members in enumerate(per_class):
            wnid = f"n{1440764 + c:08d}"
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for i, data in enumerate(members):
                    sample_lib.add_bytes(inner, f"{wnid}_{i}.JPEG", data)
            sample_lib.add_bytes(outer, f"{wnid}.tar", buf.getvalue())
    return path


def tree_rss_bytes(pid: int) -> int:
    """Summed RSS of pid and all its descendants, from /proc."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        stack.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total


def run_job(tar: str, out: str, size: int, workers: int, fast: bool) -> Tuple[float, int]:
    cmd = [sys.executable, "-m", "imagebeam.cli", "downsample", "--input", tar, "--output", out,
           "--size", str(size), "--direct_num_workers", str(workers)] + (["--fast-decode"] if fast else [])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_bytes(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if proc.returncode:
        sys.stderr.write(output.decode(errors="replace")[-4000:])
        raise SystemExit(f"job failed: {' '.join(cmd)}")
    return wall, peak[0]


def bare_loop(jpegs: List[bytes], n: int, size: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        img = Image.open(io.BytesIO(jpegs[i % len(jpegs)]))
        np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BOX))
    return n / (time.perf_counter() - start)


def fast_mad(jpegs: List[bytes], size: int) -> float:
    diffs = []
    for data in jpegs:
        exact = resize.planar_row(resize.squash(decode.decode_rgb(data), size)).astype(np.int16)
        fast = resize.planar_row(resize.squash(
            decode.decode_rgb(data, draft_size=resize.fast_draft_size(size)), size)).astype(np.int16)
        diffs.append(np.abs(exact - fast).mean())
    return float(np.mean(diffs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n1", type=int, default=1000)
    ap.add_argument("--n2", type=int, default=16000)
    ap.add_argument("--repeat", type=int, default=2, help="runs per configuration and size; the fastest counts")
    ap.add_argument("--unique", type=int, default=1500, help="distinct JPEGs generated from the photos")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="imagebeam-bench-")
    os.makedirs(work, exist_ok=True)

    t = time.perf_counter()
    jpegs = list(sample_lib.imagenet_like_jpegs(args.unique, seed=1))
    sizes = [Image.open(io.BytesIO(j)).size for j in jpegs[:200]]
    print(f"workload: {args.unique} unique real-photo JPEGs (median {int(np.median([s[0] for s in sizes]))}x"
          f"{int(np.median([s[1] for s in sizes]))}, {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB avg), "
          f"made in {time.perf_counter() - t:.0f} s")
    tars = {n: build_tar(os.path.join(work, f"train-{n}.tar"), jpegs, n) for n in (args.n1, args.n2)}

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    bare = bare_loop(jpegs, args.n2, args.size)
    print(f"bare loop (1 process): {bare:8.1f} images/s")

    results = {}
    for label, workers, fast in (("exact, 1 worker", 1, False), ("exact, 2 workers", 2, False),
                                 ("fast-decode, 1 worker", 1, True)):
        walls, peaks = {}, {}
        for n in (args.n1, args.n2):
            runs = [run_job(tars[n], os.path.join(work, f"out-{workers}-{fast}-{n}-{r}"), args.size, workers, fast)
                    for r in range(args.repeat)]
            walls[n], peaks[n] = min(w for w, _ in runs), max(m for _, m in runs)
        steady = (args.n2 - args.n1) / (walls[args.n2] - walls[args.n1])
        results[label] = steady
        print(f"pipeline {label:<22}: steady {steady:8.1f} images/s | end-to-end "
              f"{args.n1}: {args.n1 / walls[args.n1]:6.1f}/s ({walls[args.n1]:.1f} s), "
              f"{args.n2}: {args.n2 / walls[args.n2]:6.1f}/s ({walls[args.n2]:.1f} s) | peak RSS "
              f"{peaks[args.n1] / 2**20:.0f} MiB @ {args.n1}, {peaks[args.n2] / 2**20:.0f} MiB @ {args.n2}")

    print()
    print(f"exact 1 worker / bare loop      : {results['exact, 1 worker'] / bare:.2f}x  (target >= 0.8)")
    print(f"exact 2 workers / 1 worker      : {results['exact, 2 workers'] / results['exact, 1 worker']:.2f}x"
          "  (target >= 1.7)")
    print(f"fast-decode / exact (1 worker)  : {results['fast-decode, 1 worker'] / results['exact, 1 worker']:.2f}x"
          "  (target >= 1.8)")
    print(f"fast-decode mean |pixel diff|   : {fast_mad(jpegs, args.size):.2f} grey levels of 255 at "
          f"{args.size}x{args.size}")


if __name__ == "__main__":
    main()
