"""qx.evaluate_tflite reads whether a single-unit output is a probability or a logit: a logit
is scored at 0, a sigmoid at 0.5, against numpy references from the runtime's own outputs."""
import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras
from keras_qx._runtime import Runner
from keras_qx.lite.evaluate import unit_threshold


@pytest.fixture(scope="module")
def binary_files():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 6)).astype("float32")
    y = (x[:, 0] - 0.5 * x[:, 1] > 0.3).astype("int32")
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), name="x")
    logit = keras.layers.Dense(1, name="logit")(keras.layers.Dense(8, activation="relu", name="fc")(inputs))
    model = keras.Model(inputs, logit)
    model.compile(keras.optimizers.Adam(0.01), keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(x, y, epochs=5, verbose=0)  # briefly: many logits stay between 0 and 0.5
    prob = keras.Model(inputs, keras.layers.Activation("sigmoid", name="prob")(logit))
    return {"logit": qx.ptq(model, "int8", x), "sigmoid": qx.ptq(prob, "int8", x)}, x, y


@pytest.mark.slow
def test_a_logit_output_is_scored_at_zero_and_a_sigmoid_at_one_half(binary_files):
    files, x, y = binary_files
    logits = Runner(bytes(files["logit"])).predict(x)[:, 0]
    probs = Runner(bytes(files["sigmoid"])).predict(x)[:, 0]
    assert logits.min() < 0 < logits.max() and 0 <= probs.min() and probs.max() <= 1
    at_zero, at_half = float(((logits > 0) == y).mean()), float(((logits > 0.5) == y).mean())
    assert at_zero != at_half  # the old rule (0.5 for every single unit) scored this file wrong
    assert qx.evaluate_tflite(files["logit"], x, y, latency_runs=1)["accuracy"] == pytest.approx(at_zero)
    assert qx.evaluate_tflite(files["logit"], x, y, latency_runs=1, from_logits=False)["accuracy"] == \
        pytest.approx(at_half)
    assert qx.evaluate_tflite(files["sigmoid"], x, y, latency_runs=1)["accuracy"] == \
        pytest.approx(float(((probs > 0.5) == y).mean()))
    assert qx.evaluate_tflite(files["sigmoid"], x, y, latency_runs=1, threshold=0.9)["accuracy"] == \
        pytest.approx(float(((probs > 0.9) == y).mean()))
    assert at_zero > 0.7


def test_the_rule_reads_the_values_and_bad_arguments_are_named():
    assert unit_threshold(np.array([0.0, 0.3, 1.0])) == 0.5
    assert unit_threshold(np.array([-0.1, 0.3])) == 0.0 and unit_threshold(np.array([0.2, 1.5])) == 0.0
    with pytest.raises(ValueError, match="disagree"):
        qx.evaluate_tflite(b"", np.zeros((1, 6)), np.zeros(1), threshold=0.5, from_logits=True)
    with pytest.raises(TypeError, match="from_logits"):
        qx.evaluate_tflite(b"", np.zeros((1, 6)), np.zeros(1), from_logits="yes")
    with pytest.raises(ValueError, match=r"threshold=\.\.\.\) is the decision value"):
        qx.evaluate_tflite(b"", np.zeros((1, 6)), np.zeros(1), threshold=float("nan"))
