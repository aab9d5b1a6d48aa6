"""Sub-byte Embedding tables: store each int8 GATHER table that holds only 4- or 2-bit values
packed, as INT4 (GATHER) or INT2 (EMBEDDING_LOOKUP).

The converter turns an Embedding into a GATHER of an int8 table (per-tensor scale; the output is
on the table's grid) and keeps it int8 whatever the QAT model's fake-quant says: a 4-bit one
makes it type the GATHER's output int4 and the next op fails to convert. So an Embedding trained
below 8 bits reaches the converter on an int8 fake-quant of its trained step
(``WeightQuantizer._on_int4_grid(carrier_bits=8)``) and the file holds the trained integers
(-7..7 at 4 bits, -2..1 at 2 bits) as int8. :func:`pack_tables` then stores them packed,
measured on ai-edge-litert 2.3 (same integers, same outputs, bit for bit):

- GATHER takes an INT4 table ("Type 'INT2' is not supported by gather" for INT2): a table with
  values in -7..7 (and not on the 2-bit grid, or not rewritable as below) becomes INT4 in place;
- EMBEDDING_LOOKUP takes INT4 and INT2 tables with an int8 output and a per-tensor scale (a
  per-row scale needs a float output: "output->type == kTfLiteFloat32 || output->type ==
  kTfLiteFloat16 was not true"), and 1-D ids only ("NumDimensions(lookup) != 1"): a table with
  values in -2..1 becomes INT2, its GATHER a RESHAPE of the ids to 1-D, an EMBEDDING_LOOKUP and a
  RESHAPE back (about 300 bytes of graph; none when the ids are 1-D already).

Lossless: only integers already on the narrow grid are packed, at the same scale.

Example:
    >>> data, names = pack_tables(tflite_bytes)       # doctest: +SKIP
    >>> names                                         # doctest: +SKIP
    {'model/quant_emb/embedding_lookup': 'INT2'}
"""
from __future__ import annotations

import copy

import numpy as np

from keras_qx._compat import tflite_model_bytes, tflite_model_object, tflite_schema
from keras_qx.lite.inspect import read_model
from keras_qx.lite.edit import builtin_code, drop_unused_buffers, new_buffer
from keras_qx.lite.int2 import INT2_RANGE
from keras_qx.quant.cost import pack

__all__ = ["INT4_RANGE", "pack_tables"]

INT4_RANGE = (-7, 7)  # the narrow grid a 3- or 4-bit table is trained on


def _opcode_index(model, schema, builtin: int) -> int:
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            return i
    code = schema.OperatorCodeT()
    code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _name(tensor) -> str:
    return tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)


def _signature(tensor) -> list[int]:
    sig = tensor.shapeSignature if tensor.shapeSignature is not None and len(tensor.shapeSignature) else tensor.shape
    return [int(s) for s in sig]


def pack_tables(model_or_path, *, int2: bool = True) -> tuple[bytes, dict]:
    """Rewrite a TFLite file with its GATHER tables on the 4- or 2-bit grid packed.

    Args:
        model_or_path: the flatbuffer (bytes) or a ``.tflite`` path.
        int2: store tables on the 2-bit grid as INT2 (EMBEDDING_LOOKUP); False: as INT4 (GATHER).

    Returns:
        ``(flatbuffer, {table tensor name: "INT4" | "INT2"})``; the input itself (as bytes) when no
        table qualifies: a constant INT8 tensor with one scale and zero point 0, read only as the
        table of axis-0 GATHERs with int32 ids and an INT8 output, every value in -7..7.
    """
    data = read_model(model_or_path)
    schema = tflite_schema()
    model = tflite_model_object(data)
    gather = schema.BuiltinOperator.GATHER
    packed: dict[str, str] = {}
    for graph in model.subgraphs:
        users: dict[int, list] = {}
        for op in graph.operators:
            for pos, index in enumerate(op.inputs if op.inputs is not None else []):
                if index >= 0:
                    users.setdefault(int(index), []).append((op, pos))
        for index in sorted({int(op.inputs[0]) for op in graph.operators
                             if builtin_code(model, op) == gather and op.inputs is not None and len(op.inputs) >= 2}):
            values = _table_values(model, graph, index, users, schema)
            if values is None:
                continue
            table = graph.tensors[index]
            gathers = [op for op, _ in users[index]]
            if any(_lookup_shape(graph, op) is None for op in gathers):
                continue
            two_bit = int2 and values.min() >= INT2_RANGE[0] and values.max() <= INT2_RANGE[1]
            for op in gathers:
                _to_embedding_lookup(model, graph, op, schema)
            table.buffer = new_buffer(model, schema, pack(values, 2 if two_bit else 4).tobytes())
            table.type = schema.TensorType.INT2 if two_bit else schema.TensorType.INT4
            table.quantization.min = table.quantization.max = None
            packed[_name(table)] = "INT2" if two_bit else "INT4"
    if not packed:
        return data, {}
    drop_unused_buffers(model)
    return tflite_model_bytes(model), packed


def _table_values(model, graph, index: int, users: dict, schema) -> np.ndarray | None:
    """The int8 values of GATHER table ``index`` if it can be packed (see :func:`pack_tables`)."""
    table = graph.tensors[index]
    q = table.quantization
    buf = model.buffers[table.buffer].data if 0 < table.buffer < len(model.buffers) else None
    if table.type != schema.TensorType.INT8 or buf is None or q is None or q.scale is None or len(q.scale) != 1:
        return None
    if q.zeroPoint is not None and np.any(np.asarray(q.zeroPoint) != 0):
        return None
    for op, pos in users.get(index, []):
        if builtin_code(model, op) != schema.BuiltinOperator.GATHER or pos != 0:
            return None  # read by another op: leave it int8
        options = op.builtinOptions
        if options is not None and (int(getattr(options, "axis", 0)) != 0 or int(getattr(options, "batchDims", 0)) != 0):
            return None
        if graph.tensors[op.inputs[1]].type != schema.TensorType.INT32 or \
                graph.tensors[op.outputs[0]].type != schema.TensorType.INT8:
            return None
    values = np.frombuffer(bytes(buf), np.int8)
    if values.size != int(np.prod(table.shape)) or values.min(initial=0) < INT4_RANGE[0] or values.max(initial=0) > INT4_RANGE[1]:
        return None
    return values


def _lookup_shape(graph, op) -> list[int] | None:
    """The output shape (signature, at most one -1) a GATHER's EMBEDDING_LOOKUP is reshaped to,
    ``[]`` where its ids are 1-D already; None if it cannot be one."""
    ids, out = graph.tensors[op.inputs[1]], graph.tensors[op.outputs[0]]
    if len(ids.shape) == 1:
        return []
    if len(ids.shape) < 1:
        return None
    shape = _signature(out)
    return shape if sum(s < 0 for s in shape) <= 1 else None


def _tensor(graph, schema, name: str, like, shape, signature, tensor_type, quantization=None) -> int:
    tensor = schema.TensorT()
    tensor.name = name.encode()
    tensor.shape = np.array(shape, np.int32)
    tensor.shapeSignature = np.array(signature, np.int32)
    tensor.type = tensor_type
    tensor.buffer = 0
    tensor.quantization = quantization
    graph.tensors.append(tensor)
    return len(graph.tensors) - 1


def _reshape(model, graph, schema, source: int, target: int, new_shape) -> object:
    op = schema.OperatorT()
    op.opcodeIndex = _opcode_index(model, schema, schema.BuiltinOperator.RESHAPE)
    op.inputs = np.array([source], np.int32)
    op.outputs = np.array([target], np.int32)
    op.builtinOptionsType = schema.BuiltinOptions.ReshapeOptions
    op.builtinOptions = schema.ReshapeOptionsT()
    op.builtinOptions.newShape = np.array(new_shape, np.int32)
    return op


def _operator(model, schema, builtin: int, inputs, outputs):
    op = schema.OperatorT()
    op.opcodeIndex = _opcode_index(model, schema, builtin)
    op.inputs = np.array(inputs, np.int32)
    op.outputs = np.array(outputs, np.int32)
    return op


def _to_embedding_lookup(model, graph, op, schema) -> None:
    """Replace GATHER ``op`` (table, ids -> int8 rows) by EMBEDDING_LOOKUP (ids, table -> float32
    rows) and a QUANTIZE back onto the GATHER's output grid, with the ids reshaped to 1-D before
    and the rows reshaped back after where the ids are not 1-D."""
    table, ids, out = int(op.inputs[0]), int(op.inputs[1]), int(op.outputs[0])
    shape = _lookup_shape(graph, op)
    ids_t, out_t, table_t = graph.tensors[ids], graph.tensors[out], graph.tensors[table]
    rows = [int(s) for s in table_t.shape[1:]]
    count = int(np.prod(ids_t.shape))
    first = -1 if any(s < 0 for s in _signature(ids_t)) else count
    base = _name(out_t)
    new = []
    if shape:
        flat = _tensor(graph, schema, base + "/ids", ids_t, [count], [first], schema.TensorType.INT32)
        new.append(_reshape(model, graph, schema, ids, flat, [-1]))
    else:
        flat = ids
    found = _tensor(graph, schema, base + "/rows", out_t, [count, *rows], [first, *rows], schema.TensorType.FLOAT32)
    new.append(_operator(model, schema, schema.BuiltinOperator.EMBEDDING_LOOKUP, [flat, table], [found]))
    if shape:
        grid = _tensor(graph, schema, base + "/int8_rows", out_t, [count, *rows], [first, *rows], out_t.type,
                       copy.deepcopy(out_t.quantization))
        new.append(_operator(model, schema, schema.BuiltinOperator.QUANTIZE, [found], [grid]))
        new.append(_reshape(model, graph, schema, grid, out, shape))
    else:
        new.append(_operator(model, schema, schema.BuiltinOperator.QUANTIZE, [found], [out]))
    at = list(graph.operators).index(op)
    graph.operators[at:at + 1] = new
