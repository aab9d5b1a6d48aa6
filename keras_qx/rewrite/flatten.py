"""Rewrite a model into the layers tfmot can quantize, keeping names and weights.

* Nested models (a Sequential/Functional model used as a layer: ConvNeXt's stem and head,
  user backbones) are inlined: tfmot cannot quantize a model inside a model.
* Raw TF calls recorded as ``TFOpLambda``/``SlicingOpLambda`` layers (``x + 3.0``,
  ``tf.math.multiply``, slicing) become :class:`~keras_qx.rewrite.tfop.TFOp` layers.
* ``MultiHeadAttention`` (without masks) becomes its parts: the four ``EinsumDense``
  projections (``<name>_query``, ``_key``, ``_value``, ``_output``), the query scaling and the two
  attention einsums as ``TFOp`` layers, and a ``Softmax``; each gets its own quantizer, so the
  TFLite file runs attention on int8 (FULLY_CONNECTED, BATCH_MATMUL, SOFTMAX).
* A ``Dense`` on inputs of rank > 2 (a transformer's feed-forward) becomes a
  :class:`SequenceDense` (the same kernel as an ``EinsumDense``): the converter stores a
  Dense-on-sequence kernel with a bias as int8 even at 4 bits (measured), an EinsumDense as INT4.
  Policy rules of type ``"Dense"`` still match it.
* A kernel layer with a fused activation other than ReLU/linear (``Dense(activation="gelu")``)
  becomes the layer without it plus ``Activation`` (``<name>_activation``): tfmot only
  quantizes a few fused activations, and TFLite needs the pre-activation quantized.
* ``Bidirectional(LSTM)`` (both LSTMs ones the converter fuses, no mask, no initial state)
  becomes its two directions as plain layers: ``<name>/forward`` (an LSTM), ``<name>/reverse``
  (``tf.reverse`` of the input along time), ``<name>/backward`` (an LSTM forward in time on it),
  ``<name>/reverse_output`` (with ``return_sequences``) and the merge ``<name>/concat`` (a
  ``tf.concat`` TFOp; ``/sum``, ``/mul``, ``/ave`` as Add, Multiply, Average), weights copied.
  merge_mode None is not split: its two outputs go to the user's layers, and a quantized
  Concatenate there fails to convert as below (measured). The file then holds two integer UNIDIRECTIONAL_SEQUENCE_LSTMs.
  The concat and reverses get no quantizer of their own: a quantizer on a same-scale op after
  an LSTM hands its scale back to the LSTM in the converter's QAT pass, which then quantizes the
  LSTM itself with a 0-range zero state shared by both state operands and fails in its
  split-merged-operands pass ("We cannot duplicate the value since it's not constant", measured;
  tensorflow/compiler/mlir/lite/transforms/split_merged_operands.cc clones only constant
  stateful operands, and a quantized ``tfl.pseudo_qconst`` is not matched as one); without it
  the LSTMs stay float in that pass and are quantized from the representative data, as a
  single LSTM is. A policy entry naming the Bidirectional applies to every part.
* An ``LSTM`` inside any other ``Bidirectional``, or one the converter would not fuse into its
  integer UNIDIRECTIONAL_SEQUENCE_LSTM (``keras_qx.quant.kinds.integer_lstm``: stateful,
  unrolled, other activations...), becomes ``RNN(LSTMCell)`` with the same weights, kept float
  (keras_qx.quant.kinds.TREATMENTS): a fused LSTM kept float inside a quantize wrapper fails to
  convert ("cannot duplicate the value since it's not constant", measured), the generic RNN
  loop converts. Any other LSTM stays whole and becomes one integer op.
* ``SpectralNormalization(layer)`` becomes ``layer``: at inference it calls its layer with the
  kernel it normalized while training (QAT then trains the kernel without the normalization).
* A ``LayerNormalization`` over the last axis becomes the int8 ops its file runs, each rounding
  to a grid of its own (:func:`_layer_norm`): ``<name>_mean``, ``_centered``, ``_square``,
  ``_variance``, ``_epsilon``, ``_rsqrt``, ``_normalized`` (``TFOp`` layers) and ``<name>``, a
  :class:`LayerNormScale` (gamma and beta as one DEPTHWISE_CONV_2D). Whole, the converter lowers it
  to ~12 int8 ops whose ranges it calibrates itself, while QAT rounds once at its output.
* ``RandomCrop`` becomes :class:`InferenceRandomCrop`, the same layer taking ``training=None``
  or an integer learning phase (tfmot's wrappers pass them; RandomCrop fails on them).
* Swish (``x * sigmoid(x)``; TFLite runs LOGISTIC then MUL) becomes ``Activation("sigmoid")``
  (``<name>_sigmoid``) and ``Multiply`` (``<name>``), so training sees the 1/256 grid of TFLite's
  int8 sigmoid (EfficientNet's gates and activations).

``qx.quantize`` does this first. Layers keep their names, so a policy can name inner layers;
they are shared with the original model, except the split and decomposed ones (copies with the
same weights).

Example:
    >>> flat = flatten_nested(model)      # doctest: +SKIP
"""
from __future__ import annotations

import math
import warnings

from keras_qx._compat import PACKAGE, attention_parts, keras, tf
from keras_qx._graph import graph_nodes, has_graph, is_graph_model
from keras_qx.rewrite.inline import NotTraceable, ProbeFailed, check_agrees, is_inlinable, trace_layer

__all__ = ["flatten_nested", "has_nested", "SequenceDense", "BiasAdd", "InferenceRandomCrop", "LayerNormScale",
           "ATTENTION_PARTS", "LAYER_NORM_PARTS"]

# A decomposed MultiHeadAttention's layers are named f"{name}_{part}".
ATTENTION_PARTS = ("query", "key", "value", "query_bias", "key_bias", "value_bias", "scale", "scores", "softmax",
                   "combine", "output")  # the *_bias parts exist where the projection has a bias

# A decomposed LayerNormalization's layers are named f"{name}_{part}" (its LayerNormScale keeps f"{name}").
LAYER_NORM_PARTS = ("mean", "centered", "square", "variance", "epsilon", "rsqrt", "normalized")

_KEEP_FUSED = {"linear", "relu"}  # fused activations tfmot quantizes as TFLite fuses them


def _tf_op(layer) -> bool:
    return type(layer).__name__ in ("TFOpLambda", "SlicingOpLambda")


def _activation_name(layer) -> str | None:
    """The fused activation of a kernel layer that must be split off, else None."""
    from keras_qx.quant.kinds import kernel_kind

    fn = getattr(layer, "activation", None)
    if fn is None or kernel_kind(layer) is None:
        return None
    name = getattr(fn, "__name__", type(fn).__name__)
    return None if name in _KEEP_FUSED else name


@keras.utils.register_keras_serializable(package=PACKAGE)
class SequenceDense(keras.layers.EinsumDense):
    """A ``Dense`` applied to inputs of rank > 2, as the ``EinsumDense`` it computes.

    Example:
        >>> layer = SequenceDense("abc,cz->abz", output_shape=(6, 16), bias_axes="z")
    """

    policy_aliases = ("Dense",)


@keras.utils.register_keras_serializable(package=PACKAGE)
class InferenceRandomCrop(keras.layers.RandomCrop):
    """``RandomCrop`` that reads ``training=None`` as inference (a center crop and resize) and
    takes the integer learning phase tfmot's wrapper passes (RandomCrop wants a bool)."""

    def call(self, inputs, training=None):
        if training is None or isinstance(training, (bool, int)):
            if not training:  # RandomCrop's own inference path, without its random-crop branch
                return tf.cast(keras.preprocessing.image.smart_resize(inputs, [self.height, self.width]),
                               self.compute_dtype)
            training = True
        else:
            training = tf.cast(training, tf.bool)
        return super().call(inputs, training=training)


@keras.utils.register_keras_serializable(package=PACKAGE)
class LayerNormScale(keras.layers.LayerNormalization):
    """The last step of a decomposed ``LayerNormalization`` (:func:`_layer_norm`): its input,
    already normalized, times ``gamma`` plus ``beta``, per channel of the last axis, as a 1x1
    depthwise convolution (:func:`~keras_qx.rewrite.scale_shift.scale_shift`): one int8
    DEPTHWISE_CONV_2D in the file (gamma stored per channel, so exactly; beta as its int32 bias),
    rounding once, at the output, as the QAT model does. Same config and weights as the
    ``LayerNormalization`` it comes from (policy rules of that type match it).

    Example:
        >>> layer = LayerNormScale(); layer(keras.Input((6, 4))).shape.as_list()
        [None, 6, 4]
    """

    def call(self, inputs):
        from keras_qx.rewrite.scale_shift import scale_shift

        if not (self.scale or self.center):
            return inputs
        x = tf.cast(inputs, self.compute_dtype)
        channels = int(x.shape[-1])
        gamma = tf.cast(self.gamma, x.dtype) if self.scale else tf.ones((channels,), x.dtype)
        beta = tf.cast(self.beta, x.dtype) if self.center else tf.zeros((channels,), x.dtype)
        return scale_shift(x, gamma, beta)


def _plain_layer_norm(layer) -> bool:
    """A ``LayerNormalization`` over the last axis only (the usual transformer one), in float32."""
    if type(layer) is not keras.layers.LayerNormalization:
        return False
    try:
        rank = len(layer.input_shape)
    except AttributeError:  # shared on inputs of different shapes: left as it is
        return False
    axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
    return (rank >= 2 and [int(a) % rank for a in axis] == [rank - 1] and layer.input_shape[-1] is not None
            and layer.compute_dtype == "float32")


def _layer_norm(layer, args, kwargs):
    """``LayerNormalization`` as the int8 ops of its file, each a layer with its own output range.

    Whole, the converter lowers tf_keras's LayerNormalization (a fused batch norm over a
    reshape) to RESHAPE, TRANSPOSE, MEAN, SQUARED_DIFFERENCE, MEAN, ADD (epsilon), RSQRT, MUL
    (by ones), MUL, MUL, SUB, ADD, TRANSPOSE, RESHAPE, MUL (gamma, one int8 scale for all
    channels) and ADD (beta), each rounding to an int8 grid whose range the converter
    calibrates from the representative data, where the QAT model rounded once, at the output
    (measured, TF 2.21: 1.4-1.7 mean / 7-11 max output steps after Conv1D -> LN -> Dense, 9 mean
    after 24 transformer blocks). Decomposed, the file runs these ops and the QAT model
    fake-quantizes each one's output on a range it calibrates and trains (the converter takes it
    from the fake-quant): ``mean = mean(x)``, ``centered = x - mean``, ``square = (x - mean)**2``
    (SQUARED_DIFFERENCE), ``variance = mean(square)``, ``epsilon = variance + eps``, ``rsqrt``,
    ``normalized = centered * rsqrt``, then ``normalized * gamma + beta``
    (:class:`LayerNormScale`) on the layer's own output range."""
    from keras_qx.rewrite.tfop import TFOp

    x = args[0] if args else kwargs["inputs"]
    name = layer.name
    t = lambda i: {"__tensor__": i}  # noqa: E731

    def op(part, symbol, template):
        return _once(f"{name}_{part}", lambda: TFOp(symbol, template, name=f"{name}_{part}"))

    reduce = {"axis": -1, "keepdims": True}
    mean = op("mean", "math.reduce_mean", {"args": [t(0)], "kwargs": reduce})(x)
    centered = op("centered", "math.subtract", {"args": [t(0), t(1)]})([x, mean])
    square = op("square", "math.squared_difference", {"args": [t(0), t(1)]})([x, mean])
    variance = op("variance", "math.reduce_mean", {"args": [t(0)], "kwargs": reduce})(square)
    shifted = op("epsilon", "math.add", {"args": [t(0), float(layer.epsilon)]})(variance)
    rsqrt = op("rsqrt", "math.rsqrt", {"args": [t(0)]})(shifted)
    normalized = op("normalized", "math.multiply", {"args": [t(0), t(1)]})([centered, rsqrt])
    scale = _once(name, lambda: LayerNormScale.from_config(layer.get_config()))
    y = scale(normalized)
    scale.set_weights(layer.get_weights())
    return y


def _sequence_dense(layer) -> bool:
    if type(layer) is not keras.layers.Dense:
        return False
    try:
        return len(layer.input_shape) > 2
    except AttributeError:  # shared on inputs of different shapes: left as it is
        return False


def _copied(layer) -> bool:
    """Rewritten into new layers with copied weights (the other rewrites share the layer)."""
    return (_activation_name(layer) is not None or isinstance(layer, keras.layers.MultiHeadAttention)
            or _sequence_dense(layer) or _swish(layer) or _fused_lstm(layer)
            or type(layer) is keras.layers.RandomCrop or _plain_layer_norm(layer))


def _fused_lstm(layer) -> bool:
    """A Bidirectional of LSTMs (split into two integer LSTMs, else run as ``RNN(LSTMCell)``, kept
    float), or an LSTM the converter would not fuse into its integer LSTM
    (:func:`~keras_qx.quant.kinds.integer_lstm`), to run as ``RNN(LSTMCell)``."""
    from keras_qx.quant.kinds import integer_lstm

    if isinstance(layer, keras.layers.Bidirectional):
        return all(type(l) is keras.layers.LSTM for l in (layer.forward_layer, layer.backward_layer))
    return type(layer) is keras.layers.LSTM and not integer_lstm(layer)


_LSTM_CELL_KEYS = ("units", "activation", "recurrent_activation", "use_bias", "kernel_initializer",
                   "recurrent_initializer", "bias_initializer", "unit_forget_bias", "kernel_regularizer",
                   "recurrent_regularizer", "bias_regularizer", "kernel_constraint", "recurrent_constraint",
                   "bias_constraint", "dropout", "recurrent_dropout")
_RNN_KEYS = ("return_sequences", "return_state", "go_backwards", "stateful", "unroll", "time_major")


def _generic_lstm(config: dict, name: str):
    """``RNN(LSTMCell)`` computing what an ``LSTM`` with ``config`` computes (same weight layout)."""
    cell = keras.layers.LSTMCell(**{k: config[k] for k in _LSTM_CELL_KEYS if k in config})
    return keras.layers.RNN(cell, name=name, **{k: config[k] for k in _RNN_KEYS if k in config})


_MERGES = {"sum": keras.layers.Add, "mul": keras.layers.Multiply, "ave": keras.layers.Average}


def _split_bidirectional(layer, args, kwargs) -> bool:
    """``layer`` (a Bidirectional) called so can run as two integer LSTMs (the module docstring)."""
    from keras_qx.quant.kinds import integer_lstm

    x = args[0] if args else kwargs.get("inputs")
    return (integer_lstm(layer.forward_layer) and integer_lstm(layer.backward_layer, backwards=True)
            and layer.forward_layer.go_backwards != layer.backward_layer.go_backwards
            and (layer.merge_mode == "concat" or layer.merge_mode in _MERGES)  # merge_mode None: see below
            and len(args) <= 1 and not any(kwargs.get(k) is not None for k in ("mask", "initial_state", "constants"))
            and getattr(x, "_keras_mask", None) is None and len(getattr(x, "shape", ())) == 3)


def _bidirectional(layer, args, kwargs):
    """``Bidirectional(LSTM)`` as a forward LSTM, a forward LSTM on the reversed sequence and a
    merge (the module docstring), weights copied."""
    from keras_qx.rewrite.tfop import TFOp

    x = args[0] if args else kwargs["inputs"]
    t = lambda i: {"__tensor__": i}  # noqa: E731
    name = layer.name

    def reverse(y, part):
        return _once(f"{name}/{part}", lambda: TFOp("reverse", {"args": [t(0)], "kwargs": {"axis": [1]}},
                                                    name=f"{name}/{part}"))(y)

    def lstm(sub, y, part):
        new = _copy(sub, f"{name}/{part}", go_backwards=False)
        y = new(y)
        new.set_weights(sub.get_weights())
        return y

    forward, backward = layer.forward_layer, layer.backward_layer
    if forward.go_backwards:  # Keras allows a backward_layer forward in time, the forward one backward
        forward, backward = backward, forward
    outputs = [lstm(forward, x, "forward"), lstm(backward, reverse(x, "reverse"), "backward")]
    if layer.return_sequences:
        outputs[1] = reverse(outputs[1], "reverse_output")
    if layer.forward_layer.go_backwards:
        outputs.reverse()
    if layer.merge_mode == "concat":
        return _once(f"{name}/concat", lambda: TFOp("concat", {"args": [[t(0), t(1)]], "kwargs": {"axis": -1}},
                                                    name=f"{name}/concat"))(outputs)
    merge = f"{name}/{layer.merge_mode}"
    return _once(merge, lambda: _MERGES[layer.merge_mode](name=merge))(outputs)


def _unfused_lstm(layer, args, kwargs):
    if isinstance(layer, keras.layers.Bidirectional) and _split_bidirectional(layer, args, kwargs):
        return _bidirectional(layer, args, kwargs)
    if isinstance(layer, keras.layers.Bidirectional):
        new = keras.layers.Bidirectional(_generic_lstm(layer.forward_layer.get_config(), layer.forward_layer.name),
                                         merge_mode=layer.merge_mode, name=layer.name,
                                         backward_layer=_generic_lstm(layer.backward_layer.get_config(),
                                                                      layer.backward_layer.name))
    else:
        new = _generic_lstm(layer.get_config(), layer.name)
    y = new(*args, **kwargs)
    new.set_weights(layer.get_weights())
    return y


def _swish(layer) -> bool:
    fn = getattr(layer, "activation", None)
    return type(layer) is keras.layers.Activation and getattr(fn, "__name__", "") in ("swish", "silu")


def _activation(x, activation, name: str):
    """``Activation(activation)`` applied to ``x``, with swish as sigmoid and Multiply."""
    fn = keras.activations.get(activation)
    if getattr(fn, "__name__", "") in ("swish", "silu"):
        gate = _once(f"{name}_sigmoid", lambda: keras.layers.Activation("sigmoid", name=f"{name}_sigmoid"))(x)
        return _once(name, lambda: keras.layers.Multiply(name=name))([x, gate])
    return _once(name, lambda: keras.layers.Activation(activation, name=name))(x)


def _rewrites(layer, copies: bool = True) -> bool:
    return (isinstance(layer, keras.Model) or _tf_op(layer) or isinstance(layer, keras.layers.SpectralNormalization)
            or is_inlinable(layer) or (copies and _copied(layer)))


def has_nested(model, keep=frozenset(), copies: bool = True) -> bool:
    """True if ``model`` holds layers that need rewriting (nested models, TF-op layers, and with
    ``copies`` MultiHeadAttention, Dense on sequences, split activations) not named in ``keep``."""
    return any(_rewrites(layer, copies) and layer.name not in keep for layer in model.layers)


@keras.utils.register_keras_serializable(package=PACKAGE)
class BiasAdd(keras.layers.Add):
    """``x + bias`` with a trainable ``bias`` of shape ``bias_shape`` (broadcast over the leading
    axes): the bias of an attention projection, split off because TFLite adds a (heads,
    key_dim) bias as an ADD of its own after the FULLY_CONNECTED, with an int8 rounding between
    that training must see (an ``Add``, so it is quantized as one).

    Example:
        >>> layer = BiasAdd((2, 4)); layer(keras.Input((6, 2, 4))).shape.as_list()
        [None, 6, 2, 4]
    """

    def __init__(self, bias_shape, **kwargs):
        super().__init__(**kwargs)
        self.bias_shape = tuple(int(d) for d in bias_shape)

    def build(self, input_shape):
        self.bias = self.add_weight("bias", shape=self.bias_shape, initializer="zeros", trainable=True)
        self.built = True

    def call(self, inputs):
        return inputs + self.bias

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "bias_shape": list(self.bias_shape)}


_made: dict = {}  # name -> layer made by a rewrite in this flatten_nested pass


def _once(name: str, make):
    """The layer named ``name`` this pass made already (a shared layer, or a nested model called
    twice, is rewritten once and its copies shared too), else ``make()``."""
    if name not in _made:
        _made[name] = make()
    return _made[name]


def _copy(layer, name: str, **overrides):
    """A new layer like ``layer``, named ``name``, with config ``overrides`` (the caller copies
    the weights once it is built)."""
    config = {**layer.get_config(), "name": name, **overrides}
    return _once(name, lambda: type(layer).from_config(config))


def _split_activation(layer, args, kwargs):
    """``layer`` as a copy (a SequenceDense for a Dense on sequences) with its activation split
    off when it is not one TFLite fuses."""
    config = layer.get_config()
    activation = config["activation"] if _activation_name(layer) is not None else None
    if _sequence_dense(layer):
        letters = "abcdefgh"[: len(layer.input_shape)]
        new = _once(layer.name, lambda: SequenceDense(f"{letters},{letters[-1]}z->{letters[:-1]}z",
                            output_shape=tuple(layer.output_shape[1:]), bias_axes="z" if layer.use_bias else None,
                            activation=None if activation else config["activation"], name=layer.name,
                            dtype=layer.dtype_policy))
    else:
        new = _copy(layer, layer.name, activation="linear")
    x = new(*args, **kwargs)
    new.set_weights(layer.get_weights())
    return _activation(x, activation, f"{layer.name}_activation") if activation else x


def _attention(layer, args, kwargs):
    """MultiHeadAttention as its parts (see the module docstring)."""
    kwargs = {k: v for k, v in kwargs.items() if k != "training"}
    names = ["query", "value", "key", "attention_mask", "return_attention_scores", "training",
             "use_causal_mask"]
    call = dict(zip(names, args))
    call.update(kwargs)
    masked = [k for k in ("attention_mask", "use_causal_mask", "return_attention_scores") if call.get(k)]
    masked += [k for k in ("query", "value", "key") if getattr(call.get(k), "_keras_mask", None) is not None]
    if masked:
        raise ValueError(
            f"keras_qx cannot quantize MultiHeadAttention {layer.name!r} with {masked}: a -1e9 mask "
            f"added before an int8 softmax destroys its scale. Keep it float with policy layers "
            f"{{{layer.name!r}: {{'quantize': false}}}} (qx.quantize then leaves it whole)."
        )
    query, value = call["query"], call["value"]
    key = call.get("key")
    key = value if key is None else key
    from keras_qx.rewrite.tfop import TFOp

    def project(sub, x, part):
        bias = getattr(sub, "bias", None)
        if bias is None or len(bias.shape) < 2:  # no bias, or one FULLY_CONNECTED fuses
            new = _copy(sub, f"{layer.name}_{part}")
            y = new(x)
            new.set_weights(sub.get_weights())
            return y
        new = _copy(sub, f"{layer.name}_{part}", bias_axes=None)
        y = new(x)
        new.set_weights([sub.kernel.numpy()])
        add = _once(f"{layer.name}_{part}_bias", lambda: BiasAdd(tuple(bias.shape), name=f"{layer.name}_{part}_bias"))
        y = add(y)
        add.set_weights([bias.numpy()])
        return y

    t = lambda i: {"__tensor__": i}  # noqa: E731
    parts = attention_parts(layer)
    q = project(parts["query"], query, "query")
    k = project(parts["key"], key, "key")
    v = project(parts["value"], value, "value")
    q = _once(f"{layer.name}_scale", lambda: TFOp("math.multiply", {"args": [t(0), 1.0 / math.sqrt(
        float(parts["key_dim"]))]}, name=f"{layer.name}_scale"))(q)
    scores = _once(f"{layer.name}_scores", lambda: TFOp("einsum", {"args": [parts["dot_product_equation"], t(0), t(1)]},
                                                        name=f"{layer.name}_scores"))([k, q])
    probs = _once(f"{layer.name}_softmax", lambda: keras.layers.Softmax(axis=parts["softmax_axis"],
                                                                         name=f"{layer.name}_softmax"))(scores)
    out = _once(f"{layer.name}_combine", lambda: TFOp("einsum", {"args": [parts["combine_equation"], t(0), t(1)]},
                                                      name=f"{layer.name}_combine"))([probs, v])
    return project(parts["output"], out, "output")


def _apply(model, inputs, keep, copies):
    """Re-run ``model``'s graph on ``inputs`` (a list), inlining nested models."""
    if isinstance(model, keras.Sequential) and not has_graph(model):
        x = inputs[0]
        for layer in model.layers:
            x = _call(layer, (x,), {}, keep, copies)
        return [x]
    levels, usage = graph_nodes(model)
    tensors = {}
    for ref, new in zip(model.inputs, inputs):
        tensors[str(id(ref))] = [new] * usage[str(id(ref))]
    for level in levels:
        for node in level:
            if node.is_input or any(t not in tensors for t in node.flat_input_ids):
                continue
            args, kwargs = node.map_arguments(tensors)
            outputs = _call(node.layer, args, kwargs, keep, copies)
            for ref_id, new in zip(node.flat_output_ids, tf.nest.flatten(outputs)):
                tensors[ref_id] = [new] * usage[ref_id]
    return [tensors[str(id(ref))].pop() for ref in model.outputs]


def _call(layer, args, kwargs, keep, copies):
    if isinstance(layer, keras.Model):
        if not is_graph_model(layer):
            raise TypeError(f"nested model {layer.name!r} is subclassed; keras_qx (like tfmot) needs "
                            "Sequential or Functional models all the way down.")
        outputs = _apply(layer, tf.nest.flatten(args[0] if args else kwargs.get("inputs")), keep, copies)
        return outputs[0] if len(outputs) == 1 else outputs
    if layer.name in keep or (not copies and _copied(layer)):
        return layer(*args, **kwargs)
    if is_inlinable(layer):
        return _inline(layer, args, kwargs, keep, copies)
    if isinstance(layer, keras.layers.SpectralNormalization):
        return _call(layer.layer, args, {k: v for k, v in kwargs.items() if k != "training"}, keep, copies)
    if isinstance(layer, keras.layers.MultiHeadAttention):
        return _attention(layer, args, kwargs)
    if _fused_lstm(layer):
        return _unfused_lstm(layer, args, kwargs)
    if _plain_layer_norm(layer):
        return _layer_norm(layer, args, kwargs)
    if type(layer) is keras.layers.RandomCrop:
        return _once(layer.name, lambda: InferenceRandomCrop.from_config(layer.get_config()))(*args, **kwargs)
    if _swish(layer):
        return _activation(args[0] if args else kwargs["inputs"], "swish", layer.name)
    if _activation_name(layer) is not None or _sequence_dense(layer):
        return _split_activation(layer, args, kwargs)
    if _tf_op(layer):
        from keras_qx.rewrite.tfop import from_tf_op_lambda

        op, tensors = from_tf_op_lambda(layer, args, kwargs)
        return op(tensors if len(tensors) > 1 else tensors[0])
    return layer(*args, **kwargs)


_unverified: list = []  # inlined layers whose own check could not run (see flatten_nested)


def _inline(layer, args, kwargs, keep, copies):
    """A custom layer's (or a Lambda's) call as its sublayers and ops
    (:mod:`keras_qx.rewrite.inline`), rewritten in turn; the layer whole, with a warning, where
    that cannot be done faithfully (a Lambda left whole is refused later, with the reason)."""
    try:
        graph, tensors = trace_layer(layer, args, kwargs)
        structure = (tuple(args), {k: v for k, v in kwargs.items() if k != "training"})
        flat = tf.nest.flatten(structure)

        def original(s):
            it = iter(s)
            a, k = tf.nest.pack_sequence_as(structure, [next(it) if hasattr(v, "_keras_history") else v for v in flat])
            return layer(*a, **k)

        try:
            check_agrees(original, graph, graph.inputs, "its traced graph")
        except ProbeFailed:
            _unverified.append(layer.name)  # checked with the whole model instead
        outputs = _apply(graph, tensors, keep, copies)
    except (NotTraceable, ValueError) as why:  # ValueError: an op a TFOp may not call
        if type(layer) is not keras.layers.Lambda:
            warnings.warn(
                f"keras_qx keeps custom layer {layer.name!r} ({type(layer).__name__}) whole and float: {why}. To "
                f"quantize it, teach keras_qx its kernels with qx.register_layer({type(layer).__name__}, "
                "weight_attrs=[...]) or annotate it with a tfmot QuantizeConfig.", stacklevel=4)
        return layer(*args, **kwargs)
    return tf.nest.pack_sequence_as(graph._nested_outputs, outputs)


def _float_id_inputs(model) -> set:
    """Indices of the float inputs that only feed ``Embedding`` lookups (and shape ops): token ids
    declared as ``Input(shape=(maxlen,))``, float32 by default. Quantized to int8 as a float input
    is, ids come back a fraction below themselves and the lookup truncates them to the previous
    token (measured: a text transformer fell from 100% to 80.5%), so they become int32 inputs."""
    if not has_graph(model):
        return set()
    from keras_qx.rewrite.tfop import INDEX_OPS

    levels, _ = graph_nodes(model)
    found = set()
    for i, ref in enumerate(model.inputs):
        if not ref.dtype.is_floating:
            continue
        consumers = [node.layer for level in levels for node in level
                     if not node.is_input and str(id(ref)) in node.flat_input_ids]
        if consumers and all(isinstance(l, keras.layers.Embedding) or getattr(l, "symbol", None) in INDEX_OPS
                             for l in consumers):
            found.add(i)
    return found


def _inputs_like(model, ids=frozenset()):
    return [keras.Input(batch_shape=t.shape, dtype="int32" if i in ids else t.dtype, name=t.name.split(":")[0])
            for i, t in enumerate(model.inputs)]


def flatten_nested(model, keep=frozenset(), copies: bool = True):
    """A functional model equal to ``model`` with the rewrites above done (``model`` itself if
    none applies); layers named in ``keep`` (e.g. kept float by the policy) stay whole;
    ``copies=False`` only does the rewrites that share the original layers (sensitivity
    analysis perturbs the model's own kernels). Float inputs that only feed Embedding lookups
    become int32 inputs (:func:`_float_id_inputs`; Keras casts the float ids it is given)."""
    ids = _float_id_inputs(model)
    if not has_nested(model, keep, copies) and not ids:
        return model
    original, keep = model, frozenset(keep)
    saved, saved_made = list(_unverified), dict(_made)
    _unverified.clear()
    _made.clear()
    try:
        for _ in range(2):  # a second pass when inlining revealed float token-id inputs
            inputs = _inputs_like(model, ids)
            outputs = _apply(model, inputs, keep, copies)
            model = keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name=model.name)
            ids = _float_id_inputs(model)
            if not ids:
                break
        unverified = list(_unverified)
    finally:
        _unverified[:] = saved
        _made.clear()
        _made.update(saved_made)
    if unverified:
        try:
            check_agrees(lambda s: original(s if len(s) > 1 else s[0]), lambda s: model(s if len(s) > 1 else s[0]),
                         original.inputs, "the model with them inlined")
        except (NotTraceable, ProbeFailed) as why:
            warnings.warn(f"keras_qx keeps custom layers {unverified} whole and float: {why}.", stacklevel=2)
            return flatten_nested(original, keep | set(unverified), copies)
    return model
