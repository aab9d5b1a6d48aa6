"""Determinism: the same seed, model and data give the same sensitivity, policy, QAT weights and
.tflite bytes when the whole pipeline runs twice in one process.

What does change the bytes is the Keras model's name: the converter names each tensor after the
TF ops it fuses, and those sit under the model's name scope (``model/quant_conv/Conv2D``). An
unnamed model is called ``model``, then ``model_1``... by a process-wide Keras counter, so two
builds of one unnamed model give files that differ in their tensor names only (checked below).
The converter itself writes no timestamp and orders the file deterministically.
"""
import flatbuffers
import pytest

import keras_qx as qx
from keras_qx._compat import keras, tflite_schema
from tests.conftest import compile_classifier

pytestmark = pytest.mark.slow
L = keras.layers


def _model(name):
    inputs = keras.Input((8, 8, 1), name="image")
    x = L.Conv2D(4, 3, name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ReLU(name="relu")(x)
    x = L.Flatten(name="flat")(x)
    x = L.Dense(16, activation="relu", name="fc")(x)
    return keras.Model(inputs, L.Dense(10, name="logits")(x), name=name)


def pipeline(seed, x, y, name="det"):
    """Build and train from ``seed``, measure sensitivity (loss, and the hessian with its
    random probes), allocate, quantize, fine-tune, export (unverified: the bytes are the
    point). Nothing is cleared in between."""
    keras.utils.set_random_seed(seed)
    model = compile_classifier(_model(name))
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    out = {"name": model.name}
    out["loss"] = qx.sensitivity(model, x, y, (2, 4, 8), verbose=False)
    out["hessian"] = qx.sensitivity(model, x, y, (2, 4, 8), method="hessian", hessian_probes=2,
                                    max_samples=128, seed=seed, verbose=False)
    out["policy"] = qx.auto_policy(model, budget="5bits", report=out["loss"], verbose=False)
    qat = compile_classifier(qx.quantize(model, out["policy"]))
    qat.fit(x, y, epochs=1, batch_size=64, verbose=0)
    out["weights"] = [w.copy() for w in qat.get_weights()]
    out["tflite"] = bytes(qx.export_tflite(qat, x[:200], verify=False))
    return out


@pytest.fixture(scope="module")
def data(digits):
    (x, y), _ = digits
    return x[:512], y[:512]


@pytest.fixture(scope="module")
def runs(data):
    keras.backend.clear_session()
    return {"first": pipeline(0, *data), "second": pipeline(0, *data), "other": pipeline(1, *data),
            "unnamed": pipeline(0, *data, name=None)}


def _same_arrays(a, b):
    return len(a) == len(b) and all(p.shape == q.shape and p.dtype == q.dtype and p.tobytes() == q.tobytes()
                                    for p, q in zip(a, b))


def test_same_seed_same_sensitivity_policy_and_bytes(runs):
    first, second = runs["first"], runs["second"]
    assert first["name"] == second["name"] == "det"
    for method in ("loss", "hessian"):
        assert first[method].damage == second[method].damage  # exactly, not approximately
        assert first[method].baseline_loss == second[method].baseline_loss
    assert first["policy"] == second["policy"]
    assert first["policy"].to_json() == second["policy"].to_json()  # the reasoning in meta too
    assert {s["weight_bits"] for s in first["policy"].layers.values()} == {4, 8}  # a mixed policy: the allocation decided something
    assert _same_arrays(first["weights"], second["weights"])  # bit for bit
    assert first["tflite"] == second["tflite"]


def test_another_seed_gives_another_file(runs):
    """The comparison above has teeth: a different seed changes the weights and the bytes."""
    first, other = runs["first"], runs["other"]
    assert not _same_arrays(first["weights"], other["weights"])
    assert first["tflite"] != other["tflite"]
    assert first["hessian"].damage != other["hessian"].damage  # its probes follow the seed


def _repacked(data, rename=None):
    """The flatbuffer parsed and packed again, tensor names passed through ``rename``."""
    model = tflite_schema().ModelT.InitFromPackedBuf(bytearray(data), 0)
    names = []
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            if tensor.name is not None:
                name = tensor.name.decode()
                tensor.name = (rename(name) if rename else name).encode()
                names.append(name)
    builder = flatbuffers.Builder(len(data))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), names


def test_model_name_changes_only_tensor_names(runs):
    """The same pipeline with an unnamed model (``model``, ``model_1``... by Keras's counter):
    the same weights, another file, and only the tensor names that carry the model's name
    differ. Two builds of one unnamed model are two such names."""
    named, unnamed = runs["first"], runs["unnamed"]
    assert unnamed["name"].startswith("model") and _model(None).name != _model(None).name
    assert named["loss"].damage == unnamed["loss"].damage and named["policy"] == unnamed["policy"]
    assert _same_arrays(named["weights"], unnamed["weights"])
    assert named["tflite"] != unnamed["tflite"]
    packed_a, names_a = _repacked(named["tflite"])
    packed_b, names_b = _repacked(unnamed["tflite"])
    assert packed_a != packed_b and len(names_a) == len(names_b)
    assert any(n.startswith("det/") for n in names_a)
    assert any(n.startswith(unnamed["name"] + "/") for n in names_b)

    def neutral(owner):
        return lambda name: name.replace(owner + "/", "MODEL/")

    assert _repacked(named["tflite"], neutral("det"))[0] == _repacked(unnamed["tflite"], neutral(unnamed["name"]))[0]
