"""Numerics of keras_qx's fake-quantizers against numpy references, plus their API edges."""
import numpy as np
import pytest

from keras_qx.quant import quantizers
from keras_qx._compat import keras, tf
from keras_qx.quant.quantizers import ActivationQuantizer, WeightQuantizer, export_trace


# ---- numpy references ---------------------------------------------------------------------
def ref_weight_fq(w, bits, per_channel=True, axis=-1):
    """Symmetric narrow-range fake quantization (TFLite's weight grid)."""
    w = np.asarray(w, np.float64)
    n = 2 ** (bits - 1) - 1
    if per_channel:
        reduce = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
        m = np.max(np.abs(w), axis=reduce, keepdims=True)
    else:
        m = np.max(np.abs(w))
    scale = m / n
    return np.clip(np.round(w / scale), -n, n) * scale, scale


def ref_activation_fq(x, min_val, max_val, bits):
    """Asymmetric fake quantization with TF's zero-point nudging (FakeQuantWithMinMaxVars)."""
    x = np.asarray(x, np.float64)
    levels = 2 ** bits - 1
    scale = (max_val - min_val) / levels
    zero_point = np.clip(np.round(-min_val / scale), 0, levels)
    nudged_min = -zero_point * scale
    nudged_max = nudged_min + levels * scale
    q = np.round((np.clip(x, nudged_min, nudged_max) - nudged_min) / scale) * scale + nudged_min
    return q, scale, nudged_min, nudged_max


def assert_matches_ideal(out, x, min_val, max_val, bits):
    """``out`` equals the float64 reference except at inputs within float32 rounding error of
    a rounding tie (half-way between two levels), where TF (float32 arithmetic, round half
    up) and numpy (float64, half to even) may pick neighbouring levels: one step apart."""
    ref, scale, nudged_min, nudged_max = ref_activation_fq(x, min_val, max_val, bits)
    t = (np.clip(np.asarray(x, np.float64), nudged_min, nudged_max) - nudged_min) / scale
    slack = 4 * np.finfo(np.float32).eps * (np.abs(x) + abs(nudged_min) + scale) / scale
    near_tie = np.abs(t - np.floor(t) - 0.5) < slack
    assert near_tie.mean() < 0.1  # 16 bits: float32 resolution is ~1e-2 of a step
    np.testing.assert_allclose(out[~near_tie], ref[~near_tie], rtol=1e-5, atol=scale * 1e-3)
    assert np.all(np.abs(out[near_tie] - ref[near_tie]) <= scale * 1.001)
    return ref, scale, nudged_min, nudged_max


def _build(quantizer, shape, name="kernel"):
    layer = keras.layers.Layer()
    return quantizer.build(tf.TensorShape(shape), name, layer)


def _run(quantizer, x, weights, training=True):
    return quantizer(tf.constant(x), training, weights).numpy()


def _channel_major(a, axis):
    """Move ``axis`` first and flatten the rest: one row per channel."""
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


# ---- WeightQuantizer numerics ---------------------------------------------------------------
@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("shape", [(5, 6), (3, 3, 4, 6)], ids=["dense", "conv"])
def test_weight_quantizer_matches_numpy_reference(shape, bits, per_channel):
    w = np.random.default_rng(bits).normal(size=shape).astype(np.float32)
    q = WeightQuantizer(bits, per_channel=per_channel, full_range=False)  # 2 bits: see test_full_range...
    weights = _build(q, shape)
    out = _run(q, w, weights)
    ref, scale = ref_weight_fq(w, bits, per_channel)
    # Symmetric narrow range puts the zero point at exactly 2**(b-1), so TF's nudging does
    # not move the range and the outputs agree to float32 rounding.
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.max(scale))

    # The range the quantizer stored is the symmetric [-max|w|, max|w|] of each channel.
    m = np.max(np.abs(_channel_major(w, -1)), axis=1) if per_channel else np.max(np.abs(w))
    np.testing.assert_allclose(weights["max_var"].numpy(), m, rtol=1e-6)
    np.testing.assert_allclose(weights["min_var"].numpy(), -m, rtol=1e-6)

    # At most 2**b - 1 levels per channel, and every value is an integer multiple of the step.
    n = 2 ** (bits - 1) - 1
    rows = _channel_major(out, -1) if per_channel else out.reshape(1, -1)
    steps = np.broadcast_to(np.asarray(scale).reshape(-1, 1), (rows.shape[0], 1))
    for row, step in zip(rows, steps[:, 0]):
        assert len(np.unique(row)) <= 2 ** bits - 1
        k = row / step
        np.testing.assert_allclose(k, np.round(k), atol=1e-4)
        assert np.all(np.abs(np.round(k)) <= n)


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("shape,axis", [((5, 6), -1), ((3, 3, 4, 6), -1), ((3, 3, 5, 4), -2)])
def test_full_range_weight_quantizer_matches_numpy_reference(shape, axis, bits, per_channel):
    """The two's-complement grid {-2**(b-1) .. 2**(b-1) - 1} * max|w| / 2**(b-1) (INT2's -2..1)."""
    w = np.random.default_rng(bits).normal(size=shape).astype(np.float32)
    q = WeightQuantizer(bits, per_channel=per_channel, channel_axis=axis, full_range=True)
    weights = _build(q, shape)
    out = _run(q, w, weights)
    half = 2 ** (bits - 1)
    if per_channel:
        reduce = tuple(i for i in range(w.ndim) if i != axis % w.ndim)
        m = np.max(np.abs(w.astype(np.float64)), axis=reduce, keepdims=True)
    else:
        m = np.max(np.abs(w.astype(np.float64)))
    step = m / half
    ref = np.clip(np.floor(w / step + 0.5), -half, half - 1) * step
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.max(step))
    np.testing.assert_allclose(weights["min_var"].numpy(), -np.ravel(m), rtol=1e-6)
    np.testing.assert_allclose(q.step_for(weights["min_var"].numpy(), weights["max_var"].numpy()), np.ravel(step),
                               rtol=1e-5)
    # eval mode reuses the stored range; export mode gives the same values (through the INT4 grid)
    np.testing.assert_allclose(_run(q, w, weights, training=False), out, rtol=1e-6, atol=1e-7)
    with export_trace():
        np.testing.assert_allclose(_run(q, w, weights, training=False), out, rtol=1e-5, atol=1e-6 * np.max(step))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_quantizer_channel_axis_minus_2(bits):
    # Conv2DTranspose kernels are (h, w, out, in): the output channel is axis -2.
    shape = (3, 3, 5, 4)
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    w[..., 2, :] *= 10.0  # one channel with a much larger range: a per-tensor scale would differ
    q = WeightQuantizer(bits, per_channel=True, channel_axis=-2, full_range=False)
    weights = _build(q, shape)
    assert weights["min_var"].shape == (5,)
    out = _run(q, w, weights)
    ref, scale = ref_weight_fq(w, bits, per_channel=True, axis=-2)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.max(scale))
    # ...and it is not what quantizing over the last axis would give.
    wrong, _ = ref_weight_fq(w, bits, per_channel=True, axis=-1)
    assert not np.allclose(out, wrong, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights["max_var"].numpy(), np.abs(_channel_major(w, -2)).max(1), rtol=1e-6)


def test_weight_quantizer_eval_mode_reuses_stored_range():
    w = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
    q = WeightQuantizer(4)
    weights = _build(q, w.shape)
    train = _run(q, w, weights, training=True)
    before = weights["max_var"].numpy().copy()
    # Smaller values: the range must not shrink in eval mode. (0.37, not 0.5: halving the
    # extreme weight, at 7 steps, would put it exactly on a rounding tie at 3.5 steps.)
    evals = _run(q, w * 0.37, weights, training=False)
    np.testing.assert_array_equal(weights["max_var"].numpy(), before)
    np.testing.assert_allclose(_run(q, w, weights, training=False), train, rtol=1e-6, atol=1e-7)
    ref, _ = ref_weight_fq(np.concatenate([w, w * 0.37]), 4)  # max|w| per channel comes from w
    np.testing.assert_allclose(evals, ref[6:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
@pytest.mark.parametrize("shape,axis", [((7, 6), -1), ((3, 3, 4, 6), -1), ((3, 3, 4, 6), -2)])
def test_weight_quantizer_straight_through_gradient(shape, axis, per_channel):
    w = tf.constant(np.random.default_rng(0).normal(size=shape).astype(np.float32))
    q = WeightQuantizer(4, per_channel=per_channel, channel_axis=axis)
    weights = _build(q, shape)
    with tf.GradientTape() as tape:
        tape.watch(w)
        y = tf.reduce_sum(q(w, True, weights))
    grad = tape.gradient(y, w).numpy()
    wn = w.numpy()
    m = np.max(np.abs(wn), axis=tuple(i for i in range(wn.ndim) if i != axis % wn.ndim), keepdims=True) \
        if per_channel else np.max(np.abs(wn))
    # The range is taken from the values, so every weight is inside it: gradient 1. The one
    # exception is the extreme weight of a channel: TF recomputes the nudged range as
    # (quant_max - zero_point) * scale in float32, which can land one ulp inside max|w|, and
    # the clip then gives that single boundary element gradient 0 (seen with seed 0 on the
    # conv shape). Hence "strictly inside" here and only {0, 1} on the boundary.
    inside = np.abs(wn) < m * (1 - 1e-6)
    assert inside.sum() >= wn.size - (np.size(m) * 2)
    np.testing.assert_array_equal(grad[inside], 1.0)
    assert set(np.unique(grad[~inside])) <= {0.0, 1.0}


# ---- ActivationQuantizer numerics -----------------------------------------------------------
def _tf_fake_quant_reference(x, min_val, max_val, bits):
    """float32 transcription of TF's FakeQuantWithMinMaxVars kernel (Nudge + floor(+0.5))."""
    x = np.asarray(x, np.float32)
    min_val, max_val = np.float32(min_val), np.float32(max_val)
    qmin, qmax = np.float32(0), np.float32(2 ** bits - 1)
    scale = (max_val - min_val) / (qmax - qmin)
    inv_scale = (qmax - qmin) / (max_val - min_val)
    zp_from_min = qmin - min_val / scale
    zp = np.clip(np.floor(zp_from_min + np.float32(0.5)), qmin, qmax)  # std::round; clipped at 0
    nudged_min = (qmin - zp) * scale
    nudged_max = (qmax - zp) * scale
    shifted = np.clip(x, nudged_min, nudged_max) - nudged_min
    return np.floor(shifted * inv_scale + np.float32(0.5)) * scale + nudged_min


def test_activation_quantizer_training_levels_and_reference():
    rng = np.random.default_rng(0)
    q = ActivationQuantizer(8)
    weights = _build(q, (None, 32), name="act")
    decay = q.ema_decay
    expect_min, expect_max = -6.0, 6.0
    for _ in range(4):
        x = (rng.normal(size=(128, 32)) * 3 + 1).astype(np.float32)
        out = _run(q, x, weights, training=True)
        expect_min = decay * expect_min + (1 - decay) * min(x.min(), 0.0)
        expect_max = decay * expect_max + (1 - decay) * max(x.max(), 0.0)
    mn, mx = float(weights["min_var"].numpy()), float(weights["max_var"].numpy())
    # The range is an exponential moving average of the batch ranges.
    np.testing.assert_allclose([mn, mx], [expect_min, expect_max], rtol=1e-5)

    distinct = np.unique(out)
    assert len(distinct) <= 256
    assert len(distinct) > 100  # 4096 N(1, 9) samples do fill most of the grid

    _, scale, nudged_min, nudged_max = assert_matches_ideal(out, x, mn, mx, 8)
    # The float32 transcription of TF's kernel agrees to rounding error everywhere.
    np.testing.assert_allclose(out, _tf_fake_quant_reference(x, mn, mx, 8), rtol=1e-5, atol=1e-5)
    # Levels lie on the nudged grid and inside the nudged range.
    k = (out - nudged_min) / scale
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)
    assert out.min() >= nudged_min - 1e-5 and out.max() <= nudged_max + 1e-5


def test_activation_quantizer_gradient_inside_one_outside_zero():
    rng = np.random.default_rng(1)
    q = ActivationQuantizer(8)
    weights = _build(q, (None, 16), name="act")
    for _ in range(3):
        _run(q, (rng.normal(size=(64, 16)) * 2).astype(np.float32), weights, training=True)
    x = tf.constant(np.linspace(-12, 12, 4801).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(q(x, True, weights))
    grad = tape.gradient(y, x).numpy()
    mn, mx = float(weights["min_var"].numpy()), float(weights["max_var"].numpy())
    _, scale, nudged_min, nudged_max = ref_activation_fq(x.numpy(), mn, mx, 8)
    xn = x.numpy()
    inside = (xn > nudged_min + 1e-4) & (xn < nudged_max - 1e-4)
    outside = (xn < nudged_min - 1e-4) | (xn > nudged_max + 1e-4)
    assert inside.sum() > 1000 and outside.sum() > 1000  # the range is ~[-6, 6]: both occur
    np.testing.assert_array_equal(grad[inside], 1.0)
    np.testing.assert_array_equal(grad[outside], 0.0)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_activation_quantizer_eval_mode_uses_stored_range(bits):
    q = ActivationQuantizer(bits)
    weights = _build(q, (None, 8), name="act")
    # Random inputs, not a linspace: an evenly spaced grid hits exact rounding ties, which
    # TF (float32, round half up) and numpy (float64, half to even) break differently.
    x = np.random.default_rng(bits).uniform(-8, 8, size=2000).astype(np.float32)
    out = _run(q, x, weights, training=False)
    # Untrained range is the initial [-6, 6]; eval mode must not update it.
    assert float(weights["min_var"].numpy()) == -6.0 and float(weights["max_var"].numpy()) == 6.0
    np.testing.assert_allclose(out, _tf_fake_quant_reference(x, -6.0, 6.0, bits), rtol=1e-5, atol=1e-5)
    _, scale, nudged_min, nudged_max = assert_matches_ideal(out, x, -6.0, 6.0, bits)
    assert len(np.unique(out)) <= 2 ** bits
    # Inputs beyond the range clip to its ends.
    np.testing.assert_allclose(out[x < -6.1], nudged_min, rtol=1e-6)
    np.testing.assert_allclose(out[x > 6.1], nudged_max, rtol=1e-6)


# ---- argument checking and quantizers.get -------------------------------------------------
@pytest.mark.parametrize(
    "make,exc,text",
    [
        (lambda: WeightQuantizer(1), ValueError, "=1 "),
        (lambda: WeightQuantizer(9), ValueError, "=9 "),
        (lambda: WeightQuantizer(0), ValueError, "=0 "),
        (lambda: WeightQuantizer(4.0), TypeError, "4.0"),
        (lambda: WeightQuantizer(True), TypeError, "True"),
        (lambda: WeightQuantizer("4"), TypeError, "'4'"),
        (lambda: ActivationQuantizer(17), ValueError, "=17 "),
        (lambda: ActivationQuantizer(1), ValueError, "=1 "),
        (lambda: ActivationQuantizer(8.0), TypeError, "8.0"),
        (lambda: ActivationQuantizer(8, ema_decay=1.0), ValueError, "1.0"),
    ],
    ids=["w1", "w9", "w0", "w4.0", "wTrue", "w'4'", "a17", "a1", "a8.0", "ema1"],
)
def test_bad_bits_raise_naming_the_value(make, exc, text):
    with pytest.raises(exc) as info:
        make()
    assert text in str(info.value)


def test_numpy_integer_bits_accepted():
    assert WeightQuantizer(np.int64(4)).bits == 4
    assert type(WeightQuantizer(np.int64(4)).bits) is int


@pytest.mark.parametrize(
    "alias,expected",
    [
        ("w4", WeightQuantizer(4, per_channel=True)),
        ("w2", WeightQuantizer(2)),
        ("w8", WeightQuantizer(8)),
        ("w4_per_tensor", WeightQuantizer(4, per_channel=False)),
        ("a8", ActivationQuantizer(8)),
        ("a16", ActivationQuantizer(16)),
    ],
)
def test_get_aliases(alias, expected):
    q = quantizers.get(alias)
    assert q == expected
    assert quantizers.get(q) is q
    assert quantizers.get(quantizers.serialize(q)) == q


def test_get_none_and_dict():
    assert quantizers.get(None) is None
    config = keras.utils.serialize_keras_object(WeightQuantizer(3, per_channel=False, channel_axis=-2))
    q = quantizers.get(config)
    assert isinstance(q, WeightQuantizer)
    assert (q.bits, q.per_channel, q.channel_axis) == (3, False, -2)


@pytest.mark.parametrize("identifier,text", [("bogus", "'bogus'"), ("a8_per_tensor", "'a8_per_tensor'"), ("w", "'w'"),
                                             (3, "3"), (4.5, "4.5")])
def test_get_rejects_unknown(identifier, text):
    with pytest.raises(ValueError) as info:
        quantizers.get(identifier)
    assert text in str(info.value)


def test_alias_with_out_of_range_bits_names_value():
    # "w9" parses as an alias and then fails the bit check; either way the message says 9.
    with pytest.raises(ValueError, match="9"):
        quantizers.get("w9")


# ---- serialization ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "quantizer",
    [WeightQuantizer(4), WeightQuantizer(2, per_channel=False), WeightQuantizer(8, channel_axis=-2),
     ActivationQuantizer(8), ActivationQuantizer(16, ema_decay=0.99)],
    ids=repr,
)
def test_keras_serialization_round_trip(quantizer):
    data = keras.utils.serialize_keras_object(quantizer)
    assert data["registered_name"].startswith("keras_qx>")
    assert data["registered_name"] == "keras_qx>" + type(quantizer).__name__
    back = keras.utils.deserialize_keras_object(data)
    assert type(back) is type(quantizer)
    assert back == quantizer
    assert back.get_config() == quantizer.get_config()
    # Through the module helpers and without custom_objects, too.
    assert quantizers.deserialize(quantizers.serialize(quantizer)) == quantizer
    # Equality really compares the config.
    other = type(quantizer)(**{**quantizer.get_config(), "bits": 3 if quantizer.bits != 3 else 5})
    assert other != quantizer


def test_per_channel_rank3_kernel_is_quantized():
    """Rank-3 kernels (Conv1D: k, in, out) per channel: tfmot's LastValueQuantize only
    handles rank 2 and 4, so WeightQuantizer reshapes around it."""
    shape = (3, 4, 6)
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    q = WeightQuantizer(4, per_channel=True)
    weights = _build(q, shape)
    out = _run(q, w, weights)
    ref, scale = ref_weight_fq(w, 4, per_channel=True)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6 * np.max(scale))
