"""``qx.ptq``: post-training quantization of a float model, no training needed.

Modes: ``"dynamic"`` (int8 weights, float activations), ``"int8"`` (fully integer, needs
representative data), ``"float16"`` (half-precision weights), ``"int16x8"`` (int16
activations, int8 weights; needs representative data). In ``"int8"`` mode ``keep_float``
names layers that stay float32 (selective quantization, the converter's denylist). The result
is verified against the float model and carries the same report as ``export_tflite``.

Example:
    >>> tfl = qx.ptq(float_model, "int8", x_train[:300], keep_float=["fc1"])   # doctest: +SKIP
    >>> tfl.report.kept_float, tfl.report.verification.mean_error_steps          # doctest: +SKIP
"""
from __future__ import annotations

import re
import warnings

from keras_qx._compat import keras, tf
from keras_qx._graph import check_model
from keras_qx._io import check_inputs, check_writable, model_input_specs
from keras_qx._runtime import interpreter, ops_details
from keras_qx.lite.convert import ExportError, convert, converter_for, representative
from keras_qx._deprecation import renamed_args, warn_renamed
from keras_qx.lite.export import ExportReport, LengthError, TFLiteModel, _printer, check_options, deliver
from keras_qx.lite.inspect import inspect_tflite
from keras_qx.quant.kinds import integer_lstm
from keras_qx.rewrite.keras3 import as_tf_keras

__all__ = ["ptq", "PTQ_MODES"]

PTQ_MODES = ("dynamic", "int8", "float16", "int16x8")


def _resolve_keep_float(model, keep_float) -> list[str]:
    """Layer names matched by ``keep_float`` (names, or regexes matching a whole name)."""
    if isinstance(keep_float, str):
        raise TypeError(f"keep_float must be a list of layer names or regexes, got the string {keep_float!r}; "
                        f"write keep_float=[{keep_float!r}].")
    names = [layer.name for layer in model.layers]
    chosen = []
    for entry in keep_float:
        try:
            pattern = re.compile(str(entry))
        except re.error as err:
            raise ValueError(f"keep_float entry {entry!r} is not a valid regex ({err}).") from None
        hits = [n for n in names if n == entry or pattern.fullmatch(n)]
        if not hits:
            raise ValueError(f"keep_float entry {entry!r} matches no layer of {model.name!r}; its layers are "
                             f"{names}.")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def _denylist(float_file: bytes, layers: list[str]) -> list[str]:
    """The converter's node names (each op's first output tensor) of the ops that compute the
    ``layers``: ops whose output, or whose constant (weight) inputs, the converter named after
    the layer (``model/<layer>/MatMul``)."""
    interp = interpreter(float_file, xnnpack=False)
    names = {d["index"]: d["name"] for d in interp.get_tensor_details()}
    ops = [op for op in ops_details(interp) if op["op_name"] != "DELEGATE"]
    produced = {i for op in ops for i in op["outputs"]} | {d["index"] for d in interp.get_input_details()}

    def owner_segments(op):
        tensors = list(op["outputs"]) + [i for i in op["inputs"] if i >= 0 and i not in produced]
        return {seg for i in tensors for part in names[i].split(";") for seg in part.split("/")}

    nodes, found = [], set()
    for op in ops:
        mine = owner_segments(op) & set(layers)
        if mine:
            nodes.append(names[op["outputs"][0]])
            found |= mine
    missing = [l for l in layers if l not in found]
    if missing:
        raise ValueError(f"layer(s) {missing} have no op of their own in the TFLite file (folded into a "
                         "neighbour, e.g. a BatchNormalization into its convolution, or value-preserving); "
                         "name the layer they are folded into instead.")
    return nodes


def _check_no_crashing_rnn(model, mode: str) -> None:
    """The converter's full-integer modes end the process with a segmentation fault on every
    recurrent layer but a fused LSTM (GRU, SimpleRNN, RNN(cell), ConvLSTM, inside Bidirectional
    too; measured on TF 2.21): refuse before converting, naming the layers and the fixes."""
    crashing = sorted({m.name for m in model.submodules
                       if isinstance(m, keras.layers.RNN) and not integer_lstm(m)})
    if crashing:
        raise ExportError(
            f"PTQ mode {mode!r} cannot convert recurrent layer(s) {crashing}: TF's converter crashes the "
            "whole process (segmentation fault) quantizing them to integers. Use mode 'dynamic' or "
            "'float16', or qx.quantize + qx.export_tflite, which keeps them float and quantizes the rest "
            "(a plain LSTM becomes one integer LSTM op).")


@renamed_args(representative_data="x")
def ptq(model, mode: str, x=None, path=None, *, int8_io: bool | None = None, keep_float=None,
        verify: bool = True, min_agreement: float = 0.9, verify_samples: int = 256, verbose: int = 0,
        print_fn=None) -> TFLiteModel:
    """Convert a float tf_keras model to TFLite with a post-training quantization mode.

    Args:
        mode: one of :data:`PTQ_MODES`.
        x: float samples (n, *input_shape) (a list / dict for several inputs); required for
            "int8"/"int16x8", and used for the verification in every mode
            (``representative_data=`` is its deprecated name).
        path: where to write the ``.tflite`` (atomically); None writes nothing.
        int8_io: for "int8", int8 input/output tensors (False: float32). None (default): int8
            where the whole file is integer ("int8" without ``keep_float``), as in
            ``export_tflite``; the other modes always have float32 edges.
        keep_float: ("int8" mode) layer names or regexes (matching a whole name) that stay float32.
        verify, min_agreement, verify_samples, verbose: as in ``export_tflite`` (the reference
            is the float model).

    Returns:
        :class:`~keras_qx.lite.export.TFLiteModel`: the bytes with ``.report`` (``kept_float``
        lists the layers kept float).

    Example:
        >>> tfl = qx.ptq(model, "int8", x_train[:300], "int8.tflite")   # doctest: +SKIP
    """
    if isinstance(path, bool):  # the old positional form ptq(model, mode, data, int8_io)
        warn_renamed("qx.ptq()", "int8_io as the fourth positional argument", "int8_io=")
        int8_io, path = path, None
    representative_data = x
    model = as_tf_keras(model)
    check_model(model)
    if mode not in PTQ_MODES:
        raise ValueError(f"unknown PTQ mode {mode!r}; use one of {PTQ_MODES}.")
    check_options(int8_io=int8_io, verify=verify, min_agreement=min_agreement, verify_samples=verify_samples)
    if keep_float and mode != "int8":
        raise ValueError(f"keep_float applies to mode 'int8' (the converter's denylist is for full-integer "
                         f"quantization); mode {mode!r} quantizes weights only, or nothing per layer.")
    if representative_data is None and (mode in ("int8", "int16x8") or verify):
        raise ValueError(f"PTQ mode {mode!r} needs x (a few hundred training samples): "
                         "to calibrate activation ranges and to verify the file (or verify=False for "
                         "dynamic/float16).")
    if mode in ("int8", "int16x8"):
        _check_no_crashing_rnn(model, mode)
    samples = check_inputs(representative_data, model_input_specs(model), "x") if representative_data is not None else []
    if path is not None:
        check_writable(path)
    kept = _resolve_keep_float(model, keep_float) if keep_float else []
    if int8_io and mode != "int8":
        raise ValueError(f"int8_io=True applies to mode 'int8' only; mode {mode!r} keeps float32 input and output.")
    if int8_io is None:
        int8_io = mode == "int8" and not kept
    options = dict(verify=verify, min_agreement=min_agreement, verify_samples=verify_samples,
                   print_fn=_printer("qx.ptq()", verbose, print_fn))
    try:
        return _convert(model, mode, samples, int8_io, kept, path, None, options)
    except LengthError as err:  # faithful at the representative data's length only: fix it there
        lengths = [xi.shape[1:] for xi in samples]
        warnings.warn(f"keras_qx: {err} The file is converted again at the representative data's shape "
                      f"{[tuple(l) for l in lengths]}, which it then takes only.", stacklevel=2)
        return _convert(model, mode, samples, int8_io, kept, path, lengths, options)


def _convert(model, mode: str, samples: list, int8_io: bool, kept: list, path, lengths, options: dict) -> TFLiteModel:
    """One conversion of :func:`ptq` (``lengths``: fixed input shapes, or None to keep dynamic
    dimensions), verified and delivered."""
    converter = converter_for(model, lengths=lengths)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    dataset = representative(samples, model) if samples else None
    if mode in ("int8", "int16x8"):
        converter.representative_dataset = dataset
        if mode == "int8":
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            if int8_io:
                converter.inference_input_type = converter.inference_output_type = tf.int8
        else:
            converter.target_spec.supported_ops = [
                tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    elif mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    try:
        if kept:
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
            nodes = _denylist(convert(converter_for(model, lengths=lengths))[0], kept)
            data, seconds = convert(converter, run=lambda: _selective(converter, dataset, nodes))
        else:
            data, seconds = convert(converter)
    except ExportError as err:
        raise ExportError(f"({mode}) {err}") from err.__cause__
    report = ExportReport(inspect_tflite(data), None, None, None, 0, seconds, kept_float=tuple(kept))
    return deliver(model, data, report, samples, path, **options)


def _selective(converter, dataset, nodes: list[str]) -> bytes:
    """Full-integer conversion with the ops ``nodes`` left float (tf.lite's quantization
    debugger is the converter's one entry point for a denylist)."""
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=nodes)
    one = lambda: (sample for _, sample in zip(range(1), dataset()))  # noqa: E731
    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=one,
                                                         debug_options=options)
    return debugger.get_nondebug_quantized_model()
