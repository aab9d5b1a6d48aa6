"""The verifier judges the error of every output kind: for each (classifier softmax / logits,
binary sigmoid / logit, regression, autoencoder and segmentation maps, multi-output) a faithful
file exports, and the same file judged against a Keras model whose last layer was changed after
conversion (a broken file, as the runtime sees it) is refused by the export's last step, naming
the figures and writing nothing. Top-1 agreement stays 100% in the classifier cases: only the
error gives them away."""
import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras
from keras_qx.lite.export import ExportReport, deliver
from keras_qx.lite.inspect import inspect_tflite
from keras_qx.lite.verify import MAX_MEAN_STEPS, MAX_P99_STEPS, verify

L = keras.layers


def _dense(units, activation=None):
    inputs = keras.Input((6,), name="x")
    hidden = L.Dense(16, activation="relu", name="fc")(inputs)
    return keras.Model(inputs, L.Dense(units, activation=activation, name="out")(hidden))


def _map(channels, activation):
    inputs = keras.Input((8, 8, 1), name="image")
    hidden = L.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    return keras.Model(inputs, L.Conv2D(channels, 3, padding="same", activation=activation, name="out")(hidden))


def _two_heads():
    inputs = keras.Input((6,), name="x")
    hidden = L.Dense(16, activation="relu", name="fc")(inputs)
    return keras.Model(inputs, [L.Dense(3, activation="softmax", name="cls")(hidden), L.Dense(1, name="reg")(hidden)])


def _shift_bias(fraction):  # every output moves by a fraction of the output's range: top-1 unchanged
    def apply(kernel, bias, span):
        bias.assign(bias - fraction * span)
    return apply


def _scale_kernel(factor):
    def apply(kernel, bias, span):
        kernel.assign(kernel * factor)
        bias.assign(bias * factor)
    return apply


def _variables(wrapper):
    """The float kernel and bias variables a QAT wrapper trains (its layer's ``kernel``
    attribute is the fake-quantized tensor)."""
    by_name = {w.name.split("/")[-1].split(":")[0]: w for w in wrapper.trainable_weights}
    return by_name["kernel"], by_name["bias"]


# kind -> (model builder, layer broken, how)
KINDS = {
    "softmax": (lambda: _dense(4, "softmax"), "out", _scale_kernel(0.3)),  # a flatter softmax
    "logits": (lambda: _dense(4), "out", _shift_bias(0.15)),
    "sigmoid": (lambda: _dense(1, "sigmoid"), "out", _shift_bias(3.0)),
    "logit": (lambda: _dense(1), "out", _shift_bias(0.15)),
    "regression": (lambda: _dense(1), "out", _scale_kernel(0.5)),
    "autoencoder map": (lambda: _map(1, "sigmoid"), "out", _shift_bias(3.0)),
    "segmentation map": (lambda: _map(3, "softmax"), "out", _scale_kernel(0.3)),  # a flatter softmax
    "multi-output": (_two_heads, "reg", _shift_bias(0.15)),
}


@pytest.fixture(scope="module")
def exported():
    """Each kind quantized, calibrated (regression trained a few epochs) and exported with
    verification: ``{kind: (qat, tflite, x)}``."""
    out = {}
    rng = np.random.default_rng(0)
    for kind, (build, _, _) in KINDS.items():
        keras.utils.set_random_seed(0)
        model = build()
        x = rng.normal(size=(64, *model.input_shape[1:])).astype("float32")
        qat = qx.calibrate(qx.quantize(model), x)
        if kind == "regression":
            qat.compile("adam", "mse")
            qat.fit(x, x[:, :1] * 2 - x[:, 1:2], epochs=3, verbose=0)
        out[kind] = qat, qx.export_tflite(qat, x), x  # the faithful file: accepted
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_faithful_file_accepted_broken_file_refused(exported, kind, tmp_path):
    qat, tfl, x = exported[kind]
    for v in tfl.report.verification.judged():  # the faithful file is far inside the bars
        assert v.mean_error_steps < 1.0 and v.p99_error_steps < MAX_P99_STEPS / 4, (kind, v)
    _, name, breaks = KINDS[kind]
    kernel, bias = _variables(qat.get_layer(f"quant_{name}"))
    saved = [kernel.numpy(), bias.numpy()]
    outputs = qat.predict(x, verbose=0)
    ref = outputs[[n.removeprefix("quant_") for n in qat.output_names].index(name)] if isinstance(outputs, list) else outputs
    try:
        breaks(kernel, bias, 1.0 if kind == "sigmoid" or "map" in kind else float(np.ptp(ref)))  # a logit moves by 3
        result = verify(qat, bytes(tfl), x)  # the same file against the changed model
        worst = {v.output: v for v in result.judged()}[name] if result.per_output else result
        assert worst.mean_error_steps > MAX_MEAN_STEPS or worst.p99_error_steps > MAX_P99_STEPS, (kind, worst)
        if worst.classifier:
            assert worst.agreement == 1.0  # top-1 alone would have accepted it
        path = tmp_path / "broken.tflite"
        report = ExportReport(inspect_tflite(bytes(tfl)), None, None, None, 0, 0.0)
        with pytest.raises(qx.ExportError) as err:
            deliver(qat, bytes(tfl), report, [x], path)
        assert not path.exists()
        said = str(err.value)
        assert "far from the Keras model" in said and f"mean {worst.mean_error_steps:.2f}" in said
        assert all(fix in said for fix in ("qx.calibrate", "qx.debug_tflite", "float by policy", "verify=False"))
        if kind == "multi-output":
            assert said.startswith("output 'reg' of ")
    finally:
        kernel.assign(saved[0])
        bias.assign(saved[1])
    deliver(qat, bytes(tfl), ExportReport(inspect_tflite(bytes(tfl)), None, None, None, 0, 0.0), [x], path)
    assert path.exists()  # restored: the same file is accepted again
