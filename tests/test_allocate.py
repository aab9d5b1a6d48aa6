"""qx.auto_policy and its parts: the exact allocator (against brute force), the bucketed mode,
budgets, per-layer options, depthwise/pointwise ties, and (slow) the exported file's size."""
import itertools
import json
import math

import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras
from keras_qx.engine.allocate import layer_options, allocate, budget_from, find_ties, legacy_budget
from keras_qx.quant.cost import storage_bits, kernel_bytes, kernel_params
from keras_qx.quant.policy import Policy, PolicyError
from keras_qx.engine.sensitivity import SensitivityReport, quantizable_layers
from tests.conftest import compile_classifier, tiny_model

CNN_LAYERS = ["conv1", "conv2", "fc1", "logits"]


# ---- brute force reference ----------------------------------------------------------------
def brute_force(options, budget, ties=()):
    """(best damage, min feasible cost ignoring the budget) over every assignment, or
    (None, min cost) when nothing fits."""
    names = list(options)
    index = {n: i for i, n in enumerate(names)}
    best, min_cost = None, math.inf
    for combo in itertools.product(*(sorted(options[n]) for n in names)):
        if any(len({combo[index[n]] for n in group}) > 1 for group in ties):
            continue
        cost = sum(options[n][b][0] for n, b in zip(names, combo))
        min_cost = min(min_cost, cost)
        if cost <= budget:
            damage = sum(options[n][b][1] for n, b in zip(names, combo))
            best = damage if best is None else min(best, damage)
    return best, min_cost


def random_instance(rng, n_layers, n_ties=0, max_cost=60):
    """{layer: {bits: (int cost, damage >= 0)}} and disjoint tie groups sharing >= 1 width."""
    names = [f"l{i}" for i in range(n_layers)]
    pool = np.arange(2, 9)
    bit_sets = {n: sorted(int(b) for b in rng.choice(pool, rng.integers(2, 5), replace=False)) for n in names}
    order = list(rng.permutation(names))
    ties = []
    for _ in range(n_ties):
        size = min(int(rng.integers(2, 4)), len(order))
        if size < 2:
            break
        group, order = order[:size], order[size:]
        base = bit_sets[group[0]][:2]  # every member keeps these two widths: a common choice
        for n in group[1:]:
            extra = [int(b) for b in rng.choice(pool, rng.integers(0, 3), replace=False)]
            bit_sets[n] = sorted(set(base) | set(extra))
        ties.append(list(group))
    options = {}
    for n in names:
        options[n] = {}
        for b in bit_sets[n]:
            damage = 0.0 if rng.random() < 0.2 else float(rng.uniform(0, 1))
            options[n][b] = (int(rng.integers(0, max_cost)), damage)
    return options, ties


def check_allocation(result, options, budget, ties):
    assert set(result.bits) == set(options)
    assert all(result.bits[n] in options[n] for n in options)
    for group in ties:
        assert len({result.bits[n] for n in group}) == 1, (group, result.bits)
    chosen_cost = sum(options[n][b][0] for n, b in result.bits.items())
    chosen_damage = sum(options[n][b][1] for n, b in result.bits.items())
    assert result.kernel_bytes == chosen_cost
    assert result.kernel_bytes <= budget
    assert result.damage == pytest.approx(chosen_damage, abs=1e-9)
    assert result.budget_bytes == budget


# ---- allocate: exact ----------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(30))
def test_allocate_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    for trial in range(4):
        n_ties = 0 if trial < 2 else int(rng.integers(1, 3))
        options, ties = random_instance(rng, int(rng.integers(2, 8)), n_ties)
        _, min_cost = brute_force(options, math.inf, ties)
        max_cost = max(sum(o[b][0] for o, b in zip(options.values(), combo))
                       for combo in itertools.product(*(sorted(o) for o in options.values())))
        budgets = {min_cost, min_cost + 1, max_cost, max_cost + 7,
                   int(rng.integers(min_cost, max_cost + 1)), int(rng.integers(min_cost, max_cost + 1))}
        for budget in sorted(budgets):
            best, _ = brute_force(options, budget, ties)
            assert best is not None
            result = allocate(options, budget, ties)
            check_allocation(result, options, budget, ties)
            assert result.resolution_bytes == 0
            assert result.damage == pytest.approx(best, abs=1e-9), (options, ties, budget)


def test_allocate_ties_cost_more_than_untied():
    # Untied, a=4 and b=8 is best; tied, both must share one width.
    options = {"a": {4: (1, 0.0), 8: (2, 1.0)}, "b": {4: (1, 5.0), 8: (2, 0.0)}}
    free = allocate(options, 4)
    assert free.bits == {"a": 4, "b": 8} and free.damage == 0.0
    tied = allocate(options, 4, ties=[["a", "b"]])
    assert tied.bits == {"a": 8, "b": 8} and tied.damage == 1.0 and tied.kernel_bytes == 4
    # A tie naming an unknown layer is ignored for that name.
    assert allocate(options, 4, ties=[["a", "b", "ghost"]]).bits == {"a": 8, "b": 8}
    with pytest.raises(PolicyError, match="no bit width in common"):
        allocate({"a": {4: (1, 0.0)}, "b": {8: (2, 0.0)}}, 10, ties=[["a", "b"]])


@pytest.mark.parametrize("seed", range(6))
def test_allocate_infeasible_names_minimum(seed):
    rng = np.random.default_rng(100 + seed)
    options, ties = random_instance(rng, int(rng.integers(2, 7)), n_ties=seed % 2, max_cost=5000)
    best, min_cost = brute_force(options, math.inf, ties)
    if min_cost == 0:
        options[next(iter(options))] = {b: (c + 1000, d) for b, (c, d) in options[next(iter(options))].items()}
        best, min_cost = brute_force(options, math.inf, ties)
    assert min_cost > 0
    with pytest.raises(PolicyError, match="no allocation fits") as err:
        allocate(options, min_cost - 1, ties)
    assert f"{min_cost:,}" in str(err.value)
    assert f"{min_cost - 1:,}" in str(err.value)
    assert allocate(options, min_cost, ties).kernel_bytes == min_cost


# ---- allocate: bucketed -------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
def test_allocate_bucketed_is_feasible(seed):
    rng = np.random.default_rng(200 + seed)
    options, ties = random_instance(rng, 7, n_ties=seed % 2, max_cost=1000)
    _, min_cost = brute_force(options, math.inf, ties)
    max_cost = sum(max(c for c, _ in o.values()) for o in options.values())
    for budget in (min_cost, min_cost + 50, min_cost + 1500, max_cost, 10_000):
        exact, _ = brute_force(options, budget, ties)
        result = allocate(options, budget, ties, max_states=3)
        check_allocation(result, options, budget, ties)
        # one bucket of ceil(budget / 3) bytes per thinning (their slack adds up)
        assert result.resolution_bytes % math.ceil(budget / 3) == 0
        if budget >= max_cost:  # nothing pruned by the budget: the frontier outgrows 3 points
            assert result.resolution_bytes > 0
        smaller, _ = brute_force(options, budget - result.resolution_bytes, ties)
        if smaller is not None:  # at least as good as the optimum under budget - resolution
            assert result.damage <= smaller + 1e-12
        assert result.damage >= exact - 1e-12
        assert result.damage <= sum(max(d for _, d in o.values()) for o in options.values()) + 1e-12


def test_allocate_bucketed_optimal_up_to_resolution():
    options = {"a": {2: (0, 10.0), 4: (1, 5.0), 8: (2, 0.0)}}
    result = allocate(options, 1000, max_states=2)
    assert result.resolution_bytes == 500
    # every choice costs <= 2 bytes, far inside budget - resolution = 500: the optimum is 0
    exact, _ = brute_force(options, 1000 - result.resolution_bytes)
    assert result.damage <= exact


# ---- budget_from --------------------------------------------------------------------------
def _tiny_layers():
    model = tiny_model()
    layers = quantizable_layers(model)
    assert [l.name for l in layers] == ["conv", "fc", "out"]
    return layers


def test_budget_from_math():
    layers = _tiny_layers()
    params = sum(kernel_params(l) for l in layers)
    assert params == 3 * 3 * 1 * 4 + 6 * 6 * 4 * 8 + 8 * 3
    assert budget_from(layers, 777) == 777
    assert budget_from(layers, 777.0) == 777
    assert budget_from(layers, "777") == 777
    assert budget_from(layers, "1.5kB") == 1500
    assert budget_from(layers, "2 MB") == 2_000_000
    int8 = sum(kernel_bytes(l, 8) for l in layers)
    assert budget_from(layers, "0.5x") == int(0.5 * int8)
    assert budget_from(layers, " 1X ") == int8
    for b in (1, 2, 4, 4.5, 8, 32):
        assert budget_from(layers, f"{b}bits") == int(params * b / 8)
    assert budget_from(layers, "32 bits") == 4 * params
    assert budget_from(layers, "8bits") == sum(kernel_bytes(l, 8) for l in layers)


def test_legacy_budget_arguments_map_onto_budget():
    """The 0.0.x arguments still work for a release: compression c against float32 is exactly an
    average of 32 / c bits, and each warns naming budget=."""
    layers = _tiny_layers()
    params = sum(kernel_params(l) for l in layers)
    for r in (1, 2, 3.5, 8, 7):
        with pytest.warns(DeprecationWarning, match="compression= is deprecated, use budget="):
            legacy = legacy_budget("t", compression=r)
        assert budget_from(layers, legacy) == int(4 * params / r)
    with pytest.warns(DeprecationWarning, match="avg_bits="):
        assert budget_from(layers, legacy_budget("t", avg_bits=4.5)) == int(params * 4.5 / 8)
    with pytest.warns(DeprecationWarning, match="budget_bytes="):
        assert budget_from(layers, legacy_budget("t", budget_bytes="0.5x")) == budget_from(layers, "0.5x")


def test_one_budget_only():
    layers = _tiny_layers()
    with pytest.raises(ValueError, match="a budget is needed"):
        budget_from(layers, None)
    with pytest.raises(ValueError, match=r"give one budget, got \['budget', 'compression'\]"):
        legacy_budget("qx.auto_policy()", budget=100, compression=4)
    with pytest.raises(ValueError, match=r"give one budget, got \['compression', 'avg_bits'\]"):
        legacy_budget("qx.auto_policy()", compression=4, avg_bits=4)


@pytest.mark.parametrize("value, shown", [
    (0, "got 0"), (-1, "got -1"), (True, "got True"), ("100y", "got '100y'"), ("0x", "got '0x'"),
    ([1], "got [1]"), ("40bits", "got '40bits'"), ("0bits", "got '0bits'"), ("0.5bits", "got '0.5bits'"),
    ("5x", "got '5x'"), ("", "got ''"),
])
def test_budget_from_bad_values(value, shown):
    with pytest.raises(ValueError, match="budget must be bytes") as err:
        budget_from(_tiny_layers(), value)
    assert shown in str(err.value)


def test_bare_fraction_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r'ambiguous: write budget="0.6x"'):
        budget_from(_tiny_layers(), 0.6)


def test_budget_from_counts_bytes_only():
    """A latency budget is parsed (tests/test_latency_budget.py); budget_from, which counts bytes,
    names the latency part instead of ignoring it."""
    with pytest.raises(ValueError, match="has a latency part"):
        budget_from(_tiny_layers(), "5ms")
    with pytest.raises(ValueError, match="has a latency part"):
        budget_from(_tiny_layers(), ["0.6x", "5ms"])


@pytest.mark.parametrize("key, value", [("compression", 0), ("compression", -1), ("compression", "4"),
                                        ("compression", True), ("avg_bits", 40), ("avg_bits", 0),
                                        ("avg_bits", True)])
def test_legacy_budget_bad_values(key, value):
    with pytest.raises(ValueError, match=f"{key} must be.*got {value!r}"):
        legacy_budget("t", **{key: value})


# ---- layer_options -----------------------------------------------------------------------
def _report(layer, damage, candidates):
    return SensitivityReport(method="loss", candidates=tuple(candidates), damage={layer.name: damage},
                             kernel_bytes={}, params={layer.name: kernel_params(layer)})


def testlayer_options_drops_int4_dominated_widths():
    dense = keras.layers.Conv1D(10, 3, name="d")  # 2-bit convolutions are stored as INT4
    dense.build((None, 8, 11))
    measured = {2: 0.5, 3: 0.7, 4: 0.1, 8: 0.2}  # not monotone: 3 > 2 and 4 < 8
    options = layer_options(dense, _report(dense, measured, (2, 3, 4, 8)))
    assert sorted(options) == [4, 8]
    assert options[4][0] == kernel_bytes(dense, 4) == kernel_bytes(dense, 2) == math.ceil(330 / 2)
    assert options[8][0] == kernel_bytes(dense, 8) == 330
    # 4 bits never damages less than 8 (a tie-break of <= 1e-9 a missing bit is allowed)
    assert options[8][1] == pytest.approx(0.2, abs=1e-8)
    assert options[4][1] == pytest.approx(0.2, abs=1e-8) and options[4][1] >= options[8][1]
    # the full monotone profile, seen through widths that are not dominated
    options_all = layer_options(dense, _report(dense, measured, (2, 3, 4, 5, 8)))
    assert sorted(options_all) == [4, 8]  # 5 bits stores as int8: 8 bits costs the same
    # a Dense at 2 bits is INT2, half the bytes of 4: not dominated
    fc = keras.layers.Dense(10, name="fc")
    fc.build((None, 33))
    assert sorted(layer_options(fc, _report(fc, measured, (2, 3, 4, 8)))) == [2, 4, 8]
    assert kernel_bytes(fc, 2) == math.ceil(330 / 4)

    negative = {2: -0.3, 4: -0.5, 8: -0.1}
    opts = layer_options(dense, _report(dense, negative, (2, 4, 8)))
    assert all(d >= 0 for _, d in opts.values())

    rng = np.random.default_rng(3)
    for _ in range(20):
        measured = {b: float(rng.normal()) for b in (2, 3, 4, 5, 6, 7, 8)}
        report = _report(dense, measured, tuple(measured))
        opts = layer_options(dense, report)
        bits = sorted(opts)
        damages = [opts[b][1] for b in bits]
        assert all(d1 >= d2 for d1, d2 in zip(damages, damages[1:]))
        assert all(d >= 0 for d in damages)
        assert opts[8][1] == pytest.approx(max(0.0, measured[8]), abs=1e-8)
        assert opts[4][1] == pytest.approx(max(0.0, *(measured[b] for b in range(4, 9))), abs=1e-8)


def testlayer_options_only_and_missing_8():
    dense = keras.layers.Dense(4, name="d")
    dense.build((None, 8))
    report = _report(dense, {2: 0.3, 4: 0.2}, (2, 4))
    opts = layer_options(dense, report)
    assert sorted(opts) == [2, 4, 8]  # 8 is always offered; 2 bits is INT2 for a Dense
    assert opts[2][0] == 8 and opts[2][1] == pytest.approx(0.3, abs=1e-8)
    assert opts[4][0] == 16 and opts[4][1] == pytest.approx(0.2, abs=1e-8)
    assert opts[8][0] == 32 and opts[8][1] == pytest.approx(0.0, abs=1e-8)
    only = layer_options(dense, report, only=8)
    assert list(only) == [8] and only[8][0] == 32 and only[8][1] == pytest.approx(0.0, abs=1e-8)
    report8 = _report(dense, {4: 0.2, 8: 0.05}, (4, 8))
    only = layer_options(dense, report8, only=8)
    assert list(only) == [8] and only[8][1] == pytest.approx(0.05, abs=1e-8)


def testlayer_options_conv2d_transpose_only_8():
    layer = keras.layers.Conv2DTranspose(4, 3, name="up")
    layer.build((None, 5, 5, 2))
    opts = layer_options(layer, _report(layer, {2: 0.9, 3: 0.5, 4: 0.3, 8: 0.01}, (2, 3, 4, 8)))
    assert list(opts) == [8] and opts[8][0] == kernel_bytes(layer, 8)
    assert opts[8][1] == pytest.approx(0.01, abs=1e-8)
    assert kernel_bytes(layer, 8) == 3 * 3 * 4 * 2


# ---- find_ties ----------------------------------------------------------------------------
def test_find_ties_depthwise_pointwise():
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.DepthwiseConv2D(3, name="dw")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.Conv2D(8, 1, name="pw")(x)
    x = keras.layers.Conv2D(8, 3, name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(x))
    assert find_ties(model) == [["dw", "pw"]]


def test_find_ties_not_for_3x3_or_transpose():
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.DepthwiseConv2D(3, name="dw")(inputs)
    x = keras.layers.Conv2D(8, 3, name="conv3")(x)
    x = keras.layers.DepthwiseConv2D(3, name="dw2")(x)
    x = keras.layers.Conv2DTranspose(4, 1, name="up")(x)
    x = keras.layers.DepthwiseConv2D(3, name="dw3")(x)
    x = keras.layers.Activation("relu", name="act")(x)
    x = keras.layers.Conv2D(4, 1, name="pw3")(x)
    model = keras.Model(inputs, x)
    assert find_ties(model) == [["dw3", "pw3"]]
    plain = tiny_model()
    assert find_ties(plain) == []


def test_auto_policy_respects_ties():
    inputs = keras.Input((10, 10, 4))
    x = keras.layers.DepthwiseConv2D(3, name="dw")(inputs)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(16, 1, name="pw")(x)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(5, name="head")(x))
    layers = quantizable_layers(model)
    int4 = sum(kernel_bytes(l, 4) for l in layers)
    int8 = sum(kernel_bytes(l, 8) for l in layers)
    report = qx.sensitivity(model, candidates=(2, 4, 8), method="sqnr", verbose=False)
    for budget in np.linspace(int4, int8, 9).astype(int):
        policy = qx.auto_policy(model, budget=int(budget), report=report, verbose=False)
        assert policy.layers["dw"] == policy.layers["pw"]
        assert policy.meta["auto_policy"]["ties"] == [["dw", "pw"]]
        assert policy.meta["auto_policy"]["predicted_kernel_bytes"] <= budget
        untied = qx.auto_policy(model, budget=int(budget), report=report, ties=(), verbose=False)
        assert untied.meta["auto_policy"]["predicted_damage"] <= policy.meta["auto_policy"]["predicted_damage"] + 1e-15


# ---- auto_policy on the trained digits CNN ------------------------------------------------
def _cnn_sizes(model):
    layers = quantizable_layers(model)
    """(smallest kernel bytes: each layer at its cheapest of 2 / 4 bits, int8 bytes, layers)."""
    return (sum(min(kernel_bytes(l, 2), kernel_bytes(l, 4)) for l in layers), sum(kernel_bytes(l, 8) for l in layers),
            {l.name: l for l in layers})


def _check_policy(policy, model, budget, keep=()):
    meta = policy.meta["auto_policy"]
    int4, int8, layers = _cnn_sizes(model)
    assert set(policy.layers) == set(CNN_LAYERS) == set(layers)
    bits = {n: spec["weight_bits"] for n, spec in policy.layers.items()}
    assert set(bits.values()) <= {2, 4, 8}
    # 2 bits only where it is stored as INT2 (Dense): elsewhere it packs as INT4, dominated by 4
    assert all(storage_bits(layers[n], 2) == 2 for n, b in bits.items() if b == 2)
    assert meta["budget_bytes"] == budget
    assert meta["predicted_kernel_bytes"] == sum(kernel_bytes(layers[n], b) for n, b in bits.items())
    assert meta["predicted_kernel_bytes"] <= budget
    assert meta["int8_kernel_bytes"] == int8
    assert {n: m["bits"] for n, m in meta["layers"].items()} == bits
    for name in keep:
        assert bits[name] == 8
    return bits


@pytest.mark.parametrize("method", ["sqnr", "loss"])
def test_auto_policy_on_trained_cnn(trained_cnn, digits, method):
    (x, y), _ = digits
    int4, int8, layers = _cnn_sizes(trained_cnn)
    assert (int4, int8) == (72 + 2304 + 8192 + 160, 38160)  # convs INT4, Dense INT2
    before = [w.copy() for w in trained_cnn.get_weights()]
    report = qx.sensitivity(trained_cnn, x, y, (2, 4, 8), method=method, verbose=False)

    policy = qx.auto_policy(trained_cnn, x, y, budget=f"{32 / 6}bits", method=method, verbose=False)
    budget = int(4 * 38160 / 6)
    _check_policy(policy, trained_cnn, budget)
    assert policy.meta["auto_policy"]["method"] == method
    assert policy.meta["auto_policy"]["predicted_damage"] == pytest.approx(
        qx.auto_policy(trained_cnn, budget=f"{32 / 6}bits", report=report, verbose=False).meta["auto_policy"]["predicted_damage"],
        abs=1e-6 if method == "loss" else 0)
    # JSON round trip keeps the reasoning
    again = Policy.from_json(policy.to_json())
    assert again == policy and again.meta == policy.meta
    json.loads(policy.to_json())

    # sweep: feasible, exact (vs brute force on the same options), and damage never rises with budget
    options = {n: layer_options(layers[n], report) for n in CNN_LAYERS}
    previous = math.inf
    for budget in list(range(int4, int8 + 1, 1200)) + [int8, int8 * 2]:
        p = qx.auto_policy(trained_cnn, budget=budget, report=report, verbose=False)
        _check_policy(p, trained_cnn, budget)
        damage = p.meta["auto_policy"]["predicted_damage"]
        best, _ = brute_force(options, budget)
        assert damage == pytest.approx(best, abs=1e-12)
        assert damage <= previous + 1e-15
        previous = damage
    assert previous == pytest.approx(sum(o[8][1] for o in options.values()), abs=1e-12)

    with pytest.raises(PolicyError, match=f"{int4:,}"):
        qx.auto_policy(trained_cnn, budget=int4 - 1, report=report, verbose=False)

    # keep logits at 8, even at the tightest budget that allows it
    tight = int4 - kernel_bytes(layers["logits"], 2) + kernel_bytes(layers["logits"], 8)
    p = qx.auto_policy(trained_cnn, budget=tight, keep=["logits"], report=report, verbose=False)
    bits = _check_policy(p, trained_cnn, tight, keep=["logits"])
    assert bits == {"conv1": 4, "conv2": 4, "fc1": 2, "logits": 8}
    assert p.meta["auto_policy"]["keep"] == ["logits"]
    with pytest.raises(PolicyError, match=f"{tight - 1:,}"):
        qx.auto_policy(trained_cnn, budget=tight - 1, keep=["logits"], report=report, verbose=False)
    for budget in (24000, 30000, int8):
        _check_policy(qx.auto_policy(trained_cnn, budget=budget, keep=["logits"], report=report,
                                     verbose=False), trained_cnn, budget, keep=["logits"])

    after = trained_cnn.get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_auto_policy_errors(trained_cnn):
    with pytest.raises(PolicyError, match="logit") as err:
        qx.auto_policy(trained_cnn, budget="8bits", keep=["logit"], method="sqnr", verbose=False)
    assert "conv1" in str(err.value)  # lists the valid names
    with pytest.raises(ValueError, match="needs budget="):
        qx.auto_policy(trained_cnn, method="sqnr", verbose=False)
    other = qx.sensitivity(tiny_model(), None, method="sqnr", verbose=False)
    with pytest.raises(ValueError, match="lacks layer"):
        qx.auto_policy(trained_cnn, budget="8bits", report=other, verbose=False)


# ---- the exported file's kernel bytes -----------------------------------------------------
@pytest.mark.slow
def test_export_matches_predicted_bytes(trained_cnn, digits):
    (x, y), _ = digits
    policy = qx.auto_policy(trained_cnn, x, y, budget="4.5bits", method="loss", verbose=False)
    budget = int(38160 * 4.5 / 8)
    bits = _check_policy(policy, trained_cnn, budget)
    predicted = policy.meta["auto_policy"]["predicted_kernel_bytes"]
    assert 4 in bits.values() and 8 in bits.values()

    qat = compile_classifier(qx.quantize(trained_cnn, policy), lr=1e-4)
    qat.fit(x, y, epochs=1, batch_size=64, verbose=0)
    tfl = qx.export_tflite(qat, x[:200])
    kernels = [w for w in tfl.report.info.weights if len(w[2]) in (2, 4)]
    assert len(kernels) == len(CNN_LAYERS)
    total = sum(w[3] for w in kernels)
    assert total <= budget
    assert total == predicted
    assert len(tfl.report.info.int4_tensors) == sum(b == 4 for b in bits.values())
