"""export_tflite / evaluate_tflite / summary on the digits CNN: real conversions, checked in the
TFLite interpreter. Marked slow (each converts a model: seconds)."""
import gzip
import os

import numpy as np
import pytest

import keras_qx as qx
from keras_qx._io import check_writable
from keras_qx.demo import MIXED_POLICY
from tests.conftest import compile_classifier

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(trained_cnn, digits):
    """Float accuracy, and (qat, tflite) for uniform 8-bit and the mixed policy after 2 QAT epochs."""
    (x, y), (xt, yt) = digits
    float_acc = float((trained_cnn.predict(xt, verbose=0).argmax(1) == yt).mean())
    out = {}
    for name, policy in [("int8", None), ("mixed", MIXED_POLICY)]:
        qat = compile_classifier(qx.quantize(trained_cnn, policy), lr=1e-4)
        qat.fit(x, y, epochs=2, batch_size=64, verbose=0)
        out[name] = (qat, qx.export_tflite(qat, x[:200]))
    return float_acc, out


def test_uniform_int8_close_to_float(exported, digits):
    float_acc, out = exported
    _, (xt, yt) = digits
    qat, tfl = out["int8"]
    result = qx.evaluate_tflite(tfl, xt, yt)
    assert result["accuracy"] >= float_acc - 0.005
    assert tfl.report.info.fully_integer and not tfl.report.info.int4_tensors
    assert tfl.report.agreement >= 0.98


def test_mixed_policy_packs_int4_and_is_small(exported, digits):
    float_acc, out = exported
    _, (xt, yt) = digits
    tfl8, tfl = out["int8"][1], out["mixed"][1]
    info = tfl.report.info
    assert len(info.int4_tensors) == 2  # conv2 and fc1
    assert {w[2] for w in info.int4_tensors} == {(64, 512), (32, 3, 3, 16)}  # (out, in) layouts
    assert len(tfl) <= 0.6 * len(tfl8)
    assert qx.evaluate_tflite(tfl, xt, yt)["accuracy"] >= float_acc - 0.015


def test_tflite_matches_keras_within_steps(exported, digits):
    """Every output of the TFLite model within a few output quantization steps of Keras."""
    from keras_qx.lite.inspect import TFLiteRunner

    _, (xt, _) = digits
    for qat, tfl in exported[1].values():
        runner = TFLiteRunner(tfl)
        diff = np.abs(runner.predict(xt[:100]) - qat.predict(xt[:100], verbose=0)) / runner.output_step
        assert np.median(diff) <= 1 and diff.max() <= 4


def test_kernel_bytes_match_cost_model(exported):
    """The shared cost model predicts the bytes of each kernel tensor in the file exactly."""
    qat, tfl = exported[1]["mixed"]
    from keras_qx.qat.summary import layer_costs

    file_kernels = sorted(w[3] for w in tfl.report.info.weights if len(w[2]) in (2, 4))
    predicted = sorted(c.kernel_bytes for c, _ in layer_costs(qat) if c.kernel_bytes)
    assert file_kernels == predicted


def test_evaluate_sizes_and_latency(exported, digits, tmp_path):
    _, (xt, yt) = digits
    tfl = exported[1]["mixed"][1]
    path = tmp_path / "m.tflite"
    path.write_bytes(tfl)
    result = qx.evaluate_tflite(str(path), xt[:50], np.eye(10)[yt[:50]], latency_runs=20)
    assert result["size_bytes"] == len(tfl) == os.path.getsize(path)
    assert result["gzip_bytes"] == len(gzip.compress(bytes(tfl), 9, mtime=0))
    assert 0 < result["latency_ms"] < 100 and result["n"] == 50


def test_export_writes_atomically_and_refuses_bad_paths(exported, digits, tmp_path):
    (x, _), _ = digits
    qat = exported[1]["int8"][0]
    path = tmp_path / "ok.tflite"
    tfl = qx.export_tflite(qat, x[:50], path, verify=False)
    assert path.read_bytes() == bytes(tfl)
    assert [p.name for p in tmp_path.iterdir()] == ["ok.tflite"]  # no temp files left
    with pytest.raises(FileNotFoundError):
        qx.export_tflite(qat, x[:50], tmp_path / "missing" / "m.tflite")
    with pytest.raises(FileNotFoundError):  # the "directory" is a file
        qx.export_tflite(qat, x[:50], path / "m.tflite")
    # procfs takes no new files, not even from root (CI runs as root; a chmod-ed directory
    # would not stop it)
    with pytest.raises(PermissionError, match="not writable"):
        qx.export_tflite(qat, x[:50], "/proc/m.tflite")
    assert [p.name for p in tmp_path.iterdir()] == ["ok.tflite"]


def test_check_writable_probes_the_directory(tmp_path):
    """check_writable creates and removes a file, so it answers what a write would do: also
    for root, whom os.access lets "write" to a read-only mount or procfs."""
    check_writable(tmp_path / "m.tflite")
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind
    with pytest.raises(PermissionError, match="'/proc' is not writable"):
        check_writable("/proc/m.tflite")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_writable(tmp_path / "file" / "m.tflite")
    # A directory without write permission: refused exactly when a real write fails (root's
    # does not, and then there is no reason to refuse).
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o500)
    try:
        (readonly / "x").write_bytes(b"")
        (readonly / "x").unlink()
    except PermissionError:
        with pytest.raises(PermissionError, match="not writable"):
            check_writable(readonly / "m.tflite")
    else:
        check_writable(readonly / "m.tflite")
    assert list(readonly.iterdir()) == []
    readonly.chmod(0o700)


@pytest.mark.parametrize("data, text", [
    (np.zeros((0, 8, 8, 1)), "empty"),
    (np.zeros((4, 7, 7, 1)), r"shape \(4, 7, 7, 1\)"),
    (np.full((4, 8, 8, 1), np.nan), "NaN"),
    ("abc", "numeric"),
])
def test_bad_representative_data(exported, data, text):
    with pytest.raises((ValueError, TypeError), match=text):
        qx.export_tflite(exported[1]["int8"][0], data)


def test_export_refuses_float_model(trained_cnn, digits):
    (x, _), _ = digits
    with pytest.raises(qx.ExportError, match="qx.quantize"):
        qx.export_tflite(trained_cnn, x[:10])


def test_verification_failure_writes_nothing(exported, digits, tmp_path, monkeypatch):
    """If the TFLite model disagrees with Keras, export raises and leaves no file."""
    (x, _), _ = digits
    qat = exported[1]["int8"][0]
    from keras_qx._runtime import RunResult
    from keras_qx.lite import verify

    real_run = verify.run

    def flipped(model, xs, **kwargs):  # the file answers the opposite of the Keras model
        result = real_run(model, xs, **kwargs)
        return RunResult([-qat.predict(xs, verbose=0)], result.output_steps, result.delegate, result.times)

    monkeypatch.setattr(verify, "run", flipped)
    with pytest.raises(qx.ExportError, match="disagrees"):
        qx.export_tflite(qat, x[:64], tmp_path / "bad.tflite")
    assert not list(tmp_path.iterdir())


def test_summary_table(exported):
    qat = exported[1]["mixed"][0]
    lines = []
    text = qx.summary(qat, print_fn=lines.append)
    assert text == "\n".join(lines)
    rows = {l.split()[0]: l.split() for l in lines if l.split() and l.split()[0] in ("conv1", "conv2", "fc1", "logits")}
    assert rows["conv2"][1:4] == ["Conv2D", "4", "8"] and rows["fc1"][1:4] == ["Dense", "4", "8"]
    assert rows["conv1"][2] == "8" and rows["logits"][2] == "8"
    # fc1: 512x64 kernel at 4 bits, two a byte, + 64 int32 biases
    assert rows["fc1"][-2] == f"{512 * 64 // 2 + 64 * 4:,}"
    assert rows["fc1"][-1].startswith("~")  # predicted gzip'd kernel bytes


def test_report_names_layers_stored_wider_than_trained(rng):
    """Sub-4-bit kernels: a 3-bit Dense trains at 3 bits and is stored as INT4 (the report says
    so; at 2 bits it would be INT2); so is a 3-bit Embedding table (keras_qx.lite.tables)."""
    from keras_qx._compat import keras

    ids = keras.Input((6,), dtype="int32", name="ids")
    h = keras.layers.GlobalAveragePooling1D(name="pool")(keras.layers.Embedding(20, 8, name="emb")(ids))
    model = keras.Model(ids, keras.layers.Dense(4, name="fc")(h))
    qat = qx.quantize(model, {"rules": [{"type": "Dense", "weight_bits": 3}, {"type": "Embedding", "weight_bits": 3}]})
    x = rng.integers(0, 20, (64, 6)).astype("int32")
    tfl = qx.export_tflite(qx.calibrate(qat, x), x)
    assert tfl.report.stored_wider == (("emb", 3, 4), ("fc", 3, 4))
    assert any("fc 3-bit as INT4" in line for line in tfl.report.lines())
    kinds = {w[2]: w[1] for w in tfl.report.info.weights if len(w[2]) == 2}
    assert kinds == {(20, 8): "INT4", (4, 8): "INT4"}
