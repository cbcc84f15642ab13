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

    python tests/benchmarks/bench_downsample.py [--n1 1000] [--n2 16000] [--repeat 2] [--size 32] [--json PATH]

--json PATH writes the summary bench_all.py tabulates (see common.summary): ours = the exact path's
steady-state rate with 1 SDK worker, per that one worker; reference = the bare loop; 1->2 scaling = exact
2 workers / exact 1 worker; peak RSS = the largest over all pipeline runs (normally reached at N2).
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tarfile
import tempfile
import time
from typing import List

import common
import numpy as np
from PIL import Image

from imagebeam import sample as sample_lib
from imagebeam.transforms.imaging import decode, resize

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


def run_job(tar: str, out: str, size: int, workers: int, fast: bool) -> common.Measurement:
    cmd = [sys.executable, "-m", "imagebeam.cli", "downsample", "--input", tar, "--output", out,
           "--size", str(size), "--direct_num_workers", str(workers)] + (["--fast-decode"] if fast else [])
    return common.run_measured(cmd)


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
    ap.add_argument("--json", default=None, metavar="PATH", help="write a summary dict (for bench_all.py)")
    args = ap.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="imagebeam-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        bench(args, work)
    finally:
        if not args.workdir:  # ours: the tars and outputs can reach a GiB
            shutil.rmtree(work, ignore_errors=True)


def bench(args, work: str) -> None:
    machine = common.machine()

    t = time.perf_counter()
    jpegs = list(sample_lib.imagenet_like_jpegs(args.unique, seed=1))
    sizes = [Image.open(io.BytesIO(j)).size for j in jpegs[:200]]
    print(f"workload: {args.unique} unique real-photo JPEGs (median {int(np.median([s[0] for s in sizes]))}x"
          f"{int(np.median([s[1] for s in sizes]))}, {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB avg), "
          f"made in {time.perf_counter() - t:.0f} s")
    tars = {n: build_tar(os.path.join(work, f"train-{n}.tar"), jpegs, n) for n in (args.n1, args.n2)}

    print(common.machine_line(machine))
    bare = bare_loop(jpegs, args.n2, args.size)
    print(f"bare loop (1 process): {bare:8.1f} images/s")

    results, states = {}, {}
    for label, workers, fast in (("exact, 1 worker", 1, False), ("exact, 2 workers", 2, False),
                                 ("fast-decode, 1 worker", 1, True)):
        st = common.two_sizes(lambda n, r: run_job(tars[n], os.path.join(work, f"out-{workers}-{fast}-{n}-{r}"),
                                                   args.size, workers, fast), args.n1, args.n2, args.repeat)
        results[label], states[label] = st.rate, st
        print(f"pipeline {label:<22}: steady {st.rate:8.1f} images/s | end-to-end "
              f"{args.n1}: {st.end_to_end(args.n1):6.1f}/s ({st.walls[args.n1]:.1f} s), "
              f"{args.n2}: {st.end_to_end(args.n2):6.1f}/s ({st.walls[args.n2]:.1f} s) | peak RSS "
              f"{st.peaks[args.n1] / 2**20:.0f} MiB @ {args.n1}, {st.peaks[args.n2] / 2**20:.0f} MiB @ {args.n2}"
              f" | CPU {st.cores_busy:.2f} cores busy, {st.per_cpu_s:.0f} images per CPU-s (steady)")

    one, two, fast = (results["exact, 1 worker"], results["exact, 2 workers"], results["fast-decode, 1 worker"])
    mad = fast_mad(jpegs, args.size)
    print()
    print(f"exact 1 worker / bare loop      : {one / bare:.2f}x  (target >= 0.8)")
    print(f"exact 2 workers / 1 worker      : {two / one:.2f}x  (target >= 1.7)")
    print(f"fast-decode / exact (1 worker)  : {fast / one:.2f}x  (target >= 1.8)")
    print(f"fast-decode mean |pixel diff|   : {mad:.2f} grey levels of 255 at {args.size}x{args.size}")

    st1 = states["exact, 1 worker"]
    common.write_json(args.json, common.summary(
        "downsample", ours=one, cores_used=1,
        how=(f"steady-state rate (N2-N1)/(t2-t1) of `imagebeam downsample --size {args.size} "
             f"--direct_num_workers 1` at N1={args.n1}, N2={args.n2} images (fastest of {args.repeat} runs "
             "per size), divided by its 1 SDK worker; the runner process's own CPU is not in the divisor "
             "(see cores_busy_steady)"),
        reference_rate=bare,
        reference=(f"bare Pillow loop in one process: Image.open + convert('RGB') + resize(({args.size}, "
                   f"{args.size}), BOX) over the same JPEG bytes in memory, {args.n2} images"),
        scaling=common.ratio(two, one), peak_rss=max(st.peak for st in states.values()),
        peak_rss_how=f"largest summed RSS of the job's process tree (runner + SDK workers), sampled every "
                     f"{common.SAMPLE_S} s, over all pipeline runs (1 and 2 workers, fast-decode; normally "
                     f"reached at N2={args.n2})",
        steady_images_per_s=dict(results),
        end_to_end_images_per_s={k: {str(n): st.end_to_end(n) for n in (args.n1, args.n2)}
                                 for k, st in states.items()},
        peak_rss_mib_by_run={k: {str(n): st.peaks[n] / common.MIB for n in (args.n1, args.n2)}
                             for k, st in states.items()},
        cores_busy_steady=st1.cores_busy, images_per_cpu_s_steady=st1.per_cpu_s,
        fast_decode_speedup=common.ratio(fast, one), fast_decode_mean_abs_diff=mad,
        notes="; ".join(filter(None, (
            f"exact path; the 1-worker job kept {common.fmt(st1.cores_busy)} cores busy "
            f"({common.fmt(st1.per_cpu_s, '.0f')} img per CPU-s)",
            f"--fast-decode {common.fmt(common.ratio(fast, one))}x exact (mean abs diff {mad:.1f}/255)",
            f"N={args.n1}/{args.n2}", common.unmeasurable(states))))))


if __name__ == "__main__":
    main()
