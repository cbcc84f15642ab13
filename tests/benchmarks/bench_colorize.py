"""Benchmark of `imagebeam colorize`: the CPU side against the reference method, and the embedding step.

Workload: ImageNet-like JPEGs made from the real photos scikit-image and scikit-learn ship (random crops
scaled to about 500x375, quality 90), all measured side by side in one run on this machine.

1. Everything but the network, one core:
   - reference, as deep-koalarization's scripts do it: Pillow letterbox (`resize_contain`: copy,
     thumbnail Lanczos, paste on white, convert), the persisted 299 JPEG written and decoded again,
     `skimage.transform.resize(x, (224, 224, 3), mode="constant")` (its default anti-aliasing),
     `skimage.color.rgb2lab` in float64, and a `tf.train.Example` built from Python float lists;
   - reference, lean: the same without the intermediate JPEG and with anti_aliasing=False (the same
     maths as ours);
   - ours, the job's functions in a loop (decode, letterbox, 224 resize, Lab, Example, TFRecord frame);
   - ours, the real pipeline: `imagebeam colorize --embedding none` with 1 SDK worker on a folder of N
     images, end to end (start-up included) and steady state ((N2-N1)/(t2-t1)).
   Also: the cost of encoding one Example, ours vs tf.train.Example from lists.
2. The embedding: Inception-ResNet-v2 (random weights, same compiled call as the job) on this CPU, images/s
   at batch sizes 1, 8, 32, 64.

    python tests/benchmarks/bench_colorize.py [--n 200] [--n1 100] [--n2 400] [--embed-images 64]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Callable, List

import numpy as np
from PIL import Image

from imagebeam import sample as sample_lib
from imagebeam.transforms import colour, lab_records, tfrecord
from imagebeam.transforms.decode import decode_rgb
from imagebeam.transforms.resize import letterbox


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


def our_record(data: bytes, emb) -> bytes:
    rgb = np.asarray(letterbox(decode_rgb(data)))
    l_norm, ab_norm = colour.lab_target(rgb)
    colour.grey_uint8(rgb)  # the embedding branch's share of the CPU work
    return tfrecord.frame_record(lab_records.encode_example("img", l_norm, ab_norm, emb))


def rate(fn: Callable[[bytes], object], jpegs: List[bytes], repeat: int = 2) -> float:
    """Images per second of fn over the JPEGs, best of `repeat` passes."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for data in jpegs:
            fn(data)
        best = min(best, time.perf_counter() - t)
    return len(jpegs) / best


def pipeline_seconds(folder: str, out: str) -> float:
    cmd = [sys.executable, "-m", "imagebeam.cli", "colorize", "--input", folder, "--output", out,
           "--embedding", "none", "--direct_num_workers", "1"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def write_folder(root: str, jpegs: List[bytes], n: int) -> str:
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        with open(os.path.join(root, f"img_{i:05d}.jpg"), "wb") as f:
            f.write(jpegs[i % len(jpegs)])
    return root


def bench_cpu_side(args, tf) -> None:
    jpegs = list(sample_lib.imagenet_like_jpegs(args.n, seed=0))
    emb = np.random.default_rng(0).normal(size=1001).astype(np.float32)
    ref_written = rate(lambda d: reference_record(tf, d, emb, True), jpegs[: max(20, args.n // 4)], 1)
    ref_lean = rate(lambda d: reference_record(tf, d, emb, False), jpegs[: max(20, args.n // 4)], 1)
    ours = rate(lambda d: our_record(d, emb), jpegs)
    print(f"CPU side, one core, {args.n} JPEGs ~500x375 (reference loops on {max(20, args.n // 4)}):")
    print(f"  reference as written   {ref_written:8.1f} img/s")
    print(f"  reference lean         {ref_lean:8.1f} img/s")
    print(f"  ours (function loop)   {ours:8.1f} img/s   = {ours / ref_written:5.1f}x as written, "
          f"{ours / ref_lean:5.1f}x lean")

    rgb = np.asarray(letterbox(decode_rgb(jpegs[0])))
    l_norm, ab_norm = colour.lab_target(rgb)
    steps = {
        "decode": lambda: decode_rgb(jpegs[0]),
        "letterbox (Lanczos)": lambda: letterbox(decode_rgb(jpegs[0])),
        "224 resize + Lab": lambda: colour.lab_target(rgb),
        "grey for Inception": lambda: colour.grey_uint8(rgb),
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

    with tempfile.TemporaryDirectory() as tmp:
        times = {}
        for n in (args.n1, args.n2):
            folder = write_folder(os.path.join(tmp, f"in{n}"), jpegs, n)
            times[n] = min(pipeline_seconds(folder, os.path.join(tmp, f"out{n}")) for _ in range(args.repeat))
        steady = (args.n2 - args.n1) / (times[args.n2] - times[args.n1])
        print(f"  ours (pipeline, 1 worker, --embedding none): {args.n1} in {times[args.n1]:.1f} s, "
              f"{args.n2} in {times[args.n2]:.1f} s; end to end {args.n2 / times[args.n2]:.1f} img/s, "
              f"steady state {steady:.1f} img/s = {steady / ref_written:.1f}x as written, "
              f"{steady / ref_lean:.1f}x lean")


def bench_embedding(args) -> None:
    from imagebeam.transforms import inception
    from imagebeam.transforms.embedding import _Embedder

    model = _Embedder(inception.build_model("random"))
    jpegs = list(sample_lib.imagenet_like_jpegs(8, seed=1))
    grey = np.stack([colour.grey_uint8(np.asarray(letterbox(decode_rgb(d)))) for d in jpegs])
    print(f"Embedding (Inception-ResNet-v2, float32, this CPU: {os.cpu_count()} cores), {args.embed_images} "
          "images per batch size:")
    base = None
    for bs in (1, 8, 32, 64):
        batch = colour.inception_input(grey[np.arange(bs) % len(grey)])
        model(batch)  # trace + warm up
        calls = max(1, args.embed_images // bs)
        t = time.perf_counter()
        for _ in range(calls):
            model(batch)
        ips = calls * bs / (time.perf_counter() - t)
        base = base or ips
        print(f"  batch {bs:3d}: {ips:7.2f} img/s  ({ips / base:4.2f}x batch 1)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="JPEGs for the function loops")
    p.add_argument("--n1", type=int, default=100)
    p.add_argument("--n2", type=int, default=400)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--embed-images", type=int, default=64)
    p.add_argument("--skip-embedding", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}")
    bench_cpu_side(args, tf)
    if not args.skip_embedding:
        bench_embedding(args)


if __name__ == "__main__":
    main()
