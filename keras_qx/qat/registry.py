"""The quantize registry and scheme that apply a resolved policy inside tfmot's ``quantize_apply``.

:class:`PolicyQuantizeRegistry` answers tfmot's two questions for each layer,
``supports(layer)`` and ``get_quantize_config(layer)``, from a table of
:class:`~keras_qx.quant.policy.LayerSpec` by layer name. :class:`PolicyQuantizeScheme` pairs it
with tfmot's default layout transforms (Conv+BatchNorm+ReLU folding, input quantization,
SeparableConv splitting), except those that would hard-code 8-bit configs or drop a
kernel's quantizer; those are replaced here by policy-aware versions.

Example:
    >>> import keras_qx as qx
    >>> reg = qx.registry.PolicyQuantizeRegistry({})
    >>> reg.config_for("d", qx._compat.keras.layers.Dense).weight_bits
    8
"""
from __future__ import annotations

import collections
from typing import Mapping

import numpy as np

from keras_qx._compat import (
    default_8bit_quantize_configs,
    default_8bit_quantize_layout_transform,
    default_8bit_transforms as t8,
    keras,
    model_transformer,
    quantize_layer,
    tfmot_quantize_registry,
    tfmot_quantize_scheme,
    tfmot_layer_quantize_map,
    has_custom_quantize_config,
)
from keras_qx.quant.configs import (
    ActivationQuantizeConfig,
    KeptFloatQuantizeConfig,
    LSTMQuantizeConfig,
    KernelQuantizeConfig,
    NoOpQuantizeConfig,
    OutputQuantizeConfig,
)
from keras_qx.quant.kinds import FLOAT, QUANTIZED, REFUSED, kernel_kind, treatment
from keras_qx.quant.policy import LayerSpec
from keras_qx.quant.quantizers import InputGridQuantizer, TopClampQuantizer, full_range_for
from keras_qx.rewrite.scale_shift import ScaleShiftBatchNormalization, ScaleShiftNormalization, exports_as_scale_shift
from keras_qx.rewrite.tfop import INDEX_OPS, VALUE_PRESERVING, TFOp

__all__ = ["PolicyQuantizeRegistry", "PolicyQuantizeScheme", "DEPTHWISE_SUFFIX"]

_L = keras.layers
DEPTHWISE_SUFFIX = "_depthwise"  # name of the depthwise half of a split SeparableConv2D

# Layers of tf_keras.applications modules (not in keras.layers), by class name: True means
# quantize the output (LayerScale: x * gamma; CustomScaleLayer), False leave alone
# (StochasticDepth: identity at inference). The standard layers' treatments are the table
# keras_qx.quant.kinds.TREATMENTS.
_BY_NAME = {"LayerScale": True, "StochasticDepth": False,
            "CustomScaleLayer": True}  # InceptionResNetV2: a + b * scale
_TFMOT_INFO = tfmot_layer_quantize_map()


def _tfmot_info(cls):
    for base in cls.__mro__:
        if base in _TFMOT_INFO:
            return _TFMOT_INFO[base]
    return None


def _layer_class(class_name: str):
    if class_name == "QuantizeLayer":
        return quantize_layer.QuantizeLayer
    cls = getattr(_L, class_name, None)
    if cls is None:
        cls = keras.utils.get_registered_object(class_name)
    return cls if isinstance(cls, type) else None


class PolicyQuantizeRegistry(tfmot_quantize_registry.QuantizeRegistry):
    """tfmot registry giving each layer the keras_qx config its :class:`LayerSpec` asks for.

    Args:
        specs: ``{layer_name: LayerSpec}``; names not in it get ``default``.
        default: the spec for layers created during the transforms.
    """

    def __init__(self, specs: Mapping[str, LayerSpec], default: LayerSpec | None = None):
        self.specs = dict(specs)
        self.default = default or LayerSpec()

    def spec(self, name: str) -> LayerSpec:
        if name in self.specs:
            return self.specs[name]
        if name.endswith(DEPTHWISE_SUFFIX) and name[: -len(DEPTHWISE_SUFFIX)] in self.specs:
            return self.specs[name[: -len(DEPTHWISE_SUFFIX)]]
        return self.default

    def supports_class(self, cls) -> bool:
        """A config exists for ``cls`` (refused classes have none: ``qx.quantize`` refuses them
        before asking)."""
        known = treatment(cls)
        if known is not None:
            return known.kind != REFUSED
        return bool(issubclass(cls, TFOp) or cls.__name__ in _BY_NAME or _tfmot_info(cls) is not None)

    def config_for(self, name: str, cls, quantize_activation: bool = True, symbol: str | None = None):
        """The config of layer ``name`` of class ``cls`` (``quantize_activation=False``:
        its output is quantized further on, e.g. by a fused ReLU; ``symbol``: a TFOp's op)."""
        spec = self.spec(name)
        known = treatment(cls)
        if known is not None and known.kind == FLOAT:
            return KeptFloatQuantizeConfig(spec.activation_bits)
        if issubclass(cls, _L.LSTM):
            return LSTMQuantizeConfig(spec.weight_bits)
        kind = kernel_kind(cls)
        if kind is not None:
            return KernelQuantizeConfig(
                list(kind.weight_attrs),
                weight_bits=spec.weight_bits,
                activation_bits=spec.activation_bits,
                per_channel=kind.per_channel,
                channel_axis=kind.channel_axis,
                quantize_activation=quantize_activation,
                full_range=full_range_for(spec.weight_bits, kind.int2_export),
                pack=spec.pack,
            )
        if quantize_activation and known is not None and known.kind == QUANTIZED and not known.quantize_output:
            return input_grid_config(spec.activation_bits, ties="away")  # same-scale pooling: AVERAGE_POOL_2D
        if not quantize_activation or (known is not None and not (known.kind == QUANTIZED and known.quantize_output)):
            return NoOpQuantizeConfig()  # pass-through, identity
        if issubclass(cls, (_L.Activation, _L.Softmax)):
            return ActivationQuantizeConfig(spec.activation_bits)
        if known is not None:
            return OutputQuantizeConfig(spec.activation_bits)
        if cls.__name__ in _BY_NAME:
            return OutputQuantizeConfig(spec.activation_bits) if _BY_NAME[cls.__name__] else NoOpQuantizeConfig()
        if issubclass(cls, TFOp):
            return (NoOpQuantizeConfig() if symbol in VALUE_PRESERVING or symbol in INDEX_OPS
                    else OutputQuantizeConfig(spec.activation_bits))
        info = _tfmot_info(cls)
        if info is not None and getattr(info, "quantize_output", False):
            return OutputQuantizeConfig(spec.activation_bits)
        return NoOpQuantizeConfig()

    # tfmot's interface ---------------------------------------------------------------
    def supports(self, layer) -> bool:
        return self.supports_class(type(layer))

    def get_quantize_config(self, layer):
        if not self.supports(layer):
            raise ValueError(
                f"keras_qx has no quantize config for layer {layer.name!r} ({type(layer).__name__}). "
                f"Keep it float with policy layers {{{layer.name!r}: {{'quantize': false}}}}."
            )
        config = self.config_for(layer.name, type(layer), symbol=getattr(layer, "symbol", None))
        if type(config) is OutputQuantizeConfig and squeezes_onto_input_grid(layer):
            return input_grid_config(self.spec(layer.name).activation_bits, ties="even")  # XNNPACK's MEAN
        if type(config) is OutputQuantizeConfig and getattr(layer, "symbol", None) == "math.rsqrt":
            # rsqrt of 0 (a variance on its zero point) is inf: the runtime answers its range's top
            return OutputQuantizeConfig(activation_quantizer=TopClampQuantizer(config.activation_bits))
        return config


def input_grid_config(activation_bits: int | None = 8, ties: str = "up"):
    """The output on its input's grid (:class:`~keras_qx.quant.quantizers.InputGridQuantizer`,
    whose bits are the input's, halfway averages rounded by ``ties``): for ops the runtime
    computes onto their input's scale."""
    return OutputQuantizeConfig(activation_quantizer=InputGridQuantizer(ties))


def squeezes_onto_input_grid(layer) -> bool:
    """A squeeze-excite squeeze: a ``GlobalAveragePooling2D`` with ``keepdims=True``, or whose
    every consumer is a ``Reshape`` (EfficientNet's ``se_squeeze`` -> ``se_reshape``). Its int8
    MEAN then has its input's scale: the built-in kernel rounds it to nearest as XNNPACK does,
    where on a scale of its own it rounds the zero-point term apart (one step up on ~13% of
    values, tests/test_runtime_rounding.py). A classifier head's pooling keeps its own range."""
    if not isinstance(layer, _L.GlobalAveragePooling2D):
        return False
    if getattr(layer, "keepdims", False):
        return True
    consumers = [node.outbound_layer for node in getattr(layer, "_outbound_nodes", [])]
    return bool(consumers) and all(isinstance(c, _L.Reshape) for c in consumers)


class _KernelReLU(t8.LayerReLUQuantize):
    """Conv/Dense/Add followed by ReLU: keep the kernel's weight quantizer, drop only its
    output quantizer (tfmot's version drops both, losing the layer's bit width)."""

    def __init__(self, registry: PolicyQuantizeRegistry):
        self.registry = registry

    def replacement(self, match_layer):
        node = match_layer.input_layers[0]
        if node.metadata.get("quantize_config") is None:
            cls = _layer_class(node.layer["class_name"])
            node.metadata["quantize_config"] = (
                self.registry.config_for(node.layer["config"]["name"], cls, quantize_activation=False,
                                         symbol=node.layer["config"].get("symbol"))
                if cls is not None
                else default_8bit_quantize_configs.NoOpQuantizeConfig()
            )
        return match_layer


class _KernelReLUActivation(_KernelReLU):
    pattern = t8.LayerReluActivationQuantize.pattern


_SCALE_SHIFT_CLASSES = {"BatchNormalization": ScaleShiftBatchNormalization, "Normalization": ScaleShiftNormalization}
_SCALE_SHIFT_NAMES = {k: "keras_qx>" + c.__name__ for k, c in _SCALE_SHIFT_CLASSES.items()}
_SCALE_SHIFT = _SCALE_SHIFT_NAMES["BatchNormalization"]


class _StandaloneBatchNorm(t8.transforms.Transform):
    """A BatchNormalization that the Conv/Dense + BatchNorm transforms above did not fold (they
    set its quantize_config; so does a user's annotation), or a Normalization, becomes its
    :mod:`~keras_qx.rewrite.scale_shift` subclass: one integer op in the file, with the single output
    rounding the simulation has (scale_shift.py says why). The pattern has no inputs: a
    feeding layer with other consumers (a residual Add) would prevent the match."""

    def pattern(self):
        return t8.LayerPattern("BatchNormalization|Normalization")

    def replacement(self, match_layer):
        if match_layer.metadata.get("quantize_config") is None and exports_as_scale_shift(match_layer.layer["config"]):
            match_layer.layer["class_name"] = _SCALE_SHIFT_NAMES[match_layer.layer["class_name"]]
        return match_layer

    def custom_objects(self):
        return {_SCALE_SHIFT_NAMES[k]: c for k, c in _SCALE_SHIFT_CLASSES.items()}


class _ScaleShiftReLU(_KernelReLU):
    """ScaleShiftBatchNormalization + ReLU: one fused op in the file, so quantize only after the ReLU."""

    def pattern(self):
        return t8.LayerPattern("ReLU", inputs=[t8.LayerPattern(_SCALE_SHIFT)])


class _ScaleShiftReLUActivation(_KernelReLU):
    def pattern(self):
        return t8.LayerPattern("Activation", config={"activation": "relu"}, inputs=[t8.LayerPattern(_SCALE_SHIFT)])


def _concat(base):
    class _Concat(base):
        """Concatenate: quantize once after the concat, with configs from the policy."""

        def __init__(self, registry: PolicyQuantizeRegistry):
            self.registry = registry

        def replacement(self, match_layer):
            feed_configs = []
            for feed in match_layer.input_layers:
                config = feed.metadata.get("quantize_config")
                if config is None:
                    cls = _layer_class(feed.layer["class_name"])
                    if cls is None:
                        return match_layer
                    if cls is quantize_layer.QuantizeLayer:
                        feed.metadata["quantizer"] = None
                        continue
                    if issubclass(cls, _L.Concatenate):
                        feed.metadata["quantize_config"] = NoOpQuantizeConfig()
                        continue
                    if not self.registry.supports_class(cls):
                        return match_layer
                    config = self.registry.config_for(feed.layer["config"]["name"], cls, False,
                                                      symbol=feed.layer["config"].get("symbol"))
                    feed.metadata["quantize_config"] = config
                feed_configs.append(config)
            for config in feed_configs:
                if isinstance(config, KernelQuantizeConfig):
                    config.quantize_activation = False
                else:
                    self._disable_output_quantize(config)
            if match_layer.metadata.get("quantize_config") is None:
                name = match_layer.layer["config"]["name"]
                match_layer.metadata["quantize_config"] = OutputQuantizeConfig(
                    self.registry.spec(name).activation_bits
                )
            return match_layer

    _Concat.__name__ = "Policy" + base.__name__
    return _Concat


class _SeparableConv(t8.SeparableConvQuantize):
    """Split SeparableConv2D as tfmot does, but name the halves after the original layer
    (``<name>_depthwise`` and ``<name>``) so the policy and the summary still find them."""

    def replacement(self, match_layer):
        if has_custom_quantize_config(match_layer):
            return match_layer
        name = match_layer.layer["config"]["name"]
        conv = super().replacement(match_layer)
        conv.layer["config"]["name"] = conv.layer["name"] = name
        dconv = conv.input_layers[0]
        dconv.layer["config"]["name"] = dconv.layer["name"] = name + DEPTHWISE_SUFFIX
        return conv


class _FloatInputQuantize(t8.InputLayerQuantize):
    """Quantize model inputs, but only float ones: integer inputs (token ids feeding an
    Embedding) pass through as they are."""

    def replacement(self, match_layer):
        dtype = match_layer.layer["config"].get("dtype") or "float32"
        if not str(dtype).startswith(("float", "bfloat")):
            return match_layer
        return super().replacement(match_layer)


class PolicyLayoutTransform(default_8bit_quantize_layout_transform.Default8BitQuantizeLayoutTransform):
    """tfmot's default transforms with the policy-aware replacements above."""

    def __init__(self, registry: PolicyQuantizeRegistry):
        self.registry = registry

    def apply(self, model, layer_quantize_map):
        r = self.registry
        transforms = [
            _FloatInputQuantize(),
            # (not tfmot's SeparableConv1DQuantize: its Lambda layers fail safe-mode
            # deserialization; a SeparableConv1D is quantized whole, both kernels)
            _SeparableConv(),
            t8.Conv2DReshapeBatchNormReLUQuantize(),
            t8.Conv2DReshapeBatchNormActivationQuantize(),
            t8.Conv2DBatchNormReLUQuantize(),
            t8.Conv2DBatchNormActivationQuantize(),
            t8.Conv2DReshapeBatchNormQuantize(),
            t8.Conv2DBatchNormQuantize(),
            _concat(t8.ConcatTransform6Inputs)(r),
            _concat(t8.ConcatTransform5Inputs)(r),
            _concat(t8.ConcatTransform4Inputs)(r),
            _concat(t8.ConcatTransform3Inputs)(r),
            _concat(t8.ConcatTransform)(r),
            t8.DenseBatchNormQuantize(),
            t8.DenseBatchNormReLUQuantize(),
            t8.DenseBatchNormActivationQuantize(),
            _StandaloneBatchNorm(),
            _KernelReLU(r),
            _KernelReLUActivation(r),
            _ScaleShiftReLU(r),
            _ScaleShiftReLUActivation(r),
        ]
        return _ReferencingTransformer(
            model, transforms, set(layer_quantize_map.keys()), layer_quantize_map
        ).transform()


class _ReferencingTransformer(model_transformer.ModelTransformer):
    """tfmot's ``ModelTransformer`` holding each layer's weight variables while it rebuilds the
    model, not numpy copies of them: tfmot's takes two copies of every weight (a map by name and
    one by position) next to the old and the new model (measured: peak memory 6.5 float copies of
    the weights in ``qx.quantize`` on the 108 M encoder of bench/scale.py). A transform reading a
    weight gets a :class:`_WeightRef`, which numpy reads as an array; the new model's weights are
    set from them one layer at a time."""

    def _get_keras_layer_weights(self, keras_layer):
        weights = collections.OrderedDict((self._weight_name(w.name), _WeightRef(w)) for w in keras_layer.weights)
        return weights if len(weights) == len(keras_layer.weights) else None

    def _get_keras_layer_names_and_weights(self, keras_layer):
        return [(w.name, _WeightRef(w)) for w in keras_layer.weights]


class _WeightRef:
    """A weight variable as tfmot's transformer uses a numpy weight: read as an array when asked
    (``np.asarray``, ``==``), shared, not copied, when its layer node is copied."""

    def __init__(self, variable):
        self.variable = variable
        self.shape, self.dtype = tuple(variable.shape), variable.dtype.as_numpy_dtype

    def __array__(self, dtype=None, copy=None):
        value = np.asarray(self.variable.numpy())  # a scalar variable reads as a numpy scalar
        return value if dtype is None else value.astype(dtype)

    def __eq__(self, other):
        return np.asarray(self) == np.asarray(other)

    __hash__ = None

    def __deepcopy__(self, memo):
        return self


class PolicyQuantizeScheme(tfmot_quantize_scheme.QuantizeScheme):
    """A tfmot ``QuantizeScheme`` whose bit widths come from a resolved policy."""

    def __init__(self, registry: PolicyQuantizeRegistry):
        self.registry = registry

    def get_layout_transformer(self):
        return PolicyLayoutTransform(self.registry)

    def get_quantize_registry(self):
        return self.registry
