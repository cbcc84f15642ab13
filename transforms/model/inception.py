"""The Inception-ResNet-v2 image embedding of deep-koalarization, built on Keras' own model.

deep-koalarization feeds its fusion layer the PRE-SOFTMAX logits of Inception-ResNet-v2 (inference mode)
for each image resized to 299x299 and scaled to [-1, 1]. The reference took them from the TF-slim
checkpoint `inception_resnet_v2_2016_08_30.ckpt` (1001 classes: slot 0 is "background"); Keras
publishes ImageNet weights for the same architecture with 1000 classes. This module builds
`keras.applications.InceptionResNetV2(classifier_activation=None)` and loads either, so records can
match the reference exactly (slim) or use the weights Keras fetches itself (imagenet).

The slim checkpoint is mapped onto the Keras model by walking the Keras functional graph (concat
layer -> branches -> conv/BN chains), never by Keras' auto-generated layer names (`conv2d_37`), which
depend on what else the process built before.

TensorFlow and Keras are imported inside the functions: `weights_kind` must stay usable (and this
module cheap to import) where TensorFlow is not loaded, e.g. while parsing pipeline options.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

if TYPE_CHECKING:  # annotations only: TensorFlow/Keras are imported lazily (see above)
    import keras

log = logging.getLogger(__name__)

EMBEDDING_SIZE_SLIM = 1001
EMBEDDING_SIZE_KERAS = 1000

# What `--inception-weights` accepts besides paths.
IMAGENET = "imagenet"
RANDOM = "random"
KIND_KERAS = "keras"
KIND_SLIM = "slim"
KIND_NPZ = "npz"  # slim-named float32 arrays: the backend-neutral form of the TF-slim checkpoint

PRECISIONS = ("float32", "mixed_float16", "bfloat16")
# "bfloat16" runs under Keras' *mixed* bfloat16 policy: bfloat16 compute, float32 variables, so
# checkpoint tensors (float32) are assigned as they are and BN statistics keep their precision.
_KERAS_POLICY = {"float32": "float32", "mixed_float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}

SLIM_SCOPE = "InceptionResnetV2"
# Checkpoint variables that have no counterpart in the inference model and are skipped on purpose:
# the auxiliary classifier head (training only) and the optimizer step counter.
SLIM_SKIP_PREFIXES = (f"{SLIM_SCOPE}/AuxLogits/",)
SLIM_SKIP_NAMES = ("global_step",)

_KERAS_SUFFIXES = (".weights.h5", ".h5", ".keras")
_IMAGENET_WEIGHTS_FILE = "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels.h5"
# The Inception-ResNet-A/B/C repeats: Keras block type -> (slim repeat scope, blocks in it). The
# tenth block8 (scale 1, no activation) sits outside the repeat in slim, as scope `Block8`.
_REPEATS = (("block35", "Repeat", 10), ("block17", "Repeat_1", 20), ("block8", "Repeat_2", 9))
_FINAL_BLOCK8 = ("block8_10", "Block8")
_REDUCTIONS = {"mixed_5b": "Mixed_5b", "mixed_6a": "Mixed_6a", "mixed_7a": "Mixed_7a"}
_REDUCTION_BEFORE = {"block17_1": "mixed_6a", "block8_1": "mixed_7a"}  # Mixed_6a/7a precede these blocks


# ----------------------------------------------------------------------------------------------
# Classifying the weights argument (no TensorFlow)


def _is_remote(path: str) -> bool:
    return "://" in path


def weights_kind(weights: str) -> str:
    """Classify `--inception-weights` as "imagenet", "random", "keras" or "slim" without TensorFlow.

    Runs while options are parsed, so a typo fails before any worker starts. Local paths must exist;
    remote ones (gs://...) are judged by their suffix only, since checking them needs TF's gfile.
    """
    if not isinstance(weights, str) or not weights:
        raise ValueError(f"--inception-weights must be a non-empty string, got {weights!r}")
    if weights in (IMAGENET, RANDOM):
        return weights
    lower = weights.lower()
    hint = (
        "expected 'imagenet', 'random', a Keras weights file (.h5, .weights.h5, .keras) or a TF-slim "
        "checkpoint (e.g. inception_resnet_v2_2016_08_30.ckpt, or a checkpoint prefix with a .index file)"
    )
    if lower.endswith(".npz"):
        if _is_remote(weights) or os.path.isfile(weights):
            return KIND_NPZ
        raise ValueError(f"--inception-weights {weights!r}: weights file does not exist")
    if _is_remote(weights):
        if lower.endswith(_KERAS_SUFFIXES):
            return KIND_KERAS
        if lower.endswith(".ckpt") or ".ckpt-" in os.path.basename(lower):
            return KIND_SLIM
        raise ValueError(f"--inception-weights {weights!r}: cannot tell the kind of this remote path; {hint}")
    if lower.endswith(_KERAS_SUFFIXES):
        if os.path.isfile(weights):
            return KIND_KERAS
        raise ValueError(f"--inception-weights {weights!r}: Keras weights file does not exist")
    if os.path.isfile(weights + ".index"):
        return KIND_SLIM  # a V2 checkpoint prefix (model.ckpt, model.ckpt-12345)
    if lower.endswith(".ckpt") and os.path.isfile(weights):
        return KIND_SLIM  # the V1 single-file checkpoint the slim release ships
    if os.path.isdir(weights) and os.path.isfile(os.path.join(weights, "checkpoint")):
        return KIND_SLIM  # a training directory: tf.train.load_checkpoint takes its latest checkpoint
    if lower.endswith(".index") or ".data-" in os.path.basename(lower):
        stem = weights[: lower.rfind(".index")] if lower.endswith(".index") else weights.split(".data-")[0]
        raise ValueError(
            f"--inception-weights {weights!r}: pass the checkpoint prefix ({stem!r}), not one of its files"
        )
    if not os.path.exists(weights):
        raise ValueError(f"--inception-weights {weights!r}: no such file, and not a known name; {hint}")
    raise ValueError(f"--inception-weights {weights!r}: not a recognised weights file; {hint}")


def _h5_num_classes(path: str) -> Optional[int]:
    """Classes of the logits layer stored in a Keras .h5 weights file, or None if not found.

    The classifier kernel is the only 2-D array whose input side is the 1536 channels of conv_7b
    (conv kernels are 4-D), in both the legacy (Keras 2) and the Keras 3 `.weights.h5` layouts.
    """
    import h5py

    found: List[Tuple[int, ...]] = []

    def visit(_name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and len(obj.shape) == 2 and obj.shape[0] == 1536:
            found.append(tuple(obj.shape))

    with h5py.File(path, "r") as f:
        f.visititems(visit)
    if len(found) != 1:
        return None
    return int(found[0][1])


def _check_classes(classes: int, source: str) -> int:
    if classes not in (EMBEDDING_SIZE_KERAS, EMBEDDING_SIZE_SLIM):
        raise ValueError(
            f"{source}: the model outputs {classes} logits; expected {EMBEDDING_SIZE_KERAS} (Keras ImageNet) "
            f"or {EMBEDDING_SIZE_SLIM} (TF-slim, with background class)"
        )
    return classes


def _archive_classes(path: str) -> Optional[int]:
    """Logits size from a `.keras` archive's config.json (the Dense named "predictions"), or None.

    Reading the config avoids deserialising a 56M-parameter model just to learn one number.
    """
    import json
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    found: List[int] = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            cfg = node.get("config")
            if node.get("class_name") == "Dense" and isinstance(cfg, dict) and cfg.get("name") == "predictions":
                found.append(int(cfg["units"]))
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(config)
    return found[0] if len(found) == 1 else None


@contextlib.contextmanager
def _local(path: str) -> Iterator[str]:
    """`path`, or a temporary local copy of a remote one (gs://...): h5py and zipfile need local files."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    if not _is_remote(path):
        yield path
        return
    import shutil
    import tempfile

    from apache_beam.io.filesystems import FileSystems

    folder = tempfile.mkdtemp(prefix="inception_weights_")
    try:
        local = os.path.join(folder, os.path.basename(path.rstrip("/")))
        with FileSystems.open(path, compression_type="uncompressed") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        yield local
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _keras_file_classes(path: str) -> int:
    """Logits size of a local Keras file: .h5 via h5py, .keras via its config (or by loading it)."""
    if path.lower().endswith(".keras"):
        classes = _archive_classes(path)
        if classes is None:
            classes = int(_load_keras_model(path).outputs[0].shape[-1])
        return _check_classes(classes, path)
    classes = _h5_num_classes(path)
    if classes is None:
        raise ValueError(f"{path}: no Inception-ResNet-v2 classifier kernel ([1536, classes]) in this .h5 file")
    return _check_classes(classes, path)


def embedding_size(weights: str) -> int:
    """Length of the embedding (logits) these weights give, so sinks can declare the feature shape.

    "random" mimics the slim shape (1001) so its records match the reference's 1001-float feature.
    """
    kind = weights_kind(weights)
    if kind in (KIND_SLIM, RANDOM):
        return EMBEDDING_SIZE_SLIM
    if kind == IMAGENET:
        return EMBEDDING_SIZE_KERAS
    if kind == KIND_NPZ:
        with _local(weights) as path:
            return _check_classes(_npz_classes(path), weights)
    with _local(weights) as path:
        return _keras_file_classes(path)


# ----------------------------------------------------------------------------------------------
# Building


def configure_gpus() -> None:
    """Let TF grow GPU memory on demand, so several workers (or TF next to Beam) can share a GPU."""
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError as e:  # the runtime was initialised already: the setting is fixed by now
            log.debug("memory growth not changed on %s: %s", gpu.name, e)


@contextlib.contextmanager
def _dtype_policy(precision: str) -> Iterator[None]:
    """Build under a Keras dtype policy and put the caller's global policy back afterwards.

    Keras keeps the "global" policy per thread (keras.src.backend.common.global_state is a
    threading.local), so DoFns building models in several threads do not race on it.
    """
    import keras

    if precision not in _KERAS_POLICY:
        raise ValueError(f"unknown precision {precision!r}; choose from {list(PRECISIONS)}")
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(_KERAS_POLICY[precision])
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _keras_model(classes: int, weights: Optional[str] = None) -> keras.Model:
    import keras

    return keras.applications.InceptionResNetV2(
        include_top=True, weights=weights, classes=classes, classifier_activation=None
    )


def _float32_output(model: keras.Model) -> keras.Model:
    """Cast the logits to float32 under a mixed policy: callers always get float32 embeddings."""
    import keras

    if model.outputs[0].dtype == "float32":
        return model
    out = keras.layers.Activation("linear", dtype="float32", name="logits_float32")(model.outputs[0])
    return keras.Model(model.input, out, name=model.name)


def _randomise(model, seed: int = 0) -> None:
    """Deterministic untrained weights, independent of global RNG state and of what was built before.

    Keras' own defaults are reproduced from a local generator: Glorot-uniform kernels, zero biases and
    BN offsets, BN moving mean 0 and variance 1.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    for var in model.weights:
        shape = tuple(var.shape)
        leaf = var.path.rsplit("/", 1)[-1]
        if leaf == "kernel":
            receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
            fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
            limit = float(np.sqrt(6.0 / (fan_in + fan_out)))
            value = rng.uniform(-limit, limit, size=shape).astype(np.float32)
        elif leaf in ("moving_variance", "gamma"):
            value = np.ones(shape, np.float32)
        else:  # bias, beta, moving_mean
            value = np.zeros(shape, np.float32)
        var.assign(value)


def _load_keras_model(path: str) -> keras.Model:
    import keras
    from keras.src.applications import inception_resnet_v2 as keras_irv2

    # CustomScaleLayer (the residual `x + scale * r`) is not registered for deserialisation.
    return keras.models.load_model(
        path, compile=False, custom_objects={"CustomScaleLayer": keras_irv2.CustomScaleLayer}
    )


def _imagenet_model() -> keras.Model:
    try:
        return _keras_model(EMBEDDING_SIZE_KERAS, weights=IMAGENET)
    except Exception as e:  # Keras' get_file raises a bare Exception when offline
        raise RuntimeError(f"could not get Keras' ImageNet weights for InceptionResNetV2 ({e}). "
                           f"{_imagenet_weights_hint()}") from e


_KERAS_WEIGHTS_HOST = ("storage.googleapis.com", 443)  # where keras.utils.get_file fetches them from


def _keras_cache_file() -> str:
    home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return os.path.join(home, "models", _IMAGENET_WEIGHTS_FILE)


def _imagenet_weights_hint() -> str:
    return (f"Keras downloads them once and caches them as {_keras_cache_file()}; on an offline machine copy "
            "that file there, or pass --inception-weights as a Keras weights file (.h5/.weights.h5/.keras), "
            "the TF-slim checkpoint (inception_resnet_v2_2016_08_30.ckpt) or its .npz, or 'random' for a "
            "meaningless test embedding")


def check_imagenet_weights(timeout: float = 2.0) -> None:
    """Raise ValueError, at once and in the launcher, when 'imagenet' weights can be neither found in
    Keras' cache nor downloaded (no route to Keras' host); a worker would otherwise fail minutes later."""
    if os.path.isfile(_keras_cache_file()):
        return
    import socket

    try:
        socket.create_connection(_KERAS_WEIGHTS_HOST, timeout=timeout).close()
    except OSError:
        raise ValueError(f"Keras' ImageNet weights are not cached and {_KERAS_WEIGHTS_HOST[0]} cannot be "
                         f"reached. {_imagenet_weights_hint()}") from None


def build_model(weights: str, precision: str = "float32") -> keras.Model:
    """Inception-ResNet-v2 giving pre-softmax logits (float32), with `weights` loaded.

    `weights` is anything `weights_kind` accepts. `precision` picks the Keras dtype policy the model is
    built under ("bfloat16" means Keras' mixed bfloat16); variables stay float32 and the global policy
    is restored afterwards. Works on any Keras backend: a TF-slim checkpoint is read directly under
    TensorFlow and through its cached `.npz` conversion under JAX and PyTorch (`neutral_weights`).
    """
    import keras

    kind = weights_kind(weights)
    if precision not in _KERAS_POLICY:
        raise ValueError(f"unknown precision {precision!r}; choose from {list(PRECISIONS)}")
    if kind == KIND_KERAS:
        with _local(weights) as path:
            return _float32_output(_keras_file_model(path, precision))

    if kind == KIND_NPZ:
        with _local(weights) as path:
            arrays = _read_npz(path)
        with _dtype_policy(precision):
            model = _keras_model(_check_classes(_npz_classes_of(arrays), weights))
        report = _assign_arrays(model, arrays, weights)
        log.info("loaded %d tensors from %s", report["assigned"], weights)
        return _float32_output(model)
    with _dtype_policy(precision):
        model = _imagenet_model() if kind == IMAGENET else _keras_model(EMBEDDING_SIZE_SLIM)
    if kind == RANDOM:
        _randomise(model)
        log.warning(
            "Inception-ResNet-v2 has RANDOM weights (--inception-weights random): the embedding "
            "is meaningless and only fit for tests. Use 'imagenet' or the TF-slim checkpoint for real data."
        )
    elif kind == KIND_SLIM and keras.backend.backend() != "tensorflow":
        neutral = neutral_weights(weights)
        report = _assign_arrays(model, _read_npz(neutral), neutral)
        log.info("loaded %d tensors from %s (converted from %s)", report["assigned"], neutral, weights)
    elif kind == KIND_SLIM:
        report = load_slim_checkpoint(model, weights)
        log.info("loaded %d tensors from %s (skipped: %s)", report["assigned"], weights, report["skipped"])
    return _float32_output(model)


def _keras_file_model(path: str, precision: str) -> keras.Model:
    """Our logits model with the weights of a local Keras file.

    A `.keras` model is loaded as saved and its weights copied over by slim name, so the result has
    no softmax and the requested precision whatever the file was saved with.
    """
    if path.lower().endswith(".keras"):
        source = _load_keras_model(path)  # outside the policy: the file's layers carry their own dtypes
        classes = _check_classes(int(source.outputs[0].shape[-1]), path)
        with _dtype_policy(precision):
            model = _keras_model(classes)
        _copy_by_slim_names(source, model, path)
        return model
    classes = _keras_file_classes(path)
    with _dtype_policy(precision):
        model = _keras_model(classes)
    model.load_weights(path)
    return model


def _copy_by_slim_names(source, target, what: str) -> None:
    """Copy weights between two Inception-ResNet-v2 models matched by structure, not by weight order."""
    src, dst = slim_variable_map(source), slim_variable_map(target)
    if set(src) != set(dst):
        raise ValueError(f"{what}: not the same Inception-ResNet-v2 architecture as Keras' model")
    for name, var in dst.items():
        if tuple(src[name].shape) != tuple(var.shape):
            raise ValueError(f"{what}: {name} has shape {tuple(src[name].shape)}, expected {tuple(var.shape)}")
        var.assign(src[name].value)


# ----------------------------------------------------------------------------------------------
# The Keras graph, seen as TF-slim scopes


def _producer(tensor):
    """The layer that made a symbolic tensor (Keras 3: `KerasTensor._keras_history.operation`)."""
    return tensor._keras_history.operation


def _layer_inputs(layer) -> list:
    nodes = layer._inbound_nodes
    if not nodes:
        return []
    return list(nodes[0].input_tensors)


def _ancestry(tensor) -> list:
    """`tensor` and the tensors before it through single-input layers, nearest first.

    Stops at the model input or at a layer with several inputs (a concat, a residual sum).
    """
    chain = [tensor]
    while True:
        inputs = _layer_inputs(_producer(tensor))
        if len(inputs) != 1:
            return chain
        tensor = inputs[0]
        chain.append(tensor)


def _spatial(tensor, data_format: str) -> Tuple[int, int]:
    shape = tuple(tensor.shape)
    return tuple(shape[1:3]) if data_format == "channels_last" else tuple(shape[2:4])


class _Unit:
    """One step of a branch: a conv with its BN (and activation), or a pooling layer."""

    def __init__(self, kind: str, layers: list, kernel: Tuple[int, int], out_size: Tuple[int, int]):
        self.kind, self.layers, self.kernel, self.out_size = kind, layers, kernel, out_size

    @property
    def conv(self):
        return self.layers[0]

    @property
    def bn(self):
        return self.layers[1]


def _units(tensors: Sequence, data_format: str, where: str) -> List[_Unit]:
    """Group the layers that made `tensors` (forward order) into conv+BN(+ReLU) and pooling units."""
    import keras

    layers = [_producer(t) for t in tensors]
    units: List[_Unit] = []
    i = 0
    while i < len(layers):
        layer = layers[i]
        if isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)):
            kind = "MaxPool" if isinstance(layer, keras.layers.MaxPooling2D) else "AvgPool"
            units.append(_Unit(kind, [layer], tuple(layer.pool_size), _spatial(tensors[i], data_format)))
            i += 1
            continue
        if not isinstance(layer, keras.layers.Conv2D):
            raise ValueError(f"{where}: unexpected layer {layer.name} ({type(layer).__name__}) in a branch")
        bn = layers[i + 1] if i + 1 < len(layers) else None
        if layer.use_bias or not isinstance(bn, keras.layers.BatchNormalization):
            raise ValueError(f"{where}: conv {layer.name} is not followed by a BatchNormalization")
        if bn.scale or not bn.center:
            raise ValueError(f"{where}: {bn.name} must have beta and no gamma, like TF-slim's BatchNorm")
        j = i + 2
        if j < len(layers) and isinstance(layers[j], keras.layers.Activation):
            j += 1
        units.append(_Unit("Conv2d", [layer, bn], tuple(layer.kernel_size), _spatial(tensors[j - 1], data_format)))
        i = j
    return units


def _slim_names(units: Sequence[_Unit], in_size: Tuple[int, int], branch: bool) -> List[str]:
    """TF-slim's scope names for a chain: `<Op>_<group><letter>_<kh>x<kw>`.

    The group number goes up whenever the spatial size changes (stem: 1a 299->149, 2a, 2b, 3a pool, ...;
    branches: 0a, 0b, then 1a for the stride-2 reduction) and the letter counts within a group. A branch
    that is one resolution-keeping conv is just `Conv2d_<kh>x<kw>` (e.g. `Branch_0/Conv2d_1x1`).
    """
    def size(k: Tuple[int, int]) -> str:
        return f"{k[0]}x{k[1]}"

    if branch and len(units) == 1 and units[0].kind == "Conv2d" and units[0].out_size == in_size:
        return [f"Conv2d_{size(units[0].kernel)}"]
    names, group, letter, current = [], 0, 0, in_size
    for unit in units:
        if unit.out_size != current:
            group, letter, current = group + 1, 0, unit.out_size
        names.append(f"{unit.kind}_{group}{'abcdefghij'[letter]}_{size(unit.kernel)}")
        letter += 1
    return names


def _conv_bn_vars(scope: str, unit: _Unit) -> Dict[str, Any]:
    return {
        f"{scope}/weights": unit.conv.kernel,
        f"{scope}/BatchNorm/beta": unit.bn.beta,
        f"{scope}/BatchNorm/moving_mean": unit.bn.moving_mean,
        f"{scope}/BatchNorm/moving_variance": unit.bn.moving_variance,
    }


def _branch_vars(concat, scope: str, data_format: str) -> Tuple[Dict[str, Any], Any]:
    """Variables of one concat block's branches (Branch_0, Branch_1, ... in concat input order).

    Returns them with the block's input tensor: the first tensor that every branch starts from.
    """
    branches = _layer_inputs(concat)
    ancestries = [_ancestry(t) for t in branches]
    others = [{id(t) for t in a} for a in ancestries[1:]]
    root = next((t for t in ancestries[0] if all(id(t) in o for o in others)), None)
    if root is None or len(branches) < 2:
        raise ValueError(f"{scope}: the branches of {concat.name} do not start from one tensor")
    in_size = _spatial(root, data_format)
    out: Dict[str, Any] = {}
    for b, ancestry in enumerate(ancestries):
        cut = next(k for k, t in enumerate(ancestry) if t is root)
        tensors = list(reversed(ancestry[:cut]))
        units = _units(tensors, data_format, f"{scope}/Branch_{b}")
        for unit, name in zip(units, _slim_names(units, in_size, branch=True)):
            if unit.kind == "Conv2d":
                out.update(_conv_bn_vars(f"{scope}/Branch_{b}/{name}", unit))
    return out, root


def _up_conv_vars(model, block: str, scope: str) -> Dict[str, Any]:
    import keras

    conv = model.get_layer(f"{block}_conv")
    mixed = model.get_layer(f"{block}_mixed")
    ok = (
        isinstance(conv, keras.layers.Conv2D)
        and conv.use_bias
        and tuple(conv.kernel_size) == (1, 1)
        and [_producer(t) for t in _layer_inputs(conv)] == [mixed]
    )
    if not ok:
        raise ValueError(f"{scope}: {conv.name} is not the 1x1 biased projection of {mixed.name}")
    return {f"{scope}/Conv2d_1x1/weights": conv.kernel, f"{scope}/Conv2d_1x1/biases": conv.bias}


def _block_scopes() -> List[Tuple[str, str]]:
    """(Keras block prefix, slim scope) of every Inception-ResNet block, in network order."""
    scopes = []
    for block, repeat, count in _REPEATS:
        scopes += [(f"{block}_{k}", f"{repeat}/{block}_{k}") for k in range(1, count + 1)]
    return scopes + [_FINAL_BLOCK8]


def slim_variable_map(model: keras.Model) -> Dict[str, keras.Variable]:
    """TF-slim checkpoint name -> Keras variable, for `inception_resnet_v2_2016_08_30.ckpt`.

    Derived from the functional graph: each named concat layer's inputs are its branches in slim's
    order, and each branch is walked back to the block input as conv/BN/pool units. Raises if the
    model has a variable the map does not cover, or covers one twice.
    """
    import keras

    data_format = keras.config.image_data_format()
    scope = SLIM_SCOPE
    out: Dict[str, Any] = {}

    def add(entries: Mapping[str, Any]) -> None:
        for name, var in entries.items():
            if name in out:
                raise ValueError(f"slim name {name} derived twice")
            out[name] = var

    def layer(name: str):
        try:
            return model.get_layer(name)
        except ValueError:
            raise ValueError(f"the model has no layer {name!r}: not Keras' InceptionResNetV2") from None

    # Mixed_5b, and the stem: everything from the image to Mixed_5b's input.
    mixed_5b, stem_out = _branch_vars(layer("mixed_5b"), f"{scope}/Mixed_5b", data_format)
    stem = list(reversed(_ancestry(stem_out)))
    if not isinstance(_producer(stem[0]), keras.layers.InputLayer):
        raise ValueError("the stem does not start at the model input")
    units = _units(stem[1:], data_format, f"{scope} stem")
    for unit, name in zip(units, _slim_names(units, _spatial(stem[0], data_format), branch=False)):
        if unit.kind == "Conv2d":
            add(_conv_bn_vars(f"{scope}/{name}", unit))
    add(mixed_5b)

    # The Inception-ResNet blocks, with the reductions between them, in network order.
    for block, slim_block in _block_scopes():
        reduction = _REDUCTION_BEFORE.get(block)
        if reduction:
            add(_branch_vars(layer(reduction), f"{scope}/{_REDUCTIONS[reduction]}", data_format)[0])
        add(_branch_vars(layer(f"{block}_mixed"), f"{scope}/{slim_block}", data_format)[0])
        add(_up_conv_vars(model, block, f"{scope}/{slim_block}"))

    (conv_7b,) = _units([layer("conv_7b").output, layer("conv_7b_bn").output], data_format, "conv_7b")
    add(_conv_bn_vars(f"{scope}/Conv2d_7b_1x1", conv_7b))
    logits = layer("predictions")
    add({f"{scope}/Logits/Logits/weights": logits.kernel, f"{scope}/Logits/Logits/biases": logits.bias})

    mapped = {id(v) for v in out.values()}
    if len(mapped) != len(out):
        raise ValueError("a Keras variable is mapped to two slim names")
    unmapped = [v.path for v in model.weights if id(v) not in mapped]
    if unmapped or len(model.weights) != len(out):
        raise ValueError(f"Keras variables with no slim name: {unmapped[:10]} ({len(unmapped)} in all)")
    return out


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _is_skipped(name: str) -> bool:
    return name in SLIM_SKIP_NAMES or name.startswith(SLIM_SKIP_PREFIXES)


def _listing(names: Sequence[str], limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_slim_checkpoint(model: keras.Model, path: str) -> Dict[str, Any]:
    """Assign the TF-slim checkpoint at `path` (V1 file or V2 prefix) to `model`, all or nothing.

    Every checkpoint tensor must be used exactly once or be one of the known skips (AuxLogits,
    global_step), and every model variable must be assigned: anything else raises, naming the
    variables, before a single value is assigned. Returns {"assigned", "skipped", "path"}.
    """
    import tensorflow as tf

    reader = tf.train.load_checkpoint(path)
    return assign_slim_tensors(model, reader.get_variable_to_shape_map(), reader.get_tensor, path)


def assign_slim_tensors(model: keras.Model, shapes: Mapping[str, Sequence[int]], get, path: str) -> Dict[str, Any]:
    """Assign slim-named tensors (`shapes`: name -> shape, `get(name)` -> array) to `model`, all or nothing.

    The one check for every source (a checkpoint read by TensorFlow, its `.npz` conversion): see
    `load_slim_checkpoint`.
    """
    import numpy as np

    targets = slim_variable_map(model)
    skipped = sorted(n for n in shapes if _is_skipped(n))
    missing = sorted(set(targets) - set(shapes))
    unexpected = sorted(n for n in shapes if n not in targets and not _is_skipped(n))
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        problems.append(f"in the checkpoint but not in the model (and not a known skip): {_listing(unexpected)}")
    for name in sorted(set(targets) & set(shapes)):
        want, got = tuple(targets[name].shape), tuple(shapes[name])
        if want != got:
            problems.append(f"{name}: checkpoint shape {got}, model expects {want}")
    if problems:
        raise ValueError(f"{path} does not fit Inception-ResNet-v2: " + "; ".join(problems))

    values = {}
    for name, var in targets.items():
        value = get(name)
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{path}: {name} has dtype {value.dtype}, expected a float tensor")
        values[name] = value
    for name, var in targets.items():
        var.assign(values[name].astype(var.dtype, copy=False))
    return {"assigned": len(values), "skipped": skipped, "path": path}


# ----------------------------------------------------------------------------------------------
# The backend-neutral form of a slim checkpoint: JAX and PyTorch workers need no TensorFlow

_LOGITS_BIASES = f"{SLIM_SCOPE}/Logits/Logits/biases"
NEUTRAL_CACHE_ENV = "IMAGEBEAM_CACHE"


def _read_npz(path: str) -> Dict[str, Any]:
    """All arrays of a `.npz` weights file (no pickles: np.load(allow_pickle=False))."""
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def _assign_arrays(model: keras.Model, arrays: Mapping[str, Any], path: str) -> Dict[str, Any]:
    """`assign_slim_tensors` from slim-named arrays in memory (a `.npz` read by `_read_npz`)."""
    return assign_slim_tensors(model, {n: a.shape for n, a in arrays.items()}, arrays.__getitem__, path)


def _npz_classes_of(arrays: Mapping[str, Any], where: str = "these weights") -> int:
    """Logits size from the slim logits bias: a dict of arrays, or an open np.load (reads that array only)."""
    if _LOGITS_BIASES not in arrays:
        raise ValueError(f"no {_LOGITS_BIASES} in {where}: not a converted Inception-ResNet-v2 checkpoint")
    return int(arrays[_LOGITS_BIASES].shape[0])


def _npz_classes(path: str) -> int:
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        return _npz_classes_of(data, path)


def convert_slim_checkpoint(checkpoint: str, out: str) -> str:
    """Write the TF-slim checkpoint's tensors (the known skips left out) as float32 arrays in `out` (.npz).

    Needs TensorFlow to read the checkpoint, once; the result loads on any Keras backend
    (`--inception-weights out.npz`), checked tensor by tensor like the checkpoint itself.
    """
    import numpy as np
    import tensorflow as tf

    from imagebeam.transforms.bookkeeping.fileutil import write_with

    reader = tf.train.load_checkpoint(checkpoint)
    arrays = {}
    for name in sorted(reader.get_variable_to_shape_map()):
        if _is_skipped(name):
            continue
        value = reader.get_tensor(name)
        if not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{checkpoint}: {name} has dtype {value.dtype}, expected a float tensor")
        arrays[name] = value.astype(np.float32, copy=False)
    _npz_classes_of(arrays)
    return write_with(out, lambda f: np.savez(f, **arrays))


def _checkpoint_key(checkpoint: str) -> str:
    """A short hash of the checkpoint's files (names, sizes, modification times): a new file, a new key."""
    import hashlib

    from apache_beam.io.filesystems import FileSystems

    base = checkpoint[: -len(".index")] if checkpoint.endswith(".index") else checkpoint
    found = []
    for pattern in (base, base + ".*"):
        for match in FileSystems.match([pattern])[0].metadata_list:
            found.append((os.path.basename(match.path), match.size_in_bytes, getattr(match, "last_updated_in_seconds", 0)))
    digest = hashlib.sha256(repr((os.path.abspath(base) if not _is_remote(base) else base, sorted(found))).encode())
    return digest.hexdigest()[:16]


def neutral_weights(checkpoint: str, cache_dir: Optional[str] = None) -> str:
    """The cached `.npz` conversion of a TF-slim checkpoint, made on first use (TensorFlow needed then only).

    Cached under `$IMAGEBEAM_CACHE` (default ~/.cache/imagebeam)/inception/, keyed by the checkpoint's
    files, so every later run on this machine, on any backend, reuses it.
    """
    folder = cache_dir or os.path.join(
        os.environ.get(NEUTRAL_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "imagebeam"), "inception")
    stem = os.path.basename(checkpoint.rstrip("/")) or "checkpoint"
    path = os.path.join(folder, f"{stem}-{_checkpoint_key(checkpoint)}.npz")
    if os.path.isfile(path):
        return path
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:
        raise RuntimeError(
            f"{checkpoint} is a TF-slim checkpoint and TensorFlow, which reads it, is not installed here: convert it "
            f"once where TensorFlow is (`imagebeam convert-weights {checkpoint} inception.npz`) and pass "
            "--inception-weights inception.npz")
    os.makedirs(folder, exist_ok=True)
    log.info("converting %s to %s (once; reused by later runs)", checkpoint, path)
    return convert_slim_checkpoint(checkpoint, path)


def _write_checkpoint(tensors: Mapping[str, Any], prefix: str) -> str:
    """Write a name-based (TF1-style, V2 format) checkpoint: `prefix.index` + `prefix.data-*`."""
    import tensorflow as tf

    directory = os.path.dirname(prefix)
    if directory:
        tf.io.gfile.makedirs(directory)
    names = sorted(tensors)
    tf.raw_ops.SaveV2(
        prefix=prefix,
        tensor_names=names,
        shape_and_slices=[""] * len(names),
        tensors=[tf.convert_to_tensor(tensors[n]) for n in names],
    )
    return prefix


def export_slim_checkpoint(model: keras.Model, prefix: str, extra: Optional[Mapping[str, Any]] = None) -> str:
    """Save `model`'s weights under TF-slim names, readable by `tf.train.load_checkpoint(prefix)`.

    Converts Keras-trained weights into the reference's checkpoint layout (and gives tests a real
    checkpoint). `extra` adds tensors as they are (e.g. AuxLogits). Returns the prefix.
    """
    import keras

    tensors = {name: keras.ops.convert_to_numpy(var.value) for name, var in slim_variable_map(model).items()}
    for name, value in (extra or {}).items():
        if name in tensors:
            raise ValueError(f"extra tensor {name} clashes with a model variable")
        tensors[name] = value
    return _write_checkpoint(tensors, prefix)
