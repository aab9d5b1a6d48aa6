"""qx.compare and `keras-qx eval`: several files judged in one table, against numpy references
computed from the runtime's own outputs."""
import gzip

import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras
from keras_qx._runtime import Runner
from keras_qx.cli import main


@pytest.fixture(scope="module")
def roads(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.random((96, 6)).astype("float32")
    y = (x[:, :3] * [1.0, 2.0, 3.0]).argmax(1)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(keras.layers.Dense(16, activation="relu")(inputs)))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=30, verbose=0)
    folder = tmp_path_factory.mktemp("roads")
    files = {"float16": qx.ptq(model, "float16", x), "int8": qx.ptq(model, "int8", x, path=folder / "int8.tflite")}
    return files, x, y, folder


def test_compare_table_matches_references(roads, tmp_path):
    files, x, y, _ = roads
    cmp = qx.compare(files, x, y, latency_runs=5, reference="float16")
    assert [r["road"] for r in cmp.rows] == ["float16", "int8"] and cmp.reference == "float16"
    for row in cmp.rows:
        data = bytes(files[row["road"]])
        assert row["accuracy"] == pytest.approx(float((Runner(data).predict(x).argmax(1) == y).mean()))
        assert row["size_bytes"] == len(data) and row["gzip_bytes"] == len(gzip.compress(data, 9, mtime=0))
        assert row["latency_ms"] > 0 and row["threads"] == 1
    int8 = cmp.rows[1]
    assert int8["gzip_ratio"] == pytest.approx(cmp.rows[0]["gzip_bytes"] / int8["gzip_bytes"])
    assert qx.compare(files, x, y, latency_runs=1).reference == max(cmp.rows, key=lambda r: r["size_bytes"])["road"]
    table = cmp.table()
    assert table.count("\n| ") == 2 and "1 thread(s)" in table
    cmp.plot(tmp_path / "roads.png")
    assert (tmp_path / "roads.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_regression_metric(roads):
    files, x, y, _ = roads
    target = np.zeros((len(x), 3), "float32")
    cmp = qx.compare(files, x, target, metric="mae", latency_runs=1)
    for row in cmp.rows:
        assert row["mae"] == pytest.approx(float(np.abs(Runner(bytes(files[row["road"]])).predict(x)).mean()), rel=1e-5)


def test_compare_mistakes(roads):
    files, x, y, _ = roads
    with pytest.raises(TypeError, match="non-empty dict"):
        qx.compare([files["int8"]], x, y)
    with pytest.raises(ValueError, match=r"reference 'fp32' is not one of the roads \['float16', 'int8'\]"):
        qx.compare(files, x, y, reference="fp32")
    with pytest.raises(FileNotFoundError, match=r"road 'gone'.*no TFLite file"):
        qx.compare({"gone": "/nonexistent.tflite"}, x, y)


def test_cli_eval(roads, tmp_path, capsys):
    files, x, y, folder = roads
    (tmp_path / "f16.tflite").write_bytes(bytes(files["float16"]))
    np.savez(tmp_path / "d.npz", x_test=x, y_test=y)
    code = main(["eval", str(tmp_path / "f16.tflite"), str(folder / "int8.tflite"), "--data", str(tmp_path / "d.npz"),
                 "--latency-runs", "3", "--plot", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    assert code == 0 and "| f16 |" in out and "| int8 |" in out and (tmp_path / "p.png").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(tmp_path / "nope.tflite"), "--data", str(tmp_path / "d.npz")])
    assert exit_.value.code == 2 and "no such .tflite file" in capsys.readouterr().err
