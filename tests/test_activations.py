"""Every activation string tf_keras has, as an Activation layer and fused into a Dense, exports
integer and agrees with Keras. Exception, measured: the TF 2.21 converter leaves ELU in float
(DEQUANTIZE, ELU, QUANTIZE) although the rest of the model is integer."""
import inspect

import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras
from keras_qx.rewrite.flatten import flatten_nested

pytestmark = pytest.mark.slow
L = keras.layers
ACTIVATIONS = sorted(name for name, fn in inspect.getmembers(keras.activations, inspect.isfunction)
                     if name not in ("get", "serialize", "deserialize")) + ["log_softmax", "silu"]
FLOAT_IN_TFLITE = {"elu"}


def test_list_is_complete():
    assert {"gelu", "mish", "swish", "softmax", "hard_sigmoid", "selu", "relu", "exponential"} <= set(ACTIVATIONS)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_exports_integer_and_agrees(name, rng):
    inputs = keras.Input((8,))
    x = L.Dense(16, activation=name, name="fused")(inputs)
    x = L.Activation(name, name="act")(L.Dense(16, name="d2")(x))
    model = keras.Model(inputs, L.Dense(3, name="head")(x))
    flat = flatten_nested(model)
    x_train = rng.normal(size=(64, 8)).astype("float32")
    np.testing.assert_allclose(flat.predict(x_train, verbose=0), model.predict(x_train, verbose=0), rtol=1e-5, atol=1e-6)
    qat = qx.quantize(model)
    qat.compile("adam", "mse")
    qat.fit(x_train, rng.random((64, 3)), epochs=2, verbose=0)
    tfl = qx.export_tflite(qat, x_train, min_agreement=0.0)
    info = tfl.report.info
    expected = {"ELU"} if name in FLOAT_IN_TFLITE else set()
    assert set(info.float_ops) == expected, info.ops
    assert "FULLY_CONNECTED" not in info.float_ops
    assert tfl.report.mean_error_steps < 2.0 and tfl.report.max_error_steps <= 8, tfl.report.lines()


@pytest.mark.parametrize("name", ["sigmoid", "softmax", "tanh"])
def test_fixed_grid_activations_match_tflite_exactly(name, rng):
    """sigmoid, softmax and tanh train on the fixed output grids of TFLite's int8 kernels, so the
    file's output equals the Keras QAT model's wherever the pre-activation rounds the same (measured:
    one output value in ~1,000 differs, by 2-4 steps, where the Dense's int8 rounding differs)."""
    inputs = keras.Input((8,))
    model = keras.Model(inputs, L.Activation(name, name="act")(L.Dense(16, name="d")(inputs)))
    x_train = rng.normal(size=(128, 8)).astype("float32")
    qat = qx.quantize(model)
    qat.compile("adam", "mse")
    qat.fit(x_train, rng.random((128, 16)), epochs=2, verbose=0)
    report = qx.export_tflite(qat, x_train).report
    assert report.mean_error_steps < 0.01 and report.max_error_steps <= 4, report.lines()
