"""The embedding on every Keras backend: same weights, same logits (TensorFlow, JAX, PyTorch on CPU).

TensorFlow runs in this process; JAX and PyTorch each in a fresh interpreter (Keras' backend is chosen
once per process) through tests/backend_worker.py. The weights are a TF-slim checkpoint exported from a
random model whose every BN statistic and bias is randomised too, so a mapping error on any backend
shows. JAX and PyTorch are the `[jax]` and `[torch]` extras, installed in the test environment.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from inception_weights import randomise_offsets

from imagebeam.transforms.imaging import colour
from imagebeam.transforms.model import embedding_backends, inception

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

HERE = os.path.dirname(os.path.abspath(__file__))
REL = 1e-4  # float32 on CPU, across backends (the goal of the issue)


def rel_error(actual, expected):
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def rgb():
    """Three real photos letterboxed-size RGB uint8 (299 x 299)."""
    from skimage import data

    imgs = (data.astronaut(), data.chelsea(), data.coffee())
    return np.stack([np.asarray(Image.fromarray(i).convert("RGB").resize((299, 299), Image.Resampling.BICUBIC))
                     for i in imgs])


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A slim checkpoint and its .npz conversion, from a model with randomised BN statistics and biases."""
    folder = tmp_path_factory.mktemp("weights")
    model = inception.build_model("random")
    randomise_offsets(model, seed=7)
    ckpt = inception.export_slim_checkpoint(model, str(folder / "slim" / "model.ckpt"))
    npz = inception.convert_slim_checkpoint(ckpt, str(folder / "inception.npz"))
    return {"model": model, "ckpt": ckpt, "npz": npz, "cache": str(folder / "cache")}


@pytest.fixture(scope="module")
def reference(weights, rgb):
    """The logits the Keras model gives on TensorFlow for the numpy-prepared input (SPEC §3)."""
    x = colour.inception_input(colour.grey_uint8(rgb))
    return np.asarray(weights["model"](x, training=False), dtype=np.float32)


def test_input_tables_reproduce_numpy_for_every_colour():
    """grey + scale on the device from tables: bit-identical to the numpy reference, all 2^24 colours."""
    v = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], -1).astype(np.uint8).reshape(1, 4096, 4096, 3)
    tables = tuple(keras.ops.convert_to_tensor(t) for t in embedding_backends.input_tables())
    out = keras.ops.convert_to_numpy(embedding_backends.device_input(keras.ops.convert_to_tensor(rgb), tables))
    ref = colour.inception_input(colour.grey_uint8(rgb))
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert np.array_equal(out.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("source", ["ckpt", "npz"])
def test_tensorflow_backend_from_checkpoint_and_conversion(source, weights, rgb, reference):
    model = embedding_backends.embedder(weights[source], backend="tensorflow")
    out = model(rgb)
    assert out.shape == (3, 1001) and out.dtype == np.float32
    assert rel_error(out, reference) < 1e-6
    # The tolerance means something: the logits of different photos differ by far more than it.
    assert np.abs(reference[0] - reference[1]).max() > 10 * REL * np.abs(reference).max()


def _worker(backend, weights, rgb, tmp_path, *extra, env=None):
    inputs, output = str(tmp_path / "rgb.npy"), str(tmp_path / f"{backend}.npy")
    np.save(inputs, rgb)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "backend_worker.py"), backend, weights, inputs, output,
                           *extra], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    return np.load(output, allow_pickle=False), info


BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(importlib.util.find_spec(b) is None, reason=f"{b} not installed"))
            for b in ("jax", "torch")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_backend_same_logits_from_npz(backend, weights, rgb, reference, tmp_path):
    out, info = _worker(backend, weights["npz"], rgb, tmp_path)
    assert info["backend"] == backend
    assert not info["tensorflow_loaded"], "the .npz path must not need TensorFlow"
    assert out.shape == (3, 1001) and out.dtype == np.float32
    assert rel_error(out, reference) < REL, rel_error(out, reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_slim_checkpoint_converted_once_and_reused(backend, weights, rgb, reference, tmp_path):
    """The checkpoint itself on JAX/PyTorch: converted to the cache on first use, reused after."""
    cache = os.path.join(weights["cache"], backend)
    env = {inception.NEUTRAL_CACHE_ENV: cache}
    out, info = _worker(backend, weights["ckpt"], rgb, tmp_path, env=env)
    assert rel_error(out, reference) < REL
    (cached,) = os.listdir(os.path.join(cache, "inception"))
    path = os.path.join(cache, "inception", cached)
    with np.load(path, allow_pickle=False) as a, np.load(weights["npz"], allow_pickle=False) as b:
        assert sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
    stamp = os.stat(path).st_mtime_ns
    again, info = _worker(backend, weights["ckpt"], rgb, tmp_path, env=env)
    assert os.stat(path).st_mtime_ns == stamp and os.listdir(os.path.join(cache, "inception")) == [cached]
    assert not info["tensorflow_loaded"], "a cached conversion must not load TensorFlow"
    assert np.array_equal(again, out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_backend_bfloat16(backend, weights, rgb, reference, tmp_path):
    out, info = _worker(backend, weights["npz"], rgb, tmp_path, "bfloat16")
    assert out.dtype == np.float32 and np.isfinite(out).all()
    err = rel_error(out, reference)
    assert 1e-5 < err < 2e-2, err  # really reduced precision (bfloat16 keeps 8 bits), and the same function


def test_unknown_or_missing_backend(monkeypatch):
    with pytest.raises(ValueError, match="unknown embedding backend"):
        embedding_backends.check_available("mxnet")
    monkeypatch.setattr(embedding_backends.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"needs the jax package.*imagebeam\[jax\]"):
        embedding_backends.check_available("jax")


def test_convert_weights_command(weights, tmp_path, capsys):
    from imagebeam import cli

    out = str(tmp_path / "w.npz")
    assert cli.main(["convert-weights", weights["ckpt"], out]) == 0
    assert "1001 logits" in capsys.readouterr().out
    assert inception.weights_kind(out) == "npz" and inception.embedding_size(out) == 1001
    assert cli.main(["convert-weights", weights["ckpt"], str(tmp_path / "w.bin")]) == 1
    assert "must end in .npz" in capsys.readouterr().err
