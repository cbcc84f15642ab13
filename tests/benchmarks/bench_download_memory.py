"""Memory of `imagebeam download` against the list's length: lists whose URLs are all refused without traffic.

Every URL is an ImageNet-style line (`n00000042_7<TAB>http://10.x.y.z/...jpg`) on a private address, so the
job's safety check refuses it before any connection (`blocked`), and the run is inside a network
namespace of its own (`unshare -n`) where one is available, so no packet can leave. What is left is what
grows with the list: reading and cutting it, the per-URL bookkeeping, the merges and the manifest.

    python tests/benchmarks/bench_download_memory.py [--sizes 200000 2000000] [--workdir DIR] [--json PATH]
    python tests/benchmarks/bench_download_memory.py --job downsample --sizes 40000 400000

`--job downsample|colorize` gives the list as `--input` of that job instead (a URL list as an image
source): every line becomes a line of failures.jsonl, so this measures the failure path's memory too.

Prints, per size, the peak RSS of the job's whole process tree (sampled every 0.1 s), wall time and lines/s;
then the growth per line between the two sizes, the projection to fall11_urls.txt (14,197,122 lines) and
the ratio of the two peaks (the goal: under 1 GiB at any size, 10x the lines at most 10% more memory).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import List, NamedTuple

import common

FALL11_LINES = 14_197_122
GOAL_BYTES = 2 ** 30


FORMATS = ("txt", "txt.gz", "csv", "jsonl", "parquet", "tgz")


def _refused_rows(n: int):
    """(key, url) of n fall11-style lines in blocks of 100,000, every URL on a private 10.x.y.z address."""
    for start in range(0, n, 100_000):
        yield [(f"n{i % 21841:08d}_{i}", f"http://10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/images/{i:09d}.jpg")
               for i in range(start, min(n, start + 100_000))]


def write_refused_list(path: str, n: int, fmt: str = "txt") -> str:
    """n refused lines as a list in `fmt` (the job's formats: text, .gz, CSV, JSONL, Parquet, a .tgz
    holding a text list) at `path` + its suffix; returns the path written."""
    import gzip
    import io
    import tarfile

    path = f"{path}.{fmt}"
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        with pq.ParquetWriter(path, pa.schema([("key", pa.string()), ("url", pa.string())])) as w:
            for block in _refused_rows(n):
                w.write_table(pa.table({"key": [k for k, _ in block], "url": [u for _, u in block]}))
        return path
    text = io.BytesIO()
    if fmt == "csv":
        text.write(b"key,url\n")
    for block in _refused_rows(n):
        if fmt == "jsonl":
            lines = "".join(f'{{"key": "{k}", "url": "{u}"}}\n' for k, u in block)
        elif fmt == "csv":
            lines = "".join(f"{k},{u}\n" for k, u in block)
        else:
            lines = "".join(f"{k}\t{u}\n" for k, u in block)
        text.write(lines.encode())
    data = text.getvalue()
    if fmt == "txt.gz":
        data = gzip.compress(data, 1)
    if fmt == "tgz":
        with tarfile.open(path, "w:gz", compresslevel=1) as tar:
            info = tarfile.TarInfo("fall11_urls.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        return path
    with open(path, "wb") as f:
        f.write(data)
    return path


def isolated() -> List[str]:
    """A network namespace with nothing in it but a loopback that is up (a multi-process Beam runner's
    workers talk gRPC on 127.0.0.1), when this machine allows it; else nothing."""
    wrap = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
    if shutil.which("unshare") and shutil.which("ip") and subprocess.run(
            [*wrap, "true"], capture_output=True).returncode == 0:
        return wrap
    return []


class MemoryRun(NamedTuple):
    lines: int
    peak_rss: int
    wall: float
    counts: dict
    command: List[str]


JOB_ARGS = {"download": [], "downsample": ["--size", "8"], "colorize": ["--embedding", "none"]}


def measure(n: int, workdir: str, job: str = "download", fmt: str = "txt") -> MemoryRun:
    """`imagebeam JOB` on an n-line refused list, its process tree's RSS sampled throughout."""
    out = os.path.join(workdir, f"out-{n}")
    listing = write_refused_list(os.path.join(workdir, f"refused-{n}"), n, fmt)
    columns = ["--key-column", "key"] if fmt in ("csv", "jsonl", "parquet") else []
    cmd = [*isolated(), sys.executable, "-m", "imagebeam.cli", job, "--input", listing, "--output", out,
           *JOB_ARGS[job], *columns]
    run = common.run_measured(cmd, exit_codes=(1,))  # every URL refused: no dataset, so exit 1 by design
    with open(os.path.join(out, "metadata.json")) as f:
        counts = json.load(f)["counts"]
    if job != "download":  # an image job counts the list's lines as read, each one a failure
        counts = dict(counts, listed=counts["read"], ok=counts["written"])
    shutil.rmtree(out, ignore_errors=True)
    os.remove(listing)
    return MemoryRun(n, run.peak_rss, run.wall, counts, cmd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs=2, default=[200_000, 2_000_000])
    ap.add_argument("--workdir", default=None, help="folder for the lists and outputs (about 1.5 KB per line at "
                                                     "the larger size; a tmpfs such as /dev/shm is fine: its files "
                                                     "are not in any process's RSS)")
    ap.add_argument("--job", choices=sorted(JOB_ARGS), default="download",
                    help="the job given the list (downsample/colorize: as its --input)")
    ap.add_argument("--format", choices=FORMATS, default="txt", help="the list's format")
    ap.add_argument("--json", default=None, metavar="PATH", help="write a summary dict")
    args = ap.parse_args()
    print(common.machine_line(common.machine()))
    print(f"list format: {args.format}")
    print(f"network: {'inside unshare -n' if isolated() else 'no unshare: private addresses refused by the job'}")
    work = tempfile.mkdtemp(prefix="bench-download-memory-", dir=args.workdir)
    runs = []
    try:
        for n in args.sizes:
            r = measure(n, work, args.job, args.format)
            runs.append(r)
            assert r.counts["listed"] == n and r.counts["ok"] == 0, r.counts
            print(f"{n:>10,} lines: peak RSS {r.peak_rss / common.MIB:7.1f} MiB, {r.wall:7.1f} s, "
                  f"{n / r.wall:9,.0f} lines/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    small, large = runs
    growth = (large.peak_rss - small.peak_rss) / (large.lines - small.lines)
    projected = large.peak_rss + growth * (FALL11_LINES - large.lines)
    ratio = large.peak_rss / small.peak_rss
    print(f"growth {growth:.1f} bytes/line; projected for {FALL11_LINES:,} lines: {projected / common.MIB:.0f} MiB; "
          f"{large.lines // small.lines}x the lines: {ratio:.3f}x the peak "
          f"({'meets' if projected < GOAL_BYTES and ratio <= 1.10 else 'misses'} the goal: < 1 GiB, <= 1.10x)")
    print(f"command: {shlex.join(large.command[:large.command.index('--input')])} --input LIST --output DIR "
          f"{shlex.join(large.command[large.command.index('--output') + 2:])}")
    common.write_json(args.json, {
        "job": f"{args.job}-memory", "format": args.format, "sizes": [r.lines for r in runs],
        "peak_rss_mib": [r.peak_rss / common.MIB for r in runs], "wall_s": [r.wall for r in runs],
        "lines_per_s": [r.lines / r.wall for r in runs], "growth_bytes_per_line": growth,
        "projected_fall11_mib": projected / common.MIB, "peak_ratio": ratio, "machine": common.machine()})


if __name__ == "__main__":
    main()
