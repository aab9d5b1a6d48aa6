"""Where the TFLite runtime rounds its own way, and what QAT simulates there.

* int8 ``MEAN`` (``GlobalAveragePooling2D``): XNNPACK rounds the mean to nearest (halfway values
  to even, which QAT now does too);
  the built-in kernel (``optimized_integer_ops::Mean``), on an output scale of its own, rounds the
  zero-point term apart from the sum (``round(sum * M) + z_out - round(z_in * s_in / s_out)``) and
  lands one step up on a share of the values. On its input's scale both round to nearest, so a
  squeeze-excite squeeze now keeps its input's grid (:class:`InputGridQuantizer`).
* int8 ``AVERAGE_POOL_2D`` computes onto its input's grid (the converter requires one scale):
  QAT now rounds the average onto that grid instead of keeping the exact average (halfway
  values away from zero, as both kernel sets do).
"""
import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras, tf
from keras_qx.lite.fidelity import debug_tflite
from keras_qx.quant.configs import OutputQuantizeConfig
from keras_qx.quant.quantizers import ActivationQuantizer, InputGridQuantizer, input_grid

L = keras.layers


def _se_model():
    """Squeeze-excite (GlobalAveragePooling2D(keepdims=True) -> 1x1 convs -> sigmoid ->
    Multiply), then an AveragePooling2D: the two ops onto their input's grid."""
    inputs = keras.Input((8, 8, 3), name="image")
    x = L.Conv2D(16, 3, padding="same", activation="swish", name="conv")(inputs)
    s = L.GlobalAveragePooling2D(keepdims=True, name="squeeze")(x)
    s = L.Conv2D(4, 1, activation="relu", name="reduce")(s)
    s = L.Conv2D(16, 1, activation="sigmoid", name="expand")(s)
    x = L.Multiply(name="excite")([x, s])
    x = L.Conv2D(16, 1, name="project")(x)
    x = L.AveragePooling2D(2, name="pool")(x)
    x = L.Conv2D(8, 3, name="conv2")(x)
    head = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, L.Dense(4, name="out")(head))


def test_squeeze_and_average_pool_round_onto_their_input_grid():
    qat = qx.quantize(_se_model())
    for name in ("squeeze", "pool"):
        config = qat.get_layer(f"quant_{name}").quantize_config
        assert isinstance(config, OutputQuantizeConfig) and isinstance(config.activation_quantizer, InputGridQuantizer)
    # a classifier head's pooling keeps a range of its own
    assert type(qat.get_layer("quant_gap").quantize_config.activation_quantizer) is ActivationQuantizer
    again = OutputQuantizeConfig.from_config(qat.get_layer("quant_pool").quantize_config.get_config())
    assert again == qat.get_layer("quant_pool").quantize_config


def test_input_grid_quantizer_rounds_an_average_onto_the_fake_quant_grid():
    low, high = -0.5, 3.0
    lo = tf.Variable(low)
    hi = tf.Variable(high)

    @tf.function
    def pooled(x):
        x = tf.quantization.fake_quant_with_min_max_vars(x, lo, hi)
        y = tf.nn.avg_pool2d(tf.identity(x), 2, 2, "VALID")
        assert input_grid(y) is not None
        return y, InputGridQuantizer()(y, False, {})

    x = np.random.default_rng(0).uniform(-1, 4, (2, 4, 4, 3)).astype("float32")
    exact, rounded = (t.numpy() for t in pooled(x))
    step = (high - low) / 255
    zero = np.round(-low / step)  # the nudged grid: zero exactly representable
    on_grid = (np.floor(exact / step + zero + 0.5) - zero) * step  # fake-quant rounds ties up
    np.testing.assert_allclose(rounded, on_grid, atol=1e-5)
    assert np.abs(exact - rounded).max() > step / 8  # the exact average is off the grid
    eager = tf.constant(exact)
    assert InputGridQuantizer()(eager, False, {}) is eager  # no graph to find a grid in: left as it is


def _mean_file(keepdims, in_range, out_range, shape=(1, 6, 6, 24)):
    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32)])
    def f(x):
        x = tf.quantization.fake_quant_with_min_max_args(x, *in_range)
        return tf.quantization.fake_quant_with_min_max_args(tf.reduce_mean(x, axis=[1, 2], keepdims=keepdims),
                                                            *out_range)

    conv = tf.lite.TFLiteConverter.from_concrete_functions([f.get_concrete_function()], f)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    return conv.convert()


def _mean_steps_off(data, xnnpack, samples=60):
    """(share of outputs one step above, below) the mean rounded to nearest (ties excluded)."""
    from keras_qx._runtime import interpreter

    it = interpreter(data, xnnpack=xnnpack)
    di, do = it.get_input_details()[0], it.get_output_details()[0]
    (si, zi), (so, zo) = di["quantization"], do["quantization"]
    rng = np.random.default_rng(1)
    q = np.clip(rng.integers(-128, 128, (samples, *di["shape"][1:])) // 3 - 60, -128, 127).astype(np.int8)
    out = []
    for sample in q:
        it.set_tensor(di["index"], sample[None])
        it.invoke()
        out.append(it.get_tensor(do["index"]).astype(np.int64).reshape(-1))
    out = np.concatenate(out)
    v = (q.astype(np.float64).mean(axis=(1, 2)).reshape(-1) - zi) * si / so
    tie = np.abs(v - np.floor(v) - 0.5) < 1e-6
    d = (out - np.clip(np.floor(v + 0.5) + zo, -128, 127))[~tie]
    return (d > 0).mean(), (d < 0).mean()


@pytest.mark.slow
def test_int8_mean_kernels_round_to_nearest_on_the_input_grid_only():
    own = _mean_file(True, (-0.37, 5.0), (-0.2, 1.7))
    same = _mean_file(True, (-0.37, 5.0), (-0.37, 5.0))
    assert _mean_steps_off(own, xnnpack=True) == (0.0, 0.0)
    up, down = _mean_steps_off(own, xnnpack=False)
    assert up > 0.05 and down == 0.0, (up, down)  # measured 13% up (3,600 values)
    for xnnpack in (True, False):
        assert _mean_steps_off(same, xnnpack=xnnpack) == (0.0, 0.0)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured in the full-suite run: the squeeze's own error under the built-in "
                   "MEAN kernel is 0.25 mean / 1 max steps, not < 0.02: the input-grid rounding does not yet make "
                   "that kernel agree (XNNPACK, which export verifies with, computes MEAN exactly)")
def test_squeeze_excite_file_agrees_with_qat_where_the_runtime_rounds_its_own_way(rng):
    keras.utils.set_random_seed(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    qat = qx.quantize(_se_model())
    qat.compile(keras.optimizers.SGD(1e-6), "mse")
    qat.fit(x, rng.random((64, 4)), epochs=3, batch_size=64, verbose=0)
    tfl = qx.export_tflite(qat, x, min_agreement=0.0)
    cmp = debug_tflite(qat, bytes(tfl), x[:32])  # the built-in kernels
    squeeze, pool = cmp["squeeze"], cmp["pool"]
    assert squeeze.op == "MEAN" and pool.op == "AVERAGE_POOL_2D", cmp.lines()
    # before: squeeze own mean ~0.1-0.4 (one step up), pool own mean 0.25 / max 0.5
    for err in (squeeze, pool):
        assert err.own_mean_steps < 0.02 and err.own_max_steps <= 1.0 + 1e-3, cmp.lines()


def _grid_file_and_simulation(op, in_range, shape, ties):
    """The TFLite file of fake-quant -> ``op`` (MEAN over the spatial axes, or a 2x2 average
    pool) -> fake-quant on the input's range, and the same graph with :class:`InputGridQuantizer`
    as QAT runs it."""
    def average(x):
        if op == "mean":
            return tf.reduce_mean(x, axis=[1, 2], keepdims=True)
        return tf.nn.avg_pool2d(x, 2, 2, "VALID")

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32)])
    def plain(x):
        x = tf.quantization.fake_quant_with_min_max_args(x, *in_range)
        return tf.quantization.fake_quant_with_min_max_args(average(x), *in_range)

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32)])
    def simulated(x):
        return InputGridQuantizer(ties)(average(tf.quantization.fake_quant_with_min_max_args(x, *in_range)), False, {})

    conv = tf.lite.TFLiteConverter.from_concrete_functions([plain.get_concrete_function()], plain)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    return conv.convert(), simulated


@pytest.mark.parametrize("op, ties, kernels", [("mean", "even", (True,)), ("pool", "away", (True, False))])
@pytest.mark.parametrize("in_range", [(-0.37, 5.0), (-3.0, 0.5), (-1.0, 1.3)])
def test_halfway_averages_round_as_the_runtime_does(op, ties, kernels, in_range):
    """A 2x2 average lands halfway between grid points on a quarter of its values: QAT rounds
    them as the runtime's kernel does (int8 MEAN under XNNPACK: to even; AVERAGE_POOL_2D, both
    kernel sets: away from zero), on the int8 value the file holds, for even and odd zero
    points. The fake-quant's own rule (half up) misses half of those ties."""
    from keras_qx._runtime import interpreter

    shape = (1, 2, 2, 64) if op == "mean" else (1, 4, 4, 64)
    data, simulated = _grid_file_and_simulation(op, in_range, shape, ties)
    rng = np.random.default_rng(0)
    for xnnpack in kernels:
        it = interpreter(data, xnnpack=xnnpack)
        di, do = it.get_input_details()[0], it.get_output_details()[0]
        (scale, zero), (out_scale, out_zero) = di["quantization"], do["quantization"]
        assert (scale, zero) == (out_scale, out_zero)
        up = _grid_file_and_simulation(op, in_range, shape, "up")[1]
        ties_seen = missed_by_up = 0
        for _ in range(10):
            q = rng.integers(-128, 128, shape).astype(np.int8)
            it.set_tensor(di["index"], q)
            it.invoke()
            got = it.get_tensor(do["index"]).astype(np.int64)
            x = tf.constant((q.astype(np.float32) - zero) * scale)
            sim = np.round(simulated(x).numpy() / scale + zero).astype(np.int64)
            np.testing.assert_array_equal(sim, got)
            exact = (tf.reduce_mean(x, axis=[1, 2], keepdims=True) if op == "mean" else
                     tf.nn.avg_pool2d(x, 2, 2, "VALID")).numpy() / scale + zero
            ties_seen += int((np.abs(exact - np.floor(exact) - 0.5) < 1e-3).sum())
            missed_by_up += int((np.round(up(x).numpy() / scale + zero) != got).sum())
        assert ties_seen > 100 and missed_by_up > 30, (ties_seen, missed_by_up)
