"""Custom layers and subclassed models as the standard layers and TF ops their ``call`` composes.

A ``keras.layers.Layer`` subclass of the user's (the Keras examples' ``TransformerBlock``,
``TokenAndPositionEmbedding``, ``Patches``) is a single opaque node to tfmot: it refuses it, or
at best keeps it float. Its ``call`` usually composes standard layers and TF ops, though, and
the functional API records exactly that when ``call`` runs on symbolic inputs. So
:func:`trace_layer` runs ``layer.call`` on ``keras.Input`` tensors (``training=None``, so
dropout follows the learning phase as before), and the graph it records replaces the node
(``keras_qx.rewrite.flatten`` then rewrites its pieces like any others). The sublayers are the
layer's own objects (weights shared), renamed to their attribute path, ``<layer>/<attribute>``
(``transformer_block/att``, ``transformer_block/ffn/dense``; a list attribute adds the index,
``block/convs_0``), so a policy can name them. The renaming is the one change made to the
user's objects.

Not inlined, kept whole (float in the QAT model and the file, with a warning naming it and the
fix, ``qx.register_layer`` or a tfmot QuantizeConfig):

* a layer with weights of its own (``add_weight``): TF math on a raw variable has no quantizer
  and no integer kernel;
* a layer whose ``call`` cannot be traced (Python branching on tensor values, ``tf.py_function``,
  an op outside :data:`~keras_qx.rewrite.tfop.SAFE_TF_OPS`), or whose traced graph disagrees
  with the layer on sample inputs (random ops at inference, say).

A subclassed ``keras.Model`` whose ``call`` traces the same way becomes a Functional model
(:func:`as_functional`); one that does not is refused with the reason.

Example:
    >>> flat = flatten_nested(model_with_custom_layers)     # doctest: +SKIP
    >>> [l.name for l in flat.layers if "/" in l.name]      # doctest: +SKIP
    ['transformer_block/att_query', ..., 'transformer_block/ffn/dense']
"""
from __future__ import annotations

import inspect
import re
import warnings

import numpy as np

from keras_qx._compat import keras, tf

__all__ = ["is_custom_layer", "is_inlinable", "trace_layer", "as_functional", "check_agrees", "NotTraceable",
           "ProbeFailed", "sample_inputs", "TOLERANCE"]

TOLERANCE = 1e-4  # largest output difference allowed between a layer and its inlined graph, relative to scale

# Layer classes from these packages are standard: they are quantized as they are.
_STANDARD_MODULES = ("tf_keras.", "keras.", "keras_qx.", "tensorflow_model_optimization.", "tensorflow.")


class NotTraceable(Exception):
    """Why a custom layer or subclassed model cannot be inlined (the message says)."""


class ProbeFailed(Exception):
    """Random samples could not be run through the layer (shapes only known in the whole model)."""


def is_custom_layer(layer) -> bool:
    """A user's ``Layer`` subclass that keras_qx has not been told how to quantize."""
    from keras_qx.quant.kinds import custom_output, kernel_kind

    if isinstance(layer, keras.Model) or not isinstance(layer, keras.layers.Layer):
        return False
    if (type(layer).__module__ or "").startswith(_STANDARD_MODULES):
        return False
    return custom_output(type(layer)) is None and kernel_kind(layer) is None


def is_inlinable(layer) -> bool:
    """A custom layer, or a ``Lambda`` (whose Python function usually composes TF ops: the Keras
    examples' ``Lambda(euclidean_distance)``), which tfmot cannot clone in safe mode."""
    return is_custom_layer(layer) or type(layer) is keras.layers.Lambda


def _own_weights(layer) -> list:
    """Weights created by ``layer`` itself (``add_weight``), not by its sublayers."""
    inner = {id(w) for sub in layer._flatten_layers(include_self=False) for w in sub.weights}
    return [w for w in layer.weights if id(w) not in inner]


def _sublayers(layer) -> dict:
    """``{attribute path: sublayer}`` of the layers ``layer`` holds in its attributes."""
    found = {}
    for attr, value in vars(layer).items():
        if attr.startswith("_"):
            continue
        if isinstance(value, keras.layers.Layer):
            found[attr] = value
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "ListWrapper":
            for i, item in enumerate(value):
                if isinstance(item, keras.layers.Layer):
                    found[f"{attr}_{i}"] = item
        elif isinstance(value, dict) or type(value).__name__ == "_DictWrapper":
            for key, item in value.items():
                if isinstance(item, keras.layers.Layer):
                    found[f"{attr}_{key}"] = item
    return found


def _rename(layer, name: str) -> None:
    layer._name = name
    if isinstance(layer, keras.Model):  # a Sequential/Functional attribute: its layers too
        for sub in layer.layers:
            if not isinstance(sub, keras.layers.InputLayer) and not sub.name.startswith(name + "/"):
                _rename(sub, f"{name}/{sub.name}")


def _auto_named(layer) -> bool:
    """``layer.name`` is the one Keras made up from its class (``conv1d_3``), not the user's."""
    base = re.sub("([a-z])([A-Z])", r"\1_\2", re.sub("(.)([A-Z][a-z0-9]+)", r"\1_\2", type(layer).__name__)).lower()
    return re.fullmatch(rf"{re.escape(base)}(_\d+)?", layer.name) is not None


def _name_sublayers(layer) -> None:
    """Rename ``layer``'s sublayers to their attribute paths under ``layer.name`` (idempotent)."""
    for attr, sub in _sublayers(layer).items():
        path = f"{layer.name}/{attr}"
        if sub.name != path and not sub.name.startswith(path + "/"):
            _rename(sub, path)


def trace_layer(layer, args: tuple, kwargs: dict):
    """``(graph, tensors)``: a functional model of what ``layer(*args, **kwargs)`` computes,
    recorded from ``layer.call`` on symbolic copies of the tensor arguments, and the tensor
    arguments in the graph's input order.

    Raises:
        NotTraceable: the layer has weights of its own, or its ``call`` does not trace.
    """
    own = _own_weights(layer)
    if own:
        raise NotTraceable(f"it creates weights of its own ({', '.join(w.name for w in own[:3])}) and computes with "
                           "them directly; TF math on a raw variable has no integer kernel")
    kwargs = {k: v for k, v in kwargs.items() if k != "training"}
    params = inspect.signature(layer.call).parameters
    if "training" in params:
        kwargs["training"] = None  # sublayers follow the learning phase, as when Keras calls the layer
    flat = tf.nest.flatten((args, kwargs))
    tensors = [v for v in flat if hasattr(v, "_keras_history")]
    symbols = [keras.Input(batch_shape=t.shape, dtype=t.dtype) for t in tensors]
    replaced = iter(symbols)
    sym_args, sym_kwargs = tf.nest.pack_sequence_as(
        (args, kwargs), [next(replaced) if hasattr(v, "_keras_history") else v for v in flat])
    _name_sublayers(layer)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outputs = layer.call(*sym_args, **sym_kwargs)
            graph = keras.Model(symbols, outputs, name=f"{layer.name}_inlined")
    except Exception as err:  # any failure to trace means: keep the layer whole
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise NotTraceable(f"its call does not trace on symbolic inputs ({type(err).__name__}: {first[:200]})") from None
    if not graph.layers[len(symbols):]:
        raise NotTraceable("its call records no layers or ops on symbolic inputs")
    return graph, tensors


def sample_inputs(tensors, n: int = 4, seed: int = 0, length: int = 8, ids: bool = False) -> list:
    """Random samples for symbolic ``tensors``: normal floats, or with ``ids`` (and always for
    integer tensors) ids 0..2, which any vocabulary takes; ``None`` dimensions get ``length``."""
    rng = np.random.default_rng(seed)
    samples = []
    for t in tensors:
        shape = [n] + [d if d is not None else length for d in t.shape[1:]]
        dtype = tf.as_dtype(t.dtype)
        if ids or dtype.is_integer or dtype.is_bool:
            samples.append(rng.integers(0, 3, size=shape).astype(dtype.as_numpy_dtype))
        else:
            samples.append(rng.normal(size=shape).astype(dtype.as_numpy_dtype))
    return samples


def check_agrees(reference, candidate, tensors, what: str, tolerance: float = TOLERANCE) -> float:
    """The largest output difference of two callables on samples for symbolic ``tensors``
    (normal floats; token ids 0..2 where floats are refused, e.g. an ``Embedding`` on a float
    input), relative to the output scale; raises :class:`NotTraceable` above ``tolerance``."""
    samples = sample_inputs(tensors)
    try:
        ref = tf.nest.flatten(reference(samples))
    except (tf.errors.InvalidArgumentError, ValueError):
        samples = sample_inputs(tensors, ids=True)
        try:
            ref = tf.nest.flatten(reference(samples))
        except Exception as err:  # e.g. a None axis whose real length only the whole model knows
            raise ProbeFailed(str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__) from None
    got = tf.nest.flatten(candidate(samples))
    worst = 0.0
    for r, g in zip(ref, got):
        r, g = np.asarray(r, dtype=np.float64), np.asarray(g, dtype=np.float64)
        if r.shape != g.shape:
            raise NotTraceable(f"{what} gives shape {g.shape}, the original {r.shape}")
        worst = max(worst, float(np.max(np.abs(r - g), initial=0.0) / max(np.max(np.abs(r), initial=0.0), 1e-6)))
    if worst > tolerance:
        raise NotTraceable(f"{what} differs from the original on sample inputs (max relative difference "
                           f"{worst:.2g}: random or stateful ops at inference?)")
    return worst


def _call_inputs(model):
    """Symbolic inputs for a built subclassed model, from the shapes it was built or called with."""
    spec = getattr(model, "_saved_model_inputs_spec", None)
    if spec is None:
        shape = getattr(model, "_build_input_shape", None)
        if shape is None:
            raise NotTraceable("it has never been built or called, so its input shape is unknown; call "
                               "model.build(input_shape) or run it on a batch first")
        spec = tf.nest.map_structure(lambda s: tf.TensorSpec(s, tf.float32), shape,
                                     check_types=False) if not isinstance(shape, tf.TensorShape) else \
            tf.TensorSpec(shape, tf.float32)
    return tf.nest.map_structure(lambda s: keras.Input(batch_shape=s.shape, dtype=s.dtype, name=s.name), spec)


def as_functional(model, what: str = "model"):
    """A Functional model computing what the subclassed tf_keras ``model`` computes, its
    layers shared (the same weights), checked to agree on sample inputs. Layers Keras named
    after their class (``conv1d_3``) take their attribute's name (``conv``), which a policy
    can use.

    Raises:
        TypeError: ``call`` cannot be traced on ``keras.Input`` (the message says what blocked it).
    """
    taken = {sub.name for sub in model._flatten_layers(include_self=False)}
    for attr, sub in _sublayers(model).items():  # model.conv, not "conv1d_3", unless the user named it
        if _auto_named(sub) and attr not in taken:
            taken.add(attr)
            sub._name = attr
    try:
        inputs = _call_inputs(model)
        call_kwargs = {"training": None} if "training" in inspect.signature(model.call).parameters else {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outputs = model.call(inputs, **call_kwargs)
                functional = keras.Model(inputs, outputs, name=model.name)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise NotTraceable(f"its call does not trace on keras.Input ({type(err).__name__}: {first[:200]})") from None
        flat_inputs = tf.nest.flatten(inputs)
        packed = lambda s: tf.nest.pack_sequence_as(inputs, s) if len(s) > 1 else s[0]  # noqa: E731
        check_agrees(lambda s: model(packed(s), training=False), lambda s: functional(s, training=False),
                     flat_inputs, "the traced model")
    except NotTraceable as why:
        raise TypeError(
            f"{what} {model.name!r} is a subclassed tf_keras model ({type(model).__name__}) that keras_qx cannot "
            f"turn into a Functional one: {why}. Rebuild it with keras.Model(inputs, outputs), or make its call "
            "a composition of layers and TF ops without Python branching on tensor values."
        ) from None
    return functional
