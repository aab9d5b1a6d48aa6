"""keras_qx ``QuantizeConfig`` classes (the table of layer kinds is :mod:`keras_qx.quant.kinds`).

* :class:`KernelQuantizeConfig`: weights (any bit width 2..8) and activations of a layer
  with kernels (Dense, Conv1D/2D/3D, DepthwiseConv2D, SeparableConv, Conv2DTranspose).
* :class:`OutputQuantizeConfig`: quantize only the layer's output (Add, ReLU, pooling...).
* :class:`ActivationQuantizeConfig`: a ``keras.layers.Activation`` layer.
* :class:`NoOpQuantizeConfig`: leave the layer as it is.
* :class:`LSTMQuantizeConfig`: an ``LSTM``, which the converter fuses into one integer
  UNIDIRECTIONAL_SEQUENCE_LSTM: its kernels, per gate.
* :class:`KeptFloatQuantizeConfig`: a layer TFLite has no integer kernel for (GRU, SimpleRNN...):
  float inside, its output quantized so the layers after it stay integer.

Every config is registered under the ``keras_qx`` package, round-trips through
``get_config``/``from_config`` and compares with ``==``.

Example:
    >>> import keras_qx as qx
    >>> cfg = qx.configs.KernelQuantizeConfig(["kernel"], weight_bits=4)
    >>> qx.configs.KernelQuantizeConfig.from_config(cfg.get_config()) == cfg
    True
"""
from __future__ import annotations

from typing import Sequence

from keras_qx._compat import PACKAGE, keras, tfmot_quantize_config
from keras_qx.quant.quantizers import ActivationQuantizer, FixedRangeQuantizer, GateWeightQuantizer, WeightQuantizer

__all__ = [
    "KernelQuantizeConfig",
    "OutputQuantizeConfig",
    "ActivationQuantizeConfig",
    "NoOpQuantizeConfig",
    "KeptFloatQuantizeConfig",
    "LSTMQuantizeConfig",
    "ALL_CONFIGS",
]

_L = keras.layers


class _Config(tfmot_quantize_config.QuantizeConfig):
    """Shared plumbing: equality by config, nested quantizers (de)serialized, and a
    quantize-nothing default for each part of tfmot's interface."""

    _quantizer_keys: tuple[str, ...] = ()

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in cls._quantizer_keys:
            if isinstance(config.get(key), dict):
                config[key] = keras.utils.deserialize_keras_object(config[key])
        return cls(**config)

    def _serialized(self, **quantizers):
        return {k: keras.utils.serialize_keras_object(q) for k, q in quantizers.items()}

    def __eq__(self, other):
        return type(other) is type(self) and other.get_config() == self.get_config()

    def __ne__(self, other):
        return not self == other

    def __repr__(self):
        return f"{type(self).__name__}({self.get_config()})"

    # Bits shown by summary(); None where the config does not quantize that part.
    weight_bits = None
    activation_bits = None


@keras.utils.register_keras_serializable(package=PACKAGE)
class KernelQuantizeConfig(_Config):
    """Quantize a layer's kernels and its activation.

    Args:
        weight_attrs: names of the kernel attributes (``["kernel"]``, ``["depthwise_kernel"]``).
        weight_bits / activation_bits: bit widths; ignored where a quantizer is passed.
        per_channel, channel_axis, full_range, pack: see :class:`~keras_qx.quant.quantizers.WeightQuantizer`.
        quantize_activation: fake-quantize the layer's fused activation output.
        weight_quantizer / activation_quantizer: explicit quantizers.
        pinned: which of ``"weight_bits"``/``"activation_bits"`` were set by the user
            (``qx.annotate``); a policy fills in the others.
    """

    _quantizer_keys = ("weight_quantizer", "activation_quantizer")

    def __init__(
        self,
        weight_attrs: Sequence[str],
        weight_bits: int = 8,
        activation_bits: int = 8,
        per_channel: bool = True,
        channel_axis: int = -1,
        quantize_activation: bool = True,
        weight_quantizer: WeightQuantizer | None = None,
        activation_quantizer: ActivationQuantizer | None = None,
        pinned: Sequence[str] = (),
        full_range: bool | None = None,
        pack: bool = True,
    ):
        self.weight_attrs = list(weight_attrs)
        self.weight_quantizer = weight_quantizer or WeightQuantizer(weight_bits, per_channel, channel_axis, full_range,
                                                                    pack)
        self.activation_quantizer = activation_quantizer or ActivationQuantizer(activation_bits)
        self.quantize_activation = bool(quantize_activation)
        self.pinned = list(pinned)

    @property
    def weight_bits(self):
        return self.weight_quantizer.bits

    @property
    def activation_bits(self):
        return self.activation_quantizer.bits if self.quantize_activation else None

    def get_weights_and_quantizers(self, layer):
        return [(getattr(layer, attr), self.weight_quantizer) for attr in self.weight_attrs]

    def get_activations_and_quantizers(self, layer):
        if not self.quantize_activation or not hasattr(layer, "activation"):
            return []
        return [(layer.activation, self.activation_quantizer)]

    def set_quantize_weights(self, layer, quantize_weights):
        if len(quantize_weights) != len(self.weight_attrs):
            raise ValueError(
                f"Layer {layer.name!r} expects {len(self.weight_attrs)} quantized weights "
                f"({self.weight_attrs}), got {len(quantize_weights)}."
            )
        for attr, weight in zip(self.weight_attrs, quantize_weights):
            setattr(layer, attr, weight)

    def set_quantize_activations(self, layer, quantize_activations):
        if quantize_activations:
            layer.activation = quantize_activations[0]

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {
            "weight_attrs": list(self.weight_attrs),
            "quantize_activation": self.quantize_activation,
            "pinned": list(self.pinned),
            **self._serialized(
                weight_quantizer=self.weight_quantizer, activation_quantizer=self.activation_quantizer
            ),
        }


@keras.utils.register_keras_serializable(package=PACKAGE)
class OutputQuantizeConfig(_Config):
    """Quantize only the output of a layer (Add, Concatenate, ReLU, pooling, BatchNorm...)."""

    _quantizer_keys = ("activation_quantizer",)

    def __init__(self, activation_bits: int = 8, activation_quantizer: ActivationQuantizer | None = None,
                 pinned: Sequence[str] = ()):
        self.activation_quantizer = activation_quantizer or ActivationQuantizer(activation_bits)
        self.pinned = list(pinned)

    @property
    def activation_bits(self):
        return self.activation_quantizer.bits

    def get_output_quantizers(self, layer):
        return [self.activation_quantizer]

    def get_config(self):
        return {"pinned": list(self.pinned), **self._serialized(activation_quantizer=self.activation_quantizer)}


# Activations whose TFLite int8 kernels have a fixed output grid: simulate exactly that grid
# (sigmoid/softmax: scale 1/256 from 0; tanh: 1/128 from -1); linear needs nothing.
FIXED_RANGES = {"sigmoid": (0.0, 255 / 256), "softmax": (0.0, 255 / 256), "tanh": (-1.0, 127 / 128)}


@keras.utils.register_keras_serializable(package=PACKAGE)
class ActivationQuantizeConfig(OutputQuantizeConfig):
    """A ``keras.layers.Activation`` (or ``Softmax``) layer: quantize its output on the learnt range, or on the
    fixed grid TFLite uses for sigmoid, softmax and tanh; linear is left alone."""

    def get_output_quantizers(self, layer):
        if isinstance(layer, _L.Softmax):
            name = "softmax"
        else:
            name = getattr(layer.activation, "__name__", type(layer.activation).__name__)
        if name == "linear":
            return []
        if name in FIXED_RANGES:
            return [FixedRangeQuantizer(*FIXED_RANGES[name])]
        return [self.activation_quantizer]


@keras.utils.register_keras_serializable(package=PACKAGE)
class NoOpQuantizeConfig(_Config):
    """Leave the layer untouched (its inputs/outputs stay as the neighbours make them)."""

    def __init__(self, pinned: Sequence[str] = ()):
        self.pinned = list(pinned)

    def get_config(self):
        return {"pinned": list(self.pinned)}


@keras.utils.register_keras_serializable(package=PACKAGE)
class KeptFloatQuantizeConfig(OutputQuantizeConfig):
    """A layer the TFLite runtime has no integer kernel for (recurrent layers, wrappers): its
    weights and internals stay float; only its output is quantized, so the next layer gets an
    int8 input. The exporter converts such a model without calibration data (which would
    quantize the layer's internals too), so the file runs it in float between DEQUANTIZE and
    QUANTIZE, with float32 input and output."""


@keras.utils.register_keras_serializable(package=PACKAGE)
class LSTMQuantizeConfig(_Config):
    """A ``keras.layers.LSTM``, which the TFLite converter fuses into one integer
    UNIDIRECTIONAL_SEQUENCE_LSTM: int8 weights with one scale per gate and matrix, int16 cell
    state, int8 input and output (measured, TF 2.21). QAT quantizes the kernel and the recurrent
    kernel per gate (:class:`GateWeightQuantizer`), as the file stores them.

    The output is left unrounded: the converter sets the LSTM's output scale (also its hidden
    state's) from the representative data over every time step, and a fake-quant op after a
    fused LSTM makes the conversion fail (measured); the cell's int16 arithmetic is not simulated
    either. Measured on MNIST-1D: the file's logits within 0.14 output steps of the QAT model's on
    average (bench/results/mnist1d.md); rounding the output on the model's own range did not help.

    Example:
        >>> LSTMQuantizeConfig(8).get_config()["weight_quantizer"]["config"]
        {'bits': 8, 'gates': 4}
    """

    _quantizer_keys = ("weight_quantizer",)

    def __init__(self, weight_bits: int = 8, weight_quantizer: GateWeightQuantizer | None = None,
                 pinned: Sequence[str] = ()):
        self.weight_quantizer = weight_quantizer or GateWeightQuantizer(weight_bits)
        self.pinned = list(pinned)

    @property
    def weight_bits(self):
        return self.weight_quantizer.bits

    def get_weights_and_quantizers(self, layer):
        return [(layer.cell.kernel, self.weight_quantizer), (layer.cell.recurrent_kernel, self.weight_quantizer)]

    def set_quantize_weights(self, layer, quantize_weights):
        layer.cell.kernel, layer.cell.recurrent_kernel = quantize_weights

    def get_config(self):
        return {"pinned": list(self.pinned), **self._serialized(weight_quantizer=self.weight_quantizer)}


ALL_CONFIGS = (KernelQuantizeConfig, OutputQuantizeConfig, ActivationQuantizeConfig, NoOpQuantizeConfig,
               KeptFloatQuantizeConfig, LSTMQuantizeConfig)

