"""The TFLite converter, set up for keras_qx models: one traced function, integer ops.

Example:
    >>> data, seconds = convert_qat(qat, x_train[:300])     # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
import warnings

import numpy as np

from keras_qx._compat import (keras, tf, tflite_buffers_kept_apart, tflite_deduplicate, tflite_int8_io,
                              tflite_model_bytes, tflite_model_object, tflite_schema)
from keras_qx._graph import is_quantized_layer
from keras_qx.lite import light
from keras_qx.lite.inspect import inspect_tflite
from keras_qx.lite.int2 import to_int2
from keras_qx.lite.tables import pack_tables
from keras_qx.quant.configs import KeptFloatQuantizeConfig
from keras_qx.quant.kinds import treatment
from keras_qx.quant.quantizers import export_trace

__all__ = ["ExportError", "needs_static_batch", "dynamic_dims", "converter_for", "convert", "convert_qat", "kept_float_layers", "representative",
           "fix_lstm_bias_scales"]


class ExportError(RuntimeError):
    """The converter failed, or the TFLite file disagrees with the Keras model."""


def needs_static_batch(model) -> bool:
    """A layer of ``model`` converts only at a fixed batch size: recurrent layers (their
    TensorList) and GroupNormalization (BROADCAST_TO); the runtime runs one sample at a time."""
    return any(getattr(treatment(getattr(l, "layer", l)), "static_batch", False) for l in model.layers)


def dynamic_dims(model) -> dict:
    """``{input name: shape without the batch axis}`` of the inputs with a ``None`` (dynamic)
    time or spatial dimension."""
    return {t.name.split(":")[0]: tuple(t.shape[1:]) for t in model.inputs if None in tuple(t.shape[1:])}


def converter_for(model, batch=None, lengths=None, stand_ins=()):
    """A ``TFLiteConverter`` for ``model``'s inference function.

    Converting one traced ``tf.function`` gives the same flatbuffer as ``from_keras_model``
    without its Keras SavedModel export, which traces every layer's call separately (most of
    the convert time: 87 s vs 17 s for the small EfficientNetV2 of tests/families.py, measured).
    ``batch``: a fixed batch size; None: 1 where :func:`needs_static_batch`, else any.
    ``lengths``: one shape without the batch axis per input, fixing the model's ``None`` time
    or spatial dimensions; None keeps them dynamic (-1 in the file's shape signature).
    ``stand_ins``: kernel variables traced as constants (:mod:`keras_qx.lite.light`)."""
    batch = batch or (1 if needs_static_batch(model) else None)
    shapes = [tuple(t.shape[1:]) if lengths is None else tuple(lengths[i]) for i, t in enumerate(model.inputs)]
    specs = [tf.TensorSpec((batch, *shape), t.dtype, name=t.name.split(":")[0])
             for t, shape in zip(model.inputs, shapes)]
    fn = tf.function(lambda *xs: model(list(xs) if len(xs) > 1 else xs[0], training=False))
    owner = tf.Module()
    traced_as_constants = {id(v) for v in stand_ins}
    owner.variables_ = [v for v in model.variables if id(v) not in traced_as_constants]  # the converter saves these
    with export_trace(stand_ins):  # quantizers the converter must not see as fake-quant ops step aside
        concrete = fn.get_concrete_function(*specs)
    return tf.lite.TFLiteConverter.from_concrete_functions([concrete], owner)


# converter messages with a known cause -> the fix, appended to the ExportError
_CONVERTER_FIXES = {
    "stateful op": "A QAT-trained integer LSTM whose output is merged with other tensors (a Concatenate) cannot "
                   "take the merge's scale: the converter cannot requantize the LSTM's output state (TF 2.21). Leave "
                   "that LSTM to the converter, which then quantizes it from the representative data: policy "
                   "{'layers': {'<lstm name>': {'quantize': False}}}",
}


def convert(converter, run=None) -> tuple[bytes, float]:
    """Run ``converter`` (or ``run()``, another way of converting with it): ``(flatbuffer,
    seconds)``; the converter's many error types become ExportError."""
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), _stderr_copy() as logged:
            warnings.simplefilter("ignore")
            data = bytes((run or converter.convert)())
    except Exception as err:  # the converter raises many types; keep its message
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]  # some have no message
        # its MLIR diagnostics ("error: 'tfl.reshape' op ...") go to stderr, not into the exception
        found = [re.sub(r'^loc\(".*?"\): ', "", l.split("error: ", 1)[1].strip())
                 for l in logged[0].splitlines() if "error: " in l]
        detail = "; ".join(dict.fromkeys(e for e in found if e not in first))[:800]
        hint = next((fix for key, fix in _CONVERTER_FIXES.items() if key in first or key in detail), "")
        raise ExportError(f"TFLite conversion failed: {first[:500]}" + (f" (converter: {detail})" if detail else "")
                          + (f". {hint}" if hint else "")) from err
    return data, time.perf_counter() - start


@contextlib.contextmanager
def _stderr_copy():
    """What the process writes to file descriptor 2 meanwhile, in ``box[0]`` (also passed on to it)."""
    box = [""]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield box
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            raw = tmp.read()
            box[0] = raw.decode(errors="replace")
            os.write(2, raw)


def representative(samples: list, model, limit: int = 500):
    """The converter's ``representative_dataset`` for ``samples`` (one array per input, in the
    model's order): single samples, keyed by input name when there are several (the converter
    may order a file's inputs differently from the model)."""
    names = [t.name.split(":")[0] for t in model.inputs]
    calib = [xi[:limit] for xi in samples]
    if len(calib) == 1:
        return lambda: ([calib[0][i][None]] for i in range(len(calib[0])))
    return lambda: ({name: xi[i][None] for name, xi in zip(names, calib)} for i in range(len(calib[0])))


def kept_float_layers(qat_model) -> list[str]:
    """Names of the layers of a QAT model kept float: by the policy (not wrapped), or because the
    runtime has no integer kernel for them (``KeptFloatQuantizeConfig``: float inside)."""
    return [l.name for l in qat_model.layers if not (isinstance(l, keras.layers.InputLayer) or is_quantized_layer(l))
            or isinstance(getattr(l, "quantize_config", None), KeptFloatQuantizeConfig)]


def convert_qat(qat_model, samples, int8_io: bool | None = None, *, lengths=None) -> tuple[bytes, float]:
    """Convert a QAT model to an integer TFLite flatbuffer: ``(bytes, seconds)``.

    ``samples`` (one array per input) calibrate the int8 input/output (the converter needs them
    even for QAT). FULLY_CONNECTED filters trained at 2 bits, which the converter stores as
    INT4, are then rewritten as INT2 (:func:`keras_qx.lite.int2.to_int2`), and Embedding tables
    trained below 8 bits packed as INT4 or INT2 (:func:`keras_qx.lite.tables.pack_tables`); the
    seconds include both.
    ``lengths``: one shape without the batch axis per input, fixing the ``None`` dimensions;
    None keeps them dynamic where the converter can."""
    samples = list(samples) if isinstance(samples, (list, tuple)) else [samples]
    data, seconds = (_convert_qat(qat_model, samples, int8_io) if lengths is None
                     else _convert_qat_at(qat_model, samples, int8_io, lengths))
    start = time.perf_counter()
    data, _ = to_int2(data)
    data, _ = pack_tables(data)
    return data, seconds + time.perf_counter() - start


def _convert_qat(qat_model, samples: list, int8_io: bool) -> tuple[bytes, float]:
    """A model with dynamic (``None``) time or spatial dimensions keeps them in the file; where the
    converter cannot (a layer needing static shapes), they are fixed at the samples' lengths, with
    a warning (the report's ``fixed_lengths`` names them)."""
    try:
        return _convert_qat_at(qat_model, samples, int8_io, None)
    except ExportError as err:
        dynamic = dynamic_dims(qat_model)
        if not dynamic:
            raise
        lengths = [xi.shape[1:] for xi in samples]
        try:
            result = _convert_qat_at(qat_model, samples, int8_io, lengths)
        except ExportError:
            raise err from err.__cause__
        warnings.warn(f"keras_qx: the converter cannot keep the dynamic dimensions of input(s) {dynamic} "
                      f"({str(err)[:200]}); the file takes the representative data's shape "
                      f"{[tuple(l) for l in lengths]} only. Pass representative data of the length the "
                      "file will run at.", stacklevel=4)
        return result


def _convert_qat_at(qat_model, samples: list, int8_io: bool, lengths) -> tuple[bytes, float]:
    floats = kept_float_layers(qat_model)
    sites = [] if floats else light.stand_ins(qat_model)
    if sites:
        start = time.perf_counter()
        data = _convert_light(qat_model, sites, int8_io, lengths)
        if data is not None:
            return data, time.perf_counter() - start
    converter = converter_for(qat_model, batch=1 if floats else None, lengths=lengths)  # kept-float layers may be recurrent
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if not floats:
        converter.representative_dataset = representative(samples, qat_model)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io is not False:  # None/True: a float input becomes int8; integer inputs (token ids) stay
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        data, seconds = convert(converter)
        return fix_lstm_bias_scales(data)[0], seconds
    if int8_io:  # asked for explicitly (None: whatever the file can have)
        # Layers the policy keeps float stay float only without a representative dataset: with
        # one, the converter calibrates and quantizes them to int8 as well (measured). int8 I/O
        # needs that dataset, so such a file has float32 input and output.
        warnings.warn(f"keras_qx: layers kept float ({floats}) stay float32 in the TFLite file, so its "
                      "input and output are float32 too (int8 I/O would quantize them). Quantize every "
                      "layer for int8 I/O.", stacklevel=4)
    return convert(converter)


def _convert_light(qat_model, sites: list, int8_io: bool | None, lengths) -> bytes | None:
    """The file of :func:`_convert_qat_at` from a graph without the ``sites``' kernels
    (:mod:`keras_qx.lite.light`), or None where that path does not give a fully integer file.
    Without a representative dataset: calibration would run the stand-ins (and convert the
    model a second time, its peak memory); the QAT model's ranges are all the file needs, its
    float input and output made int8 after conversion."""
    converter = converter_for(qat_model, lengths=lengths, stand_ins=[site.weight for site in sites])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    try:
        with tflite_buffers_kept_apart():
            data, _ = convert(converter)
    except ExportError:
        return None
    del converter
    if int8_io is not False:
        data = tflite_int8_io(data)
    if not inspect_tflite(data).fully_integer:
        return None
    data = light.write_stand_ins(fix_lstm_bias_scales(data)[0], sites)
    return None if data is None else tflite_deduplicate(data)


# UNIDIRECTIONAL_SEQUENCE_LSTM operands: input 0, input-to-gate weights 1-4, gate biases 12-15 (i, f, c, o).
_LSTM_GATES = ((1, 12), (2, 13), (3, 14), (4, 15))


def fix_lstm_bias_scales(data: bytes) -> tuple[bytes, int]:
    """``(data, biases rescaled)``: each integer LSTM's gate biases requantized to the scale its
    kernel adds them at, input scale x weight scale.

    The converter quantizes an LSTM of a QAT model from the representative data, including the
    biases, at the input scale it calibrated; but a fake-quantized input (a QAT layer's output)
    keeps its trained scale, so the biases are stored at a scale the kernel does not use: measured
    on MNIST-1D, 11% too large (the input's calibrated range 2.84, its trained one 3.17), the
    file's LSTM output drifting from Keras's by 3.5 output steps after 20 time steps, 2.6 at the
    logits (0.13 rescaled). Rescaling moves each int32 value by at most half a step.

    Also sets each integer LSTM's int16 cell-state scale into the range the runtime computes
    with (:func:`_clamp_lstm_cell_scale`), and first gives a REVERSE_V2's output its input's
    quantization (:func:`_reverse_keeps_scale`); the count includes those.

    Example:
        >>> data, fixed = fix_lstm_bias_scales(data)      # doctest: +SKIP
    """
    ops = {v: k for k, v in vars(tflite_schema().BuiltinOperator).items() if not k.startswith("_")}
    model, fixed = tflite_model_object(data), 0
    for graph in model.subgraphs or []:
        names = [ops.get(max(c.builtinCode, c.deprecatedBuiltinCode)) for c in
                 (model.operatorCodes[op.opcodeIndex] for op in graph.operators or [])]
        for op, name in zip(graph.operators or [], names):
            if name == "REVERSE_V2":
                fixed += _reverse_keeps_scale(graph, op, names)
        for op, name in zip(graph.operators or [], names):
            if name == "UNIDIRECTIONAL_SEQUENCE_LSTM":
                fixed += (_rescale_lstm_biases(model, graph, op) + _clamp_lstm_cell_scale(graph, op)
                          + _lstm_hidden_on_output_grid(graph, op))
    return (tflite_model_bytes(model) if fixed else data), fixed


# Consumers that read their input's scale and zero point when prepared (the LSTM's gate biases,
# which depend on it, are rescaled after): relabelling such an input is safe. A kernel with an
# int32 bias at input scale x weight scale (FULLY_CONNECTED, CONV_2D), one that copies bytes, or
# the int8 CONCATENATION (it requires every input on its output's grid) is not.
_RELABEL_SAFE = {"UNIDIRECTIONAL_SEQUENCE_LSTM", "ADD", "SUB", "MUL", "MEAN", "SUM", "QUANTIZE", "DEQUANTIZE"}


def _quant_of(tensor):
    q = tensor.quantization
    if q is None or q.scale is None or len(q.scale) != 1:
        return None
    return float(q.scale[0]), int(q.zeroPoint[0]) if q.zeroPoint is not None and len(q.zeroPoint) else 0


def _reverse_keeps_scale(graph, op, names) -> int:
    """1 if this integer REVERSE_V2's output and input were put on one grid, else 0.

    The runtime's REVERSE_V2 copies its int8 values, so its output is on its input's grid; but
    the converter calibrates the output's scale itself from the representative data (it does not
    treat the op as same-scale), so the file labels it with another scale and its consumer reads
    the values wrongly: measured on an Embedding -> Bidirectional(LSTM) split into two LSTMs
    (keras_qx.rewrite.flatten), the reversed embeddings 7.9 mean / 15 max steps off, the logits
    15 / 64. Done where every consumer reads the scale when prepared (``_RELABEL_SAFE``); else,
    where the input is an LSTM's output, the input moves onto the output's grid instead (the
    int8 CONCATENATION after a reversed backward sequence wants its inputs on its own grid: the
    runtime refused to prepare a stacked Bidirectional otherwise).
    """
    source, out = graph.tensors[op.inputs[0]], graph.tensors[op.outputs[0]]
    have, want = _quant_of(out), _quant_of(source)
    if have is None or want is None or have == want or source.type != out.type:
        return 0
    def consumers(tensor):
        return [name for other, name in zip(graph.operators, names) if tensor in list(other.inputs)]

    if all(name in _RELABEL_SAFE for name in consumers(op.outputs[0])):
        out.quantization.scale = [want[0]]
        out.quantization.zeroPoint = [want[1]]
        return 1
    # Else (a CONCATENATION after it: a Bidirectional's reversed backward sequence) move the input
    # onto the output's grid where it is an LSTM's output read by this op only: the LSTM's hidden
    # state follows its output (_lstm_hidden_on_output_grid, run after this).
    producers = [name for other, name in zip(graph.operators, names) if op.inputs[0] in list(other.outputs)]
    if producers != ["UNIDIRECTIONAL_SEQUENCE_LSTM"] or len(consumers(op.inputs[0])) != 1:
        return 0
    source.quantization.scale = [have[0]]
    source.quantization.zeroPoint = [have[1]]
    return 1


def _rescale_lstm_biases(model, graph, op) -> int:
    source = graph.tensors[op.inputs[0]].quantization
    if source is None or source.scale is None or len(source.scale) != 1:
        return 0  # a float LSTM
    fixed = 0
    for w, b in _LSTM_GATES:
        if max(w, b) >= len(op.inputs) or op.inputs[w] < 0 or op.inputs[b] < 0:
            continue
        weight, bias = graph.tensors[op.inputs[w]], graph.tensors[op.inputs[b]]
        if bias.quantization is None or bias.quantization.scale is None or len(bias.quantization.scale) != 1:
            continue
        want = float(source.scale[0]) * float(weight.quantization.scale[0])
        have = float(bias.quantization.scale[0])
        if abs(have - want) <= 1e-6 * want:
            continue
        buffer = model.buffers[bias.buffer]
        values = np.frombuffer(np.asarray(buffer.data, np.uint8).tobytes(), np.int32).astype(np.float64)
        rescaled = np.clip(np.round(values * have / want), -2 ** 31, 2 ** 31 - 1).astype(np.int32)
        buffer.data = np.frombuffer(rescaled.tobytes(), np.uint8)
        bias.quantization.scale = [want]
        fixed += 1
    return fixed


_LSTM_PROJECTION, _LSTM_OUTPUT_STATE, _LSTM_HIDDEN = 16, 18, 4  # operands; the hidden intermediate


def _lstm_hidden_on_output_grid(graph, op) -> int:
    """1 if the integer LSTM's hidden state (its int8 output state, and the intermediate its
    kernel rounds the hidden state with) was moved onto its output tensor's grid, else 0.

    Without a projection the kernel computes the hidden state on the grid of its
    ``effective_hidden_scale`` intermediate, copies it to the output and reads it back through the
    output-state operand. The converter calibrates the three alike, but a same-scale op after the
    LSTM (CONCATENATION, and the STRIDED_SLICE before it) later moves the output's scale to its
    own while the intermediate keeps the calibrated one, so the file's LSTM output is read on the
    wrong grid: measured on Embedding -> LSTM -> concat, 12 mean / 32 max output steps at the
    logits (0.24 / 2 without the concat); with the intermediate moved, as without the concat.
    """
    inter = list(op.intermediates) if op.intermediates is not None else []
    if (len(inter) <= _LSTM_HIDDEN or len(op.inputs) <= _LSTM_OUTPUT_STATE or op.inputs[_LSTM_OUTPUT_STATE] < 0
            or (op.inputs[_LSTM_PROJECTION] >= 0)):
        return 0
    want = _quant_of(graph.tensors[op.outputs[0]])
    targets = [graph.tensors[op.inputs[_LSTM_OUTPUT_STATE]], graph.tensors[inter[_LSTM_HIDDEN]]]
    if want is None or any(_quant_of(t) is None for t in targets):
        return 0  # a float LSTM
    moved = 0
    for tensor in targets:
        if _quant_of(tensor) != want:
            tensor.quantization.scale = [want[0]]
            tensor.quantization.zeroPoint = [want[1]]
            moved = 1
    return moved


# UNIDIRECTIONAL_SEQUENCE_LSTM's cell-state operand; the integer kernel takes the tanh of the cell
# with 15 + log2(scale) integer bits and only has 0..6 (TFLite's ApplyTanh: any other count
# leaves the tanh's buffer unwritten, and the output saturates).
_LSTM_CELL_STATE = 19
_CELL_SCALES = (2.0 ** -15, 2.0 ** -9)  # cell range +-1 .. +-64


def _clamp_lstm_cell_scale(graph, op) -> int:
    """1 if the integer LSTM's cell-state scale was moved into ``_CELL_SCALES``, else 0.

    The converter sets it to the power of two that bounds the calibrated cell values, so an
    LSTM whose cells stay within +-0.5 (small inputs, e.g. an Embedding's initial +-0.05 table)
    gets 2^-16 or less, which the runtime cannot run: measured on Embedding(50, 8) -> LSTM(8),
    cell scale 2^-17, every LSTM output at int8 127, the logits 50 mean / 100 max output steps
    off the QAT model; at 2^-15, 0.28 / 2 (int16 still resolves 3e-5 there).
    """
    if len(op.inputs) <= _LSTM_CELL_STATE or op.inputs[_LSTM_CELL_STATE] < 0:
        return 0
    quant = graph.tensors[op.inputs[_LSTM_CELL_STATE]].quantization
    if quant is None or quant.scale is None or len(quant.scale) != 1:
        return 0  # a float LSTM
    have = float(quant.scale[0])
    want = min(max(have, _CELL_SCALES[0]), _CELL_SCALES[1])
    if want == have:
        return 0
    quant.scale = [want]
    return 1
