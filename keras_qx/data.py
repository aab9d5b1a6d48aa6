"""The embedded default: scikit-learn's digits (1,797 8x8 images, no download) and a small CNN."""
from __future__ import annotations

import numpy as np

from keras_qx._compat import keras, seeded

__all__ = ["load_digits", "digits_cnn"]


def load_digits(test_fraction: float = 0.25, seed: int = 0):
    """``(x_train, y_train), (x_test, y_test)``: float32 images in [0, 1] shaped (n, 8, 8, 1)."""
    from sklearn.datasets import load_digits as _load

    data = _load()
    x = (data.images / 16.0).astype("float32")[..., None]
    y = data.target.astype("int64")
    idx = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = idx[:n_test], idx[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def digits_cnn(filters: int = 32, dense: int = 128, seed: int = 0):
    """Conv-BN-ReLU, Conv, pool, Dense, Dense: the digits CNN of the README and the demo.

    The weights are initialised from ``seed``; the caller's random state is left as it was.
    """
    with seeded(seed):
        inputs = keras.Input((8, 8, 1), name="image")
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name="conv1")(inputs)
        x = keras.layers.BatchNormalization(name="bn1")(x)
        x = keras.layers.ReLU(name="relu1")(x)
        x = keras.layers.Conv2D(2 * filters, 3, padding="same", activation="relu", name="conv2")(x)
        x = keras.layers.MaxPooling2D(2, name="pool")(x)
        x = keras.layers.Flatten(name="flatten")(x)
        x = keras.layers.Dense(dense, activation="relu", name="fc1")(x)
        outputs = keras.layers.Dense(10, name="logits")(x)
        return keras.Model(inputs, outputs, name="digits_cnn")
