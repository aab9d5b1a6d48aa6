"""Reading and running TFLite files: the flatbuffer inspector and the interpreter runner.

Uses ``ai_edge_litert`` (the maintained TFLite runtime) and TensorFlow's flatbuffer schema.

Example:
    >>> info = inspect_tflite(model_bytes)          # doctest: +SKIP
    >>> info.int4_tensors, info.float_ops           # doctest: +SKIP
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from keras_qx._compat import litert_interpreter, tflite_schema

__all__ = ["TFLiteInfo", "inspect_tflite", "TFLiteRunner", "read_model"]

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


def read_model(model_or_path) -> bytes:
    """Bytes of a TFLite model given as bytes or a path (with a clear error otherwise)."""
    if isinstance(model_or_path, (bytes, bytearray, memoryview)):
        data = bytes(model_or_path)
    elif isinstance(model_or_path, (str, os.PathLike)):
        if not os.path.isfile(model_or_path):
            raise FileNotFoundError(f"no TFLite file at {os.fspath(model_or_path)!r}.")
        with open(model_or_path, "rb") as fh:
            data = fh.read()
    else:
        raise TypeError(f"expected TFLite bytes or a file path, got {type(model_or_path).__name__}.")
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError("the data is not a TFLite flatbuffer (no 'TFL3' identifier).")
    return data


@dataclass
class TFLiteInfo:
    """What is inside a TFLite file: ops, weight tensors and their storage."""

    size_bytes: int
    ops: list = field(default_factory=list)
    weights: list = field(default_factory=list)  # (name, type, shape, bytes)
    float_ops: list = field(default_factory=list)  # ops computing on float tensors (not QUANTIZE/DEQUANTIZE)

    @property
    def int4_tensors(self):
        return [w for w in self.weights if w[1] == "INT4"]

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


def _constant(model, tensor) -> bool:
    return tensor.buffer < len(model.buffers) and model.buffers[tensor.buffer].data is not None


def inspect_tflite(model_or_path) -> TFLiteInfo:
    """Parse the flatbuffer: op list, constant tensors (type, shape, bytes), float compute ops."""
    data = read_model(model_or_path)
    schema = _schema()
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(data, 0))
    info = TFLiteInfo(size_bytes=len(data))
    for graph in model.subgraphs:
        tensors = graph.tensors
        for tensor in tensors:
            buf = model.buffers[tensor.buffer].data if tensor.buffer < len(model.buffers) else None
            nbytes = len(buf) if buf is not None else int(getattr(model.buffers[tensor.buffer], "size", 0) or 0)
            if nbytes:
                name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
                info.weights.append((name, _TENSOR_TYPE_NAMES.get(tensor.type, str(tensor.type)),
                                     tuple(int(s) for s in tensor.shape), nbytes))
        for op in graph.operators:
            code = model.operatorCodes[op.opcodeIndex]
            opname = _OP_NAMES.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM")
            info.ops.append(opname)
            if opname in _EDGE_OPS or op.inputs is None:
                continue
            if any(_TENSOR_TYPE_NAMES.get(tensors[i].type) in ("FLOAT32", "FLOAT16") and not _constant(model, tensors[i])
                   for i in op.inputs if i >= 0):
                info.float_ops.append(opname)
    return info


class TFLiteRunner:
    """Run a single-input TFLite model on float data, (de)quantizing int8 I/O as needed.

    Example:
        >>> runner = TFLiteRunner(model_bytes)      # doctest: +SKIP
        >>> logits = runner.predict(x_test)         # doctest: +SKIP
    """

    def __init__(self, model_or_path, num_threads: int = 1):
        self.model = read_model(model_or_path)
        self.num_threads = num_threads
        self.delegate = "xnnpack"
        self.interpreter = self._interpreter(with_xnnpack=True)
        inputs = self.interpreter.get_input_details()
        if len(inputs) != 1:
            raise ValueError(f"TFLiteRunner handles single-input models; this one has {len(inputs)} inputs.")
        self.input = inputs[0]
        self.output = self.interpreter.get_output_details()[0]

    @property
    def input_shape(self):
        return tuple(int(s) for s in self.input["shape"][1:])

    @property
    def output_step(self) -> float:
        """One quantization step of the output (0 for a float output)."""
        return float(self.output["quantization"][0]) if self.output["dtype"] != np.float32 else 0.0

    def _quantize_input(self, x):
        dtype = self.input["dtype"]
        scale, zero = self.input["quantization"]
        if dtype == np.float32 or not scale:  # float, or integer ids (not quantized values)
            return x.astype(dtype)
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)

    def _dequantize_output(self, y):
        if self.output["dtype"] == np.float32:
            return y.astype(np.float32)
        scale, zero = self.output["quantization"]
        return ((y.astype(np.float32) - zero) * scale).astype(np.float32)

    def _interpreter(self, with_xnnpack: bool):
        Interpreter, OpResolverType = litert_interpreter()
        resolver = OpResolverType.AUTO if with_xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        interpreter = Interpreter(model_content=self.model, num_threads=self.num_threads,
                                  experimental_op_resolver_type=resolver)
        interpreter.allocate_tensors()
        return interpreter

    def invoke_one(self, sample) -> np.ndarray:
        self.interpreter.set_tensor(self.input["index"], self._quantize_input(sample[None]))
        try:
            self.interpreter.invoke()
        except RuntimeError as err:
            # XNNPACK declines some quantized graphs ("failed to create XNNPACK runtime");
            # the built-in kernels run them. Latency then reflects the built-in kernels.
            if self.delegate != "xnnpack" or "XNNPACK" not in str(err):
                raise
            self.delegate = "builtin"
            self.interpreter = self._interpreter(with_xnnpack=False)
            self.interpreter.set_tensor(self.input["index"], self._quantize_input(sample[None]))
            self.interpreter.invoke()
        return self._dequantize_output(self.interpreter.get_tensor(self.output["index"]))[0]

    def predict(self, x) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32 if self.input["quantization"][0] else self.input["dtype"])
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"input shape {x.shape[1:]} does not match the model's {self.input_shape}.")
        return np.stack([self.invoke_one(sample) for sample in x])
