"""Layers of sequence models: MultiHeadAttention (decomposed into integer TFLite ops),
EinsumDense (INT4-packed at 4 bits) and Embedding (integer token-id inputs)."""
import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras
from keras_qx.quant.cost import kernel_bytes
from keras_qx.rewrite.flatten import ATTENTION_PARTS, flatten_nested
from keras_qx.qat.quantize import resolve

pytestmark = pytest.mark.slow
L = keras.layers


def encoder(mask: bool = False):
    """A one-block transformer encoder: attention, residual, LayerNorm, GELU feed-forward."""
    inputs = keras.Input((6, 16), name="tokens")
    kwargs = {"use_causal_mask": True} if mask else {}
    x = L.MultiHeadAttention(num_heads=2, key_dim=8, name="mha")(inputs, inputs, **kwargs)
    x = L.LayerNormalization(name="ln")(L.Add(name="res")([x, inputs]))
    x = L.Dense(16, activation="gelu", name="ff")(x)
    return keras.Model(inputs, L.Dense(3, name="head")(L.GlobalAveragePooling1D()(x)))


def test_attention_decomposition_computes_the_same(rng):
    model = encoder()
    flat = flatten_nested(model)
    names = [l.name for l in flat.layers]
    assert {f"mha_{p}" for p in ATTENTION_PARTS} | {"ff", "ff_activation"} <= set(names)
    x = rng.normal(size=(8, 6, 16)).astype("float32")
    np.testing.assert_allclose(flat.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


def test_attention_exports_fully_integer_with_int4_projections(rng, tmp_path):
    model = encoder()
    policy = {"default": {"weight_bits": 4}, "layers": {"head": {"weight_bits": 8}}}
    qat = qx.quantize(model, policy)
    x = rng.normal(size=(64, 6, 16)).astype("float32")
    qat.compile("adam", "mse")
    qat.fit(x, rng.random((64, 3)), epochs=2, verbose=0)
    tfl = qx.export_tflite(qat, x, min_agreement=0.8)
    info = tfl.report.info
    assert info.fully_integer, info.float_ops
    assert info.ops.count("BATCH_MATMUL") == 2 and "SOFTMAX" in info.ops
    # q, k, v, output projections and the feed-forward: INT4, at the cost model's bytes
    assert len(info.int4_tensors) == 5
    projections = sum(kernel_bytes(qat.get_layer(f"quant_mha_{p}").layer, 4) for p in ("query", "key", "value", "output"))
    assert projections == sum(w[3] for w in info.int4_tensors if "mha" in w[0]) == 4 * 16 * 16 // 2
    assert tfl.report.mean_error_steps < 1.0 and tfl.report.max_error_steps <= 4
    # the decomposed model saves and loads like any QAT model
    qat.save(tmp_path / "enc.keras")
    loaded = qx.load_model(tmp_path / "enc.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), qat.predict(x, verbose=0), atol=1e-6)


def test_policy_entry_for_attention_applies_to_its_parts():
    specs = resolve(encoder(), {"layers": {"mha": {"weight_bits": 4}}})
    assert {n: specs[n].weight_bits for n in specs if n.startswith("mha_")} == {f"mha_{p}": 4 for p in ATTENTION_PARTS}
    assert specs["ff"].weight_bits == 8


def test_masked_attention_is_refused_clearly_and_can_stay_float(rng):
    model = encoder(mask=True)
    with pytest.raises(ValueError, match=r"mha.*use_causal_mask.*'quantize': false"):
        qx.quantize(model)
    qat = qx.quantize(model, {"layers": {"mha": {"quantize": False}}})
    assert isinstance(qat.get_layer("mha"), L.MultiHeadAttention)  # whole and float
    x = rng.normal(size=(16, 6, 16)).astype("float32")
    qat(x, training=True)
    tfl = qx.export_tflite(qat, x, min_agreement=0.0)  # int8_io=None: float edges, the attention stays float
    assert not tfl.report.info.fully_integer  # honest: the attention runs in float
    assert tfl.report.info.inputs[0][1] == "FLOAT32" and tfl.report.max_error_steps <= 4
    with pytest.warns(UserWarning, match=r"keras_qx: layers kept float \(\['mha'\]\) stay float32"):
        qx.export_tflite(qat, x, min_agreement=0.0, int8_io=True)


def test_einsum_dense_4_bit_packs_and_matches_numpy_reference(rng):
    inputs = keras.Input((5, 12))
    layer = L.EinsumDense("abc,cde->abde", output_shape=(5, 2, 4), bias_axes="de", name="ed")
    model = keras.Model(inputs, L.Dense(3, name="head")(L.Flatten()(layer(inputs))))
    qat = qx.quantize(model, {"layers": {"ed": {"weight_bits": 4}}})
    x = rng.normal(size=(32, 5, 12)).astype("float32")
    qat(x, training=True)
    wrapper = qat.get_layer("quant_ed")
    kernel = wrapper.layer.kernel.numpy()
    step = np.abs(kernel).max() / 7
    fake = np.clip(np.round(kernel / step), -7, 7) * step  # symmetric narrow 4-bit, per tensor
    qkernel = [v for v in wrapper.weights if "kernel" in v.name][0]
    tfl = qx.export_tflite(qat, x, min_agreement=0.0)
    assert tfl.report.info.fully_integer
    assert [w[3] for w in tfl.report.info.int4_tensors] == [kernel_bytes(layer, 4)] == [12 * 8 // 2]
    # the TFLite INT4 kernel holds the same 4-bit grid values as the QAT simulation
    from keras_qx.lite.inspect import TFLiteRunner

    interp = TFLiteRunner(bytes(tfl)).interpreter
    stored = [d for d in interp.get_tensor_details() if d["name"] == tfl.report.info.int4_tensors[0][0]][0]
    values = interp.get_tensor(stored["index"]).astype(np.float32) * stored["quantization_parameters"]["scales"][0]
    # FULLY_CONNECTED stores (outputs, inputs): the kernel's (c, d, e) as (d*e, c), value for value
    assert values.shape == (8, 12), values.shape
    np.testing.assert_allclose(values, fake.reshape(12, 8).T, atol=1e-3 * step + 1e-6)
    assert qkernel is not None


def test_embedding_takes_token_ids_and_exports_int4(rng):
    inputs = keras.Input((6,), dtype="int32", name="ids")
    x = L.Embedding(50, 16, name="emb")(inputs)
    model = keras.Model(inputs, L.Dense(3, name="head")(L.GlobalAveragePooling1D()(x)))
    qat = qx.quantize(model, {"default": {"weight_bits": 4}})  # the table too (keras_qx.lite.tables)
    ids = rng.integers(0, 50, size=(64, 6)).astype("int32")
    qat.compile("adam", "mse")
    qat.fit(ids, rng.random((64, 3)), epochs=2, verbose=0)
    tfl = qx.export_tflite(qat, ids, min_agreement=0.8)
    info = tfl.report.info
    assert info.fully_integer and "EMBEDDING_LOOKUP" in info.ops and "GATHER" not in info.ops
    table = [w for w in info.weights if w[2] == (50, 16)]
    assert table and table[0][1] == "INT4" and table[0][3] == kernel_bytes(model.get_layer("emb"), 4) == 400
    assert tfl.report.mean_error_steps < 1.0
    with pytest.raises(ValueError, match="token ids"):
        qx.export_tflite(qat, ids + 0.5)
