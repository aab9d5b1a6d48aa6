"""Saving and loading QAT models: ``quantize_scope()`` and ``load_model(path)``."""
from __future__ import annotations

import contextlib
import os
import zipfile

from keras_qx._compat import PACKAGE, hdf5_problem, keras, own_variables, quantize_layer, quantize_wrapper, tfmot

__all__ = ["quantize_scope", "custom_objects", "load_model"]


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

    Inside it, ``keras.models.load_model`` also reads QAT models saved as ``.keras``
    (which tfmot's own scope cannot on tf_keras 2.21).

    Example:
        >>> with qx.quantize_scope():                          # doctest: +SKIP
        ...     model = keras.models.load_model("qat.keras")
    """
    with tfmot.quantization.keras.quantize_scope(custom_objects(), *extra) as scope, _keras_format_fixes():
        yield scope


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


@contextlib.contextmanager
def _keras_format_fixes():
    """tfmot layers in tf_keras 2.21's ``.keras`` loader: build once (at call time), and
    match the wrapper's saved variable list (see :func:`_load_wrapper_variables`)."""
    patched = [
        (quantize_layer.QuantizeLayer, "build_from_config", lambda self, config: None),
        (quantize_wrapper.QuantizeWrapper, "build_from_config", lambda self, config: None),
        (quantize_wrapper.QuantizeWrapper, "load_own_variables", _load_wrapper_variables),
    ]
    saved = [(cls, name, cls.__dict__.get(name)) for cls, name, _ in patched]
    try:
        for cls, name, fn in patched:
            setattr(cls, name, fn)
        yield
    finally:
        for cls, name, original in saved:
            if original is None:
                delattr(cls, name)
            else:
                setattr(cls, name, original)


def _check_saved_file(path: str) -> None:
    """Raise a clear error naming ``path`` if it cannot be a saved Keras model (a truncated or
    corrupt ``.keras``/``.h5``, a TFLite file, a directory without a SavedModel)."""
    again = "Save the model again with model.save('model.keras')."
    if os.path.isdir(path):
        if not any(os.path.isfile(os.path.join(path, n)) for n in ("saved_model.pb", "saved_model.pbtxt")):
            raise ValueError(f"cannot load {path!r}: a directory without saved_model.pb is not a SavedModel; "
                             "pass a .keras or .h5 file, or a SavedModel directory.")
        return
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.getinfo("config.json")
        except (zipfile.BadZipFile, KeyError) as err:
            raise ValueError(f"cannot load {path!r}: not a complete .keras archive, truncated or corrupt "
                             f"({err}). {again}") from None
    elif head == b"\x89HDF\r\n\x1a\n":
        problem = hdf5_problem(path)
        if problem:
            raise ValueError(f"cannot load {path!r}: the HDF5 file is truncated or corrupt ({problem}). {again}")
    elif head[4:8] == b"TFL3":
        raise ValueError(f"cannot load {path!r}: it is a TFLite file, not a Keras model; use qx.inspect_tflite or "
                         "qx.evaluate_tflite on it, and qx.load_model on the .keras/.h5 file it came from.")
    else:
        raise ValueError(f"cannot load {path!r}: it is neither a .keras archive (zip) nor an HDF5 .h5 file; it is "
                         f"truncated, corrupt or not a Keras model. {again}")


def load_model(path, compile: bool = True):
    """Load a QAT (or float) model saved as ``.keras``, ``.h5`` or a SavedModel directory.

    Example:
        >>> qat.save("model.keras"); same = qx.load_model("model.keras")   # doctest: +SKIP
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no saved model at {path!r}.")
    _check_saved_file(path)
    with quantize_scope():
        return keras.models.load_model(path, compile=compile)
