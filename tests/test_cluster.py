"""Clustering: ``qx.cluster`` (per-layer control, errors), clusters kept through mixed-precision
QAT by ``preserve_clusters`` and counted in the exported file (per channel where the kernel is
quantized per channel), with pruning, and after save/load."""
from __future__ import annotations

import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras, tf
from keras_qx._seed import seeded
from keras_qx.compress.cluster import _table, cluster_plan, cluster_table, kernel_distinct
from keras_qx.lite.export import file_distinct, file_sparsity
from keras_qx.quant.quantizers import ClusterWeightQuantizer, WeightQuantizer

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
# What each layer asks for: dw (DepthwiseConv2D) 6, pw (1x1 Conv2D) 4, fc (Dense) the default 8,
# conv (Conv2D) 4 per output channel; head is left alone.
ASKED = {"dw": 6, "pw": 4, "conv": 4, "fc": 8}
LAYERS = {"dw": {"clusters": 6}, "pw": {"clusters": 4, "init": "density"},
          "conv": {"clusters": 4, "per_channel": True, "init": "linear"}, "head": {"cluster": False}}
PER_CHANNEL = {"dw", "pw", "conv"}  # quantized per channel: the file's guarantee is per channel


def _model():
    with seeded(0):
        inputs = keras.Input((6, 6, 4))
        x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, activation="relu", name="dw")(inputs)
        x = keras.layers.Conv2D(16, 1, activation="relu", name="pw")(x)
        x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(x)
        x = keras.layers.Dense(24, activation="relu", name="fc")(keras.layers.Flatten()(x))
        return keras.Model(inputs, keras.layers.Dense(4, name="head")(x), name="tiny_clustered")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6, 6, 4)).astype("float32")
    y = (x[:, :3, :3].sum(axis=(1, 2, 3)) > 0).astype("int64") + 2 * (x[:, 3:, 3:, 0].sum(axis=(1, 2)) > 0)
    return x, y


def _fit(model, data, lr=1e-3, epochs=1, **kwargs):
    model.compile(keras.optimizers.Adam(lr), LOSS)
    with seeded(0):
        model.fit(*data, epochs=epochs, batch_size=32, verbose=0, **kwargs)
    return model


@pytest.fixture(scope="module")
def clustered(data):
    """The model clustered as ASKED, fine-tuned one epoch and stripped."""
    stripped = qx.strip_clustering(_fit(qx.cluster(_model(), 8, layers=LAYERS), data))
    found = kernel_distinct(stripped)
    for name, asked in ASKED.items():
        per_channel = LAYERS.get(name, {}).get("per_channel", False)
        kernel = stripped.get_layer(name).weights[0].numpy()
        counts = [np.unique(kernel[..., c]).size for c in range(kernel.shape[-1])] if per_channel else [found[name][0]]
        assert max(counts) <= asked, (name, counts)
    assert found["head"][0] == 96  # left alone
    return stripped


def _qat(model, data, bits, epochs=2, **flags):
    qat = qx.quantize(model, {"default": {"weight_bits": bits}, "layers": {"head": {"weight_bits": 8}}}, **flags)
    return _fit(qat, data, lr=1e-2, epochs=epochs)


def _in_file(qat, tfl) -> dict:
    """{layer: distinct values per channel (per-channel quantized) or per tensor}, read from the file."""
    return {name: (channel if name in PER_CHANNEL else total) for name, total, channel in file_distinct(qat, tfl.report.info)}


def _wrapper(qat, name):
    return next(l for l in qat.layers if getattr(l, "layer", None) is not None and l.layer.name == name)


def _centroids(qat, name):
    weight, quantizer, qvars = _wrapper(qat, name)._weight_vars[0]
    return np.asarray(quantizer.centroids(tf.convert_to_tensor(weight), qvars))


@pytest.mark.parametrize("bits", [4, 8])
def test_clusters_survive_qat_into_the_file(clustered, data, bits):
    before = {}
    qat = qx.quantize(clustered, {"default": {"weight_bits": bits}, "layers": {"head": {"weight_bits": 8}}},
                      preserve_clusters=True)
    for name in ASKED:
        quantizer = _wrapper(qat, name)._weight_vars[0][1]
        assert isinstance(quantizer, ClusterWeightQuantizer), (name, quantizer)
        before[name] = _centroids(qat, name)
    assert type(_wrapper(qat, "head")._weight_vars[0][1]) is WeightQuantizer  # 96 distinct values: not clustered
    # conv: 4 values per channel, 32 in all: one table of 32 fits the 8-bit grid, not the 4-bit one
    assert _wrapper(qat, "conv")._weight_vars[0][1].cluster_axis == (None if bits == 8 else -1)
    _fit(qat, data, lr=1e-2, epochs=2)
    for name in ASKED:  # QAT trained the centroids
        assert not np.allclose(_centroids(qat, name), before[name]), name

    tfl = qx.export_tflite(qat, data[0][:128])  # verified against the Keras model, or it raises
    assert tfl.report.agreement >= 0.9
    found = _in_file(qat, tfl)
    for name, asked in ASKED.items():
        assert found[name] <= asked, (name, found[name], asked)
    assert found["head"] > 8  # the layer left alone fills the grid
    assert any(line.startswith("distinct kernel values in the file: ") for line in tfl.report.lines())
    # summary's Values column is the file's count
    rows = {line.split()[0]: line.split() for line in qx.summary(qat, print_fn=None).splitlines() if line.strip()}
    for name in ASKED:
        assert rows[name][5] == (f"{found[name]}/ch" if name in PER_CHANNEL else str(found[name])), rows[name]


@pytest.mark.slow
def test_without_preserve_clusters_they_are_lost(clustered, data):
    """tfmot issue 1056: plain QAT trains each weight on its own, and the clusters come apart."""
    plain = _qat(clustered, data, 8)
    found = _in_file(plain, qx.export_tflite(plain, data[0][:128]))
    lost = [name for name, asked in ASKED.items() if found[name] > asked]
    assert len(lost) == len(ASKED), found


def test_prune_cluster_quantize_keeps_both(data):
    pruned = qx.prune(_model(), 0.5, layers={"head": {"prune": False}}, frequency=1)
    sparse = qx.strip_pruning(_fit(pruned, data, callbacks=qx.pruning_callbacks()))
    zeros = {n: sparse.get_layer(n).weights[0].numpy() == 0 for n in ASKED}
    clustered = qx.strip_clustering(_fit(qx.cluster(sparse, 8, layers=LAYERS, preserve_sparsity=True), data))
    for name, where in zeros.items():  # tfmot's clustering kept the zeros
        assert np.all(clustered.get_layer(name).weights[0].numpy()[where] == 0), name
    qat = _qat(clustered, data, 4, preserve_sparsity=True, preserve_clusters=True)
    tfl = qx.export_tflite(qat, data[0][:128])
    sparsity, found = dict(file_sparsity(qat, tfl.report.info)), _in_file(qat, tfl)
    for name, asked in ASKED.items():
        assert sparsity[name] >= zeros[name].mean() - 1e-6, (name, sparsity[name], zeros[name].mean())
        assert found[name] <= asked, (name, found[name])
        weight, quantizer, qvars = _wrapper(qat, name)._weight_vars[0]
        assert np.all(np.asarray(quantizer(weight, False, qvars))[zeros[name]] == 0), name


def test_save_load_keeps_the_clustering(clustered, data, tmp_path):
    qat = _qat(clustered, data, 4, epochs=1, preserve_clusters=True)
    index = _wrapper(qat, "conv")._weight_vars[0][2]["cluster_index"].numpy()
    path = tmp_path / "clustered_qat.keras"
    qat.save(path)
    loaded = qx.load_model(path)
    weight, quantizer, qvars = _wrapper(loaded, "conv")._weight_vars[0]
    assert isinstance(quantizer, ClusterWeightQuantizer) and quantizer.cluster_axis is not None
    np.testing.assert_array_equal(qvars["cluster_index"].numpy(), index)
    np.testing.assert_array_equal(loaded.predict(data[0][:32], verbose=0), qat.predict(data[0][:32], verbose=0))
    _fit(loaded, data, lr=1e-2)  # training on after loading: still clustered
    assert kernel_distinct(loaded)["conv"][1] <= ASKED["conv"]
    assert kernel_distinct(loaded)["fc"][0] <= ASKED["fc"]


def test_tables_rebuild_kernels_and_rounding_only_merges():
    rng = np.random.default_rng(1)
    centroids = rng.normal(size=(8, 5)).astype("float32")  # 5 values per output channel
    kernel = np.stack([centroids[c][rng.integers(0, 5, size=(3, 3, 4))] for c in range(8)], axis=-1)
    assert cluster_table([kernel], 255, -1) == (40, None)  # 40 values in all fit an 8-bit grid: one table
    assert cluster_table([kernel], 15, -1) == (5, -1)  # not a 4-bit one: a table per channel
    assert cluster_table([kernel], 15, None) is None  # 40 > 15 levels and no channel axis
    assert cluster_table([rng.normal(size=(4, 4))], 255, None) is None  # all distinct: not clustered
    table, index = _table(kernel, 5, -1)
    np.testing.assert_array_equal(table.reshape(-1)[index], kernel)
    for bits in (2, 4, 8):
        q = ClusterWeightQuantizer(bits, per_channel=True, clusters=5, cluster_axis=-1)
        layer = keras.layers.Layer()
        qvars = q.build(kernel.shape, "k", layer)
        qvars["cluster_index"].assign(index)
        np.testing.assert_array_equal(np.asarray(q.centroids(tf.constant(kernel), qvars)), table)
        bound = np.abs(kernel).max(axis=(0, 1, 2))
        qvars["min_var"].assign(-bound)
        qvars["max_var"].assign(bound)
        out = np.asarray(q(tf.constant(kernel), False, qvars))
        assert max(np.unique(out[..., c]).size for c in range(8)) <= 5
        assert q == ClusterWeightQuantizer.from_config(q.get_config())


def test_plan_resolution_order():
    plan = cluster_plan(_model(), 16, rules=[{"type": "Conv2D", "clusters": 8}, {"match": "f.*", "clusters": 4}],
                        layers={"head": {"cluster": False}, "pw": {"clusters": 12}})
    assert {n: (s.clusters, s.source) for n, s in plan.items()} == {
        "dw": (16, "default"), "pw": (12, "layers"), "conv": (8, "rule 0"), "fc": (4, "rule 1"), "head": (0, "layers")}
    plan = cluster_plan(_model(), 8, per_channel=True)
    assert plan["conv"].per_channel and not plan["fc"].per_channel  # Conv2D only (tfmot)
    assert not plan["pw"].clustered and "left alone" in plan["pw"].source  # 8 values per channel <= 8 clusters
    clustered = qx.cluster(_model(), 8, layers={"head": {"cluster": False}})
    assert sorted(l.name for l in clustered.layers if l.name.startswith("cluster_")) == [
        "cluster_conv", "cluster_dw", "cluster_fc", "cluster_pw"]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"clusters": 1}, ValueError, "too few: use 2 or more"),
    ({"clusters": 2, "preserve_sparsity": True}, ValueError, "use 3 or more with preserve_sparsity"),
    ({"clusters": 300}, ValueError, "at most 256"),
    ({"clusters": 16.0}, TypeError, "an integer >= 2"),
    ({"clusters": "16"}, TypeError, "an integer >= 2"),
    ({"init": "kmeans"}, ValueError, r"init='kmeans' is unknown; use one of \['kmeans\+\+'"),
    ({"layers": {"fcc": {"clusters": 4}}}, ValueError, r"lacks: \['fcc'\].*'fc'"),
    ({"layers": {"flatten": {"clusters": 4}}}, ValueError, "without kernels, which have nothing to cluster"),
    ({"layers": {"fc": {"cluster_count": 4}}}, ValueError, r"unknown key\(s\) \['cluster_count'\]"),
    ({"layers": {"fc": {"per_channel": True}}}, ValueError, "Conv2D kernels only"),
    ({"rules": [{"type": "Dens", "clusters": 4}]}, ValueError, "unknown layer type 'Dens'"),
    ({"rules": [{"clusters": 4}]}, ValueError, "needs a 'type'"),
    ({"layers": {n: {"cluster": False} for n in ("dw", "pw", "conv", "fc", "head")}}, ValueError, "nothing to cluster"),
    ({"preserve_sparsity": "yes"}, TypeError, "preserve_sparsity"),
])
def test_bad_arguments(kwargs, error, match):
    model = _model()
    model.get_layer(index=4)._name = "flatten"
    with pytest.raises(error, match=match):
        qx.cluster(model, **kwargs)


def test_misuse_of_the_clustered_model():
    model = _model()
    with pytest.raises(ValueError, match="no clustering wrappers"):
        qx.strip_clustering(model)
    clustered = qx.cluster(model, 8)
    with pytest.raises(ValueError, match="strip_clustering"):
        qx.quantize(clustered)
    with pytest.raises(ValueError, match="still has clustering wrappers"):
        qx.cluster(clustered, 8)
    with pytest.raises(ValueError, match="strip_pruning"):
        qx.cluster(qx.prune(model, 0.5), 8)
    with pytest.raises(TypeError, match="preserve_clusters"):
        qx.quantize(model, preserve_clusters="yes")
