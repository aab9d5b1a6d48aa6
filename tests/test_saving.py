"""A QAT model saved as .keras, .h5 or SavedModel loads back with identical predictions."""
import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras
from tests.conftest import compile_classifier, tiny_model


@pytest.fixture
def trained_qat(rng):
    policy = {"rules": [{"type": "Dense", "weight_bits": 4}], "layers": {"conv": {"weight_bits": 2}}}
    qat = compile_classifier(qx.quantize(tiny_model(), policy))
    x = rng.random((64, 8, 8, 1)).astype("float32")
    qat.fit(x, rng.integers(0, 3, 64), epochs=1, verbose=0)
    return qat, x


@pytest.mark.parametrize("name", ["m.keras", "m.h5", "saved_model"])
def test_round_trip_identical(trained_qat, tmp_path, name):
    qat, x = trained_qat
    path = tmp_path / name
    qat.save(path)
    loaded = qx.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qat.predict(x, verbose=0))
    if name != "saved_model":  # SavedModel restores layers as generic objects
        bits = {l.layer.name: l.quantize_config.weight_bits for l in loaded.layers
                if hasattr(l, "quantize_config") and hasattr(l.quantize_config, "weight_quantizer")}
        assert bits == {"conv": 2, "fc": 4, "out": 4}


def test_quantize_scope_reads_keras_format(trained_qat, tmp_path):
    qat, x = trained_qat
    qat.save(tmp_path / "m.keras")
    with qx.quantize_scope():
        loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), qat.predict(x, verbose=0))


def test_loaded_model_keeps_training_and_exports(trained_qat, tmp_path):
    qat, x = trained_qat
    qat.save(tmp_path / "m.keras")
    loaded = qx.load_model(tmp_path / "m.keras")
    loaded.fit(x, np.zeros(64), epochs=1, verbose=0)
    tfl = qx.export_tflite(loaded, x, verify=False)
    assert len(tfl.report.info.int4_tensors) == 3  # fc, out (4-bit) and conv (2-bit, stored as INT4)


def test_loading_never_patches_tfmot_classes(trained_qat, tmp_path):
    """The .keras fixes are installed once, at import; no scope or load touches tfmot's classes."""
    from keras_qx import _compat
    from keras_qx._compat import quantize_layer, quantize_wrapper

    names = ("build_from_config", "load_own_variables")
    classes = (quantize_layer.QuantizeLayer, quantize_wrapper.QuantizeWrapper, quantize_wrapper.QuantizeWrapperV2)

    def methods():
        return [(c, n, c.__dict__.get(n)) for c in classes for n in names]

    before = methods()
    assert quantize_wrapper.QuantizeWrapper.load_own_variables is _compat._load_wrapper_variables
    qat, _ = trained_qat
    qat.save(tmp_path / "m.keras")
    with pytest.raises(RuntimeError):
        with qx.quantize_scope():
            assert methods() == before
            raise RuntimeError("boom")
    qx.load_model(tmp_path / "m.keras")
    _compat._install_keras_format_fixes()  # idempotent
    assert methods() == before


def test_annotated_float_model_round_trips(tmp_path):
    inputs = keras.Input((4,))
    out = qx.annotate(keras.layers.Dense(2, name="d"), weight_bits=3)(inputs)
    model = keras.Model(inputs, out)
    model.save(tmp_path / "float.keras")
    loaded = qx.load_model(tmp_path / "float.keras")
    assert loaded.layers[1].quantize_config == model.layers[1].quantize_config
    assert loaded.layers[1].quantize_config.weight_bits == 3


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.keras"):
        qx.load_model("nope.keras")


def _float_files(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    for name in ("m.keras", "m.h5", "sm"):
        model.save(tmp_path / name)
    model.save_weights(tmp_path / "weights.h5")
    return model


@pytest.mark.parametrize("make, error, text", [
    (lambda p: (p / "m.keras").read_bytes()[:300], ValueError, r"not a valid \.keras file .*truncated"),
    (lambda p: (p / "m.h5").read_bytes()[:3000], ValueError, r"not a readable HDF5 file .*truncated"),
    (lambda p: b"not a model", ValueError, r"not a valid \.h5 file"),
    (lambda p: (p / "weights.h5").read_bytes(), ValueError, r"holds no model, only weights.*load_weights"),
    ("dir", ValueError, "is a directory but not a SavedModel"),
    ("bad_saved_model", OSError, "cannot load .*Wire format was corrupt"),
    ("zip", ValueError, "zip archive.*rename it to end in .keras"),
    ("no_config", ValueError, r"not a readable \.keras file .*config\.json"),
])
def test_unreadable_files_name_the_file(tmp_path, make, error, text):
    import shutil
    import zipfile

    _float_files(tmp_path)
    if make == "dir":
        path = tmp_path / "empty"
        path.mkdir()
    elif make == "bad_saved_model":
        path = tmp_path / "sm"
        (path / "saved_model.pb").write_bytes(b"garbage")
    elif make == "zip":
        path = tmp_path / "m.zip"
        shutil.copy(tmp_path / "m.keras", path)
    elif make == "no_config":
        path = tmp_path / "bare.keras"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("metadata.json", "{}")
    else:
        path = tmp_path / ("bad.keras" if "keras" in text else "bad.h5")
        path.write_bytes(make(tmp_path))
    with pytest.raises(error, match=text) as info:
        qx.load_model(path)
    assert repr(str(path)) in str(info.value)
