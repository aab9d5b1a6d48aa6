"""``qx.annotate``: set a layer's bits where the layer is defined.

Example:
    >>> import tf_keras as keras, keras_qx as qx
    >>> inputs = keras.Input((8,))
    >>> x = qx.annotate(keras.layers.Dense(16, activation="relu"), weight_bits=4)(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(2)(x))
    >>> qat = qx.quantize(model)        # the first Dense trains at 4 bits, the rest at 8
"""
from __future__ import annotations

from keras_qx._compat import keras, quantize_annotate, quantize_wrapper
from keras_qx.quant.configs import (
    ActivationQuantizeConfig,
    KernelQuantizeConfig,
    LSTMQuantizeConfig,
    NoOpQuantizeConfig,
    OutputQuantizeConfig,
)
from keras_qx.quant.kinds import integer_lstm, kernel_kind
from keras_qx.quant.quantizers import ACTIVATION_BITS, check_bits, full_range_for

__all__ = ["annotate", "annotation_fields"]


def annotate(layer, weight_bits: int | None = None, activation_bits: int | None = None,
             quantize: bool = True):
    """Wrap ``layer`` so that ``qx.quantize`` gives it these bits.

    Omitted bit widths come from the policy. ``quantize=False`` keeps the layer float.
    The result is tfmot's ``QuantizeAnnotate`` holding a keras_qx config, so it also saves
    with the float model and works with plain ``tfmot...quantize_apply``.

    Raises:
        TypeError/ValueError: for a non-layer, bits of the wrong type or range, or
            ``weight_bits`` on a layer without kernels.
    """
    if not isinstance(layer, keras.layers.Layer):
        raise TypeError(
            f"annotate() takes a tf_keras layer, got {type(layer).__module__}.{type(layer).__name__}. "
            "Build layers with `import tf_keras as keras`."
        )
    if isinstance(layer, quantize_annotate.QuantizeAnnotate):
        raise ValueError(f"layer {layer.name!r} is already annotated; annotate the inner layer once.")
    if not isinstance(quantize, bool):
        raise TypeError(f"annotate(quantize=...) must be True or False, got {quantize!r}.")
    pinned = []
    if weight_bits is not None:
        weight_bits = check_bits(weight_bits, f"annotate({layer.name}): weight_bits")
        pinned.append("weight_bits")
    if activation_bits is not None:
        activation_bits = check_bits(activation_bits, f"annotate({layer.name}): activation_bits",
                                     ACTIVATION_BITS)
        pinned.append("activation_bits")
    kind = kernel_kind(layer)
    if not quantize:
        config = NoOpQuantizeConfig(pinned=["quantize"])
    elif kind is not None:
        config = KernelQuantizeConfig(
            list(kind.weight_attrs), weight_bits or 8, activation_bits or 8,
            per_channel=kind.per_channel, channel_axis=kind.channel_axis, pinned=pinned,
            full_range=full_range_for(weight_bits or 8, kind.int2_export),
        )
    elif integer_lstm(layer):
        if activation_bits is not None:
            raise ValueError(f"layer {layer.name!r} (LSTM): the converter sets an LSTM's output scale from the "
                             "representative data (int8); drop activation_bits.")
        config = LSTMQuantizeConfig(weight_bits or 8, pinned=pinned)
    elif weight_bits is not None:
        raise ValueError(
            f"layer {layer.name!r} ({type(layer).__name__}) has no kernels to quantize; "
            "drop weight_bits or annotate a Dense/Conv layer."
        )
    else:
        cls = ActivationQuantizeConfig if isinstance(layer, keras.layers.Activation) else OutputQuantizeConfig
        config = cls(activation_bits or 8, pinned=pinned)
    return quantize_annotate.QuantizeAnnotate(layer, quantize_config=config)


def annotation_fields(config) -> dict:
    """The policy fields a keras_qx annotation config pins (``{}`` for foreign configs)."""
    pinned = getattr(config, "pinned", None)
    if pinned is None:
        return {}
    fields = {}
    if "quantize" in pinned:
        fields["quantize"] = False
    if "weight_bits" in pinned:
        fields["weight_bits"] = config.weight_bits
    if "activation_bits" in pinned:
        fields["activation_bits"] = config.activation_bits
    return fields


# tfmot's wrappers, made to act as the layer they wrap in two things tfmot leaves out (both met
# with standard layers in position, tests/test_in_position.py):
# * masks: a wrapper's ``call(**kwargs)`` makes Keras pass it the mask of a masked input
#   (after Masking, Embedding(mask_zero=True)), which it forwards to a layer whose ``call``
#   takes none (Flatten, Conv1D: "TypeError: call() got an unexpected keyword argument 'mask'");
#   and the wrapper dropped the mask its layer passes on. Now the mask reaches the inner
#   layer only if its ``call`` takes one, and the wrapper's output mask is the inner layer's.
# * activity regularization (ActivityRegularization, ``activity_regularizer=``): the wrapper
#   runs its layer's ``call``, not ``__call__``, so the layer never added its loss in training
#   and ``fit`` met the symbolic loss left from building the model ("tensor ... is out of scope
#   and cannot be used here"). Now the wrapper adds the layer's activity loss on each call.
def _annotate_call(original):
    def call(self, *args, **kwargs):
        if "mask" in kwargs and not self.layer._expects_mask_arg:
            kwargs.pop("mask")
        return original(self, *args, **kwargs)
    call._keras_qx = True
    return call


def _wrapper_call(original):
    def call(self, inputs, training=None, **kwargs):
        if "mask" in kwargs and not self.layer._expects_mask_arg:
            kwargs.pop("mask")
        outputs = original(self, inputs, training=training, **kwargs)
        if getattr(self.layer, "activity_regularizer", None) is not None:
            self.layer._handle_activity_regularization(inputs, outputs)
        return outputs
    call._keras_qx = True
    return call


def _inner_mask(self, inputs, mask=None):
    return self.layer.compute_mask(inputs, mask) if self.layer.supports_masking else None


def _install_wrapper_fixes() -> None:
    """Patch tfmot's QuantizeAnnotate and QuantizeWrapper once (idempotent)."""
    for cls, patch in ((quantize_annotate.QuantizeAnnotate, _annotate_call),
                       (quantize_wrapper.QuantizeWrapper, _wrapper_call)):
        if not getattr(cls.__dict__["call"], "_keras_qx", False):
            cls.call = patch(cls.__dict__["call"])
        cls.compute_mask = _inner_mask


_install_wrapper_fixes()
