"""The one cost model: bytes a layer's parameters take in the exported TFLite file.

Shared by ``summary()``, the policy engine and the benchmarks. Kernels cost their bit
width rounded up to what the exporter really stores: INT4 (two values a byte) for layer
kinds the TFLite converter packs (Dense, Conv1D, Conv2D), otherwise a full int8 byte; a
layer kept float, or one TFLite keeps float (Conv3D), costs 4 bytes a value. Biases are int32 (4 bytes) in an integer model.

Example:
    >>> from keras_qx.cost import kernel_bytes
    >>> from keras_qx._compat import keras
    >>> d = keras.layers.Dense(64); d.build((None, 256))
    >>> kernel_bytes(d, 4), kernel_bytes(d, 8)
    (8192, 16384)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from keras_qx._compat import keras
from keras_qx.configs import kernel_kind

__all__ = ["storage_bits", "kernel_params", "bias_params", "kernel_bytes", "macs", "bops", "LayerCost",
           "layer_cost"]

FLOAT_BITS = 32


def storage_bits(layer, weight_bits: int | None) -> int:
    """Bits one kernel value of ``layer`` takes in the file at ``weight_bits`` (None: float)."""
    kind = kernel_kind(layer)
    if weight_bits is None or (kind is not None and not kind.integer_export):
        return FLOAT_BITS
    if kind is not None and kind.int4_export and weight_bits <= 4:
        return 4
    return 8


def kernel_params(layer) -> int:
    kind = kernel_kind(layer)
    if kind is None:
        return 0
    return sum(int(getattr(layer, attr).shape.num_elements()) for attr in kind.weight_attrs)


def bias_params(layer) -> int:
    bias = getattr(layer, "bias", None) if getattr(layer, "use_bias", False) else None
    return int(bias.shape.num_elements()) if bias is not None else 0


def kernel_bytes(layer, weight_bits: int | None) -> int:
    return math.ceil(kernel_params(layer) * storage_bits(layer, weight_bits) / 8)


def macs(layer) -> int:
    """Multiply-accumulates per sample: each kernel value is used once per output position
    (Dense: once; Conv: once per output pixel; depthwise: the same)."""
    if kernel_kind(layer) is None or isinstance(layer, keras.layers.Embedding):  # a lookup: no MACs
        return 0
    shape = layer.output_shape
    positions = 1
    for dim in shape[1:]:
        positions *= int(dim or 1)
    if isinstance(layer, keras.layers.EinsumDense):  # out / the kernel's own output dims
        kernel_spec, out_spec = layer.equation.split(",")[1].split("->")
        own = [int(d) for c, d in zip(kernel_spec, layer.kernel.shape) if c in out_spec]
        return kernel_params(layer) * positions // max(1, math.prod(own))
    return kernel_params(layer) * positions // int(shape[-1] or 1)


def bops(layer, weight_bits: int, activation_bits: int = 8) -> int:
    """Bit operations per sample (HAWQ-V3's BOPs): MACs x weight bits x activation bits."""
    return macs(layer) * weight_bits * activation_bits


@dataclass(frozen=True)
class LayerCost:
    name: str
    type: str
    weight_bits: int | None
    params: int
    kernel_bytes: int
    bias_bytes: int

    @property
    def bytes(self) -> int:
        return self.kernel_bytes + self.bias_bytes

    @property
    def float_bytes(self) -> int:
        return 4 * self.params


def layer_cost(layer, weight_bits: int | None) -> LayerCost:
    """Cost of ``layer`` (a float layer, built) with kernels at ``weight_bits``."""
    biases = bias_params(layer)
    return LayerCost(
        name=layer.name,
        type=type(layer).__name__,
        weight_bits=weight_bits,
        params=kernel_params(layer) + biases,
        kernel_bytes=kernel_bytes(layer, weight_bits),
        bias_bytes=4 * biases,
    )
