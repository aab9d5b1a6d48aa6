"""Small edits of a TFLite flatbuffer held as TensorFlow's mutable schema object (``ModelT``):
the helpers the rewrites of :mod:`~keras_qx.lite.int2`, :mod:`~keras_qx.lite.tables` and
:mod:`~keras_qx.lite.light` share.

Example:
    >>> from keras_qx._compat import tflite_model_object    # doctest: +SKIP
    >>> model = tflite_model_object(data)                     # doctest: +SKIP
    >>> tensor.buffer = new_buffer(model, tflite_schema(), raw)  # doctest: +SKIP
"""
from __future__ import annotations

import numpy as np

__all__ = ["builtin_code", "new_buffer", "drop_unused_buffers"]


def builtin_code(model, op) -> int:
    """The builtin operator code of ``op`` (old files keep it in ``deprecatedBuiltinCode``)."""
    code = model.operatorCodes[op.opcodeIndex]
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def new_buffer(model, schema, raw: bytes) -> int:
    """Append a buffer holding ``raw``; its index."""
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(raw, np.uint8)
    model.buffers.append(buffer)
    return len(model.buffers) - 1


def drop_unused_buffers(model) -> None:
    """Remove buffers no tensor or metadata refers to (buffer 0, the empty one, stays)."""
    used = {0}
    for graph in model.subgraphs:
        used.update(int(t.buffer) for t in graph.tensors)
    used.update(int(m.buffer) for m in (model.metadata or []))
    used.update(int(b) for b in (model.metadataBuffer if model.metadataBuffer is not None else []))
    keep = sorted(b for b in used if b < len(model.buffers))
    where = {old: new for new, old in enumerate(keep)}
    model.buffers = [model.buffers[b] for b in keep]
    for graph in model.subgraphs:
        for t in graph.tensors:
            t.buffer = where[int(t.buffer)]
    for m in model.metadata or []:
        m.buffer = where[int(m.buffer)]
    if model.metadataBuffer is not None:
        model.metadataBuffer = [where[int(b)] for b in model.metadataBuffer]

