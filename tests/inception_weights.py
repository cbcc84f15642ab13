"""Test helper: Inception weights that expose mapping errors (imported by test_inception and test_backends)."""
import numpy as np


def randomise_offsets(model, seed: int) -> None:
    """Give every BN offset and statistic and every bias a random value (they are 0/1 in a "random" model),
    so a checkpoint made from the model exposes any BN or bias mapping error."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.beta.shape[0]
            layer.beta.assign(rng.normal(0.0, 0.2, n).astype(np.float32))
            layer.moving_mean.assign(rng.normal(0.0, 0.2, n).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype(np.float32))
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)) and layer.use_bias:
            layer.bias.assign(rng.normal(0.0, 0.1, layer.bias.shape).astype(np.float32))
