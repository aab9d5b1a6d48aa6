"""Export without the big float kernels in the converter ("light" conversion).

The TFLite converter holds several float copies of every weight at once: the traced graph's
constants, their MLIR form, the quantized copy, the flatbuffer. On top of the QAT model that is
about 5.6 copies (measured on the 108 M encoder of bench/scale.py), so a 1 B-parameter model
cannot be exported on a 24 GB machine. For the kernels whose place in the file is known (the
FULLY_CONNECTED filters of Dense and EinsumDense layers), the exporter instead traces a stand-in
(a Fill of one level of its grid, no weight data in the graph; the next kernel the next level,
or the converter merges kernels it finds identical), lets the converter quantize it at the
kernel's own scale (its fake-quant's range variables), converts without a representative
dataset (calibration would run the stand-ins), and then writes the kernel's integers, computed by
TensorFlow's own fake-quant as the converter folds it, into filter tensors and buffers of their
own. The file runs exactly as the one converted from the real kernels, filter for filter
(tests/test_light_export.py); where a filter cannot be found in the file, or it is not fully
integer, the exporter converts the plain way.

Example:
    >>> import numpy as np
    >>> ints = np.arange(6).reshape(2, 3)          # a Dense kernel's integers (inputs, outputs)
    >>> fc_layout(ints, contracted=1).tolist()     # the FULLY_CONNECTED filter: (outputs, inputs)
    [[0, 3], [1, 4], [2, 5]]
"""
from __future__ import annotations

import copy
import re

import numpy as np

from keras_qx._compat import keras, tflite_model_bytes, tflite_model_object, tflite_schema
from keras_qx.lite.inspect import _text
from keras_qx.lite.edit import builtin_code, drop_unused_buffers, new_buffer
from keras_qx.quant.cost import pack
from keras_qx.qat.gptq import einsum_contracted, grid_of, kernel_site
from keras_qx.quant.quantizers import export_trace

__all__ = ["MIN_ELEMENTS", "StandIn", "stand_ins", "fc_layout", "write_stand_ins"]

# Models whose stand-in kernels hold fewer weights than this export the plain way: below it the
# converter's copies fit anywhere, and the plain path is the one every other test exercises.
MIN_ELEMENTS = 2 ** 24


class StandIn:
    """One kernel traced as a stand-in: its wrapper layer, variable, quantizer and range variables,
    and how many leading kernel axes its FULLY_CONNECTED filter contracts."""

    def __init__(self, layer, weight, quantizer, qvars, contracted: int):
        self.layer, self.weight, self.quantizer, self.qvars = layer, weight, quantizer, qvars
        self.contracted = contracted

    def integers(self) -> np.ndarray:
        """The kernel's integers (its own shape) as the converter stores them: TensorFlow's own
        fake-quant of the kernel, as the exporter traces it, divided by the grid step (numpy's
        float32 arithmetic rounds values a hair from a half differently: measured, 1 in 65536)."""
        with export_trace():
            values = self.quantizer(self.weight, False, self.qvars).numpy()
        step, lowest, highest = grid_of(self.quantizer, self.qvars, int(values.shape[-1]))
        return np.clip(np.round(values / step), lowest, highest).astype(np.int8)

    def stored_as(self, tensor, schema) -> bool:
        """Whether the converter quantized ``tensor`` (this kernel's filter) as the fake-quant asks:
        INT4 below 8 bits where packed, else INT8, at the grid step, zero point 0. Where it folded
        the fake-quant away first (measured on 768 x 3072 feed-forward kernels at 2 and 4 bits), it
        quantized the stand-in on its own (INT8, per channel) and the integers cannot go there."""
        q = self.quantizer
        packed = q.bits < 8 and q.pack
        if tensor.type != (schema.TensorType.INT4 if packed else schema.TensorType.INT8) or tensor.quantization is None:
            return False
        scales = np.asarray(tensor.quantization.scale if tensor.quantization.scale is not None else [], np.float64)
        zeros = np.asarray(tensor.quantization.zeroPoint if tensor.quantization.zeroPoint is not None else [0])
        step = grid_of(q, self.qvars, int(self.weight.shape[-1]))[0]
        expected = step[:1] if not q.per_channel else step
        return scales.shape == expected.shape and bool(np.allclose(scales, expected, rtol=1e-5)) and not zeros.any()


def stand_ins(qat_model, min_elements: int | None = None) -> list[StandIn]:
    """The kernels of ``qat_model`` to trace as stand-ins: Dense and EinsumDense kernels that become
    FULLY_CONNECTED filters (as :func:`keras_qx.qat.gptq.kernel_site` finds them, output channels
    last); none when together they hold fewer than ``min_elements`` (default :data:`MIN_ELEMENTS`)."""
    found = []
    for layer in qat_model.layers:
        site = kernel_site(layer)
        if site is None:
            continue
        weight, quantizer, qvars = site
        inner = layer.layer
        if isinstance(inner, keras.layers.EinsumDense):
            contracted = einsum_contracted(inner)
        elif isinstance(inner, keras.layers.Dense) and len(weight.shape) == 2:
            contracted = 1
        else:
            continue
        if quantizer.per_channel and quantizer.channel_axis % len(weight.shape) != len(weight.shape) - 1:
            continue
        found.append(StandIn(layer, weight, quantizer, qvars, contracted))
    total = sum(int(np.prod(s.weight.shape)) for s in found)
    return found if total >= (MIN_ELEMENTS if min_elements is None else min_elements) else []


def fc_layout(ints: np.ndarray, contracted: int) -> np.ndarray:
    """A kernel as its FULLY_CONNECTED filter: the contracted (input) axes flattened last,
    ``(outputs, inputs)`` (measured: Dense, the attention projections, a feed-forward EinsumDense)."""
    rows = int(np.prod(ints.shape[:contracted]))
    return ints.reshape(rows, -1).T


def write_stand_ins(data: bytes, sites: list[StandIn]) -> bytes | None:
    """``data`` (converted with stand-ins) with each kernel's integers in the filter of its
    FULLY_CONNECTED op, each filter a tensor and buffer of its own (the converter merges
    stand-ins that quantize to the same integers at the same scale), or None where a layer has
    not exactly one FULLY_CONNECTED op (found by its output's name, else its filter's: a
    model's output is named by its signature) with a filter of the expected shape, type and
    scale (:meth:`StandIn.stored_as`)."""
    schema = tflite_schema()
    bits = {schema.TensorType.INT8: 8, schema.TensorType.INT4: 4}
    model = tflite_model_object(data)
    fc_ops = [(graph, op) for graph in model.subgraphs for op in graph.operators or []
              if builtin_code(model, op) == schema.BuiltinOperator.FULLY_CONNECTED and op.inputs is not None
              and len(op.inputs) > 1]
    claimed = set()
    for site in sites:
        own = re.compile(rf"(^|/){re.escape(site.layer.name)}/")
        found = ([(g, op) for g, op in fc_ops if own.search(_text(g.tensors[op.outputs[0]].name).split(";")[0])]
                 or [(g, op) for g, op in fc_ops if own.search(_text(g.tensors[op.inputs[1]].name).split(";")[0])])
        if len(found) != 1:
            return None
        filt = fc_layout(site.integers(), site.contracted)
        graph, op = found[0]
        index = int(op.inputs[1])
        tensor = graph.tensors[index]
        if tuple(int(d) for d in tensor.shape) != filt.shape or not site.stored_as(tensor, schema):
            return None
        if (id(graph), index) in claimed or sum(int(o.inputs[1]) == index for g, o in fc_ops if g is graph) > 1:
            tensor = copy.deepcopy(tensor)
            graph.tensors.append(tensor)
            op.inputs[1] = index = len(graph.tensors) - 1
        claimed.add((id(graph), index))
        tensor.buffer = new_buffer(model, schema, pack(filt, bits[tensor.type]).tobytes())
    drop_unused_buffers(model)
    return tflite_model_bytes(model)
