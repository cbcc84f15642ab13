"""Helpers shared by the benchmark scripts: running a job while sampling its whole process tree,
steady-state rates from two input sizes, the machine description and the `--json` summary.

The scripts import this as `common` (they run as `python tests/benchmarks/bench_*.py`, so this folder is
first on sys.path).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_S = 0.1
MIB = 2 ** 20


def _children_map() -> Dict[int, List[int]]:
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return children


def tree_pids(pid: int) -> List[int]:
    """pid and all its descendants, from /proc."""
    children = _children_map()
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, []))
    return out


def tree_rss_bytes(pid: int) -> int:
    """Summed RSS of pid and all its descendants, from /proc."""
    return tree_sample(pid)[0]


def tree_sample(pid: int) -> tuple:
    """(summed RSS bytes, {pid: CPU seconds so far}) of pid and all its descendants, from /proc."""
    rss, cpu = 0, {}
    for p in tree_pids(pid):
        try:
            with open(f"/proc/{p}/statm") as f:
                rss += int(f.read().split()[1]) * PAGE
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu[p] = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
        except (OSError, ValueError, IndexError):
            pass
    return rss, cpu


class Measurement(NamedTuple):
    """One command run: wall seconds, peak summed RSS of its process tree, CPU seconds of the tree."""
    wall: float
    peak_rss: int                  # bytes, max over samples every SAMPLE_S of the tree's summed RSS
    cpu_s: float                   # CPU seconds (user + system) of the whole tree
    samples: List[tuple]           # (time.time(), tree RSS bytes, tree CPU seconds so far)
    output: str                    # stdout + stderr (empty unless captured)

    def cpu_between(self, t0: float, t1: float) -> float:
        """CPU seconds the tree used between two time.time() instants (linear between samples)."""
        return _interp(self.samples, t1) - _interp(self.samples, t0)


def _interp(samples: List[tuple], t: float) -> float:
    if not samples:
        return 0.0
    if t <= samples[0][0]:
        return samples[0][2]
    for (ta, _, ca), (tb, _, cb) in zip(samples, samples[1:]):
        if ta <= t <= tb:
            return ca + (cb - ca) * (t - ta) / (tb - ta) if tb > ta else cb
    return samples[-1][2]


def run_measured(cmd: Sequence[str], env: Optional[dict] = None, capture: bool = True,
                 exit_codes: Sequence[int] = (0,)) -> Measurement:
    """Run cmd to completion, sampling the summed RSS and CPU time of its whole process tree.

    CPU time: the larger of the sampled per-process totals (each process's last sample; misses at most
    SAMPLE_S per process) and getrusage(RUSAGE_CHILDREN)'s delta (exact for processes that were waited
    for). Raises SystemExit with the output's tail if the command fails.
    """
    env = dict(os.environ if env is None else env)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    proc = subprocess.Popen(list(cmd), stdout=out, stderr=subprocess.STDOUT, env=env)
    peak, per_pid, samples = [0], {}, []

    def sample():
        while proc.poll() is None:
            rss, cpu = tree_sample(proc.pid)
            per_pid.update(cpu)
            peak[0] = max(peak[0], rss)
            samples.append((time.time(), rss, sum(per_pid.values())))
            time.sleep(SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    waited = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    cpu_s = max(waited, sum(per_pid.values()))
    samples.append((time.time(), 0, cpu_s))
    text = output.decode(errors="replace") if output else ""
    if proc.returncode not in exit_codes:
        sys.stderr.write(text[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    return Measurement(wall, peak[0], cpu_s, samples, text)


class SteadyState(NamedTuple):
    """A job at two input sizes n1 < n2 (best wall of `repeat` runs each)."""
    n1: int
    n2: int
    walls: Dict[int, float]
    peaks: Dict[int, int]          # bytes, max over the runs at that size
    cpus: Dict[int, float]         # CPU seconds of the fastest run at that size

    @property
    def rate(self) -> float:
        """Steady-state images/s, (n2 - n1) / (t2 - t1): the fixed start-up cancels out."""
        dt = self.walls[self.n2] - self.walls[self.n1]
        return (self.n2 - self.n1) / dt if dt > 0 else float("nan")

    @property
    def cores_busy(self) -> float:
        """CPU seconds per wall second of the extra (n2 - n1) images: how many cores the job really kept busy."""
        dt = self.walls[self.n2] - self.walls[self.n1]
        return (self.cpus[self.n2] - self.cpus[self.n1]) / dt if dt > 0 else float("nan")

    @property
    def per_cpu_s(self) -> float:
        """Images per CPU second of the whole process tree, steady state."""
        dc = self.cpus[self.n2] - self.cpus[self.n1]
        return (self.n2 - self.n1) / dc if dc > 0 else float("nan")

    def end_to_end(self, n: int) -> float:
        return n / self.walls[n]

    @property
    def peak(self) -> int:
        return max(self.peaks.values())


def fmt(x: Optional[float], spec: str = ".2f") -> str:
    """x formatted, or "n/a" for None / NaN."""
    return "n/a" if x is None or x != x else format(x, spec)


def unmeasurable(states: Dict[str, "SteadyState"]) -> str:
    """A note naming the runs whose steady state could not be measured (t2 <= t1), or ""."""
    bad = [label for label, st in states.items() if st.rate != st.rate]
    if not bad:
        return ""
    return (f"steady state not measurable for {', '.join(bad)}: the N2 run was no slower than the N1 run "
            "(start-up noise swamps the extra images; raise --n2 or --repeat)")


def two_sizes(run: Callable[[int, int], Measurement], n1: int, n2: int, repeat: int = 1) -> SteadyState:
    """run(n, r) for each size and repeat; the fastest run per size counts, the peak RSS is the max."""
    walls, peaks, cpus = {}, {}, {}
    for n in (n1, n2):
        runs = [run(n, r) for r in range(max(1, repeat))]
        best = min(runs, key=lambda m: m.wall)
        walls[n], peaks[n], cpus[n] = best.wall, max(m.peak_rss for m in runs), best.cpu_s
    return SteadyState(n1, n2, walls, peaks, cpus)


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b != b or a != a or b <= 0:
        return None
    return a / b


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


_MACHINE: Optional[dict] = None


def machine() -> dict:
    """What the numbers were measured on (computed on the first call: the load average is the start's)."""
    global _MACHINE
    if _MACHINE is not None:
        return _MACHINE
    try:
        import apache_beam
        beam = apache_beam.__version__
    except ImportError:
        beam = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    _MACHINE = {"cpu": _cpu_model(), "arch": platform.machine(), "cores": os.cpu_count(), "usable_cores": usable,
                "ram_gib": _ram_gib(), "python": platform.python_version(), "apache_beam": beam,
                "os": f"{platform.system()} {platform.release()}",
                "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}
    return _MACHINE


def machine_text(m: dict) -> str:
    return (f"{m['cpu']} ({m['arch']}), {m['cores']} cores, {m['ram_gib']} GiB RAM, Python {m['python']}, "
            f"apache-beam {m['apache_beam']}, {m['os']}; load average at start "
            f"{' / '.join(str(x) for x in m['loadavg_at_start'])}")


def machine_line(m: dict) -> str:
    return f"machine: {machine_text(m)}"


def _clean(value):
    """NaN/inf -> None, floats rounded: a JSON file any reader accepts."""
    if isinstance(value, float):
        return None if value != value or value in (float("inf"), float("-inf")) else round(value, 4)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def summary(job: str, *, ours: Optional[float], cores_used: float, how: str, reference_rate: Optional[float],
            reference: str, scaling: Optional[float], peak_rss: Optional[int], ratio_to_reference=None,
            **extra) -> dict:
    """The `--json` summary every bench script writes (bench_all.py reads these).

    ours: the job's steady-state images/s on `cores_used` cores; images_per_s_per_core = ours / cores_used.
    ratio_to_reference defaults to images_per_s_per_core / reference_images_per_s.
    """
    per_core = ours / cores_used if ours is not None and cores_used else None
    out = {"job": job, "images_per_s_per_core": per_core, "cores_used": cores_used, "how": how,
           "reference_images_per_s": reference_rate,
           "ratio_to_reference": ratio(per_core, reference_rate) if ratio_to_reference is None
           else ratio_to_reference,
           "reference": reference, "scaling_1_to_2": scaling,
           "peak_rss_mib": peak_rss / MIB if peak_rss is not None else None, "machine": machine()}
    out.update(extra)
    return _clean(out)


def write_json(path: Optional[str], data: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    print(f"summary written to {path}")
