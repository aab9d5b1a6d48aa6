"""qx.quantize: policy and annotations land on the right layers; mistakes get clear errors."""
import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras, tf
from keras_qx.quant.configs import KernelQuantizeConfig
from tests.conftest import tiny_model


def _bits(qat):
    return {l.layer.name: (l.quantize_config.weight_bits, l.quantize_config.activation_bits)
            for l in qat.layers if isinstance(getattr(l, "quantize_config", None), KernelQuantizeConfig)}


def test_uniform_default_is_8_bit():
    qat = qx.quantize(tiny_model())
    assert {n: b[0] for n, b in _bits(qat).items()} == {"conv": 8, "fc": 8, "out": 8}


def test_policy_rules_and_overrides():
    policy = {"rules": [{"type": "Dense", "weight_bits": 4}, {"match": "c.*", "weight_bits": 2}],
              "layers": {"out": {"weight_bits": 6}}}
    bits = _bits(qx.quantize(tiny_model(), policy))
    assert bits["conv"][0] == 2 and bits["fc"][0] == 4 and bits["out"][0] == 6


def test_conv_bn_relu_keeps_policy_bits_and_folds():
    qat = qx.quantize(tiny_model(), {"layers": {"conv": {"weight_bits": 4}}})
    conv = next(l for l in qat.layers if getattr(l, "layer", None) is not None and l.layer.name == "conv")
    assert conv.quantize_config.weight_bits == 4
    # tfmot's fold transform: conv activation replaced by NoOp so no fake-quant sits before BN.
    assert type(conv.layer.activation).__name__ in ("NoOpActivation", "QuantizeAwareActivation")
    names = [v.name for v in conv.weights]
    assert not any("post_activation" in n for n in names)


def test_conv_relu_pattern_keeps_weight_quantizer():
    # tfmot's LayerReLUQuantize gives Conv->ReLU a no-op config, dropping the weight bits.
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.ReLU(name="relu")(x)
    out = keras.layers.Dense(2, name="out")(keras.layers.Flatten()(x))
    qat = qx.quantize(keras.Model(inputs, out), {"layers": {"conv": {"weight_bits": 4}}})
    assert _bits(qat)["conv"] == (4, None)  # weights 4-bit; output quantized after the ReLU


def test_keep_float_layer_is_not_wrapped():
    qat = qx.quantize(tiny_model(), {"layers": {"out": {"quantize": False}}})
    assert "out" not in _bits(qat)
    assert any(l.name == "out" and isinstance(l, keras.layers.Dense) for l in qat.layers)


def test_annotate_in_model_definition_and_precedence():
    inputs = keras.Input((16,))
    x = qx.annotate(keras.layers.Dense(8, activation="relu", name="a"), weight_bits=4)(inputs)
    x = qx.annotate(keras.layers.Dense(8, activation="relu", name="b"), activation_bits=8)(x)
    out = keras.layers.Dense(2, name="c")(x)
    model = keras.Model(inputs, out)
    bits = _bits(qx.quantize(model, qx.Policy.uniform(weight_bits=6)))
    assert bits["a"][0] == 4  # annotation beats the default
    assert bits["b"][0] == 6  # unpinned field falls through to the policy
    assert bits["c"][0] == 6
    bits = _bits(qx.quantize(model, {"layers": {"a": {"weight_bits": 8}}}))
    assert bits["a"][0] == 8  # policy layers beat annotations


def test_quantized_model_matches_float_closely(rng):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
    x = rng.random((32, 8, 8, 1)).astype("float32")
    qat = qx.quantize(model)
    qat(x, training=True)  # one step sets the input quantizer's range (tfmot starts it at 0)
    ref, out = model.predict(x, verbose=0), qat.predict(x, verbose=0)
    # 8-bit fake quant of an untrained net: close, but not identical.
    assert 0 < np.abs(ref - out).max() < 0.1 * np.abs(ref).max() + 1e-3


def test_four_bit_weights_are_on_grid(rng):
    inputs = keras.Input((16,))
    model = keras.Model(inputs, keras.layers.Dense(4, name="d", use_bias=False)(inputs))
    qat = qx.quantize(model, {"default": {"weight_bits": 4}, "layers": {}})
    x = np.eye(16, dtype="float32")
    # With identity inputs the output rows are the (fake-quantized) kernel rows.
    kernel = model.get_layer("d").kernel.numpy()
    step = np.abs(kernel).max() / 7
    qat(x, training=True)  # one step sets the input quantizer's range (tfmot starts it at 0)
    w = qat.predict(x, verbose=0)
    # The output then passes an 8-bit activation quantizer over its initial [-6, 6] range:
    # within half its step of the 4-bit kernel, and further than that from the float kernel.
    half_activation_step = 12 / 255 / 2
    assert np.abs(w - np.round(kernel / step) * step).max() <= half_activation_step + 1e-6
    assert np.abs(w - kernel).max() > half_activation_step


@pytest.mark.parametrize("model_fn, exc, text", [
    (lambda: keras.Sequential([keras.layers.Dense(2)]), ValueError, "not built"),
    (lambda: type("Sub", (keras.Model,), {"call": lambda self, x: x})(), TypeError, "subclassed"),
    (lambda: "not a model", TypeError, "tf_keras Model"),
])
def test_bad_models(model_fn, exc, text):
    with pytest.raises(exc, match=text):
        qx.quantize(model_fn())


def test_keras3_subclassed_model_refused_with_fix():
    """A Keras 3 model of standard layers is rebuilt as tf_keras (tests/test_keras3.py); a
    subclassed one cannot be."""
    keras3 = pytest.importorskip("keras")

    class Net(keras3.Model):
        def call(self, x):
            return x

    model = Net()
    model(np.zeros((1, 4), "float32"))
    with pytest.raises(TypeError, match="subclassed Keras 3 model.*import tf_keras as keras"):
        qx.quantize(model)


@pytest.mark.parametrize("policy, text", [
    ({"layers": {"fc_typo": {"weight_bits": 4}}}, "fc"),
    ({"rules": [{"type": "Dens", "weight_bits": 4}]}, "Dense"),
    ({"rules": [{"match": "(", "weight_bits": 4}]}, "regex"),
    ({"default": {"weight_bits": 12}}, "out of range"),
    ({"default": {"activation_bits": 4}}, "simulate_only"),
    ({"default": {"quantize": False}}, "nothing to quantize"),
])
def test_bad_policies(policy, text):
    with pytest.raises(qx.PolicyError, match=text):
        qx.quantize(tiny_model(), policy)


def test_simulate_only_trains_but_refuses_export(rng):
    qat = qx.quantize(tiny_model(), {"default": {"activation_bits": 4}}, simulate_only=True)
    x = rng.random((16, 8, 8, 1)).astype("float32")
    qat.compile("adam", "mse")
    qat.fit(x, np.zeros((16, 3)), epochs=1, verbose=0)
    with pytest.raises(qx.ExportError, match="simulate_only"):
        qx.export_tflite(qat, x)


class Twice(keras.layers.Layer):
    """A custom layer keras_qx knows nothing about, whose call branches on a tensor's value."""

    def call(self, x):
        if tf.reduce_max(x) > 100.0:  # Python branching on a value: cannot be traced
            return x
        return 2 * x


def test_untraceable_custom_layer_is_kept_float_with_a_warning_naming_it_and_the_fix():
    inputs = keras.Input((8, 4))
    x = Twice(name="ln")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(keras.layers.Flatten()(x)))
    with pytest.warns(UserWarning, match="custom layer 'ln' .Twice. whole and float.*register_layer"):
        qat = qx.quantize(model)
    assert any(isinstance(l, Twice) for l in qat.layers)  # unwrapped: float
    wrapped = {l.layer.name for l in qat.layers if hasattr(l, "layer")}
    assert "out" in wrapped and "ln" not in wrapped
    qat = qx.quantize(model, {"layers": {"ln": {"quantize": False}}})
    assert any(isinstance(l, Twice) for l in qat.layers)


def test_users_own_tfmot_config_is_left_in_charge():
    from keras_qx._compat import default_8bit_quantize_registry, quantize_annotate

    config = default_8bit_quantize_registry.Default8BitQuantizeConfig(["kernel"], ["activation"], False)
    inputs = keras.Input((6,))
    x = quantize_annotate.QuantizeAnnotate(keras.layers.Dense(4, name="mine"), quantize_config=config)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="ours")(x))
    with qx.quantize_scope({"Default8BitQuantizeConfig": type(config)}):
        qat = qx.quantize(model, qx.Policy.uniform(weight_bits=4))
    configs = {l.layer.name: l.quantize_config for l in qat.layers if hasattr(l, "quantize_config")}
    assert type(configs["mine"]) is type(config)
    assert configs["ours"].weight_bits == 4
