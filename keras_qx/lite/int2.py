"""INT2 kernels: store each FULLY_CONNECTED filter that holds only 2-bit values as INT2.

TF 2.21's converter packs 2- and 3-bit kernels as INT4 (a 2-bit Dense holds {-7, 0, 7} at
scale ``s / 7``). The LiteRT runtime also takes INT2 filters in FULLY_CONNECTED (int8
activations; not CONV_2D): four values a byte, the first in bits 1:0, two's complement -2..1.
:func:`to_int2` rewrites a converted file so that every such filter whose integers are a
multiple ``q`` of the 2-bit grid (per scale group: ``v = q * u`` with ``u`` in -2..1) is stored
as ``u`` at scale ``q * s``, with the same integer arithmetic:

- the int32 bias is stored in steps of ``input_scale * filter_scale`` (the runtime checks
  that), so its scale is multiplied by ``q`` too and its values divided by ``q``. The
  accumulator is then exactly the old one divided by ``q`` and the output multiplier ``q``
  times larger; ``qx.export_tflite`` snaps each 2-bit layer's bias to the coarse grid
  (:mod:`keras_qx.lite.bias_grid`, the step of the 2-bit quantizer is ``s``), so the division
  is exact. Leaving the bias alone (``rescale_bias=False``) is the mistake behind an earlier
  0.8-step mean mismatch: the runtime then adds ``q`` times the bias (bench/int2.py measures it);
- the old buffers are dropped (the file shrinks by the packed bytes saved).

Uses TensorFlow's generated flatbuffer schema (object API) and its ``flatbuffer_utils``.

Example:
    >>> data, names = to_int2(tflite_bytes)         # doctest: +SKIP
    >>> names                                       # doctest: +SKIP
    ['digits_cnn/quant_fc1/MatMul;...']
"""
from __future__ import annotations

import copy

import numpy as np

from keras_qx._compat import tflite_model_bytes, tflite_model_object, tflite_schema
from keras_qx.lite.edit import builtin_code, drop_unused_buffers, new_buffer
from keras_qx.lite.inspect import read_model, tensor_values
from keras_qx.quant.cost import pack

__all__ = ["INT2_RANGE", "pack_int2", "to_int2"]

INT2_RANGE = (-2, 1)  # two's complement, as the runtime unpacks it


def pack_int2(values) -> bytes:
    """Four signed 2-bit values a byte, the first in bits 1:0 (the last byte zero-padded).

    Example:
        >>> pack_int2([1, -1, 0, -2]).hex()
        '8d'
    """
    v = np.asarray(values).ravel()
    if v.size and (v.min() < INT2_RANGE[0] or v.max() > INT2_RANGE[1]):
        raise ValueError(f"INT2 holds -2..1, got values in {int(v.min())}..{int(v.max())}.")
    return pack(v, 2).tobytes()  # the cost model's packing: the bytes it predicts are these


def _factors(values: np.ndarray, groups: int) -> np.ndarray | None:
    """Per scale group (rows of ``values`` reshaped (groups, -1)), the ``q`` with every value
    ``q * u``, ``u`` in -2..1; None if a group does not fit."""
    rows = values.astype(np.int64).reshape(groups, -1)
    out = np.ones(groups, np.int64)
    for g, row in enumerate(rows):
        nonzero = np.abs(row[row != 0])
        q = int(np.gcd.reduce(nonzero)) if nonzero.size else 1
        if row.min() < INT2_RANGE[0] * q or row.max() > INT2_RANGE[1] * q:
            return None
        out[g] = q
    return out


def to_int2(model_or_path, *, rescale_bias: bool = True) -> tuple[bytes, list[str]]:
    """Rewrite a TFLite file with its 2-bit FULLY_CONNECTED filters stored as INT2.

    Args:
        model_or_path: the flatbuffer (bytes) or a ``.tflite`` path.
        rescale_bias: divide each rewritten layer's int32 bias by the factor the filter scale
            grew by (keep True; False only reproduces the broken rewrite for the record).

    Returns:
        ``(flatbuffer, names of the rewritten filter tensors)``; the input itself (as bytes)
        when no filter qualifies: INT4 filters of FULLY_CONNECTED ops (int8 input) used by
        nothing else, with every value on the 2-bit grid of its scale group.
    """
    data = read_model(model_or_path)
    schema = tflite_schema()
    model = tflite_model_object(data)
    fc = schema.BuiltinOperator.FULLY_CONNECTED
    renamed = []
    for graph in model.subgraphs:
        users: dict[int, list] = {}
        for op in graph.operators:
            for pos, index in enumerate(op.inputs if op.inputs is not None else []):
                if index >= 0:
                    users.setdefault(int(index), []).append((op, pos))
        done: set[int] = set()
        for op in graph.operators:
            if builtin_code(model, op) != fc or op.inputs is None or len(op.inputs) < 2:
                continue
            index = int(op.inputs[1])
            if index in done or index < 0:
                continue
            done.add(index)
            factors = _plan(model, graph, index, users, fc, schema)
            if factors is None:
                continue
            filt = graph.tensors[index]
            values = tensor_values(model.buffers[filt.buffer].data, "INT4", filt.shape).astype(np.int64)
            groups = len(factors)
            units = (values.reshape(groups, -1) // factors[:, None]).ravel()
            filt.buffer = new_buffer(model, schema, pack_int2(units))
            filt.type = schema.TensorType.INT2
            filt.quantization.scale = (np.asarray(filt.quantization.scale, np.float64) * factors).astype(np.float32)
            filt.quantization.min = filt.quantization.max = None
            if rescale_bias:
                mine = {id(user) for user, _ in users[index]}
                rescaled: dict[int, int] = {}  # old bias tensor -> its rescaled twin
                for user, _ in users[index]:
                    if len(user.inputs) < 3 or user.inputs[2] < 0:
                        continue
                    bias = int(user.inputs[2])
                    if bias not in rescaled:
                        own = all(id(other) in mine for other, _ in users.get(bias, []))
                        rescaled[bias] = _rescale_bias(model, graph, bias, factors, schema, in_place=own)
                    user.inputs[2] = rescaled[bias]
            renamed.append(filt.name.decode() if isinstance(filt.name, bytes) else str(filt.name))
    if not renamed:
        return data, []
    drop_unused_buffers(model)
    return tflite_model_bytes(model), renamed


def _plan(model, graph, index: int, users: dict, fc: int, schema) -> np.ndarray | None:
    """The factor per scale group of filter tensor ``index``, or None if it stays as it is."""
    filt = graph.tensors[index]
    buf = model.buffers[filt.buffer].data if filt.buffer < len(model.buffers) else None
    q = filt.quantization
    if filt.type != schema.TensorType.INT4 or buf is None or q is None or q.scale is None or not len(q.scale):
        return None
    if q.zeroPoint is not None and np.any(np.asarray(q.zeroPoint) != 0):
        return None
    for user, pos in users.get(index, []):
        if builtin_code(model, user) != fc or pos != 1:
            return None  # shared with another op or slot: leave it to the converter's layout
        if graph.tensors[user.inputs[0]].type != schema.TensorType.INT8:
            return None  # the runtime unpacks INT2 only next to int8 activations
    shape = tuple(int(s) for s in filt.shape)
    groups = len(q.scale)
    if groups > 1 and (int(q.quantizedDimension) != 0 or shape[0] != groups):
        return None  # FULLY_CONNECTED filters are (out, in), scales per output row
    values = tensor_values(buf, "INT4", shape)
    if values is None or values.size != int(np.prod(shape)):
        return None
    return _factors(values, groups)


def _rescale_bias(model, graph, index: int, factors: np.ndarray, schema, in_place: bool) -> int:
    """Store int32 bias tensor ``index`` in steps ``factors`` times larger (values divided,
    scales multiplied): in place, or as a new tensor (its other users keep the old one).
    Returns the index of the rescaled tensor."""
    old = graph.tensors[index]
    values = np.frombuffer(bytes(model.buffers[old.buffer].data), np.int32).astype(np.int64)
    if old.type != schema.TensorType.INT32 or old.quantization is None or old.quantization.scale is None or \
            len(factors) not in (1, values.size):
        raise ValueError(f"cannot rescale the bias {old.name!r} of a FULLY_CONNECTED with an INT2 filter.")
    per = np.broadcast_to(factors, values.shape)
    bias = old if in_place else copy.copy(old)
    bias.quantization = copy.copy(old.quantization)
    scales = np.asarray(old.quantization.scale, np.float64)
    bias.quantization.scale = (scales * (per if scales.size == values.size else factors[:1])).astype(np.float32)
    bias.buffer = new_buffer(model, schema, np.round(values / per).astype(np.int32).tobytes())
    if in_place:
        return index
    graph.tensors.append(bias)
    return len(graph.tensors) - 1
