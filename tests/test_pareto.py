"""``keras_qx.engine.pareto``: the sweep's rows, skipped budgets, table, JSON and plot; input checks."""
import json
import re

import numpy as np
import pytest

from keras_qx.quant.cost import kernel_bytes
from keras_qx.engine.pareto import _check_budgets, pareto
from keras_qx.engine.sensitivity import quantizable_layers
from tests.conftest import tiny_model


@pytest.mark.parametrize("budgets, message", [((), "got ()"), (("0.75x", 0), "got 0"),
                                              ((1.5,), 'ambiguous: write budget="1.5x"'),
                                              ((-3,), "got -3"), (("half",), "got 'half'"), ("0.5x", "got '0.5x'")])
def test_bad_budgets_name_the_value(budgets, message):
    data = (np.zeros((4, 8, 8, 1), "float32"), np.zeros(4, "int64"))
    with pytest.raises(ValueError, match=re.escape(message)):
        pareto(tiny_model(), *data, validation_data=data, budgets=budgets, verbose=0)


def test_budgets_in_the_one_budget_syntax():
    assert _check_budgets(("0.5x", 1, 12_000, "4bits")) == ["0.5x", 1, 12_000, "4bits"]
    with pytest.warns(DeprecationWarning, match=r'fraction 0.5 is deprecated, use "0.5x"'):
        assert _check_budgets((0.5,)) == ["0.5x"]
    with pytest.raises(ValueError, match=r"\['0.5x'\]"):
        _check_budgets(("0.5x", "0.5x"))


@pytest.mark.parametrize("which", ["train", "validation_data"])
def test_data_must_be_xy(which):
    x = np.zeros((4, 8, 8, 1), "float32")
    good = (x, np.zeros(4, "int64"))
    bad = (x, np.zeros(3, "int64"))
    train, val = (bad, good) if which == "train" else (good, bad)
    name = "x, y" if which == "train" else "validation_data"
    with pytest.raises(ValueError, match=f"{re.escape(name)} has 4 samples and 3 labels"):
        pareto(tiny_model(), *train, validation_data=val, verbose=0)
    with pytest.raises(ValueError, match="needs validation_data="):
        pareto(tiny_model(), *good, verbose=0)


def test_unknown_keep_layer():
    data = (np.zeros((4, 8, 8, 1), "float32"), np.zeros(4, "int64"))
    with pytest.raises(ValueError, match="nope"):
        pareto(tiny_model(), *data, validation_data=data, keep=("nope",), verbose=0)


def test_old_positional_form_warns():
    """pareto(model, (x, y), (x_test, y_test)) is the 0.0.x form: it still reaches the same
    checks, with a DeprecationWarning naming validation_data=."""
    data = (np.zeros((4, 8, 8, 1), "float32"), np.zeros(4, "int64"))
    with pytest.warns(DeprecationWarning, match="deprecated") as caught, pytest.raises(ValueError, match="nope"):
        pareto(tiny_model(), data, data, keep=("nope",), verbose=0)
    messages = " ".join(str(w.message) for w in caught)
    assert "test_data= is deprecated, use validation_data=" in messages and "use x, y as two arguments" in messages


@pytest.mark.slow
def test_pareto_sweep(trained_cnn, digits, tmp_path, capsys):
    train, test = digits
    result = pareto(trained_cnn, *train, validation_data=test, budgets=("0.75x", "0.25x"), qat_epochs=1,
                    random_mixes=2, uniform=(8, 4), verbose=1)
    lines = capsys.readouterr().out.splitlines()
    kinds = [r["kind"] for r in result.rows]
    assert kinds.count("uniform") == 2 and kinds.count("auto") == 1 and kinds.count("random") == 2
    assert [r["label"] for r in result.rows if r["kind"] == "uniform"] == ["W8", "W4"]

    layers = quantizable_layers(trained_cnn)
    int8 = sum(kernel_bytes(l, 8) for l in layers)
    assert result.int8_kernel_bytes == int8
    for r in result.rows:
        assert r["kernel_bytes"] == r["predicted_kernel_bytes"], r
        assert set(r["bits"]) == {l.name for l in layers}
        assert 0.5 < r["accuracy"] <= 1 and r["size_bytes"] > r["kernel_bytes"] and r["gzip_bytes"] > 0
        if r["kind"] == "uniform":
            assert r["budget_bytes"] is None
        else:
            assert r["budget"] == "0.75x" and r["budget_bytes"] == int(0.75 * int8)
            assert r["kernel_bytes"] <= r["budget_bytes"]

    minimum = sum(kernel_bytes(l, 2) for l in layers)  # every kernel at 2 bits: INT2 Dense, INT4 Conv2D (0.28x)
    skipped = dict(result.skipped)
    assert set(skipped) == {"0.25x"}
    assert f"{minimum:,}" in skipped["0.25x"] and "smallest possible" in skipped["0.25x"]
    assert any("0.25x" in line and "no allocation fits" in line for line in lines)
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 5 and progress[-1].startswith("[5/5] random 2 @ 0.75x: acc ")

    json.dumps(result.to_dict())
    table = result.table()
    for label in ("W8", "W4", "auto @ 0.75x", "random 1 @ 0.75x", "random 2 @ 0.75x"):
        assert f"| {label} |" in table
    assert "random (n=2) mean" in table and "uniform within budget: W4" in table
    assert "**0.25x** skipped" in table

    path = tmp_path / "pareto.png"
    result.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
