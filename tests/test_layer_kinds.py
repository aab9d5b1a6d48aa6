"""Every layer kind with kernels, at 4 bits: trains, exports, agrees with Keras, and its kernel
bytes in the file are what the shared cost model says (INT4 where packed, else int8/float)."""
import contextlib

import pytest

import keras_qx as qx
from keras_qx._compat import keras
from keras_qx.quant.cost import kernel_bytes
from tests.conftest import train_and_export

pytestmark = pytest.mark.slow
L = keras.layers

KINDS = {
    "Dense": ((12,), lambda: L.Dense(6, activation="relu")),
    "Conv1D": ((16, 3), lambda: L.Conv1D(6, 3, activation="relu")),
    "Conv2D": ((8, 8, 2), lambda: L.Conv2D(6, 3, activation="relu")),
    "DepthwiseConv2D": ((8, 8, 4), lambda: L.DepthwiseConv2D(3, activation="relu")),
    "SeparableConv2D": ((8, 8, 4), lambda: L.SeparableConv2D(6, 3, activation="relu")),
    "Conv2DTranspose": ((4, 4, 3), lambda: L.Conv2DTranspose(4, 3, activation="relu")),
    "Conv3D": ((4, 4, 4, 2), lambda: L.Conv3D(4, 3, activation="relu")),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_kind_exports_at_4_bits(kind, rng):
    shape, make = KINDS[kind]
    inputs = keras.Input(shape)
    layer = make()
    x = layer(inputs)
    model = keras.Model(inputs, L.Dense(3, name="head")(L.Flatten()(x)))
    policy = {"default": {"weight_bits": 4}, "layers": {"head": {"weight_bits": 8}}}
    with contextlib.ExitStack() as expected:  # keras_qx warnings are errors in the suite: assert each
        if kind in ("Conv2DTranspose", "Conv3D"):  # stored as int8 / float: trained at 8 bits
            expected.enter_context(pytest.warns(UserWarning, match="train at 8 bits"))
        if kind == "Conv3D":  # no integer CONV_3D kernel
            expected.enter_context(pytest.warns(UserWarning, match=r"run these layers in float.*conv3d \(Conv3D\)"))
        qat = qx.quantize(model, policy)
    x_train = rng.random((96, *shape)).astype("float32")
    qat.compile("adam", "mse")
    qat.fit(x_train, rng.random((96, 3)), epochs=2, verbose=0)
    tfl = qx.export_tflite(qat, x_train, verify=True, min_agreement=0.8)
    info = tfl.report.info
    assert tfl.report.mean_error_steps < 1.5, tfl.report.lines()
    # The kernel (not the 8-bit head) is stored as the cost model predicts.
    head_bytes = kernel_bytes(model.get_layer("head"), 8)
    file_kernels = sorted(w[3] for w in info.weights if len(w[2]) >= 2 and w[3] != head_bytes)
    assert sum(file_kernels) == kernel_bytes(layer, 4), (kind, info.weights)
    packed = {"Dense": 1, "Conv1D": 1, "Conv2D": 1, "DepthwiseConv2D": 1, "SeparableConv2D": 2}
    assert len(info.int4_tensors) == packed.get(kind, 0)  # the 8-bit head is never INT4
    assert info.fully_integer == (kind != "Conv3D")  # TFLite has no integer CONV_3D


OUTPUT_ONLY = {
    "Rescaling": lambda x: L.Rescaling(1 / 255.0, offset=-0.5)(x),
    "Normalization": lambda x: L.Normalization(mean=0.5, variance=0.1)(x),
    "BatchNormalization (standalone)": lambda x: L.BatchNormalization()(L.ReLU()(x)),
    "LayerNormalization": lambda x: L.LayerNormalization()(x),
    "Multiply": lambda x: L.Multiply()([x, L.Conv2D(4, 1)(x)]),
    "Subtract": lambda x: L.Subtract()([x, L.Conv2D(4, 1)(x)]),
    "Maximum": lambda x: L.Maximum()([x, L.Conv2D(4, 1)(x)]),
    "Minimum": lambda x: L.Minimum()([x, L.Conv2D(4, 1)(x)]),
}


@pytest.mark.parametrize("kind", sorted(OUTPUT_ONLY))
def test_output_only_layers_export_fully_integer(kind, rng):
    """Layers tfmot's registry lacks: quantized at their output, every op integer in TFLite."""
    inputs = keras.Input((8, 8, 4))
    x = OUTPUT_ONLY[kind](L.Conv2D(4, 3, padding="same")(inputs))
    model = keras.Model(inputs, L.Dense(3)(L.Flatten()(x)))
    _, tfl, _ = train_and_export(model, rng, min_agreement=0.8)
    assert tfl.report.info.fully_integer, tfl.report.info.ops
    assert tfl.report.mean_error_steps < 1.5 and tfl.report.max_error_steps <= 5


def test_densenet_transition_average_pool_keeps_its_input_scale(rng):
    """BN-ReLU-Conv-AveragePool into a Concatenate (DenseNet): TFLite's AVERAGE_POOL_2D needs
    equal input/output scales; with a quantizer of its own the conversion fails."""
    inputs = keras.Input((8, 8, 4))
    x = L.Conv2D(4, 3, padding="same")(inputs)
    x = L.AveragePooling2D(2)(L.Conv2D(4, 1, use_bias=False)(L.ReLU()(L.BatchNormalization()(x))))
    x = L.Concatenate()([x, L.Conv2D(4, 3, padding="same")(L.ReLU()(L.BatchNormalization()(x)))])
    model = keras.Model(inputs, L.Dense(3)(L.Flatten()(x)))
    _, tfl, _ = train_and_export(model, rng, min_agreement=0.0)
    assert tfl.report.info.fully_integer
    assert tfl.report.mean_error_steps < 1.5 and tfl.report.max_error_steps <= 5
