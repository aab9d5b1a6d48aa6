"""qx.sensitivity: fake_quantize against WeightQuantizer, each method's numbers recomputed
independently (loss by model.predict, Hessian trace exactly by a Jacobian, SQNR by numpy),
weights restored bit for bit, the report's outputs and the input errors."""
import importlib
import json

import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras, tf
from keras_qx.quant.kinds import kernel_kind
from keras_qx.quant.cost import kernel_bytes, kernel_params
from keras_qx.quant.quantizers import WeightQuantizer
from keras_qx.engine.sensitivity import fake_quantize, quantizable_layers
from tests.conftest import tiny_model

# the module (keras_qx.engine.sensitivity, the attribute, is the function qx.sensitivity)
sens = importlib.import_module("keras_qx.engine.sensitivity")
CNN_LAYERS = ["conv1", "conv2", "fc1", "logits"]


def ref_fake_quantize(w, bits, per_channel, axis=-1, full_range=False):
    """float64 reference of the symmetric narrow-range weight grid (``full_range``: the
    two's-complement grid, -2**(b-1)..2**(b-1)-1 steps of max|w| / 2**(b-1))."""
    w = np.asarray(w, np.float64)
    n = 2 ** (bits - 1) - 1
    if per_channel:
        m = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis % w.ndim), keepdims=True)
    else:
        m = np.abs(w).max()
    scale = m / (n + full_range)
    return np.clip(np.round(w / scale), -n - full_range, n) * scale


def grid(kind, bits) -> bool:
    """The grid qx.quantize trains ``kind`` on at ``bits``: full range for 2-bit FULLY_CONNECTED kernels."""
    return bits == 2 and kind.int2_export


def weight_quantizer_output(w, bits, per_channel, axis=-1, full_range=False):
    quantizer = WeightQuantizer(bits, per_channel, axis, full_range)
    weights = quantizer.build(tf.TensorShape(w.shape), "kernel", keras.layers.Layer())
    return quantizer(tf.constant(w), True, weights).numpy()


def snapshot(model):
    return [w.copy() for w in model.get_weights()]


def assert_identical(before, model):
    after = model.get_weights()
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))  # bit for bit


# ---- fake_quantize ------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape, per_channel, axis", [
    ((3, 3, 4, 8), True, -1),   # Conv2D kernel, per output channel
    ((16, 10), False, -1),      # Dense kernel, per tensor
    ((3, 3, 6, 5), True, -2),   # Conv2DTranspose layout: output channels on axis -2
    ((3, 3, 4, 8), False, -1),  # per-tensor conv
])
def test_fake_quantize_matches_weight_quantizer(rng, shape, per_channel, axis, bits):
    w = (rng.normal(size=shape) * rng.uniform(0.1, 2.0, size=shape[axis]).reshape(
        [-1 if i == len(shape) + axis else 1 for i in range(len(shape))])).astype("float32")
    ours = fake_quantize(w, bits, per_channel, axis)
    assert ours.dtype == np.float32 and ours.shape == w.shape
    tfmot = weight_quantizer_output(w, bits, per_channel, axis)
    scale = np.abs(w).max()
    np.testing.assert_allclose(ours, tfmot, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(ours, ref_fake_quantize(w, bits, per_channel, axis), rtol=1e-6, atol=1e-7 * scale)
    # on the grid: at most 2**(bits-1)-1 levels each side of zero, per scale group
    reduce = tuple(i for i in range(w.ndim) if i != axis % w.ndim) if per_channel else None
    step = np.abs(w).max(axis=reduce, keepdims=True) / (2 ** (bits - 1) - 1)
    levels = ours / step
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert np.abs(np.round(levels)).max() == 2 ** (bits - 1) - 1


def test_fake_quantize_zero_channel(rng):
    w = rng.normal(size=(3, 3, 2, 4)).astype("float32")
    w[..., 1] = 0.0
    q = fake_quantize(w, 4, True)
    assert np.all(q[..., 1] == 0) and np.all(np.isfinite(q))
    np.testing.assert_allclose(q[..., 0], ref_fake_quantize(w, 4, True)[..., 0], rtol=1e-6)
    assert np.all(fake_quantize(np.zeros((4, 3), "float32"), 2, False) == 0)


# ---- method "loss" ------------------------------------------------------------------------
def _ce(logits, y):
    """Mean sparse cross-entropy from logits, in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))


def test_loss_damage_matches_predict(trained_cnn, digits):
    (x, y), _ = digits
    n = 300
    before = snapshot(trained_cnn)
    report = qx.sensitivity(trained_cnn, x, y, candidates=(8, 2, 4, 2), max_samples=n, verbose=False)
    assert_identical(before, trained_cnn)
    assert report.method == "loss" and report.candidates == (2, 4, 8)
    assert report.layers == CNN_LAYERS

    clone = keras.models.clone_model(trained_cnn)
    clone.set_weights(before)
    baseline = _ce(clone.predict(x[:n], verbose=0), y[:n])
    assert report.baseline_loss == pytest.approx(baseline, abs=2e-5)
    for name in CNN_LAYERS:
        layer = clone.get_layer(name)
        kind = kernel_kind(layer)
        original = layer.kernel.numpy()
        for bits in (2, 4, 8):
            layer.kernel.assign(fake_quantize(original, bits, kind.per_channel, kind.channel_axis, grid(kind, bits)))
            expected = _ce(clone.predict(x[:n], verbose=0), y[:n]) - baseline
            layer.kernel.assign(original)
            assert report.damage[name][bits] == pytest.approx(expected, rel=1e-3, abs=2e-5), (name, bits)
    # 2 bits is far coarser than 8: the loss notices on the classifier's last layer
    assert report.damage["logits"][2] > 10 * abs(report.damage["logits"][8])


def test_loss_explicit_loss_and_batches(trained_cnn, digits):
    (x, y), _ = digits
    n = 257  # three uneven batches of 100: the batch-weighted mean is the plain mean
    one = qx.sensitivity(trained_cnn, x, y, candidates=(4,), max_samples=n, batch_size=512, verbose=False)
    many = qx.sensitivity(trained_cnn, x, y, candidates=(4,), max_samples=n, batch_size=100, verbose=False)
    for name in CNN_LAYERS:
        assert many.damage[name][4] == pytest.approx(one.damage[name][4], abs=2e-5)
    # an explicit loss: here MSE against one-hot targets, recomputed by predict
    onehot = np.eye(10, dtype="float32")[y]
    report = qx.sensitivity(trained_cnn, x, onehot, candidates=(2,), loss=keras.losses.MeanSquaredError(),
                            max_samples=128, verbose=False)
    base = np.mean((trained_cnn.predict(x[:128], verbose=0).astype(np.float64) - onehot[:128]) ** 2)
    assert report.baseline_loss == pytest.approx(base, rel=1e-5)


def test_weights_restored_after_every_method_and_on_error(trained_cnn, digits, monkeypatch):
    (x, y), _ = digits
    before = snapshot(trained_cnn)
    for method in ("loss", "hessian", "sqnr"):
        qx.sensitivity(trained_cnn, x, y, candidates=(2, 4), method=method, max_samples=64,
                       hessian_probes=2, verbose=False)
        assert_identical(before, trained_cnn)

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # conv1 at 4 bits, after conv1 at 2 bits was assigned and evaluated
            raise RuntimeError("boom")
        return fake_quantize(*args, **kwargs)

    monkeypatch.setattr(sens, "fake_quantize", failing)
    with pytest.raises(RuntimeError, match="boom"):
        qx.sensitivity(trained_cnn, x, y, candidates=(2, 4, 8), max_samples=64, verbose=False)
    assert len(calls) == 3
    assert_identical(before, trained_cnn)


# ---- method "hessian" ---------------------------------------------------------------------
def _dense_model():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(4, activation="tanh", name="d1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3, name="d2")(h))


def _exact_hessian(model, kernels, x, y, loss):
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            value = loss(y, model(x, training=False))
        grads = inner.gradient(value, kernels)
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
    blocks = outer.jacobian(flat, kernels)
    return np.concatenate([b.numpy().reshape(len(flat), -1) for b in blocks], 1).astype(np.float64)


def test_hessian_trace_matches_exact(rng):
    model = _dense_model()
    x = rng.normal(size=(64, 6)).astype("float32")
    y = rng.normal(size=(64, 3)).astype("float32")
    kernels = [model.get_layer("d1").kernel, model.get_layer("d2").kernel]
    H = _exact_hessian(model, kernels, x, y, keras.losses.MeanSquaredError())
    np.testing.assert_allclose(H, H.T, atol=1e-5)
    spans = {"d1": slice(0, 24), "d2": slice(24, 36)}
    exact = {n: float(np.trace(H[s, s])) for n, s in spans.items()}
    assert min(exact.values()) > 0.1

    before = snapshot(model)
    candidates = (2, 3, 4, 8)
    report = qx.sensitivity(model, x, y, candidates, method="hessian", hessian_probes=800, seed=3,
                            verbose=False)
    assert_identical(before, model)
    assert report.baseline_loss is None
    for name, span in spans.items():
        w = model.get_layer(name).kernel.numpy()
        assert report.params[name] == w.size
        implied = []
        for bits in candidates:
            noise = float(np.sum((fake_quantize(w, bits, False, full_range=bits == 2) - w) ** 2))  # Dense: INT2 grid
            implied.append(report.damage[name][bits] * report.params[name] / noise)
        # damage = trace / n * ||Q(w) - w||^2: one trace behind every bit width
        np.testing.assert_allclose(implied, implied[0], rtol=1e-6)
        # Hutchinson with 800 probes: std of the estimate (from the exact Hessian) well inside 15%
        rows = H[span].copy()
        rows[np.arange(rows.shape[0]), np.arange(span.start, span.stop)] = 0
        std = np.sqrt(2 * np.sum(rows ** 2) / 800)
        assert std < 0.06 * exact[name]
        assert implied[0] == pytest.approx(exact[name], rel=0.15), name
        # damages grow as bits shrink
        d = [report.damage[name][b] for b in candidates]
        assert all(a > b for a, b in zip(d, d[1:]))


def test_hessian_traces_summed_over_batches_equal_the_whole_sample(rng):
    """The HVP runs batch by batch (memory of one batch); the mean loss's Hessian is the
    sample-weighted mean of the batches' ones, so any batching gives the same trace for the same
    probes (uneven last batch included)."""
    from keras_qx.engine.sensitivity import _hessian_traces

    model = _dense_model()
    x = rng.normal(size=(50, 6)).astype("float32")
    y = rng.normal(size=(50, 3)).astype("float32")
    layers = [model.get_layer("d1"), model.get_layer("d2")]
    loss = keras.losses.MeanSquaredError(reduction="none")
    whole = _hessian_traces(model, layers, loss, x, y, probes=3, seed=1, batch_size=50)
    for batch_size in (8, 32):
        batched = _hessian_traces(model, layers, loss, x, y, probes=3, seed=1, batch_size=batch_size)
        assert batched == pytest.approx(whole, rel=1e-4), batch_size


def test_hessian_deterministic_by_seed(rng):
    model = _dense_model()
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.normal(size=(32, 3)).astype("float32")
    run = lambda seed: qx.sensitivity(model, x, y, (4,), method="hessian", hessian_probes=4, seed=seed,
                                      verbose=False).damage
    assert run(5) == run(5)
    assert run(5) != run(6)


# ---- method "sqnr" ------------------------------------------------------------------------
def test_sqnr_exact_and_decreasing(rng):
    model = tiny_model()
    before = snapshot(model)
    candidates = tuple(range(2, 9))
    report = qx.sensitivity(model, candidates=candidates, method="sqnr", verbose=False)
    assert_identical(before, model)
    assert report.layers == ["conv", "fc", "out"] and report.baseline_loss is None
    for layer in quantizable_layers(model):
        kind = kernel_kind(layer)
        w = layer.kernel.numpy()
        damages = []
        for bits in candidates:
            q = fake_quantize(w, bits, kind.per_channel, kind.channel_axis, grid(kind, bits))
            expected = float(np.sum((q - w) ** 2)) / float(np.sum(w ** 2))
            assert report.damage[layer.name][bits] == pytest.approx(expected, rel=1e-12, abs=0)
            ref = ref_fake_quantize(w, bits, kind.per_channel, kind.channel_axis, grid(kind, bits))
            w64 = w.astype(np.float64)
            assert report.damage[layer.name][bits] == pytest.approx(
                np.sum((ref - w64) ** 2) / np.sum(w64 ** 2), rel=1e-4)
            damages.append(report.damage[layer.name][bits])
        assert all(a > b for a, b in zip(damages, damages[1:])), (layer.name, damages)
        assert 0 < damages[-1] < 1e-3 and damages[0] > 0.01
    assert kernel_kind(model.get_layer("conv")).per_channel
    assert not kernel_kind(model.get_layer("fc")).per_channel


# ---- the report ---------------------------------------------------------------------------
@pytest.fixture
def sqnr_report():
    return qx.sensitivity(tiny_model(), candidates=(2, 4, 8), method="sqnr", verbose=False)


def test_report_to_dict_and_costs(sqnr_report):
    model = tiny_model()
    data = json.loads(json.dumps(sqnr_report.to_dict()))
    assert data["method"] == "sqnr" and data["candidates"] == [2, 4, 8]
    assert set(data["layers"]) == {"conv", "fc", "out"}
    for layer in quantizable_layers(model):
        entry = data["layers"][layer.name]
        assert entry["type"] == type(layer).__name__
        assert entry["params"] == kernel_params(layer) == sqnr_report.params[layer.name]
        assert set(entry["damage"]) == set(entry["kernel_bytes"]) == {"2", "4", "8"}
        for b in (2, 4, 8):
            assert entry["damage"][str(b)] == sqnr_report.damage[layer.name][b]
            assert entry["kernel_bytes"][str(b)] == kernel_bytes(layer, b)
    assert data["layers"]["fc"]["kernel_bytes"] == {"2": 288, "4": 576, "8": 1152}  # INT2, INT4, int8


def test_report_table(sqnr_report):
    text = sqnr_report.table()
    lines = text.splitlines()
    assert "sqnr" in lines[0]
    assert all(h in lines[1] for h in ("Layer", "Type", "Params", "2-bit", "4-bit", "8-bit"))
    for name in ("conv", "fc", "out"):
        (row,) = [l for l in lines[2:] if l.split()[0] == name]
        assert f"{sqnr_report.damage[name][2]:.4g}" in row


def test_report_plot(sqnr_report, tmp_path):
    path = tmp_path / "sens.png"
    sqnr_report.plot(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert not [p for p in tmp_path.iterdir() if p.name != "sens.png"]  # no temporary left over
    with pytest.raises(FileNotFoundError):
        sqnr_report.plot(tmp_path / "missing" / "sens.png")


# ---- errors -------------------------------------------------------------------------------
@pytest.fixture
def small():
    model = tiny_model()
    rng = np.random.default_rng(0)
    return model, rng.random((20, 8, 8, 1)).astype("float32"), rng.integers(0, 3, 20)


def test_errors_method_and_candidates(small):
    model, x, y = small
    with pytest.raises(ValueError, match="'fisher'.*loss"):
        qx.sensitivity(model, x, y, method="fisher", verbose=False)
    for bad in ((), [], 4):
        with pytest.raises(ValueError, match="candidates"):
            qx.sensitivity(model, x, y, candidates=bad, verbose=False)
    for bad, match in (((1,), "=1 is out of range"), ((9,), "=9 is out of range"), ((4, 16), "=16")):
        with pytest.raises(ValueError, match=match):
            qx.sensitivity(model, x, y, candidates=bad, verbose=False)
    with pytest.raises(TypeError, match="4.0"):
        qx.sensitivity(model, x, y, candidates=(4.0,), verbose=False)


def test_errors_data(small):
    model, x, y = small
    with pytest.raises(TypeError, match=r"needs samples and targets: qx.sensitivity\(model, x, y\)"):
        qx.sensitivity(model, None, verbose=False)
    for bad in (x,):
        with pytest.raises(ValueError, match=r"y is None: pass targets.*qx.sensitivity\(model, x, y\)"):
            qx.sensitivity(model, bad, verbose=False)
    with pytest.raises(ValueError, match="x has 20 samples but y has 19 targets"):
        qx.sensitivity(model, x, y[:19], verbose=False)
    with pytest.raises(ValueError, match="x has shape"):
        qx.sensitivity(model, x[..., 0], y, verbose=False)
    with pytest.raises(ValueError, match="y is None"):
        qx.sensitivity(model, x, method="hessian", verbose=False)


def test_old_data_forms_still_work_with_a_warning(small):
    """data=(x, y), the pair in x's place and positional candidates: same report, and a
    DeprecationWarning naming the new form (STYLE 22)."""
    model, x, y = small
    new = qx.sensitivity(model, x, y, candidates=(2, 4), verbose=0).damage
    with pytest.warns(DeprecationWarning, match="data=\\(x, y\\) is deprecated, use x, y"):
        assert qx.sensitivity(model, data=(x, y), candidates=(2, 4), verbose=0).damage == new
    with pytest.warns(DeprecationWarning, match="x, y as two arguments"):
        assert qx.sensitivity(model, (x, y), candidates=(2, 4), verbose=0).damage == new
    with pytest.warns(DeprecationWarning, match="deprecated") as caught:
        assert qx.sensitivity(model, (x, y), (2, 4), verbose=0).damage == new
    assert any("candidates=" in str(w.message) for w in caught)


def test_errors_length_mismatch_beyond_max_samples(small):
    model, x, y = small
    with pytest.raises(ValueError, match="samples but y has"):
        qx.sensitivity(model, x, y[:15], max_samples=10, verbose=False)


def test_errors_model():
    inputs = keras.Input((4,))
    no_kernels = keras.Model(inputs, keras.layers.Activation("relu")(keras.layers.Flatten()(inputs)), name="nok")
    with pytest.raises(ValueError, match="'nok' has no Dense/Conv layers"):
        qx.sensitivity(no_kernels, None, method="sqnr", verbose=False)
    vol = keras.Input((4, 4, 4, 1))
    conv3d = keras.Model(vol, keras.layers.Conv3D(2, 3)(vol), name="c3d")  # TFLite keeps Conv3D float
    with pytest.raises(ValueError, match="no Dense/Conv"):
        qx.sensitivity(conv3d, None, method="sqnr", verbose=False)

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            if tf.reduce_sum(x) > 0:  # branching on a value: cannot become a Functional model
                return self.d(x)
            return self.d(-x)

    sub = Sub()
    sub(np.zeros((1, 3), "float32"))
    with pytest.raises(TypeError, match="subclassed .*does not trace"):
        qx.sensitivity(sub, None, method="sqnr", verbose=False)


def test_infer_loss():
    model = tiny_model()
    labels = np.array([0, 1, 2])
    loss = sens.infer_loss(model, labels)
    assert isinstance(loss, keras.losses.SparseCategoricalCrossentropy) and loss.get_config()["from_logits"]
    inputs = keras.Input((3,))
    soft = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(inputs))
    assert not sens.infer_loss(soft, labels).get_config()["from_logits"]
    assert isinstance(sens.infer_loss(model, np.zeros((3, 3), "float32")), keras.losses.MeanSquaredError)
    model.compile("adam", keras.losses.Huber())
    assert isinstance(sens.infer_loss(model, labels), keras.losses.Huber)


def test_loss_by_name(small):
    model, x, y = small
    by_name = qx.sensitivity(model, x, y, (4,), loss="sparse_categorical_crossentropy", verbose=False)
    by_object = qx.sensitivity(model, x, y, (4,), loss=keras.losses.SparseCategoricalCrossentropy(),
                               verbose=False)
    for layer, damage in by_object.damage.items():
        assert by_name.damage[layer] == pytest.approx(damage, rel=1e-5, abs=1e-7)
