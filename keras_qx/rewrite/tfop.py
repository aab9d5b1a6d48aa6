"""``TFOp``: a TF op on tensors with constant arguments, as a layer tfmot can wrap.

The functional API records raw TF calls on Keras tensors (``x + 3.0``, ``tf.math.multiply``,
``x[:, 1:]``) as ``TFOpLambda``/``SlicingOpLambda`` layers whose constant arguments travel as
call keywords; tfmot's ``QuantizeWrapper`` drops those keywords, so such models cannot be
quantized. ``qx.quantize`` rewrites each one into a :class:`TFOp` that keeps the constants in
its config (JSON) and takes only tensors as inputs.

Example:
    >>> op = TFOp("__operators__.add", {"args": [{"__tensor__": 0}, 3.0], "kwargs": {}})
    >>> op(tf.constant([1.0])).numpy()        # doctest: +SKIP
    array([4.], dtype=float32)
"""
from __future__ import annotations

import json

from keras_qx._compat import PACKAGE, keras, tf, tf_symbol

__all__ = ["TFOp", "from_tf_op_lambda", "VALUE_PRESERVING"]

# Ops that only move values: no new range, so no output quantizer of their own.
VALUE_PRESERVING = {"__operators__.getitem", "reshape", "transpose", "compat.v1.transpose",
                    "identity", "expand_dims", "squeeze", "compat.v1.squeeze", "split", "concat",
                    "stack", "nn.relu", "math.maximum", "math.minimum", "nn.relu6"}


def _symbol(name: str):
    fn = tf_symbol(name)
    if fn is None:
        raise ValueError(f"unknown TF symbol {name!r} in a TFOp layer.")
    return fn


def _encode(value, tensors: list):
    """Constants -> JSON-able; Keras tensors -> ``{"__tensor__": i}`` placeholders."""
    if isinstance(value, (tf.Tensor, tf.Variable)) or hasattr(value, "_keras_history"):
        tensors.append(value)
        return {"__tensor__": len(tensors) - 1}
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
            return tf.constant(value["__array__"])
        return {k: _decode(v, tensors) for k, v in value.items()}
    return value


@keras.utils.register_keras_serializable(package=PACKAGE)
class TFOp(keras.layers.Layer):
    """Apply the TF symbol ``symbol`` to ``template`` with its tensor placeholders filled
    from the layer's inputs (a tensor, or a list of tensors)."""

    def __init__(self, symbol: str, template: dict, **kwargs):
        super().__init__(**kwargs)
        self.symbol = symbol
        self._template = json.dumps(template)  # a string: Keras would wrap a dict attribute
        self._fn = _symbol(symbol)

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
