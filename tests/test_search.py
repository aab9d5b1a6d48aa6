"""qx.BitWidthTuner: budget, warm start, JSON round trip, distributed and resumed searches."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import compile_classifier, tiny_model
from keras_qx._compat import keras, keras_tuner
from keras_qx.engine.allocate import InfeasibleBudget
from keras_qx.lite.export import export_tflite
from keras_qx.quant.policy import Policy
from keras_qx.engine.search import BitWidthTuner, SearchSpace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny model's kernels: conv 36, fc 1152, out 24 values; int8 1212 bytes, all-4-bit 606.
# At 0.6x (727 bytes) fc must take 4 bits; every assignment with fc at 8 is over budget.


def _data(n=192, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, 8, 8, 1)).astype("float32")
    y = (x[:, :4].mean(axis=(1, 2, 3)) > 0.5).astype("int64") + (x[:, 4:].mean(axis=(1, 2, 3)) > 0.5)
    return x, y


@pytest.fixture
def tiny_trained():
    x, y = _data()
    model = compile_classifier(tiny_model())
    model.fit(x, y, epochs=2, verbose=0)
    return model, (x, y)


class FitLog(keras.callbacks.Callback):
    """Appends one line per fit to a file (deep copies share the file, unlike a list)."""

    def __init__(self, path, tag="fit"):
        super().__init__()
        self.path, self.tag = str(path), tag

    def on_train_begin(self, logs=None):
        bits = sorted({int(l.quantize_config.weight_bits) for l in self.model.layers
                       if getattr(getattr(l, "quantize_config", None), "weight_bits", None) is not None})
        with open(self.path, "a") as f:
            f.write(f"{self.tag} {bits}\n")


# ---- fast: arguments --------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors(tmp_path):
    model = tiny_model()
    kt = keras_tuner()
    with pytest.raises(ValueError, match="candidates"):
        BitWidthTuner(model, candidates=(4, 9))
    with pytest.raises(ValueError, match="candidates"):
        BitWidthTuner(model, candidates=())
    with pytest.raises(ValueError, match="budget"):
        BitWidthTuner(model, budget="lots")
    with pytest.raises(ValueError, match="budget must be bytes"):
        BitWidthTuner(model, budget=-5)
    with pytest.raises(ValueError, match="0.6x"):
        BitWidthTuner(model, budget=0.6)
    with pytest.raises(InfeasibleBudget, match="606"):
        BitWidthTuner(model, candidates=(4, 8), budget=100)
    with pytest.raises(InfeasibleBudget, match=r"candidates \(2, 4, 8\) takes 312"):
        BitWidthTuner(model, budget=100)
    with pytest.raises(ValueError, match="Objective"):
        BitWidthTuner(model, objective="val_wobble")
    with pytest.raises(ValueError, match="bayesian"):
        BitWidthTuner(model, oracle="grid")
    with pytest.raises(TypeError, match="instance"):
        BitWidthTuner(model, oracle=kt.oracles.RandomSearchOracle)
    with pytest.raises(ValueError, match="objective"):
        BitWidthTuner(model, oracle=kt.oracles.RandomSearchOracle(kt.Objective("loss", "min")))
    with pytest.raises(ValueError, match="size_penalty"):
        BitWidthTuner(model, objective="val_loss", size_penalty=8)
    with pytest.raises(ValueError, match="exactly one"):
        BitWidthTuner(model, hypermodel=lambda hp: model)
    with pytest.raises(ValueError, match="groups"):
        BitWidthTuner(model, groups=[{"match": "nothing_matches"}])
    with pytest.raises(ValueError, match="allow_float"):
        BitWidthTuner(model, allow_float=["nope"])
    with pytest.raises(ValueError, match="max_trials"):
        BitWidthTuner(model, max_trials=0)

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="subclassed"):
        BitWidthTuner(Sub())
    import keras as keras3  # Keras 3 (pulled in by TF / keras-tuner)

    class K3Net(keras3.Model):  # a Keras 3 model of standard layers is rebuilt; a subclassed one cannot be
        def call(self, x):
            return x

    k3 = K3Net(name="k3net")
    k3(np.zeros((1, 4), "float32"))
    with pytest.raises(TypeError, match="'k3net' is a subclassed Keras 3 model"):
        BitWidthTuner(k3)
    tuner = BitWidthTuner(model, directory=tmp_path, verbose=0)
    x, y = _data(8)
    with pytest.raises(ValueError, match="validation_data"):
        tuner.search(x, y, epochs=1)


def test_search_space_groups_ties_and_float_costs():
    model = tiny_model()
    space = SearchSpace((8, 4), groups=({"type": "Dense"},), allow_float=("conv",))
    units = {u.hp: u for u in space.units(model)}
    assert set(units) == {"bits/type=Dense", "bits/conv"}
    assert units["bits/type=Dense"].layers == ("fc", "out")
    assert units["bits/type=Dense"].costs == {4: 576 + 12, 8: 1152 + 24}
    assert units["bits/conv"].choices == (4, 8, 32) and units["bits/conv"].costs[32] == 36 * 4
    # a 2-bit conv costs what a 4-bit one does (INT4): the dominated width is not searched; a
    # 2-bit Dense is INT2, half the bytes
    assert {u.layers: u.choices for u in SearchSpace((2, 4, 8)).units(model)} == {
        ("conv",): (4, 8), ("fc",): (2, 4, 8), ("out",): (2, 4, 8)}
    # a depthwise + pointwise pair is one choice even when no group says so
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.DepthwiseConv2D(3, name="dw")(inputs)
    h = keras.layers.Conv2D(8, 1, name="pw")(h)
    out = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(h))
    sep = keras.Model(inputs, out)
    assert [u.layers for u in SearchSpace((4, 8)).units(sep)] == [("dw", "pw"), ("head",)]


# ---- slow: real searches -----------------------------------------------------------------
@pytest.mark.slow
def test_search_fits_budget_warm_starts_and_round_trips(tiny_trained, tmp_path, capsys):
    model, (x, y) = tiny_trained
    fits = tmp_path / "fits.txt"
    tuner = BitWidthTuner(model, candidates=(4, 8), budget="0.6x", oracle="random", max_trials=3,
                          directory=tmp_path, seed=3, verbose=1)
    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path / "tb"))
    tuner.search(x, y, validation_data=(x[:64], y[:64]), epochs=1, callbacks=[FitLog(fits), board])
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == ["trial_0", "trial_1", "trial_2"]
    assert tuner.budget_bytes == int(0.6 * 1212)
    lines = capsys.readouterr().out.splitlines()
    rows = tuner.results()
    assert [r["status"] for r in rows] == ["COMPLETED"] * 3
    assert len(fits.read_text().splitlines()) == 3  # one fit per trial, nothing else trained
    assert all(r["kernel_bytes"] <= tuner.budget_bytes for r in rows)
    assert rows[0]["warm_start"] and rows[0]["bits"] == {"conv": 8, "fc": 4, "out": 8}  # auto_policy's pick
    assert sum(l.startswith("[") for l in lines) == 3 and "[1/3] trial 0 bits 8,4,8" in lines[1]

    policy = tuner.best_policy()
    meta = policy.meta["search"]
    assert meta["predicted_kernel_bytes"] <= tuner.budget_bytes
    assert Policy.from_json(policy.to_json()) == policy
    assert policy.layers["fc"] == {"weight_bits": 4}
    best = max(rows, key=lambda r: (r["score"], -r["kernel_bytes"], -int(r["trial_id"])))
    assert meta["trial_id"] == best["trial_id"] and meta["value"] == pytest.approx(best["metric"])
    qat = tuner.best_model()
    assert qat.evaluate(x[:64], y[:64], verbose=0)[1] == pytest.approx(best["metric"], abs=1e-6)
    tfl = export_tflite(qat, x[:64], verify=False)
    assert tfl.report.info.kernel_bytes <= tuner.budget_bytes  # the file, not only the prediction
    assert all(r["qat_seconds"] > 0 and r["trial_seconds"] >= r["qat_seconds"] for r in rows)
    assert tuner.trial_model("1").count_params() == qat.count_params()
    with pytest.raises(ValueError, match="not completed"):
        tuner.trial_model("7")
    table = tuner.results_summary(print_fn=None)
    assert table.splitlines()[0].startswith("| trial | status | conv | fc | out |") and "(warm)" in table


@pytest.mark.slow
def test_over_budget_proposals_are_never_trained(tiny_trained, tmp_path):
    """An oracle stuck on one over-budget point: every proposal is rejected and repaired."""
    model, (x, y) = tiny_trained
    kt = keras_tuner()

    class AllEight(kt.oracles.RandomSearchOracle):
        def populate_space(self, trial_id):
            return {"status": "RUNNING", "values": {hp.name: 8 for hp in self.hyperparameters.space}}

    fits = tmp_path / "fits.txt"
    tuner = BitWidthTuner(model, budget=727, oracle=AllEight(kt.Objective("accuracy", "max"), max_trials=3),
                          objective="accuracy", warm_start=False, directory=tmp_path, seed=0, verbose=0)
    tuner.search(x, y, epochs=1, callbacks=[FitLog(fits)])
    rows = tuner.results()
    assert len(rows) == 3 and all(r["status"] == "COMPLETED" for r in rows)
    assert all(r["kernel_bytes"] <= 727 for r in rows)
    assert all(r["bits"]["fc"] == 4 for r in rows)
    # all-8 bits (the only thing the oracle proposes) was never trained
    assert all(line.split(" ", 1)[1] != "[8]" for line in fits.read_text().splitlines())
    assert len(fits.read_text().splitlines()) == 3
    stats = tuner.stats
    assert stats["rejected"] == 3 * 9 and stats["repaired"] == 3  # 1 proposal + 8 redraws each


_SCRIPT = textwrap.dedent("""
    import os, sys, signal
    import numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import compile_classifier, tiny_model
    from keras_qx._compat import keras
    from keras_qx.engine.search import BitWidthTuner

    class Log(keras.callbacks.Callback):
        def __init__(self, path, tag):
            super().__init__()
            self.path, self.tag = path, tag
        def on_train_begin(self, logs=None):
            with open(self.path) if os.path.exists(self.path) else open(os.devnull) as f:
                done = len(f.read().splitlines())
            with open(self.path, "a") as f:
                f.write(self.tag + "\\n")
            if os.environ.get("KILL_AT") and done == int(os.environ["KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)

    rng = np.random.default_rng(0)
    x = rng.random((128, 8, 8, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0.5).astype("int64")
    keras.utils.set_random_seed(0)
    model = compile_classifier(tiny_model())
    tuner = BitWidthTuner(model, candidates=(2, 4, 8), oracle="random", max_trials={trials},
                          objective="accuracy", directory={directory!r}, seed=1, warm_start=False)
    tuner.search(x, y, epochs=1, callbacks=[Log({log!r}, os.environ.get("KERASTUNER_TUNER_ID", "solo")
                                                + " " + os.environ.get("RUN", ""))])
    print("DONE", len(tuner.results()) if not os.environ.get("KERASTUNER_ORACLE_IP") else "")
""")


def _script(tmp_path, trials):
    path = tmp_path / "search_script.py"
    path.write_text(_SCRIPT.format(tests=os.path.join(ROOT, "tests"), trials=trials,
                                   directory=str(tmp_path / "search"), log=str(tmp_path / "fits.txt")))
    return path


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for key in ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def _trial_files(tmp_path):
    project = tmp_path / "search" / "bitwidth_search"
    return {p.name: json.loads((p / "trial.json").read_text()) for p in project.glob("trial_*")}


@pytest.mark.slow
def test_resume_after_sigkill_does_not_rerun_finished_trials(tmp_path):
    script = _script(tmp_path, trials=4)
    first = subprocess.run([sys.executable, str(script)], env=_env(KILL_AT="2", RUN="1"),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    done = {k for k, t in _trial_files(tmp_path).items() if t["status"] == "COMPLETED"}
    assert done == {"trial_0", "trial_1"}
    finished_weights = {k: os.path.getmtime(tmp_path / "search" / "bitwidth_search" / k / "qat_weights.h5")
                        for k in done}
    second = subprocess.run([sys.executable, str(script)], env=_env(RUN="2"),
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "DONE 4" in second.stdout and "2 trial(s) done, not rerun" in second.stdout
    fits = (tmp_path / "fits.txt").read_text().splitlines()
    assert fits.count("solo 1") == 3  # trials 0, 1 and the killed trial 2
    assert fits.count("solo 2") == 2  # trial 2 again, trial 3: nothing finished is rerun
    trials = _trial_files(tmp_path)
    assert sorted(trials) == ["trial_0", "trial_1", "trial_2", "trial_3"]
    assert all(t["status"] == "COMPLETED" for t in trials.values())
    for k, mtime in finished_weights.items():
        assert os.path.getmtime(tmp_path / "search" / "bitwidth_search" / k / "qat_weights.h5") == mtime


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_distributed_chief_and_two_workers_share_one_search(tmp_path):
    script = _script(tmp_path, trials=4)
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(KERASTUNER_TUNER_ID=tid, KERASTUNER_ORACLE_IP="127.0.0.1",
                                       KERASTUNER_ORACLE_PORT=port))
             for tid in ("chief", "tuner0", "tuner1")]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    fits = (tmp_path / "fits.txt").read_text().splitlines()
    assert len(fits) == 4 and not any(f.startswith("chief") for f in fits)  # the chief only serves the oracle
    trials = _trial_files(tmp_path)
    assert sorted(trials) == ["trial_0", "trial_1", "trial_2", "trial_3"]
    assert all(t["status"] == "COMPLETED" for t in trials.values())
    values = [json.dumps(t["hyperparameters"]["values"], sort_keys=True) for t in trials.values()]
    assert len(set(values)) == 4  # every assignment recorded and run once


@pytest.mark.slow
def test_cli_search_writes_policy_model_tables_and_plot(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "keras_qx.cli", "search", "--budget", "0.6x", "--trials", "2", "--epochs", "2",
         "--qat-epochs", "1", "--oracle", "random", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"policy.json", "model.tflite", "results.csv", "results.md", "search.png"} <= {p.name for p in tmp_path.iterdir()}
    policy = Policy.from_json((tmp_path / "policy.json").read_text())
    budget = int(0.6 * 151072)  # the digits CNN's uniform-int8 kernel bytes
    assert policy.meta["search"]["predicted_kernel_bytes"] <= budget
    csv_rows = (tmp_path / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("trial_id,status,conv1,conv2,fc1,logits,kernel_bytes") and len(csv_rows) == 3
    assert "in the file" in proc.stdout and "(warm)" in (tmp_path / "results.md").read_text()


def test_cli_search_argument_errors(tmp_path, capsys):
    """A bad --trials is argparse's usage error (exit 2) naming the flag; a bad --budget returns 2
    with the budget's message naming the value, before any model is trained or directory written."""
    from keras_qx.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["search", "--budget", "0.6x", "--trials", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "keras-qx: error: --trials must be at least 1" in err and "unrecognized arguments" not in err, err
    assert main(["search", "--budget", "lots", "--out", str(tmp_path / "x")]) == 2
    captured = capsys.readouterr()
    assert "keras-qx: error: budget must be bytes" in captured.err and "got 'lots'" in captured.err, captured.err
    assert not captured.out and not (tmp_path / "x").exists()


@pytest.mark.slow
def test_hypermodel_searches_model_hyperparameters_and_bits(tmp_path):
    x, y = _data(128)

    def build(hp):
        inputs = keras.Input((8, 8, 1))
        h = keras.layers.Conv2D(hp.Choice("filters", [2, 4]), 3, name="conv")(inputs)
        h = keras.layers.Dense(8, activation="relu", name="fc")(keras.layers.Flatten(name="flat")(h))
        return keras.Model(inputs, keras.layers.Dense(3, name="out")(h))

    fits = tmp_path / "fits.txt"
    tuner = BitWidthTuner(hypermodel=build, budget=500, oracle="random", max_trials=2, objective="accuracy",
                          allow_float=["out"], directory=tmp_path, seed=0, verbose=0)
    tuner.search(x, y, epochs=1, float_epochs=1, callbacks=[FitLog(fits)])
    rows = tuner.results()
    assert len(rows) == 2 and all(r["status"] == "COMPLETED" for r in rows)
    assert all(r["kernel_bytes"] <= 500 for r in rows)
    assert all(r["hyperparameters"]["filters"] in (2, 4) and r["bits"]["out"] in (2, 4, 8, "float") for r in rows)
    assert len(fits.read_text().splitlines()) == 2  # callbacks go to each trial's QAT fit
    policy = tuner.best_policy()
    assert policy.meta["search"]["hyperparameters"]["filters"] in (2, 4)
    qat = tuner.best_model()
    assert qat.get_layer("quant_conv").layer.filters == policy.meta["search"]["hyperparameters"]["filters"]


def test_size_penalty_is_autoqkeras_forgiving_factor():
    from keras_qx.engine.search import SizePenalty

    penalty = SizePenalty.coerce(8)
    assert penalty.score(0.9, 500, 1000) == pytest.approx(0.9 * 1.08)  # half the bytes: +8%
    assert penalty.score(0.9, 250, 1000) == pytest.approx(0.9 * 1.16)  # a quarter: +16%
    assert penalty.score(0.9, 2000, 1000) == pytest.approx(0.9 * 0.92)  # double: -8%
    asym = SizePenalty.coerce({"delta_p": 4, "delta_n": 10, "rate": 4})
    assert asym.score(1.0, 250, 1000) == pytest.approx(1.04)
    assert asym.score(1.0, 4000, 1000) == pytest.approx(0.90)
    with pytest.raises(ValueError, match="rate"):
        SizePenalty.coerce({"rate": 1})
    with pytest.raises(ValueError, match="unknown"):
        SizePenalty.coerce({"delta": 3})


@pytest.mark.slow
def test_size_penalty_search_ranks_by_score(tiny_trained, tmp_path):
    model, (x, y) = tiny_trained
    tuner = BitWidthTuner(model, size_penalty=8, objective="accuracy", oracle="random", max_trials=2,
                          directory=tmp_path, seed=0, verbose=0)
    tuner.search(x, y, epochs=1)
    rows = tuner.results()
    assert tuner.objective.name == "score" and len(rows) == 2
    for r in rows:
        expected = r["metric"] * (1 + 0.08 * np.log(1212 / r["kernel_bytes"]) / np.log(2))
        assert r["score"] == pytest.approx(expected, rel=1e-6)
    assert tuner.best_policy().meta["search"]["score"] == pytest.approx(max(r["score"] for r in rows))


def _simulate(tuner, n, score):
    """Run the oracle's trial life cycle without training: create, report, end."""
    oracle = tuner.tuner.oracle
    proposals = []
    for i in range(n):
        trial = oracle.create_trial("t")
        if trial.status != "RUNNING":
            break
        values = dict(trial.hyperparameters.values)
        proposals.append(values)
        oracle.update_trial(trial.trial_id, {tuner.objective.name: score(values), "kernel_bytes": 0.0})
        trial.status = "COMPLETED"
        oracle.end_trial(trial)
    return proposals


def test_bayesian_oracle_proposes_only_untried_within_budget_points(tmp_path):
    model = tiny_model()
    tuner = BitWidthTuner(model, candidates=(4, 8), budget=727, max_trials=6, directory=tmp_path, seed=0, verbose=0)
    costs = {u.hp: u.costs for u in tuner.units}
    proposals = _simulate(tuner, 6, lambda v: 0.5 + 0.1 * (v["bits/conv"] == 8))
    assert len(proposals) == 4  # all four within-budget points (fc at 4 bits), then STOPPED
    assert len({tuple(sorted(p.items())) for p in proposals}) == 4
    assert all(sum(costs[k][b] for k, b in p.items()) <= 727 for p in proposals)
    assert tuner.stats["rejected"] <= 2  # only the random initial points can miss the budget


def test_large_spaces_sample_a_within_budget_pool(tmp_path):
    inputs = keras.Input((16,))
    h = inputs
    for i in range(16):  # 2**16 assignments: sampled, not enumerated
        h = keras.layers.Dense(16, name=f"d{i}")(h)
    model = keras.Model(inputs, h)
    tuner = BitWidthTuner(model, budget="0.7x", max_trials=3, objective="loss", directory=tmp_path,
                          verbose=0)
    pool = tuner._pool()
    assert 100 < len(pool) <= 8000
    assert len({tuple(sorted(p.items())) for p in pool}) == len(pool)
    assert all(sum(u.costs[p[u.hp]] for u in tuner.units) <= tuner.budget_bytes for p in pool)
