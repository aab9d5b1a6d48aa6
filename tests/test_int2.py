"""INT2 kernels (keras_qx.lite.int2): the bit layout, the 2-bit grid, and real exports whose
FULLY_CONNECTED filters are stored as INT2 and run in LiteRT in agreement with Keras."""
import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras, tflite_schema
from keras_qx.lite.inspect import inspect_tflite, tensor_values
from keras_qx.lite.int2 import pack_int2, to_int2
from keras_qx.qat.summary import layer_costs
from keras_qx.quant.cost import storage_bits
from keras_qx.quant import quantizers
from keras_qx.quant.quantizers import WeightQuantizer, export_trace
from tests.conftest import compile_classifier

L = keras.layers


def _unpack(raw: bytes, count: int) -> np.ndarray:
    """Independent reading of the layout: element i in bits 2*(i%4)+1 : 2*(i%4) of byte i//4."""
    out = []
    for i in range(count):
        bits = (raw[i // 4] >> (2 * (i % 4))) & 0b11
        out.append(bits - 4 if bits & 0b10 else bits)
    return np.array(out)


def test_pack_int2_bit_layout(rng):
    values = rng.integers(-2, 2, size=37)
    raw = pack_int2(values)
    assert len(raw) == 10  # ceil(37 / 4)
    np.testing.assert_array_equal(_unpack(raw, 37), values)
    np.testing.assert_array_equal(tensor_values(raw, "INT2", (37,)), values)
    assert pack_int2([1, -1, 0, -2]) == bytes([0b10_00_11_01])
    with pytest.raises(ValueError, match="-2..1"):
        pack_int2([2])


def test_two_bit_grid_has_the_int2_levels(rng):
    q = WeightQuantizer(2, per_channel=False)
    assert q.full_range and not WeightQuantizer(3).full_range
    layer = L.Dense(8)
    layer.build((None, 16))
    qvars = q.build(layer.kernel.shape, "k", layer)
    w = rng.normal(size=(16, 8)).astype("float32")
    out = q(keras.backend.constant(w), True, qvars).numpy()
    m = np.abs(w).max()
    assert set(np.unique(np.round(out / (m / 2)))) == {-2.0, -1.0, 0.0, 1.0}
    from keras_qx.engine.sensitivity import fake_quantize  # the numpy twin agrees
    np.testing.assert_allclose(fake_quantize(w, 2, False, full_range=True), out, atol=1e-6)
    # configs saved before full_range existed keep the narrow grid
    assert WeightQuantizer.from_config({"bits": 2, "per_channel": False, "channel_axis": -1}).full_range is False
    assert WeightQuantizer.from_config(q.get_config()) == q
    with pytest.raises(ValueError, match="full_range"):
        WeightQuantizer(4, full_range=True)


def test_cost_model_counts_two_bits_for_fully_connected_only():
    d, c = L.Dense(64), L.Conv2D(8, 3)
    d.build((None, 256))
    c.build((None, 8, 8, 4))
    assert [storage_bits(d, b) for b in (2, 3, 4, 8)] == [2, 4, 4, 8]
    assert storage_bits(c, 2) == 4


def _file(data):
    schema = tflite_schema()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytes(data), 0))
    return model, model.subgraphs[0]


def _fc_ops(data):
    """``[(filter tensor, raw filter bytes, bias tensor or None, input tensor)]`` per FULLY_CONNECTED."""
    schema = tflite_schema()
    model, graph = _file(data)
    out = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        if max(code.builtinCode, code.deprecatedBuiltinCode) == schema.BuiltinOperator.FULLY_CONNECTED:
            filt = graph.tensors[op.inputs[1]]
            bias = graph.tensors[op.inputs[2]] if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
            out.append((filt, bytes(model.buffers[filt.buffer].data), bias, graph.tensors[op.inputs[0]],
                        None if bias is None else np.frombuffer(bytes(model.buffers[bias.buffer].data), np.int32)))
    return out


def _quantized_kernel(wrapper):
    weight, quantizer, qvars = wrapper._weight_vars[0]
    return quantizer(weight, False, qvars).numpy(), quantizer, qvars


@pytest.fixture(scope="module")
def digits_2bit(trained_cnn, digits):
    """The digits CNN with fc1 and conv2 at 2 bits and a 3-bit logits layer, after one QAT epoch."""
    (x, y), _ = digits
    policy = {"default": {"weight_bits": 8}, "layers": {"fc1": {"weight_bits": 2}, "conv2": {"weight_bits": 2},
                                                         "logits": {"weight_bits": 3}}}
    qat = compile_classifier(qx.calibrate(qx.quantize(trained_cnn, policy), x[:300]), lr=1e-4)
    qat.fit(x, y, epochs=1, batch_size=64, verbose=0)
    return qat, qx.export_tflite(qat, x[:200])


@pytest.mark.slow
def test_digits_fc1_is_int2_with_the_qat_values(digits_2bit):
    qat, tfl = digits_2bit
    info = tfl.report.info
    assert [w[2] for w in info.int2_tensors] == [(64, 512)]  # fc1, (out, in)
    # conv2 (2-bit Conv2D: CONV_2D takes no INT2) and logits (3-bit Dense) stay INT4
    assert sorted(w[2] for w in info.int4_tensors) == [(10, 64), (32, 3, 3, 16)]
    assert tfl.report.mean_error_steps <= 0.5, tfl.report.lines()
    assert tfl.report.agreement >= 0.98
    # the INT4 tensors hold the trained integers too: conv2 on the narrow 2-bit grid, logits 3-bit
    model, graph = _file(tfl)
    for name, levels in (("conv2", {-1, 0, 1}), ("logits", set(range(-3, 4)))):
        (tensor,) = [t for t in graph.tensors if f"quant_{name}/" in t.name.decode().split(";")[0]
                     and t.type == tflite_schema().TensorType.INT4]
        stored = tensor_values(model.buffers[tensor.buffer].data, "INT4", tensor.shape)
        kernel, quantizer, qvars = _quantized_kernel(qat.get_layer(f"quant_{name}"))
        assert not quantizer.full_range and set(np.unique(stored)) == levels, (name, np.unique(stored))
    fc1 = [f for f in _fc_ops(tfl) if f[0].type == tflite_schema().TensorType.INT2]
    assert len(fc1) == 1
    filt, raw, bias, inp, bias_values = fc1[0]
    kernel, quantizer, qvars = _quantized_kernel(qat.get_layer("quant_fc1"))
    step = float(quantizer.step_for(qvars["min_var"].numpy(), qvars["max_var"].numpy()))
    reference = np.round(kernel / step).astype(int).T  # (in, out) -> the file's (out, in)
    assert set(np.unique(reference)) <= {-2, -1, 0, 1}
    np.testing.assert_array_equal(_unpack(raw, reference.size).reshape(reference.shape), reference)
    np.testing.assert_allclose(filt.quantization.scale[0], step, rtol=1e-6)
    # the int32 bias in steps of input scale x filter scale, as the runtime requires
    np.testing.assert_allclose(bias.quantization.scale[0], inp.quantization.scale[0] * filt.quantization.scale[0],
                               rtol=1e-6)
    np.testing.assert_allclose(bias_values * bias.quantization.scale[0],
                               qat.get_layer("quant_fc1").layer.bias.numpy(), atol=0.51 * bias.quantization.scale[0])


@pytest.mark.slow
def test_digits_cost_model_matches_the_file(digits_2bit):
    qat, tfl = digits_2bit
    costs = {c.name: c for c, _ in layer_costs(qat)}
    sizes = {w[0]: w[3] for w in tfl.report.info.weights if len(w[2]) >= 2}
    for name in ("fc1", "conv2", "logits"):
        (found,) = [size for tensor, size in sizes.items() if f"quant_{name}/" in tensor.split(";")[0]]
        assert found == costs[name].kernel_bytes, name
    assert costs["fc1"].storage_bits == 2 and costs["fc1"].kernel_bytes == 64 * 512 // 4
    wider = {name for name, _, _ in tfl.report.stored_wider}
    assert wider == {"conv2", "logits"}
    assert "1 INT2 + 2 INT4 tensors" in tfl.report.lines()[0]
    lines = []
    qx.summary(qat, print_fn=lines.append)
    assert any(line.split()[0] == "fc1" and line.split()[-2] == f"{64 * 512 // 4 + 4 * 64:,}" for line in lines)  # Bytes, Gzip kernel


def _feed_forward(seq=8, d=32):
    inputs = keras.Input((seq, d), name="x")
    h = L.Dense(4 * d, activation="relu", name="up")(inputs)
    return keras.Model(inputs, L.Dense(d, name="down")(h), name="ffn")


@pytest.mark.slow
def test_transformer_feed_forward_exports_int2(rng):
    model = _feed_forward()
    x = rng.normal(size=(256, 8, 32)).astype("float32")
    model.compile("adam", "mse")
    model.fit(x, np.tanh(x @ rng.normal(size=(32, 32)).astype("float32") / 4), epochs=3, verbose=0)
    qat = qx.calibrate(qx.quantize(model, {"default": {"weight_bits": 2}}), x[:128])
    qat.compile(keras.optimizers.Adam(1e-4), "mse")
    qat.fit(x, model.predict(x, verbose=0), epochs=1, verbose=0)
    tfl = qx.export_tflite(qat, x[:128])
    info = tfl.report.info
    assert sorted(w[2] for w in info.int2_tensors) == [(32, 128), (128, 32)] and not info.int4_tensors
    assert info.fully_integer
    assert tfl.report.mean_error_steps <= 0.5, tfl.report.lines()
    for layer in ("up", "down"):
        (cost,) = [c for c, _ in layer_costs(qat) if c.name == layer]
        (size,) = [w[3] for w in info.int2_tensors if f"quant_{layer}/" in w[0]]
        assert size == cost.kernel_bytes == 32 * 128 // 4


@pytest.mark.slow
def test_narrow_grid_rewrite_rescales_filter_and_bias(rng, monkeypatch):
    """A Dense trained on the narrow grid {-1, 0, 1} * s is stored by the converter as INT4
    {-7, 0, 7} at s / 7; the rewrite stores {-1, 0, 1} at s and divides the int32 bias by 7.
    Without the bias rescale the runtime refuses the file or adds 7x the bias."""
    from keras_qx._runtime import RuntimeCrash, run
    from keras_qx.lite import convert
    from keras_qx.lite.bias_grid import snap_biases

    inputs = keras.Input((64,), name="x")
    model = keras.Model(inputs, L.Dense(16, name="fc")(inputs), name="narrow")
    x = rng.normal(size=(256, 64)).astype("float32")
    model.compile("adam", "mse")
    model.fit(x, x[:, :16] + 0.5, epochs=5, verbose=0)
    qat = qx.quantize(model, {"default": {"weight_bits": 2}})
    qat.get_layer("quant_fc")._weight_vars[0][1].full_range = False
    qat = qx.calibrate(qat, x[:128])
    qat.compile("adam", "mse")
    qat.fit(x, x[:, :16] + 0.5, epochs=1, verbose=0)
    snap_biases(qat)  # as export_tflite does: the bias on the grid of the 2-bit step
    # the converter's own storage of a fake-quantized 2-bit kernel (export normally hands it the
    # kernel on the INT4 grid of its own step instead: WeightQuantizer._on_int4_grid)
    monkeypatch.setattr(quantizers, "exporting", lambda: False)
    int4, _ = convert._convert_qat(qat, [x[:128]], True)  # the converter's file, as it writes it
    (f4, raw4, b4, _, bias4), = _fc_ops(int4)
    assert f4.type == tflite_schema().TensorType.INT4
    assert set(np.unique(tensor_values(raw4, "INT4", f4.shape))) == {-7, 0, 7}
    int2, names = to_int2(int4)
    assert len(names) == 1 and len(int2) <= len(int4) - 64 * 16 // 4
    (f2, raw2, b2, _, bias2), = _fc_ops(int2)
    np.testing.assert_array_equal(_unpack(raw2, 64 * 16), tensor_values(raw4, "INT4", f4.shape) // 7)
    np.testing.assert_allclose(f2.quantization.scale, f4.quantization.scale * 7, rtol=1e-6)
    np.testing.assert_allclose(b2.quantization.scale, b4.quantization.scale * 7, rtol=1e-6)
    np.testing.assert_array_equal(bias2, bias4 // 7)  # the bias was snapped to the coarse grid: exact
    keras_out = qat.predict(x, verbose=0)
    steps = {}
    for name, data in (("int4", int4), ("int2", int2)):
        result = run(data, x)
        steps[name] = np.abs(result.output - keras_out).mean() / result.output_steps[0]
    assert steps["int2"] <= 0.5 and steps["int4"] <= 0.5, steps
    broken, _ = to_int2(int4, rescale_bias=False)
    try:
        result = run(broken, x)
    except RuntimeCrash as err:
        assert "scale_diff" in str(err)
    else:
        assert np.abs(result.output - keras_out).mean() / result.output_steps[0] > 0.5
    assert len(inspect_tflite(int2).int2_tensors) == 1


@pytest.mark.slow
def test_attention_projections_and_feed_forward_int2(rng):
    from tests.test_sequence_layers import encoder

    model = encoder()
    qat = qx.quantize(model, {"default": {"weight_bits": 2}, "layers": {"head": {"weight_bits": 8}}})
    x = rng.normal(size=(64, 6, 16)).astype("float32")
    qat = qx.calibrate(qat, x)
    qat.compile("adam", "mse")
    qat.fit(x, rng.random((64, 3)), epochs=1, verbose=0)
    tfl = qx.export_tflite(qat, x, min_agreement=0.8)
    info = tfl.report.info
    # q, k, v, output projections and the feed-forward are FULLY_CONNECTED: all INT2
    assert len(info.int2_tensors) == 5 and not info.int4_tensors, info.weights
    predicted = sum(c.kernel_bytes for c, _ in layer_costs(qat) if c.storage_bits == 2)
    assert predicted == sum(w[3] for w in info.int2_tensors)
    # INT2 runs on the built-in kernels only (XNNPACK declines it). On those same kernels the INT4
    # file of the same 2-bit weights computes exactly the same outputs: the packing loses nothing.
    # (Against XNNPACK's INT4 run it differs by ~0.5 steps: the built-in MEAN kernels of the
    # LayerNorm and the pooling round up where XNNPACK rounds to nearest, tests/test_runtime_rounding.py.)
    from keras_qx._runtime import interpreter
    from keras_qx.lite import convert

    with export_trace():
        int4, _ = convert._convert_qat(qat, [x], True)
    assert len(inspect_tflite(int4).int4_tensors) == 5

    def builtin_outputs(data):
        it = interpreter(data, xnnpack=False)
        di, do = it.get_input_details()[0], it.get_output_details()[0]
        (s, z) = di["quantization"]
        out = []
        for sample in x[:32]:
            it.set_tensor(di["index"], np.clip(np.round(sample[None] / s) + z, -128, 127).astype(np.int8))
            it.invoke()
            out.append(it.get_tensor(do["index"]).copy())
        return np.concatenate(out)

    np.testing.assert_array_equal(builtin_outputs(bytes(tfl)), builtin_outputs(int4))
    assert tfl.report.mean_error_steps <= 1.0 and tfl.report.max_error_steps <= 6, tfl.report.verification
