"""A real tf_keras.applications model that tfmot's quantize_model refuses (MobileNetV3: Rescaling,
TFOpLambda hard-swish, squeeze-excite Multiply) quantizes and exports fully integer.
The other families are measured by bench/coverage.py (minutes each on 2 cores)."""
import numpy as np
import pytest

import keras_qx as qx
from keras_qx._compat import keras, tfmot

pytestmark = pytest.mark.slow


def test_mobilenet_v3_small_fully_integer():
    model = keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), alpha=0.75, weights=None, classes=10,
                                                 include_preprocessing=True)
    with pytest.raises(Exception):
        tfmot.quantization.keras.quantize_model(model)  # the wall keras_qx removes
    x = np.random.default_rng(0).random((16, 32, 32, 3)).astype("float32") * 255
    qat = qx.quantize(model)
    qat(x, training=True)
    tfl = qx.export_tflite(qat, x, min_agreement=0.0)
    info = tfl.report.info
    assert info.fully_integer, sorted(set(info.float_ops))
    assert tfl.report.mean_error_steps < 1.0
