"""The one cost model: bytes a layer's parameters take in the exported TFLite file.

Shared by ``summary()``, the policy engine and the benchmarks. Kernels cost their bit
width rounded up to what the exporter really stores: INT2 (four values a byte) for 2-bit
kernels that become FULLY_CONNECTED (Dense, EinsumDense) and 2-bit Embedding tables, INT4 (two
values a byte) for layer kinds the TFLite converter packs (Dense, Conv1D, Conv2D) and 3-4-bit
Embedding tables (:mod:`keras_qx.lite.tables` packs them), otherwise a full int8 byte; a
layer kept float, or one TFLite keeps float (Conv3D), costs 4 bytes a value. Biases are int32 (4 bytes) in an integer model.

Downloads are gzip'd, and low-bit kernels compress far below their stored width, so the model
also predicts a kernel's gzip'd bytes (``size="gzip"``): it quantizes the float kernel in numpy on
the layer's weight grid, lays the integers out and packs them as the file stores them, and reads
deflate's output off the stored bytes' histogram (:func:`deflate_bytes`).

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
from typing import Iterable

import numpy as np

from keras_qx._compat import keras
from keras_qx.quant.kinds import IDENTITY, kernel_kind, treatment
from keras_qx.quant.quantizers import full_range_for, grid_integers, max_abs

__all__ = ["storage_bits", "kernel_params", "bias_params", "kernel_bytes", "total_kernel_bytes", "LayerCost",
           "layer_cost", "SIZES", "SIZE_UNITS", "check_size", "quantized_kernel", "kernel_values", "stored_kernel", "pack", "deflate_bytes",
           "kernel_gzip_bytes", "layer_size", "total_size", "GzipPrediction", "predict_gzip"]

SIZES = ("kernel", "gzip")  # what a size budget counts: stored kernel bytes, or their gzip'd bytes
SIZE_UNITS = {"kernel": "kernel bytes", "gzip": "gzip'd kernel bytes"}  # for messages

FLOAT_BITS = 32


def storage_bits(layer, weight_bits: int | None, pack: bool = True) -> int:
    """Bits one kernel value of ``layer`` takes in the file at ``weight_bits`` (None: float;
    ``pack=False``: a sub-byte kernel on an int8 carrier, the policy's ``"pack": false``)."""
    kind = kernel_kind(layer)
    if weight_bits is None or (kind is not None and not kind.integer_export):
        return FLOAT_BITS
    if not pack:
        return 8
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


def kernel_bytes(layer, weight_bits: int | None, pack: bool = True) -> int:
    return math.ceil(kernel_params(layer) * storage_bits(layer, weight_bits, pack) / 8)


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
    gzip_bytes: int | None = None  # predicted gzip'd kernel bytes (see :func:`kernel_gzip_bytes`)

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


def layer_cost(layer, weight_bits: int | None, values=None, pack: bool = True) -> LayerCost:
    """Cost of ``layer`` (a float layer, built) with kernels at ``weight_bits`` (``values``: its
    kernels' float values by attribute, where the layer does not hold them, as in a QAT model)."""
    biases = bias_params(layer)
    return LayerCost(
        name=layer.name,
        type=type(layer).__name__,
        weight_bits=weight_bits,
        params=kernel_params(layer) + biases,
        kernel_bytes=kernel_bytes(layer, weight_bits, pack),
        bias_bytes=4 * biases,
        storage_bits=storage_bits(layer, weight_bits, pack),
        gzip_bytes=kernel_gzip_bytes(layer, weight_bits, values, pack),
    )


def check_size(size: str) -> str:
    """``size`` if it is one of :data:`SIZES`, else a ValueError naming the choices."""
    if not isinstance(size, str) or size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)} (\"kernel\": kernel bytes as stored in the file; "
                         f"\"gzip\": their predicted gzip'd bytes), got {size!r}.")
    return size


# ---- gzip mode -----------------------------------------------------------------------------

def _grid(layer, attr: str) -> tuple[bool, int]:
    """(per_channel, channel_axis) of the weight quantizer of ``layer``'s kernel ``attr``: the
    kind's, except a SeparableConv2D, which keras_qx quantizes split into a DepthwiseConv2D and a
    1x1 Conv2D (keras_qx.qat.registry), each on its own kind's grid."""
    kind = kernel_kind(layer)
    if isinstance(layer, keras.layers.SeparableConv2D):
        kind = kernel_kind(keras.layers.DepthwiseConv2D if attr == "depthwise_kernel" else keras.layers.Conv2D)
    return kind.per_channel, kind.channel_axis


def quantized_kernel(values, bits: int, per_channel: bool = False, channel_axis: int = -1,
                     full_range: bool = False) -> np.ndarray:
    """Integers of ``values`` on the ``bits`` grid (int32), as
    :class:`~keras_qx.quant.quantizers.WeightQuantizer` quantizes them
    (:func:`~keras_qx.quant.quantizers.grid_integers`).

    Example:
        >>> quantized_kernel(np.array([[0.5, -1.0], [0.26, 0.1]]), 2).tolist()
        [[1, -1], [0, 0]]
    """
    return grid_integers(values, bits, per_channel, channel_axis, full_range)[0]


def _file_layout(layer, attr: str, values: np.ndarray) -> tuple[np.ndarray, int | None]:
    """``values`` in the TFLite file's layout (output channels first, as the converter transposes
    FULLY_CONNECTED/CONV_2D/TRANSPOSE_CONV filters; a depthwise filter keeps its channels last) and
    the axis of the file's per-channel scales (None: one scale)."""
    per_channel, axis = _grid(layer, attr)
    if getattr(kernel_kind(layer), "lookup_table", False):
        return values, None  # a GATHER / EMBEDDING_LOOKUP table: rows as the layer has them, one scale
    if attr == "depthwise_kernel":
        values = values.reshape(-1, values.shape[-2] * values.shape[-1])
        return values, (1 if isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)) else None)
    values = np.moveaxis(values, axis, 0) if values.ndim > 1 else values
    return values, (0 if per_channel else None)


def kernel_values(layer, attr: str, values=None) -> np.ndarray:
    """The float values (float32) of ``layer``'s kernel ``attr``: ``values[attr]`` if given, else
    the layer's. (Inside a QAT model the attribute holds a graph tensor; the wrapper has the
    variable: ``qx.summary`` passes it.)"""
    value = values[attr] if values is not None and attr in values else getattr(layer, attr)
    if not hasattr(value, "numpy") and not isinstance(value, np.ndarray):
        raise ValueError(f"layer {layer.name!r}: its {attr!r} is not a variable ({type(value).__name__}); pass "
                         f"its values (values={{{attr!r}: array}}).")
    return np.asarray(value, dtype=np.float32)


def stored_kernel(layer, attr: str, weight_bits: int, values=None, pack: bool = True) -> np.ndarray:
    """The integers the TFLite file stores for ``layer``'s kernel ``attr`` at ``weight_bits``, in
    file order: the weight quantizer's integers. A kernel under 4 bits reaches the converter on
    the INT4 grid of its own step (``WeightQuantizer._on_int4_grid``), so an INT4 or INT2 file
    holds those integers; otherwise the converter re-quantizes the fake-quantized kernel to the
    storage grid (2**(s-1) - 1 levels at :func:`storage_bits` s, one scale per file channel: a
    depthwise kernel quantized per tensor gets a scale per channel in the file)."""
    per_channel, axis = _grid(layer, attr)
    full = full_range_for(weight_bits, getattr(kernel_kind(layer), "int2_export", False))
    ints = quantized_kernel(kernel_values(layer, attr, values), weight_bits, per_channel, axis, full)
    file_values, file_axis = _file_layout(layer, attr, ints.astype(np.float32))
    if (weight_bits < 4 and storage_bits(layer, weight_bits) <= 4) or (not pack and weight_bits < 8):
        return file_values.astype(np.int32)  # the trained integers, packed or on the int8 carrier
    levels = 2 ** (storage_bits(layer, weight_bits) - 1) - 1
    bound = max_abs(file_values, file_axis)
    scale = np.where(bound > 0, bound / levels, 1.0)
    return np.clip(np.round(file_values / scale), -levels, levels).astype(np.int32)


def pack(values, bits: int) -> np.ndarray:
    """Signed integers as the file's bytes: ``8 // bits`` values a byte, the first in the low bits
    (INT4: low nibble first; INT2: bits 1:0 first), two's complement; 32: float32 bytes.

    Example:
        >>> pack(np.array([1, -1, 0]), 4).tolist()
        [241, 0]
    """
    values = np.asarray(values).ravel()
    if bits == FLOAT_BITS:
        return values.astype("<f4").view(np.uint8)
    if bits == 8:
        return values.astype(np.int8).view(np.uint8)
    per_byte = 8 // bits
    fields = (values.astype(np.int64) & ((1 << bits) - 1)).astype(np.uint8)
    fields = np.concatenate([fields, np.zeros((-fields.size) % per_byte, np.uint8)]).reshape(-1, per_byte)
    return np.bitwise_or.reduce(fields << (np.arange(per_byte, dtype=np.uint8) * bits), axis=1).astype(np.uint8)


# gzip -9's output bits per input byte as a function of the input's order-0 entropy h (bits per
# byte), for bytes drawn independently from their histogram: measured by bench/gzip_cost.py --fit
# on packed INT8/INT4/INT2 weight tensors (Gaussian, Laplace, Student-t and uniform weights, 0-97%
# zeros, 64 KiB each), fitted piecewise-linearly (rms error 2.7%). The knots 6.0-7.5 are smoothed
# by hand (fit: 6.126, 7.03, 7.03, 7.65): the synthetic tensors there are mostly sparse int8 ones,
# while dense trained int8 kernels (digits CNN, mnist1d_cnn, h 6.9-7.7) measure 1-2% over h. Below 8 bits deflate loses to
# the entropy (up to ~45%): its LZ77 matches cost ~20 bits each and are taken greedily, and
# Huffman codes are at least 1 bit a byte.
_ENTROPY = (0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0)
_DEFLATE = (0.013, 0.085, 0.155, 0.368, 0.715, 1.339, 1.971, 2.533, 3.121, 3.651, 4.22, 4.647, 5.193, 5.508,
            5.964, 6.2, 6.65, 7.07, 7.56, 8.03)


_pack = pack  # for functions whose ``pack`` argument (packed or on an int8 carrier) shadows it


def deflate_bytes(data) -> float:
    """Predicted gzip -9 bytes of ``data`` (uint8 array) from its byte histogram alone: the
    order-0 entropy, corrected by the measured curve of deflate's overhead at that entropy.

    Example:
        >>> round(deflate_bytes(np.random.default_rng(0).integers(0, 256, 65536).astype(np.uint8)) / 65536, 2)
        1.0
    """
    data = np.asarray(data, dtype=np.uint8).ravel()
    if not data.size:
        return 0.0
    counts = np.bincount(data, minlength=256)
    p = counts[counts > 0] / data.size
    entropy = float(-(p * np.log2(p)).sum())
    return data.size * float(np.interp(entropy, _ENTROPY, _DEFLATE)) / 8


def kernel_gzip_bytes(layer, weight_bits: int | None, values=None, pack: bool = True) -> int:
    """Predicted gzip'd bytes of ``layer``'s kernels in the file at ``weight_bits`` (None: float),
    from the layer's current weights (numpy only; cheap enough to call per layer per candidate).

    Example:
        >>> d = keras.layers.Dense(64); d.build((None, 256))
        >>> kernel_gzip_bytes(d, 4) < kernel_bytes(d, 4)
        True
    """
    kind = kernel_kind(layer)
    if kind is None:
        return 0
    bits = storage_bits(layer, weight_bits, pack)
    if storage_bits(layer, weight_bits) == 8:
        weight_bits = 8  # kinds stored only as int8 train at 8 bits (keras_qx.qat.quantize clamps them)
        pack = True
    total = 0.0
    for attr in kind.weight_attrs:
        if bits == FLOAT_BITS:
            stored = _pack(kernel_values(layer, attr, values), FLOAT_BITS)
        else:
            stored = _pack(stored_kernel(layer, attr, weight_bits, values, pack), bits)
        total += deflate_bytes(stored)
    return int(round(total))


def layer_size(layer, weight_bits: int | None, size: str = "kernel") -> int:
    """Kernel bytes of ``layer`` at ``weight_bits`` as a budget counts them: stored
    (``size="kernel"``) or predicted gzip'd (``size="gzip"``)."""
    return kernel_gzip_bytes(layer, weight_bits) if check_size(size) == "gzip" else kernel_bytes(layer, weight_bits)


def total_size(layers, weight_bits: int | None = 8, size: str = "kernel") -> int:
    """:func:`layer_size` summed over ``layers`` all at ``weight_bits``: the uniform-int8 reference
    of budgets in either size."""
    return sum(layer_size(layer, weight_bits, size) for layer in layers)


# Bytes gzip'd per item of what is not a kernel (bench/gzip_cost.py --fit: least squares on small
# models that are not in the validation table): a fixed part (header, metadata, signature), each
# op (tensors, names, activation scales), each nonzero int32 bias value (zeros, as in an
# untrained model or a folded BatchNorm's, cost next to nothing) and each output channel of a
# per-channel quantized kernel (a float32 scale for the filter and one for the bias; their int64
# zero points are zeros).
_FILE_FIXED, _PER_OP, _PER_BIAS, _PER_CHANNEL = 1103.0, 72.6, 1.28, 6.53


@dataclass(frozen=True)
class GzipPrediction:
    """Predicted gzip'd bytes of a whole exported file: ``kernels`` (by layer in ``layers``) and
    the rest (``biases``: int32 biases and per-channel scales; ``graph``: ops, tensors, names)."""

    kernels: int
    biases: int
    graph: int
    layers: dict

    @property
    def total(self) -> int:
        return self.kernels + self.biases + self.graph

    def to_dict(self) -> dict:
        return {"total": self.total, "kernels": self.kernels, "biases": self.biases, "graph": self.graph,
                "layers": dict(self.layers)}

    def table(self) -> str:
        """Predicted gzip'd bytes: the kernels per layer, then the rest."""
        lines = ["| part | predicted gzip'd bytes |", "|---|---|"]
        lines += [f"| {name} (kernel) | {int(v):,} |" for name, v in self.layers.items()]
        lines += [f"| biases and scales | {self.biases:,} |", f"| graph | {self.graph:,} |",
                  f"| **total** | **{self.total:,}** |"]
        return "\n".join(lines)


def _channels(layer) -> int:
    """Output channels with a scale of their own in the file (per-channel filters and their biases)."""
    kind, count = kernel_kind(layer), 0
    if kind is None or not kind.integer_export:
        return 0
    for attr in kind.weight_attrs:
        per_channel, axis = _grid(layer, attr)
        shape = getattr(layer, attr).shape
        if attr == "depthwise_kernel" and isinstance(layer, (keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)):
            count += int(shape[-2] * shape[-1])
        elif per_channel:
            count += int(shape[axis])
    return count


def _nonzero_biases(layer) -> int:
    bias = getattr(layer, "bias", None) if getattr(layer, "use_bias", False) else None
    return int(np.count_nonzero(np.asarray(bias))) if hasattr(bias, "numpy") else bias_params(layer)


_ONE_D = (keras.layers.Conv1D, keras.layers.DepthwiseConv1D, keras.layers.SeparableConv1D,
          keras.layers.MaxPooling1D, keras.layers.AveragePooling1D)


def _ops(layer) -> int:
    """Ops a layer becomes in the file, roughly: none for an input or an inference identity
    (Dropout...), three for a 1D convolution or pooling (EXPAND_DIMS, the 2D op, RESHAPE), else one."""
    if isinstance(layer, keras.layers.InputLayer) or getattr(treatment(layer), "kind", None) == IDENTITY:
        return 0
    return 3 if isinstance(layer, _ONE_D) else 1


def _non_kernel_features(layers) -> tuple[int, int, int]:
    """(ops, nonzero biases of kernel layers, per-channel channels) of a model's layers."""
    layers = list(layers)
    kernels = [l for l in layers if kernel_kind(l) is not None]
    return sum(_ops(l) for l in layers), sum(_nonzero_biases(l) for l in kernels), sum(_channels(l) for l in kernels)


def predict_gzip(layers: Iterable, bits) -> GzipPrediction:
    """Predicted gzip -9 bytes of the TFLite file of a model made of ``layers`` (all its layers,
    nested models inlined) with ``bits`` ``{layer name: weight bits or None (float)}`` for its
    kernel layers (missing: 8). Numpy only: no conversion.

    Example:
        >>> qx.cost.predict_gzip(model.layers, {"fc1": 4}).total      # doctest: +SKIP
    """
    layers = list(layers)
    per_layer, floats = {}, 0
    for layer in layers:
        if kernel_kind(layer) is None or isinstance(layer, keras.layers.InputLayer):
            continue
        b = bits.get(layer.name, 8)
        per_layer[layer.name] = kernel_gzip_bytes(layer, b)
        if b is None or not kernel_kind(layer).integer_export:
            floats += 4 * bias_params(layer)  # a float layer's float32 bias: next to incompressible
    count, nonzero, channels = _non_kernel_features(layers)
    biases = floats + _PER_BIAS * nonzero + _PER_CHANNEL * channels
    return GzipPrediction(sum(per_layer.values()), int(round(biases)), int(round(_FILE_FIXED + _PER_OP * count)),
                          per_layer)
