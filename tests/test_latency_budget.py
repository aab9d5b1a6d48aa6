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
