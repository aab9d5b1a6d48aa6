"""An LSTM exports as one integer UNIDIRECTIONAL_SEQUENCE_LSTM (int8 weights per gate, int16 cell
state) that agrees with its QAT model; LSTMs the converter would not fuse, and GRU/SimpleRNN, stay
float with the rest quantized."""
import warnings

import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras, tf, tflite_schema
from keras_qx.lite.convert import fix_lstm_bias_scales
from keras_qx.quant.configs import KeptFloatQuantizeConfig, LSTMQuantizeConfig
from keras_qx.quant.quantizers import GateWeightQuantizer, export_trace
from tests.conftest import compile_classifier

L = keras.layers


def per_gate(w, bits=8):
    """numpy reference: symmetric narrow-range rounding with one scale per gate (4 column
    blocks), then onto the int8 grid of the same bound (what the file stores)."""
    blocks = w.reshape(w.shape[0], 4, -1)
    bound = np.abs(blocks).max(axis=(0, 2), keepdims=True)
    out = np.round(blocks / (bound / (2 ** (bits - 1) - 1))) * (bound / (2 ** (bits - 1) - 1))
    return (np.round(out / (bound / 127)) * (bound / 127)).reshape(w.shape)


def lstm_operands(data: bytes) -> list:
    """``(type name, shape, scale)`` of each operand of the file's one fused LSTM (None: absent)."""
    schema = tflite_schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    graph = model.subgraphs[0]
    ops = [op for op in graph.operators if names[max(model.operatorCodes[op.opcodeIndex].builtinCode,
                                                     model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode)]
           == "UNIDIRECTIONAL_SEQUENCE_LSTM"]
    assert len(ops) == 1
    out = []
    for i in ops[0].inputs:
        if i < 0:
            out.append(None)
            continue
        t = graph.tensors[i]
        scale = t.quantization.scale[0] if t.quantization is not None and t.quantization.scale is not None else None
        values = None
        if model.buffers[t.buffer].data is not None:
            dtype = {"INT8": np.int8, "INT32": np.int32}.get(types[t.type])
            values = np.frombuffer(np.asarray(model.buffers[t.buffer].data, np.uint8).tobytes(), dtype) if dtype else None
        out.append((types[t.type], tuple(t.shape), scale, values))
    return out


def test_gate_weight_quantizer_matches_numpy_per_gate_and_the_export_trace(rng):
    layer = L.LSTM(6)
    layer.build((None, 5, 3))
    for bits in (8, 4):
        q = GateWeightQuantizer(bits)
        qvars = q.build(layer.cell.kernel.shape, f"k{bits}", layer)
        kernel = layer.cell.kernel.numpy()
        kernel[:, 6:12] *= 5.0  # the forget gate's scale differs from the others
        bound = q.bound(tf.constant(kernel)).numpy()
        np.testing.assert_allclose(bound, np.abs(kernel.reshape(3, 4, 6)).max(axis=(0, 2)), rtol=1e-6)
        qvars["min_var"].assign(-bound)
        qvars["max_var"].assign(bound)
        expected = per_gate(kernel, bits)
        trained = q(tf.constant(kernel), False, qvars).numpy()
        with export_trace():
            exported = q(tf.constant(kernel), False, qvars).numpy()
        np.testing.assert_allclose(trained, expected, atol=1e-6)
        np.testing.assert_allclose(exported, expected, atol=1e-6)
        levels = [len(np.unique(np.round(trained[:, g * 6:(g + 1) * 6] / (bound[g] / 127)))) for g in range(4)]
        assert max(levels) <= 2 ** bits - 1


@pytest.fixture(scope="module")
def mnist1d():
    from keras_qx.data import load_mnist1d

    return load_mnist1d()


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_mnist1d_lstm_exports_one_integer_lstm_agreeing_with_keras(mnist1d, bits, tmp_path):
    from keras_qx.data import mnist1d_lstm

    (x, y), (xt, yt) = mnist1d
    model = compile_classifier(mnist1d_lstm(0), 2e-3)
    model.fit(x[:2000], y[:2000], epochs=4, batch_size=64, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer kept float
        qat = qx.quantize(model, {"layers": {"lstm": {"weight_bits": bits}}})
    wrapper = qat.get_layer("quant_lstm")
    assert wrapper.quantize_config == LSTMQuantizeConfig(bits) and isinstance(wrapper.layer, L.LSTM)
    qx.calibrate(qat, x[:300])
    compile_classifier(qat, 1e-4).fit(x[:1000], y[:1000], epochs=1, batch_size=64, verbose=0)
    tfl = qx.export_tflite(qat, x[:200])
    info = tfl.report.info
    assert info.fully_integer and info.ops.count("UNIDIRECTIONAL_SEQUENCE_LSTM") == 1, info.ops
    operands = lstm_operands(bytes(tfl))
    x_in, gates, recurrent, biases = operands[0], operands[1:5], operands[5:9], operands[12:16]
    state, cell = operands[18], operands[19]
    assert x_in[0] == "INT8" and state[0] == "INT8" and cell[0] == "INT16"
    assert [g[0] for g in gates + recurrent] == ["INT8"] * 8 and [b[0] for b in biases] == ["INT32"] * 4
    # the file's weights, gate by gate, are the QAT model's rounded kernels (numpy reference)
    kernel, recurrent_kernel = (v.numpy() for v, _, _ in wrapper._weight_vars)
    units = recurrent_kernel.shape[0]
    for stored, full in ((gates, kernel), (recurrent, recurrent_kernel)):
        expected = per_gate(full, bits)
        for g, (_, shape, scale, values) in enumerate(stored):
            assert shape == (units, full.shape[0])
            np.testing.assert_allclose(values.reshape(shape) * scale, expected[:, g * units:(g + 1) * units].T,
                                       atol=1e-3 * scale)
            if bits < 8:
                assert len(np.unique(values)) <= 2 ** bits - 1
    # each gate bias at the scale the kernel adds it at: input scale x weight scale
    for (_, _, w_scale, _), (_, _, b_scale, _) in zip(gates, biases):
        assert b_scale == pytest.approx(x_in[2] * w_scale, rel=1e-6)
    assert fix_lstm_bias_scales(bytes(tfl))[1] == 0
    assert tfl.report.mean_error_steps <= 0.5 and tfl.report.max_error_steps <= 3, tfl.report.verification
    assert tfl.report.agreement >= 0.97
    # the QAT model saves and loads with its LSTM config, and exports the same file
    qat.save(tmp_path / "lstm.keras")
    loaded = qx.load_model(tmp_path / "lstm.keras")
    assert loaded.get_layer("quant_lstm").quantize_config == LSTMQuantizeConfig(bits)
    np.testing.assert_allclose(loaded.predict(xt[:64], verbose=0), qat.predict(xt[:64], verbose=0), atol=1e-6)
    again = lstm_operands(bytes(qx.export_tflite(loaded, x[:200], verify=False)))
    for a, b in zip(again, operands):
        assert (a is None) == (b is None)
        if a is not None:
            assert a[:3] == b[:3] and (a[3] is None) == (b[3] is None)
            assert a[3] is None or np.array_equal(a[3], b[3])


def _seq_model(rnn):
    inputs = keras.Input((8, 3))
    x = L.Conv1D(4, 3, padding="same", name="conv")(inputs)
    return keras.Model(inputs, L.Dense(2, name="head")(rnn(x)))


@pytest.mark.slow
@pytest.mark.parametrize("rnn, float_kind", [
    (lambda: L.LSTM(4, unroll=True, name="rnn"), "RNN"),  # the converter would not fuse it
    (lambda: L.LSTM(4, activation="relu", name="rnn"), "RNN"),
    # (a Bidirectional of fusable LSTMs is split into two integer LSTMs: tests/test_text_models.py)
    (lambda: L.Bidirectional(L.LSTM(4, activation="relu"), name="rnn"), "Bidirectional"),
    (lambda: L.GRU(4, name="rnn"), "GRU"),
    (lambda: L.SimpleRNN(4, name="rnn"), "SimpleRNN"),
])
def test_other_recurrent_layers_stay_float_with_the_rest_quantized(rng, rnn, float_kind):
    model = _seq_model(rnn())
    x = rng.normal(size=(48, 8, 3)).astype("float32")
    with pytest.warns(UserWarning, match="keeps these layers float"):
        qat = qx.quantize(model)
    wrapper = qat.get_layer("quant_rnn")
    assert type(wrapper.layer).__name__ == float_kind and isinstance(wrapper.quantize_config, KeptFloatQuantizeConfig)
    qx.calibrate(qat, x)
    # int8 I/O asked for explicitly: the kept-float layer makes the file's I/O float32, and it says so
    with pytest.warns(UserWarning, match="stay float32"):
        tfl = qx.export_tflite(qat, x, int8_io=True, min_agreement=0.0)
    info = tfl.report.info
    assert [t for _, t, *_ in info.inputs] == ["FLOAT32"], info.inputs
    assert "UNIDIRECTIONAL_SEQUENCE_LSTM" not in info.ops and info.float_ops
    kernels = [(w[0], w[1]) for w in info.weights if len(w[2]) >= 2 and w[1] != "INT32"]
    for layer in ("quant_head", "quant_conv"):  # the layers around it are integer
        assert [t for n, t in kernels if layer in n] == ["INT8"], kernels
    assert tfl.report.mean_error_steps <= 1.0 and tfl.report.max_error_steps <= 4


def test_lstm_bits_come_from_the_policy_or_an_annotation():
    model = _seq_model(L.LSTM(4, name="rnn"))
    assert qx.quantize(model, {"default": {"weight_bits": 6}}).get_layer("quant_rnn").quantize_config.weight_bits == 6
    inputs = keras.Input((8, 3))
    x = L.Conv1D(4, 3, padding="same", name="conv")(inputs)
    x = qx.annotate(L.LSTM(4, name="rnn"), weight_bits=4)(x)
    annotated = keras.Model(inputs, L.Dense(2, name="head")(x))
    wrapper = qx.quantize(annotated).get_layer("quant_rnn")
    assert isinstance(wrapper.quantize_config, LSTMQuantizeConfig) and wrapper.quantize_config.weight_bits == 4
    with pytest.raises(ValueError, match="rnn.*output scale.*drop activation_bits"):
        qx.annotate(L.LSTM(4, name="rnn"), activation_bits=8)


def test_an_lstm_merged_by_concatenate_fails_with_the_fix_named_and_the_fix_works(rng):
    """The converter cannot requantize a QAT-trained integer LSTM's output onto a Concatenate's
    scale ("Failed to duplicate values for the stateful op", TF 2.21): the ExportError names the
    policy that leaves the LSTM to the converter, and with it the file exports, verified, the
    LSTM still integer (quantized by the converter from the representative data)."""
    x = rng.normal(size=(32, 12, 4)).astype("float32")

    def model():
        seq = keras.Input((12, 4))
        h = L.LSTM(8, name="lstm")(seq)
        return keras.Model(seq, L.Dense(3)(L.Concatenate()([h, L.Dense(8, name="side")(h)])))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = qx.calibrate(qx.quantize(model()), x)
        with pytest.raises(qx.ExportError, match=r"stateful op.*Leave that LSTM to the converter.*policy "
                                                 r"\{'layers': \{'<lstm name>': \{'quantize': False\}\}\}"):
            qx.export_tflite(qat, x)
        keras.backend.clear_session()
        qat = qx.calibrate(qx.quantize(model(), {"layers": {"lstm": {"quantize": False}}}), x)
        tfl = qx.export_tflite(qat, x)
    assert "UNIDIRECTIONAL_SEQUENCE_LSTM" in tfl.report.info.ops and tfl.report.info.fully_integer
    assert tfl.report.mean_error_steps <= 1.0 and tfl.report.max_error_steps <= 4 + 1e-3
