"""Benchmark of `imagebeam colorize`: the CPU side against the reference method, and the embedding step.

Workload: ImageNet-like JPEGs made from the real photos scikit-image and scikit-learn ship (random crops
scaled to about 500x375, quality 90), all measured side by side in one run on this machine, the whole
run (this process, the job's runner and its SDK worker) pinned to one core (the last one this process
may use; `--no-pin` to leave it free), with the load average printed before and after.

1. Everything but the network, one core:
   - reference, as deep-koalarization's scripts do it: Pillow letterbox (`resize_contain`: copy,
     thumbnail Lanczos, paste on white, convert), the persisted 299 JPEG written and decoded again,
     `skimage.transform.resize(x, (224, 224, 3), mode="constant")` (its default anti-aliasing),
     `skimage.color.rgb2lab` in float64, and a `tf.train.Example` built from Python float lists;
   - reference, lean: the same without the intermediate JPEG and with anti_aliasing=False (the same
     maths as ours);
   - ours, the job's functions in a loop (decode check, decode, letterbox, 224 resize, Lab, Example,
     TFRecord frame);
   - ours, the real pipeline: `imagebeam colorize --embedding none` with 1 SDK worker (and 2 with
     `--no-pin`), exact and `--fast-decode`, on a folder of N images, end to end (start-up included) and
     steady state ((N2-N1)/(t2-t1)), with the peak summed RSS of the job's whole process tree (runner +
     SDK workers, sampled every 0.1 s).
   Also: the cost of each step (Pillow's letterbox next to lanczos.py's), and `--fast-decode`'s pixel
   error against the exact path (the 299 letterbox and the Lab values) on these JPEGs and on 1600x1200
   ones, where DCT scaling applies (at 500x375 it cannot: the letterbox needs 299 of the 500 columns).
2. The embedding: Inception-ResNet-v2 (random weights, same compiled call as the job) on this CPU, images/s
   at batch sizes 1, 8, 32, 64.

    python tests/benchmarks/bench_colorize.py [--n 200] [--n1 100] [--n2 400] [--embed-images 64] [--no-pin]
                                              [--json PATH]

--json PATH writes the summary bench_all.py tabulates (see common.summary): ours = the 1-worker
pipeline's steady-state rate (`--embedding none`), per that one worker (on one core when pinned);
reference = the reference as written, one core; 1->2 scaling = 2-worker / 1-worker steady rate (only
with --no-pin); peak RSS = the largest over the pipeline runs.
"""
from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Callable, List, NamedTuple

import common
import numpy as np
from PIL import Image

from imagebeam import sample as sample_lib
from imagebeam.transforms.imaging import colour
from imagebeam.transforms.formats import lab_records, tfrecord
from imagebeam.transforms.formats.lab_shards import FitParams
from imagebeam.transforms.imaging.decode import decode_rgb
from imagebeam.transforms.imaging.resize import letterbox, letterbox_array

EXACT, FAST = FitParams(), FitParams(fast_decode=True)


def reference_letterbox(data: bytes) -> Image.Image:
    """deep-koalarization's resize step (resizeimage.resize_contain) on Pillow."""
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    enlarge = min(299 / w, 299 / h)
    if enlarge > 1:
        img = img.resize((int(w * enlarge), int(h * enlarge)))
    img = img.copy()
    img.thumbnail((299, 299), Image.Resampling.LANCZOS)
    background = Image.new("RGBA", (299, 299), (255, 255, 255, 0))
    background.paste(img, ((299 - img.width + 1) // 2, (299 - img.height + 1) // 2))
    return background.convert("RGB")


def reference_example(tf, name: bytes, l_norm, ab_norm, emb):
    def floats(v):
        return tf.train.Feature(float_list=tf.train.FloatList(value=v))

    return tf.train.Example(features=tf.train.Features(feature={
        "image_name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[name])),
        "image_l": floats(l_norm.flatten().tolist()), "image_ab": floats(ab_norm.flatten().tolist()),
        "image_embedding": floats(emb.tolist())})).SerializeToString()


def reference_record(tf, data: bytes, emb, as_written: bool) -> bytes:
    from skimage import color, transform

    img = reference_letterbox(data)
    if as_written:  # the resize step saves the 299 image, lab_batch decodes it again
        buf = io.BytesIO()
        img.save(buf, "JPEG")
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    x = np.asarray(img)
    if as_written:
        small = transform.resize(x, (224, 224, 3), mode="constant")
    else:
        small = transform.resize(x, (224, 224), order=1, mode="constant", anti_aliasing=False)
    lab = color.rgb2lab(small).astype(np.float32)
    return reference_example(tf, b"img", 2 * lab[:, :, 0] / 100 - 1, lab[:, :, 1:] / 127, emb)


def our_record(data: bytes, emb, params: FitParams = EXACT) -> bytes:
    """What the job does per image with --embedding none: the staging's header check, then after the merge
    decode + letterbox, Lab, Example, frame (the grey Inception input is computed on the model's device)."""
    params.identify(data)
    l_norm, ab_norm = colour.lab_target(params.fitted(data))
    return tfrecord.frame_record(lab_records.encode_example("img", l_norm, ab_norm, emb))


class Rate(NamedTuple):
    """Images per wall second and per CPU second of this process (the core's share it really got: other
    users of a shared machine move the first, much less the second)."""
    wall: float
    cpu: float

    def __truediv__(self, other: "Rate") -> "Rate":
        return Rate(self.wall / other.wall, self.cpu / other.cpu)

    def text(self, unit: str = "img/s") -> str:
        return f"{self.wall:7.1f} {unit} wall, {self.cpu:7.1f} per CPU-s"


def rate(fn: Callable[[bytes], object], jpegs: List[bytes], repeat: int = 2) -> Rate:
    """Rates of fn over the JPEGs, best of `repeat` passes (each clock's best)."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        for data in jpegs:
            fn(data)
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return Rate(len(jpegs) / wall, len(jpegs) / cpu)


def pipeline_run(folder: str, out: str, workers: int = 1, fast: bool = False) -> common.Measurement:
    cmd = [sys.executable, "-m", "imagebeam.cli", "colorize", "--input", folder, "--output", out,
           "--embedding", "none", "--direct_num_workers", str(workers)] + (["--fast-decode"] if fast else [])
    try:
        return common.run_measured(cmd)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # 606 KB a record: keep the disk free between runs


def large_jpegs(n: int, size=(1600, 1200)) -> List[bytes]:
    """Camera-sized JPEGs (random crops of the same real photos, scaled up), quality 90."""
    photos, rng = sample_lib.load_photos(), random.Random(1)
    return [sample_lib.jpeg_bytes(sample_lib.imagenet_like(photos[i % len(photos)], rng, size)) for i in range(n)]


def fast_decode_error(jpegs: List[bytes]) -> dict:
    """--fast-decode against the exact path: mean and max |difference| of the 299 letterbox (grey levels)
    and of the Lab values (L in 0..100, a/b in their units), over all images."""
    rgb_diffs, l_diffs, ab_diffs, scaled = [], [], [], 0
    for data in jpegs:
        exact, fast = EXACT.fitted(data), FAST.fitted(data)
        scaled += decode_rgb(data, draft_size=FAST.draft).size != decode_rgb(data).size
        rgb_diffs.append(np.abs(exact.astype(np.int16) - fast).ravel())
        (l_e, ab_e), (l_f, ab_f) = colour.lab_target(exact), colour.lab_target(fast)
        l_diffs.append(np.abs(l_e - l_f).ravel() * colour.L_SCALE)
        ab_diffs.append(np.abs(ab_e - ab_f).ravel() * colour.AB_SCALE)
    rgb, lum, ab = (np.concatenate(d) for d in (rgb_diffs, l_diffs, ab_diffs))
    return {"images": len(jpegs), "dct_scaled": int(scaled), "rgb_mean": float(rgb.mean()),
            "rgb_max": int(rgb.max()), "l_mean": float(lum.mean()), "l_max": float(lum.max()),
            "ab_mean": float(ab.mean()), "ab_max": float(ab.max())}


def print_fast_decode(label: str, err: dict) -> None:
    print(f"  --fast-decode vs exact, {label}: {err['dct_scaled']} of {err['images']} DCT-scaled; 299 letterbox "
          f"|diff| mean {err['rgb_mean']:.2f} max {err['rgb_max']} (of 255); Lab |diff| L mean "
          f"{err['l_mean']:.3f} max {err['l_max']:.2f}, a/b mean {err['ab_mean']:.3f} max {err['ab_max']:.2f}")


def write_folder(root: str, jpegs: List[bytes], n: int) -> str:
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        with open(os.path.join(root, f"img_{i:05d}.jpg"), "wb") as f:
            f.write(jpegs[i % len(jpegs)])
    return root


def bench_cpu_side(args, tf) -> dict:
    jpegs = list(sample_lib.imagenet_like_jpegs(args.n, seed=0))
    emb = np.random.default_rng(0).normal(size=1001).astype(np.float32)
    n_ref = max(20, args.n // 4)
    ref_written = rate(lambda d: reference_record(tf, d, emb, True), jpegs[:n_ref], 1)
    ref_lean = rate(lambda d: reference_record(tf, d, emb, False), jpegs[:n_ref], 1)
    ours = rate(lambda d: our_record(d, emb), jpegs)
    print(f"CPU side, {args.where}, {args.n} JPEGs ~500x375 (reference loops on {n_ref}):")
    print(f"  reference as written   {ref_written.text()}")
    print(f"  reference lean         {ref_lean.text()}")
    print(f"  ours (function loop)   {ours.text()}   = {(ours / ref_written).text('x')} as written; "
          f"{(ours / ref_lean).cpu:.1f}x lean per CPU-s")

    img = decode_rgb(jpegs[0])
    rgb = letterbox_array(img)
    l_norm, ab_norm = colour.lab_target(rgb)
    steps = {
        "header check (staging)": lambda: EXACT.identify(jpegs[0]),
        "decode": lambda: decode_rgb(jpegs[0]),
        "letterbox, Pillow": lambda: letterbox(img.copy()),
        "letterbox, lanczos.py (same px)": lambda: letterbox_array(img),
        "224 resize + Lab": lambda: colour.lab_target(rgb),
        "encode Example + frame (ours)": lambda: tfrecord.frame_record(
            lab_records.encode_example("img", l_norm, ab_norm, emb)),
        "tf.train.Example from lists": lambda: reference_example(tf, b"img", l_norm, ab_norm, emb),
    }
    for label, fn in steps.items():
        fn()
        t = time.perf_counter()
        for _ in range(50):
            fn()
        print(f"    {label:32s} {(time.perf_counter() - t) / 50 * 1e3:7.3f} ms")

    big = large_jpegs(max(10, args.n // 10))
    errors = {"500x375": fast_decode_error(jpegs), "1600x1200": fast_decode_error(big)}
    for label, err in errors.items():
        print_fast_decode(f"{label} JPEGs", err)
    big_exact, big_fast = rate(lambda d: our_record(d, emb), big), rate(lambda d: our_record(d, emb, FAST), big)
    print(f"  function loop on 1600x1200 JPEGs: exact {big_exact.text()}; --fast-decode {big_fast.text()} "
          f"({(big_fast / big_exact).cpu:.2f}x per CPU-s)")

    runs = {"1 worker": (1, False), "1 worker, --fast-decode": (1, True)}
    if not args.pinned:
        runs["2 workers"] = (2, False)
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        folders = {n: write_folder(os.path.join(tmp, f"in{n}"), jpegs, n) for n in (args.n1, args.n2)}
        states = {label: common.two_sizes(
            lambda n, r, w=w, fast=fast: pipeline_run(folders[n], os.path.join(tmp, f"out{n}-{w}-{r}"), w, fast),
            args.n1, args.n2, args.repeat) for label, (w, fast) in runs.items()}
    for label, st in states.items():
        steady = Rate(st.rate, st.per_cpu_s)
        print(f"  ours (pipeline, {label}, --embedding none, in {args.work_dir}): {args.n1} in "
              f"{st.walls[args.n1]:.1f} s, {args.n2} in {st.walls[args.n2]:.1f} s; end to end "
              f"{st.end_to_end(args.n2):.1f} img/s; steady state {steady.text()} (whole process tree) = "
              f"{(steady / ref_written).text('x')} the reference as written, {(steady / ref_lean).cpu:.1f}x lean "
              f"per CPU-s; peak RSS {st.peaks[args.n1] / common.MIB:.0f} MiB @ {args.n1}, "
              f"{st.peaks[args.n2] / common.MIB:.0f} MiB @ {args.n2}; CPU {st.cores_busy:.2f} cores busy (steady)")
    scaling = common.ratio(states["2 workers"].rate, states["1 worker"].rate) if "2 workers" in states else None
    if scaling is not None:
        print(f"  ours (pipeline) 2 workers / 1 worker: {scaling:.2f}x")
    return {"ref_written": ref_written, "ref_lean": ref_lean, "loop": ours, "states": states, "scaling": scaling,
            "fast_decode_error": errors}


def pin_to_one_core() -> str:
    """Pin this process (and so the job's runner and SDK workers, which inherit it) to its last CPU."""
    core = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return f"pinned to CPU {core}"


def load_line(when: str) -> str:
    return f"load average {when}: " + " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1/5/15 min)"


def bench_embedding(args) -> dict:
    from imagebeam.transforms.model.embedding_backends import embedder

    model = embedder("random")
    jpegs = list(sample_lib.imagenet_like_jpegs(8, seed=1))
    rgb = np.stack([np.asarray(letterbox(decode_rgb(d))) for d in jpegs])
    print(f"Embedding (Inception-ResNet-v2, float32, this CPU: {os.cpu_count()} cores), {args.embed_images} "
          "images per batch size:")
    base, rates = None, {}
    for bs in (1, 8, 32, 64):
        batch = rgb[np.arange(bs) % len(rgb)]
        model(batch)  # trace + warm up
        calls = max(1, args.embed_images // bs)
        t = time.perf_counter()
        for _ in range(calls):
            model(batch)
        ips = calls * bs / (time.perf_counter() - t)
        base = base or ips
        rates[str(bs)] = ips
        print(f"  batch {bs:3d}: {ips:7.2f} img/s  ({ips / base:4.2f}x batch 1)")
    return rates


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="JPEGs for the function loops")
    p.add_argument("--n1", type=int, default=200)
    p.add_argument("--n2", type=int, default=3000)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--embed-images", type=int, default=64)
    p.add_argument("--skip-embedding", action="store_true")
    p.add_argument("--no-pin", action="store_true", help="do not pin the run to one core (adds 2 workers)")
    p.add_argument("--work-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                   help="where the pipeline's inputs and outputs go (default /dev/shm, a tmpfs: a record is "
                        "606 KB, written once in its file after its 268 KB of pixels went to a piece, so on a disk "
                        "the job measures the "
                        "disk's write bandwidth, not the CPU side; pass a disk folder to see that)")
    p.add_argument("--json", default=None, metavar="PATH", help="write a summary dict (for bench_all.py)")
    args = p.parse_args(argv)
    args.pinned = not args.no_pin
    args.where = pin_to_one_core() if args.pinned else "not pinned"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    print(common.machine_line(common.machine()))
    print(f"{args.where}; {load_line('before')}")
    cpu = bench_cpu_side(args, tf)
    embedding = None if args.skip_embedding else bench_embedding(args)
    print(load_line("after"))
    st1, n_ref = cpu["states"]["1 worker"], max(20, args.n // 4)
    common.write_json(args.json, common.summary(
        "colorize", ours=st1.per_cpu_s if args.pinned else st1.rate, cores_used=1,
        how=(f"steady state of `imagebeam colorize --embedding none --direct_num_workers 1` on folders of "
             f"N1={args.n1}, N2={args.n2} JPEGs in {args.work_dir} (fastest of {args.repeat} run(s) per size): "
             + ("images per CPU second of the whole process tree (runner + SDK worker), all pinned to one "
                "core: (N2-N1) / (cpu2-cpu1)" if args.pinned else
                "(N2-N1)/(t2-t1), divided by its 1 SDK worker; the runner process's own CPU is not in the "
                "divisor (see cores_busy_steady)") + "; the Inception embedding is left out"),
        reference_rate=cpu["ref_written"].cpu if args.pinned else cpu["ref_written"].wall,
        reference=("deep-koalarization's CPU side as written, one core: Pillow letterbox (resize_contain, "
                   "Lanczos), 299 JPEG written and re-decoded, skimage resize 224 (anti-aliased), rgb2lab "
                   f"float64, tf.train.Example from float lists; {n_ref} images; "
                   + ("images per CPU second" if args.pinned else "images per second")),
        scaling=cpu["scaling"], peak_rss=max(st.peak for st in cpu["states"].values()),
        peak_rss_how=(f"largest summed RSS of the job's process tree (runner + SDK workers), sampled every "
                      f"{common.SAMPLE_S} s, over the pipeline runs (1 and 2 workers, N1 and N2)"),
        steady_images_per_s={label: st.rate for label, st in cpu["states"].items()},
        end_to_end_images_per_s={label: {str(n): st.end_to_end(n) for n in (args.n1, args.n2)}
                                 for label, st in cpu["states"].items()},
        peak_rss_mib_by_run={label: {str(n): st.peaks[n] / common.MIB for n in (args.n1, args.n2)}
                             for label, st in cpu["states"].items()},
        pinned=args.where, fast_decode_error=cpu["fast_decode_error"],
        scaling_note=None if cpu["scaling"] is not None else "not measured: pinned to one core (--no-pin adds 2 workers)",
        cores_busy_steady=st1.cores_busy, images_per_cpu_s_steady=st1.per_cpu_s,
        reference_lean_images_per_s=cpu["ref_lean"].wall, function_loop_images_per_s=cpu["loop"].wall,
        images_per_cpu_s={"reference as written": cpu["ref_written"].cpu, "reference lean": cpu["ref_lean"].cpu,
                          "function loop": cpu["loop"].cpu,
                          **{f"pipeline, {label}": st.per_cpu_s for label, st in cpu["states"].items()}},
        ratio_per_cpu_s_to_reference=common.ratio(st1.per_cpu_s, cpu["ref_written"].cpu), work_dir=args.work_dir,
        embedding_images_per_s_by_batch=embedding,
        notes="; ".join(filter(None, (
            f"--embedding none; the 1-worker job kept {common.fmt(st1.cores_busy)} cores busy",
            f"function loop {cpu['loop'].wall:.0f}/s ({(cpu['loop'] / cpu['ref_written']).wall:.1f}x ref)",
            f"reference lean {cpu['ref_lean'].wall:.0f}/s", f"N={args.n1}/{args.n2}",
            f"pipeline in {args.work_dir}",
            common.unmeasurable(cpu["states"]))))))


if __name__ == "__main__":
    main()
