"""Memory and resume of the ImageNet-sized jobs: peak RSS at two input sizes 5x apart, and a kill-and-resume.

Workload: ILSVRC2012-style nested train tars of ImageNet-like JPEGs made from the real photos that
scikit-image and scikit-learn ship (random crops scaled to about 500x375, quality 90: about 100 KiB),
the unique JPEGs repeated under distinct names. Each job runs as a real `imagebeam` command with the
default runner and workers (no flags), its whole process tree's RSS sampled every 0.1 s.

Printed, per job (`downsample --size 64`, `colorize --embedding none`):
- peak RSS at N1 and N2 = 5 x N1, the growth per image and the projection to ImageNet train (1,281,167);
- images/s end to end at N2 (start-up included) and steady state (N2 - N1) / (t2 - t1);
- the same for the code before the redesign (`--baseline REV`, default 2112af1: built from git into a
  temporary folder and run side by side, same inputs), unless `--no-baseline`;
- kill-and-resume at N2 (and at the `--resume-n` sizes): the run is SIGKILLed at 80% of an
  uninterrupted run's wall time and started again with the same command: the re-run's wall time as a
  share of the full run, and whether its files equal the uninterrupted run's. Short runs are mostly fixed
  start-up (Beam, TensorFlow for downsample's mean), which a re-run pays again; the longer sizes show
  the share a long run converges to.

    python tests/benchmarks/bench_memory.py [--n1 4000] [--colorize-n1 1500] [--baseline 2112af1]
        [--resume-n 60000] [--colorize-resume-n N] [--json PATH]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

import common
from bench_downsample import N_CLASSES, build_tar

from imagebeam import sample as sample_lib

IMAGENET_TRAIN = 1_281_167
GIB = 2 ** 30
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def job_args(job: str, tar: str, out: str) -> List[str]:
    if job == "downsample":
        return ["downsample", "--input", tar, "--output", out, "--size", "64"]
    if job == "resize":
        return ["resize", "--input", tar, "--output", out]
    if job == "imagenet-layout":
        return ["imagenet-layout", "--train", tar, "--devkit", devkit_for(tar), "--output", out]
    return ["colorize", "--input", tar, "--output", out, "--embedding", "none"]


def devkit_for(tar: str) -> str:
    """A devkit naming the bench tars' classes (imagenet-layout needs one), next to the tar."""
    path = os.path.join(os.path.dirname(tar), "devkit.tar.gz")
    if not os.path.exists(path):
        classes = [(c + 1, f"n{1440764 + c:08d}", f"class {c}") for c in range(N_CLASSES)]
        sample_lib.write_devkit(path, classes, [])
    return path


def baseline_env(rev: str, work: str) -> Optional[dict]:
    """An environment whose PYTHONPATH imports `imagebeam` as it was at `rev` (None if git cannot)."""
    root = os.path.join(work, f"baseline-{rev}")
    pkg = os.path.join(root, "imagebeam")
    if not os.path.isdir(pkg):
        src = os.path.join(work, f"src-{rev}")
        os.makedirs(src, exist_ok=True)
        archive = subprocess.run(["git", "-C", REPO, "archive", rev], capture_output=True)
        if archive.returncode:
            return None
        subprocess.run(["tar", "-x", "-C", src], input=archive.stdout, check=True)
        shutil.copytree(os.path.join(src, "imagebeam"), pkg)
        shutil.copytree(os.path.join(src, "pipelines"), os.path.join(pkg, "pipelines"))
        shutil.copytree(os.path.join(src, "transforms"), os.path.join(pkg, "transforms"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run(job: str, tar: str, out: str, env: Optional[dict] = None) -> common.Measurement:
    shutil.rmtree(out, ignore_errors=True)
    return common.run_measured(imagebeam_cmd(job, tar, out), env=env)


def imagebeam_cmd(job: str, tar: str, out: str) -> List[str]:
    """`python -P -m imagebeam.cli ...`: -P keeps the current folder (a checkout's own imagebeam/) off
    sys.path, so the baseline's PYTHONPATH, or the installed package, is what runs."""
    return [sys.executable, "-P", "-m", "imagebeam.cli", *job_args(job, tar, out)]


def files_digest(out: str) -> str:
    """Digest of every data file (metadata.json and TFT's SavedModel excluded: they name the run)."""
    found = {}
    for dirpath, dirnames, names in os.walk(out):
        dirnames[:] = [d for d in dirnames if d not in ("transform_fn", "transformed_metadata")
                       and not d.startswith(".")]
        for name in names:
            if name != "metadata.json" and not name.startswith("."):
                with open(os.path.join(dirpath, name), "rb") as f:
                    found[os.path.relpath(os.path.join(dirpath, name), out)] = hashlib.sha256(f.read()).hexdigest()
    return hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest()


def kill_and_resume(job: str, tar: str, out: str, full_wall: float, at: float = 0.8) -> dict:
    """SIGKILL the whole process group at `at` x the full run's wall time, then re-run to the end."""
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.Popen(imagebeam_cmd(job, tar, out), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    try:
        proc.wait(full_wall * at)
        killed = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = True
    rerun = common.run_measured(imagebeam_cmd(job, tar, out))
    with open(os.path.join(out, "metadata.json")) as f:
        meta_run = json.load(f).get("run", {})
    return {"killed": killed, "rerun_wall": rerun.wall, "full_wall": full_wall, "share": rerun.wall / full_wall,
            "units": meta_run.get("units"), "units_reused": meta_run.get("units_reused"),
            "rerun_peak_rss": rerun.peak_rss}


def measure(job: str, tars: Dict[int, str], work: str, env: Optional[dict], label: str) -> dict:
    runs = {n: run(job, tar, os.path.join(work, f"{job}-{label}-{n}"), env) for n, tar in tars.items()}
    (n1, m1), (n2, m2) = sorted(runs.items())
    growth = (m2.peak_rss - m1.peak_rss) / (n2 - n1)
    return {"n1": n1, "n2": n2, "peak1": m1.peak_rss, "peak2": m2.peak_rss, "growth_per_image": growth,
            "growth_pct": 100.0 * (m2.peak_rss - m1.peak_rss) / m1.peak_rss,
            "projected": m2.peak_rss + growth * (IMAGENET_TRAIN - n2), "rate_n2": n2 / m2.wall,
            "steady_rate": (n2 - n1) / (m2.wall - m1.wall) if m2.wall > m1.wall else None,
            "wall2": m2.wall, "out2": os.path.join(work, f"{job}-{label}-{n2}")}


def fmt_gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB"


def table(job: str, ours: dict, base: Optional[dict], resume: dict, largest: int) -> str:
    rows = [("inputs", f"{ours['n1']:,} -> {ours['n2']:,}", f"{base['n1']:,} -> {base['n2']:,}" if base else "")]

    def row(name, key, f):
        rows.append((name, f(ours[key]) if ours.get(key) is not None else "-",
                     (f(base[key]) if base.get(key) is not None else "-") if base else "not run"))

    rows.append(("peak RSS (process tree)", f"{fmt_gib(ours['peak1'])} -> {fmt_gib(ours['peak2'])}",
                 f"{fmt_gib(base['peak1'])} -> {fmt_gib(base['peak2'])}" if base else "not run"))
    row("growth at 5x inputs", "growth_pct", lambda v: f"{v:+.1f}%")
    row("growth per image", "growth_per_image", lambda v: f"{v / 1024:.2f} KiB")
    row("projected for 1,281,167 images", "projected", fmt_gib)
    row(f"images/s end to end at {ours['n2']:,}", "rate_n2", lambda v: f"{v:.1f}")
    row("images/s steady state", "steady_rate", lambda v: f"{v:.1f}")
    rows.append(("goal: peak < 3 GiB + largest output file", f"{fmt_gib(3 * GIB + largest)}: "
                 f"{'holds' if ours['peak2'] < 3 * GIB + largest and ours['growth_pct'] <= 10 else 'FAILS'}", ""))
    for r in [resume, *resume.get("longer", [])]:
        rows.append((f"kill at 80% + re-run at {r['n']:,}: re-run wall / full wall",
                     f"{r['share']:.0%} ({r['rerun_wall']:.1f} s of {r['full_wall']:.1f} s; {r['units_reused']} of "
                     f"{r['units']} units reused{'' if r['killed'] else ', finished before the kill'}); "
                     f"files equal: {r['equal']}", ""))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{job}", f"  {'':<{w0}}  {'this code':<{w1}}  baseline"]
    lines += [f"  {a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n1", type=int, default=4000, help="downsample: smaller input (the larger is 5x)")
    p.add_argument("--colorize-n1", type=int, default=1500,
                   help="colorize: smaller input; large enough that every worker is busy (at 300 one of two "
                        "workers idles, and the 5x run's growth is the second worker starting, not the data)")
    p.add_argument("--resume-n", type=int, nargs="*", default=[],
                   help="downsample: also kill-and-resume at these sizes (a full run each, then the kill)")
    p.add_argument("--colorize-resume-n", type=int, nargs="*", default=[])
    p.add_argument("--resize-n1", type=int, default=1000, help="resize (--jobs resize): smaller input")
    p.add_argument("--layout-n1", type=int, default=4000, help="imagenet-layout (--jobs imagenet-layout)")
    p.add_argument("--unique", type=int, default=400, help="unique JPEGs (repeated under distinct names)")
    p.add_argument("--quality", type=int, default=98, help="JPEG quality of the photos (98: about 100 KiB)")
    p.add_argument("--baseline", default="2112af1", help="git revision to compare with (the code before)")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--jobs", default="downsample,colorize",
                   help="any of downsample, colorize, resize, imagenet-layout (comma-separated)")
    p.add_argument("--json")
    p.add_argument("--workdir")
    args = p.parse_args(argv)
    script = os.path.abspath(sys.argv[0])
    json_path = os.path.abspath(args.json) if args.json else None

    work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="bench-memory-"))
    os.makedirs(work, exist_ok=True)
    # Jobs run from the work folder: Beam's SDK worker processes put their current folder first on
    # sys.path, and from a checkout that would import the checkout's imagebeam/ in every worker (the
    # baseline's workers then ran this code's modules, or failed to find the old ones).
    os.chdir(work)
    print(common.machine_text(common.machine()))
    print("command:", " ".join([os.path.relpath(script, REPO), *sys.argv[1:]]))
    jpegs = list(sample_lib.imagenet_like_jpegs(args.unique, seed=1, quality=args.quality))
    print(f"{len(jpegs)} unique JPEGs, mean {sum(map(len, jpegs)) / len(jpegs) / 1024:.0f} KiB")
    env = None if args.no_baseline else baseline_env(args.baseline, work)
    summary = {}
    try:
        for job in args.jobs.split(","):
            n1 = {"downsample": args.n1, "colorize": args.colorize_n1, "resize": args.resize_n1,
                  "imagenet-layout": args.layout_n1}[job]
            tars = {n: build_tar(os.path.join(work, f"{job}-{n}.tar"), jpegs, n) for n in (n1, 5 * n1)}
            ours = measure(job, tars, work, None, "ours")
            base = measure(job, tars, work, env, "base") if env else None
            largest = max(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ours["out2"]) for f in fs)
            resumed_out = os.path.join(work, f"{job}-resumed")
            resume = kill_and_resume(job, tars[5 * n1], resumed_out, ours["wall2"])
            resume.update(n=5 * n1, equal=files_digest(resumed_out) == files_digest(ours["out2"]))
            resume["longer"] = []
            for n in {"downsample": args.resume_n, "colorize": args.colorize_resume_n}.get(job, []):
                tar = build_tar(os.path.join(work, f"{job}-{n}.tar"), jpegs, n)
                full_out = os.path.join(work, f"{job}-full-{n}")
                full = run(job, tar, full_out)
                longer = kill_and_resume(job, tar, resumed_out, full.wall)
                longer.update(n=n, equal=files_digest(resumed_out) == files_digest(full_out))
                resume["longer"].append(longer)
                shutil.rmtree(full_out, ignore_errors=True)
                os.remove(tar)
            if base:
                resume["equal_baseline"] = files_digest(base["out2"]) == files_digest(ours["out2"])
            print()
            print(table(job, ours, base, resume, largest))
            if base:
                print(f"  files equal to the baseline's: {resume['equal_baseline']}")
            summary[job] = {"ours": ours, "baseline": base, "resume": resume, "largest_output": largest}
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    common.write_json(json_path, bench_all_summary(summary))


def bench_all_summary(results: dict) -> dict:
    """The bench_all.py row: downsample's steady rate against the baseline's, notes with the memory."""
    d = results.get("downsample") or next(iter(results.values()))
    ours, base = d["ours"], d["baseline"]
    notes = "; ".join(
        f"{job}: peak {fmt_gib(r['ours']['peak1'])} -> {fmt_gib(r['ours']['peak2'])} at "
        f"{r['ours']['n1']:,} -> {r['ours']['n2']:,} ({r['ours']['growth_pct']:+.1f}%, baseline "
        + (f"{fmt_gib(r['baseline']['peak1'])} -> {fmt_gib(r['baseline']['peak2'])}" if r["baseline"] else "not run")
        + f"), kill at 80% + re-run = {r['resume']['share']:.0%} of a full run"
        for job, r in results.items())
    return common.summary("memory", ours=ours["steady_rate"], cores_used=os.cpu_count() or 1,
                          how="downsample --size 64, default runner, steady state; reference: the code before",
                          reference_rate=(base["steady_rate"] / (os.cpu_count() or 1)) if base and base["steady_rate"] else None,
                          reference="the code before the staging redesign", scaling=None,
                          peak_rss=max(r["ours"]["peak2"] for r in results.values()), notes=notes, results=results)


if __name__ == "__main__":
    main()
