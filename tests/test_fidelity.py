"""keras_qx.lite.fidelity.compare_layers, and the layers it showed the QAT simulation getting wrong:
a standalone BatchNormalization and a Normalization (MUL/ADD or SUB/MUL in the file, with an
int8 rounding in between) now export as one DEPTHWISE_CONV_2D and agree with Keras within 1 step."""
import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras
from keras_qx.lite.fidelity import debug_tflite
from keras_qx.rewrite.scale_shift import ScaleShiftBatchNormalization, ScaleShiftNormalization
from tests.conftest import tiny_model

L = keras.layers


def _wide_bn(bn, rng, channels):
    """BatchNorm statistics as an untrained network has them: gains over four decades (the
    per-tensor MUL constant the converter used to make lost the small ones)."""
    bn.set_weights([rng.uniform(0.5, 2.0, channels).astype("float32"),   # gamma
                    rng.normal(0, 0.5, channels).astype("float32"),       # beta
                    rng.normal(0, 2.0, channels).astype("float32"),       # moving mean
                    (10.0 ** rng.uniform(-2, 2, channels)).astype("float32")])  # moving variance


def _preact_model(rng):
    """ResNetV2's pattern: a layer with two consumers (here an exact max-pool of the input, so
    that no upstream rounding difference is amplified by the BN gains) -> standalone BN -> ReLU
    -> Conv, plus a rank-2 BN in the head."""
    inputs = keras.Input((8, 8, 3), name="image")
    pool = L.MaxPooling2D(1, name="pool")(inputs)
    bn = L.BatchNormalization(name="preact_bn")
    x = L.Activation("relu", name="preact_relu")(bn(pool))
    x = L.Add(name="add")([L.Conv2D(8, 3, name="conv_c")(x), L.Conv2D(8, 3, name="side")(pool)])
    x = L.Flatten(name="flat")(x)
    x = L.ReLU(name="flat_relu")(x)
    head_bn = L.BatchNormalization(name="head_bn")
    out = L.Dense(4, name="out")(head_bn(x))
    model = keras.Model(inputs, out)
    _wide_bn(bn, rng, 3)
    _wide_bn(head_bn, rng, head_bn.input_shape[-1])
    return model


def _calibrate(qat, x, rng, epochs=3):
    """A few steps at a tiny learning rate: set the activation ranges, keep the BN statistics."""
    qat.compile(keras.optimizers.SGD(1e-6), "mse")
    qat.fit(x, rng.random((len(x), *qat.output_shape[1:])), epochs=epochs, batch_size=len(x), verbose=0)


def test_scale_shift_batchnorm_trains_and_infers_as_batchnorm(rng):
    x = rng.normal(2.0, 3.0, (16, 4, 4, 6)).astype("float32")
    ref, ours = L.BatchNormalization(), ScaleShiftBatchNormalization()
    ref.build(x.shape)
    ours.build(x.shape)
    _wide_bn(ref, rng, 6)
    ours.set_weights(ref.get_weights())
    np.testing.assert_allclose(ours(x, training=False), ref(x, training=False), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours(x, training=True), ref(x, training=True), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.get_weights()[2], ref.get_weights()[2], rtol=1e-6)  # moving mean updated
    for shape in [(16, 6), (16, 5, 6)]:  # other ranks go through a reshape
        y = rng.normal(size=shape).astype("float32")
        r, o = L.BatchNormalization(), ScaleShiftBatchNormalization()
        r.build(shape)
        o.build(shape)
        _wide_bn(r, rng, 6)
        o.set_weights(r.get_weights())
        np.testing.assert_allclose(o(y, training=False), r(y, training=False), rtol=1e-5, atol=1e-5)


def test_scale_shift_normalization_matches_normalization(rng):
    x = rng.random((4, 5, 5, 3)).astype("float32")
    for invert in (False, True):
        kw = dict(mean=[0.485, 0.456, 0.406], variance=[0.229 ** 2, 0.224 ** 2, 0.225 ** 2], invert=invert)
        np.testing.assert_allclose(ScaleShiftNormalization(**kw)(x), L.Normalization(**kw)(x), rtol=1e-5, atol=1e-6)


def test_standalone_batchnorm_is_rewritten_folded_one_is_not(rng):
    qat = qx.quantize(_preact_model(rng))
    kinds = {l.name: type(getattr(l, "layer", l)) for l in qat.layers}
    assert kinds["quant_preact_bn"] is ScaleShiftBatchNormalization
    assert kinds["quant_head_bn"] is ScaleShiftBatchNormalization
    folded = qx.quantize(tiny_model())  # conv -> bn: the converter folds it into the conv
    assert type(folded.get_layer("quant_bn").layer) is L.BatchNormalization


@pytest.mark.slow
def test_compare_layers_on_a_small_model(rng):
    model = tiny_model()
    x = rng.random((16, 8, 8, 1)).astype("float32")
    qat = qx.quantize(model)
    _calibrate(qat, x, rng)
    tfl = qx.export_tflite(qat, x, min_agreement=0.0)
    cmp = debug_tflite(qat, bytes(tfl), x)
    names = [e.layer for e in cmp.layers]
    assert names == ["relu", "flat", "fc", "out"], cmp.lines()  # conv+bn+relu: one fused CONV_2D
    assert cmp["relu"].op == "CONV_2D" and cmp["out"].op == "FULLY_CONNECTED"
    for e in cmp.layers:
        assert e.max_steps <= 1.0 + 1e-3 and e.scale > 0, cmp.lines()
    assert cmp.first_divergent is None
    # own error: each layer fed the file's values of its inputs (measured for every matched layer)
    assert all(e.own_max_steps is not None and e.own_max_steps <= 1.0 + 1e-3 for e in cmp.layers), cmp.lines()
    assert cmp.first_own_divergent is None
    assert "conv" in cmp.unmatched and "bn" in cmp.unmatched
    # the output layer's error is the one export_tflite reports
    assert cmp["out"].max_steps == pytest.approx(tfl.report.max_error_steps, abs=1e-3)


@pytest.mark.slow
def test_standalone_batchnorm_agrees_with_tflite_within_one_step(rng):
    x = rng.normal(0, 1, (32, 8, 8, 3)).astype("float32")
    qat = qx.quantize(_preact_model(rng))
    _calibrate(qat, x, rng)
    tfl = qx.export_tflite(qat, x, min_agreement=0.0)
    ops = tfl.report.info.ops
    assert tfl.report.info.fully_integer and "DEPTHWISE_CONV_2D" in ops and "MUL" not in ops, ops
    cmp = debug_tflite(qat, bytes(tfl), x)
    preact = cmp["preact_relu"]  # BN + ReLU: one DEPTHWISE_CONV_2D with the ReLU fused
    assert preact.op == "DEPTHWISE_CONV_2D" and not preact.intermediates
    assert preact.max_steps <= 1.0 + 1e-3 and preact.mean_steps < 0.05, cmp.lines()
    # after conv_c, one-step tie differences of the conv are multiplied by the BN gains (up to 20)
    # (rank 2: DEPTHWISE_CONV_2D between two RESHAPEs, which keep its scale)
    assert cmp["head_bn"].mean_steps < 0.1, cmp.lines()


@pytest.mark.slow
def test_normalization_agrees_with_tflite_within_one_step(rng):
    inputs = keras.Input((8, 8, 3))
    x = L.Rescaling(1 / 255, name="rescale")(inputs)
    x = L.Normalization(mean=[0.485, 0.456, 0.406], variance=[0.229 ** 2, 0.224 ** 2, 0.225 ** 2], name="norm")(x)
    x = L.Conv2D(4, 3, activation="relu", name="conv")(x)
    model = keras.Model(inputs, L.Dense(3, name="out")(L.Flatten(name="flat")(x)))
    data = 255 * rng.random((32, 8, 8, 3)).astype("float32")
    qat = qx.quantize(model)
    assert type(qat.get_layer("quant_norm").layer) is ScaleShiftNormalization
    _calibrate(qat, data, rng)
    tfl = qx.export_tflite(qat, data, min_agreement=0.0)
    cmp = debug_tflite(qat, bytes(tfl), data)
    norm = cmp["norm"]
    assert norm.op == "DEPTHWISE_CONV_2D" and not norm.intermediates, cmp.lines()
    assert norm.max_steps <= 1.0 + 1e-3 and norm.mean_steps < 0.05, cmp.lines()


def test_qat_model_with_scale_shift_layers_saves_and_loads(rng, tmp_path):
    qat = qx.quantize(_preact_model(rng))
    x = rng.normal(size=(4, 8, 8, 3)).astype("float32")
    path = tmp_path / "qat.keras"
    qat.save(path)
    again = qx.load_model(path)
    assert type(again.get_layer("quant_preact_bn").layer) is ScaleShiftBatchNormalization
    np.testing.assert_allclose(again.predict(x, verbose=0), qat.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_attention_projections_match_tflite_own_error(rng):
    """TFLite runs a (heads, key_dim) projection bias as an ADD of its own after the
    FULLY_CONNECTED, with an int8 rounding between: keras_qx splits the bias off (BiasAdd) so QAT
    rounds there too. Each projection's own error (fed the file's own input) is then ~0 steps
    (it was a mean 0.25 with the bias inside the EinsumDense)."""
    inputs = keras.Input((8, 8), name="seq")
    x = keras.layers.Dense(16, name="proj")(inputs)
    x = keras.layers.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(x, x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(keras.layers.GlobalAveragePooling1D()(x)))
    x = rng.normal(size=(64, 8, 8)).astype("float32")
    qat = qx.calibrate(qx.quantize(model), x)
    _calibrate(qat, x, rng)
    assert isinstance(qat.get_layer("quant_mha_query_bias").layer, keras.layers.Add)
    cmp = debug_tflite(qat, bytes(qx.export_tflite(qat, x, min_agreement=0.0)), x[:16])
    for part in ("query", "key", "value", "query_bias", "key_bias", "value_bias"):
        err = cmp[f"mha_{part}"]
        assert err.own_mean_steps <= 0.02 and err.own_max_steps <= 1.001, (part, err)
