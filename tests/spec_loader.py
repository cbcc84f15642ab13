"""A loader for Imagenet32/64 files written from SPEC §2 alone, the way users read them (seed 000).

Deliberately independent of imagebeam's code: plain pickle.load / np.load, rows reshaped via the
three colour planes.
"""
import json
import pickle

import numpy as np


def unpickle(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def load_npz(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def to_nhwc(data, size):
    """(n, 3*S*S) planar rows -> (n, S, S, 3), as the seed's loader does with np.dstack."""
    plane = size * size
    x = np.dstack((data[:, :plane], data[:, plane:2 * plane], data[:, 2 * plane:]))
    return x.reshape((x.shape[0], size, size, 3))


def normalise(batch):
    """The seed's preprocessing: x/255 - mean/255 (float32), labels - 1."""
    x = batch["data"] / np.float32(255)
    mean = batch["mean"] / np.float32(255)
    x -= mean  # in place, as the seed does: stays float32
    return x, np.asarray(batch["labels"]) - 1


def comparable(name: str, data: bytes) -> bytes:
    """A file's bytes for comparing two runs: metadata.json without its "run" section (what that run
    reused and staged, which differs between a fresh and a resumed run, or between output folders)."""
    if name != "metadata.json":
        return data
    meta = json.loads(data)
    meta.pop("run", None)
    return json.dumps(meta, sort_keys=True).encode()
