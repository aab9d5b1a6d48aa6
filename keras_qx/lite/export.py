"""``qx.export_tflite``: a QAT model -> an integer TFLite file, verified against Keras.

The steps each live in their own module: checks (:mod:`keras_qx._io`), conversion
(:mod:`keras_qx.lite.convert`), verification (:mod:`keras_qx.lite.verify`), the atomic write.

Example:
    >>> tfl = qx.export_tflite(qat, x_train[:200], "model.tflite")   # doctest: +SKIP
    >>> tfl.report.agreement, tfl.report.info.int4_tensors           # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass

from keras_qx._compat import check_model
from keras_qx._io import check_samples, check_writable, write_atomic
from keras_qx.lite.bias_grid import snap_biases
from keras_qx.lite.convert import ExportError, convert_qat
from keras_qx.lite.inspect import TFLiteInfo, inspect_tflite
from keras_qx.lite.verify import Verification, check_agreement, verify as verify_tflite

__all__ = ["export_tflite", "ExportReport", "TFLiteModel", "ExportError"]


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

    def lines(self) -> list[str]:
        out = [f"TFLite: {self.info.size_bytes:,} bytes, {len(self.info.int4_tensors)} INT4 tensors, "
               f"{'fully integer' if self.info.fully_integer else 'float ops: ' + ', '.join(self.info.float_ops)}"]
        if self.agreement is not None:
            v = self.verification
            agreed = (f"top-1 agreement {self.agreement:.1%} on the {v.decisive:.0%} decisive positions, "
                      if v is not None and v.classifier else "")
            p99 = f" / p99 {v.p99_error_steps:.1f}" if v is not None else ""
            out.append(f"verified on {self.samples} samples: {agreed}output error mean "
                       f"{self.mean_error_steps:.2f}{p99} / max {self.max_error_steps:.1f} steps")
        return out


class TFLiteModel(bytes):
    """The TFLite flatbuffer (a ``bytes``) with the export's :class:`ExportReport` attached."""

    report: ExportReport


def _check_qat_model(qat_model) -> None:
    check_model(qat_model, "qat_model")
    if getattr(qat_model, "_qx_simulate_only", False):
        raise ExportError("this QAT model was built with simulate_only=True (activation bits other "
                          "than 8); TFLite cannot run it. Re-quantize with activation_bits=8.")
    if not any(hasattr(l, "quantize_config") for l in qat_model.layers):
        raise ExportError("qat_model has no quantized layers; pass the model returned by qx.quantize().")


def export_tflite(qat_model, representative_data, path=None, int8_io: bool = True, *,
                  verify: bool = True, min_agreement: float = 0.9, verify_samples: int = 256,
                  print_fn=None) -> TFLiteModel:
    """Convert a QAT model to an integer TFLite model and check it against Keras.

    Args:
        qat_model: a model from ``qx.quantize`` (trained or not).
        representative_data: float samples shaped like the model input (n, ...): used for
            the int8 I/O calibration and the verification.
        path: where to write the ``.tflite`` (atomically); None writes nothing.
        int8_io: int8 input and output tensors (else float32 at the edges). A model with
            layers kept float always has float32 edges (with a warning).
        verify: run the TFLite model and the Keras model on the samples and compare.
        min_agreement: least top-1 agreement (classifiers) accepted; below it nothing is
            written and :class:`ExportError` says by how much they disagree.
        print_fn: where to print the report (e.g. ``print``); None is silent.

    Returns:
        :class:`TFLiteModel`: the flatbuffer bytes, with ``.report``.

    Before converting, each bias of ``qat_model`` (or the BatchNorm shift folded into a
    convolution) is moved onto the int32 grid the file stores it on (in place; by at most half
    a grid step, a few thousandths of an output step): the model then adds the bias the file
    adds (:mod:`keras_qx.lite.bias_grid`).
    """
    _check_qat_model(qat_model)
    samples = check_samples(representative_data, qat_model.input_shape[1:], dtype=qat_model.inputs[0].dtype)
    if path is not None:
        check_writable(path)
    snap_biases(qat_model)
    data, seconds = convert_qat(qat_model, samples, int8_io)
    report = ExportReport(inspect_tflite(data), None, None, None, 0, seconds)
    if verify:
        result = verify_tflite(qat_model, data, samples[:verify_samples])
        report.agreement, report.samples = result.agreement, result.samples
        report.max_error_steps, report.mean_error_steps = result.max_error_steps, result.mean_error_steps
        report.verification = result
        check_agreement(result, min_agreement)
    if path is not None:
        write_atomic(path, data)
    out = TFLiteModel(data)
    out.report = report
    if print_fn is not None:
        for line in report.lines():
            print_fn(line)
    return out
