"""The API convention (docs/contributing.md) holds for every public name, and the old names of
0.0.x still work, each with a DeprecationWarning naming the new form."""
import inspect
import warnings

import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras
from tests.conftest import tiny_model

# parameters a public signature may no longer use, except as the deprecated tail
OLD_NAMES = {"data", "budget_bytes", "compression", "avg_bits", "representative_data", "model_or_path",
             "model_bytes_or_path", "tflite_model", "train_data", "test_data", "representative", "print_fn"}
PRINT_FN_ALLOWED = {"summary"}  # Keras has Model.summary(print_fn=...)
RESULTS = [qx.SensitivityReport, qx.ParetoResult, qx.Comparison, qx.Evaluation, qx.TFLiteModel, qx.TFLiteInfo,
           qx.ExportReport, qx.LayerComparison, qx.GzipPrediction, qx.Profile]


def _public_callables():
    for name in qx.__all__:
        obj = getattr(qx, name)
        if name == "compare_layers" or inspect.ismodule(obj):
            continue
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj) and not issubclass(obj, BaseException):
            yield f"{name}.__init__", obj.__init__
            for m, f in vars(obj).items():
                if inspect.isfunction(f) and not m.startswith("_"):
                    yield f"{name}.{m}", f


@pytest.mark.parametrize("name, fn", list(_public_callables()), ids=lambda v: v if isinstance(v, str) else "")
def test_old_names_only_as_deprecated_keyword_tail(name, fn):
    params = inspect.signature(inspect.unwrap(fn)).parameters
    old = [p for p in params.values() if p.name in OLD_NAMES]
    if name.split(".")[0] in PRINT_FN_ALLOWED:
        old = [p for p in old if p.name != "print_fn"]
    for p in old:
        # a deprecated name defaults to None and sits after every convention argument
        assert p.default is None, (name, p.name)
        later = list(params)[list(params).index(p.name):]
        assert all(q in OLD_NAMES or params[q].kind == params[q].VAR_KEYWORD for q in later), (name, later)


@pytest.mark.parametrize("name, fn", list(_public_callables()), ids=lambda v: v if isinstance(v, str) else "")
def test_printing_is_verbose(name, fn):
    params = inspect.signature(inspect.unwrap(fn)).parameters
    if "verbose" in params:
        default = params["verbose"].default
        assert isinstance(default, int) and default in (0, 1, 2), (name, default)


def test_one_candidates_default_and_seed_default():
    for fn in (qx.sensitivity, qx.auto_policy, qx.BitWidthTuner.__init__, qx.pareto):
        params = inspect.signature(inspect.unwrap(fn)).parameters
        assert params["candidates"].default == (2, 4, 8), fn
        if "seed" in params:
            assert params["seed"].default == 0, fn


def test_file_argument_is_tflite():
    for fn in (qx.inspect_tflite, qx.evaluate_tflite, qx.debug_tflite, qx.profile_tflite):
        assert "tflite" in inspect.signature(inspect.unwrap(fn)).parameters, fn


@pytest.mark.parametrize("cls", RESULTS, ids=lambda c: c.__name__)
def test_results_have_table_and_to_dict(cls):
    assert callable(getattr(cls, "table", None)) and callable(getattr(cls, "to_dict", None))


def test_every_exception_is_exported_and_a_builtin():
    errors = {n: getattr(qx, n) for n in qx.__all__ if inspect.isclass(getattr(qx, n))
              and issubclass(getattr(qx, n), BaseException)}
    assert set(errors) == {"PolicyError", "InfeasibleBudget", "ExportError", "LengthError", "RuntimeCrash",
                           "Keras3Error"}
    builtins = (ValueError, TypeError, RuntimeError, OSError)
    assert all(issubclass(e, builtins) for e in errors.values())
    # each class a public module raises is one of these (or a builtin)
    import ast
    import pathlib

    raised = set()
    for path in pathlib.Path(qx.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
                raised.add(node.exc.func.id)
    internal = {"NotTraceable", "ProbeFailed"}  # caught inside rewrite/, never reach a caller
    import builtins as py

    unexported = {n for n in raised - internal if not hasattr(py, n) and n not in errors}
    assert not unexported, unexported


def test_verbose_is_checked():
    with pytest.raises(ValueError, match="verbose must be 0 .* got 3"):
        qx.sensitivity(tiny_model(), method="sqnr", verbose=3)


# ---- old names keep working -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tflite_file(tmp_path_factory):
    model = tiny_model("old_names")
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype("float32")
    tfl = qx.ptq(model, "float16", x, verify=False)
    path = tmp_path_factory.mktemp("old") / "m.tflite"
    path.write_bytes(tfl)
    return model, x, path


def test_old_file_argument_names(tflite_file):
    _, x, path = tflite_file
    with pytest.warns(DeprecationWarning, match=r"model_or_path= is deprecated, use tflite="):
        old = qx.inspect_tflite(model_or_path=path)
    assert old.to_dict() == qx.inspect_tflite(path).to_dict()
    with pytest.warns(DeprecationWarning, match=r"model_bytes_or_path= is deprecated, use tflite="):
        result = qx.evaluate_tflite(model_bytes_or_path=path, x=x, latency_runs=2)
    assert isinstance(result, dict) and result["size_bytes"] == path.stat().st_size
    assert "| size_bytes |" in result.table() and result.to_dict()["n"] == 16
    with pytest.raises(TypeError, match="both tflite= and its deprecated name model_or_path="):
        qx.inspect_tflite(tflite=path, model_or_path=path)


def test_old_export_arguments(tflite_file, capsys):
    model, x, _ = tflite_file
    with pytest.warns(DeprecationWarning, match="representative_data= is deprecated, use x="):
        a = qx.ptq(model, "float16", representative_data=x, verify=False)
    lines = []
    with pytest.warns(DeprecationWarning, match="print_fn= is deprecated, use verbose=1"):
        b = qx.ptq(model, "float16", x, verify=False, print_fn=lines.append)
    assert bytes(a) == bytes(b) and lines and lines[0].startswith("TFLite:")
    qx.ptq(model, "float16", x, verify=False, verbose=1)
    assert capsys.readouterr().out.splitlines()[0] == lines[0]


def test_compare_layers_is_debug_tflite_under_its_old_name():
    with pytest.warns(DeprecationWarning, match="qx.compare_layers is deprecated, use qx.debug_tflite"):
        with pytest.raises(ValueError):  # reaches debug_tflite's own checks
            qx.compare_layers(tiny_model(), b"not a file", np.zeros((1, 8, 8, 1), "float32"))


def test_old_budget_and_print_arguments_of_the_tuner(tmp_path):
    with pytest.warns(DeprecationWarning) as caught:
        tuner = qx.BitWidthTuner(tiny_model(), budget_bytes="0.6x", print_fn=lambda *_: None, directory=tmp_path)
    assert {str(w.message).split(":")[1].strip() for w in caught} >= {"BitWidthTuner()"}
    assert tuner.budget_bytes == qx.BitWidthTuner(tiny_model(), budget="0.6x", directory=tmp_path).budget_bytes


def test_old_auto_policy_forms(trained_cnn, digits):
    (x, y), _ = digits
    new = qx.auto_policy(trained_cnn, budget="0.6x", method="sqnr", verbose=0).layers
    with pytest.warns(DeprecationWarning, match="budget_bytes="):
        assert qx.auto_policy(trained_cnn, budget_bytes="0.6x", method="sqnr", verbose=0).layers == new
    with pytest.warns(DeprecationWarning, match="avg_bits="):
        assert qx.auto_policy(trained_cnn, avg_bits=4.8, method="sqnr", verbose=0).layers == \
            qx.auto_policy(trained_cnn, budget="4.8bits", method="sqnr", verbose=0).layers
    with pytest.warns(DeprecationWarning, match="table"):
        lines = []
        qx.sensitivity(trained_cnn, method="sqnr", verbose=0).table(print_fn=lines.append)
        assert lines[0].startswith("Sensitivity (sqnr")


# ---- no global side effects ---------------------------------------------------------------
def test_tuner_constructor_keeps_the_users_session(tmp_path):
    def build(hp):
        inputs = keras.Input((8, 8, 1))
        h = keras.layers.Flatten()(inputs)
        return keras.Model(inputs, keras.layers.Dense(3)(h))

    before = keras.layers.Dense(2)
    qx.BitWidthTuner(hypermodel=build, budget="0.8x", directory=tmp_path, verbose=0)
    after = keras.layers.Dense(2)
    # clear_session() would reset Keras' name counters: the next Dense would be "dense" again
    assert before.name != after.name and after.name != "dense"


def test_a_users_oracle_keeps_its_class(tmp_path):
    from keras_qx._compat import keras_tuner

    kt = keras_tuner()
    oracle = kt.oracles.RandomSearchOracle(kt.Objective("val_accuracy", "max"), max_trials=2, seed=0)
    tuner = qx.BitWidthTuner(tiny_model(), budget="0.6x", oracle=oracle, directory=tmp_path, verbose=0)
    assert tuner.tuner.oracle is oracle
    assert type(oracle) is kt.oracles.RandomSearchOracle  # the budget check is bound on the instance
    assert "populate_space" in vars(oracle) and "keras_qx" in oracle.get_state()
    other = kt.oracles.RandomSearchOracle(kt.Objective("val_accuracy", "max"), max_trials=2)
    assert "populate_space" not in vars(other)


def test_deprecation_warnings_name_the_removal_release():
    from keras_qx._deprecation import REMOVED_IN

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qx.auto_policy(tiny_model(), budget_bytes="0.6x", method="sqnr", verbose=0)
    assert any(REMOVED_IN in str(w.message) for w in caught)
