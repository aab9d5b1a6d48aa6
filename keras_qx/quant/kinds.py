"""What keras_qx knows about each layer type: which carry kernels and how they are stored, and
the layer classes users register with ``qx.register_layer``. This module owns that state.

Example:
    >>> from keras_qx._compat import keras
    >>> kernel_kind(keras.layers.Dense).int4_export
    True
"""
from __future__ import annotations

from dataclasses import dataclass

from keras_qx._compat import keras

__all__ = ["KernelKind", "kernel_kind", "register_layer", "unregister_layer", "custom_output"]

_L = keras.layers


@dataclass(frozen=True)
class KernelKind:
    """How a layer type's kernels are quantized and stored.

    ``int4_export`` says whether the TFLite converter packs this layer's kernel as INT4
    when its bits are <= 4 (measured on TF 2.21: FULLY_CONNECTED, CONV_2D, which Conv1D
    becomes, and DEPTHWISE_CONV_2D; TRANSPOSE_CONV refuses INT4); ``integer_export`` is False where TFLite has no integer kernel (CONV_3D: the
    converter keeps it float). Per-channel scales only where the converter accepts them
    (Conv2D, DepthwiseConv2D; Conv1D/Conv3D conversion fails with them).
    """

    layer_type: type
    weight_attrs: tuple[str, ...]
    per_channel: bool
    channel_axis: int = -1
    int4_export: bool = False
    integer_export: bool = True


# Ordered: subclasses before their bases (all are Conv subclasses; Conv2DTranspose is a Conv2D).
_KERNEL_KINDS = (
    KernelKind(_L.DepthwiseConv2D, ("depthwise_kernel",), per_channel=True, int4_export=True),
    # Split into DepthwiseConv2D + 1x1 Conv2D before quantization (keras_qx.qat.registry); both pack.
    KernelKind(_L.SeparableConv2D, ("depthwise_kernel", "pointwise_kernel"), per_channel=False,
               int4_export=True),
    KernelKind(_L.SeparableConv1D, ("depthwise_kernel", "pointwise_kernel"), per_channel=False),
    KernelKind(_L.Conv2DTranspose, ("kernel",), per_channel=False, channel_axis=-2),
    KernelKind(_L.Conv3DTranspose, ("kernel",), per_channel=False, channel_axis=-2),
    KernelKind(_L.Conv1DTranspose, ("kernel",), per_channel=False, channel_axis=-2),
    KernelKind(_L.Conv2D, ("kernel",), per_channel=True, int4_export=True),
    KernelKind(_L.Conv1D, ("kernel",), per_channel=False, int4_export=True),
    KernelKind(_L.Conv3D, ("kernel",), per_channel=False, integer_export=False),
    KernelKind(_L.Dense, ("kernel",), per_channel=False, int4_export=True),
    KernelKind(_L.EinsumDense, ("kernel",), per_channel=False, int4_export=True),
    KernelKind(_L.Embedding, ("embeddings",), per_channel=False, int4_export=False),
)


_CUSTOM_KINDS: list = []  # from keras_qx.qat.registry.register_layer; checked first


def kernel_kind(layer_or_type) -> KernelKind | None:
    """The :class:`KernelKind` of a layer (by isinstance), or None if it has no kernels."""
    cls = layer_or_type if isinstance(layer_or_type, type) else type(layer_or_type)
    for kind in (*_custom_kinds, *_KERNEL_KINDS):
        if issubclass(cls, kind.layer_type):
            return kind
    return None



# From register_layer; checked before the built-in kinds.
_custom_kinds: list[KernelKind] = []
_custom_output: dict[type, bool] = {}  # layer class -> quantize its output?


def register_layer(layer_type: type, weight_attrs=(), quantize_output: bool = True,
                   per_channel: bool = False, int4_export: bool = False) -> None:
    """Teach keras_qx how to quantize your own layer class.

    Args:
        layer_type: the class (subclasses are covered too).
        weight_attrs: attribute names of its kernels (e.g. ``["kernel"]``); they get the
            policy's weight bits, and count in the cost model.
        quantize_output: for a layer without kernels: quantize its output (arithmetic) or
            leave it alone (value-preserving ops such as reshapes).
        per_channel: per-output-channel kernel scales (last axis).
        int4_export: whether the converter packs its 4-bit kernels as INT4 (check with
            ``qx.inspect_tflite``); otherwise the cost model counts 8 bits.

    Example:
        >>> qx.register_layer(MyDense, weight_attrs=["kernel"])    # doctest: +SKIP
        >>> qx.register_layer(MyScale)                              # doctest: +SKIP
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, _L.Layer)):
        raise TypeError(f"register_layer takes a tf_keras Layer class, got {layer_type!r}.")
    weight_attrs = tuple(weight_attrs)
    unregister_layer(layer_type)
    if weight_attrs:
        _custom_kinds.insert(0, KernelKind(layer_type, weight_attrs, per_channel, -1, int4_export))
    else:
        _custom_output[layer_type] = bool(quantize_output)


def unregister_layer(layer_type: type) -> None:
    """Forget what :func:`register_layer` said about ``layer_type`` (no error if nothing)."""
    _custom_kinds[:] = [k for k in _custom_kinds if k.layer_type is not layer_type]
    _custom_output.pop(layer_type, None)


def custom_output(cls) -> bool | None:
    """For a registered kernel-less class (or subclass): quantize its output? None: not registered."""
    for base in cls.__mro__:
        if base in _custom_output:
            return _custom_output[base]
    return None
