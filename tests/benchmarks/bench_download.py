"""Benchmark of `imagebeam download` against a one-at-a-time downloader, side by side in one run.

Workload: N distinct ImageNet-like JPEGs (random crops of the real photos scikit-image and scikit-learn
ship, about 500x375, quality 90) served by `python -m imagebeam.http_fixture` in its own process on
127.0.0.1 with LATENCY seconds added to every response. Every image is downloaded, validated by decoding
and written to disk.

1. sequential: the reference's approach, one URL at a time (urllib, 5 s timeout), each image decoded
   with Pillow and written as md5(url).jpeg; measured on the first S URLs (it is slow by design);
2. ours, the fetcher alone: `download_one` (the job's per-URL function) on a thread pool, in-process;
3. ours, the job: `imagebeam download` as a command (local runner, in-process: in_memory mode), wall time
   from start to finish including Beam's start-up and the manifest, and the download phase alone
   (first to last file written); with the peak summed RSS of the job's process tree (sampled every
   0.1 s) and the CPU it used during the download phase;
4. img2dataset (the peer: shards of 10,000 in a process pool), same list, same server, whole run, in a venv
   of its own (`--img2dataset-venv`, created with pip if missing): `--resize_mode no
   --disable_all_reencoding True --output_format files` (it stores the served bytes, as we do; it does
   not decode them), `--thread_count THREADS`, each `--i2d-processes` value (1 and the core count).
   Ours and img2dataset alternate for `--repeat` rounds and each one's fastest whole run counts: the host
   is shared, and alternating spreads its noise over both.

    python tests/benchmarks/bench_download.py [--n 2000] [--latency 0.1] [--sequential 150] [--threads 128]
                                              [--img2dataset-venv /tmp/i2d-venv] [--i2d-processes 1 2] [--repeat 2]
                                              [--json PATH]

--json PATH writes the summary bench_all.py tabulates (see common.summary). The job runs in-process (the
local runner's in_memory mode: one Python process, the downloads on its thread pool, no SDK worker
processes), so ours = the download-phase rate divided by the 1 process it runs in; reference = the
sequential downloader; 1->2 workers does not apply (it scales by threads; see scaling_note).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import common
from PIL import Image

from imagebeam import sample as sample_lib
from imagebeam.transforms.inputs.downloads import download_one
from imagebeam.transforms.inputs.fetch import FetchConfig, Fetcher
from imagebeam.transforms.inputs.url_lists import UrlEntry, url_md5


def start_server(root: str, latency: float, workdir: str) -> tuple:
    port_file = os.path.join(workdir, "port")
    proc = subprocess.Popen([sys.executable, "-m", "imagebeam.http_fixture", "--root", root,
                             "--latency", str(latency), "--port-file", port_file])
    deadline = time.time() + 120
    while not os.path.exists(port_file):
        if time.time() > deadline or proc.poll() is not None:
            raise RuntimeError("the photo server did not start")
        time.sleep(0.05)
    with open(port_file) as f:
        return proc, int(f.read())


def sequential(urls: List[str], out: str) -> float:
    """One URL at a time, as the reference downloader: fetch, decode to validate, write."""
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    for url in urls:
        with urllib.request.urlopen(url, timeout=5) as response:
            data = response.read()
        Image.open(io.BytesIO(data)).load()
        with open(os.path.join(out, hashlib.md5(url.encode()).hexdigest() + ".jpeg"), "wb") as f:
            f.write(data)
    return len(urls) / (time.perf_counter() - start)


def fetcher_alone(urls: List[str], out: str, threads: int) -> float:
    os.makedirs(out, exist_ok=True)
    fetcher = Fetcher(FetchConfig(threads=threads, per_host=threads, allow_private_networks=True))
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda u: download_one(UrlEntry(u), fetcher, out), urls))
    rate = len(urls) / (time.perf_counter() - start)
    bad = [r.record for r in results if r.record["status"] != "ok"]
    if bad:
        raise RuntimeError(f"{len(bad)} downloads failed, e.g. {bad[0]}")
    return rate


def job(listing: str, out: str, threads: int) -> dict:
    run = common.run_measured([sys.executable, "-m", "imagebeam.cli", "download", "--input", listing,
                               "--output", out, "--allow-private-networks", "--threads", str(threads),
                               "--per-host", str(threads)])
    with open(os.path.join(out, "metadata.json")) as f:
        meta = json.load(f)
    mtimes = sorted(os.stat(os.path.join(out, n)).st_mtime for n in os.listdir(out) if n.endswith(".jpeg"))
    phase = mtimes[-1] - mtimes[0] if len(mtimes) > 1 else float("nan")
    return {"wall": run.wall, "ok": meta["counts"]["ok"], "urls": meta["counts"]["urls"], "download_phase": phase,
            "peak_rss": run.peak_rss, "cpu_s": run.cpu_s,
            "phase_cores_busy": run.cpu_between(mtimes[0], mtimes[-1]) / phase if phase > 0 else float("nan")}


def img2dataset_command(venv: str) -> Optional[List[str]]:
    """img2dataset from its own venv (created with pip when missing: its pins are not the project's)."""
    exe = os.path.join(venv, "bin", "img2dataset")
    if not os.path.exists(exe):
        made = subprocess.run([sys.executable, "-m", "venv", venv]).returncode == 0 and subprocess.run(
            [os.path.join(venv, "bin", "pip"), "install", "-q", "img2dataset"]).returncode == 0
        if not made:
            return None
    return [exe]


def img2dataset(command: List[str], listing: str, out: str, threads: int, processes: int) -> dict:
    """One whole img2dataset run; images/s = successes (from its *_stats.json) / wall time."""
    run = common.run_measured([*command, "--url_list", listing, "--output_folder", out, "--input_format", "txt",
                               "--resize_mode", "no", "--disable_all_reencoding", "True", "--output_format", "files",
                               "--processes_count", str(processes), "--thread_count", str(threads),
                               "--timeout", "10", "--retries", "0", "--enable_wandb", "False"],
                              env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"))
    ok = 0
    for name in os.listdir(out):
        if name.endswith("_stats.json"):
            with open(os.path.join(out, name)) as f:
                ok += json.load(f)["successes"]
    return {"wall": run.wall, "ok": ok, "peak_rss": run.peak_rss, "processes": processes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.1)
    ap.add_argument("--sequential", type=int, default=150, help="URLs for the sequential baseline")
    ap.add_argument("--threads", type=int, default=128, help="threads (and per-host limit) per worker")
    ap.add_argument("--img2dataset-venv", default="/tmp/i2d-venv", help="img2dataset's own venv (made if missing)")
    ap.add_argument("--i2d-processes", type=int, nargs="*", default=None,
                    help="img2dataset --processes_count values to run (default: 1 and the core count)")
    ap.add_argument("--repeat", type=int, default=2, help="rounds of ours and img2dataset, alternating (best counts)")
    ap.add_argument("--json", default=None, metavar="PATH", help="write a summary dict (for bench_all.py)")
    args = ap.parse_args()
    machine = common.machine()

    work = tempfile.mkdtemp(prefix="bench-download-")
    root = os.path.join(work, "served")
    os.makedirs(root)
    t = time.perf_counter()
    sizes = []
    for i, data in enumerate(sample_lib.imagenet_like_jpegs(args.n, seed=5)):
        with open(os.path.join(root, f"img{i:05d}.jpg"), "wb") as f:
            f.write(data)
        sizes.append(len(data))
    print(common.machine_line(machine))
    print(f"workload: {args.n} distinct JPEGs, mean {sum(sizes) / len(sizes) / 1024:.0f} KiB, "
          f"{args.latency * 1000:.0f} ms added latency per response (made in {time.perf_counter() - t:.1f} s)")
    server, port = start_server(root, args.latency, work)
    try:
        urls = [f"http://127.0.0.1:{port}/img{i:05d}.jpg" for i in range(args.n)]
        listing = os.path.join(work, "urls.txt")
        with open(listing, "w") as f:
            f.write("".join(f"{u}\n" for u in urls))

        seq = sequential(urls[: args.sequential], os.path.join(work, "sequential"))
        print(f"sequential, one at a time ({args.sequential} URLs):        {seq:8.1f} images/s")
        alone = fetcher_alone(urls, os.path.join(work, "fetcher"), args.threads)
        print(f"ours, fetcher on {args.threads} threads, in-process ({args.n}):  {alone:8.1f} images/s "
              f"({alone / seq:.1f}x sequential)")
        # Ours and img2dataset alternate, `--repeat` rounds; each one's fastest whole run counts (the host
        # is shared: alternating spreads its noise over both).
        peer = img2dataset_command(args.img2dataset_venv)
        counts = (args.i2d_processes if args.i2d_processes is not None else sorted({1, os.cpu_count() or 1})) \
            if peer else []
        ours_runs, peers = [], {p: [] for p in counts}
        for rep in range(args.repeat):
            r = job(listing, os.path.join(work, f"job{rep}"), args.threads)
            ours_runs.append(r)
            print(f"round {rep + 1}: ours, imagebeam download, whole run ({r['ok']}/{r['urls']} ok, {r['wall']:.1f} s): "
                  f"{r['ok'] / r['wall']:8.1f} images/s")
            for processes in counts:
                r = img2dataset(peer, listing, os.path.join(work, f"i2d-{processes}-{rep}"), args.threads, processes)
                peers[processes].append(r)
                print(f"round {rep + 1}: img2dataset --processes_count {processes} --thread_count {args.threads}, "
                      f"whole run ({r['ok']}/{args.n} ok, {r['wall']:.1f} s): {r['ok'] / r['wall']:8.1f} images/s")
        result = min(ours_runs, key=lambda r: r["wall"])
        end_to_end = result["ok"] / result["wall"]
        phase = result["ok"] / result["download_phase"]
        print(f"ours, imagebeam download, wall incl. start-up, best of {args.repeat} ({result['ok']}/{result['urls']} "
              f"ok, {result['wall']:.1f} s): {end_to_end:8.1f} images/s ({end_to_end / seq:.1f}x sequential)")
        print(f"ours, imagebeam download, download phase "
              f"({result['download_phase']:.1f} s):         {phase:8.1f} images/s ({phase / seq:.1f}x sequential)")
        print(f"ours, imagebeam download, peak RSS of the job's process tree "
              f"{result['peak_rss'] / common.MIB:.0f} MiB, CPU {result['cpu_s']:.1f} s in all, "
              f"{result['phase_cores_busy']:.2f} cores busy in the download phase")
        peer_rates = {p: max(r["ok"] / r["wall"] for r in rs) for p, rs in peers.items() if rs}
        for processes, rate in peer_rates.items():
            print(f"img2dataset --processes_count {processes}, whole run, best of {args.repeat}: {rate:8.1f} images/s; "
                  f"ours / it: {end_to_end / rate:.2f}x")
        best_peer = max(peer_rates.values(), default=None)
        if best_peer:
            print(f"ours / img2dataset's best, whole run: {end_to_end / best_peer:.2f}x")
        else:
            print("img2dataset: not available (no venv and pip could not install it)")
        check = [url_md5(u) + ".jpeg" for u in urls[:3]]
        for name, i in zip(check, range(3)):
            with open(os.path.join(work, "job0", name), "rb") as a, open(os.path.join(root, f"img{i:05d}.jpg"), "rb") as b:
                assert a.read() == b.read(), "stored bytes differ from the served ones"
        common.write_json(args.json, common.summary(
            "download", ours=phase, cores_used=1,
            how=(f"download-phase rate of `imagebeam download --threads {args.threads} --per-host "
                 f"{args.threads}` ({result['ok']} images / first-to-last file written, "
                 f"{result['download_phase']:.1f} s) divided by 1: the job runs in-process (local runner in "
                 "in_memory mode: one Python process, downloads on its thread pool, no SDK worker processes); "
                 f"that process kept {common.fmt(result['phase_cores_busy'])} cores busy during the phase "
                 "(phase_cores_busy)"),
            reference_rate=seq,
            reference=(f"sequential downloader, one URL at a time in one process (urllib, 5 s timeout, Pillow "
                       f"decode to validate, write md5(url).jpeg); first {args.sequential} URLs"),
            ratio_to_reference=common.ratio(phase, seq),
            scaling=None,
            scaling_note=("1->2 workers does not apply: the job is network-bound and runs in one process; it "
                          f"scales by threads (--threads, here {args.threads}), not by worker processes"),
            peak_rss=result["peak_rss"],
            peak_rss_how=(f"largest summed RSS of the job's process tree (the one process and any children), "
                          f"sampled every {common.SAMPLE_S} s, over the job run"),
            end_to_end_images_per_s=end_to_end, fetcher_alone_images_per_s=alone,
            img2dataset_images_per_s=peer_rates, repeat=args.repeat,
            ratio_to_img2dataset=common.ratio(end_to_end, best_peer),
            phase_cores_busy=result["phase_cores_busy"], job_cpu_s=result["cpu_s"],
            latency_s=args.latency, n=args.n,
            notes=(f"in-process job, {args.threads} threads, {args.latency * 1000:.0f} ms latency per response, "
                   f"{args.n} URLs; {common.fmt(result['phase_cores_busy'])} cores busy in the phase; end to end "
                   f"{end_to_end:.0f}/s; scales by threads, not workers")))
    finally:
        server.terminate()
        server.wait()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
