"""keras_qx.lite.bias_grid: biases moved onto the int32 grid TFLite stores them on, so that the QAT
model adds the bias the file adds (the one-step flips compare_layers found in every convolution of
the application families came from that rounding)."""
import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras
from keras_qx._runtime import debug_interpreter, ops_details
from keras_qx.lite.bias_grid import input_step, snap_biases

L = keras.layers


def _model():
    """Every kind of bias the file stores as int32: a conv's own bias, a BN folded into a conv
    (with a fused ReLU), a depthwise conv + BN, a standalone BN (one DEPTHWISE_CONV_2D), a Dense."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", name="conv_b")(inputs)
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(x)
    x = L.ReLU(name="relu")(L.BatchNormalization(name="bn")(x))
    y = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    y = L.BatchNormalization(name="dw_bn")(y)
    x = L.Add(name="add")([x, y])
    x = L.BatchNormalization(name="free_bn")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(5, name="out")(x))


def _trained(rng):
    model = _model()
    for layer in model.layers:  # BN statistics as an untrained network has them: gains 0.1..10
        if isinstance(layer, L.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2, c), rng.normal(0, 0.5, c), rng.normal(0, 1, c),
                               10.0 ** rng.uniform(-2, 2, c)])
    x = rng.normal(0, 1, (32, 8, 8, 3)).astype("float32")
    qat = qx.quantize(model)
    qat.compile(keras.optimizers.SGD(1e-6), "mse")
    qat.fit(x, rng.random((32, 5)), epochs=3, batch_size=32, verbose=0)
    return qat, x


def test_snap_moves_only_biases_and_only_once(rng):
    qat, _ = _trained(rng)
    before = {w.name: w.numpy().copy() for w in qat.weights}
    assert snap_biases(qat) == 5  # conv_b's bias, bn, dw_bn, free_bn betas, out's bias
    moved = {n: np.abs(w.numpy() - before[w.name]).max() for w in qat.weights
             for n in [w.name] if not np.array_equal(w.numpy(), before[w.name])}
    assert moved and all(("bias" in n or "beta" in n) for n in moved), moved
    x_step = input_step(qat.get_layer("quant_conv_b"))
    assert x_step == pytest.approx(float(np.ptp(np.r_[qat.get_layer("quantize_layer").quantizer_vars["min_var"].numpy(),
                                                       qat.get_layer("quantize_layer").quantizer_vars["max_var"].numpy(),
                                                       0.0])) / 255, rel=1e-6)
    again = {w.name: w.numpy().copy() for w in qat.weights}
    snap_biases(qat)
    for w in qat.weights:  # on the grid already: a second snap does not move anything
        np.testing.assert_allclose(w.numpy(), again[w.name], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_file_biases_are_the_snapped_biases_and_outputs_agree(rng):
    qat, x = _trained(rng)
    tfl = qx.export_tflite(qat, x, min_agreement=0.0)  # snaps, then converts
    # Every int32 bias of the file times its scale is the bias Keras adds (conv_b's own bias).
    it = debug_interpreter(bytes(tfl))
    det = {d["index"]: d for d in it.get_tensor_details()}
    conv_b = [o for o in ops_details(it) if o["op_name"] == "CONV_2D"
              and "conv_b" in det[int(o["outputs"][0])]["name"] and "quant_conv/" not in det[int(o["outputs"][0])]["name"]]
    assert conv_b, [det[int(o["outputs"][0])]["name"] for o in ops_details(it)]
    b = int(conv_b[0]["inputs"][2])
    stored = it.get_tensor(b).astype(np.float64) * det[b]["quantization_parameters"]["scales"]
    np.testing.assert_allclose(stored, qat.get_layer("quant_conv_b").layer.bias.numpy(), rtol=1e-5, atol=1e-9)
    # XNNPACK (the default runtime) now computes what the simulation computes, up to rare ties.
    assert tfl.report.max_error_steps <= 1.0 + 1e-3 and tfl.report.mean_error_steps < 0.05, tfl.report.lines()
