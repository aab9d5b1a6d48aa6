"""Export you can trust: saved files cannot run code, and library calls leave no global traces.

Each attack is shown to work without the guard (so the test proves something), then refused.
"""
import json
import os
import random
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras, tf, tf_symbol
from keras_qx._seed import seeded
from keras_qx.rewrite import tfop
from keras_qx.rewrite.tfop import SAFE_TF_OPS, VALUE_PRESERVING, TFOp
from tests.conftest import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# 1. TFOp calls only side-effect-free TF ops


def test_allowlist_names_real_ops():
    assert [n for n in SAFE_TF_OPS if tf_symbol(n) is None] == []
    assert all(tfop.is_safe_tf_op(n) for n in VALUE_PRESERVING | {"einsum", "math.multiply", "nn.silu"})


@pytest.mark.parametrize("symbol", ["io.write_file", "io.read_file", "print", "py_function", "numpy_function",
                                    "compat.v1.py_func", "raw_ops.WriteFile", "raw_ops.Add", "debugging.check_numerics"])
def test_tfop_refuses_unsafe_ops(symbol):
    with pytest.raises(ValueError, match=rf"tf\.{symbol}.*allowlist.*Replace that call"):
        TFOp(symbol, {"args": [{"__tensor__": 0}]}, name="op")
    with pytest.raises(ValueError, match=rf"layer 'op' calls tf\.{symbol}.*do not load a file you did not write"):
        TFOp.from_config({"name": "op", "symbol": symbol, "template": {"args": []}})


def test_quantize_refuses_a_model_calling_an_unsafe_op():
    inputs = keras.Input((4,))
    x = tf.debugging.check_numerics(keras.layers.Dense(4)(inputs), "bad")  # a TFOpLambda off the list
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    with pytest.raises(ValueError, match=r"tf\.debugging\.check_numerics.*Keras layer"):
        qx.quantize(model)


def _craft_write_file_model(tmp_path, target):
    """A .keras file whose TFOp layer was edited to call tf.io.write_file(target, ...)."""
    inputs = keras.Input((4,))
    x = TFOp("math.multiply", {"args": [{"__tensor__": 0}, 2.0], "kwargs": {}}, name="scale")(inputs)
    keras.Model(inputs, keras.layers.Dense(2, name="d")(x)).save(tmp_path / "clean.keras")
    crafted = tmp_path / "crafted.keras"
    with zipfile.ZipFile(tmp_path / "clean.keras") as src, zipfile.ZipFile(crafted, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "config.json":
                config = json.loads(data)
                layer = next(l for l in config["config"]["layers"] if l["config"]["name"] == "scale")
                layer["config"].update(symbol="io.write_file", template={"args": [str(target), "pwned"]})
                data = json.dumps(config).encode()
            dst.writestr(item, data)
    return crafted, layer["config"]


def test_crafted_tfop_cannot_write_a_file(tmp_path, monkeypatch):
    target = tmp_path / "pwned.txt"
    crafted, layer_config = _craft_write_file_model(tmp_path, target)
    with monkeypatch.context() as m:  # without the allowlist, the crafted layer writes the file
        m.setattr(tfop, "SAFE_TF_OPS", SAFE_TF_OPS | {"io.write_file"})
        try:
            TFOp.from_config(layer_config)(tf.zeros((1, 4)))
        except Exception:
            pass  # write_file returns no tensor; the file is written by then
    assert target.read_text() == "pwned"
    target.unlink()

    for safe_mode in (True, False):  # no safe_mode switch lets a TFOp call an op off the list
        with pytest.raises(ValueError, match=rf"{crafted.name}.*tf\.io\.write_file.*whatever safe_mode says"):
            qx.load_model(crafted, safe_mode=safe_mode)
    with qx.quantize_scope(), pytest.raises(ValueError, match="io.write_file"):
        keras.models.load_model(crafted)
    with pytest.raises(ValueError, match="io.write_file"):
        TFOp.from_config(layer_config)
    assert not target.exists()


# 2. load_model keeps safe mode on, whatever the format


def _lambda_model(marker):
    """A model whose Lambda layer writes ``marker`` whenever it is called (also while the
    model is rebuilt on load)."""
    inputs = keras.Input((4,))
    x = keras.layers.Lambda(eval(f"lambda t: (open({str(marker)!r}, 'w').close(), t)[1]"), name="double")(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, name="d")(x))


@pytest.mark.parametrize("name", ["m.keras", "m.h5", "saved_model"])
def test_lambda_layers_are_refused_in_every_format(tmp_path, name):
    marker = tmp_path / "ran"
    model = _lambda_model(marker)
    path = tmp_path / name
    model.save(path)
    marker.unlink()
    if name == "m.h5":  # tf_keras alone runs the file's bytecode while loading an h5 file
        keras.models.load_model(path)
        assert marker.exists()
        marker.unlink()
    with pytest.raises(ValueError, match=rf"{name}.*Lambda layer 'double'.*safe_mode=False only if you trust"):
        qx.load_model(path)
    assert not marker.exists()
    loaded = qx.load_model(path, safe_mode=False)  # the user's explicit trust
    x = np.ones((2, 4), "float32")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


def test_unsafe_layers_finds_nested_lambdas_and_raw_tf_calls():
    config = {"class_name": "Functional", "config": {"name": "m", "layers": [
        {"class_name": "TFOpLambda", "config": {"name": "tf.math.multiply", "function": "math.multiply"}},
        {"class_name": "TFOpLambda", "config": {"name": "w", "function": "io.write_file"}},
        {"class_name": "TimeDistributed", "config": {"name": "td", "layer": {
            "module": "keras.layers", "class_name": "Lambda", "config": {"name": "inner"}}}},
        {"class_name": "Sequential", "config": {"name": "s", "layers": [
            {"class_name": "keras.layers.Lambda", "config": {"name": "deep"}}]}}]}}
    from keras_qx.qat.saving import unsafe_layers

    assert unsafe_layers(config) == ["layer 'w' calling tf.io.write_file", "Lambda layer 'inner'",
                                     "Lambda layer 'deep'"]


# 3. The CLI never unpickles


class _Evil:
    """Unpickling this makes a directory: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_cli_refuses_pickled_data(tmp_path, capsys):
    from keras_qx.cli import main

    marker = tmp_path / "unpickled"
    data = tmp_path / "data.npz"
    arrays = {k: np.zeros((4, 4), "float32") for k in ("x_train", "x_test")}
    np.savez(data, y_train=np.array([_Evil(marker)], dtype=object), y_test=np.zeros(4), **arrays)
    np.load(data, allow_pickle=True)["y_train"]  # what unpickling would do
    assert marker.is_dir()
    marker.rmdir()
    inputs = keras.Input((4,))
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(tmp_path / "m.keras")

    assert main(["analyze", "--model", str(tmp_path / "m.keras"), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "'y_train' holds Python objects" in err and "unpickle" in err
    assert not marker.exists()
    np.save(tmp_path / "x.npy", np.zeros(3))
    assert main(["analyze", "--model", str(tmp_path / "m.keras"), "--data", str(tmp_path / "x.npy")]) == 2
    assert "single .npy array" in capsys.readouterr().err
    (tmp_path / "cut.npz").write_bytes(data.read_bytes()[:100])
    assert main(["analyze", "--model", str(tmp_path / "m.keras"), "--data", str(tmp_path / "cut.npz")]) == 2
    assert "cut.npz" in (err := capsys.readouterr().err) and "not a readable .npz" in err


# 4. simulate_only survives save, load and clone


def test_simulate_only_survives_save_load_and_clone(rng, tmp_path):
    from keras_qx.qat.quantize import unexportable_layers

    qat = qx.quantize(tiny_model(), {"default": {"activation_bits": 4}}, simulate_only=True)
    x = rng.random((8, 8, 8, 1)).astype("float32")
    refused = unexportable_layers(qat)
    assert refused and set(refused.values()) == {"activation_bits=4"}
    qat.save(tmp_path / "sim.keras")
    qat.save(tmp_path / "sim.h5")
    loaded = qx.load_model(tmp_path / "sim.keras")
    with qx.quantize_scope():
        cloned = keras.models.clone_model(loaded)
    for model in (qat, loaded, qx.load_model(tmp_path / "sim.h5"), cloned):
        assert unexportable_layers(model) == refused
        with pytest.raises(qx.ExportError, match="simulate_only.*activation_bits=4"):
            qx.export_tflite(model, x)
    assert unexportable_layers(qx.quantize(tiny_model())) == {}


def test_simulate_only_int8_only_layer_below_8_bits_is_refused(rng):
    from keras_qx.qat.quantize import unexportable_layers

    inputs = keras.Input((4, 4, 2))
    x = keras.layers.Conv2DTranspose(3, 3, name="up")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="d")(keras.layers.Flatten()(x)))
    policy = {"default": {"weight_bits": 4}}
    qat = qx.quantize(model, policy, simulate_only=True)
    assert list(unexportable_layers(qat)) == ["up"]  # before, export went ahead with it
    with pytest.raises(qx.ExportError, match="simulate_only.*'up'.*weight_bits=4"):
        qx.export_tflite(qat, rng.random((4, 4, 4, 2)).astype("float32"))
    with pytest.warns(UserWarning, match="int8"):
        assert unexportable_layers(qx.quantize(model, policy)) == {}


# 5. No global side effects


def test_plots_leave_the_matplotlib_backend_alone(tmp_path):
    """In a fresh process on the svg backend (the old code switched it to Agg for good)."""
    script = ("import matplotlib, matplotlib.pyplot as plt\n"
              "before = matplotlib.get_backend()\n"
              "from keras_qx._plot import axes, finish\n"
              "fig, ax = axes()\n"
              "ax.plot([1, 2], [3, 4])\n"
              f"finish(fig, {str(tmp_path / 'p.png')!r})\n"
              "print(before, matplotlib.get_backend(), plt.get_fignums())\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MPLBACKEND": "svg", "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["svg", "svg", "[]"]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _global_state():
    return random.getstate(), np.random.get_state()


def _same_state(a, b):
    return a[0] == b[0] and all(np.array_equal(u, v) for u, v in zip(a[1], b[1]))


def test_seeded_restores_python_numpy_tf_and_keras_random_state():
    keras.utils.set_random_seed(123)
    reference = [float(tf.random.uniform(())) for _ in range(2)]
    weights = keras.layers.Dense(3)
    weights.build((None, 2))
    reference_kernel = weights.kernel.numpy()

    keras.utils.set_random_seed(123)
    first = float(tf.random.uniform(()))
    before = _global_state()
    with seeded(7):
        inside = (random.random(), np.random.rand(), float(tf.random.uniform(())))
        keras.layers.Dense(3).build((None, 2))
    assert _same_state(before, _global_state())
    assert [first, float(tf.random.uniform(()))] == reference  # TF's op-seed sequence resumes
    dense = keras.layers.Dense(3)
    dense.build((None, 2))
    np.testing.assert_array_equal(dense.kernel.numpy(), reference_kernel)  # so does Keras's generator
    with seeded(7):
        assert (random.random(), np.random.rand(), float(tf.random.uniform(()))) == inside
    with seeded(None):
        random.random()
    assert not _same_state(before, _global_state())  # None seeds (and restores) nothing


def test_data_helpers_leave_the_global_random_state_alone():
    from keras_qx.data import digits_cnn, load_digits

    before = _global_state()
    a, b = digits_cnn(filters=2, dense=4, seed=3), digits_cnn(filters=2, dense=4, seed=3)
    load_digits(seed=1)
    assert _same_state(before, _global_state())
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def test_write_atomic_fsyncs_the_file_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    import stat

    from keras_qx._io import write_atomic

    events = []
    fsync, replace = os.fsync, os.replace

    def record_fsync(fd):
        events.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        fsync(fd)

    def record_replace(src, dst):
        events.append("rename")
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    write_atomic(tmp_path / "out.bin", b"data")
    assert events == ["file", "rename", "dir"]
    assert (tmp_path / "out.bin").read_bytes() == b"data"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
