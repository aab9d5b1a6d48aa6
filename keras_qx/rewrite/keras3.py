"""Keras 3 models rebuilt as tf_keras: :func:`from_keras3`, called by every front door.

tfmot (so keras_qx) quantizes tf_keras models only. A Keras 3 Sequential or Functional model
of standard layers is rebuilt as tf_keras: its config is mapped to tf_keras's format (the
``batch_shape`` of an ``InputLayer``, dtype policies, initializers and regularizers as Keras 3
serializes them, the call arguments of each node), each layer's weights are copied (shapes
checked), and the two models are run on the same random inputs; they must agree. What cannot
be rebuilt (a subclassed model, a custom layer, a ``keras.ops`` call, a setting tf_keras lacks)
is refused, naming the layer.

The Keras 3 objects themselves are reached through ``keras_qx._compat``; this module maps
configs (plain dicts) and compares numbers.

Example:
    >>> tfk_model = from_keras3(keras3_model)      # doctest: +SKIP
"""
from __future__ import annotations

import inspect

import numpy as np

from keras_qx._compat import keras, keras3_init_defaults, keras3_layer_weights, keras3_model_kind, keras3_predict, keras3_submodel
from keras_qx._graph import is_graph_model

__all__ = ["from_keras3", "as_tf_keras", "is_keras3_model", "tf_keras_config", "Keras3Error", "TOLERANCE"]

TOLERANCE = 1e-4  # max |difference| allowed, relative to max(1, max |Keras 3 output|)

_FIX = "Rebuild the model with `import tf_keras as keras` (same layers and names), copy the weights " \
       "(layer.set_weights(k3_layer.get_weights())) and pass that."
_MODELS = ("Sequential", "Functional", "Model")
_OBJECT_MODULES = {"keras.initializers": "initializers", "keras.regularizers": "regularizers",
                   "keras.constraints": "constraints"}
# Arguments Keras 3 renamed: {class: {Keras 3 name: tf_keras name}}.
_RENAMED = {"InputLayer": {"batch_shape": "batch_input_shape"}, "LeakyReLU": {"negative_slope": "alpha"}}
# Keys a tf_keras class's from_config reads that Keras 3 configs lack (the layer builds when called).
_TF_KERAS_KEYS = {"MultiHeadAttention": {"query_shape": None, "key_shape": None, "value_shape": None}}
_BASE_LAYER_KEYS = {"name", "trainable", "dtype", "dynamic", "input_dim", "input_shape", "batch_input_shape",
                    "batch_size", "weights", "activity_regularizer", "autocast"}


class Keras3Error(ValueError):
    """A Keras 3 model that cannot be rebuilt as tf_keras (the message names the layer)."""


def is_keras3_model(model) -> bool:
    return keras3_model_kind(model) in ("sequential", "functional", "subclassed")


def as_tf_keras(model, what: str = "model"):
    """``model`` itself unless it is a Keras 3 model, which is rebuilt by :func:`from_keras3`, or a
    subclassed tf_keras model, traced into a Functional one by
    :func:`~keras_qx.rewrite.inline.as_functional`."""
    if is_keras3_model(model):
        return from_keras3(model, what)
    if isinstance(model, keras.Model) and not is_graph_model(model) and model.built:
        from keras_qx.rewrite.inline import as_functional

        return as_functional(model, what)
    return model


def from_keras3(model, what: str = "model", samples=None, tolerance: float = TOLERANCE):
    """A tf_keras model with the config and weights of the Keras 3 ``model``, checked to agree.

    Args:
        model: a built Keras 3 Sequential or Functional model of standard layers.
        samples: inputs to compare the two models on (one array, or one per input); default:
            4 random samples per input (normal floats; integer ids below the smallest
            ``Embedding.input_dim``).
        tolerance: the largest output difference allowed, relative to the output scale.

    Raises:
        TypeError: a subclassed Keras 3 model (or not a Keras 3 model).
        Keras3Error: a layer that cannot be rebuilt (named), or the rebuilt model disagrees.
    """
    kind = keras3_model_kind(model)
    if kind not in ("sequential", "functional"):
        if kind == "subclassed":
            raise TypeError(f"{what} {model.name!r} is a subclassed Keras 3 model ({type(model).__name__}); "
                            "keras_qx rebuilds only Keras 3 Sequential and Functional models as tf_keras. "
                            + _FIX)
        raise TypeError(f"{what} is not a Keras 3 model (got {type(model).__name__}).")
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(f"{what} {model.name!r} (Keras 3) is not built; give it an Input before quantizing.")
    config = tf_keras_config(model.get_config(), "Sequential" if kind == "sequential" else "Functional")
    cls = keras.Sequential if kind == "sequential" else keras.Model
    try:
        rebuilt = cls.from_config(config)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise Keras3Error(f"{what} {model.name!r} (Keras 3) could not be rebuilt as tf_keras: {err}. "
                          + _FIX) from err
    _copy_weights(model, rebuilt)
    _check_agreement(model, rebuilt, samples, tolerance, what)
    return rebuilt


# ---- configs ------------------------------------------------------------------------------------

def tf_keras_config(config: dict, class_name: str = "Functional") -> dict:
    """A Keras 3 model config (``model.get_config()``) in tf_keras's format."""
    # tf_keras counts a nested model's calls from 1 (node 0 links its own Input to its outputs)
    shifted = {_entry_name(e) for e in config.get("layers", []) if _skips_first_node(e)}
    layers = [_layer_entry(entry, shifted) for entry in config.get("layers", [])]
    out = {"name": config.get("name"), "layers": layers}
    if "trainable" in config:
        out["trainable"] = config["trainable"]
    if class_name == "Sequential":
        if config.get("build_input_shape") is not None:
            out["build_input_shape"] = config["build_input_shape"]
    else:
        out["input_layers"] = config["input_layers"]
        out["output_layers"] = _shift(config["output_layers"], shifted)
        _check_references(out, shifted)
    return out


def _check_references(config: dict, shifted: set) -> None:
    """Every node input names a layer of the config and a call it has: tf_keras's loader would
    loop forever on a reference it can never resolve."""
    calls = {l.get("name"): (len(l.get("inbound_nodes") or []), l["class_name"]) for l in config["layers"]}

    def walk(value, layer):
        if isinstance(value, list) and len(value) in (3, 4) and isinstance(value[0], str) \
                and isinstance(value[1], int):
            count, kind = calls.get(value[0], (None, None))
            if count is None or (kind != "InputLayer" and value[1] >= count + (value[0] in shifted)):
                raise Keras3Error(f"layer {layer!r} takes the output of {value[0]!r} (call {value[1]}), which the "
                                  "model config does not hold; keras_qx cannot rebuild it. " + _FIX)
            if len(value) == 4:
                walk(value[3], layer)
        elif isinstance(value, list):
            for v in value:
                walk(v, layer)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v, layer)

    for entry in config["layers"]:
        walk(entry.get("inbound_nodes") or [], entry.get("name"))


def _skips_first_node(entry: dict) -> bool:
    """A nested model whose first tf_keras node is its own (a Functional, a Sequential with an Input)."""
    if entry.get("class_name") in ("Functional", "Model"):
        return True
    layers = (entry.get("config") or {}).get("layers") or []
    return entry.get("class_name") == "Sequential" and bool(layers) and layers[0].get("class_name") == "InputLayer"


def _shift(refs, shifted: set):
    """``[layer, node, tensor]`` references (any nesting) with nested models' node indices + 1."""
    if isinstance(refs, list) and len(refs) == 3 and isinstance(refs[0], str) and isinstance(refs[1], int):
        return [refs[0], refs[1] + (refs[0] in shifted), refs[2]]
    if isinstance(refs, list):
        return [_shift(r, shifted) for r in refs]
    return refs


def _entry_name(entry: dict) -> str:
    inner = entry.get("config")
    return entry.get("name") or (inner.get("name") if isinstance(inner, dict) else None) or "?"


def _layer_entry(entry: dict, shifted: set = frozenset()) -> dict:
    """One layer of a model config: class, mapped config and inbound nodes."""
    class_name, module = entry.get("class_name"), entry.get("module") or ""
    name = _entry_name(entry)
    if class_name == "Lambda":
        raise Keras3Error(f"layer {name!r} is a Keras 3 Lambda layer: its Python function cannot be carried over "
                          "from the Keras 3 config. " + _FIX)
    if module.startswith(("keras.src.ops", "keras.ops")):
        raise Keras3Error(f"layer {name!r} is a keras.ops call ({module}.{class_name}), which tf_keras cannot "
                          "rebuild; use a layer instead (keras.layers.Activation, Add, Multiply...). " + _FIX)
    registered = entry.get("registered_name")
    if module not in ("keras", "keras.layers", "keras.models") or registered not in (None, class_name):
        raise Keras3Error(f"layer {name!r} is a custom Keras 3 layer ({registered or f'{module}.{class_name}'}); "
                          "keras_qx rebuilds only the standard layers tf_keras also has. " + _FIX)
    tf_cls = _tf_class(class_name)
    if tf_cls is None:
        raise Keras3Error(f"layer {name!r} is a Keras 3 {class_name}, which tf_keras does not have. " + _FIX)
    if class_name in _MODELS:
        config = tf_keras_config(entry["config"], "Sequential" if class_name == "Sequential" else "Functional")
        class_name = "Functional" if class_name == "Model" else class_name
    else:
        config = _layer_config(tf_cls, entry.get("config") or {}, name)
        if class_name == "MultiHeadAttention":  # tf_keras builds it from these (Keras 3: build_config)
            shapes = (entry.get("build_config") or {}).get("shapes_dict") or {}
            for key in ("query_shape", "value_shape"):
                config[key] = config.get(key) or shapes.get(key)
            config["key_shape"] = config.get("key_shape") or shapes.get("key_shape") or config["value_shape"]
        try:
            tf_cls.from_config(dict(config))
        except (ValueError, TypeError, KeyError) as err:
            raise Keras3Error(f"layer {name!r} ({class_name}): its Keras 3 config does not build a tf_keras "
                              f"{class_name} ({err}). " + _FIX) from err
    out = {"class_name": class_name, "config": config}
    if "name" in entry:
        out["name"] = entry["name"]
    if "inbound_nodes" in entry:
        out["inbound_nodes"] = [_node(node, tf_cls, name, shifted) for node in entry["inbound_nodes"]]
    return out


def _tf_class(class_name: str):
    if class_name == "Sequential":
        return keras.Sequential
    if class_name in ("Functional", "Model"):
        return keras.Model
    cls = getattr(keras.layers, class_name, None)
    return cls if isinstance(cls, type) and issubclass(cls, keras.layers.Layer) else None


def _init_keys(cls) -> set:
    """The keyword arguments ``cls(...)`` takes (its own and its bases', up to ``Layer``)."""
    keys = set()
    for base in cls.__mro__:
        init = base.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        keys |= {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(init).parameters.values()):
            break
    return keys


def _layer_config(tf_cls, config: dict, name: str) -> dict:
    """A layer's Keras 3 config mapped to ``tf_cls``'s arguments: renamed keys, nested objects
    in tf_keras's form; Keras 3-only settings dropped when off (None/False), refused otherwise."""
    renamed = _RENAMED.get(tf_cls.__name__, {})
    config = {renamed.get(k, k): v for k, v in config.items()}
    accepted = _init_keys(tf_cls) | _BASE_LAYER_KEYS
    if tf_cls is keras.layers.InputLayer:
        accepted |= {"batch_input_shape", "optional"}
    out, defaults = {}, None
    for key, value in config.items():
        if key not in accepted:
            if value is None or value is False:
                continue  # a Keras 3 feature left off (quantization_config, use_gate, rms_scaling...)
            if defaults is None:
                defaults = keras3_init_defaults(tf_cls.__name__)
            if key in defaults and _same(defaults[key], value):
                continue  # a Keras 3 feature at its default
            raise Keras3Error(f"layer {name!r} ({tf_cls.__name__}) sets {key}={value!r}, a Keras 3 setting "
                              "tf_keras does not have. " + _FIX)
        out[key] = _value(value, f"layer {name!r} ({tf_cls.__name__}) argument {key!r}")
    for key, value in _TF_KERAS_KEYS.get(tf_cls.__name__, {}).items():
        out.setdefault(key, value)
    return out


def _same(default, value) -> bool:
    try:
        return bool(default == value) or (isinstance(default, tuple) and list(default) == value)
    except (TypeError, ValueError):
        return False


def _value(value, where: str):
    """A config value in tf_keras's form (nested serialized objects mapped)."""
    if isinstance(value, list):
        return [_value(v, where) for v in value]
    if not isinstance(value, dict):
        return value
    class_name, module = value.get("class_name"), value.get("module")
    if class_name in ("__tuple__", "__numpy__", "__tensor__") and isinstance(value.get("config"), dict):
        return _value(value["config"].get("value"), where)
    if class_name is None or "config" not in value:
        return {k: _value(v, where) for k, v in value.items()}
    if class_name in ("DTypePolicy", "FloatDTypePolicy", "Policy") and module in ("keras", None):
        policy = value["config"].get("name")
        if policy in ("float16", "float32", "float64", "bfloat16"):
            return policy
        if policy in ("mixed_float16", "mixed_bfloat16"):
            return {"class_name": "Policy", "config": {"name": policy}}
    if module in _OBJECT_MODULES and value.get("registered_name") in (None, class_name):
        tf_cls = getattr(getattr(keras, _OBJECT_MODULES[module]), class_name, None)
        if isinstance(tf_cls, type):
            inner = dict(value["config"] or {})
            accepted = _init_keys(tf_cls)
            dropped = {k: v for k, v in inner.items() if k not in accepted}
            if all(v is None or v is False for v in dropped.values()):
                return {"class_name": class_name,
                        "config": {k: _value(v, where) for k, v in inner.items() if k in accepted}}
            raise Keras3Error(f"{where} is a Keras 3 {class_name} with {dropped}, which tf_keras's "
                              f"{class_name} does not take. " + _FIX)
    raise Keras3Error(f"{where} is a Keras 3 {module}.{class_name} ({value.get('registered_name') or 'built in'}), "
                      "which keras_qx cannot map to tf_keras. " + _FIX)


# ---- nodes --------------------------------------------------------------------------------------

def _call_args(tf_cls) -> tuple[list, bool]:
    """``(argument names after the first, takes **kwargs)`` of ``tf_cls.call``."""
    params = list(inspect.signature(tf_cls.call).parameters.values())[1:]  # self
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names[1:], any(p.kind is p.VAR_KEYWORD for p in params)


def _is_tensor(value) -> bool:
    return isinstance(value, dict) and value.get("class_name") == "__keras_tensor__"


def _history(value, shifted: set) -> list:
    name, node, index = value["config"]["keras_history"]
    return [name, node + (name in shifted), index]


def _node(node: dict, tf_cls, name: str, shifted: set = frozenset()) -> list:
    """A Keras 3 node (``{"args": [...], "kwargs": {...}}``) in tf_keras's form: one
    ``[layer, node, tensor, kwargs]`` per tensor of the first argument, the other arguments as
    kwargs, tensors in kwargs as ``[layer, node, tensor]``."""
    if isinstance(node, list):  # already tf_keras's form
        return node
    args, kwargs = list(node.get("args") or []), dict(node.get("kwargs") or {})
    if not args:
        raise Keras3Error(f"layer {name!r} is called without a positional input, which tf_keras's config "
                          "format cannot record. " + _FIX)
    names, var_kw = _call_args(tf_cls) if tf_cls is not None else ([], True)
    if len(args) - 1 > len(names):
        raise Keras3Error(f"layer {name!r} is called with {len(args)} positional arguments; tf_keras's "
                          f"{tf_cls.__name__}.call takes {len(names) + 1}. " + _FIX)
    kwargs.update(zip(names, args[1:]))
    call_kwargs = {}
    for key, value in kwargs.items():
        if key not in names and not var_kw:
            if value is None:
                continue  # e.g. mask=None on a layer whose tf_keras call has no mask
            raise Keras3Error(f"layer {name!r} is called with {key}=..., an argument tf_keras's "
                              f"{tf_cls.__name__} does not take. " + _FIX)
        call_kwargs[key] = _kwarg(value, name, shifted)

    def first(value):
        if _is_tensor(value):
            return _history(value, shifted) + [call_kwargs]
        if isinstance(value, (list, tuple)):
            return [first(v) for v in value]
        if isinstance(value, dict) and value.get("class_name") is None:
            return {k: first(v) for k, v in value.items()}
        raise Keras3Error(f"layer {name!r} takes a constant ({value!r}) as its input, which keras_qx cannot "
                          "rebuild. " + _FIX)

    data = first(args[0])
    return [data] if _is_tensor(args[0]) else data


def _kwarg(value, name: str, shifted: set):
    if _is_tensor(value):
        return _history(value, shifted)
    if isinstance(value, (list, tuple)):
        return [_kwarg(v, name, shifted) for v in value]
    if isinstance(value, dict):
        if value.get("class_name") in ("__tuple__", "__numpy__", "__tensor__"):
            return _value(value, f"layer {name!r} call argument")
        return {k: _kwarg(v, name, shifted) for k, v in value.items()}
    return value


# ---- weights and agreement ----------------------------------------------------------------------

def _sublayers(model) -> list:
    return [l for l in model.layers if type(l).__name__ != "InputLayer"]


def _copy_weights(source, target) -> None:
    """Each layer's weights from the Keras 3 ``source`` into the tf_keras ``target`` (by name)."""
    for layer in _sublayers(source):
        try:
            twin = target.get_layer(layer.name)
        except ValueError as err:
            raise Keras3Error(f"layer {layer.name!r} of the Keras 3 model has no twin in the rebuilt tf_keras "
                              "model. " + _FIX) from err
        if keras3_model_kind(layer) in ("sequential", "functional"):
            _copy_weights(layer, twin)
            continue
        values = keras3_layer_weights(layer)
        variables = twin.weights
        if len(values) != len(variables):
            raise Keras3Error(f"layer {layer.name!r} ({type(layer).__name__}) holds {len(values)} weights in Keras 3 "
                              f"but {len(variables)} in tf_keras; keras_qx cannot copy them. " + _FIX)
        for var, value in zip(variables, values):
            if tuple(var.shape) != tuple(value.shape):
                raise Keras3Error(f"layer {layer.name!r} ({type(layer).__name__}): weight {var.name} has shape "
                                  f"{tuple(var.shape)} in tf_keras but {tuple(value.shape)} in Keras 3. " + _FIX)
        twin.set_weights(values)


def _embedding_limit(model) -> int:
    """The smallest ``Embedding.input_dim`` in the model (nested ones too), else 2."""
    dims = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            dims.append(_embedding_limit(layer))
        elif isinstance(layer, keras.layers.Embedding):
            dims.append(int(layer.input_dim))
    return max(1, min(dims)) if dims else 2


def _random_inputs(model, n: int = 4) -> list:
    rng = np.random.default_rng(0)
    out = []
    for tensor in model.inputs:
        shape = [n] + [d if d is not None else 8 for d in tensor.shape[1:]]
        dtype = tensor.dtype.name if hasattr(tensor.dtype, "name") else str(tensor.dtype)
        if dtype.startswith(("int", "uint")):
            out.append(rng.integers(0, _embedding_limit(model), size=shape).astype(dtype))
        elif dtype == "bool":
            out.append(rng.integers(0, 2, size=shape).astype(bool))
        else:
            out.append(rng.standard_normal(shape).astype(dtype))
    return out


def _check_agreement(source, rebuilt, samples, tolerance: float, what: str) -> None:
    """Raise unless the two models' outputs agree on ``samples`` (random ones by default)."""
    if samples is None:
        inputs = _random_inputs(rebuilt)
    else:
        inputs = [np.asarray(s) for s in (samples if isinstance(samples, (list, tuple)) else [samples])]
    expected = keras3_predict(source, inputs)
    got = rebuilt(inputs if len(inputs) > 1 else inputs[0], training=False)
    got = [np.asarray(g) for g in (got if isinstance(got, (list, tuple)) else
                                   [got[k] for k in sorted(got)] if isinstance(got, dict) else [got])]
    if len(got) != len(expected):
        raise Keras3Error(f"{what} {source.name!r}: the rebuilt tf_keras model has {len(got)} outputs, the Keras 3 "
                          f"model {len(expected)}. " + _FIX)
    for i, (a, b) in enumerate(zip(expected, got)):
        problem = _disagreement(a, b, tolerance)
        if problem:
            layer = _first_disagreeing_layer(source, rebuilt, inputs, tolerance)
            blame = (f"layer {layer!r} computes differently in the two Kerases" if layer else
                     "some layer computes differently in the two Kerases")
            raise Keras3Error(f"{what} {source.name!r}: the tf_keras rebuild disagrees with the Keras 3 model on "
                              f"output {i} ({problem}); {blame}. " + _FIX)


def _disagreement(a: np.ndarray, b: np.ndarray, tolerance: float) -> str | None:
    """Why ``b`` is not ``a`` within ``tolerance`` (relative to ``a``'s scale), or None."""
    if a.shape != b.shape:
        return f"shapes {a.shape} vs {b.shape}"
    if not a.size:
        return None
    scale = max(1.0, float(np.max(np.abs(a))))
    diff = float(np.max(np.abs(a.astype("float64") - b.astype("float64"))))
    if not np.isfinite(diff) or diff > tolerance * scale:
        return f"max difference {diff:.3g}, allowed {tolerance * scale:.3g}"
    return None


def _first_disagreeing_layer(source, rebuilt, inputs, tolerance: float) -> str | None:
    """The first layer (in the Keras 3 model's order) whose own output differs, or None."""
    for layer in _sublayers(source):
        try:
            expected = keras3_predict(keras3_submodel(source, layer), inputs)
            twin = keras.Model(rebuilt.inputs, rebuilt.get_layer(layer.name).output)
            got = twin(inputs if len(inputs) > 1 else inputs[0], training=False)
        except (ValueError, TypeError, AttributeError, KeyError):
            continue  # a layer called twice, or inside a nested model: not located
        got = [np.asarray(g) for g in (got if isinstance(got, (list, tuple)) else [got])]
        if len(got) != len(expected) or any(_disagreement(a, b, tolerance) for a, b in zip(expected, got)):
            return layer.name
    return None
