"""Raw TF calls in functional models (TFOpLambda) are rewritten into TFOp layers and quantized."""
import json

import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras, tf
from keras_qx.rewrite.flatten import flatten_nested
from keras_qx.rewrite.tfop import TFOp
from tests.conftest import train_and_export


def _hard_swish_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    hs = keras.layers.ReLU(6.0)(x + 3.0) * (1.0 / 6.0)      # MobileNetV3's hard sigmoid
    x = keras.layers.Multiply()([x, hs])
    x = x[:, 1:, :, :]                                       # SlicingOpLambda
    x = tf.math.subtract(x, keras.layers.Conv2D(4, 1, name="conv_b")(x))
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(keras.layers.Flatten()(x)))


def test_rewrite_same_outputs_and_serializable(rng):
    model = _hard_swish_model()
    assert any(type(l).__name__ == "TFOpLambda" for l in model.layers)
    flat = flatten_nested(model)
    ops = [l for l in flat.layers if isinstance(l, TFOp)]
    assert {o.symbol for o in ops} == {"__operators__.add", "math.multiply", "__operators__.getitem", "math.subtract"}
    x = rng.random((4, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(flat.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    for op in ops:
        config = json.loads(json.dumps(op.get_config()))
        assert TFOp.from_config(config).template == op.template


@pytest.mark.slow
def test_tf_ops_quantize_and_export_fully_integer(rng, tmp_path):
    qat, tfl, x = train_and_export(_hard_swish_model(), rng, min_agreement=0.8)
    assert tfl.report.info.fully_integer, tfl.report.info.ops
    assert tfl.report.mean_error_steps < 1.5
    qat.save(tmp_path / "m.keras")  # TFOp layers round-trip through the .keras format
    loaded = qx.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.predict(x[:8], verbose=0), qat.predict(x[:8], verbose=0))
