"""Inception-ResNet-v2 embedding speed per Keras backend on a GPU machine (or on CPU with --smoke).

Prints, for each backend installed (torch, jax, tensorflow):
  - bare model: images/s of the compiled model call on input already on the device, per batch size
    (32/64/128/256) and precision (float32, bfloat16), timed after warm-up with a device sync per call;
  - handler: the project's `EmbedChunks` (RunInference over `InceptionChunkHandler`, model built by its own
    `load_model`) on pre-decoded 299x299 RGB uint8 chunks, in a local Beam pipeline, images/s after the
    first chunks (warm-up), and its share of the bare figure at the same batch and precision;
  - handler-noop (`--handler-noop`, or alone with `--noop-only`): the same pipeline with a model that
    returns zeros at once, i.e. the cost per chunk of everything around the model (on CPU too);
  - torch.compile at one point (its compile time and rate), when torch is there;
then the whole `colorize` job end to end on this machine's cores with a GPU backend (images/s).
Targets on an H200 (issue 16): >= 4,000 images/s bare in bfloat16; handler >= 85% of bare.

The GPU machine has PyTorch and JAX but neither TensorFlow nor a registry. Carried wheels (made here, in
the repository root; ~45 MB):

    echo /.whl/ >> .git/info/exclude; mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        --platform manylinux_2_5_x86_64 -d .whl keras==3.15.1 namex==0.1.0 optree==0.20.0 \
        apache-beam==2.77.0 beartype==0.22.9 cryptography==50.0.2 fastavro==1.13.1 fasteners==0.20 \
        httplib2==0.32.1 jsonpickle==4.1.4 objsize==0.7.1 proto-plus==1.29.0 pytz==2026.6 zstandard==0.25.0 \
        google-crc32c==1.9.0 protobuf==6.33.6 grpcio==1.85.3 orjson==3.13.0 dill==0.4.1

and the device command (carry [".whl"]):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site || exit
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . || exit
    PYTHONUNBUFFERED=1 python3 tests/benchmarks/bench_embedding_gpu.py --handler-noop --out $OUT/embedding_gpu.json

`--smoke` runs a tiny version on CPU (CI runs it, so the script cannot rot). `--budget` bounds the wall
time: points left when it runs out are reported as skipped, not silently dropped.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
GPU_BACKENDS = ("torch", "jax", "tensorflow")


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _photos_rgb(n: int) -> np.ndarray:
    """n letterboxed 299x299 RGB uint8 images from real-photo JPEGs (as the fit step hands them over)."""
    from imagebeam import sample as sample_lib
    from imagebeam.transforms.imaging.decode import decode_rgb
    from imagebeam.transforms.imaging.resize import letterbox

    unique = [np.asarray(letterbox(decode_rgb(d))) for d in sample_lib.imagenet_like_jpegs(min(n, 32), seed=3)]
    return np.stack([unique[i % len(unique)] for i in range(n)])


def _emit(record: dict) -> None:
    print("RESULT " + json.dumps(record), flush=True)


# ----------------------------------------------------------------------------------------------
# One backend, in its own process (Keras' backend is per process)


def _time_calls(call, sync, seconds: float, min_calls: int = 3) -> tuple:
    """(calls, elapsed) of back-to-back calls, each synced, for about `seconds`."""
    calls, start = 0, time.perf_counter()
    while True:
        sync(call())
        calls += 1
        elapsed = time.perf_counter() - start
        if calls >= min_calls and elapsed >= seconds:
            return calls, elapsed


def _bare(backend: str, args, deadline: float) -> Dict[str, object]:
    from imagebeam.transforms.model import inception
    from imagebeam.transforms.model.embedding_backends import Embedder

    rgb = _photos_rgb(max(args.batches))
    compile_mode = "off" if backend == "torch" else "auto"  # torch.compile is measured apart, at one point
    best = {}
    for precision in args.precisions:
        t0 = time.perf_counter()
        emb = Embedder(inception.build_model("random", precision), compile_mode)
        build_s = time.perf_counter() - t0
        for batch in args.batches:
            point = {"kind": "bare", "backend": backend, "precision": precision, "batch": batch,
                     "compiled": emb.compiled, "build_s": round(build_s, 1)}
            if time.perf_counter() > deadline:
                _emit({**point, "skipped": "budget"})
                continue
            x = emb.to_device(rgb[:batch])
            t0 = time.perf_counter()
            emb.to_numpy(emb.device_call(x))
            emb.to_numpy(emb.device_call(x))
            warm_s = time.perf_counter() - t0
            calls, elapsed = _time_calls(lambda: emb.device_call(x), emb.to_numpy, args.seconds)
            rate = calls * batch / elapsed
            best[(precision, batch)] = rate
            _emit({**point, "images_per_s": round(rate, 1), "calls": calls, "warmup_s": round(warm_s, 1)})
        emb = None  # free the device memory before the next precision
    return best


def _torch_compiled(args, deadline: float) -> None:
    from imagebeam.transforms.model import inception
    from imagebeam.transforms.model.embedding_backends import Embedder

    point = {"kind": "bare", "backend": "torch", "precision": args.handler_precision, "batch": args.handler_batch,
             "compiled": True}
    if time.perf_counter() > deadline:
        _emit({**point, "skipped": "budget"})
        return
    emb = Embedder(inception.build_model("random", args.handler_precision), "on")
    x = emb.to_device(_photos_rgb(args.handler_batch))
    t0 = time.perf_counter()
    emb.to_numpy(emb.device_call(x))
    compile_s = time.perf_counter() - t0
    emb.to_numpy(emb.device_call(x))
    calls, elapsed = _time_calls(lambda: emb.device_call(x), emb.to_numpy, args.seconds)
    _emit({**point, "images_per_s": round(calls * args.handler_batch / elapsed, 1), "calls": calls,
           "compile_s": round(compile_s, 1)})


def _handler(backend: str, args, deadline: float, compile_mode: str, noop: bool = False) -> None:
    """EmbedChunks over pre-decoded chunks in a local in-process Beam pipeline; rate from output stamps.

    `noop`: the handler's model replaced by one that returns zeros at once, so the rate is that of the
    pipeline around the model alone (RunInference, batching, Beam's element counters), on any machine.
    """
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    from imagebeam.transforms.formats.lab_shards import FittedChunk
    from imagebeam.transforms.model import embedding
    from imagebeam.transforms.model.embedding import EmbedChunks

    batch, chunks = args.handler_batch, args.handler_chunks
    point = {"kind": "handler-noop" if noop else "handler", "backend": backend,
             "precision": args.handler_precision, "batch": batch, "chunks": chunks, "compile": compile_mode}
    if noop:  # this child process only, which runs the in-process pipeline below
        embedding.InceptionChunkHandler.load_model = lambda self: (
            lambda rgb: np.zeros((len(rgb), 1001), dtype=np.float32))
    if time.perf_counter() > deadline:
        _emit({**point, "skipped": "budget"})
        return
    folder = tempfile.mkdtemp(prefix="bench_handler_")
    np.save(os.path.join(folder, "rgb.npy"), _photos_rgb(batch))
    stamps = os.path.join(folder, "stamps.txt")
    t0 = time.perf_counter()
    options = PipelineOptions(["--direct_running_mode=in_memory", "--direct_num_workers=1"])
    with beam.Pipeline(options=options) as p:
        fitted = (p
                  | "Chunks" >> beam.Create(list(range(chunks)), reshuffle=False)
                  | "Fitted" >> beam.ParDo(_MakeChunk(os.path.join(folder, "rgb.npy"))).with_output_types(
                      FittedChunk))
        embedded, _ = fitted | "Embed" >> EmbedChunks("random", args.handler_precision, None, backend, compile_mode,
                                                      batch)
        _ = embedded | "Stamp" >> beam.ParDo(_Stamp(stamps))
    wall = time.perf_counter() - t0
    times = [float(line) for line in open(stamps)]
    warm = min(args.handler_warmup, len(times) - 2)
    per_chunk = (times[-1] - times[warm]) / (len(times) - 1 - warm)
    _emit({**point, "images_per_s": round(batch / per_chunk, 1), "ms_per_chunk": round(per_chunk * 1e3, 2),
           "wall_s": round(wall, 1), "warmup_chunks": warm + 1})
    shutil.rmtree(folder, ignore_errors=True)


import apache_beam as _beam  # noqa: E402  (the DoFns below are picklable top-level classes)


class _MakeChunk(_beam.DoFn):
    """chunk number -> FittedChunk of the pre-decoded images (the fit step's output)."""

    def __init__(self, path: str):
        self._path = path
        self._rgb = None

    def setup(self):
        self._rgb = np.load(self._path, allow_pickle=False)

    def process(self, index: int):
        from imagebeam.transforms.formats.lab_shards import Chunk, FittedChunk

        # The same array each time: building chunks is the fit step's work, not the handler's.
        yield FittedChunk(Chunk("train", 0, index, ()), (), self._rgb, ())


class _Stamp(_beam.DoFn):
    """Append the time each embedded chunk arrives (a file, so any runner can report it)."""

    def __init__(self, path: str):
        self._path = path

    def process(self, element):
        fitted, embeddings = element
        assert embeddings.shape[0] == len(fitted.rgb) and np.isfinite(embeddings).all()
        with open(self._path, "a") as f:
            f.write(f"{time.perf_counter()}\n")
        return []


def child(backend: str, args) -> None:
    from imagebeam.transforms.model.embedding_backends import select

    select(backend)
    deadline = time.perf_counter() + args.budget
    if args.noop_only:
        _handler(backend, args, deadline, "off", noop=True)
        return
    _bare(backend, args, deadline)
    _handler(backend, args, deadline, "off" if backend == "torch" else "auto")
    if args.handler_noop:
        _handler(backend, args, deadline, "off", noop=True)
    if backend == "torch" and args.torch_compile:  # last: its compilation can take minutes
        _torch_compiled(args, deadline)


# ----------------------------------------------------------------------------------------------
# The parent: one child per backend, then the whole job


def _run_child(backend: str, args, budget: float, log) -> List[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", backend, "--budget", str(budget),
           "--batches", ",".join(map(str, args.batches)), "--precisions", ",".join(args.precisions),
           "--seconds", str(args.seconds), "--handler-batch", str(args.handler_batch),
           "--handler-chunks", str(args.handler_chunks), "--handler-precision", args.handler_precision,
           "--handler-warmup", str(args.handler_warmup)] + (["--torch-compile"] if args.torch_compile else []) \
        + (["--handler-noop"] if args.handler_noop else []) + (["--noop-only"] if args.noop_only else [])
    records = []
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tail: List[str] = []
    try:
        for line in proc.stdout:
            log.write(line)
            if line.startswith("RESULT "):
                record = json.loads(line[7:])
                records.append(record)
                print("  " + _describe(record), flush=True)
            else:
                tail = (tail + [line.rstrip()])[-15:]
        proc.wait(timeout=budget + 300)
    except subprocess.TimeoutExpired:
        proc.kill()
    if proc.returncode != 0:
        print(f"  {backend}: exited {proc.returncode}; last lines:\n    " + "\n    ".join(tail), flush=True)
        records.append({"kind": "error", "backend": backend, "returncode": proc.returncode, "tail": tail})
    return records


def _describe(r: dict) -> str:
    head = f"{r['kind']:7s} {r['backend']:10s} {r.get('precision', ''):8s} batch {r.get('batch', ''):>3}"
    if "skipped" in r:
        return f"{head}: skipped ({r['skipped']})"
    extra = ", ".join(f"{k} {r[k]}" for k in ("ms_per_chunk", "compiled", "compile", "warmup_s", "compile_s",
                                              "build_s", "wall_s")
                      if k in r)
    return f"{head}: {r['images_per_s']:9.1f} images/s ({extra})"


def _job(args, log) -> dict:
    """`imagebeam colorize` on --job-images ImageNet-like JPEGs, this machine's cores, a GPU backend."""
    from imagebeam import sample as sample_lib

    folder = tempfile.mkdtemp(prefix="bench_job_")
    images, out = os.path.join(folder, "images"), os.path.join(folder, "out")
    os.makedirs(images)
    unique = list(sample_lib.imagenet_like_jpegs(min(args.job_images, 256), seed=5))
    for i in range(args.job_images):
        with open(os.path.join(images, f"img_{i:07d}.JPEG"), "wb") as f:
            f.write(unique[i % len(unique)])
    workers = args.job_workers or os.cpu_count()
    cmd = [sys.executable, "-m", "imagebeam.cli", "colorize", "--input", images, "--output", out,
           "--inception-weights", "random", "--embedding-backend", args.job_backend, "--embedding-compile",
           args.job_compile, "--precision", args.handler_precision, "--batch-size", str(args.job_batch),
           "--direct_num_workers", str(workers)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", IMAGEBEAM_PROGRESS="off")
    t0 = time.perf_counter()
    try:
        # Run from the scratch folder: the checkout's own imagebeam/ folder must not shadow the installed package.
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.job_timeout, cwd=folder)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, output = "timeout", str(exc.stdout or "") + str(exc.stderr or "")
    wall = time.perf_counter() - t0
    log.write(output)
    record = {"kind": "job", "backend": args.job_backend, "precision": args.handler_precision, "workers": workers,
              "images": args.job_images, "wall_s": round(wall, 1), "returncode": rc}
    meta_path = os.path.join(out, "metadata.json")
    if rc == 0 and os.path.exists(meta_path):
        meta = json.load(open(meta_path))
        written = meta["counts"]["written"]
        record.update(written=written, images_per_s=round(written / wall, 1),
                      embedding_size=meta.get("embedding_size"),
                      files=len(glob.glob(os.path.join(out, "*.tfrecord"))))
    else:
        record["tail"] = output.strip().splitlines()[-15:]
    shutil.rmtree(folder, ignore_errors=True)
    return record


def _table(records: List[dict], bare_target: float, share_target: float) -> str:
    lines = ["", "| backend | precision | batch | bare images/s | handler images/s | handler / bare |",
             "|---|---|---|---|---|---|"]
    bare = {(r["backend"], r["precision"], r["batch"]): r for r in records
            if r["kind"] == "bare" and "images_per_s" in r and not (r["backend"] == "torch" and r.get("compiled"))}
    handler = {(r["backend"], r["precision"], r["batch"]): r for r in records
               if r["kind"] == "handler" and "images_per_s" in r}
    for key in sorted(bare, key=lambda k: (k[0], k[1], k[2])):
        h = handler.get(key)
        share = f"{h['images_per_s'] / bare[key]['images_per_s']:.0%}" if h else ""
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {bare[key]['images_per_s']:.0f} | "
                     f"{h['images_per_s']:.0f} | {share} |" if h else
                     f"| {key[0]} | {key[1]} | {key[2]} | {bare[key]['images_per_s']:.0f} | | |")
    for r in records:
        if r["kind"] == "bare" and r["backend"] == "torch" and r.get("compiled") and "images_per_s" in r:
            lines.append(f"| torch.compile | {r['precision']} | {r['batch']} | {r['images_per_s']:.0f} "
                         f"(compile {r['compile_s']} s) | | |")
        if r["kind"] == "job":
            rate = r.get("images_per_s", f"failed ({r['returncode']})")
            lines.append(f"| colorize job, {r['backend']}, {r['workers']} workers | {r['precision']} | "
                         f"{r['images']} images | end to end: {rate} images/s | wall {r['wall_s']} s | |")
    best = max((r["images_per_s"] for k, r in bare.items() if k[1] == "bfloat16"), default=None)
    lines.append("")
    if best is not None:
        lines.append(f"best bare bfloat16: {best:.0f} images/s (target >= {bare_target:.0f}: "
                     f"{'met' if best >= bare_target else 'NOT met'})")
    for key, h in sorted(handler.items()):
        if key in bare:
            share = h["images_per_s"] / bare[key]["images_per_s"]
            lines.append(f"handler {key[0]} {key[1]} batch {key[2]}: {share:.0%} of bare (target >= "
                         f"{share_target:.0%}: {'met' if share >= share_target else 'NOT met'})")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny run on CPU (CI): batch 2, one backend, few images")
    p.add_argument("--backends", default=None, help="comma list (default: torch,jax,tensorflow where installed)")
    p.add_argument("--batches", default="32,64,128,256")
    p.add_argument("--precisions", default="bfloat16,float32")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per bare point")
    p.add_argument("--handler-batch", type=int, default=128)
    p.add_argument("--handler-chunks", type=int, default=80)
    # Beam's counters measure the size of the first 10 elements of every PCollection by pickling them
    # (about 25 ms per 256-image chunk here, three PCollections deep), then about 10/N of them: a cost of
    # a run's first chunks only, so they are left out of the steady rate with the model's warm-up.
    p.add_argument("--handler-warmup", type=int, default=12, help="first chunks left out of the handler rate")
    p.add_argument("--handler-precision", default="bfloat16")
    p.add_argument("--handler-noop", action="store_true",
                   help="also time the handler path with a model that returns zeros at once: the pipeline's own "
                        "cost per chunk (runs on CPU too)")
    p.add_argument("--noop-only", action="store_true",
                   help="only that no-op handler point (with --job-images 0: seconds, on any machine)")
    p.add_argument("--torch-compile", action="store_true", default=None)
    p.add_argument("--job-images", type=int, default=6000)
    p.add_argument("--job-backend", default="torch")
    p.add_argument("--job-compile", default="off")
    p.add_argument("--job-batch", type=int, default=64)
    p.add_argument("--job-workers", type=int, default=0, help="0: one per core")
    p.add_argument("--job-timeout", type=float, default=240)
    p.add_argument("--budget", type=float, default=420, help="wall seconds for all backends together")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="write every record as JSON here")
    p.add_argument("--log", default=None, help="write the children's whole output here")
    args = p.parse_args(argv)
    if args.smoke:
        args.batches, args.precisions, args.seconds = "2", "float32", 0.2
        args.handler_batch, args.handler_chunks, args.handler_warmup = 2, 4, 1
        args.handler_precision, args.job_images, args.job_batch, args.job_workers = "float32", 6, 3, 2
        args.job_compile, args.handler_noop = "off", True
        if args.torch_compile is None:
            args.torch_compile = False
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.precisions = str(args.precisions).split(",")
    if args.child:
        child(args.child, args)
        return 0

    return parent(args)


def _machine() -> str:
    gpu = "no GPU"
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
        gpu = out.splitlines()[0] if out else gpu
    versions = []
    from importlib import metadata

    for name in ("keras", "torch", "jax", "tensorflow", "apache-beam"):
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return f"{gpu}; {os.cpu_count()} cores; Python {sys.version.split()[0]}; " + ", ".join(versions)


def parent(args) -> int:
    wanted = args.backends.split(",") if args.backends else list(GPU_BACKENDS)
    backends = [b for b in wanted if _installed(b)]
    if args.smoke and not args.backends:
        backends = backends[:1]
    if not backends:
        print("no Keras backend installed (torch, jax, tensorflow)")
        return 1
    if args.job_backend not in backends:
        args.job_backend = backends[0]
    if args.torch_compile is None:
        args.torch_compile = bool(shutil.which("nvidia-smi"))
    print(f"Embedding benchmark: {_machine()}", flush=True)
    log = open(args.log, "w") if args.log else open(os.devnull, "w")
    records: List[dict] = []
    start = time.perf_counter()
    for i, backend in enumerate(backends):
        left = args.budget - (time.perf_counter() - start)
        budget = max(10.0, left / (len(backends) - i))
        print(f"{backend} (budget {budget:.0f} s):", flush=True)
        records += _run_child(backend, args, budget, log)
    if args.job_images > 0:
        print(f"colorize job ({args.job_images} images, --embedding-backend {args.job_backend}):", flush=True)
        job = _job(args, log)
        records.append(job)
        print("  " + (f"{job['images_per_s']} images/s end to end ({job['wall_s']} s)" if "images_per_s" in job
                      else f"failed ({job['returncode']}): " + "\n    ".join(job.get("tail", []))), flush=True)
    log.close()
    print(_table(records, 4000, 0.85))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": _machine(), "records": records}, f, indent=1)
    failed = [r for r in records if r["kind"] == "error" or (r["kind"] == "job" and r["returncode"] != 0)]
    measured = [r for r in records if "images_per_s" in r]
    return 1 if failed or not measured else 0


if __name__ == "__main__":
    sys.exit(main())
