"""Models with ``None`` time or spatial dimensions: the file keeps them (-1 in the input's shape
signature), the runtime resizes its input to each sample's shape, and the file agrees with the
Keras model at lengths other than the representative data's. Where a file is faithful at one
length only, export fixes that length and says so."""
import warnings

import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras
from keras_qx._runtime import Runner, interpreter, run
from keras_qx.lite.convert import converter_for
from keras_qx.lite.inspect import inspect_tflite

L = keras.layers
MAX_STEPS = 2 + 1e-3  # two output steps (float rounding of the dequantized difference)


def signature(tfl) -> list:
    """Each input's shape signature in the file (-1 where dynamic), read by the runtime."""
    return [d["shape_signature"].tolist() for d in interpreter(tfl, allocate=False).get_input_details()]


def steps(tfl, model, x) -> tuple[float, float]:
    """``(mean, max)`` error of the file against ``model`` on ``x``, in output quantization steps
    (a float output: 1/255 of the Keras output's range, as the verifier takes it)."""
    result = run(tfl, x)
    ref = model.predict(x, verbose=0)
    step = result.output_steps[0] or float(np.ptp(ref) / 255)
    err = np.abs(result.outputs[0] - ref.reshape(result.outputs[0].shape)) / step
    return float(err.mean()), float(err.max())


def exported(model, x):
    """quantize -> calibrate -> export (verified) at ``x``'s length: ``(qat, tflite)``."""
    qat = qx.quantize(model)
    qx.calibrate(qat, x)
    return qat, qx.export_tflite(qat, x)


def conv1d_model():
    inputs = keras.Input((None, 3), name="signal")
    h = L.Conv1D(8, 3, activation="relu", name="conv")(inputs)
    h = L.GlobalAveragePooling1D(name="gap")(h)
    return keras.Model(inputs, L.Dense(4, name="out")(h), name="dyn_conv1d")


@pytest.mark.slow
def test_conv1d_variable_length_keeps_the_dynamic_signature_and_agrees_at_other_lengths(rng):
    model = conv1d_model()
    x = rng.normal(size=(64, 40, 3)).astype("float32")
    qat, tfl = exported(model, x)
    assert signature(tfl) == [[-1, -1, 3]]
    assert inspect_tflite(tfl).inputs[0][2] == (None, 3)
    assert tfl.report.fixed_lengths == () and tfl.report.other_length is not None
    for length in (24, 60):
        mean, worst = steps(tfl, qat, rng.normal(size=(32, length, 3)).astype("float32"))
        assert mean <= 0.5 and worst <= MAX_STEPS, (length, mean, worst)


@pytest.mark.slow
def test_images_of_any_size_run_in_a_file_exported_at_one(rng):
    inputs = keras.Input((None, None, 3))
    h = L.Conv2D(8, 3, activation="relu")(inputs)
    h = L.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, L.Dense(4)(h))
    qat, tfl = exported(model, rng.normal(size=(48, 12, 12, 3)).astype("float32"))
    assert signature(tfl) == [[-1, -1, -1, 3]]
    for shape in ((9, 9), (16, 20)):
        mean, worst = steps(tfl, qat, rng.normal(size=(16, *shape, 3)).astype("float32"))
        assert mean <= 0.5 and worst <= MAX_STEPS, (shape, mean, worst)


@pytest.mark.slow
def test_token_ids_of_any_length_through_a_bidirectional_lstm(rng):
    """The model of issue 18 ("input shape (40,) does not match the model's (1,)"): it exports
    from length-40 ids and runs on length-60 ids, both directions integer LSTMs. Untrained, its
    logits span little, so the int8 hidden state (rounded at every step in the file, not in QAT)
    costs more output steps than in a trained model: measured 0.84 / 3 at length 17, 0.91 / 3 at
    60, as a single integer LSTM here (0.87 / 2, 1.0 / 3); trained, 0.2 / 2 (test_text_models)."""
    inputs = keras.Input((None,), dtype="int32", name="ids")
    h = L.Embedding(50, 8)(inputs)
    h = L.Bidirectional(L.LSTM(8))(h)
    model = keras.Model(inputs, L.Dense(2)(h))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers kept float by the default policy
        qat, tfl = exported(model, rng.integers(0, 50, size=(48, 40)).astype("int32"))
    assert signature(tfl) == [[1, -1]]  # recurrent layers convert at batch 1; the length stays dynamic
    assert inspect_tflite(tfl).ops.count("UNIDIRECTIONAL_SEQUENCE_LSTM") == 2
    for length in (17, 60):
        mean, worst = steps(tfl, qat, rng.integers(0, 50, size=(16, length)).astype("int32"))
        assert mean <= 1.0 and worst <= 4 + 1e-3, (length, mean, worst)


@pytest.mark.slow
def test_an_integer_lstm_runs_at_other_lengths(rng):
    inputs = keras.Input((None, 3))
    h = L.Conv1D(8, 3, activation="relu")(inputs)
    h = L.LSTM(8)(h)
    model = keras.Model(inputs, L.Dense(4)(h))
    qat, tfl = exported(model, rng.normal(size=(64, 40, 3)).astype("float32"))
    assert "UNIDIRECTIONAL_SEQUENCE_LSTM" in inspect_tflite(tfl).ops and signature(tfl) == [[1, -1, 3]]
    for length in (20, 60):
        mean, worst = steps(tfl, qat, rng.normal(size=(32, length, 3)).astype("float32"))
        assert mean <= 0.75 and worst <= MAX_STEPS, (length, mean, worst)


@pytest.mark.slow
def test_evaluate_and_compare_at_another_length_than_the_export(rng):
    model = conv1d_model()
    qat, tfl = exported(model, rng.normal(size=(64, 40, 3)).astype("float32"))
    x60 = rng.normal(size=(48, 60, 3)).astype("float32")
    y60 = qat.predict(x60, verbose=0).argmax(1)  # the Keras model's own decisions
    file_top1 = run(tfl, x60).outputs[0].argmax(1)
    scores = qx.evaluate_tflite(tfl, x60, y60, latency_runs=5)
    assert scores["accuracy"] == pytest.approx(float((file_top1 == y60).mean())) and scores["accuracy"] >= 0.9
    table = qx.compare({"int8": tfl}, x60, y60, latency_runs=5)
    assert table.rows[0]["accuracy"] == scores["accuracy"]


@pytest.mark.slow
def test_ptq_keeps_dynamic_lengths(rng):
    model = conv1d_model()
    x = rng.normal(size=(64, 40, 3)).astype("float32")
    for mode in ("int8", "dynamic"):
        tfl = qx.ptq(model, mode, x)
        assert signature(tfl)[0][1] == -1, mode
        mean, worst = steps(tfl, model, rng.normal(size=(16, 25, 3)).astype("float32"))
        assert mean <= 0.5 and worst <= MAX_STEPS, (mode, mean, worst)


@pytest.mark.slow
def test_a_file_faithful_at_one_length_only_is_fixed_there_and_says_so(rng):
    """GroupNormalization's int8 sums are calibrated at the representative length and clip at a
    longer one (measured 53 mean steps at 64 after calibrating at 40): export checks the file at
    twice the length, converts it again at the data's length, and warns."""
    inputs = keras.Input((None, 4), name="signal")
    h = L.Conv1D(8, 3, padding="same", activation="relu")(inputs)
    h = L.GroupNormalization(2)(h)
    h = L.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, L.Dense(4)(h))
    x = rng.normal(size=(64, 40, 4)).astype("float32")
    qat = qx.quantize(model)
    qx.calibrate(qat, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tfl = qx.export_tflite(qat, x)
    if not tfl.report.fixed_lengths:  # faithful at twice the length too: then it must be so
        mean, worst = steps(tfl, qat, rng.normal(size=(16, 80, 4)).astype("float32"))
        assert mean <= max(2 * tfl.report.mean_error_steps, tfl.report.mean_error_steps + 1)
        pytest.skip("GroupNormalization kept its fidelity at twice the length on this TF version")
    assert any("twice the representative data's length" in str(w.message) for w in caught)
    assert signature(tfl) == [[1, 40, 4]] and tfl.report.fixed_lengths == (("signal", (None, 4), (40, 4)),)
    assert any("fixed at (40, 4)" in line for line in tfl.report.lines())
    with pytest.raises(ValueError, match=r"samples shaped \(64, 4\) do not fit the file's input \(40, 4\)") as err:
        run(tfl, rng.normal(size=(2, 64, 4)).astype("float32"))
    assert "calibrate" not in str(err.value).lower()


def test_the_runner_resizes_per_sample_length(rng):
    """In process: one Runner, three lengths in turn, each equal to the Keras float model
    (a float file, so the match is exact up to float rounding)."""
    model = conv1d_model()
    tfl = converter_for(model).convert()
    runner = Runner(tfl)
    assert runner.dynamic and runner.input_shapes == [(None, 3)]
    for length in (5, 30, 5):
        x = rng.normal(size=(3, length, 3)).astype("float32")
        np.testing.assert_allclose(runner.predict(x), model.predict(x, verbose=0), atol=1e-5)
    with pytest.raises(ValueError, match=r"samples shaped \(5, 4\) do not fit the file's input \(any, 3\)"):
        runner.predict(np.zeros((1, 5, 4), np.float32))
