"""Pipeline options shared by every job: the local default runner and short runner names.

Beam 2.77's DirectRunner first tries to download and start the Prism runner binary and only falls back
to the Python FnApiRunner when that fails, which on an offline machine costs a failed download per run.
Our local default is therefore the FnApiRunner itself, in multi-process mode with one SDK worker per
core: no network, real parallelism, and the same portable worker code path the cluster runners use.
`--runner DirectRunner` (or any other Beam runner) still passes through unchanged.
"""
from __future__ import annotations

import argparse
from typing import List, Sequence, Tuple

from apache_beam.options.pipeline_options import PipelineOptions

LOCAL_RUNNER = "apache_beam.runners.portability.fn_api_runner.fn_runner.FnApiRunner"
SHORT_RUNNERS = {"local": LOCAL_RUNNER, "fnapi": LOCAL_RUNNER}


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def beam_args_with_defaults(beam_args: Sequence[str]) -> List[str]:
    """Fill in the local defaults (FnApiRunner, multi-process, all cores) unless given."""
    args = list(beam_args)
    runner = _flag_value(args, "--runner")
    if runner is None:
        args += ["--runner", LOCAL_RUNNER]
    elif runner.lower() in SHORT_RUNNERS:
        args = [a for a in args if not (a == "--runner" or a.startswith("--runner="))]
        args = [a for a in args if a != runner] + ["--runner", SHORT_RUNNERS[runner.lower()]]
    if (runner is None or runner.lower() in SHORT_RUNNERS or "direct" in runner.lower()):
        if not _has_flag(args, "--direct_running_mode"):
            args += ["--direct_running_mode", "multi_processing"]
        if not _has_flag(args, "--direct_num_workers"):
            args += ["--direct_num_workers", "0"]  # 0 = one worker per core
    return args


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> Tuple[argparse.Namespace, PipelineOptions]:
    """Known args for the job; everything else becomes PipelineOptions (with our local defaults)."""
    known, beam_args = parser.parse_known_args(argv)
    return known, PipelineOptions(beam_args_with_defaults(beam_args))
