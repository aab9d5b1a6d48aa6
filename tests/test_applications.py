"""Every tf_keras.applications family (one small variant each, tests/families.py) quantizes with
no hand-written config and exports a fully integer TFLite file that agrees with Keras.
The named full-size variants, and tfmot's results on them, are in bench/coverage.py."""
import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras, tfmot
from tests.families import FAMILIES, build, calibrate

pytestmark = pytest.mark.slow
# Full-size fixed architectures (no reduced builder): fewer calibration steps keep CI short.
FEW_STEPS = {"InceptionV3": 4, "Xception": 4, "VGG": 4}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_quantizes_and_exports_fully_integer(family):
    model = build(family)
    x = 255 * np.random.default_rng(0).random((16, *model.input_shape[1:])).astype("float32")
    qat = qx.quantize(model)
    calibrate(qat, x, steps=FEW_STEPS.get(family, 10))
    tfl = qx.export_tflite(qat, x)  # the default check: top-1 agreement where Keras is decisive
    info, report = tfl.report.info, tfl.report
    assert info.fully_integer, sorted(set(info.float_ops))
    # Agreement with the Keras QAT model in output steps (softmax: 1/256). Untrained random
    # networks amplify one-step rounding differences (bench/coverage.py); a wrong scale or a
    # dropped quantizer shows as tens of steps on average.
    assert report.mean_error_steps < 5 and report.max_error_steps <= 32, report.lines()


def test_mobilenet_v3_is_refused_by_tfmot():
    """The wall keras_qx removes (Rescaling, TFOpLambda hard-swish, squeeze-excite Multiply)."""
    model = keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), alpha=0.75, weights=None, classes=10)
    with pytest.raises(Exception):
        tfmot.quantization.keras.quantize_model(model)
