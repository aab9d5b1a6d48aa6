"""Rewrite a model into the layers tfmot can quantize, keeping names and weights.

* Nested models (a Sequential/Functional model used as a layer: ConvNeXt's stem and head,
  user backbones) are inlined: tfmot cannot quantize a model inside a model.
* Raw TF calls recorded as ``TFOpLambda``/``SlicingOpLambda`` layers (``x + 3.0``,
  ``tf.math.multiply``, slicing) become :class:`~keras_qx.tfop.TFOp` layers.

``qx.quantize`` does this first. Layers (and weights) are shared with the original model, not
copied, and keep their names, so a policy can name inner layers.

Example:
    >>> flat = flatten_nested(model)      # doctest: +SKIP
"""
from __future__ import annotations

from keras_qx._compat import keras, tf

__all__ = ["flatten_nested", "has_nested"]


def _is_graph(model) -> bool:
    return isinstance(model, keras.Model) and (
        getattr(model, "_is_graph_network", False) or isinstance(model, keras.Sequential))


def _tf_op(layer) -> bool:
    return type(layer).__name__ in ("TFOpLambda", "SlicingOpLambda")


def has_nested(model) -> bool:
    """True if ``model`` holds nested models or TF-op layers that need rewriting."""
    return any(isinstance(layer, keras.Model) or _tf_op(layer) for layer in model.layers)


def _apply(model, inputs):
    """Re-run ``model``'s graph on ``inputs`` (a list), inlining nested models."""
    if isinstance(model, keras.Sequential) and not getattr(model, "_is_graph_network", False):
        x = inputs[0]
        for layer in model.layers:
            x = _call(layer, (x,), {})
        return [x]
    usage = model._tensor_usage_count
    tensors = {}
    for ref, new in zip(model.inputs, inputs):
        tensors[str(id(ref))] = [new] * usage[str(id(ref))]
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            if node.is_input or any(t not in tensors for t in node.flat_input_ids):
                continue
            args, kwargs = node.map_arguments(tensors)
            outputs = _call(node.layer, args, kwargs)
            for ref_id, new in zip(node.flat_output_ids, tf.nest.flatten(outputs)):
                tensors[ref_id] = [new] * usage[ref_id]
    return [tensors[str(id(ref))].pop() for ref in model.outputs]


def _call(layer, args, kwargs):
    if isinstance(layer, keras.Model):
        if not _is_graph(layer):
            raise TypeError(f"nested model {layer.name!r} is subclassed; keras_qx (like tfmot) needs "
                            "Sequential or Functional models all the way down.")
        outputs = _apply(layer, tf.nest.flatten(args[0] if args else kwargs.get("inputs")))
        return outputs[0] if len(outputs) == 1 else outputs
    if _tf_op(layer):
        from keras_qx.tfop import from_tf_op_lambda

        op, tensors = from_tf_op_lambda(layer, args, kwargs)
        return op(tensors if len(tensors) > 1 else tensors[0])
    return layer(*args, **kwargs)


def flatten_nested(model):
    """A functional model equal to ``model`` with every nested model inlined (``model`` itself
    if it has none)."""
    if not has_nested(model):
        return model
    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name.split(":")[0]) for t in model.inputs]
    outputs = _apply(model, inputs)
    return keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name=model.name)
