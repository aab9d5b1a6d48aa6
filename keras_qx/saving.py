"""Saving and loading QAT models: ``quantize_scope()`` and ``load_model(path)``."""
from __future__ import annotations

import contextlib

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
    """tfmot's ``quantize_scope`` plus every keras_qx object (from the registry)."""
    with tfmot.quantization.keras.quantize_scope(custom_objects(), *extra) as scope:
        yield scope
