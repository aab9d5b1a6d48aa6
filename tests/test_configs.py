"""keras_qx QuantizeConfigs: round trips, the kernel-kind table, and a real tfmot wrapper."""
import inspect

import numpy as np
import pytest

from keras_qx.quant import configs
from keras_qx._compat import keras, quantize_wrapper, tf
from keras_qx.quant.configs import (
    ActivationQuantizeConfig,
    KernelQuantizeConfig,
    NoOpQuantizeConfig,
    OutputQuantizeConfig,
)
from keras_qx.quant.kinds import kernel_kind
from keras_qx.quant.quantizers import ActivationQuantizer, WeightQuantizer

L = keras.layers

SAMPLES = {
    KernelQuantizeConfig: [
        KernelQuantizeConfig(["kernel"], weight_bits=4, per_channel=False, channel_axis=-2),
        KernelQuantizeConfig(["depthwise_kernel", "pointwise_kernel"], weight_bits=2, activation_bits=16,
                             quantize_activation=False, pinned=["weight_bits"]),
    ],
    OutputQuantizeConfig: [OutputQuantizeConfig(8), OutputQuantizeConfig(4, pinned=["activation_bits"])],
    ActivationQuantizeConfig: [ActivationQuantizeConfig(8)],
    NoOpQuantizeConfig: [NoOpQuantizeConfig(), NoOpQuantizeConfig(pinned=["quantize"])],
}
CASES = [(cls, cfg) for cls in configs.ALL_CONFIGS for cfg in SAMPLES[cls]]
IDS = [f"{cls.__name__}-{i}" for cls in configs.ALL_CONFIGS for i in range(len(SAMPLES[cls]))]

# __init__ arguments that get_config() folds into the serialized quantizers.
FOLDED = {"weight_bits", "activation_bits", "per_channel", "channel_axis"}


def test_every_config_class_has_samples():
    assert set(configs.ALL_CONFIGS) == set(SAMPLES)


def _same_state(a, b):
    assert type(a) is type(b)
    assert a == b and not (a != b)
    assert a.get_config() == b.get_config()
    assert a.weight_bits == b.weight_bits
    assert a.activation_bits == b.activation_bits
    assert a.pinned == b.pinned
    for attr in ("weight_quantizer", "activation_quantizer"):
        if hasattr(a, attr):
            assert getattr(a, attr) == getattr(b, attr)


@pytest.mark.parametrize("cls,cfg", CASES, ids=IDS)
def test_get_config_from_config_round_trip(cls, cfg):
    back = cls.from_config(cfg.get_config())
    _same_state(back, cfg)
    # from_config must not consume/mutate the dict it is given.
    config = cfg.get_config()
    cls.from_config(config)
    assert config == cfg.get_config()


@pytest.mark.parametrize("cls,cfg", CASES, ids=IDS)
def test_keras_serialize_round_trip(cls, cfg):
    data = keras.utils.serialize_keras_object(cfg)
    assert data["registered_name"] == f"keras_qx>{cls.__name__}"
    back = keras.utils.deserialize_keras_object(data)
    _same_state(back, cfg)


@pytest.mark.parametrize("cls,cfg", CASES, ids=IDS)
def test_init_arguments_survive_serialization(cls, cfg):
    config = cfg.get_config()
    back = keras.utils.deserialize_keras_object(keras.utils.serialize_keras_object(cfg))
    for name in inspect.signature(cls.__init__).parameters:
        if name == "self":
            continue
        if name in config:
            continue
        assert name in FOLDED, f"{cls.__name__}.__init__({name}=...) is neither in get_config() nor folded"
        if name == "weight_bits":
            assert back.weight_bits == cfg.weight_bits == cfg.weight_quantizer.bits
        elif name == "activation_bits":
            assert back.activation_bits == cfg.activation_bits
            assert back.activation_quantizer.bits == cfg.activation_quantizer.bits
        else:
            assert getattr(back.weight_quantizer, name) == getattr(cfg.weight_quantizer, name)


def test_sample_values_land_where_expected():
    k = SAMPLES[KernelQuantizeConfig][0]
    assert (k.weight_bits, k.activation_bits) == (4, 8)
    assert (k.weight_quantizer.per_channel, k.weight_quantizer.channel_axis) == (False, -2)
    k2 = SAMPLES[KernelQuantizeConfig][1]
    assert k2.weight_bits == 2
    assert k2.activation_bits is None  # quantize_activation=False
    assert k2.activation_quantizer.bits == 16  # ...but the quantizer still round-trips
    assert SAMPLES[OutputQuantizeConfig][1].activation_bits == 4
    assert NoOpQuantizeConfig().weight_bits is None and NoOpQuantizeConfig().activation_bits is None


def test_explicit_quantizers_override_bits():
    cfg = KernelQuantizeConfig(["kernel"], weight_bits=8, weight_quantizer=WeightQuantizer(3),
                               activation_quantizer=ActivationQuantizer(16))
    assert (cfg.weight_bits, cfg.activation_bits) == (3, 16)
    assert KernelQuantizeConfig.from_config(cfg.get_config()) == cfg


def test_equality_distinguishes_configs():
    base = KernelQuantizeConfig(["kernel"], weight_bits=4)
    assert base == KernelQuantizeConfig(["kernel"], weight_bits=4)
    assert base != KernelQuantizeConfig(["kernel"], weight_bits=5)
    assert base != KernelQuantizeConfig(["kernel"], weight_bits=4, per_channel=False)
    assert base != KernelQuantizeConfig(["kernel"], weight_bits=4, pinned=["weight_bits"])
    assert OutputQuantizeConfig(8) != ActivationQuantizeConfig(8)  # same config, other class
    assert NoOpQuantizeConfig() != OutputQuantizeConfig(8)


def test_bad_bits_rejected_by_configs():
    with pytest.raises(ValueError, match="9"):
        KernelQuantizeConfig(["kernel"], weight_bits=9)
    with pytest.raises(ValueError, match="17"):
        OutputQuantizeConfig(17)


# ---- kernel_kind -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "layer,attrs,per_channel,axis,int4",
    [
        (L.Dense(3), ("kernel",), False, -1, True),
        (L.Conv2D(3, 3), ("kernel",), True, -1, True),
        (L.DepthwiseConv2D(3), ("depthwise_kernel",), True, -1, True),
        (L.Conv2DTranspose(3, 3), ("kernel",), False, -2, False),
        (L.SeparableConv2D(3, 3), ("depthwise_kernel", "pointwise_kernel"), False, -1, True),
        (L.Conv1D(3, 3), ("kernel",), False, -1, True),  # per-channel Conv1D does not convert
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, L.Layer) else None,
)
def test_kernel_kind(layer, attrs, per_channel, axis, int4):
    kind = kernel_kind(layer)
    assert kind is not None
    assert issubclass(type(layer), kind.layer_type)
    assert kind.weight_attrs == attrs
    assert kind.per_channel == per_channel
    assert kind.channel_axis == axis
    assert kind.int4_export == int4
    assert kernel_kind(type(layer)) is kind  # classes work as well as instances


def test_kernel_kind_subclasses_get_most_specific_kind():
    # Conv2DTranspose *is* a Conv2D in tf_keras; it must not get Conv2D's kind.
    assert issubclass(L.Conv2DTranspose, L.Conv2D)
    assert kernel_kind(L.Conv2DTranspose) is not kernel_kind(L.Conv2D)
    assert kernel_kind(L.DepthwiseConv2D).layer_type is L.DepthwiseConv2D

    class MyDense(L.Dense):
        pass

    assert kernel_kind(MyDense) is kernel_kind(L.Dense)


@pytest.mark.parametrize("layer", [L.ReLU(), L.Add(), L.BatchNormalization(), L.Activation("relu"), L.Flatten()],
                         ids=lambda v: type(v).__name__)
def test_kernel_kind_none_without_kernels(layer):
    assert kernel_kind(layer) is None


@pytest.mark.parametrize(
    "layer,shape",
    [(L.Dense(3), (2, 5)), (L.Conv2D(3, 3), (1, 6, 6, 2)), (L.DepthwiseConv2D(3), (1, 6, 6, 2)),
     (L.Conv2DTranspose(3, 3), (1, 4, 4, 2)), (L.SeparableConv2D(3, 3), (1, 6, 6, 2)),
     (L.Conv1D(3, 3), (1, 6, 2))],
    ids=lambda v: type(v).__name__ if isinstance(v, L.Layer) else None,
)
def test_kernel_kind_attrs_exist_and_channel_axis_is_output(layer, shape):
    layer.build(shape)
    kind = kernel_kind(layer)
    for attr in kind.weight_attrs:
        assert isinstance(getattr(layer, attr), tf.Variable)
    kernel = getattr(layer, kind.weight_attrs[-1])
    if hasattr(layer, "filters") and not isinstance(layer, L.DepthwiseConv2D):
        assert kernel.shape[kind.channel_axis] == layer.filters
    elif isinstance(layer, L.Dense):
        assert kernel.shape[kind.channel_axis] == layer.units


# ---- a real tfmot wrapper --------------------------------------------------------------
def _ref_weight_fq(w, bits):
    n = 2 ** (bits - 1) - 1
    scale = np.max(np.abs(w)) / n
    return np.clip(np.round(w / scale), -n, n) * scale


def _ref_act_fq(x, lo, hi, bits):
    levels = 2 ** bits - 1
    scale = (hi - lo) / levels
    zp = np.clip(np.round(-lo / scale), 0, levels)
    nmin = -zp * scale
    return np.round((np.clip(x, nmin, nmin + levels * scale) - nmin) / scale) * scale + nmin, scale


@pytest.mark.parametrize("activation,act_bits", [("relu", 8), ("linear", 8), ("relu", 16)])
def test_kernel_config_in_quantize_wrapper_matches_numpy(activation, act_bits):
    rng = np.random.default_rng(0)
    dense = L.Dense(5, activation=activation, bias_initializer="random_normal")
    cfg = KernelQuantizeConfig(["kernel"], weight_bits=4, activation_bits=act_bits, per_channel=False)
    wrapper = quantize_wrapper.QuantizeWrapperV2(dense, cfg)
    x = rng.normal(size=(16, 7)).astype(np.float32)
    y = wrapper(x, training=True).numpy()

    by_name = {v.name.split("/")[-1].split(":")[0]: v.numpy() for v in wrapper.weights}
    # The float variable: after the call, ``dense.kernel`` is the wrapper's quantized tensor.
    kernel, bias = by_name["kernel"], by_name["bias"]
    np.testing.assert_allclose(dense.kernel.numpy(), _ref_weight_fq(kernel, 4), rtol=1e-5, atol=1e-6)
    # The kernel's range was taken from the kernel itself (symmetric).
    np.testing.assert_allclose(by_name["kernel_max"], np.abs(kernel).max(), rtol=1e-6)
    np.testing.assert_allclose(by_name["kernel_min"], -np.abs(kernel).max(), rtol=1e-6)
    lo, hi = float(by_name["post_activation_min"]), float(by_name["post_activation_max"])

    def act(h):
        return np.maximum(h, 0.0) if activation == "relu" else h

    h = act(x.astype(np.float64) @ _ref_weight_fq(kernel, 4) + bias)
    ref, step = _ref_act_fq(h, lo, hi, act_bits)
    # Float matmul order and rounding ties can move a value by one activation level.
    np.testing.assert_allclose(y, ref, rtol=0, atol=step * 1.001)
    assert np.mean(np.isclose(y, ref, rtol=0, atol=step * 0.01)) > 0.95

    if act_bits == 16:
        # With a fine activation grid the float kernel gives visibly different outputs: the
        # 4-bit kernel grid really is what the layer used.
        ref_float, _ = _ref_act_fq(act(x.astype(np.float64) @ kernel + bias), lo, hi, act_bits)
        assert np.max(np.abs(y - ref_float)) > 20 * step


def test_kernel_config_wrapper_with_per_channel_conv():
    rng = np.random.default_rng(1)
    conv = L.Conv2D(4, 3, activation="relu")
    cfg = KernelQuantizeConfig(["kernel"], weight_bits=3, per_channel=True)
    wrapper = quantize_wrapper.QuantizeWrapperV2(conv, cfg)
    x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    wrapper(x, training=True)
    by_name = {v.name.split("/")[-1].split(":")[0]: v.numpy() for v in wrapper.weights}
    kernel = by_name["kernel"]  # the float variable (conv.kernel is now the quantized tensor)
    assert by_name["kernel_max"].shape == (4,)
    np.testing.assert_allclose(by_name["kernel_max"], np.abs(kernel).reshape(-1, 4).max(0), rtol=1e-6)
    # The kernel the op used: rerun the conv with the numpy-quantized kernel.
    n = 3
    scale = np.abs(kernel).reshape(-1, 4).max(0) / n
    kq = (np.clip(np.round(kernel / scale), -n, n) * scale).astype(np.float32)
    h = tf.nn.relu(tf.nn.conv2d(x, kq, 1, "VALID") + conv.bias).numpy()
    y = wrapper(x, training=False).numpy()
    ref, step = _ref_act_fq(h, float(by_name["post_activation_min"]), float(by_name["post_activation_max"]), 8)
    np.testing.assert_allclose(y, ref, rtol=0, atol=step * 1.001)


def test_set_quantize_weights_checks_count():
    cfg = KernelQuantizeConfig(["depthwise_kernel", "pointwise_kernel"])
    layer = L.SeparableConv2D(2, 3)
    layer.build((1, 5, 5, 2))
    with pytest.raises(ValueError, match="2 quantized weights"):
        cfg.set_quantize_weights(layer, [layer.depthwise_kernel])


def test_activation_config_uses_tflite_fixed_grids():
    from keras_qx.quant.quantizers import FixedRangeQuantizer

    cfg = ActivationQuantizeConfig(8)
    assert cfg.get_output_quantizers(L.Activation("softmax")) == [FixedRangeQuantizer(0.0, 255 / 256)]
    assert cfg.get_output_quantizers(L.Softmax()) == [FixedRangeQuantizer(0.0, 255 / 256)]
    assert cfg.get_output_quantizers(L.Activation("sigmoid")) == [FixedRangeQuantizer(0.0, 255 / 256)]
    assert cfg.get_output_quantizers(L.Activation("tanh")) == [FixedRangeQuantizer(-1.0, 127 / 128)]
    assert cfg.get_output_quantizers(L.Activation("linear")) == []
    assert cfg.get_output_quantizers(L.Activation("relu")) == [cfg.activation_quantizer]


def test_fixed_range_quantizer_matches_tflite_sigmoid_grid(rng):
    """Numpy reference: TFLite's int8 LOGISTIC output is q/256 for q in 0..255 (scale 1/256,
    zero point -128); the quantizer rounds onto exactly that grid and round-trips."""
    from keras_qx.quant.quantizers import FixedRangeQuantizer

    q = FixedRangeQuantizer(0.0, 255 / 256)
    x = rng.random(1000).astype("float32")
    out = q(tf.constant(x), training=False, weights={}).numpy()
    ref = np.clip(np.round(x * 256), 0, 255) / 256
    np.testing.assert_allclose(out, ref, atol=1e-6)
    assert q.step == 1 / 256
    assert keras.utils.deserialize_keras_object(keras.utils.serialize_keras_object(q)) == q
    with pytest.raises(ValueError, match="low < high"):
        FixedRangeQuantizer(1.0, 0.0)
    assert OutputQuantizeConfig(8).get_output_quantizers(L.Add()) == [ActivationQuantizer(8)]
    assert NoOpQuantizeConfig().get_output_quantizers(L.Add()) == []
