"""Nested models are inlined: same outputs, shared weights, inner layers quantized by name."""
import numpy as np

import keras_qx as qx
from keras_qx._compat import keras
from keras_qx.rewrite.flatten import flatten_nested, has_nested


def _nested_model():
    inner_in = keras.Input((6,))
    h = keras.layers.Dense(5, activation="relu", name="inner_fc")(inner_in)
    inner = keras.Model(inner_in, keras.layers.Dense(4, name="inner_out")(h), name="backbone")
    stem = keras.Sequential([keras.layers.Dense(6, name="stem_fc"), keras.layers.ReLU(name="stem_relu")], name="stem")
    inputs = keras.Input((3,))
    x = inner(stem(inputs))
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


def test_flatten_same_outputs_and_shared_weights(rng):
    model = _nested_model()
    x = rng.random((8, 3)).astype("float32")
    flat = flatten_nested(model)
    assert has_nested(model) and not has_nested(flat)
    assert [l.name for l in flat.layers if not isinstance(l, keras.layers.InputLayer)] == [
        "stem_fc", "stem_relu", "inner_fc", "inner_out", "head"]
    np.testing.assert_allclose(flat.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    assert flat.get_layer("inner_fc") is model.get_layer("backbone").get_layer("inner_fc")


def test_quantize_nested_model_by_inner_names(rng):
    model = _nested_model()
    qat = qx.quantize(model, {"layers": {"inner_fc": {"weight_bits": 4}}})
    bits = {l.layer.name: l.quantize_config.weight_bits for l in qat.layers
            if hasattr(getattr(l, "quantize_config", None), "weight_quantizer")}
    assert bits == {"stem_fc": 8, "inner_fc": 4, "inner_out": 8, "head": 8}
    x = rng.random((64, 3)).astype("float32")
    qat.compile("adam", "mse")
    qat.fit(x, np.zeros((64, 2)), epochs=1, verbose=0)
    tfl = qx.export_tflite(qat, x, verify=False)
    assert tfl.report.info.fully_integer and len(tfl.report.info.int4_tensors) == 1


def test_flat_model_untouched():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    assert flatten_nested(model) is model
