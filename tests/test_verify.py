"""Verification judges correctly: agreement only where the Keras model is decisive, along the
last axis (per pixel for a map), errors in steps with a high percentile, and names samples."""
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
