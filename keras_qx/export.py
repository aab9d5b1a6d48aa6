"""``qx.export_tflite``: a QAT model -> an integer TFLite file, verified against Keras.

Example:
    >>> tfl = qx.export_tflite(qat, x_train[:200], "model.tflite")   # doctest: +SKIP
    >>> tfl.report.agreement, tfl.report.info.int4_tensors           # doctest: +SKIP
"""
from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np

from keras_qx._compat import check_model, keras, tf
from keras_qx.tflite import TFLiteInfo, TFLiteRunner, inspect_tflite

__all__ = ["export_tflite", "ExportReport", "TFLiteModel", "ExportError", "check_samples", "write_atomic",
           "converter_for"]


class ExportError(RuntimeError):
    """The converter failed, or the TFLite file disagrees with the Keras model."""


@dataclass
class ExportReport:
    """What ``export_tflite`` found after converting."""

    info: TFLiteInfo
    agreement: float | None  # top-1 agreement with the Keras model on the verification samples
    max_error_steps: float | None  # worst output difference, in output quantization steps
    mean_error_steps: float | None
    samples: int
    convert_seconds: float

    def lines(self) -> list[str]:
        out = [f"TFLite: {self.info.size_bytes:,} bytes, {len(self.info.int4_tensors)} INT4 tensors, "
               f"{'fully integer' if self.info.fully_integer else 'float ops: ' + ', '.join(self.info.float_ops)}"]
        if self.agreement is not None:
            out.append(f"verified on {self.samples} samples: top-1 agreement {self.agreement:.1%}, "
                       f"output error mean {self.mean_error_steps:.2f} / max {self.max_error_steps:.1f} steps")
        return out


class TFLiteModel(bytes):
    """The TFLite flatbuffer (a ``bytes``) with the export's :class:`ExportReport` attached."""

    report: ExportReport


def check_samples(x, input_shape, what: str = "representative_data", dtype="float32") -> np.ndarray:
    """``x`` as ``dtype`` (the model input's: float32, or int32 token ids) shaped
    (n, *input_shape), with clear errors for the usual mistakes."""
    if isinstance(x, tf.data.Dataset):
        x = np.concatenate([np.asarray(b[0] if isinstance(b, tuple) else b) for b in x])
    dtype = np.dtype(getattr(dtype, "as_numpy_dtype", dtype))
    try:
        raw = np.asarray(x)
        x = raw.astype(dtype)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be a numeric array shaped (n, {', '.join(map(str, input_shape))}): {err}") from None
    if dtype.kind in "iu" and raw.dtype.kind == "f" and not np.array_equal(raw, x):
        raise ValueError(f"{what} holds fractional values, but the model takes integer ({dtype}) inputs "
                         "such as token ids; pass the ids.")
    expected = tuple(int(s) if s is not None else None for s in input_shape)
    if x.ndim == len(expected):
        x = x[None]
    if x.ndim != len(expected) + 1 or any(e is not None and e != s for e, s in zip(expected, x.shape[1:])):
        raise ValueError(f"{what} has shape {x.shape}, but the model takes (n, {', '.join(map(str, expected))}).")
    if len(x) == 0:
        raise ValueError(f"{what} is empty; pass at least one sample (100-500 typical training samples).")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise ValueError(f"{what} contains {bad} NaN/inf values; clean the data before exporting.")
    return x


def write_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never a partial file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path!r}: directory {directory!r} does not exist.")
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".keras_qx-", suffix=".tmp")
    except OSError as err:
        raise PermissionError(f"cannot write {path!r}: {err.strerror}. Choose a writable path.") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def converter_for(model):
    """A ``TFLiteConverter`` for ``model``'s inference function.

    Converting one traced ``tf.function`` gives the same flatbuffer as ``from_keras_model``
    without its Keras SavedModel export, which traces every layer's call separately (most of
    the convert time: 87 s vs 17 s for the small EfficientNetV2 of tests/families.py, measured)."""
    specs = [tf.TensorSpec(t.shape, t.dtype, name=t.name.split(":")[0]) for t in model.inputs]
    fn = tf.function(lambda *xs: model(list(xs) if len(xs) > 1 else xs[0], training=False))
    owner = tf.Module()
    owner.variables_ = list(model.variables)  # the converter saves these, not the Keras layers
    return tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function(*specs)], owner)


def _is_quantized(layer) -> bool:
    from keras_qx._compat import quantize_layer, quantize_wrapper

    return isinstance(layer, (keras.layers.InputLayer, quantize_layer.QuantizeLayer, quantize_wrapper.QuantizeWrapper))


def _all_quantized(qat_model) -> bool:
    return all(_is_quantized(layer) for layer in qat_model.layers)


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
    """
    check_model(qat_model, "qat_model")
    if getattr(qat_model, "_qx_simulate_only", False):
        raise ExportError("this QAT model was built with simulate_only=True (activation bits other "
                          "than 8); TFLite cannot run it. Re-quantize with activation_bits=8.")
    if not any(hasattr(l, "quantize_config") for l in qat_model.layers):
        raise ExportError("qat_model has no quantized layers; pass the model returned by qx.quantize().")
    samples = check_samples(representative_data, qat_model.input_shape[1:], dtype=qat_model.inputs[0].dtype)
    if path is not None:
        directory = os.path.dirname(os.path.abspath(os.fspath(path)))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"cannot write {os.fspath(path)!r}: directory {directory!r} does not exist.")
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"cannot write {os.fspath(path)!r}: directory {directory!r} is not writable.")

    converter = converter_for(qat_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if _all_quantized(qat_model):
        calib = samples[:500]
        converter.representative_dataset = lambda: ([s[None]] for s in calib)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:  # a float input becomes int8; integer inputs (token ids) stay as they are
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    else:
        # Layers the policy keeps float stay float only without a representative dataset: with
        # one, the converter calibrates and quantizes them to int8 as well (measured). int8 I/O
        # needs that dataset, so such a file has float32 input and output.
        if int8_io:
            floats = [l.name for l in qat_model.layers if not _is_quantized(l)]
            warnings.warn(f"keras_qx: layers kept float ({floats}) stay float32 in the TFLite file, so its "
                          "input and output are float32 too (int8 I/O would quantize them). Quantize every "
                          "layer for int8 I/O.", stacklevel=2)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = converter.convert()
    except Exception as err:  # the converter raises many types; keep its message
        raise ExportError(f"TFLite conversion failed: {str(err).splitlines()[0][:500]}") from err
    seconds = time.perf_counter() - start

    report = ExportReport(inspect_tflite(data), None, None, None, 0, seconds)
    if verify:
        x = samples[:verify_samples]
        runner = TFLiteRunner(data)
        ours = runner.predict(x)
        ref = qat_model.predict(x, verbose=0, batch_size=256)
        runner_step = runner.output_step or float(np.ptp(ref) / 255 or 1.0)
        err = np.abs(ours - ref.reshape(ours.shape)) / runner_step
        report.samples = len(x)
        report.max_error_steps = float(err.max())
        report.mean_error_steps = float(err.mean())
        report.agreement = float((ours.reshape(len(x), -1).argmax(1) == ref.reshape(len(x), -1).argmax(1)).mean())
        if ref.reshape(len(x), -1).shape[1] > 1 and report.agreement < min_agreement:
            raise ExportError(
                f"the TFLite model disagrees with the Keras model: top-1 agreement {report.agreement:.1%} "
                f"< {min_agreement:.0%} on {len(x)} samples (mean error {report.mean_error_steps:.1f} "
                "output steps). Nothing was written. Train the QAT model longer, check the "
                "representative data matches training data, or pass verify=False to keep it anyway."
            )
    if path is not None:
        write_atomic(path, data)
    out = TFLiteModel(data)
    out.report = report
    if print_fn is not None:
        for line in report.lines():
            print_fn(line)
    return out
