"""Saving and loading QAT models: ``quantize_scope()`` and ``load_model(path)``.

``load_model`` keeps Keras's safe mode on for every format: tf_keras enforces it only for
``.keras`` files, so ``.h5`` files and SavedModel directories (whose ``Lambda`` layers are
marshalled Python bytecode) are checked here, from their model config, before anything loads.
A SavedModel directory also holds TF graphs that run when it is called, which no config
check can vet: load SavedModels only from sources you trust.

A file written by Keras 3 (``.keras`` or ``.h5`` with ``keras_version`` 3.x) is checked the
same way, loaded by Keras 3 (its safe mode on too) and rebuilt as a tf_keras model
(``keras_qx.rewrite.keras3``).
"""
from __future__ import annotations

import contextlib
import json
import os
import zipfile

from keras_qx._compat import (PACKAGE, keras, keras3_load_model, safe_mode_scope, saved_model_layer_configs, tf,
                              tfmot)
from keras_qx.rewrite.keras3 import from_keras3
from keras_qx.rewrite.tfop import is_safe_tf_op

__all__ = ["refresh_normalization", "quantize_scope", "custom_objects", "load_model", "unsafe_layers", "file_keras_version"]


def custom_objects() -> dict:
    """Every object registered under the ``keras_qx`` package, by both its plain and its
    namespaced name, so that files written by any keras_qx version resolve."""
    objects = {}
    for key, obj in keras.saving.get_custom_objects().items():
        if key.startswith(PACKAGE + ">"):
            objects[key] = obj
            objects[key.split(">", 1)[1]] = obj
    return objects


@contextlib.contextmanager
def quantize_scope(*extra: dict):
    """tfmot's ``quantize_scope`` plus every keras_qx object (from the registry).

    Inside it, ``keras.models.load_model`` also reads QAT models saved as ``.keras`` (keras_qx
    teaches tfmot's layers that format once, when imported: see ``keras_qx._compat``).

    Example:
        >>> with qx.quantize_scope():                          # doctest: +SKIP
        ...     model = keras.models.load_model("qat.keras")
    """
    with tfmot.quantization.keras.quantize_scope(custom_objects(), *extra) as scope:
        yield scope


def _class_name(entry: dict) -> str:
    """``"Lambda"`` for ``"Lambda"``, ``"keras.layers.Lambda"`` or ``"pkg>Lambda"``."""
    return str(entry.get("class_name", "")).rsplit(">", 1)[-1].rsplit(".", 1)[-1]


def unsafe_layers(config) -> list[str]:
    """The layers of a serialized model (any nesting) that would run code from the file:
    ``Lambda`` layers (Python bytecode or a function looked up by name) and raw TF calls
    (``TFOpLambda``) outside keras_qx's allowlist of side-effect-free ops."""
    found = []

    def walk(node):
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            kind, inner = _class_name(node), node.get("config")
            name = inner.get("name") if isinstance(inner, dict) else node.get("name")
            if kind == "Lambda":
                found.append(f"Lambda layer {name!r}")
            elif kind in ("TFOpLambda", "SlicingOpLambda") and isinstance(inner, dict) \
                    and not is_safe_tf_op(inner.get("function")):
                found.append(f"layer {name!r} calling tf.{inner.get('function')}")
            for value in node.values():
                walk(value)

    walk(config)
    return list(dict.fromkeys(found))  # a SavedModel lists each layer more than once


def _model_config(path: str):
    """The serialized model of the file or directory at ``path`` (for :func:`unsafe_layers`),
    with clear errors for what is not a model file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no saved model at {path!r}; qx.load_model reads .keras and .h5 files and "
                                "SavedModel directories.")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"cannot read {path!r}: permission denied.")
    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt")):
            raise ValueError(f"{path!r} is a directory but not a SavedModel (it has no saved_model.pb); pass a "
                             ".keras or .h5 file, or a directory written by model.save(directory).")
        return saved_model_layer_configs(path)
    if zipfile.is_zipfile(path):
        if not path.endswith(".keras"):
            raise ValueError(f"{path!r} is a zip archive: if it is a .keras model, rename it to end in .keras.")
        try:
            with zipfile.ZipFile(path) as archive:
                return json.loads(archive.read("config.json"))
        except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as err:
            raise ValueError(f"{path!r} is not a readable .keras file ({err}); it may be truncated or "
                             "corrupt: save the model again.") from err
    import h5py

    if h5py.is_hdf5(path):
        try:
            with h5py.File(path, "r") as fh:
                config = fh.attrs.get("model_config")
        except OSError as err:
            raise ValueError(f"{path!r} is not a readable HDF5 file ({err}); it may be truncated or corrupt: "
                             "save the model again.") from err
        if config is None:
            raise ValueError(f"{path!r} holds no model, only weights (an HDF5 weights file?); build the model in "
                             f"code and call model.load_weights({path!r}).")
        try:
            return json.loads(config.decode() if isinstance(config, bytes) else config)
        except ValueError as err:
            raise ValueError(f"{path!r} has a corrupt model config ({err}); save the model again.") from err
    with open(path, "rb") as fh:
        if fh.read(8)[4:8] == b"TFL3":
            raise ValueError(f"cannot load {path!r}: it is a TFLite file, not a Keras model; use qx.inspect_tflite or "
                             "qx.evaluate_tflite on it, and qx.load_model on the .keras/.h5 file it came from.")
    kind = (".keras file (a zip archive)" if path.endswith(".keras") else ".h5 file (HDF5)"
            if path.endswith((".h5", ".hdf5")) else "Keras model (.keras, .h5 or a SavedModel directory)")
    raise ValueError(f"{path!r} is not a valid {kind}: it is truncated, corrupt or something else. Save the "
                     "model again with model.save(path).")


def file_keras_version(path: str) -> str | None:
    """The Keras version that wrote the ``.keras`` or ``.h5`` file at ``path`` (None if it
    does not say, or for a SavedModel directory)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if "metadata.json" not in archive.namelist():
                    return None
                return str(json.loads(archive.read("metadata.json")).get("keras_version") or "") or None
        import h5py

        if h5py.is_hdf5(path):
            with h5py.File(path, "r") as fh:
                version = fh.attrs.get("keras_version")
            return (version.decode() if isinstance(version, bytes) else str(version)) if version is not None else None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, AttributeError):
        return None
    return None


def _is_keras3_file(path: str) -> bool:
    version = file_keras_version(path) if os.path.isfile(path) else None
    return bool(version) and version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 3


def _load_keras3(path: str, safe_mode: bool):
    """A Keras 3 file: loaded by Keras 3, rebuilt as tf_keras (config and weights, checked)."""
    try:
        model = keras3_load_model(path, safe_mode)
    except (ValueError, KeyError, TypeError, EOFError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"cannot load {path!r} (a Keras {file_keras_version(path)} file) with Keras 3: {err}") from err
    return from_keras3(model, f"the Keras 3 model in {path!r}")


def load_model(path, compile: bool = True, *, safe_mode: bool = True):
    """Load a QAT (or float) model saved as ``.keras``, ``.h5`` or a SavedModel directory.

    A float model saved by Keras 3 (``import keras``) is loaded by Keras 3 and returned rebuilt
    as tf_keras (same layers, names and weights; checked to agree on random inputs; not compiled),
    ready for ``qx.quantize``. A Keras 3 file that cannot be rebuilt is refused, naming the layer.

    Args:
        path: the file or SavedModel directory.
        compile: compile the model as it was saved (tf_keras files only).
        safe_mode: refuse models that would run code from the file (``Lambda`` layers, raw TF
            calls outside keras_qx's allowlist), whatever the format. Pass ``False`` only
            for a file you trust.

    Raises:
        FileNotFoundError / PermissionError: nothing readable at ``path``.
        ValueError: not a model file, truncated or corrupt, or refused by ``safe_mode``;
            the message names the file (the original error is chained).

    Example:
        >>> qat.save("model.keras"); same = qx.load_model("model.keras")   # doctest: +SKIP
    """
    path = os.fspath(path)
    config = _model_config(path)
    if safe_mode:
        unsafe = unsafe_layers(config)
        if unsafe:
            raise ValueError(f"{path!r} holds {', '.join(unsafe)}: loading or running it would execute code "
                             "stored in the file, so qx.load_model refuses it (Keras safe mode). Pass "
                             "safe_mode=False only if you trust the file.")
    if _is_keras3_file(path):
        return _load_keras3(path, safe_mode)
    with quantize_scope(), safe_mode_scope(safe_mode):
        try:
            model = keras.models.load_model(path, compile=compile, safe_mode=safe_mode)
        except (ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, tf.errors.OpError) as err:
            raise ValueError(f"cannot load {path!r}: {err}") from err
        except OSError as err:
            raise OSError(f"cannot load {path!r}: {err}") from err
    if not isinstance(model, keras.Model):
        raise ValueError(f"{path!r} is a SavedModel without a Keras model (written by tf.saved_model.save?); "
                         "qx.load_model needs one written by model.save().")
    refresh_normalization(model)
    return model


def refresh_normalization(model) -> None:
    """Recompute each adapted ``Normalization``'s ``mean``/``variance`` from its variables: they are
    tensors made when the layer was built, stale once weights are set afterwards (tfmot's clone
    in ``quantize_apply``, loading an ``.h5``), and the layer then passes its input through raw
    (measured: the tabular example's QAT model and file at 50%, float 96%)."""
    for layer in model.layers:
        inner = getattr(layer, "layer", layer)
        if isinstance(inner, keras.layers.Normalization) and inner.built:
            inner.finalize_state()
        elif isinstance(inner, keras.Model):
            refresh_normalization(inner)
