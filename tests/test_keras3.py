"""Keras 3 models (``import keras``) at the front doors: rebuilt as tf_keras, checked, quantized.

``qx.quantize``, ``qx.sensitivity``, ``qx.auto_policy``, ``qx.ptq`` and ``qx.load_model`` take a
Keras 3 Sequential or Functional model of standard layers (or a Keras 3 file); what cannot be
rebuilt is refused naming the layer.
"""
from __future__ import annotations

import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras, keras3, quantize_wrapper
from keras_qx._runtime import Runner
from keras_qx.rewrite.keras3 import Keras3Error, from_keras3

k3 = keras3()
L = k3.layers


def cnn():
    """Most standard layers of a vision model, in Keras 3."""
    inputs = k3.Input((12, 12, 3), name="image")
    x = L.Rescaling(1 / 4.0, name="rescale")(inputs)
    x = L.Conv2D(8, 3, padding="same", kernel_regularizer=k3.regularizers.L2(1e-4), name="conv")(x)
    x = L.BatchNormalization(name="bn")(x)
    x = L.Activation("relu", name="relu")(x)
    y = L.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(x)
    x = L.Add(name="add")([x, y])
    x = L.SeparableConv2D(8, 3, padding="same", activation="relu", name="sep")(x)
    x = L.MaxPooling2D(name="pool")(x)
    a = L.GlobalAveragePooling2D(name="gap")(x)
    b = L.Flatten(name="flat")(L.AveragePooling2D(3, name="avg")(x))
    x = L.Concatenate(name="cat")([a, b])
    x = L.Dropout(0.1, name="drop")(x)
    x = L.Reshape((4, 8), name="reshape")(L.Dense(32, activation="relu", name="fc")(x))
    x = L.Conv1D(4, 2, activation="relu", name="conv1d")(x)
    x = L.LayerNormalization(name="ln")(L.Flatten(name="flat2")(x))
    return k3.Model(inputs, L.Dense(3, name="out")(x), name="k3_cnn")


def attention():
    tokens = k3.Input((6,), dtype="int32", name="tokens")
    x = L.Embedding(20, 8, name="embed")(tokens)
    x = L.MultiHeadAttention(2, 4, name="mha")(x, x)
    x = L.GlobalAveragePooling1D(name="gap")(x)
    return k3.Model(tokens, L.Dense(2, name="out")(x), name="k3_attention")


def sequential():
    return k3.Sequential([k3.Input((8,)), L.Dense(8, activation="relu", name="fc1"), L.Dropout(0.2, name="drop"),
                          L.Dense(4, name="fc2")], name="k3_seq")


def nested():
    inputs = k3.Input((8,), name="x")
    block = k3.Sequential([k3.Input((8,)), L.Dense(6, activation="relu", name="inner")], name="block")
    h = block(inputs)
    return k3.Model(inputs, [L.Dense(2, name="head")(h), h], name="k3_nested")


def more_layers():
    return k3.Sequential([k3.Input((6, 6, 2)), L.Conv2DTranspose(3, 3, name="deconv"), L.UpSampling2D(name="up"),
                          L.ZeroPadding2D(name="pad"), L.Cropping2D(1, name="crop"), L.PReLU(name="prelu"),
                          L.LeakyReLU(name="leaky"), L.ReLU(6.0, name="relu6"), L.Flatten(name="flat"),
                          L.Dense(4, activation="gelu", name="fc"), L.Softmax(name="softmax")], name="k3_more")


def recurrent():
    return k3.Sequential([k3.Input((6, 4)), L.Normalization(mean=[1.0, 2, 3, 4], variance=[1.0, 2, 3, 4], name="norm"),
                          L.Conv1D(4, 3, padding="causal", name="causal"), L.MaxPooling1D(name="pool"),
                          L.LSTM(3, return_sequences=True, name="lstm"), L.GRU(2, return_sequences=True, name="gru"),
                          L.GlobalMaxPooling1D(name="gmp")], name="k3_recurrent")


def random_inputs(model, n=16, seed=1):
    rng = np.random.default_rng(seed)
    shape = (n, *model.inputs[0].shape[1:])
    if "int" in str(model.inputs[0].dtype):
        return rng.integers(0, 20, shape).astype("int32")
    return rng.standard_normal(shape).astype("float32")


def as_list(y):
    return [np.asarray(v) for v in (y if isinstance(y, (list, tuple)) else [y])]


def assert_quantized_copy(qat, source, name, cls):
    """``quant_<name>`` in the QAT model is a tfmot QuantizeWrapper around a tf_keras ``cls`` whose
    weights equal the Keras 3 layer ``name``'s (get_layer raises on a missing name, so checking for
    None proves nothing)."""
    wrapper = qat.get_layer(f"quant_{name}")
    assert isinstance(wrapper, quantize_wrapper.QuantizeWrapper), type(wrapper)
    assert type(wrapper.layer) is cls and wrapper.layer.name == name, type(wrapper.layer)
    want = [np.asarray(w) for w in source.get_layer(name).get_weights()]
    got = [v.numpy() for v in wrapper.weights if v.name.startswith(f"{name}/")]  # the wrapped layer's own
    assert [w.shape for w in got] == [w.shape for w in want] and want
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("build", [cnn, attention, sequential, nested, more_layers, recurrent])
def test_the_rebuilt_model_predicts_as_the_keras3_one(build):
    k3.utils.set_random_seed(0)
    source = build()
    rebuilt = from_keras3(source)
    assert isinstance(rebuilt, keras.Model)
    assert [l.name for l in rebuilt.layers] == [l.name for l in source.layers]
    x = random_inputs(source)
    for want, got in zip(as_list(source.predict(x, verbose=0)), as_list(rebuilt.predict(x, verbose=0))):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_a_keras3_model_goes_through_quantize_fit_export(rng):
    k3.utils.set_random_seed(0)
    source = cnn()
    x = rng.random((64, 12, 12, 3)).astype("float32") * 4
    y = rng.integers(0, 3, 64)
    qat = qx.quantize(source, {"rules": [{"type": "Dense", "weight_bits": 4}]})
    assert isinstance(qat, keras.Model)
    assert_quantized_copy(qat, source, "conv", keras.layers.Conv2D)
    assert_quantized_copy(qat, source, "fc", keras.layers.Dense)
    qat.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x, y, epochs=1, batch_size=32, verbose=0)
    tfl = qx.export_tflite(qat, x[:32], min_agreement=0.8)
    runner = Runner(tfl)
    want, got = qat.predict(x, verbose=0), runner.predict(x)
    # LayerNormalization divides by a small spread: one step in its input moves a few outputs
    # by up to ~15 steps (its own error is < 1 step: qx.debug_tflite). The mean stays ~1.
    assert np.mean(np.abs(want - got)) / runner.output_step < 2.0, tfl.report.lines()
    assert (want.argmax(-1) == got.argmax(-1)).mean() >= 0.9


def test_auto_policy_sensitivity_and_ptq_take_a_keras3_model():
    source = sequential()
    x = random_inputs(source, 32)
    y = np.random.default_rng(0).integers(0, 4, 32)
    report = qx.sensitivity(source, x, y, candidates=(4, 8), method="sqnr", verbose=False)
    assert set(report.layers) == {"fc1", "fc2"}
    policy = qx.auto_policy(source, budget="0.6x", candidates=(4, 8), method="sqnr", verbose=False)
    assert set(policy.layers) == {"fc1", "fc2"}
    assert_quantized_copy(qx.quantize(source, policy), source, "fc1", keras.layers.Dense)
    tfl = qx.ptq(source, "dynamic", x)  # verified against the rebuilt model
    assert tfl[4:8] == b"TFL3" and tfl.report.verification.mean_error_steps < 2


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_load_model_rebuilds_a_keras3_file(tmp_path, suffix):
    source = cnn()
    path = tmp_path / f"k3{suffix}"
    source.save(path)
    loaded = qx.load_model(path)
    assert isinstance(loaded, keras.Model) and loaded.name == "k3_cnn"
    x = random_inputs(source)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), source.predict(x, verbose=0), atol=1e-5, rtol=0)
    assert_quantized_copy(qx.quantize(loaded), source, "out", keras.layers.Dense)


def test_load_model_keeps_safe_mode_for_keras3_files(tmp_path):
    model = k3.Sequential([k3.Input((4,)), L.Lambda(lambda t: t * 2, name="double")])
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(ValueError, match="Lambda layer 'double'.*safe_mode=False"):
        qx.load_model(path)
    with pytest.raises(Keras3Error, match="'double' is a Keras 3 Lambda layer.*tf_keras"):
        qx.load_model(path, safe_mode=False)  # loads in Keras 3, but its function does not carry over


# ---- refusals -----------------------------------------------------------------------------------

def test_a_subclassed_keras3_model_is_refused():
    class Net(k3.Model):
        def __init__(self):
            super().__init__(name="net")
            self.dense = L.Dense(2)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net(np.zeros((1, 4), "float32"))
    for call in (qx.quantize, lambda m: qx.auto_policy(m, budget="0.6x", method="sqnr")):
        with pytest.raises(TypeError, match="'net' is a subclassed Keras 3 model.*import tf_keras as keras"):
            call(net)


def test_a_custom_keras3_layer_is_refused_by_name():
    class Twice(L.Layer):
        def call(self, x):
            return 2 * x

    model = k3.Sequential([k3.Input((4,)), Twice(name="twice"), L.Dense(2)])
    with pytest.raises(Keras3Error, match="layer 'twice' is a custom Keras 3 layer.*import tf_keras as keras"):
        qx.quantize(model)


def test_a_keras_ops_call_is_refused_by_name():
    inputs = k3.Input((4,))
    out = L.Dense(2, name="fc")(k3.ops.relu(inputs))
    with pytest.raises(Keras3Error, match="'relu' is a keras.ops call.*use a layer instead"):
        qx.quantize(k3.Model(inputs, out))


def test_a_setting_tf_keras_lacks_is_refused_by_name():
    with pytest.warns(UserWarning, match="rms_scaling"):  # Keras 3 deprecates it, but builds it
        model = k3.Sequential([k3.Input((4,)), L.Dense(4, name="fc"), L.LayerNormalization(rms_scaling=True, name="ln")])
    with pytest.raises(Keras3Error, match="layer 'ln' \\(LayerNormalization\\) sets rms_scaling=True"):
        qx.quantize(model)


def test_a_layer_that_computes_differently_is_named():
    """Keras 3's hard_sigmoid is relu6(x + 3) / 6; tf_keras's is clip(0.2 x + 0.5)."""
    model = k3.Sequential([k3.Input((4,)), L.Dense(4, name="fc"), L.Dense(4, activation="hard_sigmoid", name="gate"),
                           L.Dense(2, name="out")])
    with pytest.raises(Keras3Error, match="disagrees with the Keras 3 model.*layer 'gate' computes differently"):
        qx.quantize(model)


def test_a_tf_keras_model_passes_through_untouched():
    from keras_qx.rewrite.keras3 import as_tf_keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert as_tf_keras(model) is model
    with pytest.raises(TypeError, match="not a Keras 3 model"):
        from_keras3(model)


def test_bit_width_tuner_takes_a_keras3_model(tmp_path):
    source = sequential()
    x = random_inputs(source, 64)
    y = np.random.default_rng(0).integers(0, 4, 64)
    tuner = qx.BitWidthTuner(source, candidates=(4, 8), budget="0.75x", max_trials=2, directory=tmp_path,
                             loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                             objective="accuracy", seed=0, verbose=0)
    tuner.search(x, y, epochs=1)
    policy = tuner.best_policy()
    assert set(policy.layers) == {"fc1", "fc2"}
    rebuilt = from_keras3(source)
    int8 = sum(qx.cost.kernel_bytes(rebuilt.get_layer(n), 8) for n in policy.layers)
    assert sum(qx.cost.kernel_bytes(rebuilt.get_layer(n), s["weight_bits"])
               for n, s in policy.layers.items()) <= 0.75 * int8
