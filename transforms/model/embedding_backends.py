"""One compiled Inception call on any Keras 3 backend: TensorFlow, JAX or PyTorch.

Keras 3 runs the same `InceptionResNetV2` on all three; which one is a process-wide choice made before
Keras is imported (`KERAS_BACKEND`). `select` makes that choice on a worker, just before the model is
built, so one pipeline can embed with PyTorch on a machine where TensorFlow is not even installed.

The embedder's input is the letterboxed RGB uint8 chunk itself. The SPEC §3 Inception input (grey as
`tf.image.rgb_to_grayscale` rounds it, copied to 3 channels, scaled to [-1, 1]) is computed on the
device, from lookup tables that hold numpy's float32 products (`colour.grey_uint8`,
`colour.inception_input`): only gathers, two additions, one multiplication and a truncation remain,
none of which a compiler may fuse or reorder, so the model input is bit-identical on every backend and
device, the host does no per-pixel work, and a quarter of the bytes cross to the GPU.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
from typing import Optional

import numpy as np

from imagebeam.transforms.imaging import colour

_LOG = logging.getLogger(__name__)

BACKENDS = ("tensorflow", "jax", "torch")
COMPILE_MODES = ("auto", "on", "off")
# The Python package each backend needs on the machine that runs the embedding.
_PACKAGES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def check_available(backend: str) -> None:
    """Raise ValueError (one line) unless `backend` is known and its package is installed here."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown embedding backend {backend!r}; choose from {', '.join(BACKENDS)}")
    package = _PACKAGES[backend]
    if importlib.util.find_spec(package) is None:
        extra = "" if backend == "tensorflow" else f" (pip install 'imagebeam[{backend}]')"
        raise ValueError(f"embedding backend {backend!r} needs the {package} package, which is not installed{extra}")


def select(backend: str) -> None:
    """Make `backend` Keras' backend in this process (before Keras is imported, or by reloading it)."""
    check_available(backend)
    if backend == "jax":
        # Several worker processes may share one GPU: take memory as needed, not 75% up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = backend
    import keras

    if keras.backend.backend() != backend:
        _LOG.warning("switching Keras from %s to %s in this process", keras.backend.backend(), backend)
        os.environ["KERAS_BACKEND"] = backend
        keras.config.set_backend(backend)


def input_tables() -> tuple:
    """(red, green, blue, scale) float32 lookup tables of the Inception input.

    grey = trunc((red[r] + green[g] + blue[b]) * 255.5), input = scale[grey]: the same float32 values
    as `colour.inception_input(colour.grey_uint8(rgb))`, for every pixel (tested over all 2^24 colours).
    """
    levels = np.arange(256, dtype=np.float32) * np.float32(1.0 / 255.0)
    red, green, blue = (levels * colour.GREY_WEIGHTS[c] for c in range(3))
    scale = colour.inception_input(np.arange(256, dtype=np.uint8))[:, 0]
    return red, green, blue, scale


def device_input(rgb, tables) -> object:
    """RGB uint8 (n, h, w, 3) backend tensor -> float32 (n, h, w, 3) Inception input, with keras.ops."""
    from keras import ops

    red, green, blue, scale = tables
    index = ops.cast(rgb, "int32")
    total = ops.take(red, index[..., 0]) + ops.take(green, index[..., 1])
    total = total + ops.take(blue, index[..., 2])
    grey = ops.cast(total * np.float32(255.5), "int32")  # truncation, as numpy's astype(uint8)
    x = ops.take(scale, grey)
    return ops.stack([x, x, x], axis=-1)


class Embedder:
    """A built Keras model behind one compiled call: RGB uint8 chunk (n, 299, 299, 3) -> float32 logits.

    `compile`: "auto" compiles where it pays (JAX always: eager JAX is op by op; PyTorch with
    `torch.compile` on a GPU only, where its compilation is repaid; TensorFlow as a graph function, as
    before), "on" and "off" force it ("on" means XLA `jit_compile` for TensorFlow).
    `to_device` / `device_call` / `to_numpy` are the three steps of a call, apart for benchmarks.
    `pad_to`: a compiled JAX/PyTorch call is specialised to its batch shape, so a smaller chunk (the
    last of a bucket) is padded to this many images and the padding's logits dropped: one compilation
    per process instead of one per chunk size, and a chunk's logits never depend on what came before.
    """

    def __init__(self, model, compile: str = "auto", pad_to: Optional[int] = None):
        import keras

        if compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {compile!r}; choose from {COMPILE_MODES}")
        self.model = model
        self.backend = keras.backend.backend()
        self.compiled = False
        self.pad_to = pad_to if self.backend != "tensorflow" else None
        tables = tuple(keras.ops.convert_to_tensor(t) for t in input_tables())
        self.device_call = getattr(self, f"_{self.backend}")(model, tables, compile)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        if rgb.dtype != np.uint8 or rgb.ndim != 4 or rgb.shape[-1] != 3:
            raise ValueError(f"expected RGB uint8 (n, h, w, 3), got {rgb.dtype} {rgb.shape}")
        n = len(rgb)
        if self.pad_to and n < self.pad_to:
            rgb = np.concatenate([rgb, np.zeros((self.pad_to - n,) + rgb.shape[1:], np.uint8)])
        return self.to_numpy(self.device_call(self.to_device(rgb)))[:n]

    def to_device(self, rgb: np.ndarray):
        import keras

        return keras.ops.convert_to_tensor(rgb)

    def to_numpy(self, out) -> np.ndarray:
        """Wait for the device and bring the logits back as float32 numpy."""
        if self.backend == "torch":
            return out.float().cpu().numpy()
        return np.asarray(out, dtype=np.float32)

    def _tensorflow(self, model, tables, compile: str):
        import tensorflow as tf

        self.compiled = compile == "on"
        return tf.function(lambda rgb: model(device_input(rgb, tables), training=False),
                           reduce_retracing=True, jit_compile=self.compiled or None)

    def _jax(self, model, tables, compile: str):
        import jax

        trainable = [v.value for v in model.trainable_variables]
        fixed = [v.value for v in model.non_trainable_variables]

        def forward(trainable, fixed, rgb):
            out, _ = model.stateless_call(trainable, fixed, device_input(rgb, tables), training=False)
            return out

        self.compiled = compile != "off"
        fn = jax.jit(forward) if self.compiled else forward
        return lambda rgb: fn(trainable, fixed, rgb)

    def _torch(self, model, tables, compile: str):
        import torch

        def forward(rgb):
            return model(device_input(rgb, tables), training=False)

        on_gpu = torch.cuda.is_available()
        if on_gpu:
            torch.backends.cudnn.benchmark = True
        self.compiled = compile == "on" or (compile == "auto" and on_gpu)
        fn = torch.compile(forward, dynamic=False) if self.compiled else forward

        def call(rgb):
            with torch.inference_mode():
                return fn(rgb)

        return call


def embedder(weights: str, precision: str = "float32", backend: Optional[str] = None,
             compile: str = "auto", pad_to: Optional[int] = None) -> Embedder:
    """Select `backend` (None: keep Keras' current one), build the model with `weights`, compile the call."""
    if backend is not None:
        select(backend)
    import keras

    from imagebeam.transforms.model import inception

    if keras.backend.backend() == "tensorflow":
        inception.configure_gpus()
    return Embedder(inception.build_model(weights, precision), compile, pad_to)
