"""Pruning: ``qx.prune`` (per-layer control, errors), sparsity kept through mixed-precision QAT by
``preserve_sparsity`` and measured in the exported file, save/load of the mask."""
from __future__ import annotations

import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras
from keras_qx._seed import seeded
from keras_qx.compress.prune import kernel_sparsity, layer_sparsity, prune_plan
from keras_qx.lite.export import file_sparsity
from keras_qx.quant.quantizers import SparseWeightQuantizer

SPARSITY = 0.75
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(kind: str):
    """A tiny model whose layer ``probe`` is of ``kind``, with a Dense head."""
    with seeded(0):
        inputs = keras.Input((6, 6, 4))
        if kind == "Dense":
            x = keras.layers.Flatten()(inputs)
            x = keras.layers.Dense(24, activation="relu", name="probe")(x)
        else:
            layer = {"Conv2D": lambda: keras.layers.Conv2D(8, 3, activation="relu", name="probe"),
                     "Conv2D_1x1": lambda: keras.layers.Conv2D(8, 1, activation="relu", name="probe"),
                     "DepthwiseConv2D": lambda: keras.layers.DepthwiseConv2D(3, depth_multiplier=2, activation="relu",
                                                                              name="probe")}[kind]()
            x = keras.layers.Flatten()(layer(inputs))
        return keras.Model(inputs, keras.layers.Dense(4, name="head")(x), name=f"tiny_{kind.lower()}")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6, 6, 4)).astype("float32")
    y = (x[:, :3, :3].sum(axis=(1, 2, 3)) > 0).astype("int64") + 2 * (x[:, 3:, 3:, 0].sum(axis=(1, 2)) > 0)
    return x, y


def _pruned(kind, data, sparsity=SPARSITY):
    x, y = data
    model = _model(kind)
    pruned = qx.prune(model, sparsity, layers={"head": {"prune": False}}, frequency=1)
    pruned.compile(keras.optimizers.Adam(1e-3), LOSS)
    with seeded(0):
        pruned.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=qx.pruning_callbacks())
    return qx.strip_pruning(pruned)


def _qat(model, data, bits, preserve, epochs=2, lr=1e-2):
    x, y = data
    qat = qx.quantize(model, {"layers": {"probe": {"weight_bits": bits}}}, preserve_sparsity=preserve)
    qat.compile(keras.optimizers.Adam(lr), LOSS)
    with seeded(0):
        qat.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return qat


def _probe(qat):
    return next(l for l in qat.layers if getattr(l, "layer", None) is not None and l.layer.name == "probe")


def _quantized_kernel(wrapper):
    weight, quantizer, qvars = wrapper._weight_vars[0]
    return np.asarray(quantizer(weight, False, qvars))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", ["Dense", "Conv2D", "DepthwiseConv2D", "Conv2D_1x1"])
def test_sparsity_survives_qat_into_the_file(kind, bits, data):
    stripped = _pruned(kind, data)
    kernel = np.asarray(stripped.get_layer("probe").weights[0])
    n = kernel.size
    expected = (n - max(round(n * (1 - SPARSITY)), 1)) / n  # tfmot keeps round(n * (1 - s)) values
    assert np.count_nonzero(kernel == 0) / n == pytest.approx(expected, abs=1.5 / n)
    pruned_positions = kernel == 0

    qat = _qat(stripped, data, bits, preserve=True)
    wrapper = _probe(qat)
    assert isinstance(wrapper._weight_vars[0][1], SparseWeightQuantizer)
    quantized = _quantized_kernel(wrapper)
    assert np.all(quantized[pruned_positions] == 0), "a pruned weight came back in QAT"
    trained = np.asarray(wrapper._weight_vars[0][0])
    assert not np.allclose(trained[~pruned_positions], kernel[~pruned_positions]), "QAT did not train"

    tfl = qx.export_tflite(qat, data[0][:128])  # verified against the Keras model, or it raises
    assert tfl.report.agreement >= 0.9
    in_file = dict(file_sparsity(qat, tfl.report.info))["probe"]
    # the pruned zeros are all there; rounding to the grid may add a few (most at 4 bits)
    assert expected - 1.5 / n <= in_file <= expected + (0.06 if bits == 4 else 0.02)
    assert in_file == pytest.approx(layer_sparsity(wrapper), abs=1.5 / n)  # summary's figure is the file's
    assert any(line.startswith("kernel sparsity in the file: ") and "probe" in line for line in tfl.report.lines())
    stats = tfl.report.info.kernel_stats()
    name = next(n for n in stats if "quant_probe" in n.split(";")[0].split("/"))
    assert stats[name].distinct <= 2 ** bits - 1  # the symmetric narrow grid: 15 or 255 levels


def test_without_preserve_sparsity_zeros_come_back(data):
    """The bug preserve_sparsity fixes: plain QAT trains the pruned zeros back to life."""
    stripped = _pruned("Dense", data)
    pruned_positions = np.asarray(stripped.get_layer("probe").kernel) == 0
    plain = _qat(stripped, data, 8, preserve=False)
    revived = np.count_nonzero(_quantized_kernel(_probe(plain))[pruned_positions]) / pruned_positions.sum()
    assert revived > 0.5, revived
    kept = _qat(stripped, data, 8, preserve=True)
    assert np.count_nonzero(_quantized_kernel(_probe(kept))[pruned_positions]) == 0


def test_save_load_keeps_the_mask(data, tmp_path):
    stripped = _pruned("Conv2D", data)
    pruned_positions = np.asarray(stripped.get_layer("probe").kernel) == 0
    qat = _qat(stripped, data, 4, preserve=True, epochs=1)
    mask = np.asarray(_probe(qat)._weight_vars[0][2]["mask"])
    assert np.array_equal(mask == 0, pruned_positions)
    path = tmp_path / "pruned_qat.keras"
    qat.save(path)
    loaded = qx.load_model(path)
    wrapper = _probe(loaded)
    assert isinstance(wrapper._weight_vars[0][1], SparseWeightQuantizer)
    assert np.array_equal(np.asarray(wrapper._weight_vars[0][2]["mask"]), mask)
    np.testing.assert_array_equal(loaded.predict(data[0][:32], verbose=0), qat.predict(data[0][:32], verbose=0))
    loaded.compile(keras.optimizers.Adam(1e-2), LOSS)
    loaded.fit(*data, epochs=1, batch_size=32, verbose=0)  # training on after loading: still masked
    assert np.all(_quantized_kernel(wrapper)[pruned_positions] == 0)
    text = qx.summary(loaded, print_fn=None)
    row = next(line.split() for line in text.splitlines() if line.startswith("probe"))
    assert float(row[4].rstrip("%")) / 100 >= SPARSITY - 0.01


def test_polynomial_schedule_and_callbacks(data, tmp_path):
    x, y = data
    pruned = qx.prune(_model("Dense"), 0.5, schedule="polynomial", begin_step=0, end_step=8, frequency=2)
    pruned.compile("adam", LOSS)
    callbacks = qx.pruning_callbacks(logdir=tmp_path / "logs")
    assert [type(c).__name__ for c in callbacks] == ["UpdatePruningStep", "PruningSummaries"]
    pruned.fit(x, y, epochs=2, batch_size=32, verbose=0, callbacks=callbacks)
    sparsity = kernel_sparsity(qx.strip_pruning(pruned))
    assert sparsity["probe"] == pytest.approx(0.5, abs=0.01) and sparsity["head"] == pytest.approx(0.5, abs=0.02)
    assert list(tmp_path.glob("logs/**/*"))


def test_plan_resolution_order():
    model = _model("Conv2D")
    plan = prune_plan(model, 0.8, rules=[{"type": "Conv2D", "sparsity": 0.5}, {"match": "pro.*", "sparsity": 0.6}],
                      layers={"head": {"prune": False}})
    assert (plan["probe"].sparsity, plan["probe"].source) == (0.6, "rule 1")
    assert not plan["head"].pruned and plan["head"].source == "layers"
    plan = prune_plan(model, 0.8, rules=[{"type": "Dense", "sparsity": 0.9, "block_size": (4, 1)}])
    assert (plan["head"].sparsity, plan["head"].block_size) == (0.9, (4, 1)) and plan["probe"].sparsity == 0.8
    pruned = qx.prune(model, 0.8, layers={"probe": {"sparsity": 0}})
    assert [l.name for l in pruned.layers if l.name.startswith("prune_")] == ["prune_low_magnitude_head"]
    # the model is copied, not shared: the unpruned probe is a distinct layer with equal weights...
    probe, original = pruned.get_layer("probe"), model.get_layer("probe")
    assert type(probe) is keras.layers.Conv2D and probe is not original
    assert probe.kernel.shape == original.kernel.shape and np.any(original.kernel.numpy() != 0)
    for copied, source in zip(probe.get_weights(), original.get_weights()):
        np.testing.assert_array_equal(copied, source)
    # ...whose variables are its own: zeroing the copy leaves the user's model as it was
    before = original.kernel.numpy().copy()
    probe.kernel.assign(np.zeros(probe.kernel.shape, "float32"))
    np.testing.assert_array_equal(original.kernel.numpy(), before)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"sparsity": 1.0}, ValueError, r"outside \[0, 1\)"),
    ({"sparsity": -0.1}, ValueError, r"outside \[0, 1\)"),
    ({"sparsity": 80}, ValueError, "looks like a percentage: write 0.8"),
    ({"sparsity": "0.8"}, TypeError, "a number in"),
    ({"layers": {"prob": {"sparsity": 0.5}}}, ValueError, r"lacks: \['prob'\].*'probe'"),
    ({"layers": {"flatten": {"sparsity": 0.5}}}, ValueError, "without kernels"),
    ({"rules": [{"type": "Dense", "sparsty": 0.5}]}, ValueError, r"unknown key\(s\) \['sparsty'\]"),
    ({"rules": [{"type": "Dens"}]}, ValueError, "unknown layer type 'Dens'"),
    ({"rules": [{"sparsity": 0.5}]}, ValueError, "needs a 'type'"),
    ({"block_size": (1, 4)}, ValueError, "needs a 2-D kernel"),
    ({"block_size": (0, 4)}, ValueError, "two positive integers"),
    ({"schedule": "cubic"}, ValueError, "constant"),
    ({"schedule": "polynomial"}, ValueError, "needs end_step"),
    ({"frequency": 0}, ValueError, "frequency"),
    ({"begin_step": 10, "end_step": 5}, ValueError, "before begin_step"),
    ({"sparsity": 0.0}, ValueError, "nothing to prune"),
])
def test_bad_arguments(kwargs, error, match):
    model = _model("Conv2D")
    model.get_layer(index=2)._name = "flatten"
    with pytest.raises(error, match=match):
        qx.prune(model, **kwargs)


def test_misuse_of_the_pruned_model():
    model = _model("Dense")
    with pytest.raises(ValueError, match="no pruning wrappers"):
        qx.strip_pruning(model)
    pruned = qx.prune(model, 0.5)
    with pytest.raises(ValueError, match="strip_pruning"):
        qx.quantize(pruned)
    with pytest.raises(ValueError, match="still has pruning wrappers"):
        qx.prune(pruned, 0.5)
    with pytest.raises(TypeError, match="preserve_sparsity"):
        qx.quantize(model, preserve_sparsity="yes")
    with pytest.warns(UserWarning, match="never pruned"):
        qx.strip_pruning(pruned)  # never trained: no mask was ever computed


def test_annotated_layers_are_pruned_and_keep_their_bits(data):
    x, y = data
    inputs = keras.Input((6, 6, 4))
    h = qx.annotate(keras.layers.Conv2D(8, 3, name="probe"), weight_bits=4)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(keras.layers.Flatten()(h)))
    pruned = qx.prune(model, 0.5, frequency=1)
    assert {l.name for l in pruned.layers if l.name.startswith("prune_")} == {"prune_low_magnitude_probe",
                                                                              "prune_low_magnitude_head"}
    pruned.compile("adam", LOSS)
    pruned.fit(x, y, epochs=1, batch_size=64, verbose=0, callbacks=qx.pruning_callbacks())
    stripped = qx.strip_pruning(pruned)
    assert type(stripped.layers[1]).__name__ == "QuantizeAnnotate"
    qat = qx.quantize(stripped, preserve_sparsity=True)
    assert _probe(qat).quantize_config.weight_bits == 4
    assert kernel_sparsity(qat)["probe"] >= 0.5 - 1 / 288
