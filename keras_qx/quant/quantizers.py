"""Fake-quantizers for weights and activations, on tfmot's ``Quantizer`` interface.

Weights are quantized symmetrically with a narrow range (``2**(b-1) - 1`` levels each
side of zero, the grid TFLite uses), per output channel where the op allows it.
Activations are quantized asymmetrically over a moving-average range. Both use
``tf.quantization.fake_quant_with_min_max_vars*`` through tfmot's ``quant_ops``, so the
TFLite converter recognises them, and both pass gradients straight through inside the
range.

Example:
    >>> import keras_qx as qx
    >>> q = qx.quantizers.get("w4")
    >>> q.bits, q.per_channel
    (4, True)
"""
from __future__ import annotations

import contextlib
import contextvars
import numbers
from typing import Any

import numpy as np

from keras_qx._compat import PACKAGE, keras, quant_ops, tf, tfmot_quantizers

__all__ = [
    "WEIGHT_BITS",
    "ACTIVATION_BITS",
    "WeightQuantizer",
    "SparseWeightQuantizer",
    "ClusterWeightQuantizer",
    "ActivationQuantizer",
    "FixedRangeQuantizer",
    "InputGridQuantizer",
    "TopClampQuantizer",
    "input_grid",
    "GateWeightQuantizer",
    "export_trace",
    "exporting",
    "full_range_for",
    "max_abs",
    "grid_integers",
    "grid_limits",
    "check_bits",
    "get",
    "serialize",
    "deserialize",
]

WEIGHT_BITS = range(2, 9)
ACTIVATION_BITS = range(2, 17)

_EXPORTING = contextvars.ContextVar("keras_qx_exporting", default=False)
_STAND_INS = contextvars.ContextVar("keras_qx_stand_ins", default={})


@contextlib.contextmanager
def export_trace(stand_ins=()):
    """While the exporter traces a model for the converter: quantizers that must not appear as
    fake-quant ops in the converted graph (:class:`GateWeightQuantizer`) give the converter what
    it needs instead; a :class:`WeightQuantizer` given one of the ``stand_ins`` variables
    quantizes a constant of its shape in its place (:meth:`WeightQuantizer._stand_in_value`;
    :mod:`keras_qx.lite.light` writes the integers into the file).

    The flags live in ``ContextVar``s: they hold in this thread (or asyncio task) for the block
    only, so a model trained or called elsewhere meanwhile is unaffected, and are reset on the
    way out, an exception included."""
    token = _EXPORTING.set(True)
    stand_in_token = _STAND_INS.set({id(v): i for i, v in enumerate(stand_ins)})
    try:
        yield
    finally:
        _STAND_INS.reset(stand_in_token)
        _EXPORTING.reset(token)


def exporting() -> bool:
    """Inside :func:`export_trace`, in this thread or task."""
    return _EXPORTING.get()


def max_abs(values: np.ndarray, axis: int | None) -> np.ndarray:
    """Largest magnitude of ``values``, per channel along ``axis`` (None: of all), keeping dims."""
    if axis is None:
        return np.max(np.abs(values), keepdims=True) if values.size else np.zeros((1,) * values.ndim)
    reduce = tuple(i for i in range(values.ndim) if i != axis % values.ndim)
    return np.max(np.abs(values), axis=reduce, keepdims=True)


def full_range_for(bits: int, int2_export: bool) -> bool:
    """Whether a kernel at ``bits`` trains on the two's-complement grid: 2-bit kernels of kinds
    whose file holds INT2 (``KernelKind.int2_export``); every other kernel is narrow range."""
    return bits == 2 and bool(int2_export)


def grid_limits(bits: int, full_range: bool = False) -> tuple[int, int]:
    """``(lowest, highest)`` integer of a ``bits``-bit weight grid: narrow ``-(2**(b-1) - 1)
    .. 2**(b-1) - 1``, or the two's-complement ``-2**(b-1) .. 2**(b-1) - 1`` (``full_range``).

    Example:
        >>> grid_limits(4), grid_limits(2, full_range=True)
        ((-7, 7), (-2, 1))
    """
    half = 2 ** (bits - 1)
    return (-half, half - 1) if full_range else (1 - half, half - 1)


def grid_integers(values, bits: int, per_channel: bool = False, channel_axis: int = -1,
                  full_range: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Numpy twin of :class:`WeightQuantizer` with its range at the values' largest magnitude
    (per channel along ``channel_axis`` if ``per_channel``): ``(integers (int32), step)``, the
    kernel it computes with being ``integers * step`` (step broadcastable against ``values``).
    Narrow range: ``-(2**(b-1) - 1) .. 2**(b-1) - 1`` at ``max|w| / (2**(b-1) - 1)``; full
    range: ``-2**(b-1) .. 2**(b-1) - 1`` at ``max|w| / 2**(b-1)``. In float32, step by step as
    ``tf.quantization.fake_quant_with_min_max_vars`` computes it, so ties round half up where
    QAT rounds them.

    Example:
        >>> grid_integers(np.array([[0.5, -1.0], [0.26, 0.1]]), 2)[0].tolist()
        [[1, -1], [0, 0]]
    """
    values = np.asarray(values, dtype=np.float32)
    half = 2 ** (bits - 1)
    bound = max_abs(values, channel_axis if per_channel else None).astype(np.float32)
    lowest, highest = grid_limits(bits, full_range)
    high = (bound * np.float32((half - 1) / half)).astype(np.float32) if full_range else bound
    step = np.where(bound > 0, (high + bound) / np.float32(highest - lowest), np.float32(1)).astype(np.float32)
    nudged_min = (np.float32(lowest) * step).astype(np.float32)
    nudged_max = (np.float32(highest) * step).astype(np.float32)
    shifted = (np.clip(values, nudged_min, nudged_max) - nudged_min).astype(np.float32)
    ints = (np.floor(shifted * (np.float32(1) / step) + np.float32(0.5)) + lowest).astype(np.int32)
    return ints, step


def check_bits(value: Any, what: str, allowed: range = WEIGHT_BITS) -> int:
    """Return ``value`` as an int if it is an integer bit width in ``allowed``, else raise."""
    floatish = value is None or (isinstance(value, numbers.Integral) and not isinstance(value, bool)
                                 and int(value) in (0, 16, 32))
    float_hint = " (to keep a layer float, set quantize to false instead)" if floatish and allowed == WEIGHT_BITS else ""
    if isinstance(value, str) and value.strip().isdigit():
        float_hint = f"; write the number {value.strip()} without quotes"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{what} must be an integer number of bits in {allowed.start}..{allowed.stop - 1}, "
            f"got {value!r} ({type(value).__name__}){float_hint}."
        )
    if int(value) not in allowed:
        raise ValueError(
            f"{what}={value} is out of range; use {allowed.start}..{allowed.stop - 1} bits{float_hint}."
        )
    return int(value)


class _Quantizer(tfmot_quantizers.Quantizer):
    """Equality by config, and the min/max range variables both quantizers keep."""

    @staticmethod
    def _range_vars(layer, name, shape=()):
        return {
            f"{end}_var": layer.add_weight(name + f"_{end}", shape=shape, trainable=False,
                                           initializer=keras.initializers.Constant(sign * 6.0))
            for end, sign in (("min", -1), ("max", 1))
        }

    def __eq__(self, other):
        return type(other) is type(self) and other.get_config() == self.get_config()

    def __ne__(self, other):
        return not self == other


@keras.utils.register_keras_serializable(package=PACKAGE)
class WeightQuantizer(_Quantizer):
    """Symmetric, narrow-range weight quantizer of ``bits`` bits (2..8).

    Args:
        bits: bit width; 4 and below export as packed INT4 for Dense and Conv2D, and 2-bit
            FULLY_CONNECTED kernels as INT2 (:mod:`keras_qx.lite.int2`).
        per_channel: one scale per output channel (``channel_axis``) instead of one per tensor.
        channel_axis: axis of the output channels in the kernel (-1 for Dense/Conv,
            -2 for Conv2DTranspose).
        full_range: the two's-complement grid ``{-2**(b-1), ..., 2**(b-1) - 1} * s`` with
            ``s = max|w| / 2**(b-1)`` (2 bits: ``{-2, -1, 0, 1} * s``, the INT2 range; the
            positive tail clips at ``s``) instead of the narrow ``{-(2**(b-1) - 1), ..., 2**(b-1) - 1}
            * max|w| / (2**(b-1) - 1)`` (2 bits: ``{-1, 0, 1} * max|w|``). Only for 2 and 3 bits;
            None: True at 2 bits, else False. ``qx.quantize`` uses it at 2 bits for kernels that
            become FULLY_CONNECTED (Dense, EinsumDense; bench/results/int2.md: MNIST-1D CNN with a
            2-bit fc1 94% against 77% on the narrow grid) and keeps the narrow grid elsewhere.
        pack: store a kernel under 8 bits packed (INT4, INT2) where the runtime takes it (True),
            or on an int8 carrier (False: the trained integers at the same step, int8 bytes, and
            int8 speed where the packed kernel is slow, e.g. INT4 convolutions, which XNNPACK
            does not take; the policy's ``"pack": false``).

    Example:
        >>> q = WeightQuantizer(4)
        >>> q.get_config()["bits"], WeightQuantizer(2).full_range
        (4, True)
    """

    def __init__(self, bits: int = 8, per_channel: bool = True, channel_axis: int = -1, full_range: bool | None = None,
                 pack: bool = True):
        self.bits = check_bits(bits, "weight bits")
        if not isinstance(pack, bool):
            raise TypeError(f"WeightQuantizer(pack=...) must be True or False, got {pack!r}.")
        self.pack = pack
        self.per_channel = bool(per_channel)
        self.channel_axis = int(channel_axis)
        self.full_range = self.bits == 2 if full_range is None else bool(full_range)
        if self.full_range and self.bits > 3:
            raise ValueError(f"WeightQuantizer(full_range=True) is for 2 and 3 bits (the file holds them on the INT4 "
                             f"grid), got bits={self.bits}; use full_range=False.")

    @classmethod
    def from_config(cls, config):
        # Configs saved before full_range existed trained on the narrow grid.
        return cls(**{"full_range": False, **config})

    def range_for(self, bound):
        """``(min, max)`` of the range variables for kernels whose largest magnitude is ``bound``."""
        if not self.full_range:
            return -bound, bound
        half = 2 ** (self.bits - 1)
        return -bound, bound * (half - 1) / half

    def step_for(self, low, high):
        """The grid step of range variables ``(low, high)`` (arrays for per-channel ranges)."""
        if self.full_range:
            return (high - low) / (2 ** self.bits - 1)
        return np.maximum(np.abs(low), np.abs(high)) / (2 ** (self.bits - 1) - 1)

    def build(self, tensor_shape, name, layer):
        from keras_qx.quant.kinds import kernel_kind  # kinds imports nothing of keras_qx; imported late all the same

        kind = kernel_kind(getattr(layer, "layer", layer))  # tfmot passes its wrapper
        self._lookup_table = bool(kind is not None and kind.lookup_table)
        shape = (int(tensor_shape[self.channel_axis]),) if self.per_channel else ()
        return self._range_vars(layer, name, shape)

    def bound(self, value):
        """The symmetric range bound its range variables start at for weights ``value``: the
        largest magnitude, per channel or per tensor."""
        if not self.per_channel:
            return tf.reduce_max(tf.abs(value))
        axis = self.channel_axis % value.shape.rank
        return tf.reduce_max(tf.abs(value), axis=[i for i in range(value.shape.rank) if i != axis])

    def _perm(self, rank: int):
        axis = self.channel_axis % rank
        if not self.per_channel or axis == rank - 1:
            return None
        perm = list(range(rank))
        perm[axis], perm[-1] = perm[-1], perm[axis]
        return perm

    def __call__(self, inputs, training, weights, **kwargs):
        stand_in = _STAND_INS.get().get(id(inputs)) if exporting() else None
        if stand_in is not None:  # a Fill: no weight data in the graph
            inputs = tf.fill(inputs.shape, self._stand_in_value(stand_in, weights))
        perm = self._perm(inputs.shape.rank)
        x = tf.transpose(inputs, perm) if perm else inputs
        shape = x.shape
        if self.per_channel and shape.rank not in (2, 4):  # tfmot handles rank 2 and 4 only
            x = tf.reshape(x, (1, 1, -1, shape[-1]))
        if exporting() and self.bits < 8 and (getattr(self, "_lookup_table", False) or not self.pack):
            x = self._on_int4_grid(x, weights, carrier_bits=8)
        elif exporting() and self.bits < 4:
            x = self._on_int4_grid(x, weights)
        elif self.full_range:
            x = self._full_range(x, training, weights)
        else:
            x = quant_ops.LastValueQuantize(
                x,
                weights["min_var"],
                weights["max_var"],
                is_training=training,
                num_bits=self.bits,
                per_channel=self.per_channel,
                symmetric=True,
                narrow_range=True,
            )
        if x.shape.rank != shape.rank:
            x = tf.reshape(x, shape)
        return tf.transpose(x, perm) if perm else x

    def _stand_in_value(self, index: int, weights):
        """The value the ``index``-th stand-in kernel is filled with: a level of the grid other than
        0, the next stand-in the next level (1, -1, 2, -2, ...), so that kernels the converter
        would find identical after rounding (an attention's query, key and value: same input,
        same shape, often the same scale) stay apart; it merges identical ops."""
        lowest, highest = grid_limits(self.bits, self.full_range)
        levels = [k for j in range(1, highest - lowest + 1) for k in (j, -j) if lowest <= k <= highest]
        return levels[index % len(levels)] * tf.reduce_max(self._step(weights))

    def _step(self, weights):
        """The grid step at the range variables (a tensor; per channel where they are):
        :meth:`step_for` in graph ops."""
        low, high = weights["min_var"], weights["max_var"]
        if self.full_range:
            return (high - low) / (2 ** self.bits - 1)
        return tf.maximum(tf.abs(low), tf.abs(high)) / grid_limits(self.bits)[1]

    def _full_range(self, x, training, weights):
        low, high = weights["min_var"], weights["max_var"]
        if training:  # the last value, as tfmot's LastValueQuantize does for the narrow grid
            bound = tf.reduce_max(tf.abs(x), axis=list(range(x.shape.rank - 1)) if self.per_channel else None)
            lo, hi = self.range_for(bound)
            low, high = low.assign(lo), high.assign(hi)
        return self._fake_quant(x, low, high, num_bits=self.bits, narrow_range=False)

    def _fake_quant(self, x, low, high, **kwargs):
        per_channel = self.per_channel and x.shape.rank > 1
        fake_quant = tf.quantization.fake_quant_with_min_max_vars_per_channel if per_channel else \
            tf.quantization.fake_quant_with_min_max_vars
        return fake_quant(x, low, high, **kwargs)

    def _on_int4_grid(self, x, weights, carrier_bits: int = 4):
        """The kernel on this quantizer's grid (rounded by arithmetic the converter folds, with
        fake-quant's round-half-up), through a symmetric 4-bit fake-quant of the same step,
        where it loses nothing: the file then holds the trained integers (-2..1, -4..3, -1..1,
        -3..3) at step s. The converter stores a kernel under 4 bits as INT4 at the scale of
        its fake-quant's range: from the 2/3-bit fake-quant it makes the full-range grid a
        nonzero zero point (which FULLY_CONNECTED and CONV_2D refuse) and the 3-bit narrow grid
        INT4 at scale max/7 ({-3..3} * s stored as {-7, -5, -2, 0, 2, 5, 7}: measured); two
        fake-quants in a row break an EinsumDense kernel's conversion (measured).

        ``carrier_bits=8``: through an 8-bit fake-quant of the same step instead, for an Embedding
        table below 8 bits (``KernelKind.lookup_table``): the converter types a GATHER's output
        as its table, so a 4-bit table makes an int4 activation the next op refuses ("'tfl.mean'
        op failed to verify that input and output must have same element type", measured); on
        the int8 carrier the file holds the trained integers as int8 at step s, and
        :mod:`keras_qx.lite.tables` packs them as INT4 or INT2 after conversion."""
        lowest, highest = grid_limits(self.bits, self.full_range)
        step = self._step(weights)
        step = tf.where(step > 0, step, 1.0)
        x = tf.clip_by_value(tf.floor(x / step + 0.5), lowest, highest) * step
        top = 2 ** (carrier_bits - 1) - 1
        return self._fake_quant(x, -top * step, top * step, num_bits=carrier_bits, narrow_range=True)

    def get_config(self):
        config = {"bits": self.bits, "per_channel": self.per_channel, "channel_axis": self.channel_axis,
                  "full_range": self.full_range}
        if not self.pack:  # (only when set: configs of subclasses and older releases stay as they were)
            config["pack"] = False
        return config

    def __repr__(self):
        grid = ", full_range=True" if self.full_range else ""
        grid += "" if self.pack else ", pack=False"
        return f"WeightQuantizer(bits={self.bits}, per_channel={self.per_channel}{grid})"


@keras.utils.register_keras_serializable(package=PACKAGE)
class SparseWeightQuantizer(WeightQuantizer):
    """A :class:`WeightQuantizer` that keeps a pruned kernel's zeros zero.

    It multiplies the kernel by a fixed 0/1 mask (a non-trainable variable of the layer, so it is
    saved and loaded with the model; ``qx.quantize(..., preserve_sparsity=True)`` sets it to the
    kernel's nonzeros) before quantizing: the gradient of a masked weight is zero, so training
    cannot revive it, and the symmetric grid has 0 as a level, so a zero stays exactly 0 in
    the simulation and in the file (zero point 0).

    Example:
        >>> SparseWeightQuantizer(4).get_config()["bits"]
        4
    """

    def build(self, tensor_shape, name, layer):
        found = super().build(tensor_shape, name, layer)
        found["mask"] = layer.add_weight(name + "_mask", shape=tuple(tensor_shape), trainable=False,
                                         initializer=keras.initializers.Ones())
        return found

    def __call__(self, inputs, training, weights, **kwargs):
        return super().__call__(inputs * weights["mask"], training, weights, **kwargs)

    def __repr__(self):
        return f"SparseWeightQuantizer(bits={self.bits}, per_channel={self.per_channel})"


@keras.utils.register_keras_serializable(package=PACKAGE)
class ClusterWeightQuantizer(WeightQuantizer):
    """A :class:`WeightQuantizer` that keeps a clustered kernel clustered: it holds a fixed map
    of which cluster each weight belongs to, and the kernel it quantizes has each weight
    replaced by its cluster's centroid (``qx.quantize(..., preserve_clusters=True)``).

    The map (``cluster_index``, a non-trainable int32 variable of the kernel's shape, flat into
    a table of ``groups x clusters`` entries) is saved and loaded with the model. Training moves
    the centroids, not single weights: each weight of a cluster gets the cluster's mean
    gradient, so the weights of a cluster, equal at the start, stay equal in the kernel variable
    too, and the quantized kernel is rebuilt from one value per cluster whatever happens. No variable is added to train (an optimizer's state and the
    ``.keras`` variable order are the plain quantizer's). Rounding to the grid is a function of
    the value, so distinct values can merge but never split: at most ``clusters`` distinct
    values per kernel (``cluster_axis=None``) or per slice along ``cluster_axis``, in the
    simulation and in the file.

    Args:
        bits, per_channel, channel_axis: as :class:`WeightQuantizer`.
        clusters: entries of each table (a kernel with fewer distinct values leaves entries
            unused).
        cluster_axis: None: one table for the kernel; an axis: one table per index along it
            (a kernel clustered per output channel).
        preserve_sparsity: a cluster whose centroid is exactly 0 stays 0 (a fixed 0/1 mask of
            the table), so a pruned kernel's zeros stay zeros.

    Example:
        >>> ClusterWeightQuantizer(4, clusters=16).get_config()["clusters"]
        16
    """

    def __init__(self, bits: int = 8, per_channel: bool = True, channel_axis: int = -1, clusters: int = 16,
                 cluster_axis: int | None = None, preserve_sparsity: bool = False, full_range: bool | None = None,
                 pack: bool = True):
        super().__init__(bits, per_channel, channel_axis, full_range, pack)
        if isinstance(clusters, bool) or not isinstance(clusters, numbers.Integral) or clusters < 1:
            raise ValueError(f"ClusterWeightQuantizer(clusters=...) must be a positive integer, got {clusters!r}.")
        self.clusters = int(clusters)
        self.cluster_axis = None if cluster_axis is None else int(cluster_axis)
        self.preserve_sparsity = bool(preserve_sparsity)

    def groups(self, tensor_shape) -> int:
        """Tables the kernel of ``tensor_shape`` has: 1, or its size along ``cluster_axis``."""
        return 1 if self.cluster_axis is None else int(tuple(tensor_shape)[self.cluster_axis])

    def build(self, tensor_shape, name, layer):
        found = super().build(tensor_shape, name, layer)
        found["cluster_index"] = layer.add_weight(name + "_cluster_index", shape=tuple(tensor_shape), dtype=tf.int32,
                                                  trainable=False, initializer=keras.initializers.Zeros())
        if self.preserve_sparsity:
            found["centroid_mask"] = layer.add_weight(name + "_centroid_mask",
                                                      shape=(self.groups(tensor_shape), self.clusters),
                                                      trainable=False, initializer=keras.initializers.Ones())
        return found

    def centroids(self, inputs, weights):
        """The ``(groups, clusters)`` table: each cluster's value (0 for an unused entry).

        Its weights share it (they start equal and get the same gradient); the value is read
        exactly (their largest) and the gradient is the mean's, so each weight of a cluster
        gets the cluster's mean gradient."""
        entries = self.groups(inputs.shape) * self.clusters
        values, index = tf.reshape(inputs, [-1]), tf.reshape(weights["cluster_index"], [-1])
        mean = tf.math.unsorted_segment_mean(values, index, entries)
        exact = tf.math.unsorted_segment_max(tf.stop_gradient(values), index, entries)
        used = tf.math.unsorted_segment_sum(tf.ones_like(values), index, entries) > 0
        table = tf.where(used, exact, 0.0) + (mean - tf.stop_gradient(mean))
        if "centroid_mask" in weights:
            table = table * tf.reshape(weights["centroid_mask"], [-1])
        return tf.reshape(table, (-1, self.clusters))

    def kernel(self, inputs, weights):
        """The kernel the layer computes with, before quantization: each weight its centroid."""
        return tf.gather(tf.reshape(self.centroids(inputs, weights), [-1]), weights["cluster_index"])

    def __call__(self, inputs, training, weights, **kwargs):
        return super().__call__(self.kernel(inputs, weights), training, weights, **kwargs)

    def get_config(self):
        return {**super().get_config(), "clusters": self.clusters, "cluster_axis": self.cluster_axis,
                "preserve_sparsity": self.preserve_sparsity}

    def __repr__(self):
        return (f"ClusterWeightQuantizer(bits={self.bits}, per_channel={self.per_channel}, clusters={self.clusters}, "
                f"cluster_axis={self.cluster_axis})")


@keras.utils.register_keras_serializable(package=PACKAGE)
class FixedRangeQuantizer(_Quantizer):
    """8-bit fake quantization over a fixed range: the output of sigmoid/softmax ([0, 1)) and
    tanh ([-1, 1)), whose TFLite int8 kernels use fixed scales (1/256, 1/128). Simulating the
    same grid in training keeps Keras and the TFLite file in step.

    Example:
        >>> FixedRangeQuantizer(0.0, 255 / 256).step
        0.00390625
    """

    bits = 8

    def __init__(self, low: float, high: float):
        self.low, self.high = float(low), float(high)
        if not self.low < self.high:
            raise ValueError(f"FixedRangeQuantizer needs low < high, got {low!r}, {high!r}.")

    @property
    def step(self) -> float:
        return (self.high - self.low) / 255

    def build(self, tensor_shape, name, layer):
        return {}

    def __call__(self, inputs, training, weights, **kwargs):
        return quant_ops.FixedQuantize(inputs, self.low, self.high, narrow_range=False)

    def get_config(self):
        return {"low": self.low, "high": self.high}

    def __repr__(self):
        return f"FixedRangeQuantizer({self.low}, {self.high})"


# Ops between a fake-quant and the output of a layer whose output keeps its input's grid: they
# take one data input (the first) and move or average values.
_GRID_PATH_OPS = {"Identity", "Reshape", "Squeeze", "ExpandDims", "AvgPool", "AvgPool3D", "Mean", "MaxPool"}
_FAKE_QUANT_OPS = {"FakeQuantWithMinMaxVars", "FakeQuantWithMinMaxArgs"}


def input_grid(tensor, max_depth: int = 12):
    """The grid of the fake-quant that put the values ``tensor`` is computed from on their grid,
    found by walking its graph back through value-moving and averaging ops
    (``_GRID_PATH_OPS``): ``(min, max, num_bits, narrow_range)`` (min and max as tensors of that
    graph, or floats), or None (an eager tensor, another op on the way, or no fake-quant)."""
    try:
        op = tensor.op
    except AttributeError:  # eager: no graph to walk
        return None
    for _ in range(max_depth):
        if op.type in _FAKE_QUANT_OPS:
            attrs = (op.get_attr("num_bits"), op.get_attr("narrow_range"))
            if op.type == "FakeQuantWithMinMaxArgs":
                return (op.get_attr("min"), op.get_attr("max"), *attrs)
            return (op.inputs[1], op.inputs[2], *attrs)
        if op.type not in _GRID_PATH_OPS or not len(op.inputs):
            return None
        op = op.inputs[0].op
    return None


@keras.utils.register_keras_serializable(package=PACKAGE)
class InputGridQuantizer(_Quantizer):
    """Rounds a layer's output onto its input's grid: the same range as the fake-quant its input
    comes from (read from the graph, :func:`input_grid`), no range of its own.

    For the ops the TFLite runtime computes onto their input's scale: int8 ``AVERAGE_POOL_2D``
    (the converter requires one scale in and out, so the file rounds the average onto the input
    grid, where a layer without an output quantizer trains on the exact average), and the
    squeeze-excite ``MEAN`` (``GlobalAveragePooling2D`` feeding a 1x1 conv): on its input's grid
    the built-in int8 MEAN kernel rounds as XNNPACK does (to nearest); on a grid of its own it
    rounds the zero-point term apart (``round(sum * M) - round(z_in * s_in / s_out)``), one step
    up on 13% of values in tests/test_runtime_rounding.py, where XNNPACK and QAT round once. In
    the exported graph it is a fake-quant with the input's own range variables, so the converter
    gives the op's output the input's scale and zero point.

    Args:
        ties: how an average exactly halfway between two grid points rounds, on the int8 value
            ``q`` the file holds, as the runtime does (measured, tests/test_runtime_rounding.py):
            ``"even"`` (XNNPACK's int8 MEAN), ``"away"`` (from zero: int8 AVERAGE_POOL_2D, both
            kernel sets), ``"up"`` (fake-quant's own rounding). A 2x2 average is a tie on a
            quarter of its values, so the rule matters in small feature maps.

    Where no grid is found (an eager call; a graph where another op stands between) the output is
    left as it is, as before.

    Example:
        >>> InputGridQuantizer("even").get_config()
        {'ties': 'even'}
    """

    bits = 8
    TIES = ("up", "even", "away")

    def __init__(self, ties: str = "up"):
        if ties not in self.TIES:
            raise ValueError(f"InputGridQuantizer(ties=...) must be one of {self.TIES}, got {ties!r}.")
        self.ties = ties

    def build(self, tensor_shape, name, layer):
        return {}

    def __call__(self, inputs, training, weights, **kwargs):
        grid = input_grid(inputs)
        if grid is None:
            return inputs
        low, high, num_bits, narrow_range = grid
        if isinstance(low, float):
            y = tf.quantization.fake_quant_with_min_max_args(inputs, low, high, num_bits=num_bits,
                                                             narrow_range=narrow_range)
        else:
            y = tf.quantization.fake_quant_with_min_max_vars(inputs, low, high, num_bits=num_bits,
                                                             narrow_range=narrow_range)
        if self.ties == "up" or exporting():  # the file: the converter reads the plain fake-quant
            return y
        return y + tf.stop_gradient(self._ties_rounded(inputs, low, high, num_bits, narrow_range) - y)

    def _ties_rounded(self, x, low, high, num_bits, narrow_range):
        """The fake-quant's grid (its zero point nudged as TensorFlow nudges it) with halfway
        values rounded by ``self.ties`` on the int8 value ``q``."""
        qmin, qmax = (1 if narrow_range else 0), 2 ** num_bits - 1
        low, high = tf.cast(low, tf.float32), tf.cast(high, tf.float32)
        scale = (high - low) / (qmax - qmin)
        zero = tf.clip_by_value(tf.floor(qmin - low / scale + 0.5), qmin, qmax)  # TensorFlow's nudge (low <= 0)
        nudged_low = (qmin - zero) * scale
        offset = qmin - 2 ** (num_bits - 1)  # k grid index -> q = k + offset
        t = (tf.clip_by_value(x, nudged_low, (qmax - zero) * scale) - nudged_low) / scale + offset
        tie = tf.abs(t - tf.floor(t) - 0.5) < 1e-3  # float32 averages of grid values miss 0.5 by ~1e-5
        if self.ties == "even":
            at_tie = tf.floor(t) + tf.math.floormod(tf.floor(t), 2.0)
        else:
            at_tie = tf.where(t >= 0, tf.floor(t) + 1.0, tf.floor(t))
        q = tf.where(tie, at_tie, tf.floor(t + 0.5))
        return (q - offset) * scale + nudged_low

    def get_config(self):
        return {} if self.ties == "up" else {"ties": self.ties}

    def __repr__(self):
        return "InputGridQuantizer()" if self.ties == "up" else f"InputGridQuantizer(ties={self.ties!r})"


@keras.utils.register_keras_serializable(package=PACKAGE)
class ActivationQuantizer(_Quantizer):
    """Asymmetric activation quantizer over a moving-average min/max range.

    Args:
        bits: bit width; TFLite integer kernels take 8 (16 only through ``qx.ptq``).
        ema_decay: decay of the moving average of the observed range.

    Example:
        >>> ActivationQuantizer(8).bits
        8
    """

    def __init__(self, bits: int = 8, ema_decay: float = 0.999):
        self.bits = check_bits(bits, "activation bits", ACTIVATION_BITS)
        self.ema_decay = float(ema_decay)
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay!r}.")

    def build(self, tensor_shape, name, layer):
        return self._range_vars(layer, name)

    def __call__(self, inputs, training, weights, **kwargs):
        return quant_ops.MovingAvgQuantize(
            inputs,
            weights["min_var"],
            weights["max_var"],
            ema_decay=self.ema_decay,
            is_training=training,
            num_bits=self.bits,
            per_channel=False,
            symmetric=False,
            narrow_range=False,
        )

    def get_config(self):
        return {"bits": self.bits, "ema_decay": self.ema_decay}

    def __repr__(self):
        return f"ActivationQuantizer(bits={self.bits})"


@keras.utils.register_keras_serializable(package=PACKAGE)
class TopClampQuantizer(ActivationQuantizer):
    """An :class:`ActivationQuantizer` for an op whose int8 kernel answers the top of its output
    range where the float op is infinite: RSQRT of an input on its zero point (a variance that
    rounded to 0). While training, infinite values count as the range's current top, so the
    moving average never learns an infinite range (which crashed the converter, measured); at
    inference the fake-quant clips them to the top, as the runtime does.

    Example:
        >>> TopClampQuantizer(8).bits
        8
    """

    def __call__(self, inputs, training, weights, **kwargs):
        if training:
            inputs = tf.where(tf.math.is_finite(inputs), inputs, tf.cast(weights["max_var"], inputs.dtype))
        return super().__call__(inputs, training, weights, **kwargs)

    def __repr__(self):
        return f"TopClampQuantizer(bits={self.bits})"


@keras.utils.register_keras_serializable(package=PACKAGE)
class GateWeightQuantizer(WeightQuantizer):
    """Symmetric narrow-range quantizer with one scale per gate: a recurrent kernel of shape
    (inputs, gates * units) stacks its gates along the last axis (LSTM: i, f, c, o), and TFLite's
    integer LSTM stores each gate's matrix as its own int8 tensor with one scale.

    While exporting (:func:`export_trace`) it rounds the kernel onto its grid with plain
    arithmetic: the converter's fused LSTM takes constant float weights and quantizes each gate
    itself to int8 at ``max|w| / 127`` (a fake-quant op per gate makes it fail), which recovers
    these values exactly, the range bound being each gate's largest magnitude. Below 8 bits the values are also rounded onto that int8 grid, as the file stores
    them (int8: the fused LSTM has no narrower weights, so fewer bits save no bytes).

    Example:
        >>> q = GateWeightQuantizer(8, gates=4)
        >>> q.get_config()
        {'bits': 8, 'gates': 4}
    """

    def __init__(self, bits: int = 8, gates: int = 4):
        super().__init__(bits, per_channel=True, channel_axis=-1, full_range=False)  # int8 in the file
        self.gates = int(gates)

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def build(self, tensor_shape, name, layer):
        return self._range_vars(layer, name, (self.gates,))

    def _by_gate(self, value):
        """``value`` (n, gates * units) as (n * units, gates): a gate's values in one column."""
        n = value.shape[0]
        return tf.reshape(tf.transpose(tf.reshape(value, (n, self.gates, -1)), (0, 2, 1)), (-1, self.gates))

    def _back(self, value, shape):
        n = shape[0]
        return tf.reshape(tf.transpose(tf.reshape(value, (n, -1, self.gates)), (0, 2, 1)), shape)

    def bound(self, value):
        return tf.reduce_max(tf.abs(self._by_gate(value)), axis=0)

    @staticmethod
    def _on_grid(x, bound, bits: int):
        levels = 2 ** (bits - 1) - 1
        step = bound / levels
        return tf.clip_by_value(tf.round(x / step), -levels, levels) * step

    def __call__(self, inputs, training, weights, **kwargs):
        shape = inputs.shape
        x = self._by_gate(inputs)
        # The converter takes each gate's scale from the values it is given (max |w| / 127), so
        # the bound is always the current weights' (as tfmot's last-value weight ranges are while
        # training), never a stale range: the file then holds exactly these values.
        bound = tf.stop_gradient(tf.maximum(tf.reduce_max(tf.abs(x), axis=0), 1e-12))
        if training is True:
            weights["min_var"].assign(-bound)
            weights["max_var"].assign(bound)
        if exporting():
            x = self._on_grid(x, bound, self.bits)
        else:  # the same grid, with straight-through gradients
            x = tf.quantization.fake_quant_with_min_max_vars_per_channel(x, -bound, bound, num_bits=self.bits,
                                                                         narrow_range=True)
        if self.bits < 8:
            # The file stores int8 at bound / 127 whatever the bits: the b-bit values as it rounds them.
            x = x + tf.stop_gradient(self._on_grid(x, bound, 8) - x)
        return self._back(x, shape)

    def get_config(self):
        return {"bits": self.bits, "gates": self.gates}

    def __repr__(self):
        return f"GateWeightQuantizer(bits={self.bits}, gates={self.gates})"


def _alias(name: str):
    kind, _, rest = name.partition("_")
    if kind[:1] in ("w", "a") and kind[1:].isdigit():
        bits = int(kind[1:])
        if kind[0] == "w":
            return WeightQuantizer(bits, per_channel=rest != "per_tensor")
        if not rest:
            return ActivationQuantizer(bits)
    return None


def serialize(quantizer: tfmot_quantizers.Quantizer) -> dict:
    """Keras-serialize a quantizer (``{"class_name": "keras_qx>...", "config": ...}``)."""
    return keras.utils.serialize_keras_object(quantizer)


def deserialize(config: dict, custom_objects: dict | None = None) -> tfmot_quantizers.Quantizer:
    """Inverse of :func:`serialize`."""
    return keras.utils.deserialize_keras_object(config, custom_objects=custom_objects)


def get(identifier: Any):
    """Return a quantizer from None, a quantizer, a config dict or an alias.

    Aliases: ``"w2"``..``"w8"`` (per-channel weights), ``"w4_per_tensor"``, ``"a8"``, ``"a16"``.
    """
    if identifier is None or isinstance(identifier, tfmot_quantizers.Quantizer):
        return identifier
    if isinstance(identifier, dict):
        return deserialize(identifier)
    if isinstance(identifier, str):
        quantizer = _alias(identifier)
        if quantizer is not None:
            return quantizer
        raise ValueError(
            f"Unknown quantizer alias {identifier!r}; use 'w2'..'w8', 'w4_per_tensor', 'a8' or 'a16'."
        )
    raise ValueError(
        f"Could not interpret quantizer identifier {identifier!r}: pass None, a Quantizer, "
        "a serialized dict or an alias string."
    )
