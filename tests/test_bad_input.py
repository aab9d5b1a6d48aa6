"""Bad input: the mistakes users make, each answered by an error that names the offending thing
and the fix (or, where the library used to give a silently wrong result, by the right result).

Mistakes covered (numbered as in the test ids):

Bits
  1. weight_bits=0 meaning "keep float"            2. weight_bits=1 in a rule
  3. weight_bits=9 for a layer                      4. weight_bits=3.5
  5. weight_bits="8" (a string, from a hand-edited config)
  6. a negative weight_bits in qx.annotate          7. activation_bits=4 (not exportable)
  8. activation_bits=16 (int16 is a post-training mode)
  9. activation_bits=17 (out of range)
Policies
 10. unknown top-level key ("defaults")            11. misspelled field ("weight_bit")
 12. a layer name the model lacks                  13. a rule regex that does not compile
 14. a rule with neither "type" nor "match"        15. "rules" given as a dict
 16. a layers entry that is a bare number          17. a misspelled layer type ("Dence")
 18. quantize: "false" (a string)                  19. malformed policy JSON text
 20. a malformed policy JSON file (the file is named)
 21. a policy file path that does not exist        22. a policy of the wrong type (a list)
 23. a policy that keeps every layer float
 24. a budget string "0.6y"                        25. a negative budget
 26. a budget below the smallest possible file     27. two budgets at once
 28. keep="fc1" (a string, not a list)             29. keep naming a layer the model lacks
 30. candidate bits 9                              31. something else passed as report=
 32. a misspelled sensitivity method
Models
 33. a Keras 3 model that cannot be rebuilt as tf_keras (subclassed, a custom layer; one of
     standard layers is accepted: tests/test_keras3.py)
                                                   34. a Keras 3 layer to qx.annotate
 35. a subclassed tf_keras model                   36. an unbuilt Sequential
 37. a QAT model passed to qx.quantize again       38. a QAT model passed to qx.auto_policy
 39. a float model passed to export_tflite         40. a model path where a model is expected
 41. qx.summary of a Keras 3 model                 42. a Keras model passed to evaluate_tflite
Data
 43. samples of the wrong shape                    44. strings as samples
 45. NaN in the samples                            46. no samples
 47. x=None (export samples)                      48. fewer labels than samples
 49. one-hot labels for a sparse loss              50. class ids for a categorical loss
 51. class ids beyond the model's outputs          52. class names (strings) as labels
 53. labels shaped (n, 1) (was: silently wrong accuracy)
 54. fractional labels                             55. a tf.data dataset of the wrong shape
 56. a tf.data dataset of dicts                    57. an unbatched tf.data dataset (was: unclear error)
 58. max_samples=0                                 59. min_agreement=90 meaning 90%
 60. verify_samples=0                              61. int8_io="no" (a truthy string)
Paths
 62. an output path that is a directory            63. an output path in a missing directory
 64. a .tflite path that does not exist            65. a truncated .tflite to inspect_tflite
 66. a corrupt .tflite to evaluate_tflite          67. a non-TFLite file to inspect_tflite
 68. a truncated .keras to qx.load_model           69. a truncated .h5 to qx.load_model
 70. a .tflite to qx.load_model                    71. a directory that is not a SavedModel
CLI (exit code 2, one "keras-qx: error:" line on stderr, no traceback)
 72. no verb                                       73. an unknown verb
 74. quantize without --budget                     75. a bad --budget
 76. --candidates 2,4,9 (refused before training)  77. --candidates four
 78. --data naming a missing .npz                  79. --data lacking the expected arrays
 80. --model without --data                        81. --model naming a missing file
 82. inspect of a truncated file                   83. demo --policy with malformed JSON (before training)
 84. --out naming an existing file
Interrupted runs
 85. the converter fails: an existing file at the path is untouched, no temporary file left
 86. verification fails: nothing written, the old file untouched
 87. KeyboardInterrupt inside write_atomic: the old file intact, no temporary file left
 88. KeyboardInterrupt in the CLI: exit 130 and one line, no traceback
Loss against targets (one check, engine/sensitivity.check_targets, before any work in
qx.sensitivity, qx.auto_policy, BitWidthTuner.search and the CLI; these used to surface as
TensorFlow's graph error from inside keras_qx, or not at all)
 89. class ids (n,) to a model compiled with mse and a 10-unit output
 90. binary cross-entropy with class ids on a multi-unit output
 91. binary cross-entropy on a one-unit output with class ids 0..3 (was: silently wrong loss)
 92. sparse cross-entropy on a one-unit output with ids above 0
 93. one-hot rows of the wrong width for a categorical cross-entropy
 94. regression targets of the wrong width for mse
 95. a custom loss that cannot take the targets (probed on two samples)
 96. BitWidthTuner.search with mse and class ids, or too few validation labels (before any trial)
 97. the CLI with a model compiled with mse and class-id labels in the .npz (before training)
 98. the CLI with x_val but no y_val

Covered elsewhere (same standard: the error names the thing and the fix):
 - a model that never saw data exported (tests/test_calibrate.py); Lambda layers and raw TF
   calls off the allowlist in saved files, pickled .npz data to the CLI, simulate_only models
   after save/load/clone (tests/test_safety.py); a read-only output directory, even as root
   (tests/test_export.py writes to /proc); several inputs given as one array, a dict missing an
   input, a metric per output miscounted (tests/test_multi_io.py); a GRU/SimpleRNN/ConvLSTM to a
   full-integer qx.ptq mode, which would crash TF's converter (tests/test_ptq.py).

Left out on purpose:
 - BitWidthTuner.search mistakes other than in its data (96): its argument checks have their
   own tests in tests/test_search.py.
 - evaluate_tflite(latency_runs=0): NaN latencies are a usable "don't time it", not a mistake.
"""
import os
import re

import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras, tf
from keras_qx.cli import main
from keras_qx.quant.policy import PolicyError

ALL = re.DOTALL


def both(*parts):
    """A ``match=`` regex requiring every part, in order (the thing, then the fix)."""
    return ".*".join(re.escape(p) for p in parts)


def tiny(name="tiny"):
    inputs = keras.Input((8,), name="x")
    h = keras.layers.Dense(8, activation="relu", name="fc1")(inputs)
    return keras.Model(inputs, keras.layers.Dense(4, name="out")(h), name=name)


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return tiny()


@pytest.fixture(scope="module")
def qat(model, data):
    return qx.calibrate(qx.quantize(model), data[0])


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.random((32, 8)).astype("float32"), rng.integers(0, 4, 32)


@pytest.fixture(scope="module")
def files(tmp_path_factory, model, qat, data):
    """A good .tflite, .keras and .h5, and truncated/corrupt copies of each."""
    d = tmp_path_factory.mktemp("files")
    tfl = bytes(qx.export_tflite(qat, data[0], d / "good.tflite"))
    (d / "trunc.tflite").write_bytes(tfl[: len(tfl) // 2])
    (d / "garbage.tflite").write_bytes(b"\0\0\0\0TFL3" + b"\xff" * 200)
    model.save(d / "good.keras")
    model.save(d / "good.h5")
    for ext in ("keras", "h5"):
        raw = (d / f"good.{ext}").read_bytes()
        (d / f"trunc.{ext}").write_bytes(raw[: len(raw) // 2])
    np.savez(d / "wrong_arrays.npz", x=np.zeros((4, 8)), y=np.zeros(4))
    return d


# ---- bits --------------------------------------------------------------------------------

@pytest.mark.parametrize("entry, parts", [
    ({"default": {"weight_bits": 0}}, ("policy default: weight_bits=0", "2..8", "quantize to false")),
    ({"rules": [{"type": "Dense", "weight_bits": 1}]}, ("policy rule 0: weight_bits=1", "2..8")),
    ({"layers": {"fc1": {"weight_bits": 9}}}, ("layers['fc1']: weight_bits=9", "2..8")),
    ({"default": {"weight_bits": 3.5}}, ("weight_bits", "integer number of bits in 2..8", "got 3.5")),
    ({"default": {"weight_bits": "8"}}, ("weight_bits", "'8'", "write the number 8 without quotes")),
    ({"default": {"activation_bits": 17}}, ("activation_bits=17", "2..16")),
], ids=["1-bits-0", "2-bits-1", "3-bits-9", "4-bits-3.5", "5-bits-str", "9-abits-17"])
def test_bad_bits_in_a_policy(entry, parts):
    with pytest.raises(PolicyError, match=both(*parts)):  # a ValueError
        qx.Policy.from_dict(entry)


def test_6_negative_bits_in_annotate():
    with pytest.raises(ValueError, match=both("annotate(", "weight_bits=-4", "use 2..8 bits")):
        qx.annotate(keras.layers.Dense(3), weight_bits=-4)


def test_7_activation_bits_4_cannot_export(model):
    with pytest.raises(PolicyError, match=both("activation bits {'fc1': 4", "Use activation_bits=8")):
        qx.quantize(model, {"default": {"activation_bits": 4}})


def test_8_activation_bits_16_is_a_post_training_mode(model):
    with pytest.raises(PolicyError, match=both("activation bits {'fc1': 16", "qx.ptq(model, 'int16x8')")):
        qx.quantize(model, {"default": {"activation_bits": 16}})


# ---- policies ----------------------------------------------------------------------------

@pytest.mark.parametrize("policy, parts", [
    ({"defaults": {"weight_bits": 4}}, ("['defaults']", "allowed: ['default'")),
    ({"default": {"weight_bit": 4}}, ("['weight_bit']", "allowed keys: ['weight_bits'")),
    ({"rules": [{"match": "conv(", "weight_bits": 4}]}, ("'conv('", "not a valid regex")),
    ({"rules": [{"weight_bits": 4}]}, ("policy rule 0", "needs a 'type' or a 'match' key")),
    ({"rules": {"type": "Dense", "weight_bits": 4}}, ("rules must be a list of dicts", "got dict")),
    ({"layers": {"fc1": 4}}, ("layers['fc1']", "must be a dict like {'weight_bits': 4}")),
    ({"default": {"quantize": "false"}}, ("quantize", "must be true or false", "'false'")),
], ids=["10-top-key", "11-field", "13-regex", "14-rule-no-key", "15-rules-dict", "16-layers-int", "18-quantize-str"])
def test_malformed_policy(policy, parts):
    with pytest.raises(PolicyError, match=both(*parts)):
        qx.Policy.from_dict(policy)


def test_12_layer_name_the_model_lacks(model):
    with pytest.raises(PolicyError, match=both("lacks: ['fc3']", "Closest names: {'fc3': ['fc1']}")):
        qx.quantize(model, {"layers": {"fc3": {"weight_bits": 4}}})


def test_17_misspelled_layer_type(model):
    with pytest.raises(PolicyError, match=both("unknown layer type 'Dence'", "did you mean ['Dense']")):
        qx.quantize(model, {"rules": [{"type": "Dence", "weight_bits": 4}]})


def test_19_malformed_policy_json_text():
    with pytest.raises(PolicyError, match=both("policy JSON does not parse at line 1 column 31",
                                               "double quotes, no trailing commas")):
        qx.Policy.from_json('{"default": {"weight_bits": 4,}}')


def test_20_malformed_policy_file_is_named(tmp_path, model):
    path = tmp_path / "policy.json"
    path.write_text('{"default": {"weight_bits": 4,}}')
    for load in (qx.Policy.from_file, lambda p: qx.quantize(model, p), lambda p: qx.quantize(model, str(p))):
        with pytest.raises(PolicyError, match=both(f"policy file {str(path)!r}", "line 1", "no trailing commas")):
            load(path)


def test_21_missing_policy_file(model, tmp_path):
    missing = str(tmp_path / "policy.json")
    with pytest.raises(FileNotFoundError, match=both(f"no policy file at {missing!r}", "policy.to_json()")):
        qx.quantize(model, missing)
    # a good file by path works (str and Path), and from_json points a path to from_file
    (tmp_path / "ok.json").write_text(qx.Policy.uniform(4).to_json())
    assert qx.Policy.coerce(tmp_path / "ok.json") == qx.Policy.coerce(str(tmp_path / "ok.json")) == qx.Policy.uniform(4)
    with pytest.raises(PolicyError, match=both("is a file path, not JSON text", "qx.Policy.from_file(")):
        qx.Policy.from_json(str(tmp_path / "ok.json"))


def test_22_policy_of_the_wrong_type(model):
    with pytest.raises(PolicyError, match=both("Policy, dict, JSON string or path of a JSON file", "got list")):
        qx.quantize(model, [("fc1", 4)])


def test_23_policy_keeps_every_layer_float(model):
    with pytest.raises(PolicyError, match=both("keeps every layer float", "quantize: true", "qx.ptq")):
        qx.quantize(model, {"default": {"quantize": False}})


@pytest.mark.parametrize("budget", ["0.6y", -5], ids=["24-budget-0.6y", "25-budget-negative"])
def test_bad_budget(model, budget):
    with pytest.raises(ValueError, match=both("budget must be bytes (an int such as 60000", '"0.6x"',
                                              f"got {budget!r}")):
        qx.auto_policy(model, budget=budget, method="sqnr", verbose=False)


def test_26_budget_below_the_smallest_file(model):
    with pytest.raises(qx.InfeasibleBudget, match=both("fits 10 kernel bytes", "smallest possible", "24 bytes",
                                                       "Raise the budget")) as err:
        qx.auto_policy(model, budget=10, method="sqnr", verbose=False)
    assert err.value.minimum_bytes == 24  # 96 Dense kernel values at 2 bits (INT2)


def test_27_two_budgets_at_once(model):
    with pytest.raises(ValueError, match=both("give one budget", "['budget', 'compression']", "budget=")):
        qx.auto_policy(model, budget=100, compression=4, method="sqnr", verbose=False)


def test_28_keep_as_a_string(model):
    """Used to be read as the layers 'f', 'c' and '1'."""
    with pytest.raises(PolicyError, match=both("keep must be a list of layer names", "keep=['fc1']", "got str")):
        qx.auto_policy(model, budget="0.6x", keep="fc1", method="sqnr", verbose=False)


def test_29_keep_naming_a_missing_layer(model):
    with pytest.raises(PolicyError, match=both("keep names layer(s) ['fc9']", "quantizable layers", "['fc1', 'out']")):
        qx.auto_policy(model, budget="0.6x", keep=["fc9"], method="sqnr", verbose=False)


def test_30_candidate_bits_9(model):
    with pytest.raises(ValueError, match=both("candidate bits=9", "use 2..8 bits")):
        qx.auto_policy(model, budget="0.6x", candidates=(4, 9), method="sqnr", verbose=False)


def test_31_report_of_the_wrong_type(model):
    """Used to be an AttributeError ('dict' object has no attribute 'damage')."""
    with pytest.raises(TypeError, match=both("report must be the SensitivityReport", "got dict")):
        qx.auto_policy(model, report={"fc1": 1.0}, budget="0.6x")


def test_32_misspelled_sensitivity_method(model):
    with pytest.raises(ValueError, match=both("'los'", "('loss', 'hessian', 'sqnr')")):
        qx.sensitivity(model, None, method="los", verbose=False)


# ---- models ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keras3_model():
    import keras as keras3  # Keras 3: what `import keras` gives next to TF 2.21

    assert keras3.__version__.startswith("3")
    return keras3.Sequential([keras3.Input((8,)), keras3.layers.Dense(4)])


def test_33_keras3_model(keras3_model):
    """A Keras 3 model of standard layers is rebuilt as tf_keras; one that cannot be is refused,
    naming the model or the layer and the fix (it used to refuse every Keras 3 model)."""
    import keras as keras3

    assert isinstance(qx.quantize(keras3_model), keras.Model)

    class Net(keras3.Model):
        def call(self, x):
            return x

    net = Net(name="net")
    net(np.zeros((1, 8), "float32"))

    class Twice(keras3.layers.Layer):
        def call(self, x):
            return 2 * x

    custom = keras3.Sequential([keras3.Input((8,)), Twice(name="twice"), keras3.layers.Dense(4)])
    for call in (qx.quantize, lambda m: qx.auto_policy(m, budget="0.6x", method="sqnr"),
                 lambda m: qx.ptq(m, "dynamic")):
        with pytest.raises(TypeError, match=both("'net' is a subclassed Keras 3 model", "import tf_keras as keras")):
            call(net)
        with pytest.raises(ValueError, match=both("layer 'twice' is a custom Keras 3 layer", "import tf_keras as keras")):
            call(custom)


def test_34_keras3_layer_to_annotate():
    import keras as keras3

    with pytest.raises(TypeError, match=both("annotate() takes a tf_keras layer", "keras.src.layers",
                                             "import tf_keras as keras")):
        qx.annotate(keras3.layers.Dense(4), weight_bits=4)


def test_35_subclassed_model():
    class Net(keras.Model):
        def __init__(self):
            super().__init__(name="net")
            self.dense = keras.layers.Dense(4)

        def call(self, x):
            if tf.reduce_sum(x) > 0:  # Python branching on a tensor value: cannot be traced
                return self.dense(x)
            return self.dense(-x)

    net = Net()
    net(np.zeros((1, 8), "float32"))
    with pytest.raises(TypeError, match=both("'net' is a subclassed tf_keras model", "cannot turn into a Functional",
                                             "does not trace", "keras.Model(inputs, outputs)")):
        qx.quantize(net)


def test_36_unbuilt_sequential():
    seq = keras.Sequential([keras.layers.Dense(4)], name="seq")
    with pytest.raises(ValueError, match=both("'seq' is not built", "model.build(input_shape)")):
        qx.quantize(seq)


def test_37_quantizing_a_qat_model_again(qat):
    """Used to blame 'no quantize config for QuantizeLayer' and suggest keeping layers float."""
    with pytest.raises(ValueError, match=both("'tiny' is already quantized", "quant_fc1", "pass the float model")):
        qx.quantize(qat)


def test_38_qat_model_to_auto_policy(qat):
    """Used to say the model had no Dense/Conv layers."""
    with pytest.raises(ValueError, match=both("already quantized", "pass the float model")):
        qx.auto_policy(qat, budget="0.6x", method="sqnr", verbose=False)


def test_39_float_model_to_export(model, data):
    with pytest.raises(qx.ExportError, match=both("no quantized layers", "the model returned by qx.quantize()")):
        qx.export_tflite(model, data[0])


def test_40_a_path_where_a_model_belongs():
    with pytest.raises(TypeError, match=both("model is a path ('model.keras')", "qx.load_model(path)")):
        qx.quantize("model.keras")
    with pytest.raises(TypeError, match=both("must be a tf_keras Model", "keras.Model(inputs, outputs)", "got Dense")):
        qx.quantize(keras.layers.Dense(3))


def test_41_summary_of_a_keras3_model(keras3_model):
    """Used to print a table for a model keras_qx cannot quantize."""
    with pytest.raises(TypeError, match=both("qat_model", "(Keras 3)", "import tf_keras as keras")):
        qx.summary(keras3_model, print_fn=None)


def test_42_keras_model_to_evaluate_tflite(qat, data):
    with pytest.raises(TypeError, match=both("expected TFLite bytes or a .tflite file path, got Functional",
                                             "qx.export_tflite(")):
        qx.evaluate_tflite(qat, *data)


# ---- data --------------------------------------------------------------------------------

@pytest.mark.parametrize("samples, error, parts", [
    (np.zeros((32, 7), "float32"), ValueError, ("x has shape (32, 7)", "takes (n, 8)")),
    (np.array([["a"] * 8] * 4), TypeError, ("x must be a numeric array shaped (n, 8)",)),
    (np.where(np.eye(32, 8) > 0, np.nan, 0.5), ValueError, ("contains 8 NaN/inf values", "np.nan_to_num")),
    (np.zeros((0, 8), "float32"), ValueError, ("x is empty", "at least one sample")),
    (None, ValueError, ("x is None", "shaped (n, 8)")),
], ids=["43-shape", "44-strings", "45-nan", "46-empty", "47-none"])
def test_bad_representative_data(qat, samples, error, parts):
    with pytest.raises(error, match=both(*parts)):
        qx.export_tflite(qat, samples)


def test_48_fewer_labels_than_samples(model, data):
    x, y = data
    with pytest.raises(ValueError, match=both("x has 32 samples but y has 30", "one target per sample")):
        qx.sensitivity(model, x, y[:30], verbose=False)


def test_49_one_hot_labels_for_a_sparse_loss(data):
    x, y = data
    m = tiny()
    m.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match=both("y looks one-hot (shape (32, 4))", "SparseCategoricalCrossentropy",
                                              "y.argmax(-1)")):
        qx.sensitivity(m, x, np.eye(4)[y], verbose=False)
    # uncompiled, one-hot labels now get a categorical cross-entropy (was: MSE on the logits)
    from keras_qx.engine.sensitivity import infer_loss

    assert isinstance(infer_loss(tiny(), np.eye(4)[y]), keras.losses.CategoricalCrossentropy)


def test_50_class_ids_for_a_categorical_loss(data):
    m = tiny()
    m.compile("adam", keras.losses.CategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match=both("y holds class ids (shape (32,))", "to_categorical(y, 4)")):
        qx.sensitivity(m, *data, verbose=False)


def test_51_class_ids_beyond_the_outputs(model, files, data):
    x, y = data
    match = both("class ids 10..13", "4 outputs (ids 0..3)", "check the labels belong to this model")
    with pytest.raises(ValueError, match=match):
        qx.sensitivity(model, x, y + 10, verbose=False)
    with pytest.raises(ValueError, match=match):  # evaluate_tflite used to report accuracy 0.0
        qx.evaluate_tflite(files / "good.tflite", x, y + 10, latency_runs=1)


def test_52_class_names_as_labels(files, data):
    """Used to report accuracy 0.0."""
    with pytest.raises(TypeError, match=both("y must hold integer class ids", "<U3", "np.unique(y, return_inverse=True)")):
        qx.evaluate_tflite(files / "good.tflite", data[0], np.array(["cat"] * 32), latency_runs=1)


def test_53_labels_shaped_n_by_1(files, data):
    """(n, 1) labels (as Keras datasets ship them) used to be argmax-ed to all zeros: a silently
    wrong accuracy. Now they count as class ids; one-hot rows give the same answer."""
    x, y = data
    expected = qx.evaluate_tflite(files / "good.tflite", x, y, latency_runs=1)["accuracy"]
    assert qx.evaluate_tflite(files / "good.tflite", x, y[:, None], latency_runs=1)["accuracy"] == expected
    assert qx.evaluate_tflite(files / "good.tflite", x, np.eye(4)[y], latency_runs=1)["accuracy"] == expected


def test_54_fractional_labels(files, data):
    with pytest.raises(ValueError, match=both("y holds fractional values", "integer class ids")):
        qx.evaluate_tflite(files / "good.tflite", data[0], data[1] + 0.5, latency_runs=1)


def test_55_dataset_of_the_wrong_shape(qat):
    ds = tf.data.Dataset.from_tensor_slices(np.zeros((16, 7), "float32")).batch(4)
    with pytest.raises(ValueError, match=both("x has shape (16, 7)", "takes (n, 8)")):
        qx.export_tflite(qat, ds)


def test_56_dataset_of_dicts(qat):
    """Used to be 'zero-dimensional arrays cannot be concatenated'."""
    ds = tf.data.Dataset.from_tensor_slices({"image": np.zeros((16, 8), "float32")}).batch(4)
    with pytest.raises(TypeError, match=both("tf.data.Dataset of dicts (keys ['image'])", "ds.map(lambda d:")):
        qx.export_tflite(qat, ds)


def test_57_unbatched_dataset(qat):
    """Used to be glued into one sample and refused as 'shape (1, 128)'."""
    ds = tf.data.Dataset.from_tensor_slices((np.ones((16, 8), "float32"), np.zeros(16)))
    assert qx.inspect_tflite(qx.export_tflite(qat, ds, verify=False)).inputs[0][2] == (8,)


def test_58_max_samples_zero(model, data):
    """Used to be a ZeroDivisionError."""
    with pytest.raises(ValueError, match=both("max_samples must be an integer >= 1", "got 0")):
        qx.sensitivity(model, *data, max_samples=0, verbose=False)


# ---- loss against targets ----------------------------------------------------------------

def compiled(loss, units=4):
    """A tiny model with ``units`` outputs compiled with ``loss``."""
    inputs = keras.Input((8,), name="x")
    h = keras.layers.Dense(8, activation="relu", name="fc1")(inputs)
    m = keras.Model(inputs, keras.layers.Dense(units, name="out")(h))
    m.compile("adam", loss)
    return m


def test_89_mse_with_class_ids(data):
    """The issue's case: used to be 'Dimensions must be equal, but are 10 and 32 for
    {{node SquaredDifference}}' from inside the sensitivity's graph."""
    m = compiled("mse", units=10)
    match = both("the model's compiled loss mean_squared_error", "element by element", "y has shape (32,)",
                 "outputs (None, 10)", "SparseCategoricalCrossentropy(from_logits=True)", "to_categorical(y, 10)")
    with pytest.raises(ValueError, match=match):
        qx.sensitivity(m, *data, verbose=False)
    with pytest.raises(ValueError, match=match):
        qx.auto_policy(m, *data, budget="6bits", verbose=False)
    # the fixes it names both work
    x, y = data
    assert qx.sensitivity(m, x, np.eye(10)[y], verbose=False).method == "loss"
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    assert qx.sensitivity(m, *data, loss=loss, verbose=False).baseline_loss > 0


@pytest.mark.parametrize("loss, units, targets, error, parts", [
    ("binary_crossentropy", 4, lambda y: y, ValueError,
     ("compiled loss binary_crossentropy", "each of the model's 4 output units", "class ids shaped (32,)",
      "SparseCategoricalCrossentropy", "0/1 rows shaped (n, 4)")),
    (keras.losses.BinaryCrossentropy(from_logits=True), 1, lambda y: y, ValueError,
     ("BinaryCrossentropy takes 0/1 targets", "values 0..3", "outputs (None, 1)", "one output unit per class")),
    (keras.losses.SparseCategoricalCrossentropy(from_logits=True), 1, lambda y: y, ValueError,
     ("SparseCategoricalCrossentropy", "outputs (None, 1) (one unit)", "ids 0..3", "BinaryCrossentropy")),
    ("categorical_crossentropy", 4, lambda y: np.eye(3)[y % 3], ValueError,
     ("categorical_crossentropy compares y", "shape (32, 3)", "outputs (None, 4)", "targets shaped (n, 4)")),
    ("mse", 4, lambda y: np.zeros((32, 3), "float32"), ValueError,
     ("mean_squared_error compares y", "shape (32, 3)", "outputs (None, 4)", "targets shaped (n, 4)")),
], ids=["90-binary-ce-ids-4-units", "91-binary-ce-ids-1-unit", "92-sparse-ce-1-unit", "93-one-hot-width",
        "94-regression-width"])
def test_loss_against_targets(data, loss, units, targets, error, parts):
    x, y = data
    with pytest.raises(error, match=both(*parts)):
        qx.sensitivity(compiled(loss, units), x, targets(y), verbose=False)


def test_95_custom_loss_probed_on_two_samples(data):
    def pairwise(y_true, y_pred):  # a custom loss that needs targets shaped like the output
        return tf.reduce_mean(tf.reshape(y_true, (-1, 4)) - y_pred, axis=-1)

    with pytest.raises(ValueError, match=both("the loss pairwise cannot score y (shape (32,))",
                                              "output (None, 4)", "Pass targets the loss takes")):
        qx.sensitivity(tiny(), *data, loss=pairwise, verbose=False)


def test_96_search_checks_its_data_before_any_trial(data, tmp_path):
    pytest.importorskip("keras_tuner")
    from keras_qx.engine.search import BitWidthTuner

    x, y = data
    tuner = BitWidthTuner(compiled("mse", units=10), max_trials=1, directory=tmp_path, verbose=0)
    with pytest.raises(ValueError, match=both("compiled loss mean_squared_error", "y has shape (32,)",
                                              "outputs (None, 10)", "SparseCategoricalCrossentropy")):
        tuner.search(x, y, validation_data=(x, y))
    tuner = BitWidthTuner(tiny(), max_trials=1, directory=tmp_path, verbose=0)
    with pytest.raises(ValueError, match=both("validation_data x has 32 samples but validation_data y has 8",
                                              "one target per sample")):
        tuner.search(x, y, validation_data=(x, y[:8]))
    assert not (tmp_path / "bitwidth_search").exists()  # no trial started


@pytest.mark.parametrize("kwargs, error, parts", [
    ({"min_agreement": 90}, ValueError, ("min_agreement is a fraction in 0..1", "0.9 means 90%", "got 90")),
    ({"verify_samples": 0}, ValueError, ("verify_samples must be an integer >= 1", "got 0")),
    ({"int8_io": "no"}, TypeError, ("int8_io must be True, False or None", "got 'no'")),
], ids=["59-min-agreement-90", "60-verify-samples-0", "61-int8-io-str"])
def test_bad_export_options(qat, data, tmp_path, kwargs, error, parts):
    """All checked before converting (they used to fail after it, misleadingly, or not at all)."""
    with pytest.raises(error, match=both(*parts)):
        qx.export_tflite(qat, data[0], tmp_path / "m.tflite", **kwargs)
    assert not list(tmp_path.iterdir())


# ---- paths -------------------------------------------------------------------------------

def test_62_output_path_is_a_directory(qat, data, tmp_path):
    """Used to convert first, then fail in os.replace naming a temporary file."""
    with pytest.raises(IsADirectoryError, match=both(f"cannot write {str(tmp_path)!r}: it is a directory",
                                                     "model.tflite")):
        qx.export_tflite(qat, data[0], tmp_path)


def test_63_output_in_a_missing_directory(qat, data, tmp_path):
    with pytest.raises(FileNotFoundError, match=both("cannot write", f"directory {str(tmp_path / 'no')!r} does not exist")):
        qx.export_tflite(qat, data[0], tmp_path / "no" / "m.tflite")


def test_64_missing_tflite(tmp_path):
    with pytest.raises(FileNotFoundError, match=both("no TFLite file at", "missing.tflite")):
        qx.inspect_tflite(tmp_path / "missing.tflite")


def test_65_truncated_tflite_is_named(files):
    """Used to be struct.error 'unpack_from requires a buffer of at least 1616 bytes'."""
    with pytest.raises(ValueError, match=both(str(files / "trunc.tflite"), "truncated or corrupt",
                                              "Export it again")):
        qx.inspect_tflite(files / "trunc.tflite")


def test_66_corrupt_tflite_to_evaluate(files, data):
    with pytest.raises(ValueError, match=both(str(files / "garbage.tflite"), "truncated or corrupt",
                                              "Export it again")):
        qx.evaluate_tflite(files / "garbage.tflite", *data)


def test_67_not_a_tflite_file(files):
    with pytest.raises(ValueError, match=both(str(files / "good.keras"), "no 'TFL3' identifier",
                                              "written by qx.export_tflite")):
        qx.inspect_tflite(files / "good.keras")


@pytest.mark.parametrize("name, parts", [
    ("trunc.keras", ("not a valid .keras file", "truncated", "Save the model again")),
    ("trunc.h5", ("not a readable HDF5 file", "truncated or corrupt", "save the model again")),
    ("good.tflite", ("it is a TFLite file", "qx.inspect_tflite")),
], ids=["68-truncated-keras", "69-truncated-h5", "70-tflite"])
def test_load_model_names_the_bad_file(files, name, parts):
    """These used to be OSError 'Unable to synchronously open file (file signature not found)'."""
    with pytest.raises(ValueError, match=both(str(files / name), *parts)):
        qx.load_model(files / name)


def test_71_directory_that_is_not_a_saved_model(tmp_path):
    with pytest.raises(ValueError, match=both(str(tmp_path), "not a SavedModel", "no saved_model.pb",
                                              "pass a .keras or .h5 file")):
        qx.load_model(tmp_path)


def test_good_files_still_load(files):
    assert qx.load_model(files / "good.keras").name == qx.load_model(files / "good.h5").name == "tiny"


# ---- CLI ---------------------------------------------------------------------------------

def cli(capsys, *argv):
    """``(exit code, stderr)``; an argparse exit counts as its code."""
    try:
        code = main(list(map(str, argv)))
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keras-qx: error: "), err
    return lines[0]


@pytest.mark.parametrize("argv, parts", [
    ((), ("the following arguments are required: command",)),
    (("frobnicate",), ("invalid choice: 'frobnicate'", "choose from 'demo'")),
    (("quantize",), ("the following arguments are required: --budget",)),
    (("quantize", "--budget", "0.6x", "--candidates", "2,4,9"), ("candidates [9]", "integers in 2..8")),
    (("quantize", "--budget", "0.6x", "--candidates", "four"), ("candidates must look like 2,4,8", "'four'")),
], ids=["72-no-verb", "73-unknown-verb", "74-no-budget", "76-candidates-9", "77-candidates-word"])
def test_cli_usage_errors(capsys, argv, parts):
    code, err = cli(capsys, *argv)
    assert code == 2
    assert re.search(both(*parts), err.strip().splitlines()[-1]), err


def test_75_cli_bad_budget(capsys):
    code, err = cli(capsys, "quantize", "--budget", "0.6y")
    assert code == 2
    assert re.search(both("budget must be bytes", '"0.6x"', "'0.6y'"), one_error_line(err))


def test_78_cli_missing_npz(capsys, files, tmp_path):
    code, err = cli(capsys, "analyze", "--model", files / "good.keras", "--data", tmp_path / "d.npz")
    assert code == 2
    assert re.search(both(f"--data {str(tmp_path / 'd.npz')!r}: no such file", "x_train, y_train, x_test, y_test",
                          "np.savez"), err.strip().splitlines()[-1])


def test_79_cli_npz_without_the_arrays(capsys, files):
    code, err = cli(capsys, "analyze", "--model", files / "good.keras", "--data", files / "wrong_arrays.npz")
    assert code == 2
    assert re.search(both("wrong_arrays.npz", "lacks array(s) ['x_train', 'y_train', 'x_test', 'y_test']",
                          "it has ['x', 'y']"), one_error_line(err))


def test_80_cli_model_without_data(capsys, files):
    code, err = cli(capsys, "analyze", "--model", files / "good.keras")
    assert code == 2
    assert re.search(both("--model needs --data", "x_train, y_train, x_test, y_test"), one_error_line(err))


def test_81_cli_missing_model(capsys, files, tmp_path):
    code, err = cli(capsys, "analyze", "--model", tmp_path / "m.keras", "--data", files / "wrong_arrays.npz")
    assert code == 2
    assert re.search(both(f"--model {str(tmp_path / 'm.keras')!r}: no such file", "model.save("),
                     err.strip().splitlines()[-1])


def test_82_cli_inspect_truncated_file(capsys, files):
    """Used to end in a struct.error traceback."""
    code, err = cli(capsys, "inspect", files / "trunc.tflite")
    assert code == 2
    assert re.search(both(str(files / "trunc.tflite"), "truncated or corrupt", "Export it again"), one_error_line(err))


def test_83_cli_demo_with_a_malformed_policy_file(capsys, tmp_path):
    """Used to train the float model for --epochs first, then fail without naming the file."""
    bad = tmp_path / "mixed.json"
    bad.write_text('{"rules": [{"type": "Dense", "weight_bits": 4}],}')
    code, err = cli(capsys, "demo", "--policy", bad)
    assert code == 2
    assert re.search(both(f"policy file {str(bad)!r}", "does not parse", "no trailing commas"), one_error_line(err))


def test_84_cli_out_is_a_file(capsys, files):
    code, err = cli(capsys, "quantize", "--budget", "0.6x", "--out", files / "good.tflite")
    assert code == 2
    assert re.search(both("--out", "good.tflite", "is a file, not a directory", "pass a directory"),
                     err.strip().splitlines()[-1])


# ---- interrupted runs --------------------------------------------------------------------

def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".keras_qx-"))


def test_85_converter_failure_leaves_the_old_file(qat, data, tmp_path, monkeypatch):
    import keras_qx.lite.export as export

    target = tmp_path / "model.tflite"
    target.write_bytes(b"the previous export")

    def broken(*_args, **_kwargs):
        raise export.ExportError("TFLite conversion failed: simulated")

    monkeypatch.setattr(export, "convert_qat", broken)
    with pytest.raises(qx.ExportError, match="conversion failed"):
        qx.export_tflite(qat, data[0], target)
    assert target.read_bytes() == b"the previous export" and _leftovers(tmp_path) == []


def test_86_failed_verification_writes_nothing(qat, data, tmp_path, monkeypatch):
    import keras_qx.lite.export as export
    from keras_qx.lite.verify import Verification

    target = tmp_path / "model.tflite"
    target.write_bytes(b"the previous export")
    monkeypatch.setattr(export, "verify_tflite", lambda *a: Verification(0.5, 9.0, 3.0, 32, True, 8.0, 0.8, (1, 2)))
    with pytest.raises(qx.ExportError, match=both("top-1 agreement 50.0% < 90%", "disagreeing samples [1, 2]",
                                                  "Nothing was written", "qx.debug_tflite")):
        qx.export_tflite(qat, data[0], target)
    assert target.read_bytes() == b"the previous export" and _leftovers(tmp_path) == []


def test_87_interrupt_inside_write_atomic(tmp_path, monkeypatch):
    from keras_qx._io import write_atomic

    target = tmp_path / "model.tflite"
    target.write_bytes(b"old")

    def interrupted(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, b"new" * 1000)
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_88_interrupt_in_the_cli(capsys, files, monkeypatch):
    import keras_qx.cli as cli_module

    def interrupted(_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "_inspect", interrupted)
    code, err = cli(capsys, "inspect", files / "good.tflite")
    assert code == 130 and err.strip() == "keras-qx: interrupted."


def test_97_cli_mse_model_with_class_ids(capsys, tmp_path, data):
    x, y = data
    compiled("mse", units=10).save(tmp_path / "mse.keras")
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:8], y_test=y[:8])
    code = main(["quantize", "--budget", "0.6x", "--model", str(tmp_path / "mse.keras"), "--data",
                 str(tmp_path / "d.npz"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = next(l for l in err.splitlines() if l.startswith("keras-qx: error:"))
    for part in ("compiled loss mean_squared_error", "y_train has shape (32,)", "outputs (None, 10)",
                 "SparseCategoricalCrossentropy", "to_categorical(y_train, 10)"):
        assert part in line, (part, line)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_98_cli_x_val_without_y_val(capsys, tmp_path, files, data):
    x, y = data
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y, x_val=x)
    assert main(["analyze", "--model", str(files / "good.keras"), "--data", str(tmp_path / "d.npz")]) == 2
    err = capsys.readouterr().err
    assert "has x_val but not y_val" in err and "x_val=..., y_val=..." in err
