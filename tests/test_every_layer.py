"""Every public layer class of tf_keras.layers (listed from the module at test time, aliases once)
gets one treatment, checked in the exported file: quantized (integer kernels), pass-through (no
requantization, exact values), identity (no op at all), kept float (a float op, a warning naming
the layer and why) or refused (a PolicyError naming the fix). A class a new tf_keras adds shows
up here as unknown and fails. Cases: tests/layer_cases.py; table: bench/results/layers.md."""
import warnings

import pytest

import keras_qx as qx
from keras_qx.qat.quantize import _inner
from keras_qx.quant.configs import KeptFloatQuantizeConfig, NoOpQuantizeConfig
from keras_qx.quant.kinds import kernel_kind, treatment
from tests.layer_cases import CASES, NOT_A_MODEL_LAYER, label, layer_classes, measure

CLASSES = layer_classes()
BY_LABEL = {}
for _name in sorted(CLASSES):
    BY_LABEL.setdefault(label(_name), []).append(_name)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_class_has_a_treatment_and_a_case(name):
    assert label(name) != "unknown", f"{name}: new in tf_keras? add it to keras_qx.quant.kinds.TREATMENTS"
    assert (name in CASES) != (name in NOT_A_MODEL_LAYER), name


def test_cases_name_real_classes_and_aliases_count_once():
    assert set(CASES) | set(NOT_A_MODEL_LAYER) == set(CLASSES)
    assert "AvgPool2D" not in CLASSES and CLASSES["AveragePooling2D"] is qx._compat.keras.layers.AvgPool2D


@pytest.mark.parametrize("name", sorted(CASES))
def test_quantize_applies_the_treatment(name):
    """The fast half: quantize only; the wrapper's config says what the file will get."""
    model, _ = CASES[name]()
    kind = label(name)
    reason = treatment(CLASSES[name]).reason
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if kind == "refused":
            with pytest.raises(qx.PolicyError, match="keras_qx cannot quantize") as err:
                qx.quantize(model)
            assert name in str(err.value) and reason in str(err.value)
            return
        qat = qx.quantize(model)
    messages = [str(w.message) for w in caught]
    layer_name = [l.name for l in model.layers if type(l).__name__ == name][0]
    wrappers = [l for l in qat.layers if hasattr(l, "quantize_config")]
    mine = [l for l in wrappers if l.layer.name != "head"]
    assert mine, [l.name for l in qat.layers]
    config = mine[0].quantize_config
    if kind == "kept float":
        assert any(f"'{layer_name} (" in m and reason in m for m in messages), messages
        if treatment(CLASSES[name]).kind == "float":
            assert isinstance(config, KeptFloatQuantizeConfig)
    else:
        assert not any("float" in m and "keras_qx" in m for m in messages), messages
    if kind in ("pass-through", "identity"):
        assert all(isinstance(l.quantize_config, NoOpQuantizeConfig) for l in mine), name
    if kind == "quantized" and any(kernel_kind(_inner(l.layer)) for l in mine):
        assert any(l.quantize_config.weight_bits == 8 for l in mine)


# Float ops the converter leaves in an otherwise integer file (measured, TF 2.21): GroupNorm's
# variance (SQUARE), Masking's comparison with the mask value (NOT_EQUAL).
ALLOWED_FLOAT = {"GroupNormalization": {"SQUARE"}, "Masking": {"NOT_EQUAL"}}
BILINEAR = {"Resizing", "RandomCrop"}  # interpolate: within half a step of Keras, not exact
REQUANTIZES = {"Masking"}  # its 0/1 mask is quantized for the MUL; the values pass exactly
# keras_qx keeps it float, but the converter runs a TimeDistributed(Dense) integer from its int8
# edges (its own 8-bit weight scales; measured): a file better than the promise
CONVERTER_QUANTIZES = {"TimeDistributed"}


def _check(name, kind, got):
    where = f"{name}: {got}"
    if kind == "refused":
        assert "error" in got, where
        return
    assert "error" not in got, where
    if kind == "quantized":
        assert set(got["float_ops"]) <= ALLOWED_FLOAT.get(name, set()), where
        assert all(k in ("INT8", "INT4") for k in got["kernels"]), where
        # exported with min_agreement=0.0 (random tiny models have near-ties): the error in output
        # steps is the check (worst measured alone: 0.66 mean / 3 max, LayerNormalization)
        assert got["mean"] <= 1.0 and got["max"] <= 4.0, where
    elif kind == "pass-through":
        assert ("QUANTIZE" not in got["ops"] or name in REQUANTIZES) and set(got["float_ops"]) <= ALLOWED_FLOAT.get(name, set()), where
        assert got["max"] <= (0.51 if name in BILINEAR else 1e-3), where
    elif kind == "identity":
        assert got["ops"] == [] and got["max"] == 0, where
    elif kind == "kept float":
        assert got["mean"] <= 1.0 and got["max"] <= 4.0, where
        assert got["float_ops"] or name in CONVERTER_QUANTIZES, where
        assert any("float" in w and name.lower()[:4] in w.lower() for w in got["warnings"]), where
        if treatment(CLASSES[name]).kind == "float":  # float inside, the Dense head after it integer
            assert "INT8" in got["kernels"] and got["max"] <= 2.5, where


GROUPS = {kind: names for kind, names in BY_LABEL.items() if kind not in ("not a model layer", "unknown")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(GROUPS))
def test_exported_file_shows_the_treatment(kind):
    """The slow half: each class of a treatment quantized, calibrated, exported and read back."""
    failures = []
    for name in GROUPS[kind]:
        try:
            _check(name, kind, measure(name))
        except AssertionError as err:
            failures.append(str(err)[:400])
    assert not failures, "\n".join(failures)


def test_standard_layers_never_need_a_policy_error_except_refusals():
    counts = {k: len(v) for k, v in BY_LABEL.items()}
    assert counts.get("unknown", 0) == 0
    assert sum(counts.values()) == len(CLASSES)
