"""Verification judges correctly: agreement only where the Keras model is decisive, along the
last axis (per pixel for a map), errors in steps with a high percentile, and names samples."""
from dataclasses import replace

import numpy as np
import pytest

import keras_qx as qx
from keras_qx.lite.verify import check_agreement, judge


def test_near_ties_do_not_count_against_a_good_file():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 10)).astype("float32")
    ref[:100, 0], ref[:100, 1] = 5.0, 5.001  # half the samples: the top two are near-tied
    ours = ref + rng.choice([-1, 0, 1], size=ref.shape) * 0.01  # a one-step rounding noise
    result = judge(ours, ref, step=0.01)
    assert result.max_error_steps == pytest.approx(1.0)
    top1 = (ours.argmax(1) == ref.argmax(1)).mean()
    assert top1 < 0.9  # plain top-1 over every sample would refuse this file...
    check_agreement(result, 0.9)  # ...but where the model is decisive, the file agrees


def test_a_wrong_file_is_refused_naming_the_samples():
    ref = np.tile(np.eye(10, dtype="float32")[None], (3, 1, 1)).reshape(30, 10) * 5  # decisive
    ours = ref.copy()
    ours[[4, 17]] = np.roll(ours[[4, 17]], 1, axis=1)  # two samples flip class
    result = judge(ours, ref, step=0.05)
    assert result.disagreeing == (4, 17) and result.worst[:2] == (4, 17)
    with pytest.raises(qx.ExportError, match=r"disagreeing samples \[4, 17\]"):
        check_agreement(result, 0.95)


def test_a_segmentation_map_is_judged_per_pixel():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(8, 6, 6, 3)).astype("float32") * 4
    ours = ref.copy()
    ours[0, 2, 3] = ours[0, 2, 3][::-1]  # one pixel of one map flips
    result = judge(ours, ref, step=0.1)
    assert result.classifier and result.disagreeing == (0,)
    assert result.agreement > 0.99  # one of 288 pixels, not one of 8 maps


def test_a_regression_output_reports_errors_without_agreement():
    ref = np.linspace(-1, 1, 50, dtype="float32")[:, None]
    result = judge(ref + 0.02, ref, step=0.01)
    assert not result.classifier
    assert result.mean_error_steps == pytest.approx(2.0) and result.p99_error_steps == pytest.approx(2.0)
    check_agreement(result, 1.0)  # nothing to agree on; the errors are in the report


def test_a_file_wrong_everywhere_cannot_excuse_itself():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=(64, 10)).astype("float32")
    result = judge(-ref, ref, step=0.01)  # every output inverted: huge typical error
    assert result.decisive > 0.5 and result.agreement < 0.2
    with pytest.raises(qx.ExportError, match="disagrees"):
        check_agreement(result, 0.9)


def test_every_output_kind_is_judged_on_its_error():
    from keras_qx.lite.verify import MAX_MEAN_STEPS, check_error

    rng = np.random.default_rng(3)
    ref = rng.uniform(-1, 1, size=(100, 1)).astype("float32")  # a regression / single-logit output
    step = 2 / 255
    check_agreement(judge(ref + rng.choice([-1, 0, 1], size=ref.shape) * step, ref, step), 0.9)  # rounding
    off = judge(ref + 6 * step, ref, step)  # 6 steps off everywhere: top-1 has nothing to say
    assert not off.classifier and off.mean_error_steps == pytest.approx(6.0, abs=1e-3) and 6.0 > MAX_MEAN_STEPS
    with pytest.raises(qx.ExportError, match=r"mean 6\.00 .* above the 4 steps.*qx\.calibrate.*debug_tflite"):
        check_agreement(off, 0.0)  # min_agreement does not excuse the error
    check_error(off, max_mean_steps=8)  # the bars are arguments


def test_a_map_broken_in_one_region_is_refused_by_its_p99():
    rng = np.random.default_rng(4)
    ref = rng.uniform(0, 1, size=(16, 8, 8, 1)).astype("float32")  # an autoencoder's images
    step = 1 / 255
    ours = ref.copy()
    ours[:, :2, :, 0] = 1 - ours[:, :2, :, 0]  # a quarter of every image inverted
    result = judge(ours, ref, step)
    assert result.mean_error_steps < 40 and result.p99_error_steps > 200
    with pytest.raises(qx.ExportError, match="far from the Keras model"):
        check_agreement(result, 0.9)


def test_a_fine_output_step_is_judged_on_the_int8_grid_of_its_range():
    rng = np.random.default_rng(5)
    ref = rng.uniform(-1, 1, size=(64, 1)).astype("float32")
    step = 2 / 65535  # an int16 output: faithful rounding at the int8 level is 257 of its steps
    result = judge(ref + rng.choice([-1, 1], size=ref.shape) * 2 / 255, ref, step)
    assert result.mean_error_steps > 200 and result.unit_steps == pytest.approx(result.range_steps / 255)
    check_agreement(result, 0.9)  # one int8 step of its range: accepted
    with pytest.raises(qx.ExportError, match=r"in units of .* output steps"):
        check_agreement(judge(ref + 10 * 2 / 255, ref, step), 0.9)  # ten: refused


def test_a_multi_output_verification_names_the_broken_output():
    from keras_qx.lite.verify import combine

    rng = np.random.default_rng(6)
    cls = rng.normal(size=(32, 3)).astype("float32")
    reg = rng.normal(size=(32, 1)).astype("float32")
    step = float(np.ptp(reg)) / 255
    good = replace(judge(cls, cls, 0.05), output="cls")
    bad = replace(judge(reg + 20 * step, reg, step), output="reg")
    with pytest.raises(qx.ExportError, match=r"^output 'reg' of the TFLite model is far"):
        check_agreement(combine([good, bad]), 0.9)


def test_compare_layers_survives_an_aborting_file():
    import pathlib

    from keras_qx._runtime import RuntimeCrash

    x = np.random.default_rng(0).random((2, 16, 8)).astype("float32")
    aborts = pathlib.Path(__file__).parent / "data" / "aborts_litert.tflite"
    with pytest.raises(RuntimeCrash, match="debug_tflite could not run the file.*SIGABRT.*verify=True"):
        qx.debug_tflite(None, aborts, x)  # in the child runtime: the caller lives on
