"""Latency as a budget (issue 20): the budget syntax ("2ms", ["0.6x", "2ms"]), the exact
two-constraint allocation (scipy's milp, against brute force and against the bytes-only DP),
auto_policy, the search's hard budget and the CLI, all against hand-made LatencyTables (the
measurement, ``latency_table``, is tested on its own)."""
import itertools
import math
import time

import numpy as np
import pytest

from conftest import compile_classifier, tiny_model
import keras_qx as qx
from keras_qx._compat import keras, keras_tuner
from keras_qx.engine import latency as latency_module
from keras_qx.engine.allocate import (InfeasibleBudget, allocate, auto_policy, budget_label, parse_budget,
                                      split_budget)
from keras_qx.engine.latency import LatencyTable
from keras_qx.engine.sensitivity import SensitivityReport, quantizable_layers
from keras_qx.quant.cost import kernel_params


# ---- the syntax ----------------------------------------------------------------------------
@pytest.mark.parametrize("value, parsed", [
    ("5ms", ("us", 5000.0)), ("0.2ms", ("us", 200.0)), ("500us", ("us", 500.0)), ("500µs", ("us", 500.0)),
    (" 1.5 MS", ("us", 1500.0)), (("us", 3.0), ("us", 3.0)),
    (["40kB", "2ms"], (("bytes", 40000), ("us", 2000.0))), (("0.6x", "1.5ms"), (("int8", 0.6), ("us", 1500.0))),
    (("1ms", "4bits"), (("us", 1000.0), ("bits", 4.0))), ("0.6x,2ms", (("int8", 0.6), ("us", 2000.0))),
    # the already-parsed forms pass through, single or paired
    (("bytes", 60000), ("bytes", 60000)), ((("int8", 0.5), ("us", 10.0)), (("int8", 0.5), ("us", 10.0))),
    ([60000, "2ms"], (("bytes", 60000), ("us", 2000.0))),
])
def test_parse_forms(value, parsed):
    assert parse_budget(value) == parsed


def test_split_and_label():
    assert split_budget(["0.6x", "2ms"]) == (("int8", 0.6), 2000.0)
    assert split_budget("40kB") == (("bytes", 40000), None)
    assert split_budget("500us") == (None, 500.0)
    assert split_budget(("2ms", 727)) == (("bytes", 727), 2000.0)
    assert budget_label(["0.6x", "2ms"]) == "0.6x,2ms" and budget_label("500us") == "500us"
    assert budget_label(12345) == "12,345 B"


@pytest.mark.parametrize("value, message", [
    ("0ms", "positive, finite"), ("-1ms", "positive, finite"), ("infms", "positive, finite"),
    ("nanus", "positive, finite"), ("fastms", "positive, finite"),
    (["1ms", "2ms"], "two latency budgets"), (["0.6x", "4bits"], "two size budgets"), ("1ms,2ms", "two latency"),
    (["0.6x"], "budget must be bytes"), (["0.6x", "1ms", "2ms"], "budget must be bytes"),
    (["0.6x", "soon"], "got 'soon'"), (0.6, "ambiguous"),
])
def test_parse_errors(value, message):
    with pytest.raises(ValueError, match=message):
        parse_budget(value)


# ---- the exact solver ------------------------------------------------------------------------
def brute_force(options, budget_bytes, budget_us, base_us, ties=()):
    """The least damage over every assignment within both caps, or None."""
    names = list(options)
    index = {n: i for i, n in enumerate(names)}
    best = None
    for combo in itertools.product(*(sorted(options[n]) for n in names)):
        if any(len({combo[index[n]] for n in group}) > 1 for group in ties):
            continue
        picked = [options[n][b] for n, b in zip(names, combo)]
        if budget_bytes is not None and sum(p[0] for p in picked) > budget_bytes:
            continue
        if base_us + sum(p[2] for p in picked) > budget_us:
            continue
        damage = sum(p[1] for p in picked)
        best = damage if best is None else min(best, damage)
    return best


def random_instance(rng, n_layers, n_ties=0):
    """{layer: {bits: (bytes, damage, µs)}}: fewer bits are smaller and (mostly) more damaging,
    not always faster (the runtime decides); disjoint tie groups sharing widths."""
    names = [f"l{i}" for i in range(n_layers)]
    options = {}
    for n in names:
        widths = sorted(int(b) for b in rng.choice([2, 4, 8], int(rng.integers(2, 4)), replace=False))
        options[n] = {b: (int(rng.integers(1, 40)) * b, float(rng.uniform(0, 1)) * (0 if rng.random() < 0.2 else 1),
                          float(rng.uniform(1, 30))) for b in widths}
    ties, order = [], list(rng.permutation(names))
    for _ in range(n_ties):
        group, order = order[:2], order[2:]
        if len(group) < 2:
            break
        for n in group:  # the tie needs a common width
            options[n].setdefault(8, (int(rng.integers(1, 40)) * 8, 0.0, float(rng.uniform(1, 30))))
        ties.append([str(g) for g in group])
    return options, ties


@pytest.mark.parametrize("seed", range(16))
def test_milp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    options, ties = random_instance(rng, int(rng.integers(3, 7)), n_ties=int(seed % 3))
    base = float(rng.uniform(0, 20))
    total_min_us = base + sum(min(o[2] for o in opts.values()) for opts in options.values())
    total_max_us = base + sum(max(o[2] for o in opts.values()) for opts in options.values())
    max_bytes = sum(max(o[0] for o in opts.values()) for opts in options.values())
    for trial in range(6):
        budget_us = float(rng.uniform(total_min_us * 0.95, total_max_us))
        budget_bytes = None if trial % 3 == 0 else int(rng.uniform(0.4, 1.0) * max_bytes)
        expected = brute_force(options, budget_bytes, budget_us, base, ties)
        if expected is None:
            with pytest.raises(InfeasibleBudget, match="no allocation fits") as err:
                allocate(options, budget_bytes, ties, budget_us=budget_us, base_us=base)
            assert err.value.budget_us == budget_us and err.value.minimum_us >= base
            continue
        result = allocate(options, budget_bytes, ties, budget_us=budget_us, base_us=base)
        chosen = [options[n][b] for n, b in result.bits.items()]
        assert result.damage == pytest.approx(expected, abs=1e-7)
        assert result.damage == pytest.approx(sum(c[1] for c in chosen), abs=1e-9)
        assert result.kernel_bytes == sum(c[0] for c in chosen)
        assert budget_bytes is None or result.kernel_bytes <= budget_bytes
        assert result.latency_us == pytest.approx(base + sum(c[2] for c in chosen))
        assert result.latency_us <= budget_us * (1 + 1e-9)
        for group in ties:
            assert len({result.bits[n] for n in group}) == 1


@pytest.mark.parametrize("seed", range(6))
def test_milp_equals_dp_under_a_loose_latency_cap(seed):
    rng = np.random.default_rng(100 + seed)
    options, ties = random_instance(rng, 12, n_ties=2)
    max_bytes = sum(max(o[0] for o in opts.values()) for opts in options.values())
    loose = 1e6
    for fraction in (0.5, 0.7, 0.9):
        budget = int(fraction * max_bytes)
        dp = allocate(options, budget, ties, base_us=5.0)
        milp = allocate(options, budget, ties, budget_us=loose, base_us=5.0)
        assert milp.damage == pytest.approx(dp.damage, abs=1e-7)
        assert milp.kernel_bytes <= budget
        assert dp.latency_us == pytest.approx(5.0 + sum(options[n][b][2] for n, b in dp.bits.items()))


def test_infeasible_latency_names_the_fastest_time_and_the_fix():
    options = {"a": {4: (10, 0.5, 3.0), 8: (20, 0.0, 5.0)}, "b": {4: (10, 0.5, 4.0), 8: (20, 0.0, 2.0)}}
    with pytest.raises(InfeasibleBudget, match=r"fastest possible at these candidates is 15.0 µs") as err:
        allocate(options, None, budget_us=10.0, base_us=10.0)
    assert "Raise the latency budget" in str(err.value) and err.value.minimum_us == pytest.approx(15.0)
    # each cap alone is reachable, not both: the message gives both corners
    with pytest.raises(InfeasibleBudget, match=r"both 25 kernel bytes and 16.0 µs.*smallest 20 kernel bytes"):
        allocate(options, 25, budget_us=16.0, base_us=10.0)
    # latency only: no bytes cap, the least damage within the time
    result = allocate(options, None, budget_us=17.0, base_us=10.0)
    assert result.bits == {"a": 8, "b": 8} and result.latency_us == 17.0 and result.budget_bytes is None


def test_milp_solve_time_60_layers():
    rng = np.random.default_rng(7)
    options = {f"l{i}": {b: (int(rng.integers(100, 5000)) * b // 8, float(rng.uniform(0, 1)) / b,
                             float(rng.uniform(5, 50)) * (1.3 if b == 4 else 1.0)) for b in (2, 4, 8)}
               for i in range(60)}
    max_bytes = sum(o[8][0] for o in options.values())
    mid_us = sum(min(v[2] for v in o.values()) for o in options.values()) * 1.15
    start = time.perf_counter()
    result = allocate(options, int(0.5 * max_bytes), budget_us=mid_us + 100.0, base_us=100.0)
    seconds = time.perf_counter() - start
    assert result.kernel_bytes <= 0.5 * max_bytes and result.latency_us <= mid_us + 100.0 + 1e-6
    assert seconds < 10, seconds


# ---- auto_policy against a hand-made table -------------------------------------------------
# The tiny model's kernels: conv 36, fc 1152, out 24 values; int8 1212 bytes. On this made-up
# runtime a 4-bit fc runs slower than an 8-bit one (its INT4 kernel is unpacked first).
TABLE = LatencyTable(base_us=40.0, layers={"conv": {2: 6.0, 4: 6.0, 8: 5.0}, "fc": {2: 30.0, 4: 25.0, 8: 10.0},
                                           "out": {2: 2.0, 4: 2.0, 8: 1.0}}, num_threads=1, runtime="hand-made")


def _tiny_report(model):
    layers = quantizable_layers(model)
    damage = {"conv": {2: 0.5, 4: 0.2, 8: 0.0}, "fc": {2: 0.3, 4: 0.1, 8: 0.0}, "out": {2: 0.4, 4: 0.15, 8: 0.0}}
    return SensitivityReport(method="loss", candidates=(2, 4, 8), damage=damage, kernel_bytes={},
                             params={l.name: kernel_params(l) for l in layers})


def test_auto_policy_meets_the_latency_cap_the_bytes_policy_misses(monkeypatch):
    model = tiny_model()
    report = _tiny_report(model)
    by_bytes = auto_policy(model, report=report, budget="0.6x", latency=TABLE, verbose=0)
    meta = by_bytes.meta["auto_policy"]
    assert meta["layers"]["fc"]["bits"] in (2, 4)  # 0.6x forces fc below 8 bits
    assert meta["predicted_latency_us"] > 60 and meta["latency_budget_us"] is None  # recorded, not capped

    calls = []
    monkeypatch.setattr(latency_module, "latency_table", lambda m, c, **kw: calls.append(c) or TABLE)
    fast = auto_policy(model, report=report, budget="60us", verbose=0)  # None: measured (here, patched)
    assert calls == [(2, 4, 8)]
    meta = fast.meta["auto_policy"]
    assert meta["latency_budget_us"] == 60.0 and meta["predicted_latency_us"] <= 60.0
    assert meta["layers"]["fc"]["bits"] == 8 and meta["layers"]["fc"]["latency_us"] == 10.0
    assert meta["predicted_latency_us"] == pytest.approx(40 + sum(v["latency_us"] for v in meta["layers"].values()))
    assert meta["budget_bytes"] is None and meta["latency_base_us"] == 40.0
    # both caps: a size that fits fc at 8 bits and the time
    both = auto_policy(model, report=report, budget=["0.98x", "0.06ms"], latency=TABLE, verbose=0)
    meta = both.meta["auto_policy"]
    assert meta["predicted_kernel_bytes"] <= meta["budget_bytes"] == int(0.98 * 1212)
    assert meta["predicted_latency_us"] <= 60.0 and meta["layers"]["fc"]["bits"] == 8
    # 0.6x and 60 µs cannot both hold: the message gives the fastest time and the smallest size
    with pytest.raises(InfeasibleBudget, match=r"fastest possible is 56.0 µs.*smallest"):
        auto_policy(model, report=report, budget=["0.6x", "60us"], latency=TABLE, verbose=0)
    with pytest.raises(InfeasibleBudget, match=r"fastest possible at these candidates is 56.0 µs"):
        auto_policy(model, report=report, budget="50us", latency=TABLE, verbose=0)
    with pytest.raises(TypeError, match="LatencyTable"):
        auto_policy(model, report=report, budget="60us", latency={"fc": {8: 1.0}}, verbose=0)
    partial = LatencyTable(base_us=1.0, layers={"conv": {8: 1.0}, "fc": {8: 1.0}, "out": {8: 1.0}})
    with pytest.raises(ValueError, match=r"no time for layer 'conv' at 4 bits"):
        auto_policy(model, report=report, budget="60us", latency=partial, verbose=0)


# ---- the search ------------------------------------------------------------------------------
def _data(n=192, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8, 8, 1)).astype("float32")
    y = (x[:, :4].mean(axis=(1, 2, 3)) > 0.5).astype("int64") + (x[:, 4:].mean(axis=(1, 2, 3)) > 0.5)
    return x, y


class FitLog(keras.callbacks.Callback):
    def __init__(self, path):
        super().__init__()
        self.path = str(path)

    def on_train_begin(self, logs=None):
        bits = {l.layer.name: int(l.quantize_config.weight_bits) for l in self.model.layers
                if getattr(getattr(l, "quantize_config", None), "weight_bits", None) is not None}
        with open(self.path, "a") as f:
            f.write(f"{bits}\n")


def test_tuner_never_trains_an_over_latency_assignment(tmp_path):
    """An oracle stuck on all-8 bits: fc at 8 is fast but conv and out at 8 cost the time; the
    cap (40 + 20 µs) forces fc to 8 bits and leaves no room for conv at 8."""
    from keras_qx.engine.search import BitWidthTuner

    kt = keras_tuner()
    table = LatencyTable(base_us=40.0, layers={"conv": {4: 5.0, 8: 9.0}, "fc": {4: 25.0, 8: 10.0},
                                               "out": {4: 1.0, 8: 1.5}})
    x, y = _data()
    model = compile_classifier(tiny_model())
    model.fit(x, y, epochs=1, verbose=0)

    class AllEight(kt.oracles.RandomSearchOracle):
        def populate_space(self, trial_id):
            return {"status": "RUNNING", "values": {hp.name: 8 for hp in self.hyperparameters.space}}

    with pytest.raises(InfeasibleBudget, match=r"fastest assignment .* takes 56.0 µs"):
        BitWidthTuner(model, candidates=(4, 8), budget="50us", latency=table, directory=tmp_path, verbose=0)
    with pytest.raises(ValueError, match="needs model="):
        BitWidthTuner(hypermodel=lambda hp: tiny_model(), budget="1ms", directory=tmp_path, verbose=0)
    fits = tmp_path / "fits.txt"
    tuner = BitWidthTuner(model, candidates=(4, 8), budget="60us", latency=table,
                          oracle=AllEight(kt.Objective("accuracy", "max"), max_trials=2), objective="accuracy",
                          warm_start=False, directory=tmp_path, seed=0, verbose=0)
    assert tuner.budget_us == 60.0 and tuner.budget_bytes is None
    tuner.search(x, y, epochs=1, callbacks=[FitLog(fits)])
    rows = tuner.results()
    assert len(rows) == 2 and all(r["status"] == "COMPLETED" for r in rows)
    assert all(r["predicted_us"] <= 60.0 for r in rows)
    trained = [eval(line) for line in fits.read_text().splitlines()]  # noqa: S307 - our own dicts
    assert len(trained) == 2 and all(40 + sum(table.layers[n][b] for n, b in t.items()) <= 60 for t in trained)
    assert {"conv": 8, "fc": 8, "out": 8} not in trained
    stats = tuner.stats
    assert stats["rejected"] == stats["rejected_latency"] == 2 * 9 and stats["repaired"] == 2
    table_text = tuner.results_summary()
    assert "predicted µs" in table_text.splitlines()[0] and "latency budget 60.0 µs" in table_text
    assert "over the latency budget" in table_text
    meta = tuner.best_policy().meta["search"]
    assert meta["latency_budget_us"] == 60.0 and meta["predicted_latency_us"] <= 60.0


def test_tuner_warm_starts_from_auto_policy_at_both_caps(tmp_path, monkeypatch):
    from keras_qx.engine.search import BitWidthTuner

    x, y = _data(128)
    model = compile_classifier(tiny_model())
    model.fit(x, y, epochs=1, verbose=0)
    table = LatencyTable(base_us=40.0, layers={"conv": {4: 5.0, 8: 9.0}, "fc": {4: 25.0, 8: 10.0},
                                               "out": {4: 1.0, 8: 1.5}})
    monkeypatch.setattr(latency_module, "latency_table", lambda m, c, **kw: table)  # measured once, "here"
    tuner = BitWidthTuner(model, candidates=(4, 8), budget=["0.99x", "60us"], oracle="random", max_trials=1,
                          objective="accuracy", directory=tmp_path, seed=0, verbose=0)
    tuner.search(x, y, epochs=1)
    row = tuner.results()[0]
    assert row["warm_start"] and row["bits"] == {"conv": 4, "fc": 8, "out": 8}  # the one fit at 60 µs, int8 fc
    assert row["predicted_us"] == pytest.approx(56.5) and row["kernel_bytes"] <= int(0.99 * 1212)


# ---- the CLI ---------------------------------------------------------------------------------
def test_cli_budget_comma_form(tmp_path, capsys, monkeypatch):
    """--budget 0.6x,2ms and a lone --budget 2ms parse; a bad pair fails before any model is trained."""
    from keras_qx import cli

    assert split_budget("0.6x,2ms") == (("int8", 0.6), 2000.0)
    assert cli.main(["quantize", "--budget", "1ms,2ms", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "keras-qx: error: budget='1ms,2ms' gives two latency budgets" in err, err
    assert cli.main(["search", "--budget", "0.6x,0ms", "--out", str(tmp_path / "b")]) == 2
    assert "positive, finite" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    seen = []

    def stop(args):  # the budget checked, then the model: stop there
        seen.append(args.budget)
        raise ValueError("stopped before training")

    monkeypatch.setattr(cli, "_model_and_data", stop)
    for budget in ("0.6x,2ms", "2ms"):
        assert cli.main(["quantize", "--budget", budget, "--out", str(tmp_path / "c")]) == 2
        assert cli.main(["search", "--budget", budget, "--out", str(tmp_path / "d")]) == 2
    assert seen == ["0.6x,2ms", "0.6x,2ms", "2ms", "2ms"]
    assert "--budget" in cli.__doc__ and "2ms" in cli.__doc__


# ---- the Pareto sweep ----------------------------------------------------------------------
def test_pareto_rows_carry_the_predicted_time():
    from keras_qx.engine.pareto import _check_budgets, pareto

    assert _check_budgets(("0.6x", "1ms", ["0.6x", "500us"], "0.5x,2ms")) == ["0.6x", "1ms", "0.6x,500us", "0.5x,2ms"]
    with pytest.raises(ValueError, match="two latency budgets"):
        _check_budgets((["1ms", "2ms"],))
    x, y = _data(96)
    model = compile_classifier(tiny_model())
    result = pareto(model, x, y, validation_data=(x[:32], y[:32]), budgets=("60us", "0.98x,60us", "50us"),
                    report=_tiny_report(model), latency=TABLE, qat_epochs=0, random_mixes=1, uniform=(8,), verbose=0)
    rows = {r["label"]: r for r in result.rows}
    assert set(rows) == {"W8", "auto @ 60us", "random 1 @ 60us", "auto @ 0.98x,60us", "random 1 @ 0.98x,60us"}
    for r in result.rows:
        assert r["predicted_us"] == pytest.approx(TABLE.total_us(r["bits"]))
        if r["kind"] != "uniform":
            assert r["budget_us"] == 60.0 and r["predicted_us"] <= 60.0
    assert rows["auto @ 0.98x,60us"]["budget_bytes"] == int(0.98 * 1212) and rows["auto @ 60us"]["budget_bytes"] is None
    assert rows["auto @ 0.98x,60us"]["kernel_bytes"] <= int(0.98 * 1212)
    assert [b for b, _ in result.skipped] == ["50us"] and "fastest possible" in result.skipped[0][1]
    table = result.table()
    assert "| predicted µs |" in table.splitlines()[0] and "**60us** (60.0 µs)" in table
    assert "uniform within budget: W8" in table  # 56 µs
    ax = result.plot(x="latency")
    auto = next(l for l in ax.lines if l.get_label() == "auto_policy")
    assert list(auto.get_xdata()) == sorted(r["predicted_us"] for r in result.rows if r["kind"] == "auto")
    assert [l.get_xdata()[0] for l in ax.lines if l.get_linestyle() == "--"] == [60.0]  # the latency budget
    with pytest.raises(ValueError, match="x must be"):
        result.plot(x="time")


def test_demo_refuses_a_latency_budget_before_training():
    from keras_qx.demo import run_demo

    with pytest.raises(ValueError, match="the demo takes a size budget.*keras-qx quantize --budget 0.6x,2ms"):
        run_demo(budget="2ms", print_fn=None)
    with pytest.raises(ValueError, match="budget must be"):
        run_demo(budget="fast", print_fn=None)


def test_gzip_and_latency_budgets_offer_kernels_on_an_int8_carrier():
    """Under a gzip'd-size budget a sub-byte kernel on an int8 carrier ("pack": false) costs about
    the download of its b-bit values at int8 speed: with a latency cap the engine picks it for the
    layer whose packed kernel is slow (fc: 25 µs at INT4 against 10 µs at int8 here)."""
    from keras_qx.engine.allocate import layer_options

    model = tiny_model()
    report = _tiny_report(model)
    fc = model.get_layer("fc")
    options = layer_options(fc, report, None, "gzip", TABLE, carried=True)
    assert options[-4][1] == options[4][1] and options[-4][2] == TABLE.layers["fc"][8]  # 4 bits' damage, int8 time
    assert options[4][0] < options[-4][0] < options[8][0]  # gzip'd: between INT4 and int8 values
    by_size = auto_policy(model, report=report, budget="0.6x", size="gzip", latency=TABLE, verbose=0)
    assert by_size.layers["fc"] == {"weight_bits": 4}  # packed: smallest download, 71 µs
    fast = auto_policy(model, report=report, budget=["0.6x", "58us"], size="gzip", latency=TABLE, verbose=0)
    meta = fast.meta["auto_policy"]
    assert fast.layers["fc"] == {"weight_bits": 4, "pack": False}
    assert meta["layers"]["fc"]["pack"] is False and meta["layers"]["fc"]["bits"] == 4
    assert meta["predicted_latency_us"] == pytest.approx(TABLE.total_us({"conv": 8, "fc": 8, "out": 8}))
    assert meta["predicted_latency_us"] <= 58
    assert meta["predicted_kernel_bytes"] <= meta["budget_bytes"]
    # the policy quantizes: the fc kernel trains at 4 bits on the int8 carrier
    qat = qx.quantize(model, fast)
    wrapper = next(l for l in qat.layers if getattr(getattr(l, "layer", None), "name", None) == "fc")
    q = wrapper.quantize_config.weight_quantizer
    assert (q.bits, q.pack) == (4, False)


def test_latency_only_random_mix_keeps_drawing_on_time():
    """A latency budget alone windows the draws on time, every draw: the bytes of later draws are
    never compared with the microseconds of the cap (they once were, after the first fitting draw,
    so a new assignment behind a seen one was never found)."""
    from keras_qx.engine.pareto import WINDOW, _random_mix

    options = {"a": {4: (5000, 0.2, 10.0), 8: (10000, 0.0, 12.0)},
               "b": {4: (5000, 0.2, 10.0), 8: (10000, 0.0, 12.0)}}
    units = [(["a"], [4, 8]), (["b"], [4, 8])]
    every = [{"a": a, "b": b} for a in (4, 8) for b in (4, 8)]
    in_window = [v for v in every if 5.0 + sum(options[n][b][2] for n, b in v.items()) >= WINDOW * 30.0]
    assert len(in_window) == 3  # all but 4/4 (25 µs)
    for new in in_window:
        seen = {tuple(sorted(v.items())) for v in every if v != new}
        found = _random_mix(np.random.default_rng(0), units, options, None, seen, budget_us=30.0, base_us=5.0)
        assert found is not None and found[0] == new and found[2], (new, found)
