"""Post-training modes: each converts the trained digits CNN and keeps its accuracy in TFLite."""
import pytest

import keras_qx as qx

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def float_size(trained_cnn):
    from keras_qx._compat import tf

    return len(tf.lite.TFLiteConverter.from_keras_model(trained_cnn).convert())


@pytest.mark.parametrize("mode, max_drop, max_ratio", [
    ("dynamic", 0.01, 0.3), ("int8", 0.01, 0.3), ("float16", 0.005, 0.55), ("int16x8", 0.01, 0.35)])  # int16x8 keeps int64 biases
def test_ptq_modes(trained_cnn, digits, float_size, mode, max_drop, max_ratio):
    (x, _), (xt, yt) = digits
    float_acc = float((trained_cnn.predict(xt, verbose=0).argmax(1) == yt).mean())
    tfl = qx.ptq(trained_cnn, mode, x[:200])
    info = qx.inspect_tflite(tfl)
    result = qx.evaluate_tflite(tfl, xt, yt, latency_runs=10)
    assert result["accuracy"] >= float_acc - max_drop
    assert len(tfl) <= max_ratio * float_size
    if mode == "int8":
        assert info.fully_integer
    if mode == "float16":
        assert any(w[1] == "FLOAT16" for w in info.weights)
    if mode == "dynamic":  # int8 weights, float compute
        assert "INT8" in {w[1] for w in info.weights} and "FULLY_CONNECTED" in info.float_ops
        assert set(info.activation_types) == {"FLOAT32"}, info.activation_types
    if mode == "int16x8":  # int16 activations between the ops, int8 kernels
        assert info.activation_types.get("INT16", 0) >= 5, info.activation_types
        assert "INT8" not in info.activation_types, info.activation_types  # float only at the edges
        kernels = {w[1] for w in info.weights if len(w[2]) >= 2}
        assert kernels == {"INT8"}, kernels


def test_ptq_errors(trained_cnn):
    with pytest.raises(ValueError, match="unknown PTQ mode 'int4'"):
        qx.ptq(trained_cnn, "int4")
    with pytest.raises(ValueError, match="representative_data"):
        qx.ptq(trained_cnn, "int8")
