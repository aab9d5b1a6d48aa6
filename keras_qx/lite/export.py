"""``qx.export_tflite``: a QAT model -> an integer TFLite file, verified against Keras.

The steps each live in their own module: checks (:mod:`keras_qx._io`), conversion
(:mod:`keras_qx.lite.convert`), verification (:mod:`keras_qx.lite.verify`), the atomic write.

Example:
    >>> tfl = qx.export_tflite(qat, x_train[:200], "model.tflite")   # doctest: +SKIP
    >>> tfl.report.agreement, tfl.report.info.int4_tensors           # doctest: +SKIP
"""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass

import numpy as np

from keras_qx._graph import check_model
from keras_qx._deprecation import check_verbose, renamed_args, warn_renamed
from keras_qx._io import check_count, check_inputs, check_writable, model_input_specs, write_atomic
from keras_qx.lite.bias_grid import snap_biases
from keras_qx.lite.convert import ExportError, convert_qat
from keras_qx.lite.inspect import TFLiteInfo, inspect_tflite
from keras_qx.lite.verify import Verification, check_agreement, verify as verify_tflite
from keras_qx.qat.calibrate import uncalibrated_ranges
from keras_qx.qat.summary import float_layers_stored_integer, layer_costs
from keras_qx.qat.quantize import unexportable_layers

__all__ = ["export_tflite", "ExportReport", "TFLiteModel", "ExportError", "file_sparsity", "file_distinct",
           "check_options", "deliver", "fixed_lengths", "stretched", "LengthError", "check_other_length"]


@dataclass
class ExportReport:
    """What ``export_tflite`` found after converting."""

    info: TFLiteInfo
    agreement: float | None  # top-1 agreement where the Keras model is decisive (see lite.verify)
    max_error_steps: float | None  # worst output difference, in output quantization steps
    mean_error_steps: float | None
    samples: int
    convert_seconds: float
    verification: Verification | None = None  # p99 error, decisive share, disagreeing/worst samples
    stored_wider: tuple = ()  # (layer, trained bits, bits in the file) where the file stores more bits
    sparsity: tuple = ()  # (layer, fraction of its kernel values stored as 0 in the file), by file_sparsity
    kept_float: tuple = ()  # layers the file keeps float32 on request (qx.ptq's keep_float)
    integer_anyway: tuple = ()  # (layer, type) the policy keeps float, stored integer by the converter
    distinct: tuple = ()  # (layer, distinct kernel values in the file, most in one channel or None), by file_distinct
    fixed_lengths: tuple = ()  # (input, the model's shape, the file's) where the file fixes a dynamic (None) dimension
    other_length: Verification | None = None  # a model with dynamic dims: the file checked again at twice the length

    def table(self) -> str:
        """The report as text: size, storage, verification (what ``verbose=1`` prints)."""
        return "\n".join(self.lines())

    def to_dict(self) -> dict:
        """Plain data: the file's contents (:meth:`TFLiteInfo.to_dict`) and the verification figures."""
        return {"file": self.info.to_dict(), "agreement": self.agreement, "max_error_steps": self.max_error_steps,
                "mean_error_steps": self.mean_error_steps, "samples": self.samples,
                "convert_seconds": self.convert_seconds, "stored_wider": [list(t) for t in self.stored_wider],
                "kept_float": list(self.kept_float), "integer_anyway": [list(t) for t in self.integer_anyway]}

    def lines(self) -> list[str]:
        int2 = f"{len(self.info.int2_tensors)} INT2 + " if self.info.int2_tensors else ""
        out = [f"TFLite: {self.info.size_bytes:,} bytes, {int2}{len(self.info.int4_tensors)} INT4 tensors, "
               f"{'fully integer' if self.info.fully_integer else 'float ops: ' + ', '.join(self.info.float_ops)}"]
        if self.stored_wider:
            out.append("stored wider than trained (the converter packs nothing narrower): " + ", ".join(
                f"{name} {bits}-bit as {'INT4' if stored == 4 else 'int8'}" for name, bits, stored in self.stored_wider))
        if self.kept_float:
            out.append("kept float on request: " + ", ".join(self.kept_float))
        if self.integer_anyway:
            out.append("kept float by the policy, integer in the file (the converter quantized them between quantized "
                       "layers): " + ", ".join(f"{name} {kind}" for name, kind in self.integer_anyway))
        if self.sparsity:
            out.append("kernel sparsity in the file: " + ", ".join(f"{name} {value:.1%}" for name, value in self.sparsity))
        if self.distinct:
            out.append("distinct kernel values in the file: " + ", ".join(
                f"{name} {channel} per channel" if channel is not None else f"{name} {total}"
                for name, total, channel in self.distinct))
        for name, theirs, ours in self.fixed_lengths:
            out.append(f"input {name!r} fixed at {ours} in the file (the model takes {_shown(theirs)}): it runs "
                       "at that shape only")
        if self.other_length is not None:
            v = self.other_length
            out.append(f"dynamic dimensions kept (-1 in the file); checked again at twice the length on {v.samples} "
                       f"samples: error mean {v.mean_error_steps:.2f} / max {v.max_error_steps:.1f} steps")
        if self.verification is not None:
            for v in self.verification.judged():
                agreed = (f"top-1 agreement {v.agreement:.1%} on the {v.decisive:.0%} decisive positions, "
                          if v.classifier else "")
                which = f"output {v.output!r} " if self.verification.per_output else "output "
                out.append(f"verified on {self.samples} samples: {agreed}{which}error mean "
                           f"{v.mean_error_steps:.2f} / p99 {v.p99_error_steps:.1f} / max {v.max_error_steps:.1f} steps")
        return out


def _shown(shape) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def fixed_lengths(model, info: TFLiteInfo) -> tuple:
    """``((input, model shape, file shape), ...)``: the inputs whose ``None`` (time or spatial)
    dimensions the file fixes to a length (without the batch axis)."""
    file_shapes = {name: shape for name, _, shape in info.inputs}
    return tuple((name, shape, file_shapes[name]) for name, shape, _ in model_input_specs(model)
                 if None in shape and name in file_shapes and None not in file_shapes[name])


def stretched(model, samples: list) -> list | None:
    """``samples`` tiled to twice their length along each dynamic (``None``) axis of the model's
    inputs (still valid data: a sequence repeated, token ids stay ids), or None for a model
    without dynamic dimensions. Export checks a file keeping them at this second length."""
    specs = model_input_specs(model)
    if not any(None in shape for _, shape, _ in specs):
        return None
    out = []
    for xi, (_, shape, _) in zip(samples, specs):
        for axis, d in enumerate(shape, start=1):
            if d is None:
                xi = np.concatenate([xi, xi], axis=axis)
        out.append(xi)
    return out


class LengthError(ExportError):
    """A file keeping dynamic dimensions is faithful at the representative data's length only."""


class TFLiteModel(bytes):
    """The TFLite flatbuffer (a ``bytes``: write it, or pass it where keras_qx takes a file) with
    the export's :class:`ExportReport` attached; ``.table()`` and ``.to_dict()`` are the report's."""

    report: ExportReport

    def table(self) -> str:
        return self.report.table()

    def to_dict(self) -> dict:
        return self.report.to_dict()


def _layer_kernels(qat_model, info: TFLiteInfo):
    """``(layer name, {file kernel tensor: WeightStats})`` of each quantized layer with kernels;
    a file tensor belongs to the layer whose wrapper its name's first op path names."""
    stats = info.kernel_stats()
    for layer in qat_model.layers:
        if not getattr(layer, "_weight_vars", None) or not hasattr(layer, "layer"):
            continue
        mine = {n: st for n, st in stats.items() if layer.name in n.split(";")[0].split("/")}
        if mine:
            yield layer.layer.name, mine


def file_sparsity(qat_model, info: TFLiteInfo) -> tuple:
    """``((layer, sparsity), ...)``: the fraction of each quantized layer's kernel values the
    file stores as exactly 0, measured in the flatbuffer (:attr:`TFLiteInfo.weight_stats`)."""
    sizes = {w[0]: int(np.prod(w[2])) for w in info.weights}
    out = []
    for name, mine in _layer_kernels(qat_model, info):
        total = sum(sizes[n] for n in mine)
        if total:
            out.append((name, sum(st.sparsity * sizes[n] for n, st in mine.items()) / total))
    return tuple(out)


def file_distinct(qat_model, info: TFLiteInfo) -> tuple:
    """``((layer, distinct, most in one channel or None), ...)``: how many distinct values each
    quantized layer's kernel holds in the file (the largest over its kernel tensors), and for a
    kernel quantized per channel the most one channel holds, measured in the flatbuffer."""
    out = []
    for name, mine in _layer_kernels(qat_model, info):
        channel = [st.channel_distinct for st in mine.values() if st.channel_distinct is not None]
        out.append((name, max(st.distinct for st in mine.values()), max(channel) if channel else None))
    return tuple(out)


def _check_qat_model(qat_model) -> None:
    check_model(qat_model, "qat_model")
    unexportable = unexportable_layers(qat_model)
    if unexportable:
        raise ExportError(f"this QAT model was built with simulate_only=True: TFLite cannot deliver "
                          f"{unexportable}. Re-quantize without simulate_only (8-bit activations, 8-bit "
                          "weights for int8-only layers).")
    if not any(hasattr(l, "quantize_config") for l in qat_model.layers):
        raise ExportError("qat_model has no quantized layers; pass the model returned by qx.quantize().")
    blank = uncalibrated_ranges(qat_model)
    if blank:
        raise ExportError(
            f"qat_model has never seen data: the activation ranges of {len(blank)} layer(s) ({blank[:5]}"
            f"{' ...' if len(blank) > 5 else ''}) are still tfmot's initial ones, so the file would be "
            "useless. Calibrate it first, qx.calibrate(qat_model, x_train[:500]), or train it (model.fit).")


@renamed_args(representative_data="x")
def export_tflite(qat_model, x=None, path=None, *, int8_io: bool | None = None, verify: bool = True,
                  min_agreement: float = 0.9, verify_samples: int = 256, verbose: int = 0,
                  print_fn=None) -> TFLiteModel:
    """Convert a QAT model to an integer TFLite model and check it against Keras.

    Args:
        qat_model: a model from ``qx.quantize``, trained or calibrated (``qx.calibrate``): a
            model that has never seen data is refused.
        x: float samples shaped like the model input (n, ...), or a list (or a dict by input
            name) with one array per input: the int8 I/O calibration and the verification
            (``representative_data=`` is its deprecated name).
        path: where to write the ``.tflite`` (atomically); None writes nothing.
        int8_io: int8 input and output tensors (False: float32 at the edges). None (default):
            int8 where the whole file is integer; a model with layers kept float has float32
            edges (with a warning if you asked for True).
        verify: run the TFLite model and the Keras model on the samples and compare; a file
            whose output error (any output kind) is beyond what faithful files show (mean > 4 or
            p99 > 32 output steps, :mod:`keras_qx.lite.verify`) is refused, nothing written.
        min_agreement: least top-1 agreement (classifiers) accepted; below it nothing is
            written and :class:`ExportError` says by how much they disagree.
        verbose: 0 silent, 1 print the report (``print_fn`` is its deprecated form).

    Returns:
        :class:`TFLiteModel`: the flatbuffer bytes, with ``.report``.

    Example:
        >>> tfl = qx.export_tflite(qat, x_train[:300], "model.tflite", verbose=1)   # doctest: +SKIP

    The bytes are a function of the QAT model: the same weights and names give the same file
    (no timestamp; tests/test_determinism.py). Tensor names carry the Keras model's name
    (``model/quant_conv/Conv2D``), and an unnamed model is ``model``, ``model_1``... by a
    process-wide Keras counter: name the model to reproduce a file byte for byte.

    Before converting, each bias of ``qat_model`` (or the BatchNorm shift folded into a
    convolution) is moved onto the int32 grid the file stores it on (in place; by at most half
    a grid step, a few thousandths of an output step): the model then adds the bias the file
    adds (:mod:`keras_qx.lite.bias_grid`).
    """
    _check_qat_model(qat_model)
    check_options(int8_io=int8_io, verify=verify, min_agreement=min_agreement, verify_samples=verify_samples)
    print_fn = _printer("qx.export_tflite()", verbose, print_fn)
    samples = check_inputs(x, model_input_specs(qat_model), "x")
    if path is not None:
        check_writable(path)
    snap_biases(qat_model)
    lengths = None
    while True:
        data, seconds = convert_qat(qat_model, samples, int8_io, lengths=lengths)
        report = ExportReport(inspect_tflite(data), None, None, None, 0, seconds,
                              stored_wider=tuple((c.name, c.weight_bits, c.storage_bits)
                                                 for c, _ in layer_costs(qat_model) if c.stored_wider))
        report.sparsity = file_sparsity(qat_model, report.info)
        report.integer_anyway = tuple(float_layers_stored_integer(qat_model, report.info).items())
        if report.integer_anyway:
            warnings.warn(f"keras_qx: {dict(report.integer_anyway)}: kept float by the policy (quantize: false), but the "
                          "converter stores them integer, quantized between quantized layers with weight scales QAT did not "
                          "train. Quantize them, or for float32 ops convert the float model with qx.ptq(..., keep_float=[...]).",
                          stacklevel=2)
        report.distinct = file_distinct(qat_model, report.info)
        try:
            return deliver(qat_model, data, report, samples, path, verify=verify, min_agreement=min_agreement,
                           verify_samples=verify_samples, print_fn=print_fn)
        except LengthError as err:
            if lengths is not None:
                raise
            lengths = [xi.shape[1:] for xi in samples]
            warnings.warn(f"keras_qx: {err} The file is converted again at the representative data's shape "
                          f"{[tuple(l) for l in lengths]}, which it then takes only; pass representative data "
                          "of the length it will run at.", stacklevel=2)


def check_other_length(model, data: bytes, other: list, first: Verification, min_agreement: float) -> Verification:
    """Verify a file that keeps dynamic dimensions again on ``other`` (the samples at twice the
    length): :class:`LengthError` when it fails the same checks, or its mean error exceeds
    ``max(2 x, 1 step +)`` the first length's. Activation ranges calibrated at one length can
    clip at another (a sum over time grows with it: GroupNormalization's int8 variance measured
    1.3 mean steps at length 40, 53 at 64)."""
    try:
        result = verify_tflite(model, data, other)
        check_agreement(result, min_agreement)
    except ExportError as err:
        raise LengthError(f"the file keeping the dynamic dimensions fails at twice the representative "
                          f"data's length: {err}") from None
    bound = max(2 * first.mean_error_steps, first.mean_error_steps + 1.0)
    if result.mean_error_steps > bound:
        raise LengthError(f"the file keeping the dynamic dimensions is off by {result.mean_error_steps:.2f} mean "
                          f"output steps at twice the representative data's length, against "
                          f"{first.mean_error_steps:.2f} at that length (activation ranges calibrated at one "
                          "length clip at another).")
    return result


def check_options(*, int8_io: bool | None, verify: bool, min_agreement: float, verify_samples: int) -> None:
    """The export options' types and ranges, checked before any conversion."""
    if int8_io is not None and not isinstance(int8_io, bool):
        raise TypeError(f"int8_io must be True, False or None (int8 where the file is all integer), got {int8_io!r}.")
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be True or False, got {verify!r}.")
    if isinstance(min_agreement, bool) or not isinstance(min_agreement, numbers.Real) or not 0 <= min_agreement <= 1:
        raise ValueError(f"min_agreement is a fraction in 0..1 (0.9 means 90% top-1 agreement), got {min_agreement!r}.")
    check_count(verify_samples, "verify_samples")


def deliver(model, data: bytes, report: ExportReport, samples: list, path=None, *, verify: bool = True,
            min_agreement: float = 0.9, verify_samples: int = 256, print_fn=None) -> TFLiteModel:
    """The end of every conversion: verify ``data`` against ``model`` on ``samples`` (one array
    per input), refuse below ``min_agreement``, write ``path`` atomically, print the report."""
    report.fixed_lengths = fixed_lengths(model, report.info)
    if verify:
        result = verify_tflite(model, data, [xi[:verify_samples] for xi in samples])
        report.agreement, report.samples = result.agreement, result.samples
        report.max_error_steps, report.mean_error_steps = result.max_error_steps, result.mean_error_steps
        report.verification = result
        check_agreement(result, min_agreement)
        other = None if report.fixed_lengths else stretched(model, [xi[:min(verify_samples, 64)] for xi in samples])
        if other is not None:
            report.other_length = check_other_length(model, data, other, result, min_agreement)
    if path is not None:
        write_atomic(path, data)
    out = TFLiteModel(data)
    out.report = report
    if print_fn is not None:
        for line in report.lines():
            print_fn(line)
    return out


def _printer(where: str, verbose, print_fn):
    """The report printer of ``verbose`` (``print_fn`` is the deprecated way), or None."""
    verbose = check_verbose(verbose, where)
    if print_fn is not None:
        warn_renamed(where, "print_fn=", "verbose=1", stacklevel=4)
        return print_fn
    return print if verbose else None
