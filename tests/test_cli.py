import subprocess
import sys

import pytest

from keras_qx.cli import main


def test_inspect_and_errors(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.tflite")]) == 2
    assert "no TFLite file" in capsys.readouterr().err
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a flatbuffer")
    assert main(["inspect", str(junk)]) == 2
    assert "TFL3" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["demo", "--epochs", "0"], "keras-qx: error: --epochs must be at least 1"),
    (["demo", "--qat-epochs", "0"], "keras-qx: error: --qat-epochs must be at least 1"),
    (["demo", "--policy", "/no/such/policy.json"], "keras-qx: error: --policy '/no/such/policy.json': no such file"),
])
def test_bad_arguments(argv, message, capsys):
    """argparse's usage error (exit 2) naming the offending flag and value: a renamed flag would be
    'unrecognized arguments' instead and fail here."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err and "unrecognized arguments" not in captured.err, captured.err
    assert captured.err.startswith("usage: keras-qx") and not captured.out


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    """The README's main job, shortened: prints the table and writes the files."""
    proc = subprocess.run(
        [sys.executable, "-m", "keras_qx.cli", "demo", "--epochs", "6", "--qat-epochs", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[1/4]" in proc.stderr and "[4/4]" in proc.stderr
    rows = [l for l in proc.stdout.splitlines() if l.startswith("| ") and "%" in l]
    assert [r.split("|")[1].strip() for r in rows] == ["float32", "int8 (uniform)", "mixed (auto)"]
    assert "chosen weight bits" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "digits_float.tflite", "digits_int8.tflite", "digits_mixed.tflite", "mixed_policy.json"]
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "digits_mixed.tflite")]) == 0
    shown = capsys.readouterr().out
    assert "INT4" in shown and "/ch)" in shown  # conv kernels: distinct values per channel too


@pytest.mark.slow
def test_quantize_verb_writes_policy_tflite_and_report(tmp_path, capsys):
    import keras_qx as qx
    from keras_qx.lite.inspect import inspect_tflite

    out = tmp_path / "q"
    assert main(["quantize", "--budget", "0.6x", "--epochs", "3", "--qat-epochs", "1", "--method", "sqnr",
                 "--keep", "logits", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.tflite", "policy.json", "report.md", "sensitivity.png"]
    policy = qx.Policy.from_json((out / "policy.json").read_text())
    meta = policy.meta["auto_policy"]
    assert policy.layers["logits"]["weight_bits"] == 8
    kernels = sum(w[3] for w in inspect_tflite(str(out / "model.tflite")).weights if len(w[2]) >= 2)
    assert kernels == meta["predicted_kernel_bytes"] <= meta["budget_bytes"]
    assert f"in the file {kernels:,}" in (out / "report.md").read_text()
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_analyze_verb_and_user_model(tmp_path, digits, trained_cnn, capsys):
    import json

    import numpy as np

    (x, y), (xt, yt) = digits
    trained_cnn.save(tmp_path / "float.keras")
    np.savez(tmp_path / "data.npz", x_train=x[:256], y_train=y[:256], x_test=xt[:64], y_test=yt[:64])
    assert main(["analyze", "--model", str(tmp_path / "float.keras"), "--data", str(tmp_path / "data.npz"),
                 "--method", "loss", "--candidates", "4,8", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in ("conv1", "conv2", "fc1", "logits"))
    report = json.loads((tmp_path / "sensitivity.json").read_text())
    assert report["method"] == "loss" and report["candidates"] == [4, 8]
    np.savez(tmp_path / "bad.npz", x=x)
    assert main(["analyze", "--model", str(tmp_path / "float.keras"), "--data", str(tmp_path / "bad.npz")]) == 2
    assert "lacks array(s)" in capsys.readouterr().err


def test_budget_errors(capsys):
    assert main(["quantize", "--budget", "lots", "--epochs", "1"]) == 2
    assert "budget must be bytes" in (err := capsys.readouterr().err) and "got 'lots'" in err


# ---- which split chooses the policy -------------------------------------------------------

def _task(n, seed):
    """Separable 4-class samples: the class is the largest of the first four features."""
    import numpy as np

    x = np.random.default_rng(seed).normal(size=(n, 8)).astype("float32")
    return x, x[:, :4].argmax(1)


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    """A small trained float model saved as .keras (compiled with a sparse cross-entropy)."""
    from keras_qx._compat import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8,), name="x")
    h = keras.layers.Dense(16, activation="relu", name="fc1")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(4, name="out")(h))
    model.compile(keras.optimizers.Adam(1e-2), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(*_task(256, 0), epochs=20, verbose=0)
    path = tmp_path_factory.mktemp("model") / "float.keras"
    model.save(path)
    return path


def test_validation_split_choice(tmp_path, capsys):
    """x_val when the .npz has it; else the test split, with a warning that the test figure is
    then optimistic. Never the tail of x_train (the float model trained on it)."""
    import numpy as np

    from keras_qx.cli import _load_data, _validation

    (x, y), (xv, yv), (xt, yt) = _task(64, 1), _task(37, 2), _task(24, 3)
    np.savez(tmp_path / "with_val.npz", x_train=x, y_train=y, x_val=xv, y_val=yv, x_test=xt, y_test=yt)
    data = _validation(_load_data(str(tmp_path / "with_val.npz")), "with_val.npz")
    assert data.val_name == "x_val/y_val" and len(data.val[0]) == 37 and len(data.train[0]) == 64
    assert data.describe() == "Validation split (chose the policy): x_val/y_val, 37 samples."
    assert "warning" not in capsys.readouterr().err
    np.savez(tmp_path / "no_val.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    data = _validation(_load_data(str(tmp_path / "no_val.npz")), str(tmp_path / "no_val.npz"))
    assert data.val is data.test and len(data.val[0]) == 24
    err = capsys.readouterr().err
    assert "warning: no_val.npz has no x_val/y_val" in err and "test accuracy is optimistic" in err
    assert "x_test/y_test" in data.describe() and "optimistic" in data.describe()


@pytest.mark.slow
def test_search_validates_on_x_val(tmp_path, capsys, monkeypatch, float_model):
    """The trials are scored on x_val (37 samples), QAT trains on all of x_train (64), and the
    report and the printed summary name the split."""
    import numpy as np

    from keras_qx.engine.search import BitWidthTuner

    (x, y), (xv, yv), (xt, yt) = _task(64, 1), _task(37, 2), _task(24, 3)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_val=xv, y_val=yv, x_test=xt, y_test=yt)
    seen = {}
    original = BitWidthTuner.search

    def spy(self, x, y=None, **kwargs):
        seen["train"], seen["val"] = len(x), len(kwargs["validation_data"][0])
        seen["same"] = np.array_equal(kwargs["validation_data"][0], xv)
        return original(self, x, y, **kwargs)

    monkeypatch.setattr(BitWidthTuner, "search", spy)
    out = tmp_path / "s"
    assert main(["search", "--model", str(float_model), "--data", str(tmp_path / "d.npz"), "--budget", "0.8x",
                 "--trials", "1", "--qat-epochs", "1", "--out", str(out)]) == 0
    assert seen == {"train": 64, "val": 37, "same": True}
    captured = capsys.readouterr()
    line = "Validation split (chose the policy): x_val/y_val, 37 samples."
    assert line in captured.out and line in (out / "results.md").read_text()
    assert "trials validated on x_val/y_val, 37 samples" in captured.err
    assert "TFLite (test split, 24 samples)" in captured.out


@pytest.mark.slow
def test_quantize_without_x_val_says_the_test_split_chose(tmp_path, capsys, float_model):
    import numpy as np

    (x, y), (xt, yt) = _task(64, 1), _task(24, 3)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(float_model), "--data", str(tmp_path / "d.npz"), "--budget", "0.8x",
                 "--qat-epochs", "1", "--candidates", "4,8", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    report = (out / "report.md").read_text()
    assert "Validation split (chose the policy): x_test/y_test (no x_val in the data), 24 samples." in report
    assert "test accuracy is optimistic" in report and "test accuracy is optimistic" in captured.out
    assert "sensitivity (loss) on x_test/y_test (no x_val in the data), 24 samples" in captured.err


@pytest.mark.slow
def test_quantize_with_gptq_and_no_qat_writes_the_calibrated_file(tmp_path, capsys, float_model):
    """--weights gptq --qat-epochs 0: the file from calibration alone, its kernels GPTQ-rounded
    (the file's Dense kernels are integers on the QAT model's grid), and the report says so;
    --qat-epochs below 0 is refused, 0 only for quantize."""
    import numpy as np

    (x, y), (xt, yt) = _task(128, 1), _task(64, 3)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=xt, y_test=yt, x_val=xt[:32], y_val=yt[:32])
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(float_model), "--data", str(tmp_path / "d.npz"), "--budget", "0.6x",
                 "--candidates", "4,8", "--weights", "gptq", "--qat-epochs", "0", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "calibrate (GPTQ, 128 samples), no QAT (--qat-epochs 0)" in captured.err
    report = (out / "report.md").read_text()
    assert "with GPTQ rounding, then no QAT (--qat-epochs 0)." in report
    accuracy = float(report.split("accuracy ")[1].split("%")[0]) / 100
    assert accuracy >= 0.8, report  # the float model separates the task; calibration alone keeps it
    for argv, least in ((["quantize", "--budget", "0.6x", "--qat-epochs", "-1"], 0), (["demo", "--qat-epochs", "0"], 1)):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2 and f"--qat-epochs must be at least {least}" in capsys.readouterr().err


def test_quantize_with_a_latency_budget_reports_the_predicted_time(tmp_path, capsys, monkeypatch, float_model):
    """--budget 0.9x,60us: the allocation meets both caps against the latency table (a hand-made
    one here: the measurement is tested on its own), and the report prints the predicted time."""
    import numpy as np

    import keras_qx as qx
    from keras_qx.engine import latency as latency_module

    table = latency_module.LatencyTable(base_us=30.0, layers={"fc1": {2: 20.0, 4: 20.0, 8: 9.0},
                                                              "out": {2: 6.0, 4: 6.0, 8: 4.0}})
    monkeypatch.setattr(latency_module, "latency_table", lambda model, candidates, **kw: table)
    (x, y), (xv, yv), (xt, yt) = _task(64, 1), _task(37, 2), _task(24, 3)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_val=xv, y_val=yv, x_test=xt, y_test=yt)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(float_model), "--data", str(tmp_path / "d.npz"), "--budget", "0.9x,46us",
                 "--qat-epochs", "1", "--out", str(out)]) == 0
    meta = qx.Policy.from_json((out / "policy.json").read_text()).meta["auto_policy"]
    assert meta["latency_budget_us"] == 46.0 and meta["predicted_latency_us"] <= 46.0
    # 46 µs needs fc1 at 8 bits (the fast one); 0.9x of 192 bytes then needs out below 8
    assert meta["layers"]["fc1"]["bits"] == 8 and meta["layers"]["out"]["bits"] < 8
    assert meta["predicted_kernel_bytes"] <= meta["budget_bytes"] == int(0.9 * 192)
    report = (out / "report.md").read_text()
    assert f"{meta['predicted_latency_us']:,.1f} of 46.0 µs" in report and "| predicted µs |" in report
