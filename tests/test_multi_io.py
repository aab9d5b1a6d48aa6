"""Models with several inputs and outputs: quantize, export, verify per output, evaluate with a
metric per output; the TFLite file's outputs are matched to the Keras outputs by signature
(the subgraph lists them in another order)."""
import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras
from keras_qx._runtime import Runner
from keras_qx.lite.verify import check_agreement, combine, judge


def _two_by_two():
    # Input and output names sort in the opposite order to the model's, and the converter lists
    # these two inputs in the file as (b, a): order mix-ups cannot pass.
    a, b = keras.Input((6,), name="a"), keras.Input((4,), name="b")
    h = keras.layers.Concatenate(name="cat")([keras.layers.Dense(8, activation="relu", name="fa")(a),
                                             keras.layers.Dense(8, activation="relu", name="fb")(b)])
    return keras.Model([a, b], [keras.layers.Dense(3, name="zz_class")(h), keras.layers.Dense(1, name="aa_value")(h)])


@pytest.fixture(scope="module")
def exported():
    rng = np.random.default_rng(0)
    xa, xb = rng.random((256, 6)).astype("float32"), 10 * rng.random((256, 4)).astype("float32")  # unlike scales
    labels, values = (xa[:, :3] + xb[:, :3] / 10).argmax(1), xa.sum(1) - xb.sum(1) / 10
    keras.utils.set_random_seed(0)
    qat = qx.quantize(_two_by_two())
    qat.compile("adam", [keras.losses.SparseCategoricalCrossentropy(from_logits=True), "mse"])
    qat.fit([xa, xb], [labels, values], epochs=8, batch_size=32, verbose=0)
    tfl = qx.export_tflite(qat, {"b": xb, "a": xa})  # a dict by input name, in any order
    return qat, tfl, (xa, xb), (labels, values)


def test_outputs_come_back_in_the_keras_order(exported):
    qat, tfl, (xa, xb), _ = exported
    runner = Runner(bytes(tfl))
    assert [d["signature_name"] for d in runner.inputs] == ["b", "a"]  # the file's own order
    ours = runner.predict({"a": xa[:50], "b": xb[:50]})
    keras_out = qat.predict([xa[:50], xb[:50]], verbose=0)
    assert [o.shape for o in ours] == [(50, 3), (50, 1)]
    for mine, ref, step in zip(ours, keras_out, Runner(bytes(tfl)).output_steps):
        assert np.abs(mine - ref).max() <= 1.01 * step  # within one output step, per output


def test_verification_is_per_output(exported):
    _, tfl, _, _ = exported
    v = tfl.report.verification
    assert [r.output for r in v.per_output] == ["zz_class", "aa_value"]
    assert [r.classifier for r in v.per_output] == [True, False]
    assert v.max_error_steps == max(r.max_error_steps for r in v.per_output) <= 1.0 + 1e-3
    assert any("output 'aa_value'" in line for line in tfl.report.lines())


def test_evaluate_with_a_metric_per_output(exported):
    qat, tfl, (xa, xb), (labels, values) = exported
    got = qx.evaluate_tflite(tfl, {"a": xa, "b": xb}, [labels, values], metric=["accuracy", "mae"], latency_runs=3)
    logits, pred = Runner(bytes(tfl)).predict({"a": xa, "b": xb})
    assert got["accuracy/output_0"] == pytest.approx(float((logits.argmax(1) == labels).mean()))
    assert got["mae/output_1"] == pytest.approx(float(np.abs(pred[:, 0] - values).mean()), rel=1e-5)
    keras_logits = qat.predict([xa, xb], verbose=0)[0]
    assert abs(got["accuracy/output_0"] - float((keras_logits.argmax(1) == labels).mean())) <= 0.02
    assert got["threads"] == 1 and got["latency_ms"] > 0


def test_mistakes_with_several_inputs_name_the_fix(exported):
    _, tfl, (xa, xb), (labels, values) = exported
    with pytest.raises(ValueError, match=r"2 inputs \['a', 'b'\]: pass x as a dict keyed by input name"):
        qx.evaluate_tflite(tfl, [xa, xb], labels)
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        qx.evaluate_tflite(tfl, {"a": xa}, labels)
    with pytest.raises(ValueError, match="2 outputs but y holds 3 entries"):
        qx.evaluate_tflite(tfl, {"a": xa, "b": xb}, [labels, values, values])
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        qx.evaluate_tflite(tfl, {"a": xa, "b": xb}, [labels, values], metric="f1")
    with pytest.raises(ValueError, match=r"inputs hold different numbers of samples"):
        qx.evaluate_tflite(tfl, {"a": xa, "b": xb[:10]}, None)
    with pytest.raises(ValueError, match=r"one array per input"):
        qx.export_tflite(exported[0], xa)


def test_a_disagreeing_output_is_named():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(64, 5)) * 20
    good = judge(ref + 0.3, ref, 1.0)
    bad = judge(ref[:, ::-1].copy(), ref, 1.0)  # a file with its classes reversed
    verdict = combine([good.__class__(**{**good.__dict__, "output": "first"}),
                       bad.__class__(**{**bad.__dict__, "output": "second"})])
    assert verdict.agreement == bad.agreement < 0.5
    with pytest.raises(qx.ExportError, match="output 'second' of the TFLite model disagrees"):
        check_agreement(verdict, 0.9)
