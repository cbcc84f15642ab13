"""`imagebeam preview OUTPUT`: a PNG contact sheet of random samples from any output imagebeam writes.

    imagebeam preview OUTPUT [--output PNG] [--n 32] [--seed 0] [--scale K]

The kind of output is detected from the folder (`imagebeam.outputs.describe`: metadata.json's "job", else
the file names). Samples: `n` items drawn without replacement (`random.Random(seed).sample`) from all
items of the output, numbered in file order (files in natural order: train batches, then val; train
records, then val), then shown in that order — the same folder and seed give the same samples and the
same PNG bytes. Every sample is listed (file, index within the file, caption) on stdout.

Tiles (what the image region of a tile holds):

- `batches` (Imagenet32/64 batch files, pickle or npz): the row, channel-planar -> (S, S, 3), enlarged
  K times by nearest neighbour (each pixel a K×K block: `np.repeat` on both axes). Caption: label and
  class name from classes.txt, then `file[index]`. Default K: max(1, 64 // S).
- `lab_records` (colorize): two 224×224 images side by side, no gap, each enlarged K times (default 1):
  left the L channel as grey, `grey = uint8(rint(clip((L' + 1) / 2, 0, 1) * 255))` (L 0..100 -> 0..255);
  right the colour image `lab_to_rgb(L', ab')`: L = 50 (L' + 1), a, b = 127 ab', CIE Lab (D65) -> sRGB
  with scikit-image's constants and formulas (`skimage.color.lab2rgb`), computed in float64, clipped to
  [0, 1], `uint8(rint(255 x))`. Compact records are dequantised first (L' = q/127.5 - 1,
  ab' = (q - 128)/127). Caption: `file[index]`, then the image name.
- `cifar_pickle`: train then test images of `CIFAR_*_processed.pickle` (NHWC as stored), K default 2.
  Caption: label and name, then `train[i]` / `test[i]`.
- `cifar_tfrecord`: the decoded PNG `image` of each record, K default 2; caption label + name (from
  classes.txt), then `file[index]`.
- `download` (ok entries of manifest.jsonl) and `images` (image files at any depth): each image shrunk
  (Lanczos, aspect kept, never enlarged) to fit 128×128 and centred on a 128×128 tile of the background
  colour, enlarged K times (default 1). Caption: label / folder, then the file name.

Written to `--output`, by default OUTPUT/preview.png — except for image folders and download folders
(often the input of a later job, which would take the preview for an image): OUTPUT-preview.png beside
them. The write is atomic.

Sheet geometry (`layout(n_tiles, tile_w, tile_h)` returns the boxes; tests crop tiles with it):
a header strip of HEADER_H pixels (title text) on top; then a grid of cells, PAD pixels of background
around and between cells. A cell is `cell_w = max(tile_w, MIN_CELL_W)` wide and `tile_h + CAPTION_H`
high; the tile's image sits at the top of its cell, centred horizontally (offset (cell_w - tile_w) // 2),
the caption strip (two lines of Pillow's default bitmap font, the first kept from its start, the second
from its end when too long) below it. Columns: min(n, MAX_COLUMNS, (MAX_SHEET_W - PAD) // (cell_w + PAD)),
at least 1; tile i is in row i // columns, column i % columns.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import math
import os
import random
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from imagebeam import outputs as outputs_lib
from imagebeam.transforms.imaging import colour
from imagebeam.transforms.formats.example_decode import iter_file_records, parse_example
from imagebeam.runners.checks import OneLineParser

__all__ = ["preview_main", "make_preview", "layout", "Layout", "TileBox", "Sample", "Preview", "lab_to_rgb",
           "l_to_grey", "upscale"]

# --- geometry ------------------------------------------------------------------------------------------------
PAD = 4
HEADER_H = 16
LINE_H = 12
CAPTION_LINES = 2
CAPTION_H = CAPTION_LINES * LINE_H + 2
MIN_CELL_W = 112
MAX_COLUMNS = 8
MAX_SHEET_W = 2400
FIT_SIZE = 128  # download / image folder tiles
BACKGROUND = (40, 40, 40)
TEXT = (235, 235, 235)
HEADER_TEXT = (255, 220, 120)

Box = Tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive, as PIL's crop


@dataclasses.dataclass(frozen=True)
class TileBox:
    cell: Box      # the whole cell (image + caption)
    image: Box     # where the tile's image is pasted (tile_w x tile_h)
    caption: Box   # the caption strip under it (cell_w x CAPTION_H)


@dataclasses.dataclass(frozen=True)
class Layout:
    width: int
    height: int
    columns: int
    rows: int
    cell_w: int
    cell_h: int
    header: Box
    tiles: Tuple[TileBox, ...]


def layout(n_tiles: int, tile_w: int, tile_h: int, columns: Optional[int] = None) -> Layout:
    """The sheet's size and every tile's boxes for `n_tiles` tiles of `tile_w` x `tile_h` pixels."""
    if tile_w < 1 or tile_h < 1 or n_tiles < 0:
        raise ValueError(f"bad layout request: {n_tiles} tiles of {tile_w}x{tile_h}")
    cell_w, cell_h = max(tile_w, MIN_CELL_W), tile_h + CAPTION_H
    if columns is None:
        columns = min(n_tiles, MAX_COLUMNS, (MAX_SHEET_W - PAD) // (cell_w + PAD))
    columns = max(1, columns)
    rows = math.ceil(n_tiles / columns)
    width = PAD + columns * (cell_w + PAD)
    height = HEADER_H + PAD + rows * (cell_h + PAD)
    dx = (cell_w - tile_w) // 2
    tiles = []
    for i in range(n_tiles):
        x0 = PAD + (i % columns) * (cell_w + PAD)
        y0 = HEADER_H + PAD + (i // columns) * (cell_h + PAD)
        tiles.append(TileBox(cell=(x0, y0, x0 + cell_w, y0 + cell_h),
                             image=(x0 + dx, y0, x0 + dx + tile_w, y0 + tile_h),
                             caption=(x0, y0 + tile_h, x0 + cell_w, y0 + cell_h)))
    return Layout(width, height, columns, rows, cell_w, cell_h, (0, 0, width, HEADER_H), tuple(tiles))


# --- pixels ----------------------------------------------------------------------------------------------------

def upscale(image: np.ndarray, k: int) -> np.ndarray:
    """Nearest-neighbour enlargement by an integer factor: every pixel becomes a k x k block."""
    return image if k == 1 else np.repeat(np.repeat(image, k, axis=0), k, axis=1)


def l_to_grey(l_norm: np.ndarray) -> np.ndarray:
    """L' in [-1, 1] -> grey uint8: rint(clip((L' + 1) / 2, 0, 1) * 255) in float64 (L 0..100 -> 0..255)."""
    x = np.clip((np.asarray(l_norm, np.float64) + 1.0) / 2.0, 0.0, 1.0)
    return np.rint(x * 255.0).astype(np.uint8)


_RGB_FROM_XYZ = np.linalg.inv(colour.XYZ_FROM_RGB)


def lab_to_rgb(l_norm: np.ndarray, ab_norm: np.ndarray) -> np.ndarray:
    """The record's normalised Lab -> sRGB uint8 (h, w, 3); the inverse of the colorize job's target.

    L = 50 (L' + 1), (a, b) = 127 ab'; then `skimage.color.lab2rgb`'s maths in float64: f_y = (L + 16)/116,
    f_x = f_y + a/500, f_z = max(f_y - b/200, 0); t = f^3 where f > 0.2068966 else (f - 16/116)/7.787;
    XYZ = t * D65 white; linear RGB = inv(XYZ_FROM_RGB) XYZ; sRGB gamma (1.055 x^(1/2.4) - 0.055 above
    0.0031308, 12.92 x below); clipped to [0, 1]; uint8(rint(255 x)).
    """
    L = (np.asarray(l_norm, np.float64) + 1.0) * colour.L_SCALE
    ab = np.asarray(ab_norm, np.float64) * colour.AB_SCALE
    fy = (L + 16.0) / 116.0
    fx = fy + ab[..., 0] / 500.0
    fz = np.maximum(fy - ab[..., 1] / 200.0, 0.0)
    f = np.stack([fx, fy, fz], axis=-1)
    t = np.where(f > 0.2068966, f ** 3, (f - 16.0 / 116.0) / 7.787)
    xyz = t * colour.D65_WHITE
    lin = xyz @ _RGB_FROM_XYZ.T
    srgb = np.where(lin > 0.0031308, 1.055 * np.power(np.maximum(lin, 0.0031308), 1 / 2.4) - 0.055, lin * 12.92)
    return np.rint(np.clip(srgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def fit_tile(img: Image.Image, size: int = FIT_SIZE) -> np.ndarray:
    """An RGB image shrunk to fit size x size (Lanczos, aspect kept, never enlarged), centred on the
    background colour: (size, size, 3) uint8."""
    img = img.convert("RGB")
    scale = min(1.0, size / img.width, size / img.height)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    if (w, h) != img.size:
        img = img.resize((w, h), Image.Resampling.LANCZOS)
    tile = Image.new("RGB", (size, size), BACKGROUND)
    tile.paste(img, ((size - w) // 2, (size - h) // 2))
    return np.asarray(tile)


# --- samples ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Sample:
    file: str                 # the file it came from, relative to OUTPUT
    index: int                # its position in that file (cifar_pickle: within `split`)
    caption: Tuple[str, str]  # the two caption lines
    pixels: np.ndarray        # the tile's image before enlargement (h, w, 3) uint8
    label: Optional[int] = None
    name: Optional[str] = None   # image name (records), split (cifar_pickle), key (download)
    split: Optional[str] = None

    def describe(self) -> str:
        where = f"{self.file}:{self.split}[{self.index}]" if self.split and self.file.endswith(".pickle") \
            else f"{self.file}[{self.index}]"
        places = (f"{self.file}[{self.index}]", f"{self.split}[{self.index}]")
        return "  ".join([where] + [c for c in self.caption if c and c not in places])


def choose(counts: Sequence[Tuple[str, int]], n: int, seed: int) -> List[Tuple[str, int]]:
    """n of the items (file, index) numbered in the order of `counts`, drawn with random.Random(seed)
    without replacement, returned in item order."""
    total = sum(c for _, c in counts)
    picked = sorted(random.Random(seed).sample(range(total), min(max(n, 0), total)))
    out, start, at = [], 0, 0
    for name, count in counts:
        while at < len(picked) and picked[at] < start + count:
            out.append((name, picked[at] - start))
            at += 1
        start += count
    return out


def _by_file(items: List[Tuple[str, int]]) -> Dict[str, List[int]]:
    grouped: Dict[str, List[int]] = {}
    for name, index in items:
        grouped.setdefault(name, []).append(index)
    return grouped


def _label_caption(label: int, classes: Dict[int, str]) -> str:
    name = classes.get(label)
    return f"{label} {name}" if name else str(label)


def _meta_rows(out: outputs_lib.Output) -> Dict[str, int]:
    rows = {}
    for entry in (out.meta or {}).get("files", []) or []:
        if isinstance(entry, dict) and isinstance(entry.get("rows"), int):
            rows[str(entry.get("file"))] = entry["rows"]
    return rows


def _batch_samples(out: outputs_lib.Output, n: int, seed: int) -> Tuple[int, List[Sample]]:
    meta_rows = _meta_rows(out)
    counts = []
    for name in out.files:
        rows = meta_rows.get(name)
        if rows is None:
            rows = outputs_lib.npz_rows(out.join(name))
        if rows is None:
            rows = len(outputs_lib.read_batch(out.join(name))["data"])
        counts.append((name, rows))
    picked = _by_file(choose(counts, n, seed))
    samples = []
    for name in out.files:
        if name not in picked:
            continue
        batch = outputs_lib.read_batch(out.join(name))
        data, labels = np.asarray(batch["data"]), list(np.asarray(batch["labels"]).reshape(-1))
        for index in picked[name]:
            if index >= len(data):
                raise ValueError(f"{name} has {len(data)} rows, metadata.json says more; run imagebeam inspect")
            label = int(labels[index])
            samples.append(Sample(name, index, (_label_caption(label, out.classes), f"{name}[{index}]"),
                                  outputs_lib.planar_to_hwc(data[index]), label=label))
    return sum(c for _, c in counts), samples


def _record_counts(out: outputs_lib.Output) -> List[Tuple[str, int]]:
    counts = []
    for name in out.files:
        with open(out.join(name), "rb") as f:
            counts.append((name, sum(1 for _ in iter_file_records(f, check_crc=False, wanted=()))))
    return counts


def _records(out: outputs_lib.Output, picked: Dict[str, List[int]]):
    """(file, index, parsed features) of the picked records, in file order."""
    for name in out.files:
        if name not in picked:
            continue
        wanted = set(picked[name])
        with open(out.join(name), "rb") as f:
            for record in iter_file_records(f, check_crc=True, wanted=wanted):
                if record.data is not None:
                    yield name, record.index, parse_example(record.data)


def _lab_samples(out: outputs_lib.Output, n: int, seed: int) -> Tuple[int, List[Sample]]:
    counts = _record_counts(out)
    samples = []
    for name, index, features in _records(out, _by_file(choose(counts, n, seed))):
        image_name, l_norm, ab_norm, _ = outputs_lib.lab_arrays(features)
        grey = np.repeat(l_to_grey(l_norm)[..., None], 3, axis=-1)
        pixels = np.concatenate([grey, lab_to_rgb(l_norm, ab_norm)], axis=1)
        samples.append(Sample(name, index, (f"{name}[{index}]", image_name), pixels, name=image_name))
    return sum(c for _, c in counts), samples


def _cifar_pickle_samples(out: outputs_lib.Output, n: int, seed: int) -> Tuple[int, List[Sample]]:
    from imagebeam.datasets import load_cifar_processed

    name = out.files[0]
    saved = load_cifar_processed(out.join(name))
    names = saved.get("label_names") or []
    counts = [("train", len(saved["train_dataset"])), ("test", len(saved["test_dataset"]))]
    samples = []
    for split, index in choose(counts, n, seed):
        label = int(saved[f"{split}_labels"][index])
        text = f"{label} {names[label]}" if 0 <= label < len(names) else str(label)
        samples.append(Sample(name, index, (text, f"{split}[{index}]"),
                              np.asarray(saved[f"{split}_dataset"][index], np.uint8), label=label, split=split))
    return sum(c for _, c in counts), samples


def _cifar_tfrecord_samples(out: outputs_lib.Output, n: int, seed: int) -> Tuple[int, List[Sample]]:
    counts = _record_counts(out)
    samples = []
    for name, index, features in _records(out, _by_file(choose(counts, n, seed))):
        image = features.get("image")
        if image is None or image.kind != "bytes" or not image.value:
            raise ValueError(f"{name}[{index}]: no 'image' bytes feature")
        pixels = np.asarray(Image.open(io.BytesIO(image.value[0])).convert("RGB"))
        label_f = features.get("label")
        label = int(label_f.value[0]) if label_f is not None and label_f.kind == "int64" and label_f.size else None
        ident = features.get("id")
        ident = ident.value[0].decode("utf-8", "replace") if ident is not None and ident.kind == "bytes" \
            and ident.value else None
        text = _label_caption(label, out.classes) if label is not None else (ident or "")
        samples.append(Sample(name, index, (text, f"{name}[{index}]"), pixels, label=label, name=ident))
    return sum(c for _, c in counts), samples


def _decode_file(path: str) -> Image.Image:
    from imagebeam.transforms.imaging.decode import decode_rgb

    with open(path, "rb") as f:
        return decode_rgb(f.read())


def _download_samples(out: outputs_lib.Output, n: int, seed: int) -> Tuple[int, List[Sample]]:
    entries = [(i, e) for i, e in enumerate(outputs_lib.read_manifest(out.path))
               if e.get("status") == "ok" and e.get("file") and os.path.exists(out.join(e["file"]))]
    samples = []
    for _, k in choose([("manifest.jsonl", len(entries))], n, seed):
        line, entry = entries[k]
        text = str(entry.get("label") or entry.get("key") or "")
        samples.append(Sample(entry["file"], line, (text, entry["file"]),
                              fit_tile(_decode_file(out.join(entry["file"]))), name=entry.get("key")))
    return len(entries), samples


def _image_samples(out: outputs_lib.Output, n: int, seed: int) -> Tuple[int, List[Sample]]:
    samples = []
    for name, _ in choose([(f, 1) for f in out.files], n, seed):
        folder = name.rsplit("/", 1)[0] if "/" in name else ""
        try:
            pixels = fit_tile(_decode_file(out.join(name)))
        except Exception as exc:  # noqa: BLE001 - an undecodable file is shown as an empty tile
            pixels = np.full((FIT_SIZE, FIT_SIZE, 3), BACKGROUND, np.uint8)
            folder = f"undecodable: {exc}"
        samples.append(Sample(name, 0, (folder, name), pixels, name=name))
    return len(out.files), samples


SAMPLERS: Dict[str, Callable[[outputs_lib.Output, int, int], Tuple[int, List[Sample]]]] = {
    "batches": _batch_samples, "lab_records": _lab_samples, "cifar_pickle": _cifar_pickle_samples,
    "cifar_tfrecord": _cifar_tfrecord_samples, "download": _download_samples, "images": _image_samples,
}


def default_scale(kind: str, samples: List[Sample]) -> int:
    if kind in ("lab_records", "download", "images") or not samples:
        return 1
    side = max(max(s.pixels.shape[:2]) for s in samples)
    return max(1, 64 // side)


# --- drawing -----------------------------------------------------------------------------------------------

def _font():
    """Pillow's built-in bitmap font (the same glyphs on every machine)."""
    loader = getattr(ImageFont, "load_default_imagefont", None)  # Pillow >= 10.1; load_default() is FreeType
    return loader() if loader else ImageFont.load_default()


def _latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


def fit_text(text: str, width: int, font, keep: str = "start") -> str:
    """`text` cut to fit `width` pixels: keep its start (ending in '..') or its end (starting with '..')."""
    text = _latin1(text)
    if font.getlength(text) <= width:
        return text
    for cut in range(len(text) - 1, -1, -1):
        candidate = text[:cut] + ".." if keep == "start" else ".." + text[len(text) - cut:]
        if font.getlength(candidate) <= width:
            return candidate
    return ""


def render(samples: List[Sample], scale: int, title: str) -> Tuple[Image.Image, Layout]:
    tiles = [upscale(s.pixels, scale) for s in samples]
    tile_w = max((t.shape[1] for t in tiles), default=1)
    tile_h = max((t.shape[0] for t in tiles), default=1)
    geometry = layout(len(tiles), tile_w, tile_h)
    sheet = Image.new("RGB", (geometry.width, geometry.height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font()
    draw.text((PAD, 2), fit_text(title, geometry.width - 2 * PAD, font), fill=HEADER_TEXT, font=font)
    for tile, sample, box in zip(tiles, samples, geometry.tiles):
        sheet.paste(Image.fromarray(np.ascontiguousarray(tile, dtype=np.uint8), "RGB"), box.image[:2])
        x0, y0, x1, _ = box.caption
        for line, (text, keep) in enumerate(zip(sample.caption, ("start", "end"))):
            draw.text((x0 + 2, y0 + 1 + line * LINE_H), fit_text(text, x1 - x0 - 4, font, keep),
                      fill=TEXT, font=font)
    return sheet, geometry


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


@dataclasses.dataclass
class Preview:
    output: outputs_lib.Output
    samples: List[Sample]
    total: int
    scale: int
    seed: int
    layout: Layout
    image: Image.Image
    png: bytes


def make_preview(output: str, n: int = 32, seed: int = 0, scale: Optional[int] = None) -> Preview:
    """Detect, sample and render (nothing written). ValueError when the folder holds nothing to show."""
    out = outputs_lib.describe(output)
    if not out.files:
        raise ValueError(f"{output}: a {out.kind} output ({out.detected_by}) but none of its files is there")
    total, samples = SAMPLERS[out.kind](out, n, seed)
    if not samples:
        raise ValueError(f"{output}: the {out.kind} output holds no samples")
    k = default_scale(out.kind, samples) if scale is None else int(scale)
    if k < 1:
        raise ValueError(f"--scale must be at least 1, got {k}")
    title = f"imagebeam preview: {out.job or out.kind} ({out.kind}), {len(samples)} of {total}, seed {seed}, x{k}"
    image, geometry = render(samples, k, title)
    return Preview(out, samples, total, k, seed, geometry, image, png_bytes(image))


def default_png(out: outputs_lib.Output) -> str:
    """OUTPUT/preview.png; but beside (not inside) image folders and download folders, which are often
    the input of a later job that would take the preview for one of its images: OUTPUT-preview.png."""
    if out.kind in ("images", "download"):
        return os.path.normpath(out.path) + "-" + outputs_lib.PREVIEW_NAME
    return os.path.join(out.path, outputs_lib.PREVIEW_NAME)


def make_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="imagebeam preview", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", metavar="OUTPUT", help="an output folder of an imagebeam job")
    p.add_argument("--output", dest="png", default=None,
                   help="the PNG to write (default OUTPUT/preview.png; OUTPUT-preview.png for image and "
                        "download folders)")
    p.add_argument("--n", type=int, default=32, help="number of samples (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    p.add_argument("--scale", type=int, default=None,
                   help="integer nearest-neighbour enlargement (default: 64 // S for batches and CIFAR, else 1)")
    return p


def preview_main(argv: Optional[Sequence[str]] = None) -> int:
    args = make_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.n < 1:
        print("imagebeam preview: --n must be at least 1", file=sys.stderr)
        return 2
    try:
        preview = make_preview(args.output, args.n, args.seed, args.scale)
    except (ValueError, OSError, KeyError) as exc:
        print(f"imagebeam preview: {exc}", file=sys.stderr)
        return 1
    from imagebeam.transforms.bookkeeping.fileutil import write_atomically

    target = args.png or default_png(preview.output)
    write_atomically(target, preview.png)
    out = preview.output
    print(f"wrote {target} ({preview.layout.width}x{preview.layout.height}): {len(preview.samples)} of "
          f"{preview.total} samples from {out.path} ({out.kind}, detected by {out.detected_by}), "
          f"seed {preview.seed}, scale {preview.scale}")
    for i, sample in enumerate(preview.samples):
        print(f"  {i:3d} {sample.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(preview_main())
