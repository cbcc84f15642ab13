"""Run every benchmark and print one table: job, ours in images/s per core, the reference method's images/s,
the ratio, 1->2 worker scaling, peak memory, with the machine it ran on.

Each bench script (bench_downsample, bench_colorize, bench_download, bench_cifar, bench_memory) runs as a subprocess with
`--json PATH`; its own print-out streams through as it goes; the table (markdown) comes at the end:

    machine: CPU model, cores, RAM, Python, apache-beam
    | job | ours, images/s per core | reference, images/s | ratio | 1→2 workers | peak RSS MiB | notes |
    command: the exact command

followed by what each row's reference is and how "ours" was computed (from the scripts' JSON summaries).
The default sizes take roughly 10-20 minutes on a quiet 2-core machine; `--quick` is a smoke run of a few
minutes whose figures are too small to mean much (start-up noise swamps the steady-state rates).

    python tests/benchmarks/bench_all.py [--quick] [--only downsample,cifar] [--output bench.md]
                                         [--json-dir DIR]
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
import time
from typing import Dict, List, Optional

import common

HERE = os.path.dirname(os.path.abspath(__file__))

# job: (script, full-run arguments, --quick arguments)
BENCHES: Dict[str, tuple] = {
    "downsample": ("bench_downsample.py", ["--n1", "1000", "--n2", "16000", "--repeat", "2"],
                   ["--n1", "200", "--n2", "3000", "--repeat", "1", "--unique", "200"]),
    "colorize": ("bench_colorize.py", ["--n", "200", "--n1", "200", "--n2", "2000", "--repeat", "2",
                                       "--embed-images", "64"],
                 ["--n", "40", "--n1", "40", "--n2", "400", "--skip-embedding"]),
    "download": ("bench_download.py", ["--n", "2000", "--latency", "0.1", "--sequential", "150",
                                       "--threads", "128"],
                 ["--n", "300", "--latency", "0.1", "--sequential", "30", "--threads", "128"]),
    "cifar": ("bench_cifar.py", ["--n1", "6000", "--n2", "60000", "--repeat", "2"],
              ["--n1", "1200", "--n2", "6000", "--repeat", "1"]),
    "memory": ("bench_memory.py", ["--n1", "4000", "--colorize-n1", "300"],
               ["--n1", "200", "--colorize-n1", "20", "--unique", "40", "--no-baseline"]),
}

COLUMNS = ["job", "ours, images/s per core", "reference, images/s", "ratio", "1→2 workers", "peak RSS MiB",
           "notes"]


def shown(path: str) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def fmt_rate(x: Optional[float]) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def fmt_x(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}×"


def cell(text: str) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def row(job: str, s: Optional[dict], error: Optional[str]) -> List[str]:
    if s is None:
        return [job, "—", "—", "—", "—", "—", f"FAILED: {error}"]
    scaling = fmt_x(s.get("scaling_1_to_2"))
    if s.get("scaling_1_to_2") is None and s.get("scaling_note"):
        scaling = "n/a (scales by threads)" if "thread" in s["scaling_note"] else "n/a"
    peak = s.get("peak_rss_mib")
    return [job, fmt_rate(s.get("images_per_s_per_core")), fmt_rate(s.get("reference_images_per_s")),
            fmt_x(s.get("ratio_to_reference")), scaling, "n/a" if peak is None else f"{peak:,.0f}",
            s.get("notes", "")]


def table(rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["--:"] * 5 + ["---"]) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few minutes")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--output", default=None, metavar="PATH", help="also write the table (markdown) here")
    ap.add_argument("--json-dir", default=None, metavar="DIR",
                    help="keep the scripts' JSON summaries here (default: a temporary folder, removed)")
    args = ap.parse_args(argv)
    jobs = list(BENCHES) if not args.only else [j.strip() for j in args.only.split(",") if j.strip()]
    unknown = [j for j in jobs if j not in BENCHES]
    if unknown:
        ap.error(f"unknown job(s) {unknown}; choose from {list(BENCHES)}")

    machine = common.machine()
    command = shlex.join([shown(sys.executable), shown(os.path.abspath(sys.argv[0]))] + sys.argv[1:])
    json_dir = args.json_dir or tempfile.mkdtemp(prefix="imagebeam-bench-all-")
    os.makedirs(json_dir, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    summaries: Dict[str, Optional[dict]] = {}
    errors: Dict[str, str] = {}
    sub_commands: List[str] = []
    durations: Dict[str, float] = {}
    started = time.perf_counter()
    try:
        for job in jobs:
            script, full, quick = BENCHES[job]
            out = os.path.join(json_dir, f"{job}.json")
            if os.path.exists(out):
                os.remove(out)
            cmd = [sys.executable, os.path.join(HERE, script)] + (quick if args.quick else full) + ["--json", out]
            sub_commands.append(shlex.join([shown(cmd[0]), shown(cmd[1])] + cmd[2:-2]))
            print(f"\n=== {job}: {sub_commands[-1]} ===", flush=True)
            t = time.perf_counter()
            rc = subprocess.call(cmd, env=env)
            durations[job] = time.perf_counter() - t
            if rc == 0 and os.path.exists(out):
                with open(out) as f:
                    summaries[job] = json.load(f)
            else:
                summaries[job], errors[job] = None, f"exit code {rc}" if rc else "no summary written"
            print(f"=== {job}: {'done' if summaries[job] else 'FAILED'} in {durations[job]:.0f} s ===", flush=True)
    finally:
        if not args.json_dir:
            shutil.rmtree(json_dir, ignore_errors=True)
    total = time.perf_counter() - started

    lines = [f"Machine: {common.machine_text(machine)}"
             + (" — QUICK smoke run (tiny sizes, figures not meaningful)" if args.quick else ""), ""]
    lines.append(table([row(job, summaries[job], errors.get(job)) for job in jobs]))
    lines += ["", f"Command: `{command}` ({total / 60:.1f} min in all: "
              + ", ".join(f"{j} {d / 60:.1f}" for j, d in durations.items()) + ")", ""]
    lines.append("Ours = the job's steady-state images/s divided by the cores (SDK workers or processes) it "
                 "used; ratio = ours per core / the reference's images/s on one core; 1→2 workers = the "
                 "2-worker steady rate / the 1-worker one; peak RSS = the job's whole process tree. Per job:")
    for job in jobs:
        s = summaries[job]
        if s is None:
            continue
        lines.append(f"- {job}: reference = {s['reference']}. Ours = {s['how']}."
                     + (f" {s['scaling_note']}." if s.get("scaling_note") else ""))
    lines.append("- scripts run: " + "; ".join(f"`{c}`" for c in sub_commands))
    text = "\n".join(lines)
    print("\n" + text)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(text + "\n")
        print(f"\ntable written to {args.output}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
