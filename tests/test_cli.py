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
def test_demo_end_to_end(tmp_path):
    """The README's main job, shortened: prints the table and writes the files."""
    proc = subprocess.run(
        [sys.executable, "-m", "keras_qx.cli", "demo", "--epochs", "6", "--qat-epochs", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[1/4]" in proc.stderr and "[4/4]" in proc.stderr
    rows = [l for l in proc.stdout.splitlines() if l.startswith("| ") and "%" in l]
    assert [r.split("|")[1].strip() for r in rows] == ["float32", "int8 (uniform)", "mixed 4/8-bit"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "digits_float.tflite", "digits_int8.tflite", "digits_mixed.tflite", "mixed_policy.json"]
    assert main(["inspect", str(tmp_path / "digits_mixed.tflite")]) == 0
