"""A tf_keras model's structure: its layer graph, its tfmot layers, and the checks that a model
is one keras_qx works on (Sequential or Functional, built, Keras 2).

The walks read tf_keras's and tfmot's private attributes of layers and models
(``_inbound_nodes``, ``_nodes_by_depth``, a wrapper's ``_output_quantizers``...): when a tf_keras
or tfmot release moves them, this file is where to look. It imports those libraries only through
``keras_qx._compat``.

Example:
    >>> from keras_qx._compat import keras
    >>> inputs = keras.Input((4,))
    >>> model = keras.Model(inputs, keras.layers.Dense(2, name="fc")(inputs))
    >>> [l.name for l in inbound_layers(model.get_layer("fc"))] == [model.layers[0].name]
    True
"""
from __future__ import annotations

import os

from keras_qx._compat import keras, quantize_layer, quantize_wrapper

__all__ = ["check_model", "check_float_model", "has_graph", "is_graph_model", "is_quantized_layer", "inbound_layers",
           "outbound_layers", "call_count", "output_in", "graph_nodes", "activation_sites"]


def check_model(model, what: str = "model") -> None:
    """Raise a clear error unless ``model`` is a built tf_keras Sequential/Functional model."""
    if isinstance(model, keras.Model):
        if not isinstance(model, keras.Sequential) and not has_graph(model):
            raise TypeError(
                f"{what} {model.name!r} is a subclassed tf_keras model ({type(model).__name__}); "
                "keras_qx (like tfmot) needs a Sequential or Functional model. Rebuild it with "
                "keras.Sequential([...]) or keras.Model(inputs, outputs)."
            )
        if not model.built:
            raise ValueError(
                f"{what} {model.name!r} is not built; call model.build(input_shape) or give the "
                "first layer an input_shape before quantizing."
            )
        return
    module = type(model).__module__ or ""
    if module.startswith("keras") or (hasattr(model, "layers") and hasattr(model, "predict")):
        raise TypeError(
            f"{what} is a {module}.{type(model).__name__} (Keras 3), but tfmot and keras_qx need "
            "Keras 2 models. Build the model with `import tf_keras as keras` (not `tf.keras` or "
            "`import keras`)."
        )
    if isinstance(model, os.PathLike) or (isinstance(model, str) and (
            os.path.exists(model) or model.endswith((".keras", ".h5", ".hdf5")))):
        raise TypeError(f"{what} is a path ({os.fspath(model)!r}), not a model; load it first with "
                        "qx.load_model(path).")
    raise TypeError(f"{what} must be a tf_keras Model (keras.Sequential or keras.Model(inputs, outputs)), "
                    f"got {type(model).__name__}.")


def check_float_model(model, what: str = "model") -> None:
    """:func:`check_model`, and raise if ``model`` is already a QAT model (from ``qx.quantize``)."""
    check_model(model, what)
    quantized = [l.name for l in model.layers if is_quantized_layer(l)]
    if quantized:
        raise ValueError(
            f"{what} {model.name!r} is already quantized (tfmot layers {quantized[:3]}); pass the float "
            "model it was made from. A QAT model trains with fit() and exports with qx.export_tflite as it is."
        )


def has_graph(model) -> bool:
    """The model keeps a layer graph (Functional, or a Sequential built from an input)."""
    return bool(getattr(model, "_is_graph_network", False))


def is_graph_model(model) -> bool:
    """A Sequential or Functional tf_keras model (not subclassed)."""
    return isinstance(model, keras.Model) and (has_graph(model) or isinstance(model, keras.Sequential))


def is_quantized_layer(layer) -> bool:
    """A tfmot ``QuantizeLayer`` or ``QuantizeWrapper`` (a layer of a QAT model that is not float)."""
    return isinstance(layer, (quantize_layer.QuantizeLayer, quantize_wrapper.QuantizeWrapper))


def inbound_layers(layer) -> list:
    """The layers feeding ``layer``'s first call (empty for an input)."""
    nodes = layer._inbound_nodes
    inbound = nodes[0].inbound_layers if nodes else []
    return list(inbound) if isinstance(inbound, (list, tuple)) else [inbound]


def outbound_layers(layer) -> list:
    """The layers that take ``layer``'s output."""
    return [node.outbound_layer for node in layer._outbound_nodes]


def call_count(layer) -> int:
    """How many times ``layer`` was called in any graph."""
    return len(layer._inbound_nodes)


def output_in(model, layer):
    """The layer's output tensor in ``model`` (tfmot may call a layer in an older graph too)."""
    nodes = getattr(model, "_network_nodes", set())
    for i in range(len(layer._inbound_nodes) - 1, -1, -1):
        if f"{layer.name}_ib-{i}" in nodes:
            return layer.get_output_at(i)
    return layer.output


def graph_nodes(model):
    """``(nodes by depth, deepest first; tensor usage counts)`` of a functional model."""
    by_depth = model._nodes_by_depth
    return [by_depth[d] for d in sorted(by_depth, reverse=True)], model._tensor_usage_count


def activation_sites(model) -> list:
    """Every activation range of a QAT model, as ``(layer name, holder, key, vars)``: the
    quantizer is ``holder.key`` (or ``holder[key]`` for a list) and ``vars`` holds its
    ``min_var``/``max_var``. Sites: a QuantizeLayer, a wrapper's output quantizer, and the
    pre/post ranges of its quantize-aware activations (one quantizer may serve two ranges)."""
    sites = []
    for layer in model.layers:
        if isinstance(layer, quantize_layer.QuantizeLayer) and layer.quantizer is not None:
            sites.append((layer.name, layer, "quantizer", getattr(layer, "quantizer_vars", None)))
        elif isinstance(layer, quantize_wrapper.QuantizeWrapper):
            for act in getattr(layer, "_quantize_activations", []):
                for name in ("_pre_activation_vars", "_post_activation_vars"):
                    sites.append((layer.name, act, "quantizer", getattr(act, name, None)))
            if getattr(layer, "_output_quantizers", None):
                sites.append((layer.name, layer._output_quantizers, 0, layer._output_quantizer_vars))
    return [s for s in sites if s[3] and "min_var" in s[3] and "max_var" in s[3]]
