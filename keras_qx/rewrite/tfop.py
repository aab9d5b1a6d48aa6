"""``TFOp``: a TF op on tensors with constant arguments, as a layer tfmot can wrap.

The functional API records raw TF calls on Keras tensors (``x + 3.0``, ``tf.math.multiply``,
``x[:, 1:]``) as ``TFOpLambda``/``SlicingOpLambda`` layers whose constant arguments travel as
call keywords; tfmot's ``QuantizeWrapper`` drops those keywords, so such models cannot be
quantized. ``qx.quantize`` rewrites each one into a :class:`TFOp` that keeps the constants in
its config (JSON) and takes only tensors as inputs.

A ``TFOp`` may only call side-effect-free TF ops (:data:`SAFE_TF_OPS` and ``tf.math``): a
saved model is data, and one edited to call ``tf.io.write_file`` or ``tf.py_function`` is
refused when it is built or loaded, before anything runs.

Example:
    >>> op = TFOp("__operators__.add", {"args": [{"__tensor__": 0}, 3.0], "kwargs": {}})
    >>> op(tf.constant([1.0])).numpy()        # doctest: +SKIP
    array([4.], dtype=float32)
"""
from __future__ import annotations

import json

from keras_qx._compat import PACKAGE, keras, tf, tf_symbol

__all__ = ["TFOp", "from_tf_op_lambda", "VALUE_PRESERVING", "INDEX_OPS", "SAFE_TF_OPS", "is_safe_tf_op", "check_tf_op"]

# Ops that only move values: no new range, so no output quantizer of their own.
VALUE_PRESERVING = {"__operators__.getitem", "reshape", "transpose", "compat.v1.transpose",
                    "identity", "expand_dims", "squeeze", "compat.v1.squeeze", "split", "concat", "reverse",
                    "stack", "nn.relu", "math.maximum", "math.minimum", "nn.relu6"}

# Ops whose outputs are shapes, positions or masks (integers or booleans), not activations: no
# quantizer (e.g. ``tf.range(tf.shape(x)[-1])`` feeding a position Embedding).
INDEX_OPS = {"shape", "compat.v1.shape", "range", "rank", "size", "compat.v1.size", "argsort", "sequence_mask"}


# The TF ops a TFOp may call, by the name TFOpLambda records (TF 2.x canonical names, some of
# them compat.v1): pure functions of their inputs, with no file or network I/O, printing,
# variables, queues or Python callbacks. Everything under tf.math is allowed as well (pure
# math by construction). Anything else (tf.io.*, tf.print, tf.py_function, tf.raw_ops.*...)
# is refused.
SAFE_TF_OPS = frozenset({
    # Python operators on tensors
    "__operators__.add", "__operators__.eq", "__operators__.ne", "__operators__.getitem",
    # shapes, layouts and selection
    "reshape", "transpose", "compat.v1.transpose", "linalg.matrix_transpose", "identity", "expand_dims",
    "squeeze", "compat.v1.squeeze", "split", "concat", "stack", "unstack", "tile", "pad", "compat.v1.pad",
    "gather", "compat.v1.gather", "gather_nd", "compat.v1.gather_nd", "slice", "strided_slice", "reverse",
    "broadcast_to", "shape", "compat.v1.shape", "rank", "size", "compat.v1.size", "cast", "zeros_like",
    "ones_like", "compat.v1.zeros_like", "compat.v1.ones_like", "where", "compat.v1.where", "clip_by_value",
    "one_hot", "sort", "argsort", "repeat", "roll", "boolean_mask", "compat.v1.boolean_mask", "stop_gradient",
    "sequence_mask", "range", "zeros", "ones", "fill", "eye", "linspace", "image.extract_patches",
    "compat.v1.image.extract_image_patches", "math.reduce_mean",
    # products and norms
    "einsum", "linalg.matmul", "tensordot", "norm", "compat.v1.norm", "linalg.norm",
    # tf.nn activations and fixed computations
    "nn.relu", "nn.relu6", "nn.gelu", "nn.silu", "nn.swish", "nn.softmax", "nn.log_softmax", "nn.elu", "nn.selu",
    "nn.leaky_relu", "nn.softsign", "nn.softplus", "nn.sigmoid", "nn.tanh", "nn.crelu", "nn.bias_add",
    "nn.l2_normalize", "nn.moments", "nn.batch_normalization", "nn.depth_to_space", "nn.space_to_depth",
    "nn.avg_pool", "nn.avg_pool1d", "nn.avg_pool2d", "nn.max_pool", "nn.max_pool1d", "nn.max_pool2d",
    "nn.conv1d", "nn.conv2d", "compat.v1.nn.conv2d", "nn.depthwise_conv2d", "compat.v1.nn.depthwise_conv2d",
    "nn.convolution", "image.resize", "compat.v1.image.resize",
})
SAFE_TF_NAMESPACES = ("math.",)


def is_safe_tf_op(symbol: str) -> bool:
    """``symbol`` (a TFOpLambda name such as ``"math.multiply"``) is on the allowlist."""
    return isinstance(symbol, str) and (symbol in SAFE_TF_OPS or symbol.startswith(SAFE_TF_NAMESPACES))


def check_tf_op(symbol, layer: str | None = None, loading: bool = False) -> None:
    """Raise ``ValueError`` unless ``symbol`` is a side-effect-free TF op (see :data:`SAFE_TF_OPS`)."""
    if is_safe_tf_op(symbol):
        return
    where = f"layer {layer!r} " if layer else ""
    replace = "replace that call in the model with a Keras layer (a keras.layers.Layer subclass) or remove it."
    fix = ("This holds whatever safe_mode says: do not load a file you did not write; if you wrote it, rebuild "
           f"the model from its code and {replace}" if loading else replace[0].upper() + replace[1:])
    raise ValueError(f"{where}calls tf.{symbol}, which is not on keras_qx's allowlist of side-effect-free TF "
                     f"ops (keras_qx.rewrite.tfop.SAFE_TF_OPS and tf.math): a TFOp may only compute, never do "
                     f"file I/O, print or call Python. {fix}")


def _extract_patches(images, sizes, strides, rates, padding, name=None):
    """``tf.image.extract_patches`` as RESHAPE and TRANSPOSE where the patches do not overlap
    (the ViT example's ``sizes == strides``, ``rates`` 1, VALID): TFLite has no
    EXTRACT_IMAGE_PATCHES kernel, so the converter refuses the op itself. The last axis keeps
    TF's order (patch row, patch column, channel)."""
    sizes, strides, rates = list(sizes), list(strides), list(rates)
    h, w, c = images.shape[1:]
    ph, pw = sizes[1], sizes[2]
    if (sizes != strides or any(r != 1 for r in rates) or str(padding).upper() != "VALID"
            or None in (h, w, c) or h % ph or w % pw):
        return tf.image.extract_patches(images, sizes, strides, rates, padding, name=name)
    x = tf.reshape(images, [-1, h // ph, ph, w // pw, pw, c])
    x = tf.transpose(x, [0, 1, 3, 2, 4, 5])
    return tf.reshape(x, [-1, h // ph, w // pw, ph * pw * c])


def _rsqrt(x, name=None):
    """``tf.math.rsqrt`` with a finite gradient at 0: in QAT its input is fake-quantized, so a
    small variance rounds to 0, its rsqrt is inf, clipped by the next fake-quant (whose gradient
    there is 0), and TF's own gradient, 0 * inf, would be NaN."""
    return _safe_rsqrt(tf.convert_to_tensor(x))


@tf.custom_gradient
def _safe_rsqrt(x):
    y = tf.math.rsqrt(x)

    def grad(dy):
        safe = tf.math.rsqrt(tf.maximum(x, tf.cast(1e-12, x.dtype)))
        return dy * tf.cast(-0.5, x.dtype) * safe * safe * safe

    return y, grad


_OWN = {"image.extract_patches": _extract_patches, "math.rsqrt": _rsqrt}  # computed as ops the converter has


def _symbol(name: str, layer: str | None = None):
    check_tf_op(name, layer)
    fn = _OWN.get(name) or tf_symbol(name)
    if fn is None:
        raise ValueError(f"unknown TF symbol {name!r} in TFOp layer {layer!r}.")
    return fn


def _encode(value, tensors: list):
    """Constants -> JSON-able; Keras tensors -> ``{"__tensor__": i}`` placeholders."""
    if hasattr(value, "_keras_history") or (isinstance(value, (tf.Tensor, tf.Variable))
                                            and not hasattr(value, "numpy")):
        tensors.append(value)
        return {"__tensor__": len(tensors) - 1}
    if isinstance(value, tf.Tensor):  # an eager constant (e.g. computed in a custom layer's call
        # from Python ints: the Keras examples' position embeddings of tf.range(num_patches))
        return {"__array__": value.numpy().tolist(), "__array_dtype__": value.dtype.name}
    if isinstance(value, slice):
        return {"__slice__": [_encode(v, tensors) for v in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"__ellipsis__": True}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v, tensors) for k, v in value.items()}
    if isinstance(value, tf.DType):
        return {"__dtype__": value.name}
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalar
        return value.item()
    if hasattr(value, "tolist"):
        return {"__array__": value.tolist()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot keep argument {value!r} of a TF op as layer config.")


def _decode(value, tensors):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__slice__" in value:
            return slice(*(_decode(v, tensors) for v in value["__slice__"]))
        if "__ellipsis__" in value:
            return Ellipsis
        if "__tuple__" in value:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if "__dtype__" in value:
            return tf.as_dtype(value["__dtype__"])
        if "__array__" in value:
            return tf.constant(value["__array__"], dtype=value.get("__array_dtype__"))
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


@keras.utils.register_keras_serializable(package=PACKAGE)
class TFOp(keras.layers.Layer):
    """Apply the TF symbol ``symbol`` to ``template`` with its tensor placeholders filled
    from the layer's inputs (a tensor, or a list of tensors)."""

    def __init__(self, symbol: str, template: dict, **kwargs):
        fn = _symbol(symbol, kwargs.get("name"))  # before anything else: refuse unsafe ops first
        super().__init__(**kwargs)
        self.symbol = symbol
        self._template = json.dumps(template)  # a string: Keras would wrap a dict attribute
        self._fn = fn

    @property
    def template(self) -> dict:
        return json.loads(self._template)

    def call(self, inputs):
        tensors = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        template = self.template
        args = _decode(template.get("args", []), tensors)
        kwargs = _decode(template.get("kwargs", {}), tensors)
        if self.symbol == "__operators__.getitem":
            return args[0][args[1]]
        return self._fn(*args, **kwargs)

    def get_config(self):
        return {**super().get_config(), "symbol": self.symbol, "template": self.template}

    @classmethod
    def from_config(cls, config):
        check_tf_op(config.get("symbol"), config.get("name"), loading=True)
        return cls(**config)


def _slices(value):
    """SlicingOpLambda keeps slices as ``{"start", "stop", "step"}`` dicts: make them slices."""
    if isinstance(value, dict) and set(value) == {"start", "stop", "step"}:
        return slice(value["start"], value["stop"], value["step"])
    if isinstance(value, (list, tuple)):
        return type(value)(_slices(v) for v in value)
    return value


def from_tf_op_lambda(layer, args, kwargs):
    """``(TFOp, tensors)`` replacing a ``TFOpLambda`` call ``layer(*args, **kwargs)``."""
    tensors = []
    kwargs = {k: v for k, v in kwargs.items() if k != "name"}
    if layer.symbol == "__operators__.getitem":
        # SlicingOpLambda records (tensor, slice_spec); keep the spec as a constant argument.
        spec = _slices(args[1] if len(args) > 1 else kwargs["slice_spec"])
        if isinstance(spec, list):
            spec = tuple(spec)  # a list index means gather; the recorded spec is a tuple of slices
        template = {"args": [_encode(args[0], tensors), _encode(spec, tensors)]}
    else:
        template = {"args": _encode(list(args), tensors), "kwargs": _encode(kwargs, tensors)}
    return TFOp(layer.symbol, template, name=layer.name), tensors
