"""qx.calibrate: activation ranges from data (as the post-training converter sets them), and the
refusal to export a model that has never seen data."""
import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras
from tests.conftest import tiny_model


def _dense_model():
    inputs = keras.Input((6,), name="x")
    hidden = keras.layers.Dense(5, activation="relu", name="fc")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(hidden))


def _ranges(qat, layer):
    w = {v.name.split("/")[-1].split(":")[0]: float(np.ravel(v.numpy())[0]) for v in qat.get_layer(layer).weights}
    return {k: v for k, v in w.items() if k.endswith(("_min", "_max"))}


def test_ranges_are_the_observed_min_and_max(rng):
    model = _dense_model()
    x = (rng.normal(size=(100, 6)) * 3).astype("float32")
    qat = qx.calibrate(qx.quantize(model), x, batch_size=7)  # batches of 7: the range spans them all
    # numpy reference: the float activations of the quantized-weight model, with 8-bit weights
    # as the QAT model holds them; relu output >= 0 and the logits' range include 0.
    k1, b1 = model.get_layer("fc").get_weights()
    k2, b2 = model.get_layer("out").get_weights()

    def q(w):  # per-channel symmetric 8-bit (narrow range), the default kernel quantizer
        s = np.abs(w).max(0) / 127
        return np.round(w / s) * s

    hidden = np.maximum(x @ q(k1) + b1, 0)
    logits = hidden @ q(k2) + b2
    qin, qfc, qout = _ranges(qat, "quantize_layer"), _ranges(qat, "quant_fc"), _ranges(qat, "quant_out")
    assert qin["quantize_layer_min"] == pytest.approx(min(x.min(), 0)) and qin["quantize_layer_max"] == pytest.approx(x.max())
    post_fc = [v for k, v in qfc.items() if "post_activation" in k]
    assert post_fc[0] == pytest.approx(0.0, abs=1e-6) and post_fc[1] == pytest.approx(hidden.max(), rel=1e-2)
    out_min, out_max = sorted(v for k, v in qout.items() if "post_activation" in k)
    assert out_min == pytest.approx(min(logits.min(), 0), rel=1e-2) and out_max == pytest.approx(max(logits.max(), 0), rel=1e-2)


def test_calibration_leaves_the_model_trainable_and_saveable(rng, tmp_path):
    x = rng.random((32, 8, 8, 1)).astype("float32")
    qat = qx.calibrate(qx.quantize(tiny_model()), x)
    before = qat.predict(x, verbose=0)
    qat.compile("adam", "mse")
    qat.fit(x, rng.random((32, 3)), epochs=1, verbose=0)  # the quantizers are back in place
    assert not np.allclose(qat.predict(x, verbose=0), before)
    qat.save(tmp_path / "m.keras")
    again = qx.load_model(tmp_path / "m.keras")
    assert qx.uncalibrated_ranges(again) == []
    np.testing.assert_allclose(again.predict(x, verbose=0), qat.predict(x, verbose=0), atol=1e-5)


def test_export_refuses_a_model_that_never_saw_data(rng):
    qat = qx.quantize(tiny_model())
    assert "quantize_layer" in qx.uncalibrated_ranges(qat)
    x = rng.random((16, 8, 8, 1)).astype("float32")
    with pytest.raises(qx.ExportError, match=r"never seen data.*quantize_layer.*qx\.calibrate\(qat_model"):
        qx.export_tflite(qat, x)
    qat.compile("adam", "mse")
    qat.fit(x, rng.random((16, 3)), epochs=1, verbose=0)  # one training step also counts
    assert qx.uncalibrated_ranges(qat) == []


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 5)), r"x has shape \(4, 5\).*\(n, 6\)"),
    (np.full((4, 6), np.nan), "NaN"),
])
def test_calibrate_names_bad_data(bad, match):
    with pytest.raises(ValueError, match=match):
        qx.calibrate(qx.quantize(_dense_model()), bad)


def test_calibrate_refuses_a_float_model():
    with pytest.raises(ValueError, match="no quantized layers.*qx.quantize"):
        qx.calibrate(_dense_model(), np.zeros((4, 6)))


@pytest.mark.slow
def test_quantize_calibrate_export_is_as_good_as_post_training_int8(trained_cnn, digits):
    """The issue's bar: quantize -> calibrate -> export gives a file as good as post-training int8."""
    (x, _), (xt, yt) = digits
    qat = qx.calibrate(qx.quantize(trained_cnn), x[:500])
    ours = qx.evaluate_tflite(qx.export_tflite(qat, x[:300]), xt, yt, latency_runs=0)["accuracy"]
    ptq = qx.evaluate_tflite(qx.ptq(trained_cnn, "int8", x[:300]), xt, yt, latency_runs=0)["accuracy"]
    float_acc = float((trained_cnn.predict(xt, verbose=0).argmax(1) == yt).mean())
    assert ours >= ptq - 0.005 and ours >= float_acc - 0.01, (ours, ptq, float_acc)
