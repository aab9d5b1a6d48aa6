"""Embedding tables at 8/4/2 bits (keras_qx.lite.tables): QAT trains the table at the policy's
bits, the file stores it packed (INT4 / INT2 EMBEDDING_LOOKUP with a float output, quantized
back onto the table's int8 grid) and computes what the QAT model computes."""
import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras
from keras_qx.lite.tables import pack_tables
from keras_qx.quant.cost import kernel_bytes, storage_bits
from tests.conftest import compile_classifier

L = keras.layers
VOCAB, WIDTH, LENGTH = 1000, 16, 12


def _text_model():
    keras.utils.set_random_seed(0)
    ids = keras.Input((LENGTH,), dtype="int32", name="ids")
    h = L.GlobalAveragePooling1D(name="pool")(L.Embedding(VOCAB, WIDTH, name="emb")(ids))
    return keras.Model(ids, L.Dense(4, name="fc")(h))


def _data(rng, n=256):
    x = rng.integers(0, VOCAB, (n, LENGTH)).astype("int32")
    return x, (x % 4)[:, 0]


def test_cost_model_counts_embedding_tables_at_4_and_2_bits():
    emb = L.Embedding(VOCAB, WIDTH)
    emb.build((None, LENGTH))
    assert [storage_bits(emb, b) for b in (8, 4, 3, 2)] == [8, 4, 4, 2]
    assert [kernel_bytes(emb, b) for b in (8, 4, 2)] == [16000, 8000, 4000]


def test_quantize_trains_embedding_below_8_bits_without_warning():
    qat = qx.quantize(_text_model(), {"layers": {"emb": {"weight_bits": 2}}})  # warnings are errors here
    assert qat.get_layer("quant_emb").quantize_config.weight_bits == 2


def test_pack_tables_leaves_int8_tables_alone(rng):
    model = _text_model()
    x, _ = _data(rng, 32)
    data = bytes(qx.export_tflite(qx.calibrate(qx.quantize(model), x), x))
    assert pack_tables(data) == (data, {})


@pytest.fixture(scope="module")
def exports():
    rng = np.random.default_rng(0)
    x, y = _data(rng)
    files = {}
    for bits in (8, 4, 2):
        qat = qx.quantize(_text_model(), {"layers": {"emb": {"weight_bits": bits}}})
        compile_classifier(qat, lr=1e-2).fit(x, y, epochs=2, batch_size=32, verbose=0)
        files[bits] = (qat, qx.export_tflite(qx.calibrate(qat, x), x))
    return x, files


@pytest.mark.slow
@pytest.mark.parametrize("bits,stored", [(8, "INT8"), (4, "INT4"), (2, "INT2")])
def test_file_stores_the_table_packed_and_agrees_with_qat(exports, bits, stored):
    x, files = exports
    qat, tfl = files[bits]
    info = qx.inspect_tflite(tfl)
    table = [w for w in info.weights if w[2] == (VOCAB, WIDTH)]
    assert [w[1] for w in table] == [stored]
    assert table[0][3] == VOCAB * WIDTH * bits // 8
    assert info.fully_integer
    assert ("EMBEDDING_LOOKUP" in info.ops) == (bits < 8)
    # the file computes what the QAT model computes: within one output step (the lookup is exact;
    # the int8 MEAN rounds where Keras's float mean does not: 2-bit rows tie more often, measured 0.09)
    assert tfl.report.verification.max_error_steps <= 1.0 + 1e-3
    assert tfl.report.verification.mean_error_steps < 0.25
    out = qx.evaluate_tflite(tfl, x[:64], (x[:64] % 4)[:, 0])
    assert np.isfinite(out["accuracy"])


@pytest.mark.slow
def test_file_shrinks_by_the_tables_saving(exports):
    _, files = exports
    size = {bits: len(bytes(tfl)) for bits, (_, tfl) in files.items()}
    table = VOCAB * WIDTH
    graph = 1024  # the RESHAPE / EMBEDDING_LOOKUP / QUANTIZE / RESHAPE that replace the GATHER
    assert size[8] - table // 2 <= size[4] <= size[8] - table // 2 + graph
    assert size[8] - 3 * table // 4 <= size[2] <= size[8] - 3 * table // 4 + graph


def test_auto_policy_and_summary_see_sub_byte_tables(rng):
    """An embedding-heavy model under 0.4x of its int8 bytes: feasible only with the table below
    8 bits (it was infeasible while Embedding could only be int8); summary counts its bytes."""
    model = _text_model()
    x, y = _data(rng)
    policy = qx.auto_policy(compile_classifier(model), x, y, budget="0.4x", verbose=0)
    assert policy.layers["emb"]["weight_bits"] in (2, 4)
    lines = []
    qx.summary(qx.quantize(model, policy), print_fn=lines.append)
    row = next(line for line in "\n".join(lines).splitlines() if line.startswith("emb "))
    bits = policy.layers["emb"]["weight_bits"]
    assert f"{VOCAB * WIDTH * bits // 8:,}" in row
