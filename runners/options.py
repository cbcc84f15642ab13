"""Pipeline options shared by every job: the local default runner, short runner names, and where a
pipeline may safely run.

Beam 2.77's DirectRunner first tries to download and start the Prism runner binary and only falls back
to the Python FnApiRunner when that fails, which on an offline machine costs a failed download per run.
Our local default is therefore the FnApiRunner itself, in multi-process mode with one SDK worker per
core: no network, real parallelism, and the same portable worker code path the cluster runners use.
`--runner DirectRunner` (or any other Beam runner) still passes through unchanged.

Short runner names: `local` (the default above), `dask` (Beam's DaskRunner with imagebeam's fix, on the
cluster at `--dask-address HOST:PORT`), and `portable` (PortableRunner against Beam's embedded job
service with SDK workers from a worker pool imagebeam starts: the wire path Flink and Spark use).
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, Iterator, List, Sequence, Tuple

from apache_beam.options.pipeline_options import PipelineOptions

from imagebeam.runners import checks

LOCAL_RUNNER = "apache_beam.runners.portability.fn_api_runner.fn_runner.FnApiRunner"
DASK_RUNNER = "imagebeam.runners.dask_runner.DaskRunner"
PORTABLE_RUNNER = "PortableRunner"
SHORT_RUNNERS = {"local": LOCAL_RUNNER, "fnapi": LOCAL_RUNNER, "dask": DASK_RUNNER, "portable": PORTABLE_RUNNER}


def add_stage_memory_argument(parser: argparse.ArgumentParser) -> None:
    """`--stage-memory MB`, the in-memory budget of the jobs that stage images (downsample, colorize)."""
    from imagebeam.transforms.bookkeeping.staging import DEFAULT_STAGE_MEMORY_MB

    parser.add_argument(
        "--stage-memory", type=int, default=DEFAULT_STAGE_MEMORY_MB, metavar="MB",
        help="staged bytes a worker holds before it writes a sorted run to disk (default "
             f"{DEFAULT_STAGE_MEMORY_MB}); lower it to fit many workers in little memory. The output does "
             "not change with it, and a killed run may be resumed with another value")


def check_stage_memory(args: argparse.Namespace) -> None:
    if args.stage_memory < 1:
        raise checks.UsageError(f"--stage-memory must be at least 1 (MB), not {args.stage_memory}")


def add_failure_rate_argument(parser: argparse.ArgumentParser) -> None:
    """`--max-failure-rate`: above it the job exits non-zero, the output is not a usable dataset."""
    from imagebeam.transforms.bookkeeping.report import DEFAULT_MAX_FAILURE_RATE

    parser.add_argument(
        "--max-failure-rate", type=float, default=DEFAULT_MAX_FAILURE_RATE, metavar="FRACTION",
        help=f"exit non-zero when more than this fraction of the inputs fail (default {DEFAULT_MAX_FAILURE_RATE}; "
             "everything that could be written still is, and failures.jsonl says why); 1 disables the rule")


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def is_local_runner(runner: str | None) -> bool:
    """Beam's Python FnApiRunner, however named: ours, a short name, or a DirectRunner (None = default)."""
    name = (runner or "").lower()
    return name in ("", LOCAL_RUNNER.lower()) or SHORT_RUNNERS.get(name) == LOCAL_RUNNER or "direct" in name


def beam_args_with_defaults(beam_args: Sequence[str], local_mode: str = "multi_processing") -> List[str]:
    """Fill in the local defaults (FnApiRunner, `local_mode`, one worker per core) unless given.

    Jobs whose work is network I/O on their own thread pools (download) or a few large numpy arrays
    (cifar) run in-process ("in_memory"): SDK worker processes would add seconds of start-up and of data
    transfer, and nothing to throughput. "multi_threading" is
    refused: Beam 2.77's FnApiRunner loses and corrupts elements in that mode (see `run_pipeline`).
    """
    args = list(beam_args)
    if (_flag_value(args, "--direct_running_mode") or "").lower() == "multi_threading":
        raise SystemExit("--direct_running_mode multi_threading is refused: with apache-beam 2.77 the "
                         "FnApiRunner silently drops and corrupts elements in that mode (a 200,000-key "
                         "GroupByKey lost up to 1% of its keys here). Use multi_processing (the default) "
                         "or in_memory.")
    args = _renamed(args, "--dask-address", "--dask_client_address")
    runner = _flag_value(args, "--runner")
    if runner is None:
        args += ["--runner", LOCAL_RUNNER]
    elif runner.lower() in SHORT_RUNNERS:
        args = [a for a in args if not (a == "--runner" or a.startswith("--runner="))]
        args = [a for a in args if a != runner] + ["--runner", SHORT_RUNNERS[runner.lower()]]
    if (runner or "").lower() == "portable" and not _has_flag(args, "--job_endpoint"):
        args += ["--job_endpoint", "embed"]  # Beam's own job service, in this process
    if is_local_runner(runner) or (runner or "").lower() == "portable":  # the embedded job service runs it too
        if not _has_flag(args, "--direct_running_mode"):
            args += ["--direct_running_mode", local_mode]
        if not _has_flag(args, "--direct_num_workers") and local_mode == "multi_processing":
            args += ["--direct_num_workers", "0"]  # 0 = one worker per core
    return args


def progress_monitor(job: str, pipeline_options: PipelineOptions):
    """A live progress line for local runs on a terminal (or with IMAGEBEAM_PROGRESS=1); off otherwise.

    `run_job` hands `monitor.address` to the job's DoFns.
    """
    from apache_beam.options.pipeline_options import StandardOptions

    from imagebeam.transforms.bookkeeping.progress import ProgressMonitor

    local = is_local_runner(pipeline_options.view_as(StandardOptions).runner) or \
        _is_embedded_portable(pipeline_options)
    wanted = os.environ.get("IMAGEBEAM_PROGRESS", "auto").lower()
    enabled = local and (wanted in ("1", "true", "yes") or (wanted == "auto" and sys.stderr.isatty()))
    return ProgressMonitor(job, enabled)


def run_job(job: str, build: Callable[..., None], pipeline_options: PipelineOptions, args, *build_args
            ) -> Dict[str, int]:
    """`run_pipeline(build, options, args, ...)` with the job's live progress line: the DoFns find the
    monitor's address (None when off) in `args.progress`."""
    with progress_monitor(job, pipeline_options) as monitor:
        args.progress = monitor.address
        return run_pipeline(build, pipeline_options, args, *build_args)


def _renamed(args: List[str], ours: str, beams: str) -> List[str]:
    """Our dashed flag spelled as Beam's option (`--dask-address X` -> `--dask_client_address X`)."""
    return [beams + a[len(ours):] if a == ours or a.startswith(ours + "=") else a for a in args]


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
          local_mode: str = "multi_processing") -> Tuple[argparse.Namespace, PipelineOptions]:
    """Known args for the job; everything else becomes PipelineOptions (with our local defaults).

    A mistake in the job's own options is one line (`imagebeam JOB: error: ...`, exit 2), not argparse's
    usage block; a Dask scheduler that does not answer is found here, before anything runs.
    """
    known, beam_args = parser.parse_known_args(argv)
    full = beam_args_with_defaults(beam_args, local_mode)
    if _flag_value(full, "--runner") == DASK_RUNNER:
        checks.check_dask_address(_flag_value(full, "--dask_client_address"))
    return known, PipelineOptions(full)



def in_process(pipeline_options: PipelineOptions) -> PipelineOptions:
    """The same options, but the local runner runs in-process (no gRPC, no SDK worker processes).

    For the small TFT phase of the downsample job, which needs TensorFlow in the runner's process (see
    `run_pipeline`). Cluster runners are left as they are.
    """
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    if not is_local_runner(pipeline_options.view_as(StandardOptions).runner):
        return pipeline_options
    opts = PipelineOptions.from_dictionary(pipeline_options.get_all_options(drop_default=True))
    opts.view_as(DirectOptions).direct_running_mode = "in_memory"
    opts.view_as(DirectOptions).direct_num_workers = 1
    return opts


def _uses_local_grpc(pipeline_options: PipelineOptions) -> bool:
    """The runner's gRPC data plane would run in this process (local multi-process, embedded job service)."""
    from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

    runner = pipeline_options.view_as(StandardOptions).runner
    if _is_embedded_portable(pipeline_options):
        return True
    mode = pipeline_options.view_as(DirectOptions).direct_running_mode
    return is_local_runner(runner) and mode in ("multi_processing", "multi_threading")


def _is_embedded_portable(pipeline_options: PipelineOptions) -> bool:
    from apache_beam.options.pipeline_options import PortableOptions, StandardOptions

    runner = (pipeline_options.view_as(StandardOptions).runner or "").rsplit(".", 1)[-1]
    return runner == PORTABLE_RUNNER and pipeline_options.view_as(PortableOptions).job_endpoint == "embed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def sdk_worker_pool(pipeline_options: PipelineOptions) -> Iterator[PipelineOptions]:
    """For `--runner portable` without an environment: a local pool of out-of-process SDK workers.

    Beam's `worker_pool_main` starts SDK harness processes on request from the job service (the EXTERNAL
    environment); it runs `python` from PATH, so this interpreter's bin directory goes first.
    """
    from apache_beam.options.pipeline_options import PortableOptions

    portable = pipeline_options.view_as(PortableOptions)
    if not _is_embedded_portable(pipeline_options) or portable.environment_type:
        yield pipeline_options
        return
    port = _free_port()
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    pool = subprocess.Popen([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
                             f"--service_port={port}"], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if pool.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the SDK worker pool did not start")
            time.sleep(0.1)
        opts = PipelineOptions.from_dictionary(pipeline_options.get_all_options(drop_default=True,
                                                                                retain_unknown_options=True))
        opts.view_as(PortableOptions).environment_type = "EXTERNAL"
        opts.view_as(PortableOptions).environment_config = f"localhost:{port}"
        yield opts
    finally:
        pool.terminate()
        try:
            pool.wait(10)
        except subprocess.TimeoutExpired:
            pool.kill()


def run_pipeline(build: Callable[..., None], pipeline_options: PipelineOptions, *build_args,
                 isolate: bool = False, loads_tensorflow: bool = False) -> Dict[str, int]:
    """Build and run one pipeline: `build(pipeline, *build_args)`.

    Beam 2.77's FnApiRunner loses elements silently (a few percent of 100,000 rows, no error) when its
    gRPC data plane runs in a process that has imported TensorFlow, which bundles its own gRPC and
    protobuf; TensorFlow inside the SDK workers is harmless. (Its multi_threading mode, with the data
    plane in-process, loses and corrupts elements even without TensorFlow, so it is refused.) So a local multi-process/multi-thread
    pipeline never runs in a process where TensorFlow is loaded: it runs in a freshly spawned
    interpreter instead; `loads_tensorflow` says that `build` itself imports it (a TFT analysis), which
    counts the same. `isolate=True` always spawns, to keep TensorFlow out of the caller.

    Returns the pipeline's counters as {"namespace:name": value} (empty when run in a child process).
    """
    if isolate or (_uses_local_grpc(pipeline_options) and (loads_tensorflow or "tensorflow" in sys.modules)):
        _run_in_child(build, pipeline_options, build_args)
        return {}
    import apache_beam as beam

    with sdk_worker_pool(pipeline_options) as options, beam.Pipeline(options=options) as p:
        build(p, *build_args)
    return counters(p.result)


def counters(result) -> Dict[str, int]:
    """Committed (or, where the runner has none, attempted) counter values of a finished pipeline."""
    out: Dict[str, int] = {}
    try:
        found = result.metrics().query()["counters"]
    except (AttributeError, NotImplementedError, KeyError):  # runners without metrics
        return out
    for metric in found:
        key = f"{metric.key.metric.namespace}:{metric.key.metric.name}"
        try:
            value = metric.committed
        except Exception:  # noqa: BLE001 - some runners only support attempted values
            value = None
        out[key] = out.get(key, 0) + int(value if value is not None else metric.attempted or 0)
    return dict(sorted(out.items()))


def _child_main(build, options: dict, build_args: tuple, errors) -> None:
    try:
        run_pipeline(build, PipelineOptions.from_dictionary(options), *build_args)
    except BaseException:  # reported to the parent, which raises
        errors.put(traceback.format_exc())
        raise SystemExit(1)


def _run_in_child(build, pipeline_options: PipelineOptions, build_args: tuple) -> None:
    ctx = multiprocessing.get_context("spawn")
    errors = ctx.SimpleQueue()
    options = pipeline_options.get_all_options(drop_default=True, retain_unknown_options=True)
    child = ctx.Process(target=_child_main, args=(build, options, build_args, errors))
    child.start()
    child.join()
    if child.exitcode != 0:
        detail = errors.get() if not errors.empty() else f"exit code {child.exitcode}"
        raise RuntimeError(f"pipeline {getattr(build, '__name__', build)} failed:\n{detail}")

