import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest

from keras_qx._compat import keras


@pytest.fixture(autouse=True, scope="session")
def _latency_cache(tmp_path_factory):
    """Latency tables measured by the tests go to a scratch cache, not the user's ~/.cache."""
    path = str(tmp_path_factory.mktemp("keras_qx_cache") / "latency.json")
    old = os.environ.get("KERAS_QX_CACHE")
    os.environ["KERAS_QX_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("KERAS_QX_CACHE", None)
    else:
        os.environ["KERAS_QX_CACHE"] = old


@pytest.fixture(autouse=True)
def _fresh_keras():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()


@pytest.fixture(scope="session")
def digits():
    from keras_qx.data import load_digits

    return load_digits()


def compile_classifier(model, lr=1e-3):
    model.compile(keras.optimizers.Adam(lr),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


@pytest.fixture(scope="session")
def trained_cnn(digits):
    """The README's digits CNN, trained briefly (shared by the slow tests; do not mutate)."""
    from keras_qx.data import digits_cnn

    (x, y), _ = digits
    keras.utils.set_random_seed(0)
    model = compile_classifier(digits_cnn(filters=16, dense=64))
    model.fit(x, y, epochs=8, batch_size=64, verbose=0)
    return model


def tiny_model(name="tiny"):
    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dense(8, activation="relu", name="fc")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x), name=name)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def train_and_export(model, rng, min_agreement=0.8, samples=64, epochs=2):
    """Quantize (uniform 8-bit), fit on random data (mse), export: ``(qat, tflite, x)``."""
    import keras_qx as qx

    qat = qx.quantize(model)
    x = rng.random((samples, *model.input_shape[1:])).astype("float32")
    qat.compile("adam", "mse")
    qat.fit(x, rng.random((samples, *model.output_shape[1:])), epochs=epochs, verbose=0)
    return qat, qx.export_tflite(qat, x, min_agreement=min_agreement), x
