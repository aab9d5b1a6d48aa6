"""keras_qx QuantizeConfigs: round trips; each layer kind and activation quantized as the TFLite
file stores it (compared with an exported file, not with a copy of the tables); a real tfmot
wrapper against numpy."""
import inspect
import warnings

import numpy as np
import pytest

import keras_qx as qx
from keras_qx.quant import configs
from keras_qx._compat import keras, quantize_wrapper, tf, tflite_schema
from keras_qx.quant.configs import (
    ActivationQuantizeConfig,
    KeptFloatQuantizeConfig,
    KernelQuantizeConfig,
    LSTMQuantizeConfig,
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
    KeptFloatQuantizeConfig: [KeptFloatQuantizeConfig(8)],
    LSTMQuantizeConfig: [LSTMQuantizeConfig(8), LSTMQuantizeConfig(4, pinned=["weight_bits"])],
}
CASES = [(cls, cfg) for cls in configs.ALL_CONFIGS for cfg in SAMPLES[cls]]
IDS = [f"{cls.__name__}-{i}" for cls in configs.ALL_CONFIGS for i in range(len(SAMPLES[cls]))]

# __init__ arguments that get_config() folds into the serialized quantizers.
FOLDED = {"weight_bits", "activation_bits", "per_channel", "channel_axis", "full_range", "pack"}


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


# ---- layer kinds, by what quantize() and the exporter do with them ---------------------------
# Nothing here restates the kinds table: one model has a branch per layer kind with kernels,
# quantized at 4 bits, trained a step and exported, and for every kind the QAT model is
# compared with the layer itself (which weights are kernels) and with the TFLite file (which
# bits, which scale groups, which values). A wrong table entry shows up as a disagreement.
KERNEL_BRANCHES = [
    lambda x: L.Conv2D(5, 3, name="conv2d")(x),
    lambda x: L.DepthwiseConv2D(3, name="depthwise")(x),
    lambda x: L.DepthwiseConv2D(3, depth_multiplier=2, name="depthwise_x2")(x),
    lambda x: L.SeparableConv2D(5, 3, name="separable")(x),  # split into depthwise + 1x1 conv
    lambda x: L.Conv2DTranspose(5, 3, name="transpose")(x),
    lambda x: L.Conv1D(5, 3, name="conv1d")(L.Reshape((24, 8))(x)),
]


def _file_kernels(data):
    """{QAT layer name: [(type, integer values, scales, quantized dimension)]} for the constant
    tensors of rank >= 2 in a TFLite file (INT4 unpacked, low nibble first)."""
    schema = tflite_schema()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    out = {}
    for tensor in model.subgraphs[0].tensors:
        buf = model.buffers[tensor.buffer].data
        if buf is None or len(tensor.shape) < 2:
            continue
        raw, kind = np.asarray(buf, np.uint8), types[tensor.type]
        if kind == "INT4":
            nibbles = np.stack([raw & 0xF, raw >> 4], axis=1).reshape(-1).astype(np.int8)
            ints = np.where(nibbles >= 8, nibbles - 16, nibbles)[: int(np.prod(tensor.shape))]
        else:
            assert kind == "INT8", kind
            ints = raw.view(np.int8)
        owner = tensor.name.decode().split(";")[0].split("/")[1]  # "<model>/quant_<layer>/<op>"
        q = tensor.quantization
        out.setdefault(owner, []).append((kind, ints.reshape(tensor.shape), np.asarray(q.scale), q.quantizedDimension))
    return out


def _qat_kernels(wrapper):
    """[(float kernel, bits, the kernel the op uses, scale per group)] of a QAT layer."""
    cfg = wrapper.quantize_config
    var = {v.name.split("/")[-1].split(":")[0]: v for v in wrapper.weights}
    q = cfg.weight_quantizer
    out = []
    for attr in cfg.weight_attrs:
        lo, hi = var[attr + "_min"], var[attr + "_max"]
        used = q(var[attr], False, {"min_var": lo, "max_var": hi}).numpy()
        out.append((var[attr], q.bits, used, np.reshape(hi.numpy(), -1) / (2 ** (q.bits - 1) - 1)))
    return out


def _distinct(values, rtol=1e-5):
    """Sorted values with near-equal neighbours merged."""
    values = np.sort(np.reshape(values, -1))
    keep = np.concatenate([[True], np.diff(values) > rtol * np.abs(values[1:])])
    return values[keep]


@pytest.fixture(scope="module")
def kinds_exported():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 3))
    flat = [L.Flatten()(branch(inputs)) for branch in KERNEL_BRANCHES]
    model = keras.Model(inputs, L.Dense(4, name="dense")(L.Concatenate()(flat)), name="kinds")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qat = qx.quantize(model, {"default": {"weight_bits": 4}})
    rng = np.random.default_rng(0)
    x = rng.random((64, 8, 8, 3)).astype("float32")
    qat.compile("adam", "mse")
    qat.fit(x, rng.random((64, 4)), epochs=1, verbose=0)
    data = qx.export_tflite(qat, x, verify=False)
    trained_at_8 = [str(w.message) for w in caught if "train at 8 bits" in str(w.message)]
    return model, qat, trained_at_8, _file_kernels(bytes(data))


@pytest.mark.slow
def test_each_kind_quantizes_its_kernels_on_the_grid_the_file_stores(kinds_exported):
    from keras_qx.quant.cost import storage_bits

    model, qat, trained_at_8, file = kinds_exported
    wrappers = {l.name: l for l in qat.layers if isinstance(getattr(l, "quantize_config", None), KernelQuantizeConfig)}
    checked = 0
    for layer in model.layers:
        kernels = [w for w in layer.weights if w.shape.rank >= 2]  # biases and BN vectors are rank 1
        halves = [wrappers[n] for n in (f"quant_{layer.name}", f"quant_{layer.name}_depthwise") if n in wrappers]
        assert bool(halves) == bool(kernels), layer.name
        if not kernels:
            continue
        # Which weights: exactly the layer's kernels, each once (a split layer across its halves).
        quantized = [k for half in halves for k in _qat_kernels(half)]
        assert sorted(tuple(k[0].shape) for k in quantized) == sorted(tuple(w.shape) for w in kernels)
        # At what bits: the policy's 4, unless quantize() said it trains this one at 8.
        named = any(f"'{layer.name}'" in message for message in trained_at_8)
        for half in halves:
            ours, theirs = _qat_kernels(half), file[half.name]
            assert len(ours) == len(theirs) == 1, (half.name, len(ours), len(theirs))
            (_, bits, used, scales), (kind, ints, file_scales, axis) = ours[0], theirs[0]
            assert bits == (8 if named else 4), layer.name
            # The file stores what QAT simulates: as many bits as the cost model counts...
            assert {"INT4": 4, "INT8": 8}[kind] == storage_bits(layer, bits), (layer.name, kind, bits)
            n = 2 ** (bits - 1) - 1
            assert np.abs(ints).max() == n  # ...on the symmetric narrow grid, the extreme at +-n,
            # ...with the same scale groups (one, or one per channel) and scales,
            np.testing.assert_allclose(_distinct(file_scales), _distinct(scales), rtol=1e-5)
            # ...and the same values (compared sorted: the file's layout is TFLite's).
            shape = [1] * ints.ndim
            shape[axis] = -1
            dequantized = ints * (file_scales.reshape(shape) if file_scales.size > 1 else file_scales)
            np.testing.assert_allclose(np.sort(dequantized.reshape(-1)), np.sort(used.reshape(-1)),
                                       rtol=1e-5, atol=1e-6 * np.abs(used).max())
            checked += 1
    assert checked == len(wrappers) == len(file) == 8  # 6 branches (separable in two halves) + dense
    assert trained_at_8 and all(f"'{n}'" not in " ".join(trained_at_8) for n in ("conv2d", "dense", "conv1d"))


def test_kernel_kind_of_class_and_instance_agree():
    for layer in (L.Dense(3), L.Conv2D(3, 3), L.DepthwiseConv2D(3), L.Conv2DTranspose(3, 3),
                  L.SeparableConv2D(3, 3), L.Conv1D(3, 3), L.Embedding(5, 2)):
        kind = kernel_kind(layer)
        assert kind is not None and kernel_kind(type(layer)) is kind
        assert isinstance(layer, kind.layer_type)


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


def _file_outputs(data):
    """{QAT layer name: [(op, scale, zero point)]} of the ops of a TFLite file, by the layer the
    name of their output tensor starts with (a fused ADD+RELU is named after the ReLU)."""
    schema = tflite_schema()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    graph = model.subgraphs[0]
    out = {}
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        tensor = graph.tensors[op.outputs[0]]
        parts = tensor.name.decode().split(";")[0].split("/")
        if len(parts) > 2:
            q = tensor.quantization
            out.setdefault(parts[1], []).append((op_names[max(code.builtinCode, code.deprecatedBuiltinCode)],
                                                 float(q.scale[0]), int(q.zeroPoint[0])))
    return out


@pytest.mark.slow
def test_activation_layers_quantize_on_the_grid_the_file_uses(rng):
    """Every Activation/Softmax layer: the grid QAT puts its output on is the grid of its op in
    the TFLite file (the fixed grids of LOGISTIC, TANH and SOFTMAX, or the learnt range of a
    ReLU), its QAT outputs lie on that grid, and a linear activation is left alone."""
    from keras_qx.quant.quantizers import FixedRangeQuantizer

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = inputs
    activations = [L.Activation("sigmoid", name="sigmoid"), L.Activation("tanh", name="tanh"),
                   L.Softmax(name="softmax_layer"), L.Activation("softmax", name="softmax"),
                   L.Activation("linear", name="linear")]
    for i, activation in enumerate(activations):
        h = activation(L.Dense(8, name=f"fc{i}")(h))
    h = L.Activation("relu", name="relu")(L.Add()([h, L.Dense(8, name="skip")(inputs)]))
    model = keras.Model(inputs, L.Dense(3, name="out")(h), name="acts")
    qat = qx.quantize(model)
    x = (rng.normal(size=(128, 6)) * 3).astype("float32")
    qat.compile("adam", "mse")
    qat.fit(x, rng.random((128, 3)), epochs=1, verbose=0)
    file = _file_outputs(bytes(qx.export_tflite(qat, x, verify=False)))

    names = [l.name for l in activations] + ["relu"]
    wrappers = [qat.get_layer(f"quant_{n}") for n in names]
    assert all(isinstance(w.quantize_config, ActivationQuantizeConfig) for w in wrappers)
    probe = keras.Model(qat.inputs, [t for w in wrappers for t in (w.input, w.output)])
    values = probe.predict(x, verbose=0)
    fixed = 0
    for wrapper, before, after in zip(wrappers, values[::2], values[1::2]):
        quantizers = wrapper.quantize_config.get_output_quantizers(wrapper.layer)
        if not quantizers:  # linear: nothing to quantize, no op in the file
            assert wrapper.name == "quant_linear" and wrapper.name not in file
            np.testing.assert_array_equal(after, before)
            continue
        (q,) = quantizers
        # One op, no QUANTIZE after it: a requantization would mean QAT simulated another grid.
        ops = file[wrapper.name]
        assert len(ops) == 1 and ops[0][0] not in ("QUANTIZE", "DEQUANTIZE"), (wrapper.name, ops)
        _, scale, zero_point = ops[0]
        if isinstance(q, FixedRangeQuantizer):  # the op's fixed output grid, simulated exactly
            fixed += 1
            low, step = q.low, q.step
        else:  # a learnt range: the file's scale and zero point come from it
            assert isinstance(q, ActivationQuantizer) and wrapper.name == "quant_relu"
            var = {v.name.split("/")[-1].split(":")[0]: float(v.numpy()) for v in wrapper.weights}
            step = (var["output_max"] - var["output_min"]) / 255
            low = -round(-var["output_min"] / step) * step  # TF's nudged minimum
        assert scale == pytest.approx(step, rel=1e-5)
        assert scale * (-128 - zero_point) == pytest.approx(low, rel=1e-5, abs=1e-6)
        k = (after.astype(np.float64) - low) / step
        np.testing.assert_allclose(k, np.round(k), atol=1e-3)
        assert k.min() > -1e-3 and k.max() < 255 + 1e-3
    assert fixed == 4


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
