"""Reading and running TFLite files: the flatbuffer inspector and the interpreter runner.

Uses ``ai_edge_litert`` (the maintained TFLite runtime) and TensorFlow's flatbuffer schema.

Example:
    >>> info = inspect_tflite(model_bytes)          # doctest: +SKIP
    >>> info.int4_tensors, info.int2_tensors, info.float_ops     # doctest: +SKIP
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from keras_qx._compat import tflite_schema
from keras_qx._deprecation import renamed_args
from keras_qx._runtime import Runner
from keras_qx.lite.edit import builtin_code

__all__ = ["TFLiteInfo", "WeightStats", "inspect_tflite", "TFLiteRunner", "read_model", "tensor_values"]

# In a fully integer model only these may touch float tensors (at the edges, or to requantize).
_EDGE_OPS = {"QUANTIZE", "DEQUANTIZE"}
_TENSOR_TYPE_NAMES = None
_OP_NAMES = None


def _schema():
    schema = tflite_schema()
    global _TENSOR_TYPE_NAMES, _OP_NAMES
    if _TENSOR_TYPE_NAMES is None:
        _TENSOR_TYPE_NAMES = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
        _OP_NAMES = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    return schema


def _source(model_or_path) -> str:
    """How errors name the model: its path, or "the TFLite data" for bytes."""
    if isinstance(model_or_path, (str, os.PathLike)):
        return repr(os.fspath(model_or_path))
    return "the TFLite data"


def _text(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def read_model(model_or_path) -> bytes:
    """Bytes of a TFLite model given as bytes or a path (with a clear error otherwise)."""
    if isinstance(model_or_path, (bytes, bytearray, memoryview)):
        data = bytes(model_or_path)
    elif isinstance(model_or_path, (str, os.PathLike)):
        if os.path.isdir(model_or_path):
            raise IsADirectoryError(f"{_source(model_or_path)} is a directory; pass the .tflite file in it.")
        if not os.path.isfile(model_or_path):
            raise FileNotFoundError(f"no TFLite file at {_source(model_or_path)}.")
        with open(model_or_path, "rb") as fh:
            data = fh.read()
    else:
        raise TypeError(f"expected TFLite bytes or a .tflite file path, got {type(model_or_path).__name__}; "
                        "export the model first: qx.export_tflite(qat_model, x, path).")
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError(f"{_source(model_or_path)} is not a TFLite flatbuffer (no 'TFL3' identifier); pass a "
                         ".tflite file written by qx.export_tflite or qx.ptq.")
    return data


_NUMPY_TYPES = {"INT8": np.int8, "UINT8": np.uint8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
                "FLOAT32": np.float32, "FLOAT16": np.float16, "FLOAT64": np.float64, "BOOL": np.bool_}


def tensor_values(raw, type_name: str, shape) -> np.ndarray | None:
    """The stored values of a constant tensor from its buffer bytes (INT4: two signed values a
    byte, the low nibble first; INT2: four a byte, the first in bits 1:0), flat; None for a type
    this does not decode."""
    raw = np.frombuffer(bytes(raw), dtype=np.uint8)
    count = int(np.prod(shape)) if len(shape) else 1
    if type_name == "INT2":
        pairs = np.stack([(raw >> shift) & 0x3 for shift in (0, 2, 4, 6)], axis=1).ravel().astype(np.int8)
        pairs[pairs >= 2] -= 4
        return pairs[:count]
    if type_name == "INT4":
        nibbles = np.empty(2 * raw.size, dtype=np.int8)
        nibbles[0::2], nibbles[1::2] = raw & 0x0F, raw >> 4
        nibbles[nibbles >= 8] -= 16
        return nibbles[:count]
    dtype = _NUMPY_TYPES.get(type_name)
    if dtype is None or raw.size % np.dtype(dtype).itemsize:
        return None
    return raw.view(dtype)[:count]


@dataclass(frozen=True)
class WeightStats:
    """What one constant tensor's stored values look like: the fraction that are exactly zero
    (the stored integer 0, which is 0.0 on the symmetric weight grid), how many distinct
    values it holds and, for a tensor quantized per channel, the most distinct values one
    channel holds (its integers share that channel's scale; None for one scale)."""

    sparsity: float
    distinct: int
    channel_distinct: int | None = None


@dataclass
class TFLiteInfo:
    """What is inside a TFLite file: ops, weight tensors and their storage."""

    size_bytes: int
    ops: list = field(default_factory=list)
    weights: list = field(default_factory=list)  # (name, type, shape, bytes)
    float_ops: list = field(default_factory=list)  # ops computing on float tensors (not QUANTIZE/DEQUANTIZE)
    inputs: list = field(default_factory=list)  # (name, type, shape without the batch dim, None where dynamic); the
    # name is the signature's (the Keras input's, the runtime's key) where the file has one
    activation_types: dict = field(default_factory=dict)  # type -> count of non-constant tensors
    weight_stats: list = field(default_factory=list)  # WeightStats (or None: undecoded type), one per weights entry

    def kernel_stats(self) -> dict:
        """``{tensor name: WeightStats}`` of the kernels (constants of rank >= 2)."""
        return {w[0]: st for w, st in zip(self.weights, self.weight_stats) if len(w[2]) >= 2 and st is not None}

    @property
    def kernel_sparsity(self) -> float:
        """Fraction of zeros over all kernel values of the file."""
        sizes = {w[0]: int(np.prod(w[2])) for w in self.weights}
        stats = self.kernel_stats()
        total = sum(sizes[n] for n in stats)
        return sum(st.sparsity * sizes[n] for n, st in stats.items()) / total if total else 0.0

    @property
    def int4_tensors(self):
        return [w for w in self.weights if w[1] == "INT4"]

    @property
    def int2_tensors(self):
        """Weights stored as INT2 (:func:`keras_qx.lite.int2.to_int2`), as ``weights`` entries."""
        return [w for w in self.weights if w[1] == "INT2"]

    @property
    def weight_bytes(self) -> int:
        return sum(w[3] for w in self.weights)

    @property
    def kernel_bytes(self) -> int:
        """Bytes of the kernel tensors (constants of rank >= 2; biases are rank 1)."""
        return sum(w[3] for w in self.weights if len(w[2]) >= 2)

    @property
    def fully_integer(self) -> bool:
        return not self.float_ops

    def to_dict(self) -> dict:
        """Plain data: sizes, op counts, the weights with their type, shape and bytes."""
        from collections import Counter

        return {"size_bytes": self.size_bytes, "kernel_bytes": self.kernel_bytes, "weight_bytes": self.weight_bytes,
                "ops": dict(Counter(self.ops)), "float_ops": list(self.float_ops), "fully_integer": self.fully_integer,
                "inputs": [list(i) for i in self.inputs], "activation_types": dict(self.activation_types),
                "kernel_sparsity": self.kernel_sparsity,
                "weights": [{"name": n, "type": t, "shape": list(sh), "bytes": b} for n, t, sh, b in self.weights]}

    def table(self) -> str:
        """A Markdown table: each op with its count, then the stored weight types with their bytes."""
        from collections import Counter

        lines = [f"{self.size_bytes:,} bytes; {self.kernel_bytes:,} kernel bytes; "
                 f"{'fully integer' if self.fully_integer else f'float ops: {sorted(set(self.float_ops))}'}",
                 "", "| op | count |", "|---|---|"]
        lines += [f"| {op} | {n} |" for op, n in Counter(self.ops).most_common()]
        by_type = {}
        for _, kind, _, size in self.weights:
            count, total = by_type.get(kind, (0, 0))
            by_type[kind] = (count + 1, total + size)
        lines += ["", "| weight type | tensors | bytes |", "|---|---|---|"]
        lines += [f"| {kind} | {count} | {total:,} |" for kind, (count, total) in sorted(by_type.items())]
        return "\n".join(lines)


def _constant(model, tensor) -> bool:
    return tensor.buffer < len(model.buffers) and model.buffers[tensor.buffer].data is not None


@renamed_args(model_or_path="tflite")
def inspect_tflite(tflite) -> TFLiteInfo:
    """Parse the flatbuffer: op list, constant tensors (type, shape, bytes), float compute ops.

    ``tflite``: a path, the file's bytes, or what ``qx.export_tflite`` returned.

    Example:
        >>> info = qx.inspect_tflite("model.tflite"); print(info.table())   # doctest: +SKIP
    """
    model_or_path = tflite
    data = read_model(model_or_path)
    schema = _schema()
    try:
        model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
        if not model.subgraphs or not all(b.offset + b.size <= len(data) for b in model.buffers or []
                                          if getattr(b, "offset", 0) > 1):
            raise ValueError("its graph or weights lie past the end of the file")
    except Exception as err:  # a truncated flatbuffer fails in struct unpacking, or reads garbage
        raise ValueError(f"{_source(model_or_path)} is not a valid TFLite file: it is truncated or corrupt "
                         f"({type(err).__name__}: {str(err)[:120]}). Export it again with qx.export_tflite.") from None
    info = TFLiteInfo(size_bytes=len(data))
    main = model.subgraphs[0]
    signature = {m.tensorIndex: _text(m.name) for m in (model.signatureDefs[0].inputs or [])} \
        if model.signatureDefs and len(model.signatureDefs) == 1 else {}
    for i in main.inputs:
        t = main.tensors[i]
        dims = t.shapeSignature if t.shapeSignature is not None and len(t.shapeSignature) else t.shape
        info.inputs.append((signature.get(i, _text(t.name)), _TENSOR_TYPE_NAMES.get(t.type, str(t.type)),
                            tuple(int(d) if d >= 0 else None for d in dims[1:])))
    for graph in model.subgraphs:
        tensors = graph.tensors
        for tensor in tensors:
            buf = model.buffers[tensor.buffer].data if tensor.buffer < len(model.buffers) else None
            nbytes = len(buf) if buf is not None else int(getattr(model.buffers[tensor.buffer], "size", 0) or 0)
            if not nbytes:
                kind = _TENSOR_TYPE_NAMES.get(tensor.type, str(tensor.type))
                info.activation_types[kind] = info.activation_types.get(kind, 0) + 1
            if nbytes:
                name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
                type_name = _TENSOR_TYPE_NAMES.get(tensor.type, str(tensor.type))
                shape = tuple(int(s) for s in tensor.shape) if tensor.shape is not None else ()
                info.weights.append((name, type_name, shape, nbytes))
                info.weight_stats.append(_stats(data, model.buffers[tensor.buffer], type_name, shape,
                                                _channel_axis(tensor, shape)))
        for op in graph.operators:
            opname = _OP_NAMES.get(builtin_code(model, op), "CUSTOM")
            info.ops.append(opname)
            if opname in _EDGE_OPS or op.inputs is None:
                continue
            if any(_TENSOR_TYPE_NAMES.get(tensors[i].type) in ("FLOAT32", "FLOAT16") and not _constant(model, tensors[i])
                   for i in op.inputs if i >= 0):
                info.float_ops.append(opname)
    return info


def _channel_axis(tensor, shape) -> int | None:
    """The axis of a tensor's per-channel scales (None: one scale, or none)."""
    q = tensor.quantization
    scales = getattr(q, "scale", None) if q is not None else None
    if scales is None or len(scales) <= 1 or not shape:
        return None
    axis = int(q.quantizedDimension)
    return axis if 0 <= axis < len(shape) and shape[axis] == len(scales) else None


def _stats(data: bytes, buffer, type_name: str, shape, channel_axis: int | None = None) -> WeightStats | None:
    raw = buffer.data
    if raw is None:  # stored past the flatbuffer (files over 2 GB): offset and size into the file
        offset, size = int(getattr(buffer, "offset", 0) or 0), int(getattr(buffer, "size", 0) or 0)
        raw = data[offset:offset + size]
    values = tensor_values(raw, type_name, shape)
    if values is None or not values.size:
        return None
    per_channel = None
    if channel_axis is not None and values.size == int(np.prod(shape)):
        rows = np.moveaxis(values.reshape(shape), channel_axis, 0).reshape(shape[channel_axis], -1)
        per_channel = max(int(np.unique(r).size) for r in rows)
    return WeightStats(float(np.count_nonzero(values == 0)) / values.size, int(np.unique(values).size), per_channel)


class TFLiteRunner(Runner):
    """Run a single-input TFLite model on float data in this process, (de)quantizing int8 I/O
    as needed. ``keras_qx`` itself runs files in a child process (:func:`keras_qx._runtime.run`),
    where a native abort in the runtime cannot take the caller down.

    Example:
        >>> runner = TFLiteRunner(model_bytes)      # doctest: +SKIP
        >>> logits = runner.predict(x_test)         # doctest: +SKIP
    """

    def __init__(self, model_or_path, num_threads: int = 1):
        super().__init__(read_model(model_or_path), num_threads)
