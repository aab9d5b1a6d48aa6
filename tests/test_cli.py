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


def test_bad_arguments():
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "0"])
    with pytest.raises(SystemExit):
        main(["demo", "--policy", "/no/such/policy.json"])


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
    assert "budget must be kernel bytes" in (err := capsys.readouterr().err) and "got 'lots'" in err
