"""``keras_qx.engine.pareto``: the sweep's rows, skipped budgets, table, JSON and plot; input checks."""
import json
import re

import numpy as np
import pytest

from keras_qx.quant.cost import kernel_bytes
from keras_qx.engine.pareto import _check_budgets, pareto
from keras_qx.engine.sensitivity import quantizable_layers
from tests.conftest import tiny_model


@pytest.mark.parametrize("budgets, message", [((), "got ()"), ((0.75, 0), "budget 0 is out of range"),
                                              ((1.5,), "budget 1.5 is out of range"),
                                              ((-3,), "budget -3 is out of range"),
                                              (("half",), "budget 'half' is not a number"), (0.5, "got 0.5")])
def test_bad_budgets_name_the_value(budgets, message):
    data = (np.zeros((4, 8, 8, 1), "float32"), np.zeros(4, "int64"))
    with pytest.raises(ValueError, match=re.escape(message)):
        pareto(tiny_model(), data, data, budgets=budgets, print_fn=None)


def test_budgets_fractions_and_bytes():
    assert _check_budgets((0.5, 1, 12_000)) == [0.5, 1.0, 12_000]
    with pytest.raises(ValueError, match=r"\[0\.5\]"):
        _check_budgets((0.5, 0.5))


@pytest.mark.parametrize("which", ["train_data", "test_data"])
def test_data_must_be_xy_tuple(which):
    x = np.zeros((4, 8, 8, 1), "float32")
    good = (x, np.zeros(4, "int64"))
    args = {"train_data": good, "test_data": good, which: x}
    with pytest.raises(ValueError, match=f"{which} must be a tuple"):
        pareto(tiny_model(), args["train_data"], args["test_data"], print_fn=None)
    args[which] = (x, np.zeros(3, "int64"))
    with pytest.raises(ValueError, match=f"{which} has 4 samples and 3 labels"):
        pareto(tiny_model(), args["train_data"], args["test_data"], print_fn=None)


def test_unknown_keep_layer():
    data = (np.zeros((4, 8, 8, 1), "float32"), np.zeros(4, "int64"))
    with pytest.raises(ValueError, match="nope"):
        pareto(tiny_model(), data, data, keep=("nope",), print_fn=None)


@pytest.mark.slow
def test_pareto_sweep(trained_cnn, digits, tmp_path):
    train, test = digits
    lines = []
    result = pareto(trained_cnn, train, test, budgets=(0.75, 0.25), qat_epochs=1, random_mixes=2,
                    uniform=(8, 4), print_fn=lines.append)
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
            assert r["budget"] == 0.75 and r["budget_bytes"] == int(0.75 * int8)
            assert r["kernel_bytes"] <= r["budget_bytes"]

    minimum = sum(kernel_bytes(l, 2) for l in layers)  # every kernel at 2 bits: INT2 Dense, INT4 Conv2D (0.28x)
    skipped = dict(result.skipped)
    assert set(skipped) == {0.25}
    assert f"{minimum:,}" in skipped[0.25] and "smallest possible" in skipped[0.25]
    assert any("0.25x" in line and "no allocation fits" in line for line in lines)
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 5 and progress[-1].startswith("[5/5] random 2 @ 0.75x: acc ")

    json.dumps(result.to_dict())
    table = result.table(print_fn=None)
    for label in ("W8", "W4", "auto @ 0.75x", "random 1 @ 0.75x", "random 2 @ 0.75x"):
        assert f"| {label} |" in table
    assert "random (n=2) mean" in table and "uniform within budget: W4" in table
    assert "**0.25x** skipped" in table

    path = tmp_path / "pareto.png"
    result.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
