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

__all__ = ["KernelKind", "kernel_kind", "register_layer", "unregister_layer", "custom_output",
           "Treatment", "treatment", "TREATMENTS", "integer_lstm", "QUANTIZED", "PASS_THROUGH", "IDENTITY", "FLOAT", "REFUSED"]

_L = keras.layers


@dataclass(frozen=True)
class KernelKind:
    """How a layer type's kernels are quantized and stored.

    ``int4_export`` says whether the TFLite converter packs this layer's kernel as INT4
    when its bits are <= 4 (measured on TF 2.21: FULLY_CONNECTED, CONV_2D, which Conv1D
    becomes, and DEPTHWISE_CONV_2D; TRANSPOSE_CONV refuses INT4); ``integer_export`` is False where TFLite has no integer kernel (CONV_3D: the
    converter keeps it float). Per-channel scales only where the converter accepts them
    (Conv2D, DepthwiseConv2D; Conv1D/Conv3D conversion fails with them). ``int2_export``: the
    kernel becomes a FULLY_CONNECTED filter, which ``export_tflite`` stores as INT2 at 2 bits
    (:mod:`keras_qx.lite.int2`), or an Embedding table (EMBEDDING_LOOKUP; the runtime's GATHER
    refuses INT2). ``lookup_table``: the kernel is a table the converter turns into a GATHER,
    kept int8 by the converter: it reaches the converter on an int8 grid of its trained step and
    :mod:`keras_qx.lite.tables` stores it as INT4 (GATHER) at 3-4 bits and INT2
    (EMBEDDING_LOOKUP) at 2 bits, per tensor: the runtime reads per-row scales only with a float
    output (measured on ai-edge-litert 2.3).
    """

    layer_type: type
    weight_attrs: tuple[str, ...]
    per_channel: bool
    channel_axis: int = -1
    int4_export: bool = False
    integer_export: bool = True
    int2_export: bool = False
    lookup_table: bool = False


# Ordered: subclasses before their bases (all are Conv subclasses; Conv2DTranspose is a Conv2D).
_KERNEL_KINDS = (
    KernelKind(_L.DepthwiseConv2D, ("depthwise_kernel",), per_channel=True, int4_export=True),
    KernelKind(_L.DepthwiseConv1D, ("depthwise_kernel",), per_channel=False),
    # Split into DepthwiseConv2D + 1x1 Conv2D before quantization (keras_qx.qat.registry); both pack.
    KernelKind(_L.SeparableConv2D, ("depthwise_kernel", "pointwise_kernel"), per_channel=False,
               int4_export=True),
    KernelKind(_L.SeparableConv1D, ("depthwise_kernel", "pointwise_kernel"), per_channel=False),
    KernelKind(_L.Conv2DTranspose, ("kernel",), per_channel=False, channel_axis=-2),
    KernelKind(_L.Conv3DTranspose, ("kernel",), per_channel=False, channel_axis=-2, integer_export=False),
    KernelKind(_L.Conv1DTranspose, ("kernel",), per_channel=False, channel_axis=-2),
    KernelKind(_L.Conv2D, ("kernel",), per_channel=True, int4_export=True),
    KernelKind(_L.Conv1D, ("kernel",), per_channel=False, int4_export=True),
    KernelKind(_L.Conv3D, ("kernel",), per_channel=False, integer_export=False),
    KernelKind(_L.Dense, ("kernel",), per_channel=False, int4_export=True, int2_export=True),
    KernelKind(_L.EinsumDense, ("kernel",), per_channel=False, int4_export=True, int2_export=True),
    KernelKind(_L.Embedding, ("embeddings",), per_channel=False, int4_export=True, int2_export=True,
               lookup_table=True),
    KernelKind(_L.LocallyConnected1D, ("kernel",), per_channel=False),
    KernelKind(_L.LocallyConnected2D, ("kernel",), per_channel=False),
)


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


# What keras_qx does with each standard layer class (kernel layers are in _KERNEL_KINDS above
# and are QUANTIZED): measured on the tiny models of tests/layer_cases.py, exported by TF 2.21's
# converter (bench/results/layers.md). Subclasses inherit their base's entry.
QUANTIZED = "quantized"          # kernels at the policy's bits and/or the output on an int8 grid
PASS_THROUGH = "pass-through"    # moves or repeats values: no quantizer, keeps its input's scale
IDENTITY = "identity"            # nothing at inference (dropout, noise, augmentation)
FLOAT = "float"                  # kept float automatically, with a warning saying why
REFUSED = "refused"              # cannot be in an int8 TFLite model at all


@dataclass(frozen=True)
class Treatment:
    """How ``qx.quantize`` treats a layer class.

    ``kind`` is one of QUANTIZED, PASS_THROUGH, IDENTITY, FLOAT, REFUSED; ``quantize_output``
    (QUANTIZED only): the layer's output gets its own quantizer (False: it keeps its input's
    scale, as TFLite's int8 AVERAGE_POOL_2D requires, and QAT rounds it onto that grid, as the
    file does: :class:`~keras_qx.quant.quantizers.InputGridQuantizer`); ``float_op`` (QUANTIZED only): trained
    quantized, but the converter runs the op itself in float between DEQUANTIZE and QUANTIZE
    (no integer kernel; the file keeps int8 edges); ``reason``: why (the warning or error of
    FLOAT, REFUSED and ``float_op`` quotes it).
    """

    kind: str
    quantize_output: bool = True
    reason: str = ""
    float_op: bool = False
    static_batch: bool = False  # converts only with a fixed batch size (the exporter uses 1)


_OUT = Treatment(QUANTIZED)
_SAME_SCALE = Treatment(QUANTIZED, quantize_output=False,
                        reason="TFLite's int8 average pool computes onto its input's grid")
_PASS = Treatment(PASS_THROUGH)
_IDENT = Treatment(IDENTITY)
_RNN = ("the TFLite runtime has no integer kernel for a recurrent layer's loop (the converter keeps "
        "its WHILE loop float)")
_NO_3D_POOL = ("TFLite has no 3D pooling op (the converter fails on tf.MaxPool3D/tf.AvgPool3D even in float): "
               "pool in 2D (e.g. Reshape to merge two axes, then MaxPooling2D)")
_PREPROCESS = ("categorical/string preprocessing (lookup tables, hashing, string ops) has no integer TFLite "
               "kernel: apply it in the input pipeline (tf.data: dataset.map(layer)) and feed the model its output")

TREATMENTS = {
    # arithmetic: the output quantized (kernel layers come from _KERNEL_KINDS)
    **{c: _OUT for c in (
        _L.Activation, _L.ReLU, _L.LeakyReLU, _L.PReLU, _L.ThresholdedReLU, _L.Softmax,
        _L.BatchNormalization, _L.LayerNormalization, _L.UnitNormalization,
        _L.Normalization, _L.Rescaling, _L.Add, _L.Subtract, _L.Multiply, _L.Average, _L.Maximum,
        _L.Minimum, _L.Concatenate, _L.Dot, _L.Attention, _L.AdditiveAttention,
        _L.GlobalAveragePooling1D, _L.GlobalAveragePooling2D, _L.GlobalAveragePooling3D)},
    # with a dynamic batch its BROADCAST_TO fails in the converter (measured)
    _L.GroupNormalization: Treatment(QUANTIZED, static_batch=True),
    # Trained quantized with the converter running it float between DEQUANTIZE and QUANTIZE (the
    # float_op treatment), the file failed to convert whenever a reshape or pooling followed it
    # ("'tfl.reshape' op quantization parameters violate the same scale constraint": the converter
    # calibrates the float op's output itself; measured, Conv1D -> ELU -> Flatten -> Dense)
    _L.ELU: Treatment(FLOAT, reason="TFLite has no integer ELU kernel, and the converter calibrates a float ELU's "
                      "output itself, so a reshape or pooling after it fails to convert"),
    **{c: _SAME_SCALE for c in (_L.AveragePooling1D, _L.AveragePooling2D)},
    **{c: Treatment(REFUSED, reason=_NO_3D_POOL) for c in (_L.MaxPooling3D, _L.AveragePooling3D)},
    # value-preserving: every output value is an input value (or the zero point)
    **{c: _PASS for c in (
        _L.MaxPooling1D, _L.MaxPooling2D, _L.GlobalMaxPooling1D, _L.GlobalMaxPooling2D,
        _L.GlobalMaxPooling3D, _L.Flatten, _L.Reshape, _L.Permute, _L.RepeatVector, _L.Cropping1D,
        _L.Cropping2D, _L.Cropping3D, _L.ZeroPadding1D, _L.ZeroPadding2D, _L.ZeroPadding3D,
        _L.UpSampling1D, _L.UpSampling2D, _L.UpSampling3D, _L.Resizing, _L.CenterCrop, _L.RandomCrop,
        _L.Masking)},
    # identity at inference (they still act while training)
    **{c: _IDENT for c in (
        _L.Identity, _L.Dropout, _L.AlphaDropout, _L.GaussianDropout, _L.GaussianNoise,
        _L.SpatialDropout1D, _L.SpatialDropout2D, _L.SpatialDropout3D, _L.ActivityRegularization,
        _L.RandomBrightness, _L.RandomContrast, _L.RandomFlip, _L.RandomHeight, _L.RandomWidth,
        _L.RandomRotation, _L.RandomTranslation, _L.RandomZoom)},
    # kept float (a Bidirectional of two LSTMs the converter fuses is split by keras_qx.rewrite.flatten
    # into two integer LSTMs first; these are the ones left: GRU, SimpleRNN, masked, merge_mode None...)
    **{c: Treatment(FLOAT, reason=_RNN, static_batch=True) for c in (
        _L.SimpleRNN, _L.GRU, _L.RNN, _L.Bidirectional, _L.ConvLSTM1D, _L.ConvLSTM2D, _L.ConvLSTM3D)},
    # the converter fuses it into one integer UNIDIRECTIONAL_SEQUENCE_LSTM (int8 weights per gate,
    # int16 cell state); an LSTM it would not fuse (integer_lstm False) runs as RNN(LSTMCell), kept
    # float (keras_qx.rewrite.flatten)
    _L.LSTM: Treatment(QUANTIZED, static_batch=True, reason=(
        "one integer UNIDIRECTIONAL_SEQUENCE_LSTM in the file: int8 weights per gate, int16 cell state")),
    _L.TimeDistributed: Treatment(FLOAT, reason=(
        "keras_qx does not simulate quantization inside a TimeDistributed wrapper yet (the converter may "
        "still run a simple inner layer integer, with weight scales of its own)")),
    # keras_qx.rewrite.flatten replaces it by its layer (what it computes at inference)
    _L.SpectralNormalization: Treatment(QUANTIZED, reason="replaced by its inner layer"),
    # decomposed by keras_qx.rewrite.flatten into EinsumDense, einsum TFOps and a Softmax
    _L.MultiHeadAttention: Treatment(QUANTIZED, reason="decomposed into its projections, einsums and softmax"),
    # refused
    **{c: Treatment(REFUSED, reason=_PREPROCESS) for c in (
        _L.StringLookup, _L.TextVectorization, _L.Hashing, _L.IntegerLookup, _L.CategoryEncoding,
        _L.Discretization, _L.HashedCrossing, _L.DenseFeatures)},
    _L.Lambda: Treatment(REFUSED, reason=(
        "a Lambda runs Python code keras_qx cannot see, and tfmot rebuilds the model from its config, which "
        "safe mode refuses for Python lambdas: write it as TF calls on tensors (x * 2.0, tf.math...), "
        "or as a layer class registered with qx.register_layer")),
}


def integer_lstm(layer, backwards: bool = False) -> bool:
    """``layer`` is an LSTM the converter fuses into its integer UNIDIRECTIONAL_SEQUENCE_LSTM:
    Keras's fused-kernel conditions (tanh/sigmoid, bias, no recurrent dropout, not unrolled) and
    one output, a fresh state per sample, batch-major and forward in time (``backwards``: or
    backward in time, which ``keras_qx.rewrite.flatten`` turns into a forward LSTM on the reversed
    sequence: a Bidirectional's backward layer)."""
    if type(layer) is not _L.LSTM:
        return False
    config = layer.get_config()
    return (config["activation"] == "tanh" and config["recurrent_activation"] == "sigmoid" and config["use_bias"]
            and not config["recurrent_dropout"] and not any(config[k] for k in (
                "unroll", "return_state", "stateful", "time_major")) and (backwards or not config["go_backwards"]))


def treatment(layer_or_type) -> Treatment | None:
    """The :class:`Treatment` of a layer (by its class and bases): QUANTIZED for kernel layers
    and registered ones; None for a class keras_qx knows nothing about."""
    cls = layer_or_type if isinstance(layer_or_type, type) else type(layer_or_type)
    kind = kernel_kind(cls)
    if kind is not None:
        if not kind.integer_export:
            return Treatment(QUANTIZED, float_op=True, reason=(
                f"TFLite has no integer {cls.__name__} kernel: the converter runs it in float between "
                "DEQUANTIZE and QUANTIZE"))
        return Treatment(QUANTIZED)
    registered = custom_output(cls)
    if registered is not None:
        return Treatment(QUANTIZED) if registered else _PASS
    for base in cls.__mro__:
        if base in TREATMENTS:
            return TREATMENTS[base]
    return None
