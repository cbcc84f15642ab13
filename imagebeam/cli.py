"""The `imagebeam` command: one sub-command per job, each a `run(argv)` in imagebeam.pipelines."""
from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import List, Optional

JOBS = {
    "downsample": ("imagebeam.pipelines.downsample", "ImageNet tars/folders -> Imagenet8/16/32/64 batches"),
    "colorize": ("imagebeam.pipelines.colorize",
                 "images -> koalarization Lab + Inception-ResNet-v2 TFRecords (SPEC §3)"),
    "download": ("imagebeam.pipelines.download",
                 "URL lists -> md5(url).jpeg files + manifest.jsonl (restartable, polite, deduplicated)"),
    "cifar": ("imagebeam.pipelines.cifar",
              "CIFAR-10/100 python archives -> processed pickle (sharpened, shuffled), TFRecords or Imagenet32 batches"),
    "fetch": ("imagebeam.pipelines.fetch_archive:fetch_main",
              "download an archive (CIFAR, ILSVRC2012 by name, or --url) with resume and md5 check"),
    "verify": ("imagebeam.pipelines.fetch_archive:verify_main", "check the md5 of archives on disk"),
    "imagenet-layout": ("imagebeam.pipelines.imagenet_layout",
                        "ILSVRC2012 train/val/test tars + devkit -> ROOT/{train,val}/<wnid>/, ROOT/test/"),
    "preview": ("imagebeam.preview:preview_main", "PNG contact sheet of random samples from any imagebeam output"),
    "inspect": ("imagebeam.inspect_outputs:inspect_main",
                "counts, labels, sizes and format checks of an output (exit 1 on a failed check)"),
    "resize": ("imagebeam.pipelines.resize", "images -> 299x299 letterboxed image files (koalarization's resize)"),
    "convert-weights": ("imagebeam.convert_weights",
                        "TF-slim Inception checkpoint -> .npz weights for --embedding-backend jax/torch (needs TF)"),
    "demo": ("imagebeam.pipelines.demo", "build the bundled sample from real photos and run the jobs on it"),
}


def usage() -> str:
    lines = ["usage: imagebeam [--version] <job> [options] [beam pipeline options] [--verbose]", "", "jobs:"]
    lines += [f"  {name:<12} {about}" for name, (_, about) in JOBS.items()]
    lines += ["", "`imagebeam <job> --help` lists a job's options; other --flags go to Beam (e.g. --runner).",
              "--verbose shows every library's log lines and full tracebacks on the terminal."]
    return "\n".join(lines)


def _output_of(argv: List[str]) -> Optional[str]:
    for i, a in enumerate(argv):
        if a == "--output" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--output="):
            return a.split("=", 1)[1]
    return None


def main(argv: Optional[List[str]] = None) -> int:
    """The command. Exit status: 0 done (and the dataset usable), 1 the job failed or its dataset is not
    usable (the summary's last line says which rule), 2 a mistake in the command line (one line)."""
    own_process = argv is None  # the real command: it may take over stderr (see runners/console.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    if argv[:1] == ["--version"]:
        from imagebeam import __version__

        print(f"imagebeam {__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    job, rest = argv[0], argv[1:]
    if job not in JOBS:
        print(f"imagebeam: unknown job {job!r} (jobs: {', '.join(JOBS)}; `imagebeam --help` says what each does)",
              file=sys.stderr)
        return 2
    # TensorFlow's C++ INFO/WARNING lines drown the job's own output; inherited by the SDK workers.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
    if verbose:
        os.environ.setdefault("IMAGEBEAM_VERBOSE", "1")
    console = None
    if own_process:
        from imagebeam.runners.console import Console

        console = Console(verbose)
        console.configure_logging()
    else:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        for noisy in ("apache_beam", "absl", "tensorflow"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # The local job service relays every SDK worker's start-up warnings; keep its errors only.
        logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(logging.ERROR)
    failed: Optional[BaseException] = None
    try:
        module_name, _, function = JOBS[job][0].partition(":")
        module = importlib.import_module(module_name)
        entry = getattr(module, function or ("main" if hasattr(module, "main") else "run"))
        result = entry(rest)
        return result if isinstance(result, int) else 0
    except SystemExit as exc:
        if isinstance(exc.code, str):  # a check refused the command line: one line, status 2
            print(f"imagebeam {job}: {exc.code}", file=sys.stderr)
            return 2
        return exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:
        print(f"imagebeam {job}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a failed pipeline: the cause, the step, the log
        failed = exc
        return 1
    finally:
        _finish(job, rest, failed, console, verbose)


def _finish(job: str, rest: List[str], failed: Optional[BaseException], console, verbose: bool) -> None:
    from imagebeam.runners.console import full_traceback, keep_log_with_output, short_error

    log_path = None
    if failed is not None:
        trace = full_traceback(failed)
        if console is not None:
            console.write_log("\n" + trace)
        if verbose:
            sys.stderr.write(trace)
    if console is not None:
        log_path = console.close(keep_log=failed is not None)
        if log_path:
            log_path = keep_log_with_output(log_path, _output_of(rest), job)
    if failed is not None:
        if console is None and not verbose:
            import tempfile

            fd, log_path = tempfile.mkstemp(prefix=f"imagebeam-{job}-", suffix=".log")
            with os.fdopen(fd, "w") as f:
                f.write(full_traceback(failed))
            log_path = keep_log_with_output(log_path, _output_of(rest), job)
        print(short_error(job, failed, log_path), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
