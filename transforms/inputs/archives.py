"""Known dataset archives (file name, URL, md5, size) and streaming md5 of a file on any Beam filesystem.

Sources of the checksums and sizes:
- CIFAR-10 / CIFAR-100 md5: torchvision `datasets/cifar.py` (`tgz_md5`); sizes: the Content-Length the
  Toronto server sends (170,498,071 and 169,001,437 bytes, also SPEC §4 for CIFAR-100).
- ILSVRC2012 md5s: SPEC §1 and image-net.org's download page; train/val/devkit also torchvision
  `datasets/imagenet.py` (`ARCHIVE_META`). Sizes: train SPEC §1; val 6,744,924,160 bytes (image-net.org's
  Content-Length, quoted by several projects); devkit and test are left unknown (None).

ImageNet archives are not public: image-net.org serves them only to a logged-in account. Users normally
download them with their browser or with their account's session cookie (`imagebeam fetch NAME
--header "Cookie: ..."`), or from a mirror they have access to (`imagebeam fetch NAME --url MIRROR_URL`);
`imagebeam verify` then checks what they have against the md5 below.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
from typing import Callable, Dict, NamedTuple, Optional

from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

BLOCK = 8 << 20  # md5 is streamed in 8 MiB blocks
IMAGENET_BASE = "https://image-net.org/data/ILSVRC/2012/"
CIFAR_BASE = "https://www.cs.toronto.edu/~kriz/"


class Archive(NamedTuple):
    """One known archive. `size` is None where we are not sure of it; `login` when the URL needs an account."""
    file_name: str
    url: str
    md5: str
    size: Optional[int]
    login: bool = False


def _imagenet(file_name: str, md5: str, size: Optional[int]) -> Archive:
    return Archive(file_name, IMAGENET_BASE + file_name, md5, size, login=True)


KNOWN: Dict[str, Archive] = {
    "cifar-10-python": Archive("cifar-10-python.tar.gz", CIFAR_BASE + "cifar-10-python.tar.gz",
                               "c58f30108f718f92721af3b95e74349a", 170_498_071),
    "cifar-100-python": Archive("cifar-100-python.tar.gz", CIFAR_BASE + "cifar-100-python.tar.gz",
                                "eb9058c3a382ffc7106e4002c42a8d85", 169_001_437),
    "ILSVRC2012_img_train": _imagenet("ILSVRC2012_img_train.tar", "1d675b47d978889d74fa0da5fadfb00e",
                                      147_897_477_120),
    "ILSVRC2012_img_val": _imagenet("ILSVRC2012_img_val.tar", "29b22e2961454d5413ddabcf34fc5622",
                                    6_744_924_160),
    "ILSVRC2012_img_test_v10102019": _imagenet("ILSVRC2012_img_test_v10102019.tar",
                                               "e1b8681fff3d63731c599df9b4b6fc02", None),
    "ILSVRC2012_devkit_t12": _imagenet("ILSVRC2012_devkit_t12.tar.gz", "fa75699e90414af021442c21a62c3abf", None),
}


def known(name: str) -> Optional[Archive]:
    """The archive called `name`, given as its table name or its file name (case as listed)."""
    return KNOWN.get(name) or known_by_file_name(name)


def known_by_file_name(name: str) -> Optional[Archive]:
    """The archive whose file name is the last component of `name` (a path or URL may be given)."""
    base = posixpath.basename(name.replace("\\", "/").rstrip("/"))
    for archive in KNOWN.values():
        if archive.file_name == base:
            return archive
    return None


def md5_of(path: str, progress: Optional[Callable[[int], None]] = None) -> str:
    """Hex md5 of the file's bytes as stored (never decompressed), read in 8 MiB blocks.

    `progress(bytes_read_so_far)` is called after every block. Works on any Beam filesystem.
    """
    digest = hashlib.md5()
    done = 0
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        while True:
            block = f.read(BLOCK)
            if not block:
                break
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress(done)
    return digest.hexdigest()


def file_size(path: str) -> Optional[int]:
    """Size in bytes of a file (local or any Beam filesystem), or None when there is no such file."""
    if "://" not in path:
        return os.path.getsize(path) if os.path.isfile(path) else None
    try:  # match() takes a glob: accept only the exact path back
        matched = FileSystems.match([path])[0].metadata_list
    except Exception:  # noqa: BLE001 - filesystems raise their own error types for a missing path
        return None
    for meta in matched:
        if meta.path == path:
            return meta.size_in_bytes
    return None


def is_md5(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text.lower())
