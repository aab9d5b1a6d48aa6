"""Users register configs for their own layer types with qx.register_layer."""
import pytest

import keras_qx as qx
from keras_qx._compat import keras, tf
from keras_qx.quant.kinds import kernel_kind


class MyDense(keras.layers.Layer):
    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape):
        self.kernel = self.add_weight("kernel", shape=(input_shape[-1], self.units))

    def call(self, x):
        return tf.matmul(x, self.kernel)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


class MyScale(keras.layers.Layer):
    def call(self, x):
        return x * 0.5 + 1.0


@pytest.fixture
def registered():
    from keras_qx.quant.kinds import unregister_layer

    qx.register_layer(MyDense, weight_attrs=["kernel"])
    qx.register_layer(MyScale)
    yield
    unregister_layer(MyDense)
    unregister_layer(MyScale)


def _model():
    inputs = keras.Input((12,))
    x = MyScale(name="scale")(MyDense(8, name="mine")(inputs))
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(keras.layers.ReLU()(x)))


def test_unregistered_custom_layer_with_its_own_kernel_stays_float_with_a_warning():
    """MyDense computes with its own add_weight kernel: not inlined, kept float, named, the fix
    given; MyScale (TF ops only) is inlined and quantized."""
    with pytest.warns(UserWarning, match="custom layer 'mine' .MyDense. whole and float.*register_layer"):
        qat = qx.quantize(_model())
    assert any(isinstance(l, MyDense) for l in qat.layers)  # unwrapped: float
    assert not any(isinstance(getattr(l, "layer", l), MyScale) for l in qat.layers)  # inlined into TF ops


@pytest.mark.slow
def test_registered_layers_quantize_and_export(registered, rng):
    model = _model()
    assert kernel_kind(model.get_layer("mine")).weight_attrs == ("kernel",)
    # Measured: the converter stores a custom tf.matmul kernel as int8 even after 4-bit QAT, so
    # unless registered with int4_export=True the layer trains at 8 bits, with a warning.
    with pytest.warns(UserWarning, match="mine"):
        qat = qx.quantize(model, {"layers": {"mine": {"weight_bits": 4}}})
    wrapped = {l.layer.name: l.quantize_config for l in qat.layers if hasattr(l, "quantize_config")}
    assert wrapped["mine"].weight_bits == 8 and wrapped["scale"].activation_bits == 8
    x = rng.random((64, 12)).astype("float32")
    qat.compile("adam", "mse")
    qat.fit(x, rng.random((64, 3)), epochs=2, verbose=0)
    tfl = qx.export_tflite(qat, x, min_agreement=0.8)
    assert tfl.report.info.fully_integer, tfl.report.info.ops
    assert tfl.report.mean_error_steps < 1.5
    from keras_qx.quant.cost import kernel_bytes

    kernel = [w for w in tfl.report.info.weights if w[2] == (8, 12)]  # tf.matmul -> FULLY_CONNECTED
    assert kernel and kernel[0][1] == "INT8" and kernel[0][3] == kernel_bytes(model.get_layer("mine"), 4)


def test_register_layer_rejects_non_layers():
    with pytest.raises(TypeError, match="Layer class"):
        qx.register_layer("MyDense")
