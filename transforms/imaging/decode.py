"""Decode image bytes by content into RGB Pillow images, with reasons for every failure.

ImageNet holds CMYK JPEGs, a PNG named .JPEG, greyscale and palette images; user folders add RGBA,
16-bit PNG/TIFF and animated GIFs. The file name is never trusted: Pillow identifies the format from
the bytes. Everything here is a pure function, usable and tested without a pipeline.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from typing import Callable, Iterator, NamedTuple, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow refuses images over 2 * MAX_IMAGE_PIXELS (~179 megapixels) as decompression bombs; we use the
# same bound but check it ourselves, so no process-wide Pillow setting is touched.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

_HIGH_BIT_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}

# A JPEG draft request: a (width, height) to stay at least as large as, or a function of the header's
# (width, height) giving one (the letterbox's content size depends on the image's aspect ratio).
DraftSize = Union[Tuple[int, int], Callable[[int, int], Tuple[int, int]]]
# The smallest request: libjpeg's 1/8 scale. Every entropy-coded byte is still read, so a truncated or
# corrupt file fails as it would at full size; the inverse DCT, upsampling and colour conversion shrink 64x.
CHECK_DRAFT = (1, 1)


class DecodeError(ValueError):
    """An input that cannot become an RGB image; the message is the reason users read."""


def open_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: Optional[DraftSize] = None,
) -> Image.Image:
    """Decode `data` by content and return a fully loaded Pillow image (any mode).

    `draft_size` asks libjpeg for DCT-domain downscaling (1/2, 1/4, 1/8) to the smallest scale that is
    still at least that size (or at least what it returns for the image's size): the `--fast-decode`
    path. It is ignored for non-JPEG images.
    """
    with _decoding(data):
        img = _open_checked(data, max_pixels)
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size(*img.size) if callable(draft_size) else draft_size)
        img.load()
    return img


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Image.open (header only), refusing decompression bombs and empty images before any decoding."""
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    if width * height > max_pixels:
        raise DecodeError(f"decompression bomb: {width}x{height} = {width * height} pixels "
                          f"exceeds the limit of {max_pixels} (--max-pixels raises it)")
    if width == 0 or height == 0:
        raise DecodeError(f"image has no pixels ({width}x{height})")
    return img


@contextlib.contextmanager
def _decoding(data: bytes) -> Iterator[None]:
    """Turn whatever Pillow raises while reading `data` into a DecodeError with a reason users read."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except DecodeError:
        raise
    except UnidentifiedImageError:
        magic = _known_magic(data)
        if magic:
            raise DecodeError(f"corrupt {magic} data: the header cannot be parsed ({len(data)} bytes)") from None
        raise DecodeError(f"not an image: unrecognised content ({_describe_head(data)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as exc:
        kind = "truncated" if "truncated" in str(exc).lower() else "corrupt"
        raise DecodeError(f"{kind} image data: {exc}") from None


def to_rgb(img: Image.Image, *, exif_transpose: bool = False) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB the way the reference resizer does (`convert("RGB")`).

    16-bit and 32-bit single-channel images are the exception: Pillow's convert clips them at 255 (a
    white image), so they are scaled to 8 bits instead. Alpha is dropped as `convert("RGB")` drops it.
    """
    if exif_transpose:
        img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode in _HIGH_BIT_DEPTH_MODES:
        arr = np.asarray(img)
        if img.mode == "F":
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
            eight = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        else:
            # 16-bit data (I;16*) and Pillow's 32-bit "I" holding 16-bit values: keep the top 8 bits.
            eight = np.clip(arr.astype(np.int64) >> 8, 0, 255).astype(np.uint8)
        return Image.fromarray(eight, mode="L").convert("RGB")
    return img.convert("RGB")


def decode_rgb(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: Optional[DraftSize] = None,
    exif_transpose: bool = False,
) -> Image.Image:
    """Bytes to an RGB image: `open_image` then `to_rgb`; raises DecodeError with a reason."""
    img = open_image(data, max_pixels=max_pixels, draft_size=draft_size)
    try:
        return to_rgb(img, exif_transpose=exif_transpose)
    except (OSError, ValueError) as exc:
        raise DecodeError(f"cannot convert {img.mode} image to RGB: {exc}") from None


_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF8", "GIF"),
          (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"BM", "BMP"))


def _known_magic(data: bytes) -> str:
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return ""


def _describe_head(data: bytes) -> str:
    head = data[:16]
    if head.lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml")):
        return "looks like HTML/XML"
    return f"{len(data)} bytes starting {head[:8].hex()}"


# Pillow format name -> the extension a downloaded file is stored under.
EXTENSIONS = {"JPEG": ".jpeg", "MPO": ".jpeg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp",
              "TIFF": ".tiff", "ICO": ".ico", "PPM": ".ppm", "JPEG2000": ".jp2", "AVIF": ".avif"}


class ImageFacts(NamedTuple):
    """What a validated image is: its format (Pillow's name), size and the extension to store it under."""
    format: str
    width: int
    height: int

    @property
    def extension(self) -> str:
        return EXTENSIONS.get(self.format, "." + self.format.lower())


def probe_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, full_decode: bool = True) -> ImageFacts:
    """Identify an image by content and, with `full_decode`, decode all of it (catching truncation).

    The size is the one the header declares. JPEGs are decoded at 1/8 scale (libjpeg DCT scaling): every
    entropy-coded byte is still read, so a truncated or corrupt file fails, at a fraction of the cost.
    Raises DecodeError with the reason.
    """
    with _decoding(data):
        img = _open_checked(data, max_pixels)
        facts = ImageFacts(img.format or "unknown", *img.size)
        if full_decode:
            if img.format == "JPEG":
                img.draft(None, (1, 1))
            img.load()
    return facts
