"""The one place keras_qx imports TensorFlow, tf_keras, tfmot and keras_tuner (the LiteRT runtime:
``_runtime.py``, which also runs as a child process).

tfmot only works with Keras 2 (``tf_keras``); TF 2.16+ ships Keras 3 as
``tf.keras``. Everything in keras_qx imports Keras from here so that a Keras 3
object can never slip in unnoticed.

Importing this module leaves the environment as it was: the variables TensorFlow reads while it
imports are set only for those imports (:func:`_import_environ`). It changes one thing outside
keras_qx, once and idempotently: tfmot's ``QuantizeLayer`` and ``QuantizeWrapper`` get the
``build_from_config`` and ``load_own_variables`` that tf_keras 2.21's ``.keras`` loader needs to
read them (see :func:`_install_keras_format_fixes`). They are used by that loader only.

The graph walks and model checks are in ``keras_qx/_graph.py``, seeding in ``keras_qx/_seed.py``.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

import numpy as np


@contextlib.contextmanager
def _import_environ(**values):
    """Set the environment variables ``values`` (where the user has not) for the block, then
    put those variables back as they were, set or unset.

    TensorFlow reads both only while it imports: ``TF_USE_LEGACY_KERAS`` when its lazy
    ``tf.keras`` loaders first resolve (tfmot resolves them as it imports, after setting the
    variable itself), ``TF_CPP_MIN_LOG_LEVEL`` when its C++ logging starts. So the imports
    below run inside this block and ``import keras_qx`` leaves ``os.environ`` as it found it.
    """
    saved = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


with _import_environ(TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2"):
    import tensorflow as tf
    import tf_keras as keras
    import tensorflow_model_optimization as tfmot
    from tensorflow.python.eager import context as tf_context
    from tensorflow_model_optimization.python.core.clustering.keras import cluster_config, cluster_wrapper
    from tensorflow_model_optimization.python.core.quantization.keras import (
        quant_ops,
        quantize_annotate,
        quantize_config as tfmot_quantize_config,
        quantize_layer,
        quantize_registry as tfmot_quantize_registry,
        quantize_scheme as tfmot_quantize_scheme,
        quantize_wrapper,
        quantizers as tfmot_quantizers,
    )
    from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
        default_8bit_quantize_configs,
        default_8bit_quantize_layout_transform,
        default_8bit_quantize_registry,
        default_8bit_transforms,
    )
    from tensorflow_model_optimization.python.core.quantization.keras.graph_transformations import (
        model_transformer,
    )
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper  # private in tfmot
    from tf_keras.src import backend as keras_backend

__all__ = [
    "tf",
    "keras",
    "tfmot",
    "quant_ops",
    "quantize_annotate",
    "tfmot_quantize_config",
    "quantize_layer",
    "tfmot_quantize_registry",
    "tfmot_quantize_scheme",
    "quantize_wrapper",
    "tfmot_quantizers",
    "default_8bit_quantize_configs",
    "default_8bit_quantize_layout_transform",
    "default_8bit_quantize_registry",
    "default_8bit_transforms",
    "model_transformer",
    "pruning_wrapper",
    "cluster_config",
    "cluster_wrapper",
    "tf_context",
    "keras_backend",
    "keras_tuner",
    "smart_cond",
    "attention_parts",
    "tfmot_layer_quantize_map",
    "has_custom_quantize_config",
    "own_variables",
    "tflite_schema",
    "tf_symbol",
    "safe_mode_scope",
    "saved_model_layer_configs",
    "keras3",
    "keras3_model_kind",
    "keras3_layer_weights",
    "keras3_predict",
    "keras3_load_model",
    "keras3_init_defaults",
    "keras3_submodel",
]

PACKAGE = "keras_qx"


def keras_tuner():
    """Import keras_tuner lazily: it imports Keras 3 and costs seconds."""
    import keras_tuner as kt

    return kt


def keras3():
    """Import Keras 3 (``import keras``) lazily: it costs seconds, and only a Keras 3 model or
    file needs it."""
    import keras as keras3_module

    return keras3_module


def keras3_model_kind(obj) -> str | None:
    """``"sequential"``, ``"functional"`` or ``"subclassed"`` for a Keras 3 model, ``"layer"``
    for another Keras 3 layer, None for anything else. Imports nothing: a Keras 3 object exists
    only if Keras 3 was imported already."""
    k3 = sys.modules.get("keras")
    if k3 is None or k3 is keras or not hasattr(k3, "Model") or not hasattr(k3, "layers"):
        return None
    try:
        if not isinstance(obj, k3.layers.Layer):
            return None
    except TypeError:
        return None
    if not isinstance(obj, k3.Model):
        return "layer"
    cls = type(obj)
    if cls.__module__.startswith("keras.src.models."):  # the library's own classes, not a user's subclass
        if isinstance(obj, k3.Sequential):
            return "sequential"
        if cls.__name__ == "Functional":
            return "functional"
    return "subclassed"


def keras3_layer_weights(layer) -> list:
    """A Keras 3 layer's weights as numpy arrays, in the order tf_keras's ``get_weights`` lists
    them, without the random-seed states Keras 3 keeps as variables (``Dropout``'s)."""
    return [np.asarray(v.numpy()) for v in layer.weights if "seed_generator" not in v.path]


def keras3_predict(model, inputs: list) -> list:
    """A Keras 3 model's outputs (inference mode) on ``inputs`` (one array per model input),
    flattened to a list of numpy arrays."""
    k3 = keras3()
    outputs = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    return [np.asarray(k3.ops.convert_to_numpy(o)) for o in k3.tree.flatten(outputs)]


def keras3_init_defaults(class_name: str, module: str = "layers") -> dict:
    """The default arguments of Keras 3's ``keras.<module>.<class_name>`` (its bases' too);
    empty if Keras 3 has no such class."""
    import inspect

    cls = getattr(getattr(keras3(), module, None), class_name, None)
    defaults = {}
    for base in reversed(getattr(cls, "__mro__", ())):
        init = base.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        defaults.update({p.name: p.default for p in params if p.default is not p.empty})
    return defaults


def keras3_submodel(model, layer):
    """A Keras 3 model from ``model``'s inputs to ``layer``'s output (for locating a layer)."""
    inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras3().Model(inputs, layer.output)


def keras3_load_model(path: str, safe_mode: bool):
    """A Keras 3 model file loaded by Keras 3 (uncompiled; Keras 3's own safe mode)."""
    return keras3().saving.load_model(path, compile=False, safe_mode=bool(safe_mode))


# Private internals of tf_keras, tfmot and TF, imported or called only here (they move between versions);
# the walks over their private attributes of models and layers are in keras_qx/_graph.py.


def smart_cond(pred, true_fn, false_fn):
    """tf_keras's ``smart_cond``: a Python branch for a constant ``pred``, else ``tf.cond``."""
    from tf_keras.src.utils import control_flow_util

    return control_flow_util.smart_cond(pred, true_fn, false_fn)


def attention_parts(layer) -> dict:
    """A built ``MultiHeadAttention``'s sublayers and equations."""
    return {"query": layer._query_dense, "key": layer._key_dense, "value": layer._value_dense,
            "output": layer._output_dense, "key_dim": layer._key_dim,
            "dot_product_equation": layer._dot_product_equation,
            "combine_equation": layer._combine_equation, "softmax_axis": layer._softmax.axis}


def tfmot_layer_quantize_map() -> dict:
    """tfmot's default 8-bit registry table: layer class -> its quantize info."""
    return default_8bit_quantize_registry.Default8BitQuantizeRegistry()._layer_quantize_map


def has_custom_quantize_config(match_layer) -> bool:
    return default_8bit_transforms._has_custom_quantize_config(match_layer)


def own_variables(layer) -> list:
    """A layer's variables in the order its ``.keras`` file stores them."""
    layer._update_trackables()
    return layer._trainable_weights + layer._non_trainable_weights


def tflite_schema():
    """TensorFlow's generated flatbuffer schema module for ``.tflite`` files."""
    from tensorflow.lite.python import schema_py_generated

    return schema_py_generated


def tflite_model_object(data: bytes):
    """A ``.tflite`` flatbuffer as TensorFlow's mutable schema object (``ModelT``)."""
    from tensorflow.lite.tools import flatbuffer_utils

    return flatbuffer_utils.read_model_from_bytearray(bytearray(data))  # handles >2 GB offset buffers


def tflite_model_bytes(model) -> bytes:
    """Inverse of :func:`tflite_model_object`."""
    from tensorflow.lite.tools import flatbuffer_utils

    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


@contextlib.contextmanager
def quantize_apply_in_place(model):
    """While tfmot's ``quantize_apply(model, ...)`` runs: its first step, a clone of ``model`` with
    its weights so that nothing it does can change them, hands back ``model`` itself. That clone is
    a full copy of the weights, plus a numpy copy while setting them; tfmot's transformer then
    builds every layer anew from the config anyway, reading the weights only. For a model the
    caller built for the call (``qx.quantize``'s annotated copy)."""
    from tensorflow_model_optimization.python.core.quantization.keras import quantize as tfmot_quantize

    real = tfmot_quantize.keras

    class _Models:
        def __getattr__(self, name):
            return getattr(real.models, name)

        @staticmethod
        def clone_model(to_clone, *args, **kwargs):
            return to_clone if to_clone is model and not args and not kwargs else \
                real.models.clone_model(to_clone, *args, **kwargs)

    class _Keras:
        models = _Models()

        def __getattr__(self, name):
            return getattr(real, name)

    model.get_weights = lambda: None  # the clone's set_weights(model.get_weights()): nothing to copy
    model.set_weights = lambda weights: None
    tfmot_quantize.keras = _Keras()
    try:
        yield
    finally:
        tfmot_quantize.keras = real
        del model.get_weights, model.set_weights


def tflite_int8_io(data: bytes) -> bytes:
    """A converted file with its float32 inputs and outputs made int8 (integer inputs stay), as
    the converter does for ``inference_input_type = tf.int8`` after calibrating."""
    from tensorflow.lite.python.util import modify_model_io_type

    return bytes(modify_model_io_type(data, tf.int8, tf.int8))


def tflite_deduplicate(data: bytes) -> bytes:
    """The converter's last step: identical read-only buffers shared."""
    from tensorflow.lite.python.convert import deduplicate_readonly_buffers

    return bytes(deduplicate_readonly_buffers(data))


@contextlib.contextmanager
def tflite_buffers_kept_apart():
    """While converting: the converter does not share identical buffers (stand-ins rounding to
    the same integers would share one; :mod:`keras_qx.lite.light` writes each, then shares with :func:`tflite_deduplicate`)."""
    from tensorflow.lite.python import lite

    saved = lite._deduplicate_readonly_buffers
    lite._deduplicate_readonly_buffers = lambda model: model
    try:
        yield
    finally:
        lite._deduplicate_readonly_buffers = saved


def tf_symbol(name: str):
    """The TF API symbol named ``name`` (``"math.multiply"``), or None."""
    from tensorflow.python.util.tf_export import get_symbol_from_name

    return get_symbol_from_name(name)


def _load_wrapper_variables(layer, store):
    """``load_own_variables`` for tfmot wrappers saved in the ``.keras`` format.

    A wrapper built around an already-built layer (as ``quantize_apply`` makes them) lists
    the inner layer's trainable weights twice, so the file holds more entries than a freshly
    loaded wrapper has; the extra entries are the leading ones. Drop them, check shapes.
    """
    variables = own_variables(layer)
    saved = [store[str(i)] for i in range(len(store.keys()))]
    extra = len(saved) - len(variables)
    if extra < 0:
        raise ValueError(f"layer {layer.name!r}: the file holds {len(saved)} variables, the model needs "
                         f"{len(variables)}; the file was not written from this architecture.")
    for var, value in zip(variables, saved[extra:]):
        if tuple(var.shape) != tuple(value.shape):
            raise ValueError(f"layer {layer.name!r}: variable {var.name} has shape {tuple(var.shape)} but "
                             f"the file holds {tuple(value.shape)}.")
        var.assign(value)


def _skip_build_from_config(self, config):
    """tfmot layers build once, when first called; the loader's early build would build twice."""


def _install_keras_format_fixes() -> None:
    """Teach tfmot's layers tf_keras 2.21's ``.keras`` loader, once (idempotent).

    Both methods are called only by that loader (``saving_lib`` and ``serialization_lib``), so
    nothing else changes. Per-call patching inside ``quantize_scope`` was not thread-safe and
    made tfmot's classes differ inside and outside the scope.
    """
    fixes = [(quantize_layer.QuantizeLayer, "build_from_config", _skip_build_from_config),
             (quantize_wrapper.QuantizeWrapper, "build_from_config", _skip_build_from_config),
             (quantize_wrapper.QuantizeWrapper, "load_own_variables", _load_wrapper_variables)]
    for cls, name, fn in fixes:
        if cls.__dict__.get(name) is not fn:
            setattr(cls, name, fn)


_install_keras_format_fixes()


def safe_mode_scope(safe_mode: bool):
    """tf_keras's safe-mode flag for the block; its legacy (h5, SavedModel) loaders read it too
    (``Lambda``/RNN cell wrappers refuse Python bytecode) but never set it themselves."""
    from tf_keras.src.saving import serialization_lib

    return serialization_lib.SafeModeScope(bool(safe_mode))


def saved_model_layer_configs(path) -> list:
    """The Keras metadata (``class_name``, ``config``...) of every object of a SavedModel
    directory written by tf_keras, as dicts; empty if it holds none.

    Raises:
        ValueError: ``keras_metadata.pb`` is unreadable.
    """
    from google.protobuf import message
    from tf_keras.protobuf import saved_metadata_pb2

    file = os.path.join(os.fspath(path), "keras_metadata.pb")
    if not os.path.exists(file):
        return []
    metadata = saved_metadata_pb2.SavedMetadata()
    try:
        with open(file, "rb") as fh:
            metadata.ParseFromString(fh.read())
        return [json.loads(node.metadata) for node in metadata.nodes if node.metadata]
    except (message.DecodeError, ValueError) as err:
        raise ValueError(f"{file!r} is corrupt ({err}); save the model again.") from err
