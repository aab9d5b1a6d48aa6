"""Saving and loading QAT models: ``quantize_scope()`` and ``load_model(path)``."""
from __future__ import annotations

import contextlib
import os

from keras_qx._compat import PACKAGE, keras, tfmot

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

    Inside it, ``keras.models.load_model`` also reads QAT models saved as ``.keras`` (keras_qx
    teaches tfmot's layers that format once, when imported: see ``keras_qx._compat``).

    Example:
        >>> with qx.quantize_scope():                          # doctest: +SKIP
        ...     model = keras.models.load_model("qat.keras")
    """
    with tfmot.quantization.keras.quantize_scope(custom_objects(), *extra) as scope:
        yield scope


def load_model(path, compile: bool = True):
    """Load a QAT (or float) model saved as ``.keras``, ``.h5`` or a SavedModel directory.

    Example:
        >>> qat.save("model.keras"); same = qx.load_model("model.keras")   # doctest: +SKIP
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no saved model at {path!r}.")
    with quantize_scope():
        return keras.models.load_model(path, compile=compile)
