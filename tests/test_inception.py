"""Inception-ResNet-v2 embedding: TF-slim name mapping, checkpoint round trips, weight kinds, precision.

The full model is built only a handful of times (module-scoped fixtures): each build takes seconds and
each forward pass of two 299x299 photos about a second on two CPU cores.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from inception_weights import randomise_offsets

from imagebeam.transforms.model import inception

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

SLIM = "InceptionResnetV2"


# ------------------------------------------------------------------------------------------------
# The slim variable names, written out from the architecture (independently of the module's walk)

_BLOCK_CONVS = {
    "block35": [
        "Branch_0/Conv2d_1x1",
        "Branch_1/Conv2d_0a_1x1", "Branch_1/Conv2d_0b_3x3",
        "Branch_2/Conv2d_0a_1x1", "Branch_2/Conv2d_0b_3x3", "Branch_2/Conv2d_0c_3x3",
    ],
    "block17": [
        "Branch_0/Conv2d_1x1",
        "Branch_1/Conv2d_0a_1x1", "Branch_1/Conv2d_0b_1x7", "Branch_1/Conv2d_0c_7x1",
    ],
    "block8": [
        "Branch_0/Conv2d_1x1",
        "Branch_1/Conv2d_0a_1x1", "Branch_1/Conv2d_0b_1x3", "Branch_1/Conv2d_0c_3x1",
    ],
}


def slim_scopes():
    """(scope, has_batchnorm) for every slim conv/fc layer, in the order slim's network defines them."""
    bn = []
    bn += ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    bn += [f"Mixed_5b/{c}" for c in (
        "Branch_0/Conv2d_1x1",
        "Branch_1/Conv2d_0a_1x1", "Branch_1/Conv2d_0b_5x5",
        "Branch_2/Conv2d_0a_1x1", "Branch_2/Conv2d_0b_3x3", "Branch_2/Conv2d_0c_3x3",
        "Branch_3/Conv2d_0b_1x1",
    )]
    out = [(s, True) for s in bn]

    def blocks(repeat, block, count):
        for k in range(1, count + 1):
            scope = f"{repeat}/{block}_{k}"
            out.extend((f"{scope}/{c}", True) for c in _BLOCK_CONVS[block])
            out.append((f"{scope}/Conv2d_1x1", False))

    blocks("Repeat", "block35", 10)
    out += [(f"Mixed_6a/{c}", True) for c in (
        "Branch_0/Conv2d_1a_3x3",
        "Branch_1/Conv2d_0a_1x1", "Branch_1/Conv2d_0b_3x3", "Branch_1/Conv2d_1a_3x3",
    )]
    blocks("Repeat_1", "block17", 20)
    out += [(f"Mixed_7a/{c}", True) for c in (
        "Branch_0/Conv2d_0a_1x1", "Branch_0/Conv2d_1a_3x3",
        "Branch_1/Conv2d_0a_1x1", "Branch_1/Conv2d_1a_3x3",
        "Branch_2/Conv2d_0a_1x1", "Branch_2/Conv2d_0b_3x3", "Branch_2/Conv2d_1a_3x3",
    )]
    blocks("Repeat_2", "block8", 9)
    out += [(f"Block8/{c}", True) for c in _BLOCK_CONVS["block8"]] + [("Block8/Conv2d_1x1", False)]
    out += [("Conv2d_7b_1x1", True), ("Logits/Logits", False)]
    return [(f"{SLIM}/{s}", has_bn) for s, has_bn in out]


def expected_slim_names():
    names = []
    for scope, has_bn in slim_scopes():
        names.append(f"{scope}/weights")
        if has_bn:
            names += [f"{scope}/BatchNorm/{v}" for v in ("beta", "moving_mean", "moving_variance")]
        else:
            names.append(f"{scope}/biases")
    return names


# ------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def photos():
    """Two real photos, 299x299, scaled to [-1, 1] like the koalarization input."""
    from skimage import data

    out = []
    for img in (data.astronaut(), data.chelsea()):
        arr = np.asarray(Image.fromarray(img).convert("RGB").resize((299, 299), Image.Resampling.BILINEAR))
        out.append(2.0 * arr.astype(np.float32) / 255.0 - 1.0)
    return np.stack(out)


def run(model, x):
    return np.asarray(model(x, training=False))


def close(actual, expected, rel):
    """Equal up to `rel` times the output's scale (random-weight logits can be tiny or large)."""
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rel * scale)


@pytest.fixture(scope="module")
def random_model():
    return inception.build_model("random")


@pytest.fixture(scope="module")
def random_out(random_model, photos):
    return run(random_model, photos)


@pytest.fixture(scope="module")
def source(photos):
    """A second "random" model (its plain output kept), then with every BN statistic, BN offset and bias
    randomised too, so a checkpoint made from it exposes any BN or bias mapping error."""
    model = inception.build_model("random")
    plain = run(model, photos)
    randomise_offsets(model, seed=1)
    tensors = {name: np.array(var.numpy()) for name, var in inception.slim_variable_map(model).items()}
    return {"model": model, "plain": plain, "out": run(model, photos), "tensors": tensors}


AUX = {
    f"{SLIM}/AuxLogits/Conv2d_1b_1x1/weights": np.ones((1, 1, 1088, 128), np.float32),
    f"{SLIM}/AuxLogits/Conv2d_1b_1x1/BatchNorm/beta": np.zeros(128, np.float32),
    f"{SLIM}/AuxLogits/Logits/weights": np.ones((768, 1001), np.float32),
    f"{SLIM}/AuxLogits/Logits/biases": np.zeros(1001, np.float32),
    "global_step": np.array(123456, np.int64),
}


def save_v2(tensors, prefix):
    """A name-based checkpoint written with the raw op, independently of export_slim_checkpoint."""
    names = sorted(tensors)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(tensors[n]) for n in names])
    return prefix


def remove_checkpoint(path):
    """The checkpoints are ~220 MB: don't leave them in pytest's kept temp dirs."""
    folder, base = os.path.split(path)
    for name in os.listdir(folder):
        if name.startswith(base):
            os.remove(os.path.join(folder, name))


# ------------------------------------------------------------------------------------------------
# The variable map


def test_slim_names_match_the_architecture(random_model):
    mapping = inception.slim_variable_map(random_model)
    expected = expected_slim_names()
    assert len(expected) == len(set(expected)) == 898
    assert set(mapping) - set(expected) == set(), "names the slim checkpoint does not have"
    assert set(expected) - set(mapping) == set(), "slim names with no Keras variable"
    # Every Keras variable exactly once.
    assert len(random_model.weights) == len(mapping)
    assert {id(v) for v in mapping.values()} == {id(v) for v in random_model.weights}
    assert sorted(v.path for v in mapping.values()) == sorted(v.path for v in random_model.weights)


def test_slim_map_kinds_and_shapes(random_model):
    mapping = inception.slim_variable_map(random_model)
    leaf_to_keras = {"weights": "kernel", "biases": "bias", "beta": "beta",
                     "moving_mean": "moving_mean", "moving_variance": "moving_variance"}
    for name, var in mapping.items():
        assert var.path.rsplit("/", 1)[1] == leaf_to_keras[name.rsplit("/", 1)[1]], (name, var.path)
        m = re.search(r"_(\d)x(\d)/weights$", name)
        if m:  # the kernel size in the slim name is the kernel's spatial shape (1x7 vs 7x1 ...)
            assert tuple(var.shape[:2]) == (int(m.group(1)), int(m.group(2))), (name, var.shape)
    assert tuple(mapping[f"{SLIM}/Logits/Logits/weights"].shape) == (1536, 1001)
    assert tuple(mapping[f"{SLIM}/Conv2d_1a_3x3/weights"].shape) == (3, 3, 3, 32)
    assert tuple(mapping[f"{SLIM}/Mixed_5b/Branch_1/Conv2d_0b_5x5/weights"].shape) == (5, 5, 48, 64)
    assert tuple(mapping[f"{SLIM}/Repeat/block35_1/Conv2d_1x1/weights"].shape) == (1, 1, 128, 320)
    assert tuple(mapping[f"{SLIM}/Mixed_7a/Branch_2/Conv2d_0b_3x3/weights"].shape) == (3, 3, 256, 288)
    assert tuple(mapping[f"{SLIM}/Block8/Conv2d_1x1/biases"].shape) == (2080,)


def test_slim_map_follows_network_order(random_model):
    """Same-shaped branches (block35's three 320->32 1x1 convs) can only be told apart by order.

    Keras builds the layers in the order slim defines its scopes, and names unnamed layers with a
    counter (conv2d_<n>, batch_normalization_<n>): that numbering is an independent oracle here (the
    module itself never reads it). Named layers (the up-projections, conv_7b) are left out.
    """
    mapping = inception.slim_variable_map(random_model)

    def number(path):
        m = re.fullmatch(r"([a-z0-9_]+?)(?:_(\d+))?/\w+", path)
        return m.group(1), int(m.group(2) or 0)

    conv_numbers, offsets = [], set()
    for scope, has_bn in slim_scopes():
        kind, n = number(mapping[f"{scope}/weights"].path)
        if kind != "conv2d":
            continue
        assert has_bn
        conv_numbers.append(n)
        for v in ("beta", "moving_mean", "moving_variance"):
            bn_kind, bn_n = number(mapping[f"{scope}/BatchNorm/{v}"].path)
            assert bn_kind == "batch_normalization"
            offsets.add(n - bn_n)
    assert len(conv_numbers) == 5 + 7 + 10 * 6 + 4 + 20 * 4 + 7 + 10 * 4
    assert conv_numbers == sorted(conv_numbers) and len(set(conv_numbers)) == len(conv_numbers)
    assert len(offsets) == 1, "a BatchNorm mapped to another conv's scope"


# ------------------------------------------------------------------------------------------------
# Checkpoints


def test_slim_checkpoint_round_trip(source, photos, tmp_path):
    assert not np.allclose(source["out"], source["plain"]), "the BN/bias perturbation changed nothing"
    prefix = inception.export_slim_checkpoint(source["model"], str(tmp_path / "ckpt" / "model.ckpt"), extra=AUX)
    try:
        assert inception.weights_kind(prefix) == "slim"
        assert inception.embedding_size(prefix) == 1001
        names = set(tf.train.load_checkpoint(prefix).get_variable_to_shape_map())
        assert names == set(expected_slim_names()) | set(AUX)

        model = inception.build_model(prefix)  # a fresh build: Keras' own random init before loading
        out = run(model, photos)
        assert out.shape == (2, 1001) and out.dtype == np.float32
        close(out, source["out"], 1e-6)
    finally:
        remove_checkpoint(prefix)

    # The V1 single-file format of inception_resnet_v2_2016_08_30.ckpt loads the same way.
    v1 = str(tmp_path / "inception_resnet_v2_2016_08_30.ckpt")
    tensors = dict(source["tensors"], **AUX)
    names = sorted(tensors)
    tf.raw_ops.Save(filename=v1, tensor_names=names, data=[tf.constant(tensors[n]) for n in names])
    try:
        assert inception.weights_kind(v1) == "slim"
        for var in model.weights:
            var.assign(np.zeros(var.shape, np.float32))
        report = inception.load_slim_checkpoint(model, v1)
        assert report["assigned"] == 898
        assert sorted(report["skipped"]) == sorted(AUX)
        close(run(model, photos), source["out"], 1e-6)
    finally:
        os.remove(v1)


def _first_kernel(model):
    return np.array(inception.slim_variable_map(model)[f"{SLIM}/Conv2d_1a_3x3/weights"].numpy())


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_bad_checkpoints_fail_naming_the_variable(case, source, random_model, tmp_path):
    tensors = dict(source["tensors"], **AUX)
    victim = f"{SLIM}/Repeat_1/block17_7/Branch_1/Conv2d_0b_1x7/weights"
    if case == "missing":
        del tensors[victim]
        named = victim
    elif case == "unexpected":
        named = f"{SLIM}/Mixed_6a/Branch_1/Conv2d_0b_3x3/BatchNorm/gamma"
        tensors[named] = np.ones(256, np.float32)
    else:
        tensors[victim] = np.zeros((7, 1, 128, 160), np.float32)
        named = victim
    prefix = save_v2(tensors, str(tmp_path / "bad.ckpt"))
    before = _first_kernel(random_model)
    try:
        with pytest.raises(ValueError) as err:
            inception.load_slim_checkpoint(random_model, prefix)
    finally:
        remove_checkpoint(prefix)
    message = str(err.value)
    assert named in message
    assert "AuxLogits" not in message and "global_step" not in message  # known skips are not errors
    if case == "shape":
        assert "(7, 1, 128, 160)" in message and "(1, 7, 128, 160)" in message
    np.testing.assert_array_equal(_first_kernel(random_model), before)  # nothing assigned


# ------------------------------------------------------------------------------------------------
# Other weight kinds


def test_random_weights_repeat(random_out, source):
    assert random_out.shape == (2, 1001) and random_out.dtype == np.float32
    assert np.all(np.isfinite(random_out)) and np.abs(random_out).max() > 0
    assert not np.allclose(random_out[0], random_out[1])
    np.testing.assert_array_equal(source["plain"], random_out)  # two "random" builds: same weights


def test_random_weights_warn_loudly(caplog, monkeypatch):
    # Only the warning is checked here: stub the build itself.
    monkeypatch.setattr(inception, "_keras_model", lambda classes, weights=None: keras.Sequential([]))
    monkeypatch.setattr(inception, "_randomise", lambda model: None)
    monkeypatch.setattr(inception, "_float32_output", lambda model: model)
    with caplog.at_level("WARNING", logger=inception.__name__):
        inception.build_model("random")
    assert any(r.levelname == "WARNING" and "RANDOM" in r.getMessage() and "meaningless" in r.getMessage()
               for r in caplog.records)


def test_keras_weights_file(random_model, random_out, photos, tmp_path):
    path = str(tmp_path / "w.weights.h5")
    random_model.save_weights(path)
    try:
        assert inception.weights_kind(path) == "keras"
        assert inception.embedding_size(path) == 1001
        model = inception.build_model(path)
        np.testing.assert_array_equal(run(model, photos), random_out)
    finally:
        os.remove(path)


def test_keras_model_file(random_model, random_out, photos, tmp_path):
    """A whole saved model (.keras): its weights go into a freshly built logits model, here mixed_float16."""
    path = str(tmp_path / "m.keras")
    random_model.save(path)
    try:
        assert inception.weights_kind(path) == "keras"
        assert inception.embedding_size(path) == 1001
        model = inception.build_model(path, precision="mixed_float16")
        out = run(model, photos)
        assert out.dtype == np.float32
        close(out, random_out, 1e-2)
    finally:
        os.remove(path)


def test_h5_classes_from_the_file_layout(tmp_path):
    """Both .h5 layouts give the logits size: legacy Keras 2 (Keras' ImageNet file) and Keras 3."""
    import h5py

    legacy = str(tmp_path / "legacy.h5")
    with h5py.File(legacy, "w") as f:
        f.create_dataset("conv_7b/conv_7b/kernel:0", shape=(1, 1, 2080, 1536), dtype="f4")
        f.create_dataset("predictions/predictions/kernel:0", shape=(1536, 1000), dtype="f4")
        f.create_dataset("predictions/predictions/bias:0", shape=(1000,), dtype="f4")
    assert inception.embedding_size(legacy) == 1000
    assert inception.embedding_size("file://" + legacy) == 1000  # remote paths go through a local copy

    odd = str(tmp_path / "odd.weights.h5")
    with h5py.File(odd, "w") as f:
        f.create_dataset("layers/dense/vars/0", shape=(1536, 10), dtype="f4")
    with pytest.raises(ValueError, match="10 logits"):
        inception.embedding_size(odd)

    other = str(tmp_path / "other.weights.h5")
    with h5py.File(other, "w") as f:
        f.create_dataset("layers/dense/vars/0", shape=(2048, 1000), dtype="f4")
    with pytest.raises(ValueError, match="classifier kernel"):
        inception.embedding_size(other)


def test_imagenet_offline_error_names_the_cache(monkeypatch):
    from keras.src.utils import file_utils

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: Name or service not known")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(RuntimeError) as err:
        inception.build_model("imagenet", precision="mixed_float16")
    message = str(err.value)
    assert os.path.join("models", "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels.h5") in message
    assert "URL fetch failure" in message and "random" in message
    assert keras.config.dtype_policy().name == "float32"


# ------------------------------------------------------------------------------------------------
# weights_kind / embedding_size (no TensorFlow needed)


def test_weights_kind(tmp_path):
    def touch(name):
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
        return str(p)

    assert inception.weights_kind("imagenet") == "imagenet"
    assert inception.weights_kind("random") == "random"
    for name in ("a.h5", "b.weights.h5", "c.keras"):
        assert inception.weights_kind(touch(name)) == "keras"
    assert inception.weights_kind(touch("inception_resnet_v2_2016_08_30.ckpt")) == "slim"  # V1 file
    touch("train/model.ckpt-1000.index")
    touch("train/model.ckpt-1000.data-00000-of-00001")
    assert inception.weights_kind(str(tmp_path / "train" / "model.ckpt-1000")) == "slim"  # V2 prefix
    assert inception.weights_kind("gs://bucket/weights/inception_resnet_v2_2016_08_30.ckpt") == "slim"
    assert inception.weights_kind("gs://bucket/weights/w.weights.h5") == "keras"

    bad = [
        str(tmp_path / "nowhere.ckpt"),
        str(tmp_path / "nowhere.h5"),
        str(tmp_path / "nothing"),
        touch("notes.txt"),
        str(tmp_path / "train" / "model.ckpt-1000.index"),
        "Imagenet",
        "",
    ]
    for value in bad:
        with pytest.raises(ValueError, match="inception-weights"):
            inception.weights_kind(value)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "train" / "model.ckpt-1000'"))):
        inception.weights_kind(str(tmp_path / "train" / "model.ckpt-1000.index"))  # hints the prefix


def test_embedding_sizes():
    assert inception.embedding_size("random") == inception.EMBEDDING_SIZE_SLIM == 1001
    assert inception.embedding_size("imagenet") == inception.EMBEDDING_SIZE_KERAS == 1000


def test_weights_kind_does_not_import_tensorflow(tmp_path):
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"x")
    code = (
        "import sys\n"
        "from imagebeam.transforms.model import inception as m\n"
        f"assert m.weights_kind({str(ckpt)!r}) == 'slim'\n"
        "assert m.embedding_size('random') == 1001 and m.embedding_size('imagenet') == 1000\n"
        "bad = [n for n in ('tensorflow', 'keras') if n in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_configure_gpus_without_gpus():
    inception.configure_gpus()  # a no-op on this CPU-only machine, and safe to repeat
    inception.configure_gpus()


# ------------------------------------------------------------------------------------------------
# Precision


@pytest.mark.parametrize("precision, compute, rel", [("mixed_float16", "float16", 1e-2),
                                                     ("bfloat16", "bfloat16", 5e-2)])
def test_reduced_precision(precision, compute, rel, random_out, photos):
    model = inception.build_model("random", precision=precision)
    assert keras.config.dtype_policy().name == "float32", "the global policy leaked"
    conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    assert conv.compute_dtype == compute  # really runs in reduced precision
    assert {v.dtype for v in model.weights} == {"float32"}
    assert len(inception.slim_variable_map(model)) == 898
    out = run(model, photos)
    assert out.shape == (2, 1001) and out.dtype == np.float32
    close(out, random_out, rel)
    # Not just within tolerance by luck of scale: the error is far below the spread between images.
    assert np.abs(out - random_out).max() < 0.25 * np.abs(random_out[0] - random_out[1]).max()


def test_unknown_precision():
    with pytest.raises(ValueError, match="precision"):
        inception.build_model("random", precision="float8")
    assert keras.config.dtype_policy().name == "float32"
