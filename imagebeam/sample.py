"""A small ILSVRC2012-style sample built from the real photos scikit-image and scikit-learn ship.

Used by `imagebeam demo`, the test fixtures and the benchmarks, so all three exercise the same real JPEG,
PNG, GIF and TIFF data. Nothing is downloaded: the photos come from the installed packages
(`pip install imagebeam[sample]`).
"""
from __future__ import annotations

import io
import os
import random
import tarfile
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
from PIL import Image

# Colour photographs shipped by scikit-image (skimage/data) and scikit-learn (load_sample_images).
_SKIMAGE_COLOUR = [
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg", "retina.jpg",
    "motorcycle_left.png", "motorcycle_right.png", "ihc.png",
]
_SKIMAGE_GREY = ["camera.png", "coins.png", "moon.png", "page.png", "brick.png", "grass.png", "gravel.png"]
_SKLEARN = ["china.jpg", "flower.jpg"]

# (ILSVRC2012_ID, WNID, words) of a few real leaf classes (IDs as in the devkit's map_clsloc.txt).
SAMPLE_CLASSES: Tuple[Tuple[int, str, str], ...] = (
    (1, "n02119789", "kit fox, Vulpes macrotis"),
    (449, "n01440764", "tench, Tinca tinca"),
    (490, "n01751748", "sea snake"),
)


def _skimage_dir() -> str:
    try:
        import skimage
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise RuntimeError("the sample needs scikit-image: pip install 'imagebeam[sample]'") from exc
    return os.path.join(os.path.dirname(skimage.__file__), "data")


def _sklearn_dir() -> str:
    try:
        import sklearn.datasets
    except ImportError as exc:  # pragma: no cover
        raise RuntimeError("the sample needs scikit-learn: pip install 'imagebeam[sample]'") from exc
    return os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")


def photo_paths(include_grey: bool = True) -> List[str]:
    """Paths of the real photos, colour first."""
    sk, sl = _skimage_dir(), _sklearn_dir()
    paths = [os.path.join(sk, n) for n in _SKIMAGE_COLOUR] + [os.path.join(sl, n) for n in _SKLEARN]
    if include_grey:
        paths += [os.path.join(sk, n) for n in _SKIMAGE_GREY]
    return [p for p in paths if os.path.exists(p)]


def skimage_file(name: str) -> str:
    return os.path.join(_skimage_dir(), name)


def load_photos(include_grey: bool = True) -> List[Image.Image]:
    out = []
    for path in photo_paths(include_grey):
        with Image.open(path) as img:
            out.append(img.convert("RGB") if img.mode not in ("RGB", "L") else img.copy())
    return out


def imagenet_like(photo: Image.Image, rng: random.Random, size: Tuple[int, int] = (500, 375)) -> Image.Image:
    """A random crop of a real photo, scaled to about ImageNet's typical 500x375 (sometimes portrait)."""
    w, h = photo.size
    scale = rng.uniform(0.55, 1.0)
    cw, ch = max(16, int(w * scale)), max(16, int(h * scale))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    crop = photo.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    target = size if rng.random() < 0.8 else (size[1], size[0])
    return crop.resize(target, Image.Resampling.BICUBIC)


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def imagenet_like_jpegs(n: int, seed: int = 0, quality: int = 90) -> Iterator[bytes]:
    """`n` real-photo JPEGs at about 500x375, quality 90: the benchmark and sample workload."""
    photos = load_photos()
    rng = random.Random(seed)
    for i in range(n):
        yield jpeg_bytes(imagenet_like(photos[i % len(photos)], rng), quality)


def oddities() -> Dict[str, bytes]:
    """Real photos in the awkward encodings ImageNet and user folders contain; all decodable."""
    photos = load_photos(include_grey=False)
    base = photos[0].resize((320, 240))
    out: Dict[str, bytes] = {}
    buf = io.BytesIO()
    base.convert("CMYK").save(buf, format="JPEG", quality=90)
    out["cmyk.JPEG"] = buf.getvalue()
    buf = io.BytesIO()
    photos[1].resize((300, 200)).save(buf, format="PNG")
    out["png_named.JPEG"] = buf.getvalue()
    out["grey.JPEG"] = jpeg_bytes(photos[2].convert("L").resize((280, 210)))
    buf = io.BytesIO()
    pal = photos[3].resize((200, 150)).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal.info["transparency"] = 0
    pal.save(buf, format="PNG", transparency=0)
    out["palette_transparent.png"] = buf.getvalue()
    with open(skimage_file("logo.png"), "rb") as f:
        out["rgba_logo.png"] = f.read()
    buf = io.BytesIO()
    grey16 = (np.asarray(photos[4].convert("L").resize((160, 120)), dtype=np.uint16) * 257)
    Image.fromarray(grey16).save(buf, format="PNG")
    out["sixteen_bit.png"] = buf.getvalue()
    with open(skimage_file("no_time_for_that_tiny.gif"), "rb") as f:
        out["animated.gif"] = f.read()
    with open(skimage_file("multipage.tif"), "rb") as f:
        out["multipage.tif"] = f.read()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    buf = io.BytesIO()
    photos[5].resize((240, 160)).save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    out["exif_rotated.jpg"] = buf.getvalue()
    return out


def bad_inputs(good_jpeg: bytes) -> Dict[str, bytes]:
    """Inputs that must end in failures.jsonl: corrupt, empty, not an image, truncated."""
    corrupt = bytearray(good_jpeg)
    # Keep the JPEG header so Pillow identifies the file, then destroy the entropy-coded data.
    corrupt[600:] = b"\xff\xd9" * ((len(corrupt) - 600) // 2) + b"\xff" * ((len(corrupt) - 600) % 2)
    return {
        "corrupt.JPEG": bytes(corrupt[:700]) + b"\x00" * 10,
        "empty.JPEG": b"",
        "notes.JPEG": b"<html><body>this photo is no longer available</body></html>\n",
        "truncated.JPEG": good_jpeg[: len(good_jpeg) // 2],
    }


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_tar(path: str, members: Sequence[Tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            add_bytes(tar, name, data)
    return path


def write_devkit(path: str, classes: Sequence[Tuple[int, str, str]], val_ground_truth: Sequence[int]) -> str:
    """A devkit tar.gz shaped like ILSVRC2012_devkit_t12.tar.gz: data/meta.mat + the val ground truth.

    meta.mat holds the `synsets` struct array with the real field names; one non-leaf synset (children,
    ID above 1000) is included, as in the real file, so readers must filter on num_children == 0.
    """
    from scipy.io import savemat

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
              "wordnet_height", "num_train_images"]
    rows = [(cid, wnid, words, f"gloss of {words}", 0, np.zeros((0,), np.uint16), 0, 1300)
            for cid, wnid, words in classes]
    rows.append((1001, "n00001740", "entity", "that which is perceived", len(classes),
                 np.array([c[0] for c in classes], np.uint16), 19, 0))
    synsets = np.zeros((len(rows), 1), dtype=[(f, "O") for f in fields])
    for i, row in enumerate(rows):
        for f, v in zip(fields, row):
            synsets[i, 0][f] = v
    meta = io.BytesIO()
    savemat(meta, {"synsets": synsets})
    gt = "".join(f"{label}\n" for label in val_ground_truth).encode()
    with tarfile.open(path, "w:gz") as tar:
        add_bytes(tar, "ILSVRC2012_devkit_t12/data/meta.mat", meta.getvalue())
        add_bytes(tar, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", gt)
    return path


def write_class_map(path: str, classes: Sequence[Tuple[int, str, str]]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for cid, wnid, words in sorted(classes):
            f.write(f"{wnid} {cid} {words.split(',')[0].replace(' ', '_')}\n")
    return path


@dataclass
class IlsvrcSample:
    """Paths of a built sample plus what a correct reader must find in it."""
    root: str
    train_tar: str
    val_tar: str
    devkit: str
    class_map: str
    train: Dict[str, Tuple[bytes, int]] = field(default_factory=dict)  # "wnid/member" -> (bytes, ID)
    val: Dict[str, Tuple[bytes, int]] = field(default_factory=dict)    # val file name -> (bytes, ID)


def build_ilsvrc_sample(
    root: str,
    per_class: int = 8,
    val_per_class: int = 3,
    seed: int = 0,
    classes: Sequence[Tuple[int, str, str]] = SAMPLE_CLASSES,
    extra_train: Dict[str, Dict[str, bytes]] | None = None,
) -> IlsvrcSample:
    """Write an ILSVRC2012-style nested train tar, a flat val tar (unsorted), a devkit and map_clsloc.

    `extra_train` adds members per WNID (e.g. CMYK or corrupt files) to the member tars.
    """
    os.makedirs(root, exist_ok=True)
    photos = load_photos()
    rng = random.Random(seed)
    sample = IlsvrcSample(
        root=root,
        train_tar=os.path.join(root, "ILSVRC2012_img_train.tar"),
        val_tar=os.path.join(root, "ILSVRC2012_img_val.tar"),
        devkit=os.path.join(root, "ILSVRC2012_devkit_t12.tar.gz"),
        class_map=os.path.join(root, "map_clsloc.txt"),
    )
    member_tars: List[Tuple[str, bytes]] = []
    for k, (cid, wnid, _) in enumerate(classes):
        members = []
        for i in range(per_class):
            data = jpeg_bytes(imagenet_like(photos[(k * 5 + i) % len(photos)], rng))
            name = f"{wnid}_{1000 + i}.JPEG"
            members.append((name, data))
            sample.train[f"{wnid}/{name}"] = (data, cid)
        for name, data in sorted((extra_train or {}).get(wnid, {}).items()):
            members.append((name, data))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as inner:
            for name, data in members:
                add_bytes(inner, name, data)
        member_tars.append((f"{wnid}.tar", buf.getvalue()))
    write_tar(sample.train_tar, member_tars)

    n_val = val_per_class * len(classes)
    labels = [classes[i % len(classes)][0] for i in range(n_val)]
    rng.shuffle(labels)
    val_members = []
    for i, label in enumerate(labels, start=1):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        data = jpeg_bytes(imagenet_like(photos[(i * 3) % len(photos)], rng))
        val_members.append((name, data))
        sample.val[name] = (data, label)
    rng.shuffle(val_members)  # like the real val tar, member order is not sorted
    write_tar(sample.val_tar, val_members)
    write_devkit(sample.devkit, classes, labels)
    write_class_map(sample.class_map, classes)
    return sample


# --- CIFAR-format archives --------------------------------------------------------------------------------

def cifar_images(n: int, seed: int = 0) -> np.ndarray:
    """`n` 32x32 RGB crops of the real photos, (n, 32, 32, 3) uint8."""
    photos = [p.convert("RGB") for p in load_photos()]
    rng = random.Random(seed)
    return np.stack([np.asarray(imagenet_like(photos[i % len(photos)], rng, (32, 32))) for i in range(n)])


def _py2_batch(images: np.ndarray, labels: Dict[bytes, List[int]], names: List[bytes], label: bytes) -> bytes:
    """A batch as CIFAR ships it: a Python-2 pickle (protocol 2) with bytes keys and channel-planar rows."""
    import pickle

    rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))
    batch = {b"data": rows, b"filenames": names, b"batch_label": label}
    batch.update(labels)
    return pickle.dumps(batch, protocol=2)


def write_cifar_archive(path: str, variant: str = "cifar100", train_per_batch: int = 30, test: int = 12,
                        seed: int = 0) -> Dict[str, object]:
    """A `cifar-100-python.tar.gz` / `cifar-10-python.tar.gz`-shaped archive of real-photo crops.

    Returns what a correct reader must find: train/test images NHWC and labels in file order, the names.
    """
    import pickle

    rng = random.Random(seed)
    batches = 1 if variant == "cifar100" else 5
    n_train = train_per_batch * batches
    images = cifar_images(n_train + test, seed)
    classes = 100 if variant == "cifar100" else 10
    fine = [rng.randrange(classes) for _ in range(n_train + test)]
    coarse = [f // 5 for f in fine]
    names = [f"photo_{i:05d}.png".encode() for i in range(n_train + test)]
    label_names = [f"class_{c:03d}".encode() for c in range(classes)]
    members: List[Tuple[str, bytes]] = []
    if variant == "cifar100":
        folder = "cifar-100-python"
        for member, lo, hi in (("train", 0, n_train), ("test", n_train, n_train + test)):
            members.append((f"{folder}/{member}", _py2_batch(
                images[lo:hi], {b"fine_labels": fine[lo:hi], b"coarse_labels": coarse[lo:hi]}, names[lo:hi],
                f"{member}ing batch 1 of 1".encode())))
        meta = {b"fine_label_names": label_names, b"coarse_label_names": [f"super_{c:02d}".encode() for c in range(20)]}
        members.append((f"{folder}/meta", pickle.dumps(meta, protocol=2)))
    else:
        folder = "cifar-10-batches-py"
        for b in range(batches):
            lo, hi = b * train_per_batch, (b + 1) * train_per_batch
            members.append((f"{folder}/data_batch_{b + 1}", _py2_batch(
                images[lo:hi], {b"labels": fine[lo:hi]}, names[lo:hi], f"training batch {b + 1} of 5".encode())))
        members.append((f"{folder}/test_batch", _py2_batch(
            images[n_train:], {b"labels": fine[n_train:]}, names[n_train:], b"testing batch 1 of 1")))
        members.append((f"{folder}/batches.meta", pickle.dumps({b"label_names": label_names}, protocol=2)))
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            add_bytes(tar, name, data)
    return {"path": path, "variant": variant, "train_images": images[:n_train], "train_labels": fine[:n_train],
            "test_images": images[n_train:], "test_labels": fine[n_train:], "label_names": label_names,
            "coarse_labels": coarse, "filenames": names}
