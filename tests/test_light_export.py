"""Light conversion (keras_qx.lite.light): the converter sees a constant stand-in for each
FULLY_CONNECTED kernel and keras_qx writes the integers; the file must run exactly as the file
converted from the real kernels, filter for filter."""
import re
import warnings

import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras, tflite_model_object, tflite_schema
from keras_qx.lite import convert, light
from keras_qx.lite.edit import builtin_code
from keras_qx.lite.inspect import TFLiteRunner

L = keras.layers


def _encoder(vocab=300, width=32, seq=12):
    """Embedding -> attention block (a decomposed MultiHeadAttention: query/key/value/output
    EinsumDense) -> feed-forward on the sequence -> pooled Dense head."""
    ids = keras.Input((seq,), dtype="int32")
    x = L.Embedding(vocab, width, name="emb")(ids)
    a = L.MultiHeadAttention(num_heads=2, key_dim=width // 2, name="mha")(x, x)
    x = L.LayerNormalization(name="ln")(L.Add()([x, a]))
    f = L.Dense(2 * width, activation="relu", name="ff_a")(x)
    x = L.Add()([x, L.Dense(width, name="ff_b")(f)])
    x = L.GlobalAveragePooling1D()(x)
    return keras.Model(ids, L.Dense(3, name="head")(x), name="light_encoder")


def _variable_length():
    """A user-style sequence model: any length, Dense on each step, a Dense head on 2-D input
    (per-channel scales)."""
    inputs = keras.Input((None, 6))
    x = L.Dense(24, activation="relu", name="step_fc")(inputs)
    x = L.GlobalAveragePooling1D()(x)
    x = L.Dense(16, activation="relu", name="fc")(x)
    return keras.Model(inputs, L.Dense(4, name="out")(x), name="light_sequence")


def _fc_filters(data: bytes) -> dict:
    """{layer name in the op's output: (filter integers, filter scales)} of each FULLY_CONNECTED op."""
    model, schema = tflite_model_object(data), tflite_schema()
    out = {}
    for graph in model.subgraphs:
        for op in graph.operators:
            if builtin_code(model, op) != schema.BuiltinOperator.FULLY_CONNECTED:
                continue
            filt = graph.tensors[op.inputs[1]]
            found = [re.search(r"quant_(\w+?)/", t.name.decode().split(";")[0]) for t in (graph.tensors[op.outputs[0]], filt)]
            layer = next(f for f in found if f).group(1)  # a model output is named by the signature
            out[layer] = (bytes(model.buffers[filt.buffer].data), np.asarray(filt.quantization.scale).tolist(),
                          filt.type)
    return out


def _calibrated(model, x, policy=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qx.calibrate(qx.quantize(model, policy), x)


def _both(qat, x, monkeypatch):
    """(file the plain way, file the light way, the stand-ins the light way wrote)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = bytes(qx.export_tflite(qat, x, min_agreement=0.0))
        monkeypatch.setattr(light, "MIN_ELEMENTS", 0)
        written = []
        original = light.write_stand_ins

        def spy(data, sites):
            result = original(data, sites)
            written.append((len(sites), result is not None))
            return result

        monkeypatch.setattr(light, "write_stand_ins", spy)
        tfl = qx.export_tflite(qat, x, min_agreement=0.0)
    return plain, tfl, written


def test_encoder_file_runs_as_the_plain_one(rng, monkeypatch):
    model = _encoder()
    x = rng.integers(0, 300, (48, 12)).astype("int32")
    policy = {"layers": {"ff_a": {"weight_bits": 4}, "ff_b": {"weight_bits": 2}, "mha": {"weight_bits": 4}}}
    qat = _calibrated(model, x, policy)
    plain, tfl, written = _both(qat, x, monkeypatch)
    assert written == [(7, True)]  # query, key, value, output, ff_a, ff_b, head: all written
    assert tfl.report.mean_error_steps <= 1.0  # verified against the QAT model on export
    np.testing.assert_array_equal(TFLiteRunner(bytes(tfl)).predict(x), TFLiteRunner(plain).predict(x))
    light_filters, plain_filters = _fc_filters(bytes(tfl)), _fc_filters(plain)
    assert set(light_filters) == {"mha_query", "mha_key", "mha_value", "mha_output", "ff_a", "ff_b", "head"}
    assert light_filters == plain_filters  # integers, scales and storage type (INT8 / INT4 / INT2)
    types = {v[2] for v in light_filters.values()}
    schema = tflite_schema()
    assert {schema.TensorType.INT8, schema.TensorType.INT4, schema.TensorType.INT2} <= types


def test_variable_length_model_runs_as_the_plain_one_at_two_lengths(rng, monkeypatch):
    model = _variable_length()
    x = rng.normal(size=(64, 20, 6)).astype("float32")
    qat = _calibrated(model, x, {"layers": {"fc": {"weight_bits": 4}}})
    plain, tfl, written = _both(qat, x, monkeypatch)
    assert written == [(3, True)]
    assert _fc_filters(bytes(tfl)) == _fc_filters(plain)
    for length in (20, 37):
        xs = rng.normal(size=(8, length, 6)).astype("float32")
        np.testing.assert_array_equal(TFLiteRunner(bytes(tfl)).predict(xs), TFLiteRunner(plain).predict(xs))


def test_the_traced_graph_holds_no_stand_in_kernel(rng):
    x = rng.integers(0, 300, (16, 12)).astype("int32")
    qat = _calibrated(_encoder(), x)
    sites = light.stand_ins(qat, min_elements=0)
    kernels = [s.weight for s in sites]
    converter = convert.converter_for(qat, stand_ins=kernels)
    captured = converter._funcs[0].captured_inputs
    assert not any(k.handle is h for k in kernels for h in captured)
    saved = converter._trackable_obj.variables_
    assert not {id(v) for v in saved} & {id(k) for k in kernels}
    handles = {id(v.handle) for v in saved}
    assert all(id(h) in handles for h in captured)  # all else the graph reads is saved for the converter


def test_small_models_convert_the_plain_way(rng):
    model = _encoder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = qx.quantize(model)
    assert light.stand_ins(qat) == []  # under MIN_ELEMENTS
    assert len(light.stand_ins(qat, min_elements=0)) == 7


def test_a_filter_not_found_gives_none(rng):
    x = rng.integers(0, 300, (16, 12)).astype("int32")
    qat = _calibrated(_encoder(), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = bytes(qx.export_tflite(qat, x, min_agreement=0.0))
    site = light.stand_ins(qat, min_elements=0)[0]
    site.layer = type("Renamed", (), {"name": "no_such_layer"})()
    assert light.write_stand_ins(data, [site]) is None


@pytest.mark.slow
def test_a_model_over_the_threshold_exports_light_by_default(rng, monkeypatch):
    """No threshold lowered: 17 M FULLY_CONNECTED weights take the light path, and the file
    is verified against the QAT model on export."""
    inputs = keras.Input((256,))
    x = L.Dense(4096, activation="relu", name="wide")(inputs)
    x = L.Dense(4096, activation="relu", name="wider")(x)
    model = keras.Model(inputs, L.Dense(8, name="out")(x), name="wide_mlp")
    x_data = rng.normal(size=(32, 256)).astype("float32")
    qat = _calibrated(model, x_data, {"layers": {"wider": {"weight_bits": 4}}})
    assert sum(int(np.prod(s.weight.shape)) for s in light.stand_ins(qat)) >= light.MIN_ELEMENTS
    written = []
    original = light.write_stand_ins
    monkeypatch.setattr(light, "write_stand_ins", lambda data, sites: written.append(1) or original(data, sites))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tfl = qx.export_tflite(qat, x_data, min_agreement=0.9)
    assert written == [1]
    assert tfl.report.info.fully_integer and tfl.report.mean_error_steps <= 1.0
    filters = _fc_filters(bytes(tfl))
    schema = tflite_schema()
    assert filters["wider"][2] == schema.TensorType.INT4 and filters["wide"][2] == schema.TensorType.INT8
    assert len(filters["wider"][0]) == 4096 * 4096 // 2  # packed two a byte
