"""The one cost model: bytes a layer's parameters take in the exported TFLite file.

Shared by ``summary()``, the policy engine and the benchmarks. Kernels cost their bit
width rounded up to what the exporter really stores: INT2 (four values a byte) for 2-bit
kernels that become FULLY_CONNECTED (Dense, EinsumDense), INT4 (two values a byte) for layer
kinds the TFLite converter packs (Dense, Conv1D, Conv2D), otherwise a full int8 byte; a
layer kept float, or one TFLite keeps float (Conv3D), costs 4 bytes a value. Biases are int32 (4 bytes) in an integer model.

Example:
    >>> from keras_qx.quant.cost import kernel_bytes
    >>> from keras_qx._compat import keras
    >>> d = keras.layers.Dense(64); d.build((None, 256))
    >>> kernel_bytes(d, 2), kernel_bytes(d, 4), kernel_bytes(d, 8)
    (4096, 8192, 16384)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from keras_qx.quant.kinds import kernel_kind

__all__ = ["storage_bits", "kernel_params", "bias_params", "kernel_bytes", "total_kernel_bytes", "LayerCost",
           "layer_cost"]

FLOAT_BITS = 32


def storage_bits(layer, weight_bits: int | None) -> int:
    """Bits one kernel value of ``layer`` takes in the file at ``weight_bits`` (None: float)."""
    kind = kernel_kind(layer)
    if weight_bits is None or (kind is not None and not kind.integer_export):
        return FLOAT_BITS
    if kind is not None and kind.int2_export and weight_bits <= 2:
        return 2
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


def total_kernel_bytes(layers, weight_bits: int | None = 8) -> int:
    """Kernel bytes of ``layers`` all at ``weight_bits``: the uniform-int8 reference of budgets."""
    return sum(kernel_bytes(layer, weight_bits) for layer in layers)


@dataclass(frozen=True)
class LayerCost:
    name: str
    type: str
    weight_bits: int | None
    params: int
    kernel_bytes: int
    bias_bytes: int
    storage_bits: int = 8  # bits one kernel value takes in the file (see :func:`storage_bits`)

    @property
    def stored_wider(self) -> bool:
        """The file stores this layer's kernel in more bits than it trained at (3-bit, or a 2-bit
        convolution, as INT4,
        or sub-8-bit as int8 where the converter packs nothing narrower)."""
        return bool(self.kernel_bytes) and self.weight_bits is not None and self.storage_bits > self.weight_bits

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
        storage_bits=storage_bits(layer, weight_bits),
    )
